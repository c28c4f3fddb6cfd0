"""ONNX Runtime sessions for the two models of a model set.

One `InferenceSession` per verified model directory (`verify_model_dir`), with all graph optimizations but
`DISABLED_OPTIMIZERS` (shared with the export's gate, which therefore measures the graph as served), one
inter-op thread and sequential execution. Up to `inference_workers` batches call `run` on a session at once
(ONNX Runtime sessions are thread-safe), each with `intra_op_threads` threads; `thread_layout` resolves the
two knobs (default: one single-thread worker per CPU core).
Execution provider: "cpu" -> CPUExecutionProvider; "cuda" -> CUDA first, CPU as fallback (ONNX Runtime
falls back with a warning when CUDA is not available; `providers` reports what is actually in use).

`run_batch` pads a batch to its longest member (pad id from the tokenizer, attention mask 1 on real
tokens), feeds only the inputs the graph declares, and returns float32 rows: pooled (and optionally
L2-normalized) embeddings for the bi-encoder, raw logits [n, labels] for the cross-encoder. ONNX Runtime
releases the GIL while it runs, so calling it from a worker thread keeps the event loop serving.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from twostage.export.manifest import ManifestError, ModelDir, sha256_file, verify_model_dir
from twostage.export.onnx_ops import DISABLED_OPTIMIZERS
from twostage.export.postprocess import embeddings_from_hidden
from twostage.server.config import Config
from twostage.server.tokenization import Encoded, ModelTokenizer, encode_pairs, encode_texts, padded_tokens

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


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


def thread_layout(config: Config) -> tuple[int, int]:
    """(inference workers, intra-op threads per worker) from the config's 0 = automatic values."""
    cores = available_cpus()
    workers = config.inference_workers or (cores if config.execution_provider == "cpu" else 1)
    threads = config.intra_op_threads or max(1, cores // workers)
    return workers, threads


def session_options(intra_op_threads: int, allow_spinning: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # Spinning threads answer faster between ops but burn CPU the other model's batch could use.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = intra_op_threads if intra_op_threads > 0 else available_cpus()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


def pad_batch(batch: Sequence[Encoded], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad a batch to its longest member: input_ids, attention_mask, token_type_ids (int64)."""
    if not batch:
        raise ValueError("empty batch")
    longest = max(len(e) for e in batch)
    ids = np.full((len(batch), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), longest), dtype=np.int64)
    types = np.zeros((len(batch), longest), dtype=np.int64)
    for row, enc in enumerate(batch):
        n = len(enc)
        ids[row, :n] = enc.ids
        mask[row, :n] = 1
        types[row, :n] = enc.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


class OnnxModel:
    """A verified model directory with its session and tokenizer. Use `EmbeddingModel` / `CrossEncoderModel`."""

    role = ""

    def __init__(self, directory: str | Path, config: Config | None = None):
        config = config or Config()
        self.model_dir: ModelDir = verify_model_dir(Path(directory), self.role)
        self.manifest: dict[str, Any] = self.model_dir.manifest
        self.tokenizer = ModelTokenizer.from_file(self.model_dir.tokenizer_path)
        _, threads = thread_layout(config)
        self.session = ort.InferenceSession(str(self.model_dir.model_path), sess_options=session_options(
            threads, config.ort_allow_spinning), providers=providers_for(config.execution_provider),
            disabled_optimizers=list(DISABLED_OPTIMIZERS))
        self.input_types = {i.name: ONNX_INT_TYPES.get(i.type) for i in self.session.get_inputs()}
        unsupported = [name for name, dtype in self.input_types.items() if name not in KNOWN_INPUTS or dtype is None]
        if unsupported:
            raise ManifestError(f"{self.model_dir.model_path}: graph inputs {unsupported} are not int32/int64 "
                                f"inputs among {KNOWN_INPUTS}")
        self.output_name = self.manifest["output"]
        outputs = [o.name for o in self.session.get_outputs()]
        if self.output_name not in outputs:
            raise ManifestError(f"{self.model_dir.path / 'manifest.json'}: output {self.output_name!r} "
                                f"not among the graph outputs {outputs}")
        self.sha256 = self.manifest["files"].get(self.manifest["model_file"]) or sha256_file(self.model_dir.model_path)
        self._counting = threading.Lock()  # run_batch is called from several worker threads
        self.batches_run = 0
        self.real_tokens_run = 0
        self.padded_tokens_run = 0
        self.warm_up()

    # ---------------------------------------------------------------- manifest facts
    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    @property
    def pooling(self) -> str | None:
        return self.manifest.get("pooling")

    @property
    def normalize(self) -> bool:
        return bool(self.manifest.get("normalize", False))

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    # ---------------------------------------------------------------- inference
    def run_batch(self, batch: Sequence[Encoded]) -> np.ndarray:
        """Model output rows for the batch, in batch order (float32)."""
        padded = pad_batch(batch, self.tokenizer.pad_id)
        feeds = {name: padded[name].astype(dtype, copy=False) for name, dtype in self.input_types.items()}
        (output,) = self.session.run([self.output_name], feeds)
        with self._counting:
            self.batches_run += 1
            self.real_tokens_run += sum(len(e) for e in batch)
            self.padded_tokens_run += padded_tokens(batch)
        return self.postprocess(np.asarray(output), padded["attention_mask"])

    def postprocess(self, output: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def warm_up(self) -> None:
        """Run one small batch so the first request does not pay for lazy initialization; check output width."""
        rows = self.run_batch(self.warm_up_batch())
        if rows.ndim != 2 or rows.shape[1] != self.dimension:
            raise ManifestError(f"{self.model_dir.path / 'manifest.json'}: dimension is {self.dimension} but the "
                                f"model produced rows of shape {rows.shape[1:]}")
        self.batches_run = self.real_tokens_run = self.padded_tokens_run = 0

    def warm_up_batch(self) -> list[Encoded]:
        raise NotImplementedError


class EmbeddingModel(OnnxModel):
    """Bi-encoder: texts -> pooled (and optionally L2-normalized) embeddings [n, dimension]."""

    role = "bi-encoder"

    def postprocess(self, output: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if output.ndim == 2:  # the graph already pools
            return embeddings_from_hidden(output[:, None, :], np.ones((len(output), 1)), "cls", self.normalize)
        if self.pooling is None:
            raise ManifestError(f"{self.model_dir.path / 'manifest.json'}: token-level output "
                                f"{self.output_name!r} needs a pooling mode")
        return embeddings_from_hidden(output, attention_mask, self.pooling, self.normalize)

    def encode(self, texts: Sequence[str], truncate: bool = True, field: str = "texts") -> list[Encoded]:
        return encode_texts(self.tokenizer, texts, self.max_length, truncate=truncate, field=field)

    def warm_up_batch(self) -> list[Encoded]:
        return self.encode(["warm up run", "a second, somewhat longer warm up text"])


class CrossEncoderModel(OnnxModel):
    """Cross-encoder: (query, document) pairs -> raw logits [n, labels]."""

    role = "cross-encoder"

    @property
    def positive_label(self) -> int:
        return int(self.manifest.get("positive_label") or 0)

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.get("labels") or [])

    def postprocess(self, output: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        logits = output.astype(np.float32, copy=False)
        return logits[:, None] if logits.ndim == 1 else logits

    def encode(self, query: str, docs: Sequence[str], **kwargs: Any) -> list[Encoded]:
        return encode_pairs(self.tokenizer, query, docs, self.max_length, **kwargs)

    def warm_up_batch(self) -> list[Encoded]:
        return self.encode("warm up query", ["a warm up passage", "another, longer warm up passage to pad"])


def load_model_set(models_dir: str | Path, config: Config | None = None) -> tuple[EmbeddingModel, CrossEncoderModel]:
    """Load `models_dir/bi-encoder` and `models_dir/cross-encoder` (each verified against its manifest)."""
    return load_embedding_model(models_dir, config), CrossEncoderModel(Path(models_dir) / "cross-encoder", config)


def load_embedding_model(models_dir: str | Path, config: Config | None = None) -> EmbeddingModel:
    """Only the bi-encoder of a model set (e.g. for offline index builds)."""
    return EmbeddingModel(Path(models_dir) / "bi-encoder", config)
