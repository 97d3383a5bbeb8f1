"""The `kalm` dispatcher: every subcommand's entry point and help, `kalm --version`, and user mistakes (a missing
input file) as one line on stderr with a non-zero exit code, never a traceback."""

from __future__ import annotations

import importlib

import pytest

import kalm_lib
from kalm_lib.cli import SUBCOMMANDS, main


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_an_entry_point_and_help(name, capsys):
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    assert callable(getattr(importlib.import_module(module_name), function or "cli_main"))
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"kalm {name}" in capsys.readouterr().out  # argparse prog names the subcommand


def test_unknown_subcommand_is_a_clear_error(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_version_and_usage(capsys):
    for flag in ("--version", "-V"):
        assert main([flag]) == 0 and capsys.readouterr().out == f"kalm {kalm_lib.__version__}\n"
    assert main([]) == 0
    usage = capsys.readouterr().out
    assert "--online" in usage and all(f"  {name} " in usage for name in SUBCOMMANDS)


# each subcommand with an input that does not exist ({M}: a missing folder under tmp_path, {T}: tmp_path)
MISSING_INPUT = {
    "curate": ["--config", "{M}/curation.yaml", "--out", "{T}/out"],
    "mine": ["--in", "{M}/records.jsonl", "--out", "{T}/mined.jsonl"],
    "train": ["--config", "{M}/finetune.yaml"],
    "eval": ["{M}/model-folder", "--out", "{T}/eval"],
    "report": ["{M}/run", "-o", "{T}/report.html"],
    "soup": ["--config", "{M}/soup.yaml", "--run-dir", "{T}"],
    "ablate": ["--grid", "{M}/grid.yaml", "--run-dir", "{T}"],
    "pipeline": ["--preset", "{M}/preset.yaml"],
}


def test_every_subcommand_has_a_missing_input_case():
    assert sorted(MISSING_INPUT) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("name", sorted(MISSING_INPUT))
def test_missing_input_is_one_line_and_a_failure(name, tmp_path, capsys):
    missing = tmp_path / "missing"
    argv = [a.format(M=missing, T=tmp_path) for a in MISSING_INPUT[name]]
    try:
        code = main([name, *argv])
    except SystemExit as e:   # argparse-style exits count too, as long as they say one line
        code = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code not in (0, None), (name, code, err)
    assert "Traceback" not in err and len(lines) == 1, (name, err)
    assert lines[0].startswith(f"kalm {name}") and str(missing) in lines[0], (name, err)
    assert not missing.exists()   # a mistake creates nothing where the input should have been


# usage mistakes (no arguments, an unknown flag): argparse's multi-line usage block would hide the one line that
# matters; every command prints exactly "kalm <command>: error: ..." and exits 2
USAGE_MISTAKES = [pytest.param(name, argv) for name in sorted(SUBCOMMANDS) for argv in ([], ["--no-such-flag"])]


@pytest.mark.parametrize("name,argv", USAGE_MISTAKES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_usage_mistake_is_one_line_and_a_failure(name, argv, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)   # nothing may be written where the user stands
    try:
        code = main([name, *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None), (name, argv, err)
    assert err.endswith("\n") and len(err.splitlines()) == 1 and err.strip(), (name, argv, err)
    assert err.startswith(f"kalm {name}: error: ") and "Traceback" not in err, (name, argv, err)
    assert list(tmp_path.iterdir()) == []


def test_shared_parser_keeps_help_and_says_one_line(capsys):
    from kalm_lib.cli import ArgumentParser
    p = ArgumentParser(prog="kalm x")
    p.add_argument("--need", required=True)
    with pytest.raises(SystemExit) as e:
        p.parse_args([])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("kalm x: error: the following arguments are required: --need "
                                       "(see kalm x --help)\n")
