"""Rebuild this folder from ``../shared/reference/anchor-scores`` (the published anchor scores) and mteb's metadata.

    .venv/bin/python data/reference-scores/anchors/build.py [SOURCE_DIR]

- ``main_scores.csv``, ``coverage.csv``, ``SOURCE.txt``: copied byte for byte from SOURCE_DIR.
- ``models.csv``: size, embedding dim, max tokens, release date, licence of each (model, revision) in
  ``main_scores.csv``, from mteb's own ``ModelMeta`` registry (``mteb.get_model_meta(name, revision)``; a revision
  mteb does not know falls back to the model's registered revision, recorded in ``meta_revision``).
- ``tasks.csv``: for each task of the three benchmarks, the eval splits, subsets and dataset revision the published
  scores were computed on (``mteb.get_benchmark(B).tasks``): what a score of ours must match to be comparable.
- ``README.md``: the card; its ``files`` list (sha256, bytes) is rewritten here.
``paper_table.csv`` and ``LICENSE`` are kept as they are (hand-written / copied; see README.md).
Deterministic: the same inputs and mteb version give the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[3] / "shared" / "reference" / "anchor-scores"
COPIED = ("main_scores.csv", "coverage.csv", "SOURCE.txt")
BENCHMARKS = ("MTEB(cmn, v1)", "MTEB(eng, v1)", "MTEB(eng, v2)")
CARD_FILES = ("LICENSE", "SOURCE.txt", "main_scores.csv", "coverage.csv", "models.csv", "tasks.csv",
              "paper_table.csv", "build.py")


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _models_csv(mteb) -> str:
    pairs = sorted({(r["model"], r["revision"]) for r in csv.DictReader(open(HERE / "main_scores.csv"))})
    rows = []
    for model, revision in pairs:
        try:
            meta = mteb.get_model_meta(model, revision)
        except Exception:  # a revision mteb's registry does not list (e.g. "external"): the model's own entry
            meta = mteb.get_model_meta(model)
        dims = meta.embed_dim if isinstance(meta.embed_dim, list) else [meta.embed_dim]
        dims = [int(d) for d in dims if d is not None]
        rows.append([model, revision, meta.revision, meta.n_parameters or "", max(dims) if dims else "",
                     " ".join(map(str, dims)) if len(dims) > 1 else "",
                     int(meta.max_tokens) if meta.max_tokens else "", meta.release_date or "", meta.license or ""])
    return _csv_text(["model", "revision", "meta_revision", "n_parameters", "embed_dim", "mrl_dims", "max_tokens",
                      "release_date", "license"], rows)


def _tasks_csv(mteb) -> str:
    rows = []
    for bench in BENCHMARKS:
        for task in mteb.get_benchmark(bench).tasks:
            md = task.metadata
            rows.append([bench, md.name, md.type, " ".join(md.eval_splits), " ".join(task.hf_subsets),
                         md.dataset.get("revision", ""), md.main_score])
    return _csv_text(["benchmark", "task", "type", "eval_splits", "hf_subsets", "dataset_revision", "main_score"],
                     rows)


def _card_files() -> str:
    lines = []
    for name in CARD_FILES:
        data = (HERE / name).read_bytes()
        lines.append(f"  - {{file: {name}, bytes: {len(data)}, sha256: {hashlib.sha256(data).hexdigest()}}}")
    return "\n".join(lines)


def main(source: Path = DEFAULT_SOURCE) -> None:
    import mteb  # seconds to import; only the build needs it

    for name in COPIED:
        shutil.copyfile(source / name, HERE / name)
    (HERE / "models.csv").write_text(_models_csv(mteb), encoding="utf-8")
    (HERE / "tasks.csv").write_text(_tasks_csv(mteb), encoding="utf-8")
    card = (HERE / "README.md").read_text(encoding="utf-8")
    card = re.sub(r"(?ms)^files:\n.*?(?=^\S)", "files:\n" + _card_files() + "\n", card)
    card = re.sub(r"(?m)^mteb_version: .*$", f"mteb_version: {mteb.__version__}", card)
    (HERE / "README.md").write_text(card, encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE)
