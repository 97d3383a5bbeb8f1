"""``kalm pipeline`` from the command line: per-stage commands for a scheduler, a truthful ``--dry-run``,
``--log-output``, one-line errors for user mistakes, and ``kalm --version``."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook

import kalm_lib
from kalm_lib import pipeline
from kalm_lib.cli import main as kalm_main
from kalm_lib.pipeline import PipelineError
from kalm_lib.pipeline.cli import cli_main

FIXTURES = Path(__file__).parent / "fixtures" / "notebooks"
ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "configs" / "accelerate" / "slurm" / "pipeline.sbatch"


def write_preset(tmp_path: Path, stages: dict | None = None, notebooks_dir: Path = FIXTURES) -> Path:
    stages = stages or {
        "a": {"notebook": "a_produce.ipynb", "parameters": {"value": 3}, "produces": ["a.json"]},
        "b": {"notebook": "b_transform.ipynb", "needs": ["a.json"], "produces": ["b.json"]},
        "c": {"notebook": "c_finish.ipynb", "needs": ["b.json"], "produces": ["c.txt"]},
    }
    path = tmp_path / "fx.yaml"
    path.write_text(yaml.safe_dump({"stages": stages, "notebooks_dir": str(notebooks_dir)}, sort_keys=False))
    return path


def log_lines(run_dir: Path) -> list[str]:
    return (run_dir / "log.txt").read_text().split() if (run_dir / "log.txt").exists() else []


def out_err(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out, captured.err


# ------------------------------------------------------------------------------ --emit-commands
def test_emit_commands_one_idempotent_command_per_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preset = write_preset(tmp_path)
    suffix = "-it's $HOME; `x`"  # must reach the notebook as written: quoted for the shell
    assert cli_main(["--preset", "fx.yaml", "--run-dir", "run", "-p", f"c.suffix={suffix}", "--no-html",
                     "--emit-commands"]) == 0
    out, _ = out_err(capsys)
    lines = out.splitlines()
    assert out.endswith("\n") and len(lines) == 3 and all(lines)  # pipeline.sbatch reads one job per line
    run_dir = (tmp_path / "run").resolve()
    for line, stage in zip(lines, "abc"):  # absolute paths: a job may start in another directory
        assert shlex.split(line) == ["kalm", "pipeline", "--preset", str(preset.resolve()), "--run-dir",
                                     str(run_dir), "-p", f"c.suffix={suffix}", "--only", stage, "--no-html"]
    assert not run_dir.exists()  # emitting runs nothing

    def submit(chain):  # what the job chain does: each line as a shell would split it
        for line in chain:
            argv = shlex.split(line)
            assert argv[:2] == ["kalm", "pipeline"]
            assert cli_main(argv[2:]) == 0

    submit(lines)
    assert log_lines(run_dir) == ["a", "b", "c"] and (run_dir / "c.txt").read_text() == f"6{suffix}"
    submit(lines)  # re-submitting the chain: every stage unchanged, nothing runs again
    assert log_lines(run_dir) == ["a", "b", "c"]

    capsys.readouterr()
    assert cli_main(["--preset", str(preset), "--run-dir", "run", "--from", "b", "--emit-commands"]) == 0
    assert [shlex.split(line)[-1] for line in out_err(capsys)[0].splitlines()] == ["b", "c"]


def test_emit_commands_checks_everything_first(tmp_path, capsys):
    preset = write_preset(tmp_path)
    cases = [
        (["-p", "nope=1"], "unknown parameter"),
        (["--only", "c"], r"stage c needs 'b.json'"),  # nothing in the chain produces it
        (["--force"], "--emit-commands with --force"),
    ]
    for extra, match in cases:
        assert cli_main(["--preset", str(preset), "--run-dir", str(tmp_path / "r"), "--emit-commands", *extra]) == 2
        out, err = out_err(capsys)
        assert out == "" and match in err.replace("\\", ""), (extra, err)
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"preset": "something-else", "stages": {}}))
    assert cli_main(["--preset", str(preset), "--run-dir", str(other), "--emit-commands"]) == 2
    assert "holds a run of preset 'something-else'" in out_err(capsys)[1]


def test_sbatch_chain_reads_exactly_the_emitted_commands():
    """configs/accelerate/slurm/pipeline.sbatch submits one job per line of `kalm pipeline --emit-commands`."""
    text = SBATCH.read_text()
    assert 'kalm pipeline --preset "$PRESET" --run-dir "$RUN_DIR" --emit-commands' in text
    assert 'while IFS= read -r cmd' in text and '--wrap "$cmd"' in text


# ------------------------------------------------------------------------------ --dry-run
def dry_run(capsys, *argv: str) -> tuple[str, dict[str, str]]:
    assert cli_main([*argv, "--dry-run"]) == 0
    out = out_err(capsys)[0]
    actions = {}
    for line in out.splitlines()[2:]:
        words = line.split()
        if words and words[0] != "parameters:":
            actions[words[0]] = words[1]
    return out, actions


def test_dry_run_says_what_would_run_and_why(tmp_path, capsys):
    preset = write_preset(tmp_path)
    run_dir = tmp_path / "run"
    base = ["--preset", str(preset), "--run-dir", str(run_dir)]
    out, actions = dry_run(capsys, *base)
    assert actions == {"a": "run", "b": "run", "c": "run"} and "3 of 3 stage(s) would run" in out
    assert out.splitlines()[0].endswith(", hub access off")
    assert out.count("new: it has not run in this run directory") == 3
    assert not run_dir.exists()

    assert cli_main([*base, "--no-html"]) == 0
    capsys.readouterr()
    manifest_before = (run_dir / "manifest.json").read_bytes()
    out, actions = dry_run(capsys, *base)  # the finished run: everything would be skipped
    assert actions == {"a": "skip", "b": "skip", "c": "skip"}
    assert "0 of 3 stage(s) would run, 3 skipped (unchanged)" in out and "(holds a run: ok," in out

    out, actions = dry_run(capsys, *base, "-p", "c.suffix=-x")
    assert actions == {"a": "skip", "b": "skip", "c": "run"}
    assert 'parameters changed: suffix (unset) -> "-x"' in out
    assert f"its previous outputs move to {run_dir.resolve()}/superseded/c-<UTC time>/" in out

    out, actions = dry_run(capsys, *base, "-p", "a.value=4")  # b and c read a's new output: decided later
    assert actions == {"a": "run", "b": "maybe", "c": "maybe"}
    assert "decided after a ran (it reads their outputs)" in out

    out, actions = dry_run(capsys, *base, "--force", "--only", "b")
    assert actions == {"b": "run"} and "forced (--force)" in out
    # a dry run writes nothing: same manifest, no lock, nothing moved
    assert (run_dir / "manifest.json").read_bytes() == manifest_before
    assert sorted(p.name for p in run_dir.iterdir()) == ["a.json", "b.json", "c.txt", "log.txt", "manifest.json",
                                                         "notebooks"]

    # and the run does what the dry run said
    assert cli_main([*base, "-p", "c.suffix=-x", "--no-html"]) == 0
    assert "ran: ['c']; skipped (unchanged): ['a', 'b']" in out_err(capsys)[0]


# ------------------------------------------------------------------------------ --log-output
def test_log_output_streams_cell_output(tmp_path, capsys):
    params = new_code_cell('run_dir = None\nopts = []   # e.g. ["a=b"]: a line papermill cannot parse')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[params, new_code_cell("print('streamed-' + 'marker')\n"
                                                   "import pathlib; pathlib.Path(run_dir, 'x').write_text('1')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "talk.ipynb")
    preset = write_preset(tmp_path, {"talk": {"notebook": "talk.ipynb", "produces": ["x"]}}, notebooks_dir=tmp_path)
    base = ["--preset", str(preset), "--no-html", "--force"]
    assert cli_main([*base, "--run-dir", str(tmp_path / "quiet")]) == 0
    assert "streamed-marker" not in "".join(out_err(capsys))
    assert cli_main([*base, "--run-dir", str(tmp_path / "loud"), "--log-output"]) == 0
    out, err = out_err(capsys)
    assert "streamed-marker" in err and "streamed-marker" not in out  # stdout stays for the pipeline's own lines
    assert "Unable to parse line" not in err  # papermill's noise about parameter cells (read with ast instead)


# ------------------------------------------------------------------------------ user mistakes
def mistakes(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "broken.yaml").write_text("stages: {setup: [\n")
    (tmp_path / "tag.yaml").write_text("stages:\n  setup: !!python/object/apply:os.system [echo hi]\n")
    (tmp_path / "a-file").write_text("x")
    bad_manifest = tmp_path / "bad-run"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_text("{not json")
    (tmp_path / "batch.yaml").write_text("- {preset: [\n")
    preset = str(write_preset(tmp_path))
    return [
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["--preset", str(tmp_path / "broken.yaml")], "not valid YAML"),
        (["--preset", str(tmp_path / "tag.yaml")], "not valid YAML"),
        (["--preset", preset, "-p", "x"], "must look like name=value"),
        (["--preset", preset, "-p", "nope=1"], "-p nope: unknown parameter"),
        (["--preset", preset, "-p", "value=[1,"], "not valid YAML"),
        (["--preset", preset, "--only", "zz"], "unknown stage 'zz'"),
        (["--preset", preset, "--resume", "--runs-dir", str(tmp_path / "none")], "--resume: no earlier run"),
        (["--preset", preset, "--resume", "--run-dir", str(tmp_path / "missing")], "holds no pipeline run"),
        (["--preset", preset, "--run-dir", str(tmp_path / "a-file")], "is not a directory"),
        (["--preset", preset, "--run-dir", str(bad_manifest)], "is not a readable manifest"),
        (["--preset", preset, "--run-dir", str(bad_manifest), "--dry-run"], "is not a readable manifest"),
        (["--batch", str(tmp_path / "nowhere.yaml")], "batch file not found"),
        (["--batch", str(tmp_path / "batch.yaml")], "not valid YAML"),
        ([], "--preset (or --batch) is required"),
    ]


def test_user_mistakes_are_one_line_errors_with_exit_code_2(tmp_path, capsys):
    for argv, match in mistakes(tmp_path):
        assert cli_main(argv) == 2, argv
        out, err = out_err(capsys)
        assert err.startswith("kalm pipeline: error: ") and match in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "missing").exists() and not (tmp_path / "none").exists()
    for argv in (["--bogus"], ["--preset"], ["--preset", "smoke", "-p"]):  # argparse's own errors: one line too
        with pytest.raises(SystemExit) as info:
            cli_main(argv)
        err = out_err(capsys)[1]
        assert info.value.code == 2 and err.startswith("kalm pipeline: error: ") and err.count("\n") == 1, err


def test_debug_shows_the_traceback_and_unexpected_errors_stay_one_line(tmp_path, capsys, monkeypatch):
    with pytest.raises(PipelineError, match="unknown preset"):
        cli_main(["--preset", "no-such-preset", "--debug"])

    def disk_full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("kalm_lib.pipeline.cli.run_pipeline", disk_full)
    preset = str(write_preset(tmp_path))
    assert cli_main(["--preset", preset, "--run-dir", str(tmp_path / "r")]) == 1
    err = out_err(capsys)[1]
    assert err == "kalm pipeline: error: OSError: [Errno 28] No space left on device (--debug shows the traceback)\n"
    with pytest.raises(OSError):
        cli_main(["--preset", preset, "--run-dir", str(tmp_path / "r"), "--debug"])


def test_through_the_kalm_command(tmp_path, capsys):
    assert kalm_main(["pipeline", "--preset", "no-such-preset"]) == 2
    assert out_err(capsys)[1].count("\n") == 1
    assert kalm_main(["--version"]) == 0 and out_err(capsys)[0] == f"kalm {kalm_lib.__version__}\n"
    assert kalm_main(["-V"]) == 0 and out_err(capsys)[0] == f"kalm {kalm_lib.__version__}\n"


def test_smoke_preset_dry_run_lists_its_stages(capsys):
    _, spec, _ = pipeline.load_preset("smoke")
    out, actions = dry_run(capsys, "--preset", "smoke", "--runs-dir", "/nonexistent-runs")
    assert list(actions) == list(spec.stages) and set(actions.values()) == {"run"}
    assert f"{len(spec.stages)} of {len(spec.stages)} stage(s) would run" in out


# ------------------------------------------------------------------------------ hub access (online mode)
HUB_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "KALM_ONLINE")


@pytest.fixture
def hub_env(monkeypatch):
    """The hub flags of this test process, restored afterwards (kalm's main() writes the decision into them)."""
    import sys

    for name in HUB_ENVS:
        monkeypatch.setenv(name, "")   # recorded first, so the original value (or its absence) comes back
        monkeypatch.delenv(name)
    if "huggingface_hub.constants" in sys.modules:
        constants = sys.modules["huggingface_hub.constants"]
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    if "datasets" in sys.modules:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            monkeypatch.setattr(sys.modules["datasets"].config, name, getattr(sys.modules["datasets"].config, name))
    return monkeypatch


def hub_probe(tmp_path: Path) -> Path:
    """A one-stage preset whose notebook writes what its kernel sees: the flags, huggingface_hub's own switch
    (read at import from the environment) and the decision runtime.configure_hub() makes inside the kernel."""
    params = new_code_cell("run_dir = None")
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[params, new_code_cell(
        "import json, os, pathlib\n"
        "from huggingface_hub import constants\n"
        "from kalm_lib import runtime\n"
        f"seen = {{k: os.environ.get(k) for k in {HUB_ENVS!r}}}\n"
        "seen['hf_offline_constant'] = constants.HF_HUB_OFFLINE\n"
        "seen['configure_hub'] = runtime.configure_hub()\n"
        "pathlib.Path(run_dir, 'hub.json').write_text(json.dumps(seen))")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "hub_probe.ipynb")
    return write_preset(tmp_path, {"probe": {"notebook": "hub_probe.ipynb", "produces": ["hub.json"]}},
                        notebooks_dir=tmp_path)


def test_offline_by_default_online_when_asked_inside_the_kernel(tmp_path, hub_env, capsys):
    preset = str(hub_probe(tmp_path))
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "KALM_ONLINE": "0",
               "hf_offline_constant": True, "configure_hub": False}
    online = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "KALM_ONLINE": "1",
              "hf_offline_constant": False, "configure_hub": True}
    cases = [  # (user's environment, kalm arguments before / after the subcommand's own, expected in the kernel)
        ({}, [], [], offline),                                   # nothing asked: offline
        ({"HF_HUB_OFFLINE": "1"}, [], [], offline),
        ({"KALM_ONLINE": "0"}, ["--online"], [], online),        # the global flag wins over the environment
        ({}, [], ["--online"], online),                          # kalm pipeline --online
        ({"HF_HUB_OFFLINE": "0"}, [], [], online),               # the user's own HF_HUB_OFFLINE=0 is honoured
    ]
    for i, (env, before, after, expected) in enumerate(cases):
        for name in HUB_ENVS:
            hub_env.delenv(name, raising=False)
        for name, value in env.items():
            hub_env.setenv(name, value)
        run_dir = tmp_path / f"run{i}"
        argv = [*before, "pipeline", "--preset", preset, "--run-dir", str(run_dir), "--no-html", *after]
        assert kalm_main(argv) == 0, (argv, capsys.readouterr().err)
        seen = json.loads((run_dir / "hub.json").read_text())
        assert seen == expected, (env, argv, seen)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["history"][-1]["hub_online"] is expected["configure_hub"]
        assert manifest["provenance"]["kernel_environment"]["HF_HUB_OFFLINE"] == expected["HF_HUB_OFFLINE"]
    capsys.readouterr()

    # the emitted per-stage commands carry the decision (a scheduler job starts without the flag otherwise)
    for name in HUB_ENVS:
        hub_env.delenv(name, raising=False)
    for before, flagged in (([], False), (["--online"], True)):
        assert kalm_main([*before, "pipeline", "--preset", preset, "--run-dir", str(tmp_path / "e"),
                          "--emit-commands"]) == 0
        assert [("--online" in shlex.split(line)) for line in capsys.readouterr().out.splitlines()] == [flagged]


# ------------------------------------------------------------------------------ ablation cells for a scheduler
TOY_RUNNER = FIXTURES / "toy_ablation_runner.py"


def smoke_ablate_run(tmp_path: Path) -> Path:
    """A run directory where the smoke preset's ablate stage can start (its one input present)."""
    run_dir = tmp_path / "run"
    (run_dir / "curated").mkdir(parents=True)
    (run_dir / "curated" / "finetune.jsonl").write_text('{"query": "q", "pos": ["p"]}\n')
    return run_dir


def test_emit_commands_splits_an_ablation_stage_into_its_cells(tmp_path, capsys, monkeypatch):
    """The smoke preset's ablate stage (toy runner): one `kalm ablate --cell C --seed S` per run, then the stage's
    own command; run in order they complete the stage, and the stage's notebook trains nothing itself."""
    run_dir = smoke_ablate_run(tmp_path)
    calls = tmp_path / "calls"
    monkeypatch.setenv("TOY_RUNNER_LOG", str(calls))   # every toy run appends a line: who ran what
    monkeypatch.chdir(tmp_path)                        # the commands work from anywhere (absolute paths)
    base = ["--preset", "smoke", "--run-dir", str(run_dir), "--only", "ablate", "--no-html",
            "-p", f"ablate.runner={TOY_RUNNER.relative_to(ROOT)}:run", "-p", "ablate.seeds=[0,1]"]
    assert cli_main([*base, "--emit-commands"]) == 0
    out, err = out_err(capsys)
    lines = out.splitlines()
    cells = [shlex.split(line) for line in lines[:-1]]
    assert len(lines) == 2 * 2 + 1   # smoke grid: 2 cells x 2 seeds, then the stage
    assert {(c[c.index("--cell") + 1], c[c.index("--seed") + 1]) for c in cells} == {
        (cell, seed) for cell in ("full", "focal=off") for seed in ("0", "1")}
    assert all(c[:2] == ["kalm", "ablate"] and c[c.index("--runner") + 1] == f"{TOY_RUNNER}:run" for c in cells)
    assert shlex.split(lines[-1])[:2] == ["kalm", "pipeline"] and "--only" in shlex.split(lines[-1])
    assert "# kalm pipeline: stage ablate: commands 1-4 are its 4 pending ablation runs" in err
    assert "may run in parallel" in err and "#" not in out   # notes on stderr only: stdout is the chain
    assert not (run_dir / "ablations").exists()            # emitting runs nothing

    for line in lines:   # the chain, in order, as a job would run each line
        argv = shlex.split(line)
        assert argv[0] == "kalm" and kalm_main(argv[1:]) == 0, line
        capsys.readouterr()
    runs = [json.loads(x) for f in sorted(calls.iterdir()) for x in f.read_text().splitlines()]
    assert sorted((r["cell"], r["seed"]) for r in runs) == sorted(
        (cell, seed) for cell in ("full", "focal=off") for seed in (0, 1))   # each run once: the notebook ran none
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["ablate"]["status"] == "ok"
    results = (run_dir / "ablations" / "results.csv").read_text().splitlines()
    assert len(results) == 1 + 4 * 2   # header + runs x toy tasks

    assert cli_main([*base, "--emit-commands"]) == 0   # nothing pending: only the stage (which now skips)
    assert out_err(capsys)[0].splitlines() == lines[-1:]


def test_cell_commands_build_the_runner_the_notebook_builds(tmp_path, capsys, monkeypatch):
    """Trainer runner (smoke preset): the runner a cell command builds has the resume key of the runner notebook
    05 builds from the stage's parameters, so the stage finds the cells' rows done (kalm_lib.ablations' own hash)."""
    from kalm_lib import ablations
    from kalm_lib.ablations import cli as ablate_cli
    from kalm_lib.ablations.run import _runner_hash
    from kalm_lib.config import split_override

    run_dir = smoke_ablate_run(tmp_path)
    overrides = ["ablate.train_overrides={train.max_steps: 2, train.lr: 5e-5, loss.temperature: 0.05}",
                 "ablate.keep_models=true", "ablate.run_dir_paths={finetune: {data.train_file: curated/finetune.jsonl}}"]
    assert cli_main(["--preset", "smoke", "--run-dir", str(run_dir), "--only", "ablate", "--emit-commands",
                     *[a for o in overrides for a in ("-p", o)]]) == 0
    cell = shlex.split(out_err(capsys)[0].splitlines()[0])
    args = ablate_cli._parser().parse_args(cell[2:])   # as `kalm ablate` reads it, from another directory
    from_cell = ablations.make_run_fn(args.runner, args.run_dir, finetune_config=args.finetune_config,
                                      pretrain_config=args.pretrain_config, eval_config=args.eval_config,
                                      train_overrides=dict(split_override(o) for o in args.override),
                                      eval_overrides=args.eval_override, keep_models=args.keep_models,
                                      run_dir_paths=ablate_cli.run_dir_paths(args.run_dir_path))

    stage = [s for s in pipeline.plan_pipeline("smoke", overrides=overrides)[3] if s.name == "ablate"][0]
    nb = {**{k: eval(v["default"]) for k, v in stage.declared.items() if k != "run_dir"}, **stage.parameters}
    monkeypatch.chdir(ROOT)   # where the notebook runs
    from_notebook = ablations.make_run_fn(nb["runner"], run_dir, finetune_config=nb["finetune_config"],
                                          pretrain_config=nb["pretrain_config"], eval_config=nb["eval_config"],
                                          train_overrides=nb["train_overrides"], eval_overrides=nb["eval_overrides"],
                                          keep_models=nb["keep_models"], run_dir_paths=nb["run_dir_paths"])
    assert from_cell.signature() == from_notebook.signature() and from_cell.keep_models is True
    assert from_cell.finetune_overrides["data.train_file"] == str(run_dir.resolve() / "curated" / "finetune.jsonl")
    assert from_cell.finetune_overrides["train.lr"] == "5e-5"   # YAML 1.1's string, kept a string both ways
    assert _runner_hash(from_cell) == _runner_hash(from_notebook)


def test_ablation_stage_without_an_exact_cli_equivalent_stays_one_command(tmp_path, capsys):
    run_dir = smoke_ablate_run(tmp_path)
    base = ["--preset", "smoke", "--run-dir", str(run_dir), "--only", "ablate", "--emit-commands"]
    # run_dir_paths maps onto --run-dir-path only in its {stage: {key: path}} form
    for override, why in (('ablate.run_dir_paths={"data.train_file": "curated/finetune.jsonl"}',
                           "parameter run_dir_paths="),
                          ("ablate.reuse_results=false", "reuse_results=false"),
                          ("ablate.distillation=false", "distillation=false")):
        assert cli_main([*base, "-p", override]) == 0
        out, err = out_err(capsys)
        assert [shlex.split(line)[:2] for line in out.splitlines()] == [["kalm", "pipeline"]], override
        assert f"stage ablate runs its grid in one command ({why}" in err and "no kalm ablate equivalent" in err
    # a grid kalm ablate refuses stops the emission, as the stage would stop
    assert cli_main([*base, "-p", "ablate.grid=no-such-grid"]) == 2
    out, err = out_err(capsys)
    assert out == "" and "kalm ablate --emit-commands refused the grid" in err and err.count("\n") == 1
