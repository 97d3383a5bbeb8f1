"""The shipped presets and the real notebooks 00_setup / 05_ablations executed through the pipeline runner;
the whole `smoke` preset end to end once every notebook exists."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from kalm_lib import pipeline

ROOT = Path(__file__).resolve().parent.parent
TOY_RUNNER = ROOT / "tests" / "fixtures" / "notebooks" / "toy_ablation_runner.py"


def test_shipped_presets_are_consistent():
    names = pipeline.known_presets()
    assert {"smoke", "cpu-demo", "gpu-qwen2-0.5b", "gpu-rehearsal"} <= set(names)
    for name in names:
        _, spec, path = pipeline.load_preset(name)
        # a stage's place in the pipeline is its notebook's number (00 < 00b < 01 < ... < 06; two stages may run
        # one notebook): read here from the file names, independently of the library's rule
        notebook = {s: st.notebook or pipeline.STAGE_NOTEBOOKS[s] for s, st in spec.stages.items()}
        numbers = [re.match(r"(\d\d[a-z]?)_", notebook[s]).group(1) for s in spec.stages]
        assert numbers == sorted(numbers), f"{path}: stages out of order: {numbers}"
        produced: list[str] = []
        for stage, st in spec.stages.items():
            missing = [n for n in st.needs if n not in produced]
            assert not missing, f"{path}: stage {stage} needs {missing}, produced by no earlier stage"
            produced += st.produces
            nb = pipeline.NOTEBOOKS_DIR / notebook[stage]
            if nb.is_file():  # notebooks not written yet are reported by the runner itself
                declared = pipeline.notebook_parameters(nb)
                params = set(st.parameters) | {k for k in spec.parameters if k in declared}
                assert params <= set(declared), f"{path}: {stage}: {sorted(params - set(declared))}"
            if name in ("smoke", "cpu-demo", "gpu-rehearsal"):  # presets that run here: their config paths exist
                for key, value in st.parameters.items():
                    if isinstance(value, str) and value.endswith(".yaml"):
                        assert (ROOT / value).is_file(), f"{path}: {stage}.{key}: {value} not found"


def test_setup_and_ablation_notebooks_run_headless(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"seeds": [0, 1], "switches": {"focal": [False]}}))
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "nb.yaml").write_text(yaml.safe_dump({"parameters": {"seed": 3}, "stages": {
        "setup": {"parameters": {"preset": "smoke"}, "produces": ["provenance.json"]},
        "ablate": {"parameters": {"grid": str(grid), "runner": f"{TOY_RUNNER}:run", "level": "task"},
                   "produces": ["ablations/results.csv"]},
    }}, sort_keys=False))
    result = pipeline.run_pipeline("nb", run_dir=tmp_path / "run", presets_dir=presets, progress=False,
                                   log=lambda *_: None)
    run_dir = result.run_dir
    assert result.ran == ["setup", "ablate"]

    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["seed"] == 3 and prov["config"]["preset"] == "smoke"
    assert prov["data"] == pipeline.hash_tree(ROOT / "data") and len(prov["data"]) > 10  # every bundled file
    assert prov["config"]["preset_config"] == yaml.safe_load((ROOT / "configs/presets/smoke.yaml").read_text())
    assert prov["environment"]["offline_flags"]["KALM_HEADLESS"] == "1"
    assert prov["packages"]["papermill"] and prov["git"]["commit"]

    res = pd.read_csv(run_dir / "ablations" / "results.csv")
    assert len(res) == 2 * 2 * 2  # cells x seeds x toy tasks
    focal_off = res[(res.cell == "focal=off") & (res.seed == 1) & (res.task == "toy_sts")].score.item()
    assert focal_off == pytest.approx(0.5 + 0.1 + 0.01 - 0.1)

    # headless: the explorer cell drew a static plotly figure (no widget view), and the HTML has it
    executed = nbformat.read(result.manifest["stages"]["ablate"]["executed"], as_version=4)
    last = executed.cells[-1]
    kinds = {k for out in last.outputs for k in out.get("data", {})}
    assert "application/vnd.plotly.v1+json" in kinds
    assert "application/vnd.jupyter.widget-view+json" not in kinds
    widget_outputs = [c for c in executed.cells if c.cell_type == "code" for o in c.outputs
                      if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert not widget_outputs  # not even a progress bar: widgets are blank in exported HTML
    html = Path(result.manifest["stages"]["ablate"]["html"]).read_text()
    assert "focal=off" in html and "toy_retrieval" in html


def test_setup_notebook_holds_no_glue():
    """00_setup calls the library (kalm_lib.pipeline.setup_record); no repository-root or sys.path glue."""
    nb = nbformat.read(ROOT / "notebooks" / "00_setup.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "REPO_ROOT" not in code and "sys.path" not in code and "setup_record(" in code
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_smoke_preset_runs_the_whole_pipeline(tmp_path):
    _, spec, _ = pipeline.load_preset("smoke")
    missing = [pipeline.STAGE_NOTEBOOKS[s] for s in spec.stages
               if not (pipeline.NOTEBOOKS_DIR / pipeline.STAGE_NOTEBOOKS[s]).is_file()]
    if missing:
        pytest.skip(f"notebooks not written yet: {missing}")
    run = tmp_path / "smoke"
    started = time.time()
    result = pipeline.run_pipeline("smoke", run_dir=run, progress=False)
    assert result.ran == list(spec.stages)
    # the finished run, dry-run again: every stage unchanged (unless kalm_lib was edited meanwhile: it says so)
    edited = any(p.stat().st_mtime > started for p in (ROOT / "kalm_lib").rglob("*.py"))
    for d in pipeline.explain_pipeline("smoke", run)[3]:
        assert d.action == "skip" or (edited and d.reasons[0].startswith("code changed: ")), d
    assert all(result.manifest["stages"][s]["status"] == "ok" for s in spec.stages)
    for s in spec.stages:  # every executed notebook kept, with its HTML export
        rec = result.manifest["stages"][s]
        assert Path(rec["executed"]).is_file() and Path(rec["html"]).is_file(), s
    # the report's models only (stage notebooks keep their own checks under train/<stage>/eval), in mteb's layout
    # (results/<model>/) with our own records beside it (kalm/<model>/)
    models = ["kalm__finetune-final", "kalm__pretrain-final", "kalm__soup-model",
              "sentence-transformers__all-MiniLM-L6-v2"]
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["kalm", "results"]
    for part in ("results", "kalm"):
        assert sorted(p.name for p in (run / "eval" / part).iterdir()) == models, part
    page = (run / "report" / "report.html").read_text(encoding="utf-8")
    for fig in ("fig-types", "fig-deltas", "fig-training", "fig-soup", "fig-ablations"):
        assert f"id='{fig}'" in page, fig
