"""Where the code is running: headless or interactive, hub access, the device, and the one progress-bar factory.

One headless check for the whole library (widgets, live plots, progress bars): the pipeline sets
``KALM_HEADLESS=1`` in the kernel's environment, and a plain Python process has no Jupyter kernel.

**Hub access (the one rule, :func:`configure_hub`).** The workbench is offline unless the user asks for the
hub: tests and the CPU demo never wait on a network that is not there (a hub lookup hangs ~50 s before
failing). A process is online when, in this order of precedence,

1. the caller says so (``--online`` on a ``kalm`` command: ``configure_hub(online=True)``), or
2. ``KALM_ONLINE=1`` is set (``KALM_ONLINE=0`` forces offline), or
3. the user set ``HF_HUB_OFFLINE`` themselves to a false value (``HF_HUB_OFFLINE=0``): honoured, never
   forced back to 1.

Otherwise (``HF_HUB_OFFLINE`` unset or true) it is offline. :func:`configure_hub` writes the decision into
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` so child processes (papermill
kernels, ``accelerate launch``) inherit it, and into the import-time constants of ``huggingface_hub`` and
``datasets`` when they are already imported. Offline, a hub id still resolves from the local Hugging Face
cache (:func:`hub_snapshot`).

**Device.** :func:`resolve_device` turns ``"auto"`` into ``"cuda"`` when a GPU is present, else ``"cpu"``;
:func:`batch_size_for` picks the CPU or the GPU batch size of a config.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["HEADLESS_ENV", "ONLINE_ENV", "OFFLINE_ENVS", "HubModelNotFound", "is_headless", "progress_bar",
           "configure_hub", "hub_online", "hub_cache_dir", "hub_snapshot", "resolve_device", "batch_size_for"]

HEADLESS_ENV = "KALM_HEADLESS"
ONLINE_ENV = "KALM_ONLINE"
# the environment variables the Hugging Face libraries read for offline mode
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# weight formats a PyTorch embedding model never needs: skipped when a snapshot is downloaded
_NOT_DOWNLOADED = ("*.onnx", "onnx/*", "openvino/*", "*.gguf", "*.h5", "*.msgpack", "*.ot", "*.tflite",
                   "coreml/*")


def is_headless() -> bool:
    """True when nobody can interact: ``KALM_HEADLESS=1`` (pipeline/papermill), or no Jupyter kernel."""
    if os.environ.get(HEADLESS_ENV, "").lower() in _TRUE:
        return True
    try:
        from IPython import get_ipython
    except ImportError:
        return True
    shell = get_ipython()
    return shell is None or type(shell).__name__ != "ZMQInteractiveShell"


def progress_bar():
    """``tqdm`` class to use: widget bars in JupyterLab, plain text bars otherwise.

    Headless notebook exports cannot show widget bars, so a papermill run gets text bars that survive.
    """
    if is_headless():
        from tqdm import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm


# ---------------------------------------------------------------------------------------------- hub
class HubModelNotFound(FileNotFoundError):
    """A hub id that is neither in the local Hugging Face cache nor reachable (offline, or not on the hub)."""


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    return True if value in _TRUE else False if value in _FALSE else None


def configure_hub(online: bool | None = None) -> bool:
    """Decide hub access for this process (the rule is in the module docstring) and apply it; returns online.

    ``online``: True / False from a command-line flag, None to decide from the environment.
    """
    if online is None:
        online = _env_flag(ONLINE_ENV)
    if online is None:
        online = _env_flag("HF_HUB_OFFLINE") is False  # the user's own HF_HUB_OFFLINE=0
    for name in OFFLINE_ENVS:
        os.environ[name] = "0" if online else "1"
    # huggingface_hub and datasets read their offline switch once, at import: keep them in step when a
    # caller (a notebook, a test) imported them before deciding.
    hub_constants = sys.modules.get("huggingface_hub.constants")  # absent after a bare `import huggingface_hub`
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = not online
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = not online
        sys.modules["datasets"].config.HF_DATASETS_OFFLINE = not online
    return online


def hub_online() -> bool:
    """Whether hub access is on now (``HF_HUB_OFFLINE`` false; see :func:`configure_hub`)."""
    return _env_flag("HF_HUB_OFFLINE") is False


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (``HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), so a cache chosen after import is honoured."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """Local folder of a hub model: its snapshot in the Hugging Face cache (``models--org--name/snapshots/
    <commit>/``), downloaded first when hub access is on (:func:`hub_online`). The folder name is the commit.

    Raises :class:`HubModelNotFound` with what to do when the model is neither cached nor reachable.
    """
    from huggingface_hub import snapshot_download  # heavy optional import: only when a hub id is resolved
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    online = hub_online()
    cache = hub_cache_dir()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=not online,
                                   endpoint=os.environ.get("HF_ENDPOINT") or None, ignore_patterns=_NOT_DOWNLOADED)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        how = (f"the hub did not give it ({type(e).__name__}: {e})" if online else
               f"hub access is off (set {ONLINE_ENV}=1 or HF_HUB_OFFLINE=0, or pass --online, to download it)")
        raise HubModelNotFound(f"model {repo_id!r}{'@' + revision if revision else ''}: not a local folder and "
                               f"not in the Hugging Face cache {cache}; {how}") from None
    return Path(folder)


# ---------------------------------------------------------------------------------------------- device
def resolve_device(device: str | None = "auto") -> str:
    """``"auto"``/None -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; an explicit device is checked."""
    import torch  # heavy: only where a device is chosen

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is visible (use device: auto or cpu)")
    return str(device)


def batch_size_for(device: str, cpu: int, gpu: int) -> int:
    """The batch size of a config for ``device``: ``gpu`` on an accelerator, ``cpu`` on the CPU."""
    return cpu if str(device) == "cpu" else gpu
