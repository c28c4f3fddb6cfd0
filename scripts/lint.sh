#!/usr/bin/env bash
# Lint (ruff: pycodestyle, pyflakes, import order, bugbear, pyupgrade) and type check (mypy) the packages, as
# configured in pyproject.toml. Runs both checkers and fails if either finds anything.
#   scripts/lint.sh                 # server export client model
#   scripts/lint.sh export model    # only these
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
all=(server export client model)
packages=("$@")
[ ${#packages[@]} -gt 0 ] || packages=("${all[@]}")
for name in "${packages[@]}"; do
  case " ${all[*]} " in
    *" $name "*) ;;
    *) echo "lint.sh: unknown package '$name' (one of: ${all[*]})" >&2; exit 2 ;;
  esac
done

# mypy resolves `twostage.*` imports through build/typecheck/twostage/<name>, links to the folders that
# [tool.setuptools.package-dir] maps each package to (the editable install's import hook is invisible to it).
"$PY" - <<'EOF'
import os
import tomllib
from pathlib import Path

package_dirs = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
for package, folder in package_dirs.items():
    link = Path("build/typecheck", *package.split("."))
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(folder, link.parent)
    if link.is_symlink() and os.readlink(link) == target:
        continue
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
EOF

status=0
"$PY" -m ruff check "${packages[@]}" || status=1
mypy_args=()
for name in "${packages[@]}"; do mypy_args+=(-p "twostage.$name"); done
# Report paths as the repository's folders (pipefail keeps mypy's status).
"$PY" -m mypy "${mypy_args[@]}" 2>&1 \
  | sed -e 's|build/typecheck/twostage/v1/|client/gen/twostage/v1/|' -e 's|build/typecheck/twostage/||' || status=1
exit $status
