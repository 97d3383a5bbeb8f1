"""Build hook only (the metadata is in pyproject.toml): a wheel carries the workbench's folders besides the library.

``pip install .`` (a wheel, not editable) has no checkout to read presets, notebooks, stage configs and the bundled
data from, so the build copies them into the package as ``kalm_lib/_home/`` (configs/, notebooks/, data/,
data_cards/). ``kalm_lib.config.REPO_ROOT`` finds that copy when kalm_lib is not inside a checkout
(``KALM_HOME=<checkout>`` points at a checkout instead). An editable install reads the checkout itself.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# kalm_lib.config.HOME_DIRS (not imported: the build runs without the package's dependencies)
HOME_DIRS = ("configs", "notebooks", "data", "data_cards")
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints", ".DS_Store")


class BuildWithHome(build_py):
    """build_py, then the workbench's folders into ``<build>/kalm_lib/_home/`` (replaced whole: nothing stale)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        home = Path(self.build_lib) / "kalm_lib" / "_home"
        shutil.rmtree(home, ignore_errors=True)
        for name in HOME_DIRS:
            shutil.copytree(name, home / name, ignore=JUNK)


setup(cmdclass={"build_py": BuildWithHome})
