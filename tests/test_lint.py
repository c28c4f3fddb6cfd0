"""server/, export/, client/ and model/ stay clean under ruff and mypy (scripts/lint.sh, configured in
pyproject.toml). This test is how the README's test command (scripts/test.sh) enforces them in CI."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLEAN = ("server", "export", "client", "model")


def lint(*packages: str) -> subprocess.CompletedProcess[str]:
    for tool in ("ruff", "mypy"):
        if importlib.util.find_spec(tool) is None:
            pytest.skip(f"{tool} is not installed in this environment (it is in the dev extra: "
                        "pip install -e '.[dev]')")
    return subprocess.run([str(ROOT / "scripts" / "lint.sh"), *packages], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600)


def test_packages_are_clean() -> None:
    result = lint(*CLEAN)
    assert result.returncode == 0, result.stdout + result.stderr
    # mypy checked every module of the packages, none lost to an exclude pattern (it also counts a folder
    # without __init__.py, export/data, as a namespace package, hence >=).
    checked = re.search(r"no issues found in (\d+) source files", result.stdout)
    assert checked, result.stdout
    modules = sum(1 for name in CLEAN for path in (ROOT / name).rglob("*.py")
                  if (ROOT / "client" / "gen") not in path.parents)  # generated: checked byte for byte instead
    assert int(checked.group(1)) >= modules


def test_lint_refuses_an_unknown_package() -> None:
    result = lint("bench")
    assert result.returncode == 2 and "unknown package 'bench'" in result.stderr
