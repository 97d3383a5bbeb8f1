"""The papermill pipeline runner, on small fixture notebooks executed for real (tests/fixtures/notebooks).

Stages a -> b -> c communicate through files in the run dir; every execution appends its stage name to
``<run_dir>/log.txt``, so which stages really ran is read from the notebooks' own side effects.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path

import pytest
import yaml

from kalm_lib import atomic, pipeline, provenance
from kalm_lib.cli import SUBCOMMANDS, main as kalm_main
from kalm_lib.config import resolve_config
from kalm_lib.pipeline import PipelineError, StageFailed, run_pipeline
from kalm_lib.pipeline.cli import cli_main
from kalm_lib.pipeline.manifest import run_lock
from kalm_lib.pipeline import presets as presets_module
from kalm_lib.pipeline.presets import parse_overrides
from kalm_lib.runtime import HEADLESS_ENV

FIXTURES = Path(__file__).parent / "fixtures" / "notebooks"


def write_preset(tmp_path: Path, name: str = "fx", stages: dict | None = None, **top) -> Path:
    presets = tmp_path / "presets"
    presets.mkdir(exist_ok=True)
    stages = stages if stages is not None else {
        "a": {"notebook": "a_produce.ipynb", "parameters": {"value": 3}, "produces": ["a.json"]},
        "b": {"notebook": "b_transform.ipynb", "needs": ["a.json"], "produces": ["b.json"]},
        "c": {"notebook": "c_finish.ipynb", "needs": ["b.json"], "produces": ["c.txt"]},
    }
    path = presets / f"{name}.yaml"
    top.setdefault("notebooks_dir", str(FIXTURES))
    path.write_text(yaml.safe_dump({"description": "fixture pipeline",
                                    "stages": stages, **top}, sort_keys=False))
    return path


def log_lines(run_dir: Path) -> list[str]:
    return (run_dir / "log.txt").read_text().split()


def run(preset: Path, run_dir: Path, **kw):
    kw.setdefault("html", False)
    return run_pipeline(str(preset), run_dir=run_dir, presets_dir=preset.parent, progress=False,
                        log=lambda *_: None, **kw)


# ------------------------------------------------------------------------------ bad input, nothing runs
def test_unknown_preset_lists_known(tmp_path):
    write_preset(tmp_path, "alpha")
    write_preset(tmp_path, "beta")
    with pytest.raises(PipelineError, match=r"unknown preset 'gamma'.*\['alpha', 'beta'\]"):
        pipeline.load_preset("gamma", tmp_path / "presets")


@pytest.mark.parametrize("overrides, match", [
    (["nope=1"], r"-p nope: unknown parameter; no stage's notebook defines 'nope'"),
    (["b.value=1"], r"-p b\.value: notebook b_transform\.ipynb defines no parameter 'value'"),
    (["zz.fail=true"], r"unknown stage 'zz'"),
    (["run_dir=/tmp/x"], r"run_dir is set by the pipeline"),
    (["fail"], r"must look like name=value"),
])
def test_bad_overrides_fail_before_any_work(tmp_path, overrides, match):
    preset = write_preset(tmp_path)
    run_dir = tmp_path / "run"
    with pytest.raises(PipelineError, match=match):
        run(preset, run_dir, overrides=overrides)
    assert not run_dir.exists()


def test_bad_presets_fail_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    cases = [
        ({"a": {"notebook": "a_produce.ipynb", "parameters": {"valeu": 1}}},
         r"stage a: unknown parameter\(s\) \['valeu'\] for notebook a_produce\.ipynb; "
         r"its parameters cell defines \['run_dir', 'value'\]"),
        ({"a": {"notebook": "no_params.ipynb"}}, r"no_params\.ipynb has no cell tagged 'parameters'"),
        ({"a": {"notebook": "a_produce.ipynb"}, "z": {"notebook": "not_written_yet.ipynb"}},
         r"notebook\(s\) not found \(not written yet\?\): z: .*not_written_yet\.ipynb"),
        ({"train": {"parameters": {}}}, r"unknown stage\(s\) \['train'\]; known stages: \['setup', 'curate'"),
        ({"a": {"notebook": "a_produce.ipynb", "parametres": {}}}, r"unknown key\(s\) \['parametres'\]"),
        ({"report": {}, "setup": {}},
         r"stages out of pipeline order: report \(06_report\.ipynb\), setup \(00_setup\.ipynb\)"),
        ({"remine": {"notebook": "02b_remine.ipynb"}, "pretrain": {}},
         r"out of pipeline order: remine \(02b_remine\.ipynb\), pretrain \(02_pretrain\.ipynb\)"),
    ]
    for stages, match in cases:
        preset = write_preset(tmp_path, stages=stages)
        with pytest.raises(PipelineError, match=match):
            run(preset, run_dir)
        assert not run_dir.exists()


def test_pipeline_order_is_the_notebooks_numbering():
    rank = presets_module.notebook_rank
    names = ["00_setup.ipynb", "00b_standins.ipynb", "01_data_curation.ipynb", "02_pretrain.ipynb",
             "02b_remine.ipynb", "03_finetune.ipynb", "03b_distill.ipynb", "04_soup.ipynb", "04b_mteb.ipynb",
             "05_ablations.ipynb", "06_report.ipynb", "10_later.ipynb"]
    assert sorted(names[::-1], key=rank) == names   # 10 after 06: numbers, not strings
    assert rank("02b_remine.ipynb") == (2, "b") and rank("mine.ipynb") is None and rank("2x.ipynb") is None

    def problems(stages):
        spec = pipeline.Preset(stages={s: pipeline.StageSpec(notebook=nb) for s, nb in stages})
        return presets_module._stage_name_problems(spec, "p")

    # the GPU preset's shape: stages beyond the canonical seven sit where their notebooks' numbers put them; two
    # stages may run one notebook; a notebook without a number (a user's own) has no fixed place
    assert problems([("setup", None), ("standins", "00b_standins.ipynb"), ("mine", "mine.ipynb"),
                     ("curate", None), ("pretrain", None), ("remine", "02b_remine.ipynb"), ("finetune", None),
                     ("distill", "03b_distill.ipynb"), ("soup", None), ("mteb_a", "04b_mteb.ipynb"),
                     ("mteb_b", "04b_mteb.ipynb"), ("ablate", None), ("ablate_x", "05_ablations.ipynb"),
                     ("report", None), ("extra", "zz.ipynb")]) == []
    assert problems([("finetune", None), ("distill", "03b_distill.ipynb"), ("pretrain", None)])
    assert problems([("soup", None), ("mteb", "04b_mteb.ipynb"), ("x", "04_soup.ipynb")])


def test_missing_stage_input_and_unknown_stage_selection(tmp_path):
    preset = write_preset(tmp_path)
    run_dir = tmp_path / "run"
    with pytest.raises(PipelineError, match=r"stage b needs 'a\.json' in .*run, which is missing"):
        run(preset, run_dir, only=["b"])
    with pytest.raises(PipelineError, match=r"unknown stage 'd'; this preset's stages: \['a', 'b', 'c'\]"):
        run(preset, run_dir, from_stage="d")
    assert not run_dir.exists()


def test_preset_common_parameters_reach_declaring_stages_only(tmp_path):
    preset = write_preset(tmp_path, parameters={"scale": 5})
    stages = pipeline.plan_pipeline(str(preset), presets_dir=preset.parent, overrides=["value=7"])[2]
    by = {s.name: s.parameters for s in stages}
    assert by == {"a": {"value": 7}, "b": {"scale": 5}, "c": {}}
    bad = write_preset(tmp_path, parameters={"sclae": 5})
    with pytest.raises(PipelineError, match=r"common parameter\(s\) \['sclae'\] are defined by no stage"):
        pipeline.plan_pipeline(str(bad), presets_dir=bad.parent)


# ------------------------------------------------------------------------------ real papermill runs
def test_failure_message_resume_and_change_detection(tmp_path):
    preset = write_preset(tmp_path)
    run_dir = tmp_path / "run"

    # 1. b fails: the pipeline stops, naming notebook, cell (index + first line) and the executed copy
    with pytest.raises(StageFailed) as info:
        run(preset, run_dir, overrides=["b.fail=true"], html=True)
    err = info.value
    executed = run_dir.resolve() / "notebooks" / "b_transform.ipynb"
    msg = str(err)
    assert str(FIXTURES / "b_transform.ipynb") in msg
    # source cells: 0 parameters, 1 log, 2 the raise -> cell 2 of the notebook the user edits
    assert "cell 2 (`if fail:  # forced failure for the runner tests`)" in msg
    assert "RuntimeError: forced failure in b" in msg
    assert f"executed copy: {executed}" in msg
    assert f"--run-dir {run_dir.resolve()} -p b.fail=true" in msg  # the command that resumes
    assert err.cell_index == 2 and executed.is_file() and executed.with_suffix(".html").is_file()
    manifest = pipeline.read_manifest(run_dir)
    assert [manifest["stages"][s]["status"] for s in "abc"] == ["ok", "failed", "pending"]
    assert manifest["status"] == "failed"
    assert manifest["stages"]["b"]["error"]["cell_index"] == 2
    assert log_lines(run_dir) == ["a", "b"]
    assert not (run_dir / "c.txt").exists()
    a_finished = manifest["stages"]["a"]["finished"]

    # 2. fixed: the re-run resumes at b; a is not executed again (log + unchanged timestamp)
    result = run(preset, run_dir)
    assert (result.ran, result.skipped) == (["b", "c"], ["a"])
    assert log_lines(run_dir) == ["a", "b", "b", "c"]
    manifest = pipeline.read_manifest(run_dir)
    assert manifest["stages"]["a"]["finished"] == a_finished
    assert manifest["status"] == "ok"
    assert json.loads((run_dir / "b.json").read_text()) == {"value": 6}
    assert (run_dir / "c.txt").read_text() == "6"
    for s in "abc":
        rec = manifest["stages"][s]
        assert rec["status"] == "ok" and rec["seconds"] > 0 and Path(rec["executed"]).is_file()
        assert set(rec["outputs"]) == set(rec["produces"])
    # outputs hashed by content: b.json's hash is its file's sha256 folded with its name
    assert manifest["stages"]["b"]["outputs"] == pipeline.hash_paths(run_dir.resolve(), ["b.json"])
    assert manifest["stages"]["c"]["input_hashes"] == manifest["stages"]["b"]["outputs"]
    assert manifest["provenance"]["config"]["stages"]["a"] == {"value": 3}
    assert [h["ran"] for h in manifest["history"]] == [["a"], ["b", "c"]]

    # 3. nothing changed: nothing runs
    result = run(preset, run_dir)
    assert (result.ran, result.skipped) == ([], ["a", "b", "c"])
    assert log_lines(run_dir) == ["a", "b", "b", "c"]

    # 4. a changed parameter re-runs only its stage (c's inputs are unchanged)
    result = run(preset, run_dir, overrides=["c.suffix=-x"])
    assert result.ran == ["c"] and (run_dir / "c.txt").read_text() == "6-x"

    # 5. a changed input file re-runs the stages downstream of it, not the producer
    (run_dir / "a.json").write_text(json.dumps({"value": 10}))
    result = run(preset, run_dir, overrides=["c.suffix=-x"])
    assert (result.ran, result.skipped) == (["b", "c"], ["a"])
    assert (run_dir / "c.txt").read_text() == "20-x"
    assert log_lines(run_dir) == ["a", "b", "b", "c", "c", "b", "c"]


def test_html_export_keeps_plotly_figure_and_missing_output_is_an_error(tmp_path):
    preset = write_preset(tmp_path, stages={
        "a": {"notebook": "a_produce.ipynb", "produces": ["a.json"]},
        "b": {"notebook": "b_transform.ipynb", "needs": ["a.json"], "produces": ["b.json", "nowhere.csv"]},
        "c": {"notebook": "c_finish.ipynb", "needs": ["b.json"]},
    })
    run_dir = tmp_path / "run"
    with pytest.raises(StageFailed, match=r"stage b finished but did not write its declared output\(s\) "
                                          r"\['nowhere\.csv'\]"):
        run(preset, run_dir, html=True)
    result = run(preset, run_dir, only=["c"], html=True)  # b.json exists, so c can run alone
    html = Path(result.manifest["stages"]["c"]["html"]).read_text()
    # plotly.js embedded once, and the figure's own data (trace name) is in the page
    assert "fixture-bar" in html and "plotly.js" in html.lower()


def test_batch_emit_commands_and_run(tmp_path, capsys):
    preset = write_preset(tmp_path, stages={"a": {"notebook": "a_produce.ipynb", "produces": ["a.json"]}})
    batch = tmp_path / "batch.yaml"
    batch.write_text(yaml.safe_dump([
        {"preset": str(preset), "overrides": ["value=11"], "name": "v11"},
        {"preset": str(preset), "overrides": {"value": 12}, "run_dir": str(tmp_path / "runs" / "fixed")},
        {"preset": str(preset), "overrides": {"value": 1e-5}, "name": "float"},
    ]))
    entries = pipeline.load_batch(batch)
    assert parse_overrides(entries[2].overrides) == [(None, "value", 1e-5)]
    cmds = pipeline.batch_commands(entries, tmp_path / "runs")
    assert len(cmds) == 3
    assert cmds[0].startswith(f"kalm pipeline --preset {preset} --run-dir {tmp_path / 'runs'}/")
    assert cmds[0].endswith("-fx-v11 -p value=11")
    assert cmds[1].endswith(f"--run-dir {tmp_path / 'runs' / 'fixed'} -p value=12")
    assert cli_main(["--batch", str(batch), "--emit-commands", "--runs-dir",
                              str(tmp_path / "runs")]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert not (tmp_path / "runs").exists()  # emitting runs nothing

    results = pipeline.run_batch(entries, runs_dir=tmp_path / "runs", presets_dir=preset.parent,
                                 progress=False, html=False, log=lambda *_: None)
    assert [r["status"] for r in results] == ["ok", "ok", "ok"]
    values = [json.loads((Path(r["run_dir"]) / "a.json").read_text())["value"] for r in results]
    assert values == [11, 12, 1e-5] and type(values[2]) is float  # a number in the kernel, not "1e-05"
    assert all(pipeline.read_manifest(Path(r["run_dir"]))["stages"]["a"]["status"] == "ok" for r in results)

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{"preset": str(preset)}, {"preset": str(preset), "overrides": ["nope=1"]}]))
    with pytest.raises(PipelineError, match="nope"):  # the whole batch is checked before the first run
        pipeline.run_batch(pipeline.load_batch(bad), runs_dir=tmp_path / "runs2", presets_dir=preset.parent)
    assert not (tmp_path / "runs2").exists()


def test_cli_errors_exit_2_and_name_the_problem(tmp_path, capsys):
    assert cli_main(["--preset", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'no-such-preset'" in err and "known presets" in err


def test_hash_cache_skips_unchanged_old_files_only(tmp_path):
    import os

    f = tmp_path / "ckpt" / "weights.bin"
    f.parent.mkdir()
    f.write_bytes(b"x" * 1000)
    fresh = pipeline.hash_paths(tmp_path, ["ckpt"], cache := {})
    assert cache == {}  # written just now: not trusted for caching
    os.utime(f, ns=(10**18, 10**18))  # an old file
    assert pipeline.hash_paths(tmp_path, ["ckpt"], cache) == fresh
    assert cache["ckpt/weights.bin"][:2] == [1000, 10**18]
    cache["ckpt/weights.bin"][2] = "0" * 64  # a tampered entry is used as long as size+mtime match ...
    assert pipeline.hash_paths(tmp_path, ["ckpt"], cache) != fresh
    f.write_bytes(b"y" * 1001)  # ... and a changed file is read again
    assert pipeline.hash_paths(tmp_path, ["ckpt"], cache) == pipeline.hash_paths(tmp_path, ["ckpt"])
    assert pipeline.hash_paths(tmp_path, ["nothing-*"]) == {"nothing-*": "missing"}


def test_one_pipeline_per_run_dir(tmp_path):
    import os

    preset = write_preset(tmp_path, stages={"a": {"notebook": "a_produce.ipynb", "produces": ["a.json"]}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".pipeline.lock").write_text(str(os.getpid()))  # a live holder
    with pytest.raises(PipelineError, match=rf"run directory .*run \(kalm pipeline\) is in use by another "
                                            rf"process \(pid {os.getpid()} on "):
        run(preset, run_dir)
    (run_dir / ".pipeline.lock").write_text("999999999")  # a holder that no longer exists
    with run_lock(run_dir):  # kalm_lib.locking's record: pid, host, since
        assert json.loads((run_dir / ".pipeline.lock").read_text())["pid"] == os.getpid()
    assert not (run_dir / ".pipeline.lock").exists()


def test_parameter_names_papermill_cannot_parse_are_still_known(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    def notebook(source):
        cell = new_code_cell(source)
        cell.metadata["tags"] = ["parameters"]
        path = tmp_path / "nb.ipynb"
        nbformat.write(new_notebook(cells=[cell]), path)
        return path

    # papermill's line parser gives up on the `overrides` line (a list in the trailing comment)
    path = notebook('run_dir = None\noverrides = []            # e.g. ["mining.enabled=false"]\n'
                    'steps: int = 3\n%matplotlib inline\na, b = 1, 2')
    params = pipeline.notebook_parameters(path)
    assert set(params) == {"run_dir", "overrides", "steps", "a", "b"}
    assert params["overrides"]["default"] == "[]"
    with pytest.raises(PipelineError, match="parameters cell is not valid Python"):
        pipeline.notebook_parameters(notebook("run_dir = None\nx = ("))


def test_notebook_without_kernelspec_runs_on_python3(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    params = new_code_cell("run_dir = None")
    params.metadata["tags"] = ["parameters"]
    work = new_code_cell("import os, sys, pathlib\n"
                         f"headless = str(os.environ.get({HEADLESS_ENV!r}))\n"
                         "pathlib.Path(run_dir, 'exe.txt').write_text(sys.executable + ' ' + headless)")
    nbformat.write(new_notebook(cells=[params, work]), tmp_path / "bare.ipynb")
    preset = write_preset(tmp_path, stages={"bare": {"notebook": "bare.ipynb", "produces": ["exe.txt"]}},
                          notebooks_dir=str(tmp_path))
    assert HEADLESS_ENV not in os.environ
    result = run(preset, tmp_path / "run")
    executable, headless = (tmp_path / "run" / "exe.txt").read_text().split()
    assert result.ran == ["bare"] and Path(executable).name.startswith("python")
    assert headless == "1"  # the kernel saw runtime.HEADLESS_ENV set by the pipeline ...
    assert HEADLESS_ENV not in os.environ  # ... and this process got its environment back


def test_only_selected_stages_need_their_notebooks(tmp_path):
    preset = write_preset(tmp_path, stages={
        "a": {"notebook": "a_produce.ipynb", "produces": ["a.json"]},
        "later": {"notebook": "not_written_yet.ipynb", "needs": ["a.json"]},
    })
    with pytest.raises(PipelineError, match="not_written_yet"):
        pipeline.plan_pipeline(str(preset), presets_dir=preset.parent)
    _, _, stages, plan = pipeline.plan_pipeline(str(preset), presets_dir=preset.parent, only=["a"],
                                                overrides=["later.x=1", "a.value=5"])
    assert [s.name for s in stages] == ["a"] and plan[0].parameters == {"value": 5}
    with pytest.raises(PipelineError, match="not_written_yet"):
        pipeline.plan_pipeline(str(preset), presets_dir=preset.parent, only=["later"])


def test_killed_run_is_marked_interrupted_and_rerun(tmp_path):
    preset = write_preset(tmp_path, stages={"a": {"notebook": "a_produce.ipynb", "produces": ["a.json"]}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # what a pipeline killed inside stage a leaves behind: its records still say running, a stale lock
    (run_dir / "manifest.json").write_text(json.dumps({
        "preset": "fx", "stages": {"a": {"status": "running"}}, "history": [{"status": "running"}]}))
    (run_dir / ".pipeline.lock").write_text("999999999")
    result = run(preset, run_dir)
    assert result.ran == ["a"]
    history = result.manifest["history"]
    assert [h["status"] for h in history] == ["interrupted", "ok"]


def test_two_stages_running_one_notebook_keep_separate_executed_copies(tmp_path):
    preset = write_preset(tmp_path, stages={
        "first": {"notebook": "a_produce.ipynb", "parameters": {"value": 1}, "produces": ["a.json"]},
        "again": {"notebook": "a_produce.ipynb", "parameters": {"value": 2}, "produces": ["a.json"]},
    })
    run_dir = tmp_path / "run"
    run(preset, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    executed = {s: Path(manifest["stages"][s]["executed"]) for s in ("first", "again")}
    assert executed == {s: run_dir / "notebooks" / f"a_produce.{s}.ipynb" for s in ("first", "again")}
    # each copy holds its own stage's injected parameters
    for stage, value in (("first", 1), ("again", 2)):
        nb = json.loads(executed[stage].read_text())
        injected = next(c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
        assert f"value = {value}" in "".join(injected["source"])
    assert json.loads((run_dir / "a.json").read_text()) == {"value": 2} and log_lines(run_dir) == ["a", "a"]


# ------------------------------------------------------------------------------ one syntax, one resolver, one writer
@pytest.mark.parametrize("raw, expected", [
    ("1e-5", 1e-5), ("5e-4", 5e-4), ("-2E+3", -2000.0), ("3", 3), ("2.5", 2.5), ("true", True), ("null", None),
    ("[64, 128]", [64, 128]), ("{a: 1}", {"a": 1}), ("smoke", "smoke"), ("'1e-5'", "1e-5"), ("", None),
])
def test_override_values_are_parsed_like_every_other_subcommand(tmp_path, raw, expected):
    preset = write_preset(tmp_path)
    for override in (f"value={raw}", f"a.value={raw}"):
        stages = pipeline.plan_pipeline(str(preset), presets_dir=preset.parent, overrides=[override])[2]
        got = stages[0].parameters["value"]
        assert got == expected and type(got) is type(expected), (override, got)


@pytest.mark.parametrize("override, match", [
    (".value=1", r"bad parameter override .*empty key"),
    ("a..value=1", r"bad parameter override .*empty key"),
    ("a.=1", r"bad parameter override .*empty key"),
    ("=1", r"bad parameter override .*empty key"),
    ("1x=1", r"'1x' is not a parameter name"),
    ("a.va-lue=1", r"'va-lue' is not a parameter name"),
    ("value=[1,", r"bad parameter override .*not valid YAML"),
])
def test_override_syntax_errors_are_pipeline_errors(tmp_path, override, match):
    preset = write_preset(tmp_path)
    with pytest.raises(PipelineError, match=match):
        run(preset, tmp_path / "run", overrides=[override])
    assert not (tmp_path / "run").exists()


def test_presets_resolve_through_the_config_resolver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root: repo-relative paths must still work
    shipped = (Path(__file__).resolve().parent.parent / "configs" / "presets" / "smoke.yaml").resolve()
    assert resolve_config("smoke", "presets") == shipped
    for spec in ("smoke", "configs/presets/smoke.yaml", str(shipped), shipped):
        name, spec_obj, path = pipeline.load_preset(spec)
        assert (name, path) == ("smoke", shipped) and "setup" in spec_obj.stages
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"stages": {"setup": {}}}))  # relative to the cwd
    assert pipeline.load_preset("mine.yaml")[:1] == ("mine",)
    with pytest.raises(PipelineError, match=r"unknown preset 'smok'; known presets: \[.*'smoke'"):
        pipeline.load_preset("smok")


def test_manifest_and_html_are_written_atomically(tmp_path, monkeypatch):
    preset = write_preset(tmp_path, stages={"a": {"notebook": "a_produce.ipynb", "produces": ["a.json"]}})
    run_dir = tmp_path / "run"
    result = run(preset, run_dir, html=True)
    html = Path(result.manifest["stages"]["a"]["html"])
    manifest_text = (run_dir / "manifest.json").read_text()
    before = html.read_text()
    assert json.loads(manifest_text) == result.manifest
    assert list(json.loads(manifest_text)) == sorted(result.manifest)  # stable, diffable key order

    def no_rename(*_):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", no_rename)  # every write through kalm_lib.atomic fails now
    with pytest.raises(OSError, match="disk gone"):
        pipeline.export_html(html.with_suffix(".ipynb"))
    with pytest.raises(OSError, match="disk gone"):
        pipeline.run_pipeline(str(preset), run_dir=run_dir, presets_dir=preset.parent, force=True,
                              progress=False, log=lambda *_: None)
    # the previous complete versions are still there, and no temporary file is left behind
    assert html.read_text() == before and (run_dir / "manifest.json").read_text() == manifest_text
    assert sorted(p.name for p in run_dir.rglob("*") if ".tmp" in p.name) == []


def test_setup_stage_record(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "b.txt").write_bytes(b"beta")
    (data / "sub" / "a.jsonl").write_bytes(b'{"x": 1}\n')
    expected = {"b.txt": hashlib.sha256(b"beta").hexdigest(),
                "sub/a.jsonl": hashlib.sha256(b'{"x": 1}\n').hexdigest()}
    assert pipeline.hash_tree(data) == expected and list(pipeline.hash_tree(data)) == list(expected)
    assert pipeline.hash_tree(tmp_path / "no-such-folder") == {}

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KALM_ONLINE", "0")
    monkeypatch.delenv(HEADLESS_ENV, raising=False)
    env = pipeline.describe_environment()
    assert env["offline_flags"]["HF_HUB_OFFLINE"] == "1" and env["offline_flags"][HEADLESS_ENV] is None
    assert env["offline_flags"]["KALM_ONLINE"] == "0" and env["hub_online"] is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert pipeline.describe_environment()["hub_online"] is True
    assert env["cpu_count"] == os.cpu_count() and env["cuda_available"] == bool(env["gpus"])

    preset = write_preset(tmp_path)
    record = pipeline.setup_record(str(preset), seed=7, run_dir=tmp_path / "run", environment=env, data_dir=data)
    assert record["seed"] == 7 and record["data"] == expected and record["environment"] == env
    assert record["config"]["preset"] == "fx" and record["config"]["preset_file"] == str(preset.resolve())
    assert record["config"]["preset_config"] == yaml.safe_load(preset.read_text())
    assert record["config_hash"] == provenance.config_hash(record["config"])
    assert record["run_dir"] == str(tmp_path / "run")


# ------------------------------------------------------------------------------ the package and the kalm command
def test_public_api_is_curated():
    names = pipeline.__all__
    assert len(set(names)) == len(names) and not [n for n in names if n.startswith("_")]
    assert all(hasattr(pipeline, n) for n in names)
    assert "cli_main" not in names  # the entry point lives in kalm_lib.pipeline.cli, apart from the library


def test_kalm_dispatcher(capsys):
    for name, entry in SUBCOMMANDS.items():  # the format other packages rely on: name -> (module, help)
        assert isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(x, str) and x for x in entry), name
    assert importlib.import_module(SUBCOMMANDS["pipeline"][0]).cli_main is cli_main
    assert kalm_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in SUBCOMMANDS)
    assert kalm_main(["no-such-command"]) == 2 and "unknown command 'no-such-command'" in capsys.readouterr().err
    assert kalm_main(["pipeline", "--list-presets"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == pipeline.known_presets()
