"""The domain layer: Search, Rerank, Embed, Upsert and Delete on top of the served models (server/roles.py) and
the index.

Knows nothing of gRPC: takes plain values, returns dataclasses, raises `twostage.server.errors`.
Every request is validated here, before any work is queued. Vectors and scores come from the roles; the engine
never touches a tokenizer or a logit.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from twostage.server import fusion
from twostage.server.batcher import BatchStats, InferencePool
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

    def finish(self) -> "Timing":
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


@dataclass
class RerankItem:
    index: int
    score: float
    id: str
    text: str
    chunks: int
    best_chunk: int
    truncated: bool


@dataclass
class RerankOutcome:
    results: list[RerankItem]
    score_kind: str
    timing: Timing


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

    async def close(self, drain_timeout: float = 1.0) -> None:
        """Stop the roles (queued work gets `drain_timeout` s), close the index, shut the inference pool down."""
        await self.embedder.stop(drain_timeout=drain_timeout)
        await self.reranker.stop(drain_timeout=drain_timeout)
        await asyncio.to_thread(self.index.close)
        self.pool.shutdown()

    # ---------------------------------------------------------------- embed
    async def _embed_texts(self, texts: list[str], timing: Timing, deadline: float | None,
                           max_tokens: int = 0, truncate: bool = True, field_name: str = "texts") -> np.ndarray:
        embedded = await self.embedder.embed(texts, deadline=deadline, max_tokens=max_tokens, truncate=truncate,
                                             field=field_name)
        timing.embed.tokenize_ms += embedded.tokenize_ms
        timing.embed.add(embedded.stats)
        return embedded.vectors

    async def embed(self, texts: list[str], *, truncate: bool = True, deadline: float | None = None) -> EmbedOutcome:
        cfg = self.config
        check_count("texts", len(texts), cfg.max_embed_texts)
        for i, t in enumerate(texts):
            check_text(f"texts[{i}]", t, cfg.max_text_bytes)
        timing = Timing()
        vectors = await self._embed_texts(list(texts), timing, deadline, truncate=truncate)
        return EmbedOutcome(vectors=vectors, normalized=self.embedder.model.normalize, timing=timing.finish())

    # ---------------------------------------------------------------- rerank core
    async def _score_pairs(self, query: str, docs: list[str], timing: Timing, deadline: float | None, *,
                           max_query_tokens: int, max_doc_tokens: int, truncate: bool,
                           chunk_long: bool, chunk_overlap: int, want_raw: bool) -> tuple[np.ndarray, list[int], list[int], list[bool]]:
        """Scores per document (raw or normalized; best chunk in long-document mode), chunk counts, best chunk,
        truncated flags (twostage.model.reranker.best_chunks)."""
        scored = await self.reranker.score(query, docs, deadline=deadline, max_query_tokens=max_query_tokens,
                                           max_doc_tokens=max_doc_tokens, truncate=truncate, chunk_long=chunk_long,
                                           chunk_overlap=chunk_overlap)
        timing.rerank.tokenize_ms += scored.tokenize_ms
        timing.rerank.add(scored.stats)
        d = scored.documents
        return (d.raw if want_raw else d.normalized), d.chunks, d.best_chunk, d.truncated

    def _validate_rerank_query(self, query: str, max_query_tokens: int, max_doc_tokens: int) -> None:
        check_text("query", query, self.config.max_query_bytes)
        for name, v in (("max_query_tokens", max_query_tokens), ("max_document_tokens", max_doc_tokens)):
            if v < 0 or v > self.reranker.max_length:
                raise InvalidArgument(name, f"is {v}; must be between 1 and {self.reranker.max_length} (0 = model limit)")

    async def rerank(self, query: str, *, texts: Sequence[str] = (), document_ids: Sequence[str] = (),
                     top_n: int = 0, return_documents: bool = False, raw: bool = False, truncate: bool = True,
                     max_query_tokens: int = 0, max_doc_tokens: int = 0, chunk_long: bool = False,
                     chunk_overlap: int = 0, deadline: float | None = None) -> RerankOutcome:
        cfg = self.config
        self._validate_rerank_query(query, max_query_tokens, max_doc_tokens)
        if texts and document_ids:
            raise InvalidArgument("texts", "give either texts or document_ids, not both")
        n = len(texts) or len(document_ids)
        check_count("texts" if texts or not document_ids else "document_ids", n, cfg.max_rerank_documents)
        check_range("top_n", top_n, cfg.max_rerank_documents)
        if chunk_overlap < 0 or (chunk_overlap and chunk_overlap >= self.reranker.max_length // 2):
            raise InvalidArgument("chunk_overlap_tokens",
                                  f"is {chunk_overlap}; must be below {self.reranker.max_length // 2}")
        timing = Timing()
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
                raise NotFound(f"document_ids: {len(missing)} unknown id(s): {shown}" + (" …" if len(missing) > 10 else ""))
            ids = list(document_ids)
            docs = [embedding_text(stored[d].title, stored[d].text) for d in ids]
        scores, chunks, best_chunk, truncated = await self._score_pairs(
            query, docs, timing, deadline, max_query_tokens=max_query_tokens, max_doc_tokens=max_doc_tokens,
            truncate=truncate, chunk_long=chunk_long, chunk_overlap=chunk_overlap or cfg.default_chunk_overlap_tokens,
            want_raw=raw)
        order = sorted(range(len(docs)), key=lambda i: (-float(scores[i]), i))
        if top_n:
            order = order[:top_n]
        results = [RerankItem(index=i, score=float(scores[i]), id=ids[i] if ids else "",
                              text=docs[i] if return_documents else "", chunks=chunks[i],
                              best_chunk=best_chunk[i], truncated=truncated[i]) for i in order]
        return RerankOutcome(results=results, score_kind="raw" if raw else "normalized", timing=timing.finish())

    # ---------------------------------------------------------------- search
    def _check_weight(self, name: str, value: float | None) -> None:
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise InvalidArgument(name, f"is {value}; must be between 0 and 1 (unset = server default)")

    async def search(self, query: str, *, top_k: int = 0, candidates: int = 0, skip_rerank: bool = False,
                     filter: dict[str, Any] | None = None, ids_only: bool = False, rerank_budget_ms: int = 0,
                     raw: bool = False, max_query_tokens: int = 0, max_doc_tokens: int = 0,
                     expansion_search: int = 0, retrieval_mode: str = "", fusion_method: str = "",
                     fusion_weight: float | None = None, rerank_weight: float | None = None,
                     deadline: float | None = None) -> SearchOutcome:
        cfg = self.config
        check_text("query", query, cfg.max_query_bytes)
        check_range("top_k", top_k, cfg.max_top_k)
        check_range("candidates", candidates, cfg.max_candidates)
        check_filter(filter, cfg.max_filter_keys)
        if expansion_search < 0 or expansion_search > 4096:
            raise InvalidArgument("expansion_search", f"is {expansion_search}; must be between 1 and 4096 (0 = default)")
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
        timing = Timing()

        fused, exhausted = await self._stage_one(query, mode, method, cfg.fusion_weight if fusion_weight is None
                                                 else fusion_weight, n_candidates, filter or None,
                                                 expansion_search, max_query_tokens, timing, deadline)
        fused = fused[:n_candidates]
        need_docs = (not skip_rerank) or (not ids_only)
        stored: dict[str, StoredDoc] = {}
        if need_docs and fused:
            t0 = time.perf_counter()
            stored = await asyncio.to_thread(self.index.get, [f.id for f in fused])
            timing.store_ms += (time.perf_counter() - t0) * 1000.0
            fused = [f for f in fused if f.id in stored]  # deleted since stage 1 ran

        hits = [Hit(id=f.id, score=f.score, rerank_score=0.0, retrieval_score=f.score, reranked=False,
                    retrieval_rank=i, document=None if ids_only else stored.get(f.id),
                    dense_score=f.dense_score, dense_rank=f.dense_rank, lexical_score=f.lexical_score,
                    lexical_rank=f.lexical_rank) for i, f in enumerate(fused)]
        n_reranked = 0
        applied_weight = 0.0
        score_kind = "similarity"
        if not skip_rerank and hits:
            score_kind = "raw" if raw else "normalized"
            texts = [embedding_text(stored[h.id].title, stored[h.id].text) for h in hits]
            n_reranked = await self._rerank_hits(query, hits, texts, timing, deadline, raw=raw,
                                                 budget_ms=rerank_budget_ms, max_query_tokens=max_query_tokens,
                                                 max_doc_tokens=max_doc_tokens)
            applied_weight = self._final_scores(hits, n_reranked, cfg.rerank_weight if rerank_weight is None
                                                else rerank_weight) if n_reranked else 0.0
            hits = sorted(hits, key=lambda h: (-h.score, h.retrieval_rank))
        hits = hits[:top_k]
        return SearchOutcome(hits=hits, score_kind=score_kind, candidates=len(fused), reranked=n_reranked,
                             filter_exhausted=bool(filter) and exhausted and len(fused) < top_k,
                             timing=timing.finish(), retrieval_mode=mode, rerank_weight=applied_weight,
                             budget_limited=not skip_rerank and n_reranked < len(fused))

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
                                                  field_name="query"))[0]
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
        The reranked hits are the stage-1 prefix, so the rest always follow them."""
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
                           deadline: float | None, *, raw: bool, budget_ms: int, max_query_tokens: int,
                           max_doc_tokens: int) -> int:
        """Score hits in stage-1 order; return how many (a prefix) were scored. With a budget: one batch-sized
        slice at a time while the budget lasts."""
        if budget_ms <= 0:
            slices = [(0, len(hits))]
        else:
            step = max(1, self.config.rerank_max_batch_size)
            slices = [(i, min(i + step, len(hits))) for i in range(0, len(hits), step)]
        started = time.perf_counter()
        slowest = 0.0
        done = 0
        for lo, hi in slices:
            if budget_ms > 0 and done:
                elapsed = (time.perf_counter() - started) * 1000.0
                if elapsed + slowest > budget_ms:
                    break
            t0 = time.perf_counter()
            scored = await self.reranker.score(query, texts[lo:hi], deadline=deadline,
                                               max_query_tokens=max_query_tokens, max_doc_tokens=max_doc_tokens,
                                               truncate=True, chunk_long=False, chunk_overlap=0)
            timing.rerank.tokenize_ms += scored.tokenize_ms
            timing.rerank.add(scored.stats)
            slowest = max(slowest, (time.perf_counter() - t0) * 1000.0)
            d = scored.documents
            for h, r, n in zip(hits[lo:hi], d.raw, d.normalized):
                h.rerank_score = float(r if raw else n)
                h.rerank_normalized = float(n)
                h.rerank_raw = float(r)
                h.reranked = True
            done = hi
        return done

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
                raise InvalidArgument(f"documents[{i}].embedding", f"has {len(d.embedding)} values; the index dimension is {dim}")
            if d.embedding and not all(math.isfinite(x) for x in d.embedding):
                raise InvalidArgument(f"documents[{i}].embedding", "contains NaN or infinite values")
            if d.embedding and cfg.index_metric == "cos" and not any(d.embedding):
                raise InvalidArgument(f"documents[{i}].embedding", "is all zeros, which has no direction under the cos metric")
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
            vectors[to_embed] = await self._embed_texts(texts, timing, deadline)
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
