"""The client's conversions between its types (client/types.py) and the generated protobuf messages:
request messages built from keyword options, results read back from responses. Shared by the sync and
the async client, which differ only in how they call the stub."""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from google.protobuf import json_format, struct_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import Message

from twostage.client.types import (BatchingInfo, Defaults, DeleteResult, Document, EmbedResult, IndexInfo, Info,
                                   JsonObject, JsonValue, Limits, ModelInfo, RerankResult, RerankResults,
                                   SearchHit, SearchResult, StageTiming, Timing, UpsertResult)
from twostage.v1 import twostage_pb2 as pb

T = TypeVar("T")


# ------------------------------------------------------------------------------------- JSON objects


def struct_from_dict(data: Mapping[str, JsonValue]) -> struct_pb2.Struct:
    """A JSON object as google.protobuf.Struct (json_format.ParseDict: refuses what JSON cannot hold)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"metadata/filter must be a JSON object (dict), got {type(data).__name__}")
    return json_format.ParseDict(dict(data), struct_pb2.Struct())


def dict_from_struct(message: struct_pb2.Struct) -> JsonObject:
    """google.protobuf.Struct as a dict (json_format.MessageToDict). Struct stores every number as a
    double; whole numbers come back as int so that JSON written as {"year": 2020} reads back the same."""
    data = json_format.MessageToDict(message)
    return {key: whole_numbers_as_int(value) for key, value in data.items()}


def whole_numbers_as_int(value: JsonValue) -> JsonValue:
    """Floats that hold a whole number exactly (below 2**53) as int, through lists and objects."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: whole_numbers_as_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers_as_int(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------- documents

_DOCUMENT_KEYS = {"id", "_id", "text", "title", "metadata", "embedding"}


def document_from_dict(data: Mapping[str, JsonValue]) -> Document:
    """A Document from a dict with keys id (or BEIR's _id), text, title, metadata, embedding."""
    unknown = sorted(set(data) - _DOCUMENT_KEYS)
    if unknown:
        raise ValueError(f"document {data.get('id', data.get('_id'))!r}: unknown keys {unknown}; "
                         f"allowed: {sorted(_DOCUMENT_KEYS)}")
    doc_id = data.get("id", data.get("_id"))
    if doc_id is None:
        raise ValueError("document: missing 'id' (or '_id')")
    text, title = _string_field(data, "text", doc_id), _string_field(data, "title", doc_id)
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise TypeError(f"document {doc_id!r}: metadata must be a JSON object (dict), got {type(metadata).__name__}")
    embedding = data.get("embedding")
    embedding = [] if embedding is None else embedding
    if not isinstance(embedding, (list, tuple)):
        raise TypeError(f"document {doc_id!r}: embedding must be a list of numbers, got {type(embedding).__name__}")
    return Document(id=str(doc_id), text=text, title=title, metadata=dict(metadata),
                    embedding=tuple(_number(x, doc_id) for x in embedding))


def _string_field(data: Mapping[str, JsonValue], key: str, doc_id: JsonValue) -> str:
    value = data.get(key) or ""
    if not isinstance(value, str):
        raise TypeError(f"document {doc_id!r}: {key} must be a string, got {type(value).__name__}")
    return value


def _number(value: JsonValue, doc_id: JsonValue) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"document {doc_id!r}: embedding values must be numbers, got {type(value).__name__}")
    return float(value)


def document_to_proto(doc: Document | Mapping[str, JsonValue]) -> pb.Document:
    if not isinstance(doc, Document):
        doc = document_from_dict(doc)
    message = pb.Document(id=doc.id, text=doc.text, title=doc.title, embedding=list(doc.embedding))
    if doc.metadata:
        message.metadata.CopyFrom(struct_from_dict(doc.metadata))
    return message


def document_from_proto(message: pb.Document) -> Document:
    return Document(id=message.id, text=message.text, title=message.title,
                    metadata=dict_from_struct(message.metadata), embedding=tuple(message.embedding))


# ---------------------------------------------------------------------------------- request building


def search_request(query: str, *, top_k: int = 0, candidates: int = 0, skip_rerank: bool = False,
                   filter: Mapping[str, JsonValue] | None = None, ids_only: bool = False, rerank_budget_ms: int = 0,
                   raw_scores: bool = False, max_query_tokens: int = 0, max_document_tokens: int = 0,
                   expansion_search: int = 0, retrieval_mode: str = "", fusion: str = "",
                   fusion_weight: float | None = None, rerank_weight: float | None = None,
                   latency_budget_ms: int = 0) -> pb.SearchRequest:
    request = pb.SearchRequest(query=query, top_k=top_k, candidates=candidates, skip_rerank=skip_rerank,
                               ids_only=ids_only, rerank_budget_ms=rerank_budget_ms, raw_scores=raw_scores,
                               max_query_tokens=max_query_tokens, max_document_tokens=max_document_tokens,
                               expansion_search=expansion_search, latency_budget_ms=latency_budget_ms,
                               retrieval_mode=_enum_value(pb.RetrievalMode, "RETRIEVAL_MODE_", retrieval_mode,
                                                          "retrieval_mode"),
                               fusion=_enum_value(pb.Fusion, "FUSION_", fusion, "fusion"))
    if fusion_weight is not None:
        request.fusion_weight = fusion_weight
    if rerank_weight is not None:
        request.rerank_weight = rerank_weight
    if filter:
        request.filter.CopyFrom(struct_from_dict(filter))
    return request


def _enum_value(enum: EnumTypeWrapper, prefix: str, name: str, field: str) -> int:
    """The proto enum value for an option name ("" = unspecified = the server default)."""
    if not name:
        return 0
    try:
        return int(enum.Value(prefix + name.upper()))
    except ValueError:
        names = [n.removeprefix(prefix).lower() for n in enum.keys() if not n.endswith("UNSPECIFIED")]
        raise ValueError(f"{field}: {name!r} is not one of {names}") from None


def _enum_name(enum: EnumTypeWrapper, prefix: str, value: int) -> str:
    return "" if value == 0 else str(enum.Name(value)).removeprefix(prefix).lower()


def truncation(truncate: bool) -> pb.Truncation:
    """truncate=True cuts over-long input at the end; False makes the server refuse it."""
    return pb.TRUNCATION_END if truncate else pb.TRUNCATION_NONE


def rerank_request(query: str, texts: Sequence[str] | None = None, *, document_ids: Sequence[str] | None = None,
                   top_n: int = 0, return_documents: bool = False, raw_scores: bool = False, truncate: bool = True,
                   max_query_tokens: int = 0, max_document_tokens: int = 0, chunk_long_documents: bool = False,
                   chunk_overlap_tokens: int = 0, latency_budget_ms: int = 0,
                   first_stage_scores: Sequence[float] | None = None,
                   rerank_weight: float | None = None) -> pb.RerankRequest:
    if isinstance(texts, str) or isinstance(document_ids, str):
        raise TypeError("rerank: texts and document_ids must be lists of strings, not a single string")
    request = pb.RerankRequest(query=query, texts=list(texts or ()), document_ids=list(document_ids or ()),
                               top_n=top_n, return_documents=return_documents, raw_scores=raw_scores,
                               truncation=truncation(truncate), max_query_tokens=max_query_tokens,
                               max_document_tokens=max_document_tokens, chunk_long_documents=chunk_long_documents,
                               chunk_overlap_tokens=chunk_overlap_tokens, latency_budget_ms=latency_budget_ms,
                               first_stage_scores=list(first_stage_scores or ()))
    if rerank_weight is not None:
        request.rerank_weight = rerank_weight
    return request


def embed_request(texts: Sequence[str], *, truncate: bool = True) -> pb.EmbedRequest:
    if isinstance(texts, str):
        raise TypeError("embed: texts must be a list of strings, not a single string")
    return pb.EmbedRequest(texts=list(texts), truncation=truncation(truncate))


def upsert_request(documents: Iterable[Document | Mapping[str, JsonValue]]) -> pb.UpsertRequest:
    return pb.UpsertRequest(documents=[document_to_proto(d) for d in documents])


def delete_request(ids: Sequence[str]) -> pb.DeleteRequest:
    if isinstance(ids, str):
        raise TypeError("delete: ids must be a list of strings, not a single string")
    return pb.DeleteRequest(ids=list(ids))


# ----------------------------------------------------------------------------------- result reading


def _from_flat_message(cls: type[T], message: Message) -> T:
    """A dataclass of scalar (and repeated scalar) fields from the proto message of the same shape."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # cls is a dataclass type; TypeVar cannot say so
        value = getattr(message, f.name)
        values[f.name] = tuple(value) if isinstance(f.default, tuple) else value
    return cls(**values)


def timing_from_proto(message: pb.Timing) -> Timing:
    return Timing(total_ms=message.total_ms, queue_ms=message.queue_ms, tokenize_ms=message.tokenize_ms,
                  inference_ms=message.inference_ms, embed=_from_flat_message(StageTiming, message.embed),
                  ann_ms=message.ann_ms, rerank=_from_flat_message(StageTiming, message.rerank),
                  store_ms=message.store_ms, lexical_ms=message.lexical_ms)


def score_kind_name(value: int) -> str:
    """ScoreKind enum value as "normalized", "raw", "similarity" or "unspecified"."""
    return pb.ScoreKind.Name(value).removeprefix("SCORE_KIND_").lower()


def search_result_from_proto(message: pb.SearchResponse) -> SearchResult:
    hits = tuple(
        SearchHit(id=h.id, score=h.score, rerank_score=h.rerank_score, retrieval_score=h.retrieval_score,
                  reranked=h.reranked, retrieval_rank=h.retrieval_rank,
                  document=document_from_proto(h.document) if h.HasField("document") else None,
                  dense_score=h.dense_score, lexical_score=h.lexical_score, dense_rank=h.dense_rank,
                  lexical_rank=h.lexical_rank)
        for h in message.hits)
    return SearchResult(hits=hits, score_kind=score_kind_name(message.score_kind), candidates=message.candidates,
                        reranked=message.reranked, filter_exhausted=message.filter_exhausted,
                        timing=timing_from_proto(message.timing),
                        retrieval_mode=_enum_name(pb.RetrievalMode, "RETRIEVAL_MODE_", message.retrieval_mode),
                        budget_limited=message.budget_limited, rerank_weight=message.rerank_weight,
                        latency_budget_ms=message.latency_budget_ms)


def rerank_results_from_proto(message: pb.RerankResponse) -> RerankResults:
    return RerankResults(results=tuple(_from_flat_message(RerankResult, r) for r in message.results),
                         score_kind=score_kind_name(message.score_kind), timing=timing_from_proto(message.timing),
                         scored=message.scored, budget_limited=message.budget_limited,
                         latency_budget_ms=message.latency_budget_ms)


def embed_result_from_proto(message: pb.EmbedResponse) -> EmbedResult:
    return EmbedResult(embeddings=tuple(tuple(e.values) for e in message.embeddings), dimension=message.dimension,
                       normalized=message.normalized, timing=timing_from_proto(message.timing))


def upsert_result_from_proto(message: pb.UpsertResponse) -> UpsertResult:
    return UpsertResult(inserted=message.inserted, updated=message.updated, index_size=message.index_size,
                        timing=timing_from_proto(message.timing))


def delete_result_from_proto(message: pb.DeleteResponse) -> DeleteResult:
    return DeleteResult(deleted=message.deleted, not_found=tuple(message.not_found), index_size=message.index_size,
                        timing=timing_from_proto(message.timing))


def info_from_proto(message: pb.InfoResponse) -> Info:
    return Info(server_version=message.server_version,
                bi_encoder=_from_flat_message(ModelInfo, message.bi_encoder),
                cross_encoder=_from_flat_message(ModelInfo, message.cross_encoder),
                embed_batching=_from_flat_message(BatchingInfo, message.embed_batching),
                rerank_batching=_from_flat_message(BatchingInfo, message.rerank_batching),
                index=_from_flat_message(IndexInfo, message.index),
                limits=_from_flat_message(Limits, message.limits),
                defaults=defaults_from_proto(message.defaults))


def defaults_from_proto(message: pb.Defaults) -> Defaults:
    return Defaults(top_k=message.top_k, candidates=message.candidates,
                    chunk_overlap_tokens=message.chunk_overlap_tokens, latency_budget_ms=message.latency_budget_ms,
                    retrieval_mode=_enum_name(pb.RetrievalMode, "RETRIEVAL_MODE_", message.retrieval_mode),
                    fusion=_enum_name(pb.Fusion, "FUSION_", message.fusion), fusion_weight=message.fusion_weight,
                    rerank_weight=message.rerank_weight)
