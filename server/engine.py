"""The domain layer: Search, Rerank, Embed, Upsert and Delete on top of the served models (server/roles.py) and
the index.

Knows nothing of gRPC: takes plain values, returns dataclasses, raises `twostage.server.errors`.
Every request is validated here, before any work is queued. Vectors and scores come from the roles; the engine
never touches a tokenizer or a logit.

Latency budget (Search and Rerank). A request's deadline is the tightest of its latency budget (the request's
`latency_budget_ms`, else the deprecated `rerank_budget_ms`, else the server's `default_latency_budget_ms`), counted
from its arrival, and the caller's gRPC deadline, less `latency_reserve_ms` for building and sending the answer
(`request_deadline`). With a budget the request degrades to meet it: the query embedding goes first (INTERACTIVE)
and is refused at once when even it is predicted late; then as many candidates as can be reranked in time, in
stage-1 order, are submitted at once (`RerankRole.score`, budgeted), and the answer lists the reranked hits first,
by final score, then the rest in stage-1 order (`budget_limited` says the budget cut reranking short). Without a
budget, a gRPC deadline that the work queued ahead makes impossible is refused at once (RESOURCE_EXHAUSTED with
the predicted wait) instead of waiting for it to pass.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twostage.model.reranker import DocumentScores
from twostage.server import fusion
from twostage.server.batcher import BatchStats, InferencePool, Priority
from twostage.server.config import Config
from twostage.server.errors import FailedPrecondition, InvalidArgument, NotFound
from twostage.server.index.backend import Candidates, IndexBackend, StoredDoc, embedding_text
from twostage.server.roles import EmbeddingRole, RerankRole

RETRIEVAL_MODES = ("dense", "lexical", "hybrid")


# ----------------------------------------------------------------------------------------- results
@dataclass
class StageTiming:
    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    inference_ms: float = 0.0
    batches: int = 0
    items: int = 0
    tokens: int = 0

    def add(self, stats: BatchStats) -> None:
        """Fold in a batcher result's stats (several submits per stage under a latency budget)."""
        if self.batches == 0:
            self.queue_ms = stats.queue_ms
        self.inference_ms += stats.inference_ms
        self.batches += stats.batches
        self.items += stats.items
        self.tokens += stats.tokens


@dataclass
class Timing:
    started: float = field(default_factory=time.perf_counter)
    embed: StageTiming = field(default_factory=StageTiming)
    rerank: StageTiming = field(default_factory=StageTiming)
    ann_ms: float = 0.0
    lexical_ms: float = 0.0
    store_ms: float = 0.0
    total_ms: float = 0.0

    def finish(self) -> Timing:
        self.total_ms = (time.perf_counter() - self.started) * 1000.0
        return self


@dataclass
class Hit:
    id: str
    score: float
    rerank_score: float
    retrieval_score: float
    reranked: bool
    retrieval_rank: int
    document: StoredDoc | None
    dense_score: float | None = None      # None: not in the dense list
    dense_rank: int | None = None
    lexical_score: float | None = None    # None: not in the lexical list
    lexical_rank: int | None = None
    rerank_normalized: float = 0.0        # the cross-encoder's normalized score, whatever score_kind says
    rerank_raw: float = 0.0               # and its raw score (logit)


@dataclass
class SearchOutcome:
    hits: list[Hit]
    score_kind: str  # "normalized" | "raw" | "similarity"
    candidates: int
    reranked: int
    filter_exhausted: bool
    timing: Timing
    retrieval_mode: str = "dense"
    rerank_weight: float = 0.0            # the weight applied; 0 when nothing was reranked
    budget_limited: bool = False
    latency_budget_ms: int = 0            # the effective budget (0 = none)


@dataclass
class RerankItem:
    index: int
    score: float
    id: str
    text: str
    chunks: int
    best_chunk: int
    truncated: bool
    scored: bool = True                   # False: left out by the latency budget


@dataclass
class RerankOutcome:
    results: list[RerankItem]
    score_kind: str
    timing: Timing
    scored: int = 0
    budget_limited: bool = False
    latency_budget_ms: int = 0


@dataclass(frozen=True)
class Deadline:
    """When a request must be answered. `at`: time.monotonic() instant (None = no deadline), the serialization
    reserve already taken off; `budgeted`: a latency budget set it (work degrades to meet it) rather than the gRPC
    deadline alone (work is refused at once when predicted late); `budget_ms`: the effective budget for the
    response (0 when not budgeted)."""

    at: float | None = None
    budgeted: bool = False
    budget_ms: int = 0


def request_deadline(arrived: float, budget_ms: int, grpc_deadline: float | None, reserve_ms: float) -> Deadline:
    """The tightest of `arrived` + `budget_ms` (0 = no budget) and the gRPC deadline, less `reserve_ms`."""
    budget_at = arrived + budget_ms / 1000.0 if budget_ms > 0 else None
    ends = [t for t in (budget_at, grpc_deadline) if t is not None]
    if not ends:
        return Deadline()
    end = min(ends)
    return Deadline(at=end - reserve_ms / 1000.0, budgeted=budget_at is not None,
                    budget_ms=max(0, round((end - arrived) * 1000.0)) if budget_at is not None else 0)


@dataclass
class EmbedOutcome:
    vectors: np.ndarray
    normalized: bool
    timing: Timing


@dataclass
class WriteOutcome:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    not_found: list[str] = field(default_factory=list)
    index_size: int = 0
    timing: Timing = field(default_factory=Timing)


@dataclass
class DocumentInput:
    id: str
    text: str
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    embedding: Sequence[float] = ()


# -------------------------------------------------------------------------------------- validation
def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", errors="surrogatepass"))


def check_text(name: str, value: str, limit: int, *, allow_empty: bool = False) -> None:
    if not allow_empty and not value.strip():
        raise InvalidArgument(name, "must not be empty or whitespace")
    size = _utf8_len(value)
    if size > limit:
        raise InvalidArgument(name, f"is {size} bytes; the limit is {limit} bytes")
    if "\x00" in value:
        raise InvalidArgument(name, "contains a NUL character")


def check_count(name: str, count: int, limit: int, *, minimum: int = 1) -> None:
    if count < minimum:
        raise InvalidArgument(name, f"needs at least {minimum} entr{'y' if minimum == 1 else 'ies'}")
    if count > limit:
        raise InvalidArgument(name, f"has {count} entries; the limit is {limit}")


def check_range(name: str, value: int, limit: int) -> None:
    if value < 0 or value > limit:
        raise InvalidArgument(name, f"is {value}; must be between 1 and {limit} (0 = default)")


def check_ids(name: str, ids: Sequence[str], limit_bytes: int) -> None:
    seen: dict[str, int] = {}
    for i, doc_id in enumerate(ids):
        if not doc_id or not doc_id.strip():
            raise InvalidArgument(f"{name}[{i}]", "id must not be empty")
        if _utf8_len(doc_id) > limit_bytes:
            raise InvalidArgument(f"{name}[{i}]", f"id is {_utf8_len(doc_id)} bytes; the limit is {limit_bytes} bytes")
        if "\x00" in doc_id:
            raise InvalidArgument(f"{name}[{i}]", "id contains a NUL character")
        if doc_id in seen:
            raise InvalidArgument(name, f"duplicate id {doc_id!r} at positions {seen[doc_id]} and {i}")
        seen[doc_id] = i


def check_filter(flt: dict[str, Any] | None, max_keys: int) -> None:
    if not flt:
        return
    if len(flt) > max_keys:
        raise InvalidArgument("filter", f"has {len(flt)} keys; the limit is {max_keys}")
    for key, value in flt.items():
        if not isinstance(key, str) or not key:
            raise InvalidArgument("filter", "keys must not be empty")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise InvalidArgument(f"filter.{key}", "only scalar values (string, number, bool, null) can be matched")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"filter.{key}", "number must be finite")


# ------------------------------------------------------------------------------------------ engine
class Engine:
    """Search/Rerank/Embed/Upsert/Delete. One per server; shared by all requests."""

    def __init__(self, config: Config, embedder: EmbeddingRole, reranker: RerankRole, index: IndexBackend,
                 pool: InferencePool):
        """`pool` is the InferencePool both roles run on; the engine owns what it is given: `close()` stops the
        roles, closes the index and shuts the pool down."""
        self.config = config
        self.embedder = embedder
        self.reranker = reranker
        self.index = index
        self.pool = pool

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start both roles' batchers on the running event loop."""
        self.embedder.start()
        self.reranker.start()

    async def warm_up(self) -> None:
        """Fit both models' cost estimates with `warm_up_batches` batches of assorted sizes (before serving)."""
        await self.embedder.warm_up(self.config.warm_up_batches)
        await self.reranker.warm_up(self.config.warm_up_batches)

    def _deadline(self, arrived: float | None, budget_ms: int, grpc_deadline: float | None) -> Deadline:
        """The request's deadline (module docstring); `budget_ms` 0 = the server's default budget."""
        if budget_ms < 0:
            raise InvalidArgument("latency_budget_ms", f"is {budget_ms}; must be >= 0 (0 = server default)")
        return request_deadline(time.monotonic() if arrived is None else arrived,
                                budget_ms or self.config.default_latency_budget_ms, grpc_deadline,
                                self.config.latency_reserve_ms)

    async def close(self, drain_timeout: float = 1.0) -> None:
        """Stop the roles (queued work gets `drain_timeout` s), close the index, shut the inference pool down."""
        await self.embedder.stop(drain_timeout=drain_timeout)
        await self.reranker.stop(drain_timeout=drain_timeout)
        await asyncio.to_thread(self.index.close)
        self.pool.shutdown()

    # ---------------------------------------------------------------- embed
    async def _embed_texts(self, texts: list[str], timing: Timing, deadline: float | None,
                           max_tokens: int = 0, truncate: bool = True, field_name: str = "texts",
                           priority: Priority = Priority.NORMAL) -> np.ndarray:
        embedded = await self.embedder.embed(texts, deadline=deadline, priority=priority, max_tokens=max_tokens,
                                             truncate=truncate, field=field_name)
        timing.embed.tokenize_ms += embedded.tokenize_ms
        timing.embed.add(embedded.stats)
        return embedded.vectors

    async def embed(self, texts: list[str], *, truncate: bool = True, deadline: float | None = None) -> EmbedOutcome:
        """`deadline`: the gRPC deadline (refused at once when the work queued ahead makes it impossible)."""
        cfg = self.config
        check_count("texts", len(texts), cfg.max_embed_texts)
        for i, t in enumerate(texts):
            check_text(f"texts[{i}]", t, cfg.max_text_bytes)
        timing = Timing()
        vectors = await self._embed_texts(list(texts), timing, deadline, truncate=truncate)
        return EmbedOutcome(vectors=vectors, normalized=self.embedder.model.normalize, timing=timing.finish())

    # ---------------------------------------------------------------- rerank core
    async def _score_pairs(self, query: str, docs: list[str], timing: Timing, deadline: Deadline, *,
                           max_query_tokens: int, max_doc_tokens: int, truncate: bool,
                           chunk_long: bool, chunk_overlap: int) -> tuple[DocumentScores, np.ndarray]:
        """Scores per document (raw and normalized; best chunk in long-document mode, with chunk counts, best chunk
        and truncated flags: twostage.model.reranker.best_chunks) and which documents were scored: all of them
        without a budget, as many as fit in the caller's order with one."""
        scored = await self.reranker.score(query, docs, deadline=deadline.at, budgeted=deadline.budgeted,
                                           priority=Priority.NORMAL, max_query_tokens=max_query_tokens,
                                           max_doc_tokens=max_doc_tokens, truncate=truncate, chunk_long=chunk_long,
                                           chunk_overlap=chunk_overlap)
        timing.rerank.tokenize_ms += scored.tokenize_ms
        timing.rerank.add(scored.stats)
        return scored.documents, scored.completed

    def _validate_rerank_query(self, query: str, max_query_tokens: int, max_doc_tokens: int) -> None:
        check_text("query", query, self.config.max_query_bytes)
        for name, v in (("max_query_tokens", max_query_tokens), ("max_document_tokens", max_doc_tokens)):
            if v < 0 or v > self.reranker.max_length:
                raise InvalidArgument(
                    name, f"is {v}; must be between 1 and {self.reranker.max_length} (0 = model limit)")

    async def rerank(self, query: str, *, texts: Sequence[str] = (), document_ids: Sequence[str] = (),
                     top_n: int = 0, return_documents: bool = False, raw: bool = False, truncate: bool = True,
                     max_query_tokens: int = 0, max_doc_tokens: int = 0, chunk_long: bool = False,
                     chunk_overlap: int = 0, deadline: float | None = None, latency_budget_ms: int = 0,
                     arrived: float | None = None, first_stage_scores: Sequence[float] = (),
                     rerank_weight: float | None = None) -> RerankOutcome:
        """`deadline`: the gRPC deadline; `arrived`: when the request arrived (time.monotonic(); now if None)."""
        cfg = self.config
        timing = Timing()
        when = self._deadline(arrived, latency_budget_ms, deadline)
        self._validate_rerank_query(query, max_query_tokens, max_doc_tokens)
        if texts and document_ids:
            raise InvalidArgument("texts", "give either texts or document_ids, not both")
        n = len(texts) or len(document_ids)
        check_count("texts" if texts or not document_ids else "document_ids", n, cfg.max_rerank_documents)
        check_range("top_n", top_n, cfg.max_rerank_documents)
        if chunk_overlap < 0 or (chunk_overlap and chunk_overlap >= self.reranker.max_length // 2):
            raise InvalidArgument("chunk_overlap_tokens",
                                  f"is {chunk_overlap}; must be below {self.reranker.max_length // 2}")
        if first_stage_scores:
            if len(first_stage_scores) != n:
                raise InvalidArgument("first_stage_scores", f"has {len(first_stage_scores)} scores for {n} "
                                      f"documents; give one per document (or none)")
            for i, value in enumerate(first_stage_scores):
                if not math.isfinite(value):
                    raise InvalidArgument(f"first_stage_scores[{i}]", f"is {value}; scores must be finite")
        self._check_weight("rerank_weight", rerank_weight)
        ids: list[str] = []
        if texts:
            for i, t in enumerate(texts):
                check_text(f"texts[{i}]", t, cfg.max_text_bytes)
            docs = list(texts)
        else:
            check_ids("document_ids", document_ids, cfg.max_id_bytes)
            t0 = time.perf_counter()
            stored = await asyncio.to_thread(self.index.get, list(document_ids))
            timing.store_ms += (time.perf_counter() - t0) * 1000.0
            missing = [d for d in document_ids if d not in stored]
            if missing:
                shown = ", ".join(repr(m) for m in missing[:10])
                more = " …" if len(missing) > 10 else ""
                raise NotFound(f"document_ids: {len(missing)} unknown id(s): {shown}{more}")
            ids = list(document_ids)
            docs = [embedding_text(stored[d].title, stored[d].text) for d in ids]
        d, completed = await self._score_pairs(
            query, docs, timing, when, max_query_tokens=max_query_tokens, max_doc_tokens=max_doc_tokens,
            truncate=truncate, chunk_long=chunk_long, chunk_overlap=chunk_overlap or cfg.default_chunk_overlap_tokens)
        scores = self._rerank_scores(d, completed, raw, first_stage_scores,
                                     cfg.rerank_weight if rerank_weight is None else rerank_weight)
        scored = [i for i in range(len(docs)) if completed[i]]
        order = sorted(scored, key=lambda i: (-scores[i], i)) + [i for i in range(len(docs)) if not completed[i]]
        if top_n:
            order = order[:top_n]
        results = [RerankItem(index=i, score=scores[i], id=ids[i] if ids else "",
                              text=docs[i] if return_documents else "", chunks=d.chunks[i],
                              best_chunk=d.best_chunk[i], truncated=d.truncated[i], scored=bool(completed[i]))
                   for i in order]
        return RerankOutcome(results=results, score_kind="raw" if raw else "normalized", timing=timing.finish(),
                             scored=len(scored), budget_limited=len(scored) < len(docs),
                             latency_budget_ms=when.budget_ms)

    def _rerank_scores(self, d: DocumentScores, completed: np.ndarray, raw: bool, first_stage: Sequence[float],
                       weight: float) -> list[float]:
        """Each document's Rerank score: its cross-encoder score (0 when unscored), or with first-stage scores the
        fused score by the rule of Search (`_final_scores`, the scored documents taking the reranked hits' part)."""
        kind = d.raw if raw else d.normalized
        if not len(first_stage):
            return [float(kind[i]) if completed[i] else 0.0 for i in range(len(completed))]
        hits = [Hit(id=str(i), score=0.0, rerank_score=float(kind[i]) if completed[i] else 0.0,
                    retrieval_score=float(first_stage[i]), reranked=bool(completed[i]), retrieval_rank=i,
                    document=None, rerank_normalized=float(d.normalized[i]) if completed[i] else 0.0,
                    rerank_raw=float(d.raw[i]) if completed[i] else 0.0) for i in range(len(completed))]
        scored = [h for h in hits if h.reranked]
        self._final_scores(scored + [h for h in hits if not h.reranked], len(scored), weight)
        return [h.score for h in hits]

    # ---------------------------------------------------------------- search
    def _check_weight(self, name: str, value: float | None) -> None:
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise InvalidArgument(name, f"is {value}; must be between 0 and 1 (unset = server default)")

    async def search(self, query: str, *, top_k: int = 0, candidates: int = 0, skip_rerank: bool = False,
                     filter: dict[str, Any] | None = None, ids_only: bool = False, rerank_budget_ms: int = 0,
                     raw: bool = False, max_query_tokens: int = 0, max_doc_tokens: int = 0,
                     expansion_search: int = 0, retrieval_mode: str = "", fusion_method: str = "",
                     fusion_weight: float | None = None, rerank_weight: float | None = None,
                     deadline: float | None = None, latency_budget_ms: int = 0,
                     arrived: float | None = None) -> SearchOutcome:
        """`deadline`: the gRPC deadline; `arrived`: when the request arrived (time.monotonic(); now if None);
        `rerank_budget_ms`: deprecated alias of `latency_budget_ms`, used when that is 0."""
        cfg = self.config
        timing = Timing()
        when = self._deadline(arrived, latency_budget_ms or rerank_budget_ms, deadline)
        check_text("query", query, cfg.max_query_bytes)
        check_range("top_k", top_k, cfg.max_top_k)
        check_range("candidates", candidates, cfg.max_candidates)
        check_filter(filter, cfg.max_filter_keys)
        if expansion_search < 0 or expansion_search > 4096:
            raise InvalidArgument("expansion_search",
                                  f"is {expansion_search}; must be between 1 and 4096 (0 = default)")
        mode = retrieval_mode or cfg.retrieval_mode
        if mode not in RETRIEVAL_MODES:
            raise InvalidArgument("retrieval_mode", f"is {mode!r}; must be one of {', '.join(RETRIEVAL_MODES)}")
        method = fusion_method or cfg.fusion
        if method not in fusion.FUSIONS:
            raise InvalidArgument("fusion", f"is {method!r}; must be one of {', '.join(fusion.FUSIONS)}")
        self._check_weight("fusion_weight", fusion_weight)
        self._check_weight("rerank_weight", rerank_weight)
        self._validate_rerank_query(query, max_query_tokens, max_doc_tokens)
        top_k = top_k or cfg.default_top_k
        n_candidates = max(candidates or cfg.default_candidates, top_k)

        fused, exhausted = await self._stage_one(query, mode, method, cfg.fusion_weight if fusion_weight is None
                                                 else fusion_weight, n_candidates, filter or None,
                                                 expansion_search, max_query_tokens, timing, when.at)
        fused = fused[:n_candidates]
        # How many candidates reranking may reach: all of them, or with a budget at most what could be scored in
        # the time left (often none under load), so that the documents nobody reads are not fetched.
        may_rerank = 0 if skip_rerank else len(fused)
        if may_rerank and when.budgeted and when.at is not None:
            may_rerank = self.reranker.fit_bound(query, may_rerank, deadline=when.at)
        # Documents to read: those reranking may score, plus (unless ids_only) those the answer may show. The
        # answer is the reranked hits, then the rest in stage-1 order, so its top_k lie in the first
        # may_rerank + top_k candidates.
        fetch = len(fused) if may_rerank == len(fused) else (may_rerank if ids_only else may_rerank + top_k)
        stored: dict[str, StoredDoc] = {}
        if fetch and fused:
            t0 = time.perf_counter()
            stored = await asyncio.to_thread(self.index.get, [f.id for f in fused[:fetch]])
            timing.store_ms += (time.perf_counter() - t0) * 1000.0
            # drop those deleted since stage 1 ran (those past the fetched ones are not looked at)
            fused = [f for f in fused[:fetch] if f.id in stored] + fused[fetch:]
            may_rerank = min(may_rerank, len(stored))

        hits = [Hit(id=f.id, score=f.score, rerank_score=0.0, retrieval_score=f.score, reranked=False,
                    retrieval_rank=i, document=None if ids_only else stored.get(f.id),
                    dense_score=f.dense_score, dense_rank=f.dense_rank, lexical_score=f.lexical_score,
                    lexical_rank=f.lexical_rank) for i, f in enumerate(fused)]
        n_reranked = 0
        applied_weight = 0.0
        score_kind = "similarity"
        if not skip_rerank and hits:
            score_kind = "raw" if raw else "normalized"
            texts = [embedding_text(stored[h.id].title, stored[h.id].text) for h in hits[:may_rerank]]
            if texts:
                n_reranked = await self._rerank_hits(query, hits[:may_rerank], texts, timing, when, raw=raw,
                                                     max_query_tokens=max_query_tokens,
                                                     max_doc_tokens=max_doc_tokens)
            # the reranked hits first (each group in stage-1 order): `_final_scores` takes them as a prefix
            hits = [h for h in hits if h.reranked] + [h for h in hits if not h.reranked]
            applied_weight = self._final_scores(hits, n_reranked, cfg.rerank_weight if rerank_weight is None
                                                else rerank_weight) if n_reranked else 0.0
            hits = sorted(hits, key=lambda h: (not h.reranked, -h.score, h.retrieval_rank))
        if not ids_only:    # an unfetched hit reaches the top only when fetched ones were deleted meanwhile
            hits = [h for h in hits if h.document is not None]
        hits = hits[:top_k]
        return SearchOutcome(hits=hits, score_kind=score_kind, candidates=len(fused), reranked=n_reranked,
                             filter_exhausted=bool(filter) and exhausted and len(fused) < top_k,
                             timing=timing.finish(), retrieval_mode=mode, rerank_weight=applied_weight,
                             budget_limited=not skip_rerank and n_reranked < len(fused),
                             latency_budget_ms=when.budget_ms)

    async def _stage_one(self, query: str, mode: str, method: str, dense_weight: float, n_candidates: int,
                         flt: dict[str, Any] | None, expansion_search: int, max_query_tokens: int, timing: Timing,
                         deadline: float | None) -> tuple[list[fusion.Fused], bool]:
        """The stage-1 list of `mode` and whether a filter exhausted the index. In hybrid mode the lexical search
        runs on a thread while the query is embedded, and each list is `hybrid_depth` deep (at least
        n_candidates) so that fusion sees more than the candidates it keeps."""
        depth = max(n_candidates, self.config.hybrid_depth) if mode == "hybrid" else n_candidates

        async def lexical() -> Candidates:
            t0 = time.perf_counter()
            found = await asyncio.to_thread(self.index.lexical_search, query, depth, filter=flt)
            timing.lexical_ms = (time.perf_counter() - t0) * 1000.0
            return found

        lexical_task = asyncio.ensure_future(lexical()) if mode in ("lexical", "hybrid") else None
        try:
            dense = None
            if mode in ("dense", "hybrid"):
                vector = (await self._embed_texts([query], timing, deadline, max_tokens=max_query_tokens,
                                                  field_name="query", priority=Priority.INTERACTIVE))[0]
                t0 = time.perf_counter()
                dense = await asyncio.to_thread(self.index.search, vector, depth,
                                                expansion_search=expansion_search or None, filter=flt)
                timing.ann_ms = (time.perf_counter() - t0) * 1000.0
            found_lexical = await lexical_task if lexical_task is not None else None
        except BaseException:
            if lexical_task is not None and not lexical_task.done():
                lexical_task.cancel()
            raise
        as_ranked = lambda found: [fusion.Ranked(h.id, float(h.score), h.rank) for h in found.hits]  # noqa: E731
        if dense is not None and found_lexical is not None:
            return fusion.fuse(as_ranked(dense), as_ranked(found_lexical), method, dense_weight), dense.exhausted
        if dense is not None:
            return fusion.single(as_ranked(dense), "dense"), dense.exhausted
        assert found_lexical is not None
        return fusion.single(as_ranked(found_lexical), "lexical"), found_lexical.exhausted

    def _final_scores(self, hits: list[Hit], n_reranked: int, weight: float) -> float:
        """Set every hit's `score` from its cross-encoder and stage-1 scores (SearchHit.score in the proto says
        how); return the cross-encoder weight applied (`weight`, or the query-adaptive one when negative).
        The reranked hits are the first `n_reranked` of `hits` (the caller orders the answer reranked first)."""
        done = hits[:n_reranked]
        ce = np.array([h.rerank_normalized for h in done])
        if weight < 0:
            weight = fusion.adaptive_rerank_weight([h.rerank_raw for h in done])
        if weight >= 1.0:
            for h in done:
                h.score = h.rerank_score
            return 1.0
        stage1 = fusion.min_max([h.retrieval_score for h in hits])
        ce_norm = fusion.min_max(ce)
        for i, h in enumerate(hits):
            h.score = float((1.0 - weight) * stage1[i] + (weight * ce_norm[i] if i < n_reranked else 0.0))
        return weight

    async def _rerank_hits(self, query: str, hits: list[Hit], texts: list[str], timing: Timing,
                           deadline: Deadline, *, raw: bool, max_query_tokens: int, max_doc_tokens: int) -> int:
        """Score hits with the cross-encoder and mark them reranked; return how many. With a latency budget, those
        that fit by the deadline, planned in stage-1 order and submitted at once (any that did not complete stay
        unreranked); without one, all of them (refused at once when a gRPC deadline is predicted to be missed)."""
        d, completed = await self._score_pairs(query, texts, timing, deadline, max_query_tokens=max_query_tokens,
                                               max_doc_tokens=max_doc_tokens, truncate=True, chunk_long=False,
                                               chunk_overlap=0)
        for h, r, n, ok in zip(hits, d.raw, d.normalized, completed, strict=True):
            if ok:
                h.rerank_score = float(r if raw else n)
                h.rerank_normalized = float(n)
                h.rerank_raw = float(r)
                h.reranked = True
        return int(completed.sum())

    # ---------------------------------------------------------------- writes
    def _check_writable(self) -> None:
        if self.index.read_only:
            raise FailedPrecondition("the index is memory-mapped read-only (index_view=true); writes are refused")

    async def upsert(self, documents: Sequence[DocumentInput], *, deadline: float | None = None) -> WriteOutcome:
        cfg = self.config
        self._check_writable()
        check_count("documents", len(documents), cfg.max_upsert_documents)
        check_ids("documents.id", [d.id for d in documents], cfg.max_id_bytes)
        dim = self.index.dimension
        for i, d in enumerate(documents):
            check_text(f"documents[{i}].text", d.text, cfg.max_text_bytes)
            check_text(f"documents[{i}].title", d.title, cfg.max_text_bytes, allow_empty=True)
            if d.embedding and len(d.embedding) != dim:
                raise InvalidArgument(f"documents[{i}].embedding",
                                      f"has {len(d.embedding)} values; the index dimension is {dim}")
            if d.embedding and not all(math.isfinite(x) for x in d.embedding):
                raise InvalidArgument(f"documents[{i}].embedding", "contains NaN or infinite values")
            if d.embedding and cfg.index_metric == "cos" and not any(d.embedding):
                raise InvalidArgument(f"documents[{i}].embedding",
                                      "is all zeros, which has no direction under the cos metric")
            try:
                meta_json = json.dumps(d.metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"documents[{i}].metadata", f"is not a JSON object ({exc})") from None
            meta_bytes = len(meta_json.encode("utf-8", "surrogatepass"))
            if meta_bytes > cfg.max_metadata_bytes:
                raise InvalidArgument(f"documents[{i}].metadata",
                                      f"is {meta_bytes} bytes as JSON; the limit is {cfg.max_metadata_bytes} bytes")
        timing = Timing()
        vectors = np.zeros((len(documents), dim), dtype=np.float32)
        to_embed = [i for i, d in enumerate(documents) if not d.embedding]
        for i, d in enumerate(documents):
            if d.embedding:
                vectors[i] = np.asarray(d.embedding, dtype=np.float32)
        if to_embed:
            texts = [embedding_text(documents[i].title, documents[i].text) for i in to_embed]
            vectors[to_embed] = await self._embed_texts(texts, timing, deadline, priority=Priority.BULK)
        docs = [StoredDoc(id=d.id, text=d.text, title=d.title, metadata=dict(d.metadata)) for d in documents]
        t0 = time.perf_counter()
        inserted, updated = await asyncio.to_thread(self.index.upsert, docs, vectors)
        timing.store_ms += (time.perf_counter() - t0) * 1000.0
        return WriteOutcome(inserted=inserted, updated=updated, index_size=self.index.size, timing=timing.finish())

    async def delete(self, ids: Sequence[str]) -> WriteOutcome:
        self._check_writable()
        check_count("ids", len(ids), self.config.max_upsert_documents)
        check_ids("ids", ids, self.config.max_id_bytes)
        timing = Timing()
        t0 = time.perf_counter()
        deleted, not_found = await asyncio.to_thread(self.index.delete, list(ids))
        timing.store_ms += (time.perf_counter() - t0) * 1000.0
        return WriteOutcome(deleted=deleted, not_found=list(not_found), index_size=self.index.size,
                            timing=timing.finish())
