"""``kalm train``: run a stage from a YAML config (resumes when its output_dir has checkpoints).

    kalm train --config configs/train/smoke/finetune.yaml train.max_steps=20 output_dir=runs/x/train/finetune
    python -m kalm_lib.train --config smoke/finetune                      # the same (configs/train/<name>.yaml)
    accelerate launch --config_file configs/accelerate/ddp.yaml -m kalm_lib.train --config ...
    torchrun --standalone --nproc_per_node 2 -m kalm_lib.train --config ...   # 2 gloo processes on CPU

Exit codes: 0 done, 2 bad config or data (nothing was run), 3 the loss diverged (the last good checkpoint kept),
4 the output folder is in use by another run (nothing was run; the message names the holder), 5 a file could not
be written or read (a full disk, permissions: the last complete checkpoint is kept, no temporary is left).
Every error is one line on stderr; ``--debug`` shows the traceback too.

The engine (DDP, FSDP2, DeepSpeed ZeRO-2/3) is the accelerate config's (configs/accelerate/README.md);
``train.batch_size`` is the global batch on any number of processes.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from kalm_lib.cli import ArgumentParser   # one-line usage errors for every kalm command
from kalm_lib.config import ConfigError, to_dict
from kalm_lib.locking import LockHeld
from kalm_lib.train.config import load_config
from kalm_lib.train.data import DataError
from kalm_lib.train.loop import NonFiniteLossError, train


def cli_main(argv: list[str] | None = None) -> int:
    """``kalm train --config X.yaml [key=value ...]``; prints the result as one JSON line."""
    parser = ArgumentParser(prog="kalm train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True,
                        help="stage YAML or <preset>/<stage>, e.g. configs/train/smoke/finetune.yaml or smoke/finetune")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 loss.focal_gamma=0")
    parser.add_argument("--output-dir", help="same as output_dir=...")
    parser.add_argument("--no-resume", action="store_true", help="same as checkpoint.resume=false")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its line")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.no_resume:
        overrides.append("checkpoint.resume=false")
    try:
        config = load_config(args.config, overrides)
        if args.print_config:
            print(json.dumps(to_dict(config), indent=2))
            return 0
        result = train(config)
    except (ConfigError, DataError, FileNotFoundError, NonFiniteLossError, LockHeld, OSError) as e:
        if args.debug:
            traceback.print_exc()
        return _error(e)
    print(json.dumps({"output_dir": str(result.output_dir), "final_model": str(result.final_model),
                      "steps": result.steps, "metrics": result.metrics}, default=str))
    return 0


def _error(e: BaseException) -> int:
    """One line on stderr for an error that stopped the run, and its exit code (the module docstring)."""
    if isinstance(e, NonFiniteLossError):
        print(f"kalm train: {e}", file=sys.stderr)
        return 3
    if isinstance(e, LockHeld):
        if os.environ.get("RANK", "0") == "0":  # every process is refused; one says so
            print(f"kalm train: error: {e}", file=sys.stderr)
        return 4
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        what = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        print(f"kalm train: error: cannot write or read a file ({what}); the last complete checkpoint is kept",
              file=sys.stderr)
        return 5
    print(f"kalm train: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def main() -> int:
    """``python -m kalm_lib.train``: the CLI, offline by default (as ``kalm``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return cli_main()
