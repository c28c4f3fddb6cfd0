"""The served models: one object per role that owns its model and its batcher and answers in vectors and scores.

`EmbeddingRole.embed` and `RerankRole.score` tokenize (off the event loop), submit the encoded items to the role's
`Batcher` (which runs `model.run_batch` on the shared `InferencePool`) and post-process with the model layer, so
the engine never sees a tokenizer or a logit. Both are built with everything they need, started with `start()`
on the serving event loop and stopped with `stop()` by whoever started them (the engine's `close()`, or
`BackgroundEmbedder` in server/cli.py for `twostage index build`).

Deadlines (time.monotonic() instants). Unbudgeted work with a deadline is refused at once (`ResourceExhausted`
with the predicted wait) when the batcher predicts it cannot be done in time (`refuse_if_late`), instead of
queueing until the deadline passes; admitted, it fails with DeadlineExceeded if it still is not dispatched in
time. The check runs twice (`Admission`): before tokenizing, on a floor of each text's tokens read from its size
(`token_floor`), so that a flood of doomed requests is refused without tokenizing any of it; then on the real
token counts. Work admitted and still being tokenized counts ahead of later arrivals, so that a burst arriving
at an empty queue is not admitted whole. Budgeted work (``budgeted=True``) degrades instead: `RerankRole.score`
plans how many documents, in the caller's order, can be scored by the deadline (`Batcher.plan_prefix`, whole
documents), submits them at once so every worker shares them, and says which were scored (`Scored.completed`).
It tokenizes only what may fit: a first slice of the documents, then twice as many while all of them fit
(tokenizing 100 candidates costs about as much CPU as scoring a few pairs, which a tight budget cannot spare).

`warm_up` runs batches of assorted sizes on the pool's workers at startup and feeds their durations to the batcher's
cost model (server/cost.py), so that it has measured the model's fixed and per-token batch cost apart before the
first budget is planned. (Directly, not through the batcher's queue: a warm-up batch is not held back by
`max_delay_ms` nor counted against the queue bound.)
"""
from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from twostage.model.embedder import Embedder
from twostage.model.reranker import DocumentScores, PairScores, Reranker, best_chunks
from twostage.model.session import SessionSettings, thread_layout
from twostage.model.tokenization import Encoded, padded_tokens
from twostage.server.batcher import Batcher, BatchMetrics, BatchResult, BatchStats, InferencePool, Priority
from twostage.server.config import Config
from twostage.server.errors import ResourceExhausted


def session_settings(config: Config) -> SessionSettings:
    """ONNX Runtime session settings from the server config (threads per worker from `thread_layout`)."""
    _, threads = thread_layout(config.inference_workers, config.intra_op_threads, config.execution_provider)
    return SessionSettings(intra_op_threads=threads, allow_spinning=config.ort_allow_spinning,
                           execution_provider=config.execution_provider)


def inference_pool(config: Config, name: str = "twostage-inference") -> InferencePool:
    """The worker pool both roles share, sized by `thread_layout` so that workers x threads fill the cores."""
    workers, _ = thread_layout(config.inference_workers, config.intra_op_threads, config.execution_provider)
    return InferencePool(workers, name=name, free_worker_within_ms=config.free_worker_within_ms,
                         nice=config.inference_nice)


# A floor on a text's tokens from its UTF-8 size, for refusing before tokenizing: English wordpieces take about 4-5
# bytes a token and a whole long word rarely over 10; a CJK character (3 bytes) is about one token.
FLOOR_BYTES_PER_TOKEN = 10
# Budgeted scoring tokenizes this many documents first, then doubles while all of them fit (module docstring).
FIRST_SLICE = 8
# `RerankRole.fit_bound` takes every pair to have at least the query's token floor plus MIN_DOC_TOKENS, and at
# least TYPICAL_SHARE of the typical pair length scored lately (an exponential moving average of each call's
# median, weight TYPICAL_WEIGHT): a floor few candidate lists go under, so the bound rarely falls short of what
# the real plan admits, yet it is 0 when the budget left cannot score even pairs of half the usual length.
MIN_DOC_TOKENS = 8
TYPICAL_SHARE = 0.5
TYPICAL_WEIGHT = 0.1


def token_floor(texts_bytes: int, specials: int, max_length: int) -> int:
    """At least how many tokens an input of `texts_bytes` UTF-8 bytes of text has (capped at the model's limit)."""
    return min(max_length, specials + texts_bytes // FLOOR_BYTES_PER_TOKEN)


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


# Tokenizing this many bytes of text or fewer (a query, a few passages: about a millisecond) runs on the event loop:
# the hop to a thread and back costs more, and under load it waits behind other requests' work. More is tokenized
# on a thread so that the event loop keeps serving meanwhile.
INLINE_TOKENIZE_BYTES = 4096

R = TypeVar("R")
M = TypeVar("M", Embedder, Reranker)


async def tokenize(text_bytes: int, work: Callable[[], R]) -> R:
    """Run `work` (tokenizing `text_bytes` bytes of text) inline when small, else on a thread."""
    if text_bytes <= INLINE_TOKENIZE_BYTES:
        return work()
    return await asyncio.to_thread(work)


def refuse_if_late(batcher: Batcher, lengths: Sequence[int], deadline: float | None, what: str) -> None:
    """Fail fast: raise ResourceExhausted (with the predicted wait) when work of these token lengths, submitted
    now, is predicted to be done after `deadline` because of the work already queued ahead. A deadline already
    past is left to the batcher (DeadlineExceeded)."""
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        return
    wait = batcher.predict_wait(lengths)
    if wait > left:
        raise ResourceExhausted(
            f"{what}: the work queued ahead makes the deadline impossible: predicted to be done in "
            f"{wait * 1000:.0f} ms, the deadline is {left * 1000:.0f} ms away; retry later or with a longer deadline "
            f"(or a latency budget, which degrades instead)", predicted_wait_ms=wait * 1000.0)


class Admission:
    """Fail-fast admission of a role's unbudgeted work with a deadline (module docstring): `admit` checks token
    floors against the work queued ahead and holds them while the request tokenizes; `confirm` checks the real
    token counts and lets go (the request then queues in the batcher itself); `release` lets go after a failure.
    Held work of other requests counts as work ahead in both checks."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self._held: dict[object, list[int]] = {}

    def _check(self, lengths: Sequence[int], deadline: float, what: str, own: object = None) -> None:
        ahead = [n for key, held in self._held.items() if key is not own for n in held]
        refuse_if_late(self.batcher, ahead + list(lengths), deadline, what)

    def admit(self, floors: Sequence[int], deadline: float, what: str) -> object:
        self._check(floors, deadline, what)
        key = object()
        self._held[key] = list(floors)
        return key

    def confirm(self, key: object, lengths: Sequence[int], deadline: float, what: str) -> None:
        try:
            self._check(lengths, deadline, what, own=key)
        finally:
            self.release(key)

    def release(self, key: object) -> None:
        self._held.pop(key, None)

    @property
    def held_requests(self) -> int:
        return len(self._held)


@dataclass(frozen=True)
class BatchLimits:
    """A role's batcher knobs (config `embed_*` / `rerank_*`)."""

    max_batch_tokens: int
    max_batch_size: int
    max_delay_ms: float
    max_queued_tokens: int
    enabled: bool = True

    @classmethod
    def from_config(cls, config: Config, prefix: str) -> BatchLimits:
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

    vectors: np.ndarray   # float32 [texts, dimension]; NaN rows where not completed
    tokenize_ms: float
    stats: BatchStats
    completed: np.ndarray  # bool per text (all True unless budgeted)


@dataclass
class Scored:
    """Per-document scores of one `score` call (raw and normalized, best chunk's) and where its time went."""

    documents: DocumentScores  # NaN scores where not completed
    tokenize_ms: float
    stats: BatchStats
    completed: np.ndarray      # bool per document: every one of its pairs was scored (all True unless budgeted)


# Warm-up batches (`_Role.warm_up`): item lengths cycled through, each batch filled to a growing share of the
# batcher's token limit (at most WARM_UP_MAX_TOKENS), so the cost fit sees small and large batches of short and
# long items.
WARM_UP_LENGTHS = (12, 24, 48, 96, 160)
WARM_UP_MAX_TOKENS = 2048
WARM_UP_TEXT = " ".join(["warm up text about rivers, stones and the quiet evening light"] * 40)


class _Role(Generic[M]):
    """What both roles share: the model's token limit and start/stop of the batcher."""

    model: M
    batcher: Batcher
    admission: Admission

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

    def _warm_up_items(self, length: int, count: int) -> list[Encoded]:
        raise NotImplementedError

    async def warm_up(self, batches: int) -> None:
        """Run `batches` batches of assorted sizes and fit the batcher's cost model to their durations; one stream
        per pool worker, as in serving, where batches run beside each other. Call before serving (it uses the
        pool's threads without taking its slots)."""
        if batches <= 0:
            return
        b = self.batcher
        limit = min(b.max_batch_tokens, WARM_UP_MAX_TOKENS)
        plans = []
        for k in range(batches):
            length = min(WARM_UP_LENGTHS[k % len(WARM_UP_LENGTHS)], self.max_length)
            count = max(1, min(b.max_batch_size, int((k + 1) / batches * limit) // length))
            plans.append((length, count))
        items = await asyncio.to_thread(lambda: [self._warm_up_items(length, count) for length, count in plans])
        loop = asyncio.get_running_loop()

        def timed(batch: list[Encoded]) -> float:
            started = time.perf_counter()
            self.model.run_batch(batch)
            return time.perf_counter() - started

        async def stream(first: int) -> None:
            for batch in items[first::b.pool.workers]:
                seconds = await loop.run_in_executor(b.pool.executor, timed, batch)
                b.cost.observe(padded_tokens(batch), seconds)

        await asyncio.gather(*(stream(i) for i in range(b.pool.workers)))


class EmbeddingRole(_Role[Embedder]):
    """The served bi-encoder: texts -> vectors through its batcher."""

    def __init__(self, model: Embedder, pool: InferencePool, limits: BatchLimits,
                 metrics: BatchMetrics | None = None):
        self.model = model
        self.batcher = _batcher(model, pool, limits, metrics)
        self.admission = Admission(self.batcher)

    def _warm_up_items(self, length: int, count: int) -> list[Encoded]:
        return self.model.encode([WARM_UP_TEXT] * count, max_tokens=length)

    async def embed(self, texts: Sequence[str], *, deadline: float | None = None, budgeted: bool = False,
                    priority: Priority = Priority.NORMAL, max_tokens: int = 0, truncate: bool = True,
                    field: str = "texts") -> Embedded:
        """Vectors of `texts`, each cut to `max_tokens` (0 = the model's limit) unless `truncate` is False, in
        which case an over-long text raises InvalidArgument naming `field[i]`. With a deadline: refused at once
        when predicted late (unbudgeted), or only what can be done in time is done (`budgeted`)."""
        admitted = None
        if not budgeted and deadline is not None:
            cap = max_tokens or self.max_length
            specials = self.model.tokenizer.single_specials
            admitted = self.admission.admit([token_floor(utf8_size(t), specials, cap) for t in texts], deadline,
                                            field)
        t0 = time.perf_counter()
        try:
            encoded = await tokenize(sum(map(utf8_size, texts)), functools.partial(
                self.model.encode, texts, max_tokens=max_tokens, truncate=truncate, field=field))
            if admitted is not None and deadline is not None:
                self.admission.confirm(admitted, [len(e) for e in encoded], deadline, field)
        finally:
            if admitted is not None:
                self.admission.release(admitted)
        tokenize_ms = (time.perf_counter() - t0) * 1000.0
        result = await self.batcher.submit(encoded, deadline=deadline, budgeted=budgeted, priority=priority)
        vectors = np.asarray(result.outputs, dtype=np.float32)
        if vectors.shape[1:] != (self.model.dimension,):      # nothing completed: no row width yet
            vectors = np.full((len(encoded), self.model.dimension), np.nan, dtype=np.float32)
        return Embedded(vectors, tokenize_ms, result.stats, result.completed)


class RerankRole(_Role[Reranker]):
    """The served cross-encoder: a query and documents -> one raw and one normalized score per document."""

    def __init__(self, model: Reranker, pool: InferencePool, limits: BatchLimits,
                 metrics: BatchMetrics | None = None):
        self.model = model
        self.batcher = _batcher(model, pool, limits, metrics)
        self.admission = Admission(self.batcher)
        self.typical_pair_tokens = 0.0     # moving average of the median pair length of recent calls (0 = none yet)

    def _warm_up_items(self, length: int, count: int) -> list[Encoded]:
        return self.model.encode("warm up query", [WARM_UP_TEXT] * count, max_doc_tokens=max(1, length - 8))

    def fit_bound(self, query: str, count: int, *, deadline: float) -> int:
        """At most how many of `count` documents a budgeted `score` made now could score by `deadline`, known
        before the documents are read: the plan for pairs of the query's token floor and `MIN_DOC_TOKENS`
        each, or of `TYPICAL_SHARE` of the typical pair length when that is longer. 0 (the usual answer when the
        queue ahead already fills the budget) spares the caller fetching and tokenizing documents that would not
        be scored."""
        if count <= 0:
            return 0
        floor = token_floor(utf8_size(query), self.model.tokenizer.pair_specials + MIN_DOC_TOKENS, self.max_length)
        floor = max(floor, min(self.max_length, int(TYPICAL_SHARE * self.typical_pair_tokens)))
        return self.batcher.plan_prefix([floor] * count, deadline=deadline)

    def _observe_lengths(self, pairs: Sequence[Encoded]) -> None:
        if pairs:
            median = float(np.median([len(p) for p in pairs]))
            self.typical_pair_tokens = median if not self.typical_pair_tokens else \
                (1.0 - TYPICAL_WEIGHT) * self.typical_pair_tokens + TYPICAL_WEIGHT * median

    async def score(self, query: str, docs: Sequence[str], *, deadline: float | None = None, budgeted: bool = False,
                    priority: Priority = Priority.NORMAL, max_query_tokens: int = 0, max_doc_tokens: int = 0,
                    truncate: bool = True, chunk_long: bool = False, chunk_overlap: int = 0) -> Scored:
        """Scores of each document against `query`. Pairs are cut to the model's max_length (or refused when
        `truncate` is False); with `chunk_long` every document is scored as windows of `chunk_overlap`
        overlapping tokens and keeps its best window's score.

        With a deadline and ``budgeted``: as many documents as can be scored in time, a prefix in the given order
        (whole documents: all of a document's chunks or none), submitted at once; a document counts as scored
        (`Scored.completed`) only if all its pairs completed. Documents past the tokenized prefix report 0 chunks
        (they were not looked at). Unbudgeted with a deadline: refused at once (ResourceExhausted) when predicted
        late."""
        encode = functools.partial(self._encode, query, max_query_tokens=max_query_tokens,
                                   max_doc_tokens=max_doc_tokens, truncate=truncate, chunk_long=chunk_long,
                                   chunk_overlap=chunk_overlap)
        t0 = time.perf_counter()
        q_bytes = utf8_size(query)
        if budgeted:
            if deadline is None:
                raise ValueError("a budgeted score needs a deadline")
            # A slice at a time while everything tokenized fits (truncate=False needs every document checked).
            pairs: list[Encoded] = []
            owner: list[int] = []
            tokenized = 0
            while True:
                upto = len(docs) if not truncate else min(len(docs), max(FIRST_SLICE, 2 * tokenized))
                more, more_owner = await tokenize(q_bytes + sum(map(utf8_size, docs[tokenized:upto])),
                                                  functools.partial(encode, docs[tokenized:upto]))
                pairs += more
                owner += [tokenized + o for o in more_owner]
                tokenized = upto
                planned = whole_documents(self.batcher.plan_prefix([len(p) for p in pairs], deadline=deadline),
                                          owner)
                if planned < len(pairs) or tokenized == len(docs):
                    break
        else:
            admitted = None
            if deadline is not None:
                specials = self.model.tokenizer.pair_specials
                floors = [token_floor(q_bytes + utf8_size(d), specials, self.max_length) for d in docs]
                admitted = self.admission.admit(floors, deadline, "rerank")
            try:
                pairs, owner = await tokenize(q_bytes + sum(map(utf8_size, docs)), functools.partial(encode, docs))
                if admitted is not None and deadline is not None:
                    self.admission.confirm(admitted, [len(p) for p in pairs], deadline, "rerank")
            finally:
                if admitted is not None:
                    self.admission.release(admitted)
            planned = len(pairs)
        self._observe_lengths(pairs)
        tokenize_ms = (time.perf_counter() - t0) * 1000.0
        if planned:
            result = await self.batcher.submit(pairs[:planned], deadline=deadline, budgeted=budgeted,
                                               priority=priority)
        else:
            result = BatchResult(np.zeros((0, 0), dtype=np.float32), BatchStats(), np.zeros(0, dtype=bool))
        done = np.zeros(len(pairs), dtype=bool)
        done[:planned] = result.completed
        scores = self._pair_scores(result, done)
        documents = best_chunks(scores, pairs, owner, len(docs))
        completed = np.zeros(len(docs), dtype=bool)        # a document with pairs, all of them completed
        completed[owner] = True
        for pair_done, doc in zip(done, owner, strict=True):
            completed[doc] &= bool(pair_done)
        documents.raw[~completed] = np.nan
        documents.normalized[~completed] = np.nan
        return Scored(documents, tokenize_ms, result.stats, completed)

    def _encode(self, query: str, docs: Sequence[str], *, max_query_tokens: int, max_doc_tokens: int,
                truncate: bool, chunk_long: bool, chunk_overlap: int) -> tuple[list[Encoded], list[int]]:
        """The pairs of `docs` and each pair's document (its index in `docs`); blocking (tokenizes)."""
        if chunk_long:
            pairs, owner = self.model.encode_chunks(query, docs, overlap=chunk_overlap,
                                                    max_query_tokens=max_query_tokens, max_doc_tokens=max_doc_tokens)
            return pairs, list(owner)
        pairs = self.model.encode(query, docs, max_query_tokens=max_query_tokens, max_doc_tokens=max_doc_tokens,
                                  truncate=truncate)
        return pairs, list(range(len(docs)))

    def _pair_scores(self, result: BatchResult, done: np.ndarray) -> PairScores:
        """Raw and normalized score of every pair; NaN for pairs not done (`done` covers all pairs, the result
        the submitted prefix)."""
        raw = np.full(len(done), np.nan, dtype=np.float32)
        normalized = np.full(len(done), np.nan, dtype=np.float32)
        if done.any():
            scores = self.model.scores(result.outputs[result.completed])
            raw[done], normalized[done] = scores.raw, scores.normalized
        return PairScores(raw, normalized)


def whole_documents(pairs: int, owner: Sequence[int]) -> int:
    """The longest prefix of at most `pairs` pairs that holds whole documents (`owner`: each pair's document,
    non-decreasing, a document's chunks side by side)."""
    if pairs >= len(owner):
        return len(owner)
    cut = owner[pairs]                 # a document whose first pairs may be in the prefix, its last are not
    while pairs > 0 and owner[pairs - 1] == cut:
        pairs -= 1
    return pairs
