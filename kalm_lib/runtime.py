"""Where the code is running: headless or interactive, and the one progress-bar factory.

One headless check for the whole library (widgets, live plots, progress bars): the pipeline sets
``KALM_HEADLESS=1`` in the kernel's environment, and a plain Python process has no Jupyter kernel.
"""

from __future__ import annotations

import os

__all__ = ["HEADLESS_ENV", "is_headless", "progress_bar"]

HEADLESS_ENV = "KALM_HEADLESS"
_TRUE = ("1", "true", "yes")


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
