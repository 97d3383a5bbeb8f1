"""The ``kalm`` command. Each subcommand lives in the module that owns it, as ``cli_main(argv)``.

Subcommands are imported lazily so ``kalm --help`` stays fast and a broken optional module does not
break the others. ``kalm --version`` prints ``kalm_lib.__version__``.

Hub access is decided once, before any subcommand runs, by :func:`kalm_lib.runtime.configure_hub`: offline
unless the user asks (``kalm --online <command>``, ``KALM_ONLINE=1``, or their own ``HF_HUB_OFFLINE=0``). The
decision is written into the environment, so every child process (papermill kernels, ``accelerate launch``)
inherits it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kalm_lib import __version__  # kalm_lib/__init__.py holds only the version: nothing heavy is imported
from kalm_lib import runtime  # light: os/sys/pathlib at import (torch and huggingface_hub only inside functions)

# subcommand -> ("module" or "module:function", one-line help); the function takes argv and returns an exit code
# (default name cli_main). A stage package's entry point is kalm_lib/<package>/cli.py, so the library modules hold
# no argparse
SUBCOMMANDS = {
    "curate": ("kalm_lib.data.cli:curate_main", "curate bundled datasets or your own records into training JSONL"),
    "mine": ("kalm_lib.data.cli:mine_main", "mine hard negatives / consistency filter (--run: with the run's model)"),
    "train": ("kalm_lib.train.cli", "train a stage (pre-train, fine-tune, distill); engines: configs/accelerate/"),
    "eval": ("kalm_lib.evaluation.cli", "evaluate models with mteb (offline dev tasks or mteb benchmarks)"),
    "report": ("kalm_lib.report.cli", "build a self-contained HTML report from run directories"),
    "soup": ("kalm_lib.soup.cli", "average checkpoints / search soup weights"),
    "ablate": ("kalm_lib.ablations.cli", "run an ablation grid (whole, in parallel, or one cell per command)"),
    "pipeline": ("kalm_lib.pipeline.cli", "run the ordered notebooks headlessly with papermill"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse for every ``kalm <command>``: a usage mistake is ONE line on stderr (``kalm eval: error: ...
    (see kalm eval --help)``) and exit code 2, not argparse's multi-line usage block; ``--help`` is unchanged."""

    def error(self, message: str):  # argparse calls this for a missing/unknown argument; it must not return
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


__all__ = ["SUBCOMMANDS", "ArgumentParser", "main"]


def _usage() -> str:
    lines = ["usage: kalm [--online] <command> [options]    (kalm --version: the kalm_lib version)", "",
             "  --online  allow Hugging Face hub downloads for this command and the processes it starts",
             f"            (also: {runtime.ONLINE_ENV}=1, or HF_HUB_OFFLINE=0 set by you; otherwise offline)",
             "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``kalm [--online] <command> [options]``: decide hub access (:func:`kalm_lib.runtime.configure_hub`), then
    dispatch to the subcommand's entry point and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    online = bool(argv) and argv[0] == "--online"
    if online:
        argv = argv[1:]
    # offline unless asked: tests and the CPU demo never wait on a network that is not there
    runtime.configure_hub(True if online else None)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"kalm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"kalm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    entry = getattr(importlib.import_module(module_name), function or "cli_main")
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
