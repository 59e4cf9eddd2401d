"""The layering contracts of pyproject.toml ([tool.importlinter], docs/architecture.md) hold, and they
fail on an upward import: the check ``make lint`` and CI rely on really catches one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sambridge", "data_pipelines")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``root``, with ``root/pyproject.toml``'s contracts.

    A fresh interpreter whose working directory (first on ``sys.path``) is ``root``, so the packages
    analysed are the ones under ``root`` even where the repository is installed in editable mode.
    """
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_imports_point_down() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_an_upward_import_or_a_cycle_breaks_the_contracts(tmp_path: Path) -> None:
    for package in PACKAGES:  # the real code and the real contracts, plus four mistakes
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    # a model using training code (models -> training)
    (tmp_path / "sambridge/models/upward.py").write_text("from sambridge.modules import GroundingModule\n")
    # the data layer running a model (data_pipelines -> sambridge)
    (tmp_path / "data_pipelines/upward.py").write_text("from sambridge.models import create_model\n")
    # two training-layer packages importing each other (metrics <-> callbacks: callbacks use metrics)
    (tmp_path / "sambridge/metrics/cycle.py").write_text("from sambridge.callbacks import EvaluationReport\n")
    # a new module in no layer
    (tmp_path / "sambridge/newtool.py").write_text("import os\n")

    result = lint_imports(tmp_path)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "Contracts: 0 kept, 3 broken." in out, out
    assert "sambridge.models is not allowed to import sambridge.modules" in out, out
    assert "sambridge.models.upward -> sambridge.modules" in out, out
    assert "data_pipelines is not allowed to import sambridge" in out, out
    assert "data_pipelines.upward -> sambridge.models" in out, out
    assert "No cycles are allowed in sambridge." in out and ".metrics -> .callbacks" in out, out
    assert "The following modules are not listed as layers:\n\n- sambridge.newtool" in out, out
