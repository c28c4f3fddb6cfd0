"""Shared pieces of the benchmarks: dataset loading (BEIR layout), statistics, tables, result files, and a real
twostage server in a child process.

Nothing here copies dataset text anywhere: datasets are read from `<repo>/../shared/datasets` (or `--data`)
at run time, and result files hold only ids, counts and figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnxruntime  # noqa: F401  - load before usearch: `import usearch.index` then `import onnxruntime`,
#                      with nothing else loaded first, crashes the interpreter with this venv's wheels

from twostage.client.beir import read_qrels, read_queries  # the BEIR reader `twostage evaluate` uses
from twostage.model.session import available_cpus  # the server's count: affinity mask and cgroup quota

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"


# ------------------------------------------------------------------------------------------- paths
def default_data_dir() -> Path:
    """`<repo>/../shared/datasets` (the shared evaluation datasets; never copied into the repo)."""
    return Path(os.environ.get("TWOSTAGE_BENCH_DATA", REPO_ROOT.parent / "shared" / "datasets"))


def default_models_dir() -> Path:
    """The model set made by `twostage export --out models` (the server's default `./models`)."""
    return Path(os.environ.get("TWOSTAGE_BENCH_MODELS", REPO_ROOT / "models"))


def default_cache_dir() -> Path:
    """Generated vectors, built indexes and reference models kept between runs (outside the repo)."""
    return Path(os.environ.get("TWOSTAGE_BENCH_CACHE", Path(tempfile.gettempdir()) / "twostage-bench-cache"))


def base_parser(description: str) -> argparse.ArgumentParser:
    """Options every benchmark takes."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data_dir(),
                   help="folder holding the BEIR-layout datasets (scifact/, trec-dl-2019-subset/)")
    p.add_argument("--models", type=Path, default=default_models_dir(),
                   help="model set directory made by `twostage export` (bi-encoder/, cross-encoder/)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"where the JSON result file goes (default {RESULTS_DIR.relative_to(REPO_ROOT)}; with "
                        "--quick, <cache>/quick-results, so smoke runs never replace real results)")
    p.add_argument("--cache", type=Path, default=default_cache_dir(),
                   help="cache for generated data, built indexes and reference models")
    p.add_argument("--threads", type=int, default=0,
                   help="threads for every contender (0 = the CPUs this process may run on)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds, figures meaningless")
    return p


def knob_setting(text: str) -> tuple[str, Any]:
    """A `--set KNOB=VALUE` argument (a server config knob): VALUE read as JSON (numbers, true/false), else kept as
    a bare string. Use with `action="append"`, then `dict(...)` of the list."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KNOB=VALUE")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def finish_common_args(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on other options (call after parse_args)."""
    if args.out is None:
        args.out = Path(args.cache) / "quick-results" if args.quick else RESULTS_DIR
    return args


def resolve_threads(threads: int) -> int:
    return threads if threads > 0 else available_cpus()


def server_threads(threads: int) -> dict[str, int]:
    """Config knobs that give the twostage server `threads` CPUs: one single-thread inference worker per CPU
    (its default layout when `threads` is every CPU)."""
    return {"inference_workers": threads, "intra_op_threads": 1}


# ----------------------------------------------------------------------------------------- datasets
@dataclass
class Dataset:
    """A BEIR-layout dataset: corpus id -> (title, text), query id -> text, qrels query id -> {doc id: grade}."""

    name: str
    corpus: dict[str, tuple[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def judged_queries(self) -> list[str]:
        """Query ids with at least one positive judgment, in file order."""
        return [q for q in self.queries if any(g > 0 for g in self.qrels.get(q, {}).values())]


def read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def load_dataset(data_dir: Path, name: str, split: str = "test") -> Dataset:
    """Read `<data_dir>/<name>/{corpus.jsonl, queries.jsonl, qrels/<split>.tsv}`."""
    root = Path(data_dir) / name
    for needed in ("corpus.jsonl", "queries.jsonl"):
        if not (root / needed).is_file():
            raise SystemExit(f"dataset file not found: {root / needed} (pass --data DIR holding {name}/)")
    corpus = {str(d["_id"]): (str(d.get("title") or ""), str(d.get("text") or "")) for d in read_jsonl(root / "corpus.jsonl")}
    queries = read_queries(root / "queries.jsonl")
    qrels_path = root / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_path) if qrels_path.is_file() else {}
    if qrels:  # BEIR ships all queries of all splits in one file; keep the judged split's queries
        queries = {q: t for q, t in queries.items() if q in qrels}
    return Dataset(name=name, corpus=corpus, queries=queries, qrels=qrels)


def document_text(title: str, text: str) -> str:
    """How a stored document is shown to the models (the server's own rule when its index module is present)."""
    try:
        from twostage.server.index.backend import embedding_text
    except ImportError:  # pragma: no cover - only while the index module is missing
        return f"{title}. {text}" if title else text
    return embedding_text(title, text)


# ---------------------------------------------------------------------------------------- statistics
def summarize(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean/min/max of a sample (same unit as the input) and its size."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {"n": 0}
    return {"n": int(arr.size), "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean()), "min": float(arr.min()),
            "max": float(arr.max())}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return float(numerator) / float(denominator)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats get 3 significant decimals, None shows as '-'."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.3f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(out)


# ------------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx512", "avx2", "amx")) or f in ("avx_vnni",))
    except OSError:
        pass
    return []


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names: Sequence[str]) -> dict[str, str]:
    from importlib import metadata
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment() -> dict[str, Any]:
    """Facts about the machine and software a result was measured on."""
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpu": cpu_model(), "cpus_available": available_cpus(), "cpu_flags": cpu_flags(), "memory_gib": mem_gib,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "platform": platform.platform(), "git_commit": git_commit(),
        "packages": package_versions(["twostage", "onnxruntime", "numpy", "usearch", "tokenizers", "grpcio",
                                      "torch", "transformers", "sentence-transformers", "faiss-cpu", "bm25s"]),
    }


def save_result(name: str, payload: dict[str, Any], out_dir: Path) -> Path:
    """Write `<out_dir>/<name>.json` atomically, with a header (benchmark, time, environment) first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "quick": bool(payload.get("config", {}).get("quick", False)), "environment": environment()}
    doc.update(payload)
    target = out_dir / f"{name}.json"
    tmp = out_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, target)
    return target


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def dir_size_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------ server process
_SERVE_SNIPPET = """
import asyncio, json, sys
from twostage.server.app import serve_forever, setup_logging
from twostage.server.config import Config
config = Config(**json.loads(sys.argv[1]))
config.validate()
setup_logging(config)
sys.exit(asyncio.run(serve_forever(config)))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """The real twostage server (`twostage.server.app.serve_forever`) in a child process on loopback ports.

    A child process keeps the benchmark client's Python work off the server's interpreter, as in production.
    """

    def __init__(self, models: Path, index: Path, log_path: Path | None = None, *, python: str | None = None,
                 **overrides: Any):
        """`python`: the interpreter to run the server with (default: this one), e.g. another build's
        environment (bench.paired)."""
        self.python = python or sys.executable
        self.port = free_port()
        self.metrics_port = free_port()
        self.config = {"models": str(models), "index": str(index), "host": "127.0.0.1", "port": self.port,
                       "metrics_port": self.metrics_port, "log_level": "warning", "log_format": "text",
                       "index_save_interval_s": 3600.0, "max_rerank_documents": 1000}
        self.config.update(overrides)
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="twostage-bench-server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self._channels: list[Any] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 600.0) -> "ServerProcess":
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([self.python, "-c", _SERVE_SNIPPET, json.dumps(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        self.wait_serving(timeout_s)
        return self

    def wait_serving(self, timeout_s: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        channel = grpc.insecure_channel(self.target)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with code {self.proc.returncode}; log:\n{self.log_tail()}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        finally:
            channel.close()
        raise RuntimeError(f"server not SERVING after {timeout_s:.0f} s; log:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def stub(self) -> Any:
        import grpc
        from twostage.v1 import twostage_pb2_grpc as pb_grpc

        opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        channel = grpc.insecure_channel(self.target, options=opts)
        self._channels.append(channel)
        return pb_grpc.TwoStageStub(channel)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def rss_bytes(self) -> int:
        assert self.proc is not None
        return rss_bytes(self.proc.pid)

    def peak_rss_bytes(self) -> int:
        assert self.proc is not None
        return peak_rss_bytes(self.proc.pid)

    def stop(self, timeout_s: float = 60.0) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def metric_delta(before: dict, after: dict, name: str, **labels: str) -> float:
    """Change of one sample between two scrapes (0 when absent)."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)

