"""Any-language access: a Node.js client that loads only protos/twostage/v1/twostage.proto calls the real
server (Search, filters, Rerank by text and id, errors, Info) and checks the answers.

Needs the `running_server` fixture (tests/conftest.py): a real server with the packaged models and the
sample corpus indexed, exposing `.target` ("127.0.0.1:PORT"). Needs node and npm; installs the two npm
packages from tests/node/package-lock.json when node_modules is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).parent / "node"


def ensure_node_modules() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    if (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir() and \
            (NODE_DIR / "node_modules" / "@grpc" / "proto-loader").is_dir():
        return
    done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"npm ci in {NODE_DIR} failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.slow
def test_node_client_against_real_server(running_server):
    server = running_server
    ensure_node_modules()
    env = {**os.environ, "TWOSTAGE_TARGET": server.target}
    api_key = getattr(server, "api_key", None)
    if api_key:
        env["TWOSTAGE_API_KEY"] = api_key
    done = subprocess.run(["node", "check_server.js"], cwd=NODE_DIR, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode in (0, 1), f"node client could not run (exit {done.returncode}):\n{done.stderr}"
    report = json.loads(done.stdout)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert failed == [], json.dumps(failed, indent=2)
    assert report["ok"] and done.returncode == 0
    names = {c["name"] for c in report["checks"]}
    assert {"search skip_rerank", "search filter", "rerank texts", "rerank document_ids", "invalid argument",
            "info"} <= names
