"""``kalm soup --config configs/soup/<name>.yaml [--run-dir DIR] [--set key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kalm_lib.cli import ArgumentParser  # one-line usage errors for every kalm command
from kalm_lib.config import ConfigError
from kalm_lib.soup.averaging import SoupError
from kalm_lib.soup.run import SOUP_JSON, load_config, run_soup


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="kalm soup", description="Average checkpoints and search soup weights.")
    p.add_argument("--config", required=True, help="name in configs/soup/ or a YAML path")
    p.add_argument("--run-dir", help="override run_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--no-progress", action="store_true")
    return p


def cli_main(argv: list[str]) -> int:
    """Run the soup stage; print every evaluated soup, the chosen one and the held-apart check."""
    args = _parser().parse_args(argv)
    overrides = list(args.set) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    try:
        config = load_config(args.config, overrides)
        result = run_soup(config, progress=not args.no_progress)
    except (ConfigError, SoupError, FileNotFoundError) as e:
        print(f"kalm soup: error: {e}", file=sys.stderr)
        return 2
    print(result.table().to_string(index=False))
    print(f"chosen ({result.recipe}): weights {result.chosen.weights} score {result.chosen.score:.4f}")
    if result.heldout:
        print(f"held-apart: chosen {result.heldout['chosen']['heldout_score']:.4f} vs best ingredient "
              f"{result.heldout['best_ingredient']['heldout_score']:.4f}")
    print(f"soup: {result.folder}\nresults: {Path(config.run_dir) / SOUP_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
