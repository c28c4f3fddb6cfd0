"""Generate the Python code for protos/ into client/gen/ (the one command: `python scripts/gen_protos.py`).

`--check` regenerates into a temporary folder and fails if the checked-in files differ.
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "client" / "gen"
PACKAGE_DIR = Path("twostage") / "v1"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    pkg = out / PACKAGE_DIR
    (pkg / "__init__.py").write_text('"""Generated from protos/twostage/v1 by scripts/gen_protos.py. Do not edit."""\n')
    return sorted(p for p in pkg.iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if client/gen is stale")
    args = parser.parse_args()
    if not args.check:
        shutil.rmtree(OUT / PACKAGE_DIR, ignore_errors=True)
        files = generate(OUT)
        print("generated:", *(str(f.relative_to(ROOT)) for f in files), sep="\n  ")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for f in fresh:
            current = OUT / PACKAGE_DIR / f.name
            if not current.exists() or not filecmp.cmp(f, current, shallow=False):
                stale.append(str(current.relative_to(ROOT)))
        extra = {p.name for p in (OUT / PACKAGE_DIR).glob("*") if p.is_file()} - {f.name for f in fresh}
        stale += sorted(str((OUT / PACKAGE_DIR / n).relative_to(ROOT)) for n in extra)
        if stale:
            print("stale generated code (run `python scripts/gen_protos.py`):", *stale, sep="\n  ")
            return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
