"""export/ and model/ stay clean under ruff and mypy (scripts/lint.sh, configured in pyproject.toml).

server/ and client/ join once they are clean (scripts/test.sh then runs scripts/lint.sh over all four)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLEAN = ("export", "model")


def lint(*packages: str) -> subprocess.CompletedProcess[str]:
    for tool in ("ruff", "mypy"):
        if importlib.util.find_spec(tool) is None:
            pytest.skip(f"{tool} is not installed in this environment (it is in the dev extra: "
                        "pip install -e '.[dev]')")
    return subprocess.run([str(ROOT / "scripts" / "lint.sh"), *packages], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600)


def test_export_and_model_are_clean() -> None:
    result = lint(*CLEAN)
    assert result.returncode == 0, result.stdout + result.stderr
    # mypy checked every module of both packages, none lost to an exclude pattern (it also counts a folder
    # without __init__.py, export/data, as a namespace package, hence >=).
    checked = re.search(r"no issues found in (\d+) source files", result.stdout)
    assert checked, result.stdout
    modules = sum(len(list((ROOT / name).rglob("*.py"))) for name in CLEAN)
    assert int(checked.group(1)) >= modules


def test_lint_refuses_an_unknown_package() -> None:
    result = lint("bench")
    assert result.returncode == 2 and "unknown package 'bench'" in result.stderr
