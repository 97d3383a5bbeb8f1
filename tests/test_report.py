"""kalm_lib.report: self-contained HTML from run directories, bad input, escaping, and a real headless browser.

The run directories hold real mteb result files (published all-MiniLM-L6-v2 / L12-v2 scores from
data/reference-scores) plus every optional part of the run layout; expected numbers are read from those
JSON files directly, independently of the loader.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kalm_lib import ablations
from kalm_lib import report as rp
from kalm_lib.report.cli import cli_main
from kalm_lib.report.widgets import AblationExplorer

REF = Path(__file__).resolve().parent.parent / "data" / "reference-scores" / "results"
RUNS = {"base": ("sentence-transformers__all-MiniLM-L6-v2", "8b3219a92973c328a8e22fadcfa821b5dc75636a"),
        "cand": ("sentence-transformers__all-MiniLM-L12-v2", "a05860a77cef7b37e0048a7864658139bc18a854")}
TASKS = ("STSBenchmark", "Banking77Classification", "STSB", "PAWSX")
EVIL = "<script>alert('x')</script>"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _published(run: str, task: str) -> float:
    model, rev = RUNS[run]
    d = json.loads((REF / model / rev / f"{task}.json").read_text())
    scores = [e["main_score"] for split in d["scores"].values() for e in split]
    return 100 * sum(scores) / len(scores)


@pytest.fixture()
def runs(tmp_path):
    for name, (model, rev) in RUNS.items():
        d = tmp_path / name / "eval" / model / rev
        d.mkdir(parents=True)
        for t in TASKS:
            shutil.copy(REF / model / rev / f"{t}.json", d / f"{t}.json")
    cand = tmp_path / "cand"
    d = next((cand / "eval").glob("*/*"))
    unknown = json.loads((d / "STSBenchmark.json").read_text())
    unknown["task_name"] = "MyPrivateTask<i>"
    (d / "MyPrivateTask.json").write_text(json.dumps(unknown))
    (d / "errors.json").write_text(json.dumps({"KalmDev-SciFact-en": "RuntimeError: out of <memory>"}))
    (cand / "provenance.json").write_text(json.dumps({
        "created": "2026-11-24T10:00:00+00:00", "config": {"note": EVIL}, "config_hash": "abc123", "seed": 7,
        "git": {"commit": "deadbeef", "dirty": False}, "packages": {"mteb": "2.26"}, "data": {"en-x/train": "00ff"}}))
    (cand / "train" / "finetune").mkdir(parents=True)
    (cand / "train" / "finetune" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 2.0 / (s + 1), "lr": 1e-5 * min(1, s / 3)}) + "\n" for s in range(10))
        + "not json\n")
    (cand / "soup").mkdir()
    (cand / "soup" / "soup.json").write_text(json.dumps({   # the layout kalm_lib.soup.write_result writes
        "recipe": "greedy", "ingredients": [{"name": "ckpt-a"}, {"name": "ckpt-b"}], "weights": [0.7, 0.3],
        "chosen": {"source": "greedy", "weights": [0.7, 0.3], "score": 62.5},
        "evaluations": [{"source": "ingredient", "weights": [1.0, 0.0], "score": 60.0},
                        {"source": "uniform", "weights": [0.5, 0.5], "score": 61.0},
                        {"source": "greedy", "weights": [0.7, 0.3], "score": 62.5}]}))
    (cand / "ablations").mkdir()
    (cand / "ablations" / "results.csv").write_text(
        "cell,seed,task,focal,mixing,score\nfull,0,A,1,1,70\nfull,1,A,1,1,72\n"
        "<b>no-focal</b>,0,A,0,1,68\n<b>no-focal</b>,1,A,0,1,67\nno-mixing,0,A,1,0,71\nno-mixing,1,A,1,0,73\n")
    (tmp_path / "empty").mkdir()
    return tmp_path


ALL_FIGURES = ("fig-types", "fig-heatmap", "fig-deltas", "fig-reference", "fig-training", "fig-soup",
               "fig-ablations")


def test_full_report_contents(runs, tmp_path):
    out = rp.build_report([runs / "base", runs / "cand", runs / "empty"], tmp_path / "r" / "report.html",
                          baseline="base")
    page = out.read_text(encoding="utf-8")
    for fid in ALL_FIGURES:
        assert f"id='{fid}'" in page, fid
    # plotly.js once, inline; nothing fetched from the network
    import plotly.offline

    bundle = plotly.offline.get_plotlyjs()
    assert page.count(bundle) == 1
    rest = page.replace(bundle, "")
    assert "plotly.js v" not in rest and "<script src" not in rest and "https://" not in rest
    # text from configs / datasets / file contents is escaped, in tables and inside figure JSON
    assert EVIL not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<b>no-focal</b>" not in page and "&lt;b&gt;no-focal&lt;/b&gt;" in page
    assert "MyPrivateTask<i>" not in page
    # visible notes for every kind of bad input
    for needle in ("no evaluation results", "does not know", "FAILED", "1 unreadable line", "no provenance.json"):
        assert needle in page, needle
    # deltas: L12 - L6, from the JSON files, sign-coloured
    for task in TASKS:
        delta = _published("cand", task) - _published("base", task)
        cls = "pos" if delta > 0 else "neg"
        assert f"<td>{task}</td><td>full split</td><td class='{cls} n'>{delta:+.2f}</td>" in page, task
    assert not (tmp_path / "r" / "report.html.tmp").exists()


def test_frames_match_hand_computation(runs):
    loaded = rp.load_runs([runs / "base", runs / "cand"])
    df = rp.combined_results(loaded)
    d = rp.delta_frame(df, "base")
    assert d.loc[("STSBenchmark", "full split"), "cand"] == pytest.approx(_published("cand", "STSBenchmark")
                                                                          - _published("base", "STSBenchmark"))
    ab = rp.ablation_deltas(loaded[1].ablations).set_index("cell")
    assert ab.attrs["reference_cell"] == "full"
    # paired by seed: no-focal's deltas are 68-70 and 67-72; no-mixing's 71-70 and 73-72 (no spread)
    assert ab.loc["<b>no-focal</b>", "delta_mean"] == pytest.approx(67.5 - 71.0)
    assert ab.loc["<b>no-focal</b>", "delta_std"] == pytest.approx(statistics.stdev([68 - 70, 67 - 72]))
    assert ab.loc["no-mixing", "delta_std"] == pytest.approx(0.0)
    assert ab["n"].tolist() == [2, 2, 2]
    soup = rp.soup_frame(loaded[1].soup)
    assert soup[soup["soup"] == "chosen"].set_index("ingredient")["weight"].to_dict() == {"ckpt-a": 0.7, "ckpt-b": 0.3}
    assert soup[soup["soup"] == "uniform #1"]["selection_score"].tolist() == [61.0, 61.0]


def test_report_shows_each_ablation_grid_against_its_own_reference(tmp_path):
    run = tmp_path / "two-grids"
    (run / "ablations").mkdir(parents=True)
    (run / "ablations" / "results.csv").write_text(
        "grid,cell,seed,task,score\n"
        "recipe,full,0,A,70\nrecipe,full,1,A,72\nrecipe,focal=off,0,A,68\nrecipe,focal=off,1,A,67\n"
        "arch,full,0,A,30\narch,full,1,A,34\narch,bidirectional=off,0,A,10\narch,bidirectional=off,1,A,12\n")
    loaded = rp.load_run(run)
    parts = dict(rp.ablation_grids(loaded.ablations))
    assert list(parts) == ["recipe", "arch"]
    arch = rp.ablation_deltas(parts["arch"]).set_index("cell")
    assert arch.loc["bidirectional=off", "delta_mean"] == pytest.approx(11.0 - 32.0)   # against arch's own full
    assert arch.loc["bidirectional=off", "delta_std"] == pytest.approx(statistics.stdev([10 - 30, 12 - 34]))
    page = rp.build_report([run], tmp_path / "r.html").read_text()
    fig = rp.fig_ablations([loaded])
    # one panel per grid, each with its own y axis
    assert [a.text for a in fig.layout.annotations] == ["grid recipe (scope unknown)", "grid arch (scope unknown)"]
    assert [(tr.xaxis, tr.yaxis) for tr in fig.data] == [("x", "y"), ("x2", "y2")]
    assert list(fig.data[1].x) == ["full", "bidirectional=off"] and list(fig.data[1].y) == pytest.approx([0.0, -21.0])
    assert ("two-grids · grid arch (reference cell: full; deltas paired by seed; scores: scope unknown)" in page
            and "-21.00" in page)


def _noisy_run_fn(cell_config, seed):
    """A toy grid runner: per-seed shifts common to every cell (so paired and unpaired spreads differ a lot)
    plus per-(cell, seed, task) noise, from seeded generators."""
    effect = {"full": 0.0, "focal=off": -0.9, "pooling=last": -2.0}[cell_config["cell"]]
    shift = np.random.default_rng(seed).normal(0.0, 4.0)
    out = {}
    for task, task_type, base in (("A", "retrieval", 60.0), ("B", "sts", 75.0), ("C", "sts", 70.0)):
        noise = np.random.default_rng([seed, zlib.crc32(f"{cell_config['cell']}/{task}".encode())]).normal(0.0, 0.3)
        out[task] = {"score": float(base + effect + shift + noise), "task_type": task_type}
    return out


def test_ablation_delta_is_one_definition_in_report_notebook_and_explorer(tmp_path):
    """Issue 11: on a seeded noisy toy grid, the report's ablation table, notebook 05's path (run_grid, then
    ablations.aggregate) and the AblationExplorer give identical delta, spread and n: paired by seed."""
    spec = ablations.load_grid({"name": "toy", "seeds": [0, 1, 2, 3],
                                "switches": {"focal": [True, False], "pooling": ["mean", "last"]}})
    results = ablations.run_grid(spec, _noisy_run_fn, tmp_path / "run", progress=False)   # notebook 05, cell 4
    notebook = ablations.aggregate(results, level="mtk")                                   # notebook 05, cell 6
    report_table = rp.ablation_deltas(rp.load_run(tmp_path / "run").ablations)
    explorer = AblationExplorer(ablations.read_results(tmp_path / "run"))
    cols = ["cell", "delta_mean", "delta_std", "n"]
    assert list(notebook["cell"]) == ["full", "focal=off", "pooling=last"]
    pd.testing.assert_frame_equal(report_table[cols], notebook[cols], check_exact=True)
    pd.testing.assert_frame_equal(explorer.table()[cols], notebook[cols], check_exact=True)
    # ... and it is the paired definition, computed here by hand from the runner's scores
    mtk = {(c.name, s): statistics.mean(v["score"] for v in _noisy_run_fn({"cell": c.name}, s).values())
           for c, s in ablations.expand_runs(spec)}
    for cell, row in notebook.set_index("cell").iterrows():
        deltas = [mtk[cell, s] - mtk["full", s] for s in spec.seeds]
        assert row["delta_mean"] == pytest.approx(statistics.mean(deltas), abs=1e-9)
        assert row["delta_std"] == pytest.approx(statistics.stdev(deltas), abs=1e-9) and row["n"] == 4
        if cell != "full":   # the unpaired std of the cell's own scores (the old report) is far larger
            assert statistics.stdev(mtk[cell, s] for s in spec.seeds) > 5 * row["delta_std"]
    # the HTML table shows those numbers, and the explorer's bars and error bars are the same
    page = rp.build_report([tmp_path / "run"], tmp_path / "r.html").read_text()
    row = notebook.set_index("cell").loc["focal=off"]
    assert (f"<td>focal=off</td><td class='n'>{row['score_mean']:.2f}</td><td class='n'>{row['baseline_mean']:.2f}"
            f"</td><td class='neg n'>{row['delta_mean']:+.2f}</td><td class='n'>{row['delta_std']:.2f}</td>"
            "<td class='n'>4</td>") in page
    bar = explorer.figure.data[0]
    assert list(bar.x) == ["focal=off", "pooling=last"]
    assert list(bar.y) == notebook["delta_mean"].tolist()[1:]
    assert list(bar.error_y.array) == (notebook["ci_high"] - notebook["delta_mean"]).tolist()[1:]   # 95% interval


def test_ablations_without_seeds_are_a_note(tmp_path):
    run = tmp_path / "no-seeds"
    (run / "ablations").mkdir(parents=True)
    (run / "ablations" / "results.csv").write_text("cell,task,score\nfull,A,70\nx,A,60\n")
    loaded = rp.load_run(run)
    assert loaded.ablations is None and any("no column(s) ['seed']" in n for n in loaded.notes)
    assert "No ablations/results.csv" in rp.build_report([run], tmp_path / "r.html").read_text()


def test_evaluate_run_picks_the_presets_eval_config(tmp_path):
    assert rp.eval_config_for("smoke") == "smoke" and rp.eval_config_for("cpu-demo") == "cpu-demo"
    assert rp.eval_config_for("gpu-qwen2-0.5b") == "quick" and rp.eval_config_for(None) == "quick"
    nothing = rp.evaluate_run(tmp_path, [], preset="smoke")
    assert nothing.empty and list(nothing.columns) == ["run", "model", "revision", "task", "task_type", "lang",
                                                       "scope", "main_score"]
    assert nothing.attrs == {"errors": {}, "results_dirs": [], "eval_config": "smoke"}
    # one real model on one task: the scores land in <run_dir>/eval, where the report reads the same numbers
    got = rp.evaluate_run(tmp_path, ["minilm"], preset="smoke", overrides=["tasks=[KalmDev-STSB-en]"])
    assert got[["model", "task", "task_type", "lang"]].values.tolist() == [
        ["sentence-transformers/all-MiniLM-L6-v2", "KalmDev-STSB-en", "sts", "en"]]
    assert got.attrs["results_dirs"][0].parents[2] == tmp_path / "eval"   # <eval>/results/<model>/<revision>
    assert got["scope"].tolist() == ["quick subset"]                      # the smoke config is a quick subset
    loaded = rp.load_run(tmp_path)
    assert loaded.results["main_score"].tolist() == got["main_score"].tolist()
    assert rp.auto_baseline(rp.combined_results([loaded])) == tmp_path.name


def test_bad_inputs_still_render(tmp_path, runs):
    out = rp.build_report([tmp_path / "does-not-exist", runs / "empty"], tmp_path / "bad.html", baseline="nope")
    page = out.read_text()
    assert "run directory not found" in page and "No evaluation results" in page
    assert "Baseline &#x27;nope&#x27; not found" in page
    trained = tmp_path / "trained-only"   # a run dir with provenance, metrics, a checkpoint, but no eval/
    (trained / "train" / "pretrain" / "checkpoint-3").mkdir(parents=True)
    (trained / "train" / "pretrain" / "checkpoint-3" / "config.json").write_text('{"model_type": "qwen2"}')
    (trained / "train" / "pretrain" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (trained / "provenance.json").write_text('{"seed": 1}')
    run = rp.load_run(trained)
    assert run.results.empty and any("no evaluation results" in n for n in run.notes)
    assert "id='fig-training'" in rp.build_report([trained], tmp_path / "t.html").read_text()
    out = rp.build_report([runs / "base"], tmp_path / "nobase.html", baseline=None)
    assert "No baseline chosen" in out.read_text()


def test_cli_writes_report(runs, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert cli_main([str(runs / "base"), str(runs / "cand"), "-o", str(out), "--baseline", "cand"]) == 0
    assert out.is_file() and str(out.resolve()) in capsys.readouterr().out


def _chromium() -> str | None:
    for c in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if c and Path(c).is_file():
            return c
    return None


@pytest.mark.browser
def test_report_in_headless_chromium(runs, tmp_path):
    """Open the report from file:// in headless Chromium: every figure drawn, no script error; screenshot."""
    chrome = _chromium()
    if chrome is None:
        pytest.skip("chromium is not installed and could not be installed (make browser): browser test skipped")
    out = rp.build_report([runs / "base", runs / "cand", runs / "empty"], tmp_path / "report.html", baseline="base")
    flags = [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=8000"]
    dom = subprocess.run(flags + [f"--user-data-dir={tmp_path / 'p1'}", "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    assert "</html>" in dom
    for fid in ALL_FIGURES:
        m = re.search(rf'<div id="{fid}" class="kalm-fig[^"]*"(.*?)</script>', dom, re.S)
        assert m and 'class="main-svg"' in m.group(1), f"figure {fid} was not drawn"
    errors = re.search(r'<div id="kalm-errors">(.*?)</div>', dom, re.S)
    assert errors is not None and errors.group(1).strip() == "", f"script errors: {errors and errors.group(1)}"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    subprocess.run(flags + [f"--user-data-dir={tmp_path / 'p2'}", "--window-size=1300,4200",
                            f"--screenshot={shot}", out.as_uri()], capture_output=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_models_to_evaluate_picks_last_checkpoints(tmp_path):
    for rel in ("train/pretrain/checkpoint-5", "train/pretrain/checkpoint-40", "train/pretrain/checkpoint-100",
                "train/finetune/checkpoint-7", "soup/model"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "config.json").write_text("{}")
    (tmp_path / "train/finetune/checkpoint-9").mkdir()  # no config.json: not a model (e.g. half-written)
    assert rp.models_to_evaluate(tmp_path) == ["minilm", str(tmp_path / "train/finetune/checkpoint-7"),
                                               str(tmp_path / "train/pretrain/checkpoint-100"),
                                               str(tmp_path / "soup/model")]
    (tmp_path / "train/pretrain/final").mkdir()
    (tmp_path / "train/pretrain/final/config.json").write_text("{}")
    assert rp.models_to_evaluate(tmp_path)[2] == str(tmp_path / "train/pretrain/final")


def test_notebook_06_runs_headless(runs, tmp_path):
    """The real notebook through papermill: figures inline (plotly mimetype) and the HTML report written."""
    import nbformat
    import papermill

    nb_path = Path(__file__).resolve().parent.parent / "notebooks" / "06_report.ipynb"
    out_html = tmp_path / "nb-report.html"
    executed = tmp_path / "06_executed.ipynb"
    papermill.execute_notebook(str(nb_path), str(executed), cwd=str(nb_path.parent), kernel_name="python3",
                               progress_bar=False, parameters={
                                   "run_dir": str(runs / "cand"), "extra_run_dirs": [str(runs / "base")],
                                   "evaluate_models": [], "baseline": "base", "out": str(out_html),
                                   "publish": False})
    nb = nbformat.read(executed, as_version=4)
    mimes = [k for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) for k in o.get("data", {})]
    assert mimes.count("application/vnd.plotly.v1+json") >= 6
    assert out_html.is_file() and "fig-deltas" in out_html.read_text()


def test_online_benchmark_folders_are_results_of_the_same_run(tmp_path):
    """<run>/mteb/<benchmark>/ (the GPU preset's online MTEB stages) is read beside <run>/eval/, keys kept apart."""
    model, rev = RUNS["base"]
    run = tmp_path / "run"
    for folder, tasks in ((run / "eval" / model / rev, TASKS[:2]), (run / "mteb" / "cmn-v1" / model / rev, TASKS[2:])):
        folder.mkdir(parents=True)
        for t in tasks:
            shutil.copy(REF / model / rev / f"{t}.json", folder / f"{t}.json")
        (folder / "errors.json").write_text(json.dumps({f"Failed-{folder.parts[-3]}": "RuntimeError"}))
    data = rp.load_run(run)
    assert sorted(data.results["task"].unique()) == sorted(TASKS)
    for t in TASKS:
        got = data.results.loc[data.results["task"] == t, "main_score"].mean()
        assert got == pytest.approx(_published("base", t))
    assert sorted(data.errors) == sorted([f"{model}/{rev}", f"mteb/cmn-v1/{model}/{rev}"])
