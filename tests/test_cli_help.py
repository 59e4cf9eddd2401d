"""``--help`` of every command: its own usage line, nothing on stderr (no warning, no advert), and, for the
argparse commands, no torch imported (what keeps them under 2 s: torch, Lightning and the models take
seconds; docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines.cli import COMMANDS as DATA_COMMANDS
from sambridge.cli import main

REPO = Path(__file__).resolve().parents[1]
SAMBRIDGE = Path(sys.executable).with_name("sambridge")  # the console script (pip install -e .)
PY = (sys.executable,)

# (command line, the usage line's program): every argparse command
ARGPARSE_COMMANDS = [
    ((str(SAMBRIDGE), "--help"), "sambridge"),
    ((*PY, "train.py", "--help"), "train.py"),
    ((str(SAMBRIDGE), "data", "--help"), "sambridge data"),
    *[((str(SAMBRIDGE), "data", name, "--help"), f"sambridge data {name}") for name in DATA_COMMANDS],
    ((*PY, "-m", "data_pipelines", "--help"), "python -m data_pipelines"),
    ((*PY, "-m", "data_pipelines", "synthetic", "--help"), "python -m data_pipelines synthetic"),
    *[((str(SAMBRIDGE), name, "--help"), f"sambridge {name}")
      for name in ("evaluate", "export", "pseudo-label", "demo", "demo-video", "segment", "track", "evaluate-video")],
]
HEAVY = ("torch", "lightning", "sam2", "sam3", "open_clip", "timm", "webdataset")


def _id(command: tuple[str, ...]) -> str:
    return " ".join(Path(part).name if "/" in part else part for part in command)


@pytest.mark.parametrize(("command", "prog"), ARGPARSE_COMMANDS, ids=[_id(c) for c, _ in ARGPARSE_COMMANDS])
def test_help_prints_the_usage_and_nothing_on_stderr(command: tuple[str, ...], prog: str) -> None:
    assert SAMBRIDGE.exists(), f"no console script {SAMBRIDGE}: pip install -e ."
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {prog} "), result.stdout[:300]
    assert result.stderr == ""


def test_help_of_the_argparse_commands_imports_no_torch() -> None:
    argvs = [list(command[command.index(str(SAMBRIDGE)) + 1:]) for command, _ in ARGPARSE_COMMANDS
             if str(SAMBRIDGE) in command]
    code = (
        "import contextlib, io, sys\n"
        "from data_pipelines.cli import main as data_main\n"
        "from sambridge.cli import main\n"
        f"runs = [(main, a) for a in {argvs!r}] + [(data_main, ['--help']), (data_main, ['coco', '--help'])]\n"
        "for run, argv in runs:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            run(argv)\n"
        "        except SystemExit as exit:\n"
        "            assert exit.code == 0, (argv, exit.code)\n"
        f"    heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "    if heavy:\n"
        "        sys.exit(f'{argv} imported {heavy}')\n"
        "print('none heavy')\n"
    )
    result = subprocess.run([*PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "none heavy" in result.stdout, result.stdout + result.stderr[-2000:]


def test_fit_help_says_how_to_resume_and_has_no_stray_heading(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    printed = capsys.readouterr().out
    assert info.value.code == 0 and printed.startswith("usage: ")
    assert "--ckpt_path auto" in printed  # the description and the argument's help
    assert "``auto``" in printed.split("--ckpt_path CKPT_PATH\n", 1)[1]
    assert "Hook order" not in printed


def test_training_help_is_kept_once_rendered_and_rendered_again_when_the_code_changes(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``validate --help`` renders once (LightningCLI), then prints from the cache without importing torch
    (a fresh interpreter); a change of the code it is built from renders it again."""
    from sambridge import help_cache, training_cli

    monkeypatch.setenv("SAMBRIDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    rendered = capsys.readouterr().out
    assert rendered.startswith("usage: sambridge [options] validate") and len(list(tmp_path.rglob("*.txt"))) == 1
    code = ("import sys\nfrom sambridge.cli import main\ntry:\n    main(['validate', '--help'])\n"
            "except SystemExit:\n    pass\nprint('HEAVY', [m for m in ('torch', 'lightning') if m in sys.modules])")
    result = subprocess.run([*PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout == rendered + "HEAVY []\n", result.stderr[-2000:]

    def lightning_cli(*args, **kwargs):
        raise AssertionError("rendered again")

    monkeypatch.setattr(training_cli, "lightning_cli", lightning_cli)
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    assert capsys.readouterr().out == rendered
    monkeypatch.setattr(help_cache, "SOURCES", (*help_cache.SOURCES, "tests"))  # as if the code changed
    with pytest.raises(AssertionError, match="rendered again"):
        main(["validate", "--help"])
