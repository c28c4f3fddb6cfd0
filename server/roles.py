"""The served models: one object per role that owns its model and its batcher and answers in vectors and scores.

`EmbeddingRole.embed` and `RerankRole.score` tokenize (off the event loop), submit the encoded items to the role's
`Batcher` (which runs `model.run_batch` on the shared `InferencePool`) and post-process with the model layer, so
the engine never sees a tokenizer or a logit. Both are built with everything they need, started with `start()`
on the serving event loop and stopped with `stop()` by whoever started them (the engine's `close()`, or
`BackgroundEmbedder` in server/cli.py for `twostage index build`).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from twostage.model.embedder import Embedder
from twostage.model.reranker import DocumentScores, Reranker, best_chunks
from twostage.model.session import SessionSettings, thread_layout
from twostage.server.batcher import BatchMetrics, Batcher, BatchStats, InferencePool
from twostage.server.config import Config


def session_settings(config: Config) -> SessionSettings:
    """ONNX Runtime session settings from the server config (threads per worker from `thread_layout`)."""
    _, threads = thread_layout(config.inference_workers, config.intra_op_threads, config.execution_provider)
    return SessionSettings(intra_op_threads=threads, allow_spinning=config.ort_allow_spinning,
                           execution_provider=config.execution_provider)


def inference_pool(config: Config, name: str = "twostage-inference") -> InferencePool:
    """The worker pool both roles share, sized by `thread_layout` so that workers x threads fill the cores."""
    workers, _ = thread_layout(config.inference_workers, config.intra_op_threads, config.execution_provider)
    return InferencePool(workers, name=name)


@dataclass(frozen=True)
class BatchLimits:
    """A role's batcher knobs (config `embed_*` / `rerank_*`)."""

    max_batch_tokens: int
    max_batch_size: int
    max_delay_ms: float
    max_queued_tokens: int
    enabled: bool = True

    @classmethod
    def from_config(cls, config: Config, prefix: str) -> "BatchLimits":
        """`prefix` "embed" or "rerank"; `enabled` is the config's `batching`."""
        return cls(max_batch_tokens=getattr(config, f"{prefix}_max_batch_tokens"),
                   max_batch_size=getattr(config, f"{prefix}_max_batch_size"),
                   max_delay_ms=getattr(config, f"{prefix}_max_delay_ms"),
                   max_queued_tokens=getattr(config, f"{prefix}_max_queued_tokens"), enabled=config.batching)


def _batcher(model: Embedder | Reranker, pool: InferencePool, limits: BatchLimits,
             metrics: BatchMetrics | None) -> Batcher:
    return Batcher(model.role, model.run_batch, pool=pool, max_batch_tokens=limits.max_batch_tokens,
                   max_batch_size=limits.max_batch_size, max_delay_ms=limits.max_delay_ms,
                   max_queued_tokens=limits.max_queued_tokens, enabled=limits.enabled, metrics=metrics)


@dataclass
class Embedded:
    """Vectors of one `embed` call and where its time went."""

    vectors: np.ndarray   # float32 [texts, dimension]
    tokenize_ms: float
    stats: BatchStats


@dataclass
class Scored:
    """Per-document scores of one `score` call (raw and normalized, best chunk's) and where its time went."""

    documents: DocumentScores
    tokenize_ms: float
    stats: BatchStats


class _Role:
    """What both roles share: the model's token limit and start/stop of the batcher."""

    model: Embedder | Reranker
    batcher: Batcher

    @property
    def max_length(self) -> int:
        """The model's token limit per input (per pair for the cross-encoder)."""
        return self.model.max_length

    def start(self) -> None:
        """Start the batcher on the running event loop."""
        self.batcher.start()

    async def stop(self, drain_timeout: float = 1.0) -> None:
        """Refuse new work, let queued work finish for up to `drain_timeout` s, fail the rest (Unavailable)."""
        await self.batcher.stop(drain_timeout=drain_timeout)


class EmbeddingRole(_Role):
    """The served bi-encoder: texts -> vectors through its batcher."""

    def __init__(self, model: Embedder, pool: InferencePool, limits: BatchLimits,
                 metrics: BatchMetrics | None = None):
        self.model = model
        self.batcher = _batcher(model, pool, limits, metrics)

    async def embed(self, texts: Sequence[str], *, deadline: float | None = None, max_tokens: int = 0,
                    truncate: bool = True, field: str = "texts") -> Embedded:
        """Vectors of `texts`, each cut to `max_tokens` (0 = the model's limit) unless `truncate` is False, in
        which case an over-long text raises InvalidArgument naming `field[i]`."""
        t0 = time.perf_counter()
        encoded = await asyncio.to_thread(self.model.encode, texts, max_tokens=max_tokens, truncate=truncate,
                                          field=field)
        tokenize_ms = (time.perf_counter() - t0) * 1000.0
        result = await self.batcher.submit(encoded, deadline=deadline)
        return Embedded(np.asarray(result.outputs, dtype=np.float32), tokenize_ms, result.stats)


class RerankRole(_Role):
    """The served cross-encoder: a query and documents -> one raw and one normalized score per document."""

    def __init__(self, model: Reranker, pool: InferencePool, limits: BatchLimits,
                 metrics: BatchMetrics | None = None):
        self.model = model
        self.batcher = _batcher(model, pool, limits, metrics)

    async def score(self, query: str, docs: Sequence[str], *, deadline: float | None = None,
                    max_query_tokens: int = 0, max_doc_tokens: int = 0, truncate: bool = True,
                    chunk_long: bool = False, chunk_overlap: int = 0) -> Scored:
        """Scores of each document against `query`. Pairs are cut to the model's max_length (or refused when
        `truncate` is False); with `chunk_long` every document is scored as windows of `chunk_overlap`
        overlapping tokens and keeps its best window's score."""
        t0 = time.perf_counter()
        if chunk_long:
            pairs, owner = await asyncio.to_thread(self.model.encode_chunks, query, docs, overlap=chunk_overlap,
                                                   max_query_tokens=max_query_tokens, max_doc_tokens=max_doc_tokens)
        else:
            pairs = await asyncio.to_thread(self.model.encode, query, docs, max_query_tokens=max_query_tokens,
                                            max_doc_tokens=max_doc_tokens, truncate=truncate)
            owner = list(range(len(docs)))
        tokenize_ms = (time.perf_counter() - t0) * 1000.0
        result = await self.batcher.submit(pairs, deadline=deadline)
        documents = best_chunks(self.model.scores(result.outputs), pairs, owner, len(docs))
        return Scored(documents, tokenize_ms, result.stats)
