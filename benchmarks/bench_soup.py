"""Peak memory of model souping, as ratios against a single model load measured in the same run.

Ingredients: all-MiniLM-L6-v2 (the CPU demo's model, 22.7M parameters, fp32) saved as an EmbeddingModel
folder, plus seeded perturbed copies of it ("fine-tuned" checkpoints). Each measurement runs in a fresh
subprocess: peak RSS during the operation (``VmHWM``, reset to the current RSS through ``/proc/self/clear_refs``
after the imports) minus the RSS before it, so every row pays the same interpreter and library baseline:

- ``single_load``: ``EmbeddingModel.from_pretrained(folder)`` (the peer: one model in memory).
- ``soup2`` / ``soup5``: ``kalm_lib.soup.average_checkpoints`` of 2 / 5 ingredients (streaming running mean).
- ``soup5_write``: ``write_soup`` of 5 (averaging + safetensors serialisation + folder copy).
- ``naive5``: load all 5 state dicts, then average (what a straightforward script does).

Reported ratios: ``soup5 / single_load`` (~2 is the design target: the float32 buffer + one mapped file),
``soup5 / soup2`` (~1: memory does not grow with N) and ``naive5 / soup5``.

Usage: ``python -m benchmarks.bench_soup [--n 5] [--out benchmarks/results/soup.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "soup.json"

PROBE = r"""
import json, sys, time
import torch, transformers, safetensors.torch
from transformers import AutoModel, AutoTokenizer, AutoConfig
from kalm_lib import soup
from kalm_lib.model import EmbeddingModel
mode, paths = sys.argv[1], sys.argv[2:]
def status(key):  # bytes, from /proc/self/status (kB)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
# Reset the peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0), so import-time peaks do not hide the
# operation's own peak (ru_maxrss cannot be reset).
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
t0 = time.perf_counter()
if mode == "single_load":
    m = EmbeddingModel.from_pretrained(paths[0])
elif mode == "soup":
    ings = soup.load_ingredients(paths)
    state = soup.average_checkpoints(ings, soup.uniform_weights(len(ings)))
elif mode == "soup_write":
    import tempfile
    ings = soup.load_ingredients(paths)
    with tempfile.TemporaryDirectory() as d:
        soup.write_soup(ings, soup.uniform_weights(len(ings)), d + "/soup")
elif mode == "naive":
    states = [safetensors.torch.load_file(p + "/model.safetensors") for p in paths]
    state = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
print(json.dumps({"peak_delta_bytes": status("VmHWM") - before, "seconds": time.perf_counter() - t0}))
"""


def _probe(mode: str, paths: list[Path]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode, *map(str, paths)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_ingredients(root: Path, n: int, seed: int = 0) -> list[Path]:
    """MiniLM as an EmbeddingModel folder + ``n - 1`` seeded perturbed copies."""
    import torch
    from safetensors.torch import load_file, save_file

    from kalm_lib.model import EmbeddingModel

    base = EmbeddingModel.from_pretrained("minilm").save(root / "ingredient-0")
    state = load_file(str(base / "model.safetensors"))
    paths = [base]
    for k in range(1, n):
        dst = root / f"ingredient-{k}"
        shutil.copytree(base, dst)
        g = torch.Generator().manual_seed(seed + k)
        save_file({n_: (v + 0.01 * v.std() * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
                   for n_, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
        paths.append(dst)
    return paths


def run(n: int = 5, repeats: int = 2, seed: int = 0) -> dict:
    """Measure every row (min over ``repeats`` fresh processes) and the ratios."""
    with tempfile.TemporaryDirectory(prefix="bench-soup-") as tmp:
        paths = make_ingredients(Path(tmp), n, seed)
        model_bytes = (paths[0] / "model.safetensors").stat().st_size
        plan = {"single_load": ("single_load", paths[:1]), "soup2": ("soup", paths[:2]),
                f"soup{n}": ("soup", paths), f"soup{n}_write": ("soup_write", paths), f"naive{n}": ("naive", paths)}
        rows = {}
        for _ in range(repeats):  # interleaved, so load from other processes hits every row alike
            for name, (mode, ps) in plan.items():
                r = _probe(mode, ps)
                best = rows.get(name)
                if best is None or r["peak_delta_bytes"] < best["peak_delta_bytes"]:
                    rows[name] = r
    for r in rows.values():
        r["peak_delta_mb"] = round(r["peak_delta_bytes"] / 2**20, 1)
        r["models"] = round(r["peak_delta_bytes"] / model_bytes, 2)
    single = rows["single_load"]["peak_delta_bytes"]
    ratios = {f"soup{n}_vs_single_load": rows[f"soup{n}"]["peak_delta_bytes"] / single,
              f"soup{n}_write_vs_single_load": rows[f"soup{n}_write"]["peak_delta_bytes"] / single,
              f"soup{n}_vs_soup2": rows[f"soup{n}"]["peak_delta_bytes"] / rows["soup2"]["peak_delta_bytes"],
              f"naive{n}_vs_soup{n}": rows[f"naive{n}"]["peak_delta_bytes"] / rows[f"soup{n}"]["peak_delta_bytes"]}
    return {"model": "all-MiniLM-L6-v2 (fp32)", "model_bytes": model_bytes, "n": n, "rows": rows,
            "ratios": {k: round(v, 3) for k, v in ratios.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5, help="ingredients in the soup")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON (with provenance)")
    args = parser.parse_args(argv)
    from kalm_lib import provenance

    start = time.perf_counter()
    result = run(args.n, args.repeats, args.seed)
    for name, r in result["rows"].items():
        print(f"{name:<18} peak +{r['peak_delta_mb']:8.1f} MiB  = {r['models']:5.2f} models  {r['seconds']:6.2f} s")
    for name, v in result["ratios"].items():
        print(f"{name:<30} {v:.3f}")
    record = provenance.collect(vars(args), seed=args.seed, benchmark="bench_soup", results=result,
                                seconds=round(time.perf_counter() - start, 1))
    provenance.write(args.out, record)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
