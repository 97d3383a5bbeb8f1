"""The setup stage (notebook 00_setup): where and with what a run happens, in ``<run_dir>/provenance.json``.

The record is :func:`kalm_lib.provenance.collect` (config, seed, versions, git, host) plus the machine as the
run sees it (CPU/GPU, offline flags), the sha256 of every bundled data file and the preset's own YAML.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from kalm_lib import provenance
from kalm_lib.config import REPO_ROOT, load_yaml
from kalm_lib.pipeline.presets import load_preset
from kalm_lib.runtime import HEADLESS_ENV, OFFLINE_ENVS, ONLINE_ENV, hub_online

DATA_DIR = REPO_ROOT / "data"
# the environment variables that decide whether a run may reach the hub, and whether anyone is watching
RUN_FLAGS = (*OFFLINE_ENVS, ONLINE_ENV, HEADLESS_ENV)


def describe_environment() -> dict[str, Any]:
    """Python, platform, CPU count, torch threads, CUDA devices, hub access (``hub_online``, as
    :func:`kalm_lib.runtime.hub_online` sees it) and the offline/online/headless flags as set now."""
    import torch  # heavy: imported only by the setup stage, not by every `kalm pipeline` call

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "hub_online": hub_online(),
        "offline_flags": {k: os.environ.get(k) for k in RUN_FLAGS},
    }


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by its path relative to ``root`` (sorted; {} if no folder)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): provenance.sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def setup_record(preset: str | Path, *, seed: int, run_dir: Path, environment: dict[str, Any] | None = None,
                 data_dir: Path = DATA_DIR, presets_dir: Path | None = None) -> dict[str, Any]:
    """The run's provenance record: the preset (name, file, YAML), seed, data hashes and the environment."""
    name, _, path = load_preset(preset, presets_dir)
    return provenance.collect(
        config={"preset": name, "preset_file": str(path), "preset_config": load_yaml(path)},
        seed=seed, data_hashes=hash_tree(data_dir),
        environment=environment if environment is not None else describe_environment(),
        run_dir=str(run_dir))
