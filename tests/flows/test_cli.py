"""The `retouch` command line: help everywhere, clear errors instead of tracebacks."""

from __future__ import annotations

import pytest

from flows.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name: str, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = "".join(capsys.readouterr().out.split())  # argparse wraps (also at hyphens)
    assert "".join(COMMANDS[name].summary.split()) in out


def test_a_mistyped_setting_is_one_clear_line_and_exit_1(capsys):
    code = main(["--params", "params.yaml", "--set", "edit.rhoo=0.5", "build", "world"])
    assert code == 1
    err = capsys.readouterr().err
    assert "edit.rhoo" in err
    assert "Traceback" not in err


def test_a_missing_settings_file_names_the_fix(tmp_path, capsys):
    code = main(["--params", str(tmp_path / "none.yaml"), "build", "world"])
    assert code == 1
    assert "--params" in capsys.readouterr().err


def test_a_scope_past_the_model_depth_is_refused_at_load(capsys):
    code = main(["--set", "model.depth=4", "--set", "scope.blocks=[2,3,4]", "build", "world"])
    assert code == 1
    err = capsys.readouterr().err
    assert "scope-search" in err
    assert "Traceback" not in err
