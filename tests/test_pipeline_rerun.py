"""Honest re-runs: what a stage's key covers (library code included), and a changed or forced stage re-running from
scratch with its previous outputs moved to ``<run_dir>/superseded/`` (never deleted, never mixed with the new ones).

The fixture notebooks (tests/fixtures/notebooks) append their stage name to ``<run_dir>/log.txt``, so which stages
really ran is read from their own side effects; the last test runs the smoke preset's real curate and finetune
notebooks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook

from kalm_lib import pipeline
from kalm_lib.pipeline import PipelineError, StageFailed, code, run_pipeline
from kalm_lib.pipeline.rerun import outputs_of

FIXTURES = Path(__file__).parent / "fixtures" / "notebooks"
ROOT = Path(__file__).resolve().parent.parent


def write_preset(tmp_path: Path, stages: dict, notebooks_dir: Path = FIXTURES, name: str = "fx") -> Path:
    presets = tmp_path / "presets"
    presets.mkdir(exist_ok=True)
    path = presets / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"stages": stages, "notebooks_dir": str(notebooks_dir)}, sort_keys=False))
    return path


ABC = {
    "a": {"notebook": "a_produce.ipynb", "parameters": {"value": 3}, "produces": ["a.json"]},
    "b": {"notebook": "b_transform.ipynb", "needs": ["a.json"], "produces": ["b.json"]},
    "c": {"notebook": "c_finish.ipynb", "needs": ["b.json"], "produces": ["c.txt"]},
}


def run(preset: Path, run_dir: Path, **kw):
    kw.setdefault("html", False)
    return run_pipeline(str(preset), run_dir=run_dir, presets_dir=preset.parent, progress=False,
                        log=lambda *_: None, **kw)


def log_lines(run_dir: Path) -> list[str]:
    return (run_dir / "log.txt").read_text().split()


def superseded(run_dir: Path, stage: str) -> list[Path]:
    return sorted((run_dir / pipeline.SUPERSEDED).glob(f"{stage}-*"))


def notebook(path: Path, *sources: str, params: str = "run_dir = None") -> Path:
    cell = new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[cell, *(new_code_cell(s) for s in sources)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


# ------------------------------------------------------------------------------ changed key: from scratch
def test_changed_parameter_moves_previous_outputs_aside(tmp_path):
    preset = write_preset(tmp_path, ABC)
    run_dir = tmp_path / "run"
    run(preset, run_dir, html=True)
    first = pipeline.read_manifest(run_dir)

    result = run(preset, run_dir, overrides=["b.scale=3"], html=True)
    assert (result.ran, result.skipped) == (["b", "c"], ["a"])  # c: its input b.json changed
    assert log_lines(run_dir) == ["a", "b", "c", "b", "c"]
    assert json.loads((run_dir / "b.json").read_text()) == {"value": 9} and (run_dir / "c.txt").read_text() == "9"

    # the previous b.json, c.txt and their executed notebooks + HTML: moved, in the run dir's layout, not copied
    (b_old,), (c_old,) = superseded(run_dir, "b"), superseded(run_dir, "c")
    assert superseded(run_dir, "a") == []
    assert json.loads((b_old / "b.json").read_text()) == {"value": 6} and (c_old / "c.txt").read_text() == "6"
    assert sorted(p.name for p in (b_old / "notebooks").iterdir()) == ["b_transform.html", "b_transform.ipynb"]
    assert result.superseded == {"b": b_old, "c": c_old}
    note = json.loads((b_old / "superseded.json").read_text())
    assert note["stage"] == "b" and sorted(note["moved"]) == ["b.json", "notebooks/b_transform.html",
                                                              "notebooks/b_transform.ipynb"]
    assert note["why"] == ["parameters changed: scale (unset) -> 3"]
    assert note["record"] == first["stages"]["b"]  # the old record travels with the old outputs
    c_note = json.loads((c_old / "superseded.json").read_text())
    assert c_note["why"] == ["inputs changed: b.json"]
    assert [s["stage"] for s in result.manifest["superseded"]] == ["b", "c"]
    assert result.manifest["history"][-1]["superseded"] == {"b": str(b_old), "c": str(c_old)}

    # the same command again: nothing runs, nothing moves
    result = run(preset, run_dir, overrides=["b.scale=3"])
    assert result.ran == [] and result.superseded == {} and len(superseded(run_dir, "b")) == 1


def test_force_reruns_from_scratch_each_time_and_keeps_every_old_output(tmp_path):
    preset = write_preset(tmp_path, {"a": ABC["a"]})
    run_dir = tmp_path / "run"
    for value in (1, 2, 3):
        result = run(preset, run_dir, overrides=[f"value={value}"], force=True)
        assert result.ran == ["a"]
    # forced twice after the first run: two folders, each with the a.json of the run before; nothing lost
    folders = superseded(run_dir, "a")
    assert len(folders) == 2 and folders[0].name != folders[1].name
    kept = sorted(json.loads((f / "a.json").read_text())["value"] for f in folders)
    assert kept == [1, 2] and json.loads((run_dir / "a.json").read_text())["value"] == 3
    assert all(json.loads((f / "superseded.json").read_text())["why"][0] == "forced (--force)" for f in folders)
    assert log_lines(run_dir) == ["a", "a", "a"]


def test_failed_stage_with_the_same_key_resumes_in_place(tmp_path):
    """A failure that is not the stage's key (here: a missing go-file) resumes where it stopped, outputs kept."""
    notebook(tmp_path / "flaky.ipynb",
             "from pathlib import Path\nrun = Path(run_dir)\n"
             "with open(run / 'partial.txt', 'a') as f:\n    f.write('x')",
             "if not (run / 'go').exists():\n    raise RuntimeError('not yet')",
             "(run / 'done.txt').write_text((run / 'partial.txt').read_text())")
    preset = write_preset(tmp_path, {"flaky": {"notebook": "flaky.ipynb", "produces": ["partial.txt", "done.txt"]}},
                          notebooks_dir=tmp_path)
    run_dir = tmp_path / "run"
    with pytest.raises(StageFailed, match="not yet"):
        run(preset, run_dir)
    (run_dir / "go").touch()
    decision, = pipeline.explain_pipeline(str(preset), run_dir, presets_dir=preset.parent)[3]
    assert (decision.action, decision.fresh) == ("run", False)
    assert decision.reasons == ["failed last time (cell 2, RuntimeError: not yet): resumes with the same key"]
    result = run(preset, run_dir)
    assert result.ran == ["flaky"] and result.superseded == {}
    assert (run_dir / "done.txt").read_text() == "xx"  # the first attempt's partial output was kept
    assert not (run_dir / pipeline.SUPERSEDED).exists()


def test_outputs_shared_by_two_stages_rerun_both(tmp_path):
    """Two stages writing one file (two ablation grids, one results.csv): superseding one re-runs the other."""
    preset = write_preset(tmp_path, {
        "first": {"notebook": "a_produce.ipynb", "parameters": {"value": 1}, "produces": ["a.json"]},
        "again": {"notebook": "a_produce.ipynb", "parameters": {"value": 2}, "produces": ["a.json"]},
    })
    run_dir = tmp_path / "run"
    run(preset, run_dir)
    assert log_lines(run_dir) == ["a", "a"]
    decisions = pipeline.explain_pipeline(str(preset), run_dir, presets_dir=preset.parent,
                                          overrides=["first.value=5"])[3]
    assert [(d.action, d.fresh) for d in decisions] == [("run", True), ("run", False)]
    assert "outputs shared with ['again'], which re-run(s) too" in decisions[0].reasons
    assert decisions[1].reasons == ["its outputs move aside with stage 'first''s: runs again"]

    result = run(preset, run_dir, overrides=["first.value=5"])
    assert result.ran == ["first", "again"] and log_lines(run_dir) == ["a", "a", "a", "a"]
    (folder,) = superseded(run_dir, "first")
    assert json.loads((folder / "a.json").read_text()) == {"value": 2}  # what the run dir held: again's
    assert json.loads((folder / "superseded.json").read_text())["shared_with"] == ["again"]
    assert json.loads((run_dir / "a.json").read_text()) == {"value": 2}
    assert {s: r["status"] for s, r in result.manifest["stages"].items()} == {"first": "ok", "again": "ok"}
    assert run(preset, run_dir, overrides=["first.value=5"]).ran == []


def test_stage_paths_must_stay_inside_the_run_dir(tmp_path):
    for bad in ("../elsewhere.json", "/etc/passwd", ".", ""):
        preset = write_preset(tmp_path, {"a": {**ABC["a"], "produces": [bad]}})
        with pytest.raises(PipelineError, match="must be paths inside the run directory"):
            pipeline.plan_pipeline(str(preset), presets_dir=preset.parent)
    preset = write_preset(tmp_path, {"a": {**ABC["a"], "needs": ["../x"]}})
    with pytest.raises(PipelineError, match=r"stage a: needs \['\.\./x'\] must be paths inside"):
        pipeline.plan_pipeline(str(preset), presets_dir=preset.parent)


def test_pipeline_entries_are_never_outputs(tmp_path):
    run_dir = tmp_path / "run"
    for rel in ("manifest.json", "notebooks/a.ipynb", "superseded/x-1/a.json", "keep/a.json", "out.txt"):
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_text("x")
    found = outputs_of(run_dir, ["*", "**/a.json", "keep/a.json"])
    assert [p.relative_to(run_dir).as_posix() for p in found] == ["keep", "out.txt"]


# ------------------------------------------------------------------------------ the key covers the code
def fake_library(root: Path) -> Path:
    """A package named kalm_lib with a known import graph (only its files' bytes are read, never imported)."""
    lib = root / "kalm_lib"
    files = {
        "__init__.py": "__version__ = '0'\n",
        "a.py": "from kalm_lib import b\n\ndef f():\n    from .sub import c  # function-local, relative\n",
        "b.py": "X = 1\n",
        "sub/__init__.py": "",
        "sub/c.py": "CMD = ['python', '-m', 'kalm_lib.d']  # a module named by a string\n",
        "d.py": "RUNNER = 'kalm_lib.e:run'\n",
        "e.py": "def run(): ...\n",
        "unrelated.py": "import kalm_lib.b\n",
        "dynamic.py": "import importlib\nm = importlib.import_module(f'kalm_lib.{1}')\n",
    }
    for rel, text in files.items():
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_text(text)
    return lib


def test_stage_code_follows_imports_and_module_names(tmp_path, monkeypatch):
    lib = fake_library(tmp_path)
    monkeypatch.setattr(code, "LIBRARY", lib)
    nb = notebook(tmp_path / "nb.ipynb", "%matplotlib inline\nfrom kalm_lib.a import f\nf()")
    config = tmp_path / "cfg.yaml"
    config.write_text("x: 1\n")
    got = pipeline.stage_code(nb, {"config": str(config), "model": "not/a/file.yaml"})

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    expected = {f"kalm_lib/{rel}": sha(lib / rel)
                for rel in ("__init__.py", "a.py", "b.py", "sub/__init__.py", "sub/c.py", "d.py", "e.py")}
    expected[str(config)] = sha(config)
    assert got == expected  # not unrelated.py or dynamic.py: nothing this stage runs imports them

    (lib / "unrelated.py").write_text("changed = True\n")
    assert pipeline.stage_code(nb, {"config": str(config)}) == expected
    (lib / "e.py").write_text("def run(): return 1\n")  # four hops away, named only by a string
    changed = pipeline.stage_code(nb, {"config": str(config)})
    assert {k for k in changed if changed[k] != expected[k]} == {"kalm_lib/e.py"}

    # a module name built at run time counts as the whole library
    nb2 = notebook(tmp_path / "nb2.ipynb", "import kalm_lib.dynamic")
    assert set(pipeline.stage_code(nb2, {})) == {f"kalm_lib/{p.relative_to(lib).as_posix()}"
                                                 for p in lib.rglob("*.py")}


def test_real_notebooks_key_their_own_packages():
    """A report fix re-runs the report, not training; a training fix re-runs the training stages."""
    train = pipeline.stage_code(ROOT / "notebooks" / "03_finetune.ipynb", {"preset": "smoke"})
    report = pipeline.stage_code(ROOT / "notebooks" / "06_report.ipynb", {"preset": "smoke"})
    setup = pipeline.stage_code(ROOT / "notebooks" / "00_setup.ipynb", {"preset": "smoke"})
    assert "kalm_lib/train/loop.py" in train and "kalm_lib/model.py" in train
    assert not any(f.startswith("kalm_lib/report/") for f in train)
    assert any(f.startswith("kalm_lib/report/") for f in report)
    assert not any(f.startswith(("kalm_lib/train/", "kalm_lib/report/")) for f in setup)
    assert "kalm_lib/pipeline/setup_stage.py" in setup


def test_changed_code_reruns_the_stage_from_scratch(tmp_path):
    """A stage naming a code file (a runner) by parameter re-runs when that file changes, and says which."""
    helper = tmp_path / "helper.py"
    helper.write_text("def value():\n    return 1\n")
    notebook(tmp_path / "uses.ipynb",
             "import importlib.util, pathlib\nspec = importlib.util.spec_from_file_location('h', runner)\n"
             "mod = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(mod)\n"
             "pathlib.Path(run_dir, 'out.txt').write_text(str(mod.value()))",
             params="run_dir = None\nrunner = None")
    preset = write_preset(tmp_path, {"uses": {"notebook": "uses.ipynb", "parameters": {"runner": str(helper)},
                                              "produces": ["out.txt"]}}, notebooks_dir=tmp_path)
    run_dir = tmp_path / "run"
    run(preset, run_dir)
    assert pipeline.read_manifest(run_dir)["stages"]["uses"]["code_files"] == {
        str(helper): hashlib.sha256(helper.read_bytes()).hexdigest()}
    assert run(preset, run_dir).ran == []
    helper.write_text("def value():\n    return 2\n")
    decision, = pipeline.explain_pipeline(str(preset), run_dir, presets_dir=preset.parent)[3]
    assert (decision.action, decision.fresh) == ("run", True)
    assert decision.reasons[0] == f"code changed: {helper}"
    result = run(preset, run_dir)
    assert result.ran == ["uses"] and (run_dir / "out.txt").read_text() == "2"
    assert (superseded(run_dir, "uses")[0] / "out.txt").read_text() == "1"


def test_record_without_code_version_reruns(tmp_path):
    """Runs recorded before the key covered the code re-run once, from scratch, and say why."""
    preset = write_preset(tmp_path, {"a": ABC["a"]})
    run_dir = tmp_path / "run"
    run(preset, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for k in ("code_hash", "code_files"):
        del manifest["stages"]["a"][k]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    result = run(preset, run_dir)
    assert result.ran == ["a"] and list(result.superseded) == ["a"]
    why = json.loads((result.superseded["a"] / "superseded.json").read_text())["why"]
    assert why == ["no code version in its record (an older kalm pipeline ran it)"]


# ------------------------------------------------------------------------------ the smoke preset's training stage
def test_changed_training_parameter_on_an_existing_run(tmp_path):
    """Issue 15: changing a training parameter on a finished pipeline run used to fail in the finetune notebook
    ('holds checkpoint-6 from a different config'), with --force no help. Now the stage re-runs from scratch and
    the previous training folder is kept, whole, in superseded/."""
    _, spec, _ = pipeline.load_preset("smoke")
    stages = {s: spec.stages[s] for s in ("curate", "finetune")}
    stages["finetune"].needs = ["curated/finetune.jsonl"]  # from the base model: no pretrain stage here
    preset = tmp_path / "presets" / "smoke-ft.yaml"
    preset.parent.mkdir()
    preset.write_text(yaml.safe_dump({"stages": {s: {"parameters": st.parameters, "needs": st.needs,
                                                     "produces": st.produces} for s, st in stages.items()}}))
    run_dir = tmp_path / "run"
    kw = dict(presets_dir=preset.parent, progress=False, html=False, log=lambda *_: None)
    pipeline.run_pipeline(str(preset), run_dir=run_dir, **kw)
    ft = run_dir / "train" / "finetune"
    old_lr = json.loads((ft / "provenance.json").read_text())["config"]["train"]["lr"]

    change = ["finetune.overrides=[train.lr=5e-4]"]
    decisions = pipeline.explain_pipeline(str(preset), run_dir, overrides=change, presets_dir=preset.parent)[3]
    assert [(d.stage, d.action) for d in decisions] == [("curate", "skip"), ("finetune", "run")]
    assert decisions[1].reasons[0] == 'parameters changed: overrides (unset) -> ["train.lr=5e-4"]'
    result = pipeline.run_pipeline(str(preset), run_dir=run_dir, overrides=change, **kw)
    assert (result.ran, result.skipped) == (["finetune"], ["curate"])

    old = result.superseded["finetune"] / "train" / "finetune"
    assert json.loads((old / "provenance.json").read_text())["config"]["train"]["lr"] == old_lr != 5e-4
    assert json.loads((ft / "provenance.json").read_text())["config"]["train"]["lr"] == 5e-4
    for folder in (old, ft):  # each folder holds one whole run: steps 1..max_steps once, its own checkpoints
        steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, max(steps) + 1)), folder
        assert (folder / "final").is_dir() and sorted(p.name for p in folder.glob("checkpoint-*"))
    assert json.loads((ft / "provenance.json").read_text())["resumed_from"] is None  # from scratch
