"""The ``python -m data_pipelines`` command registry: lazy imports, the module contract, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_registered_command_follows_the_module_contract(name: str) -> None:
    module = cli.load_command(name)
    parser = cli.build_parser(name)
    assert module.__name__ == cli.COMMANDS[name][0]
    assert callable(module.add_arguments) and callable(module.run)
    assert parser.format_help()


def test_help_lists_commands_and_imports_only_the_one_that_runs(tmp_path: Path) -> None:
    code = (
        "import sys; from data_pipelines.cli import main; "
        "rc = main(['inspect', sys.argv[1], '--no-progress']); "
        "print('loaded', sorted(m for m in sys.modules if m.startswith('data_pipelines.convert.'))); "
        "print('synthetic', 'data_pipelines.synthetic' in sys.modules); print('rc', rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert "loaded ['data_pipelines.convert.common']" in result.stdout, result.stderr
    assert "synthetic False" in result.stdout and "rc 1" in result.stdout  # no manifest: inspection fails

    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0


def test_unknown_or_broken_commands(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["cocoa"])
    assert info.value.code == 2 and "invalid choice: 'cocoa'" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("data_pipelines.ghost_command", "not written yet"))
    with pytest.raises(
        ModuleNotFoundError, match="command 'ghost' needs module data_pipelines.ghost_command"
    ):
        cli.main(["ghost"])
    monkeypatch.setitem(cli.COMMANDS, "half", ("data_pipelines.schema", "a module without run"))
    with pytest.raises(TypeError, match="lacks add_arguments and run"):
        cli.load_command("half")


def test_input_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "images").mkdir()
    rc = cli.main(
        [
            "coco",
            "--annotations",
            str(tmp_path / "none.json"),
            "--images",
            str(tmp_path / "images"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2
    assert (
        f"error: COCO/LVIS annotation file {tmp_path / 'none.json'} does not exist" in capsys.readouterr().err
    )
