"""The `kalm` dispatcher reaches every subcommand's entry point (each prints its own --help and exits 0)."""

from __future__ import annotations

import importlib

import pytest

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
