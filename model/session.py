"""ONNX Runtime sessions, made the same way for the server, `twostage index build`, the export's gate and bench/.

`open_session` loads a model file with all graph optimizations but `DISABLED_OPTIMIZERS`, one inter-op thread
and sequential execution; `SessionSettings` holds the three choices left to the caller (intra-op threads,
spinning, execution provider). The server runs up to `inference_workers` batches at once on a session (ONNX
Runtime sessions are thread-safe), each with `intra_op_threads` threads; `thread_layout` resolves the two knobs
(default: one single-thread worker per CPU this process may use, `available_cpus`).
Execution provider: "cpu" -> CPUExecutionProvider; "cuda" -> CUDA first, CPU as fallback (ONNX Runtime
falls back with a warning when CUDA is not available; the session's `get_providers()` says what is in use).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}

# ONNX Runtime graph rewrites that every session here leaves out, so that the export's gate measures the graph
# exactly as it is served. SkipLayerNormFusion (Add + LayerNormalization -> SkipLayerNormalization): on ONNX
# Runtime 1.32's CPU kernels the fused op made the 12-layer int8 reranker slower, not faster (measurement in
# docs/benchmarks.md); scores differ by at most 0.08 logit (int8 rounding).
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def cgroup_cpu_limit(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Whole CPUs allowed by a cgroup v2 CPU quota (`docker run --cpus`, Kubernetes CPU limits), rounded up;
    None when there is no quota or no cgroup v2 file."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask (else os.cpu_count()), lowered to a cgroup CPU quota if
    one is set, so that a container limited to 2 CPUs on a 64-core host runs 2 inference workers, not 64."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return max(1, min(cpus, limit) if limit else cpus)


def providers_for(execution_provider: str) -> list[str]:
    """ONNX Runtime providers for the config value, keeping only those this onnxruntime build has
    ("cuda" on a CPU-only build runs on the CPU, with a warning)."""
    if execution_provider not in PROVIDERS:
        raise ValueError(f"execution_provider={execution_provider!r} not one of {tuple(PROVIDERS)}")
    available = set(ort.get_available_providers())
    chosen = [p for p in PROVIDERS[execution_provider] if p in available]
    missing = [p for p in PROVIDERS[execution_provider] if p not in available]
    if missing:
        log.warning("execution_provider=%s: %s not available in this onnxruntime build; using %s",
                    execution_provider, missing, chosen)
    return chosen


def thread_layout(inference_workers: int = 0, intra_op_threads: int = 0,
                  execution_provider: str = "cpu") -> tuple[int, int]:
    """(inference workers, intra-op threads per worker); 0 = automatic: on the CPU one worker per available CPU,
    each with one thread; on CUDA one worker with every CPU."""
    cores = available_cpus()
    workers = inference_workers or (cores if execution_provider == "cpu" else 1)
    threads = intra_op_threads or max(1, cores // workers)
    return workers, threads


@dataclass(frozen=True)
class SessionSettings:
    """What a caller chooses about a session; everything else is fixed by `session_options`."""

    intra_op_threads: int = 0          # 0 = every available CPU
    allow_spinning: bool = True        # spinning threads answer faster between ops but burn CPU
    execution_provider: str = "cpu"    # a key of PROVIDERS


def session_options(intra_op_threads: int, allow_spinning: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # Spinning threads answer faster between ops but burn CPU the other model's batch could use.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = intra_op_threads if intra_op_threads > 0 else available_cpus()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


def open_session(path: Path, settings: SessionSettings = SessionSettings()) -> ort.InferenceSession:
    """An inference session for one ONNX file, as every part of twostage runs it."""
    return ort.InferenceSession(str(path), sess_options=session_options(settings.intra_op_threads,
                                                                          settings.allow_spinning),
                                providers=providers_for(settings.execution_provider),
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))
