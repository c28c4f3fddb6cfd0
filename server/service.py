"""The gRPC service: maps protobuf to Engine calls and domain errors to status codes. Nothing else."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from twostage.server import errors
from twostage.server.engine import DocumentInput, Engine, StageTiming, Timing
from twostage.v1 import twostage_pb2 as pb, twostage_pb2_grpc as pb_grpc

log = logging.getLogger("twostage.service")

# Trailing metadata of a RESOURCE_EXHAUSTED refusal by prediction: the predicted wait in ms (errors.ResourceExhausted).
PREDICTED_WAIT_KEY = "twostage-predicted-wait-ms"

# The one error -> status mapping.
STATUS_OF: dict[type, grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}

RETRIEVAL_MODE = {"dense": pb.RETRIEVAL_MODE_DENSE, "lexical": pb.RETRIEVAL_MODE_LEXICAL,
                  "hybrid": pb.RETRIEVAL_MODE_HYBRID}
MODE_NAME = {v: k for k, v in RETRIEVAL_MODE.items()}
FUSION = {"rrf": pb.FUSION_RRF, "convex": pb.FUSION_CONVEX}
FUSION_NAME = {v: k for k, v in FUSION.items()}
SCORE_KIND = {"normalized": pb.SCORE_KIND_NORMALIZED, "raw": pb.SCORE_KIND_RAW, "similarity": pb.SCORE_KIND_SIMILARITY}


def _stage_pb(s: StageTiming) -> pb.StageTiming:
    return pb.StageTiming(queue_ms=s.queue_ms, tokenize_ms=s.tokenize_ms, inference_ms=s.inference_ms,
                          batches=s.batches, items=s.items, tokens=s.tokens)


def timing_pb(t: Timing) -> pb.Timing:
    return pb.Timing(total_ms=t.total_ms, queue_ms=t.embed.queue_ms + t.rerank.queue_ms,
                     tokenize_ms=t.embed.tokenize_ms + t.rerank.tokenize_ms,
                     inference_ms=t.embed.inference_ms + t.rerank.inference_ms,
                     embed=_stage_pb(t.embed), ann_ms=t.ann_ms, rerank=_stage_pb(t.rerank), store_ms=t.store_ms,
                     lexical_ms=t.lexical_ms)


def struct_to_dict(s: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """Struct -> plain JSON-able dict (json_format); whole numbers below 2**53 come back as int (Struct
    holds every number as a double). Non-finite numbers are refused naming the field."""
    try:
        data = json_format.MessageToDict(s)
    except ValueError:  # json_format refuses NaN and infinity without saying where
        raise errors.InvalidArgument(_non_finite_field(s, field) or field,
                                     "numbers must be finite (NaN and infinity cannot be stored as JSON)") from None
    return {k: _whole_numbers_as_int(v) for k, v in data.items()}


def _whole_numbers_as_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers_as_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers_as_int(v) for v in value]
    return value


def _non_finite_field(value: struct_pb2.Struct | struct_pb2.ListValue, field: str) -> str | None:
    """Path of the first NaN or infinite number inside a Struct or ListValue (for the error message)."""
    items = ((f"{field}.{k}", v) for k, v in value.items()) if isinstance(value, struct_pb2.Struct) \
        else ((f"{field}[{i}]", v) for i, v in enumerate(value))
    for path, item in items:
        if isinstance(item, (struct_pb2.Struct, struct_pb2.ListValue)):
            found = _non_finite_field(item, path)
            if found:
                return found
        elif isinstance(item, float) and not math.isfinite(item):
            return path
    return None


def dict_to_struct(d: dict[str, Any] | None) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if d:
        s.update(d)
    return s


def _truncate(value: int) -> bool:
    if value not in pb.Truncation.values():
        raise errors.InvalidArgument("truncation",
                                     f"unknown value {value}; use TRUNCATION_END (1) or TRUNCATION_NONE (2)")
    return value != pb.TRUNCATION_NONE


def _enum_name(names: Mapping[Any, str], value: int, field: str) -> str:
    """The engine's name of a proto enum value; "" for UNSPECIFIED (= the server default)."""
    if value == 0:
        return ""
    if value not in names:
        raise errors.InvalidArgument(field, f"unknown value {value}; use one of {sorted(names)} (0 = server default)")
    return names[value]


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class TwoStageService(pb_grpc.TwoStageServicer):
    """Thin adapter. `engine` is None until models and index are loaded (RPCs then get UNAVAILABLE)."""

    def __init__(self, info: Callable[[Engine], pb.InfoResponse], metrics: Any = None):
        self.engine: Engine | None = None
        self.draining = False  # set at shutdown: new RPCs get UNAVAILABLE while in-flight ones finish
        self.active = 0
        self._info = info
        self._metrics = metrics

    async def _call(self, method: str, context: grpc.aio.ServicerContext,
                    work: Callable[[Engine], Awaitable[Any]]) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        if self.draining:
            code = grpc.StatusCode.UNAVAILABLE
            if self._metrics is not None:
                self._metrics.observe_rpc(method, code.name, 0.0)
            await context.abort(code, "the server is shutting down; retry on another replica or shortly")
        self.active += 1
        if self._metrics is not None:
            self._metrics.inflight.inc()
        try:
            if self.engine is None:
                raise errors.Unavailable("the server is still loading models and index; retry shortly")
            return await work(self.engine)
        except errors.TwoStageError as exc:
            code = STATUS_OF.get(type(exc), grpc.StatusCode.INTERNAL)
            wait_ms = getattr(exc, "predicted_wait_ms", None)
            trailing = ((PREDICTED_WAIT_KEY, f"{wait_ms:.1f}"),) if wait_ms is not None else ()
            await context.abort(code, str(exc), trailing_metadata=trailing)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # a bug: keep serving, say so
            code = grpc.StatusCode.INTERNAL
            log.exception("internal error in %s", method)
            await context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.active -= 1
            seconds = time.perf_counter() - started
            if self._metrics is not None:
                self._metrics.inflight.dec()
                self._metrics.observe_rpc(method, code.name, seconds)
            log.info("rpc", extra={"rpc": method, "code": code.name, "ms": round(seconds * 1000.0, 3)})

    # ------------------------------------------------------------------ RPCs
    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        arrived = time.monotonic()

        async def work(engine: Engine) -> pb.SearchResponse:
            out = await engine.search(
                request.query, top_k=request.top_k, candidates=request.candidates, skip_rerank=request.skip_rerank,
                filter=struct_to_dict(request.filter, "filter"), ids_only=request.ids_only,
                rerank_budget_ms=request.rerank_budget_ms, raw=request.raw_scores,
                max_query_tokens=request.max_query_tokens, max_doc_tokens=request.max_document_tokens,
                expansion_search=request.expansion_search,
                retrieval_mode=_enum_name(MODE_NAME, request.retrieval_mode, "retrieval_mode"),
                fusion_method=_enum_name(FUSION_NAME, request.fusion, "fusion"),
                fusion_weight=request.fusion_weight if request.HasField("fusion_weight") else None,
                rerank_weight=request.rerank_weight if request.HasField("rerank_weight") else None,
                deadline=_deadline(context), latency_budget_ms=request.latency_budget_ms, arrived=arrived)
            if out.budget_limited and self._metrics is not None:
                self._metrics.observe_budget_limited("Search")
            hits = []
            for h in out.hits:
                hit = pb.SearchHit(id=h.id, score=h.score, rerank_score=h.rerank_score,
                                   retrieval_score=h.retrieval_score, reranked=h.reranked,
                                   retrieval_rank=h.retrieval_rank,
                                   dense_score=h.dense_score or 0.0, lexical_score=h.lexical_score or 0.0,
                                   dense_rank=-1 if h.dense_rank is None else h.dense_rank,
                                   lexical_rank=-1 if h.lexical_rank is None else h.lexical_rank)
                if h.document is not None:
                    hit.document.CopyFrom(pb.Document(id=h.id, text=h.document.text, title=h.document.title,
                                                      metadata=dict_to_struct(h.document.metadata)))
                hits.append(hit)
            return pb.SearchResponse(hits=hits, score_kind=SCORE_KIND[out.score_kind], candidates=out.candidates,
                                     reranked=out.reranked, filter_exhausted=out.filter_exhausted,
                                     timing=timing_pb(out.timing), retrieval_mode=RETRIEVAL_MODE[out.retrieval_mode],
                                     budget_limited=out.budget_limited, rerank_weight=out.rerank_weight,
                                     latency_budget_ms=out.latency_budget_ms)
        return await self._call("Search", context, work)

    async def Rerank(self, request: pb.RerankRequest, context) -> pb.RerankResponse:
        arrived = time.monotonic()

        async def work(engine: Engine) -> pb.RerankResponse:
            out = await engine.rerank(
                request.query, texts=list(request.texts), document_ids=list(request.document_ids),
                top_n=request.top_n, return_documents=request.return_documents, raw=request.raw_scores,
                truncate=_truncate(request.truncation), max_query_tokens=request.max_query_tokens,
                max_doc_tokens=request.max_document_tokens, chunk_long=request.chunk_long_documents,
                chunk_overlap=request.chunk_overlap_tokens, deadline=_deadline(context),
                latency_budget_ms=request.latency_budget_ms, arrived=arrived,
                first_stage_scores=list(request.first_stage_scores),
                rerank_weight=request.rerank_weight if request.HasField("rerank_weight") else None)
            if out.budget_limited and self._metrics is not None:
                self._metrics.observe_budget_limited("Rerank")
            results = [pb.RerankResult(index=r.index, score=r.score, id=r.id, text=r.text, chunks=r.chunks,
                                       best_chunk=r.best_chunk, truncated=r.truncated, scored=r.scored)
                       for r in out.results]
            return pb.RerankResponse(results=results, score_kind=SCORE_KIND[out.score_kind],
                                     timing=timing_pb(out.timing), scored=out.scored,
                                     budget_limited=out.budget_limited, latency_budget_ms=out.latency_budget_ms)
        return await self._call("Rerank", context, work)

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        async def work(engine: Engine) -> pb.EmbedResponse:
            out = await engine.embed(list(request.texts), truncate=_truncate(request.truncation),
                                     deadline=_deadline(context))
            return pb.EmbedResponse(embeddings=[pb.Embedding(values=v.tolist()) for v in out.vectors],
                                    dimension=int(out.vectors.shape[1]), normalized=out.normalized,
                                    timing=timing_pb(out.timing))
        return await self._call("Embed", context, work)

    async def Upsert(self, request: pb.UpsertRequest, context) -> pb.UpsertResponse:
        async def work(engine: Engine) -> pb.UpsertResponse:
            docs = [DocumentInput(id=d.id, text=d.text, title=d.title,
                                  metadata=struct_to_dict(d.metadata, f"documents[{i}].metadata"),
                                  embedding=list(d.embedding)) for i, d in enumerate(request.documents)]
            out = await engine.upsert(docs, deadline=_deadline(context))
            if self._metrics is not None:
                self._metrics.index_size.set(out.index_size)
            return pb.UpsertResponse(inserted=out.inserted, updated=out.updated, index_size=out.index_size,
                                     timing=timing_pb(out.timing))
        return await self._call("Upsert", context, work)

    async def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteResponse:
        async def work(engine: Engine) -> pb.DeleteResponse:
            out = await engine.delete(list(request.ids))
            if self._metrics is not None:
                self._metrics.index_size.set(out.index_size)
            return pb.DeleteResponse(deleted=out.deleted, not_found=out.not_found, index_size=out.index_size,
                                     timing=timing_pb(out.timing))
        return await self._call("Delete", context, work)

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        async def work(engine: Engine) -> pb.InfoResponse:
            return self._info(engine)
        return await self._call("Info", context, work)
