"""A thin typed client for the twostage gRPC service (sync `Client` and asyncio `AsyncClient`).

Requests are built from keyword arguments that mirror the proto fields (0 / False = server default);
responses come back as small frozen dataclasses with plain Python values (metadata as dicts), never raw
protobuf. Every call has a deadline (client default 30 s, overridable per call) that covers all of its
attempts; calls that fail with UNAVAILABLE are retried with exponential backoff and full jitter, every
other failure is raised at once. All failures are raised as `TwoStageError(code, message)`.

    with Client("127.0.0.1:50051", api_key="...") as client:
        client.wait_ready(timeout=60)
        for hit in client.search("why is the sky blue", top_k=5).hits:
            print(hit.id, hit.score, hit.document.text)
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar, Union

import grpc
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twostage.v1 import twostage_pb2 as pb
from twostage.v1 import twostage_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 30.0
# Matches the server's default max_message_bytes; gRPC's own receive default (4 MiB) is too small for
# large Embed responses.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

PemSource = Union[bytes, str, os.PathLike]
T = TypeVar("T")


class TwoStageError(Exception):
    """A failed call: the gRPC status code and the server's (or the client's) message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")


# ------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Document:
    """A stored document. `metadata` is a JSON object; `embedding` is only sent by Upsert."""

    id: str
    text: str = ""
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    embedding: tuple[float, ...] = ()


@dataclass(frozen=True)
class StageTiming:
    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    inference_ms: float = 0.0
    batches: int = 0
    items: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Timing:
    """Where the server spent the time of one request (milliseconds)."""

    total_ms: float = 0.0
    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    inference_ms: float = 0.0
    embed: StageTiming = StageTiming()
    ann_ms: float = 0.0
    rerank: StageTiming = StageTiming()
    store_ms: float = 0.0


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
    rerank_score: float
    retrieval_score: float
    reranked: bool
    retrieval_rank: int
    document: Document | None  # None when ids_only


@dataclass(frozen=True)
class SearchResult:
    hits: tuple[SearchHit, ...]
    score_kind: str  # "normalized", "raw" or "similarity"
    candidates: int
    reranked: int
    filter_exhausted: bool
    timing: Timing


@dataclass(frozen=True)
class RerankResult:
    index: int
    score: float
    id: str
    text: str
    chunks: int
    best_chunk: int
    truncated: bool


@dataclass(frozen=True)
class RerankResults:
    results: tuple[RerankResult, ...]
    score_kind: str
    timing: Timing


@dataclass(frozen=True)
class EmbedResult:
    embeddings: tuple[tuple[float, ...], ...]
    dimension: int
    normalized: bool
    timing: Timing


@dataclass(frozen=True)
class UpsertResult:
    inserted: int
    updated: int
    index_size: int
    timing: Timing


@dataclass(frozen=True)
class DeleteResult:
    deleted: int
    not_found: tuple[str, ...]
    index_size: int
    timing: Timing


@dataclass(frozen=True)
class ModelInfo:
    role: str = ""
    name: str = ""
    source: str = ""
    revision: str = ""
    max_length: int = 0
    dimension: int = 0
    pooling: str = ""
    normalize: bool = False
    quantization: str = ""
    sha256: str = ""
    providers: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchingInfo:
    enabled: bool = False
    max_batch_tokens: int = 0
    max_batch_size: int = 0
    max_delay_ms: float = 0.0
    max_queued_tokens: int = 0


@dataclass(frozen=True)
class IndexInfo:
    size: int = 0
    dimension: int = 0
    metric: str = ""
    dtype: str = ""
    connectivity: int = 0
    expansion_add: int = 0
    expansion_search: int = 0
    read_only: bool = False


@dataclass(frozen=True)
class Limits:
    max_query_bytes: int = 0
    max_text_bytes: int = 0
    max_id_bytes: int = 0
    max_rerank_documents: int = 0
    max_embed_texts: int = 0
    max_upsert_documents: int = 0
    max_top_k: int = 0
    max_candidates: int = 0
    max_message_bytes: int = 0
    max_concurrent_rpcs: int = 0
    max_metadata_bytes: int = 0
    max_filter_keys: int = 0


@dataclass(frozen=True)
class Defaults:
    top_k: int = 0
    candidates: int = 0
    chunk_overlap_tokens: int = 0


@dataclass(frozen=True)
class Info:
    server_version: str
    bi_encoder: ModelInfo
    cross_encoder: ModelInfo
    embed_batching: BatchingInfo
    rerank_batching: BatchingInfo
    index: IndexInfo
    limits: Limits
    defaults: Defaults


def to_jsonable(value: Any) -> Any:
    """A result dataclass (or tuple/list of them) as plain JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    return value


# -------------------------------------------------------------------------------- proto conversion


def struct_from_dict(data: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    """A JSON object as google.protobuf.Struct (None stays None)."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise TypeError(f"metadata/filter must be a JSON object (dict), got {type(data).__name__}")
    message = struct_pb2.Struct()
    message.update(dict(data))
    return message


def dict_from_struct(message: struct_pb2.Struct) -> dict[str, Any]:
    """google.protobuf.Struct as a dict. Struct stores every number as a double; whole numbers come
    back as int so that JSON written as {"year": 2020} reads back the same."""
    return _whole_numbers_as_int(json_format.MessageToDict(message))


def _whole_numbers_as_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers_as_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers_as_int(v) for v in value]
    return value


_DOCUMENT_KEYS = {"id", "_id", "text", "title", "metadata", "embedding"}


def document_from_dict(data: Mapping[str, Any]) -> Document:
    """A Document from a dict with keys id (or BEIR's _id), text, title, metadata, embedding."""
    unknown = sorted(set(data) - _DOCUMENT_KEYS)
    if unknown:
        raise ValueError(f"document {data.get('id', data.get('_id'))!r}: unknown keys {unknown}; "
                         f"allowed: {sorted(_DOCUMENT_KEYS)}")
    doc_id = data.get("id", data.get("_id"))
    if doc_id is None:
        raise ValueError("document: missing 'id' (or '_id')")
    return Document(id=str(doc_id), text=data.get("text", "") or "", title=data.get("title", "") or "",
                    metadata=dict(data.get("metadata") or {}),
                    embedding=tuple(float(x) for x in data.get("embedding") or ()))


def document_to_proto(doc: Document | Mapping[str, Any]) -> pb.Document:
    if not isinstance(doc, Document):
        doc = document_from_dict(doc)
    message = pb.Document(id=doc.id, text=doc.text, title=doc.title, embedding=list(doc.embedding))
    if doc.metadata:
        message.metadata.CopyFrom(struct_from_dict(doc.metadata))
    return message


def document_from_proto(message: pb.Document) -> Document:
    return Document(id=message.id, text=message.text, title=message.title,
                    metadata=dict_from_struct(message.metadata), embedding=tuple(message.embedding))


def _from_flat_message(cls: type[T], message: Any) -> T:
    """A dataclass of scalar (and repeated scalar) fields from the proto message of the same shape."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(message, f.name)
        values[f.name] = tuple(value) if isinstance(f.default, tuple) else value
    return cls(**values)


def timing_from_proto(message: pb.Timing) -> Timing:
    return Timing(total_ms=message.total_ms, queue_ms=message.queue_ms, tokenize_ms=message.tokenize_ms,
                  inference_ms=message.inference_ms, embed=_from_flat_message(StageTiming, message.embed),
                  ann_ms=message.ann_ms, rerank=_from_flat_message(StageTiming, message.rerank),
                  store_ms=message.store_ms)


def score_kind_name(value: int) -> str:
    """ScoreKind enum value as "normalized", "raw", "similarity" or "unspecified"."""
    return pb.ScoreKind.Name(value).removeprefix("SCORE_KIND_").lower()


def search_result_from_proto(message: pb.SearchResponse) -> SearchResult:
    hits = tuple(
        SearchHit(id=h.id, score=h.score, rerank_score=h.rerank_score, retrieval_score=h.retrieval_score,
                  reranked=h.reranked, retrieval_rank=h.retrieval_rank,
                  document=document_from_proto(h.document) if h.HasField("document") else None)
        for h in message.hits)
    return SearchResult(hits=hits, score_kind=score_kind_name(message.score_kind), candidates=message.candidates,
                        reranked=message.reranked, filter_exhausted=message.filter_exhausted,
                        timing=timing_from_proto(message.timing))


def rerank_results_from_proto(message: pb.RerankResponse) -> RerankResults:
    return RerankResults(results=tuple(_from_flat_message(RerankResult, r) for r in message.results),
                         score_kind=score_kind_name(message.score_kind), timing=timing_from_proto(message.timing))


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
                defaults=_from_flat_message(Defaults, message.defaults))


# ---------------------------------------------------------------------------------- request building


def search_request(query: str, *, top_k: int = 0, candidates: int = 0, skip_rerank: bool = False,
                   filter: Mapping[str, Any] | None = None, ids_only: bool = False, rerank_budget_ms: int = 0,
                   raw_scores: bool = False, max_query_tokens: int = 0, max_document_tokens: int = 0,
                   expansion_search: int = 0) -> pb.SearchRequest:
    request = pb.SearchRequest(query=query, top_k=top_k, candidates=candidates, skip_rerank=skip_rerank,
                               ids_only=ids_only, rerank_budget_ms=rerank_budget_ms, raw_scores=raw_scores,
                               max_query_tokens=max_query_tokens, max_document_tokens=max_document_tokens,
                               expansion_search=expansion_search)
    if filter:
        request.filter.CopyFrom(struct_from_dict(filter))
    return request


def truncation(truncate: bool) -> int:
    """truncate=True cuts over-long input at the end; False makes the server refuse it."""
    return pb.TRUNCATION_END if truncate else pb.TRUNCATION_NONE


def rerank_request(query: str, texts: Sequence[str] | None = None, *, document_ids: Sequence[str] | None = None,
                   top_n: int = 0, return_documents: bool = False, raw_scores: bool = False, truncate: bool = True,
                   max_query_tokens: int = 0, max_document_tokens: int = 0, chunk_long_documents: bool = False,
                   chunk_overlap_tokens: int = 0) -> pb.RerankRequest:
    if isinstance(texts, str) or isinstance(document_ids, str):
        raise TypeError("rerank: texts and document_ids must be lists of strings, not a single string")
    return pb.RerankRequest(query=query, texts=list(texts or ()), document_ids=list(document_ids or ()), top_n=top_n,
                            return_documents=return_documents, raw_scores=raw_scores, truncation=truncation(truncate),
                            max_query_tokens=max_query_tokens, max_document_tokens=max_document_tokens,
                            chunk_long_documents=chunk_long_documents, chunk_overlap_tokens=chunk_overlap_tokens)


def embed_request(texts: Sequence[str], *, truncate: bool = True) -> pb.EmbedRequest:
    if isinstance(texts, str):
        raise TypeError("embed: texts must be a list of strings, not a single string")
    return pb.EmbedRequest(texts=list(texts), truncation=truncation(truncate))


def upsert_request(documents: Iterable[Document | Mapping[str, Any]]) -> pb.UpsertRequest:
    return pb.UpsertRequest(documents=[document_to_proto(d) for d in documents])


def delete_request(ids: Sequence[str]) -> pb.DeleteRequest:
    if isinstance(ids, str):
        raise TypeError("delete: ids must be a list of strings, not a single string")
    return pb.DeleteRequest(ids=list(ids))


# ------------------------------------------------------------------------------ connection settings


@dataclass(frozen=True)
class RetryPolicy:
    """Retry on UNAVAILABLE only: attempt n (1-based) is followed by a sleep drawn uniformly from
    [0, min(max_backoff_s, initial_backoff_s * multiplier**(n-1))] ("full jitter"), while the call's
    deadline leaves room for it."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 (got {self.max_attempts})")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoff times must be >= 0 and multiplier >= 1")

    def backoff_s(self, attempt: int) -> float:
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(0.0, ceiling)


def _read_pem(source: PemSource | None, what: str) -> bytes | None:
    """PEM bytes as given, or read from a file path."""
    if source is None or isinstance(source, bytes):
        return source
    path = Path(source)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from exc


def channel_credentials(root_certs: PemSource | None = None, client_cert: PemSource | None = None,
                        client_key: PemSource | None = None) -> grpc.ChannelCredentials:
    """TLS credentials; root_certs None = the system trust store. client_cert and client_key (mTLS)
    go together. Each is PEM bytes or a file path."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key must be given together (mutual TLS)")
    return grpc.ssl_channel_credentials(root_certificates=_read_pem(root_certs, "root_certs"),
                                        private_key=_read_pem(client_key, "client_key"),
                                        certificate_chain=_read_pem(client_cert, "client_cert"))


@dataclass(frozen=True)
class _Settings:
    target: str
    timeout: float
    retry: RetryPolicy
    metadata: tuple[tuple[str, str], ...]
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]


def _settings(target: str, *, timeout: float, api_key: str | None, tls: bool, root_certs: PemSource | None,
              client_cert: PemSource | None, client_key: PemSource | None, server_name: str | None,
              max_attempts: int | None, retry: RetryPolicy | None, max_message_bytes: int) -> _Settings:
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds (got {timeout})")
    if retry is None:
        retry = RetryPolicy() if max_attempts is None else RetryPolicy(max_attempts=max_attempts)
    elif max_attempts is not None:
        retry = dataclasses.replace(retry, max_attempts=max_attempts)
    use_tls = tls or any(x is not None for x in (root_certs, client_cert, client_key, server_name))
    credentials = channel_credentials(root_certs, client_cert, client_key) if use_tls else None
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    return _Settings(target=target, timeout=float(timeout), retry=retry, metadata=metadata,
                     credentials=credentials, options=tuple(options))


def _error_from_rpc(err: grpc.RpcError) -> TwoStageError:
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return TwoStageError(code or grpc.StatusCode.UNKNOWN, details or "")


_CLIENT_DOC = """
    target: "host:port" of the server.
    timeout: default deadline of each call in seconds, covering all its attempts (per call: timeout=).
    api_key: sent as `authorization: Bearer <key>` metadata on every call.
    tls: use TLS with the system trust store (implied by any of the next four).
    root_certs, client_cert, client_key: PEM bytes or file paths (client_cert + client_key = mutual TLS).
    server_name: TLS server name to verify instead of the target's host (e.g. connecting by IP).
    max_attempts: attempts per call when the server is UNAVAILABLE (shortcut for retry.max_attempts).
    retry: full retry policy (backoff times).
    max_message_bytes: largest message sent or received.
"""


class Client:
    __doc__ = "Synchronous twostage client; close() it or use it as a context manager.\n" + _CLIENT_DOC

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = DEFAULT_TIMEOUT_S,
                 api_key: str | None = None, tls: bool = False, root_certs: PemSource | None = None,
                 client_cert: PemSource | None = None, client_key: PemSource | None = None,
                 server_name: str | None = None, max_attempts: int | None = None, retry: RetryPolicy | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self._settings = _settings(target, timeout=timeout, api_key=api_key, tls=tls, root_certs=root_certs,
                                   client_cert=client_cert, client_key=client_key, server_name=server_name,
                                   max_attempts=max_attempts, retry=retry, max_message_bytes=max_message_bytes)
        s = self._settings
        if s.credentials is None:
            self._channel = grpc.insecure_channel(target, options=list(s.options))
        else:
            self._channel = grpc.secure_channel(target, s.credentials, options=list(s.options))
        self._stub = pb_grpc.TwoStageStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @classmethod
    def connect(cls, target: str = DEFAULT_TARGET, **options: Any) -> "Client":
        """Same as the constructor; reads better at call sites."""
        return cls(target, **options)

    @property
    def target(self) -> str:
        return self._settings.target

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing
    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        s = self._settings
        deadline = time.monotonic() + (timeout or s.timeout)
        rpc = getattr(self._stub, method)
        attempt = 1
        while True:
            try:
                return rpc(request, timeout=max(deadline - time.monotonic(), 0.001), metadata=s.metadata)
            except grpc.RpcError as err:
                delay = _retry_delay(err, attempt, s.retry, deadline)
                if delay is None:
                    raise _error_from_rpc(err) from err
            time.sleep(delay)
            attempt += 1

    # -- the service
    def search(self, query: str, *, top_k: int = 0, candidates: int = 0, skip_rerank: bool = False,
               filter: Mapping[str, Any] | None = None, ids_only: bool = False, rerank_budget_ms: int = 0,
               raw_scores: bool = False, max_query_tokens: int = 0, max_document_tokens: int = 0,
               expansion_search: int = 0, timeout: float | None = None) -> SearchResult:
        """Two-stage search; fields left at 0/False take the server defaults (see info().defaults)."""
        request = search_request(query, top_k=top_k, candidates=candidates, skip_rerank=skip_rerank, filter=filter,
                                 ids_only=ids_only, rerank_budget_ms=rerank_budget_ms, raw_scores=raw_scores,
                                 max_query_tokens=max_query_tokens, max_document_tokens=max_document_tokens,
                                 expansion_search=expansion_search)
        return search_result_from_proto(self._call("Search", request, timeout))

    def rerank(self, query: str, texts: Sequence[str] | None = None, *, document_ids: Sequence[str] | None = None,
               top_n: int = 0, return_documents: bool = False, raw_scores: bool = False, truncate: bool = True,
               max_query_tokens: int = 0, max_document_tokens: int = 0, chunk_long_documents: bool = False,
               chunk_overlap_tokens: int = 0, timeout: float | None = None) -> RerankResults:
        """Score the query against texts, or against stored documents by id; best first."""
        request = rerank_request(query, texts, document_ids=document_ids, top_n=top_n,
                                 return_documents=return_documents, raw_scores=raw_scores, truncate=truncate,
                                 max_query_tokens=max_query_tokens, max_document_tokens=max_document_tokens,
                                 chunk_long_documents=chunk_long_documents, chunk_overlap_tokens=chunk_overlap_tokens)
        return rerank_results_from_proto(self._call("Rerank", request, timeout))

    def embed(self, texts: Sequence[str], *, truncate: bool = True, timeout: float | None = None) -> EmbedResult:
        """Bi-encoder embeddings, one per text, in order."""
        return embed_result_from_proto(self._call("Embed", embed_request(texts, truncate=truncate), timeout))

    def upsert(self, documents: Iterable[Document | Mapping[str, Any]], *,
               timeout: float | None = None) -> UpsertResult:
        """Insert or replace documents (Document objects or dicts with id/_id, text, title, metadata, embedding)."""
        return upsert_result_from_proto(self._call("Upsert", upsert_request(documents), timeout))

    def delete(self, ids: Sequence[str], *, timeout: float | None = None) -> DeleteResult:
        """Delete documents by id; unknown ids are reported in not_found."""
        return delete_result_from_proto(self._call("Delete", delete_request(ids), timeout))

    def info(self, *, timeout: float | None = None) -> Info:
        """Models, limits, defaults, batching and index state of the server."""
        return info_from_proto(self._call("Info", pb.InfoRequest(), timeout))

    def wait_ready(self, timeout: float = 60.0, *, service: str = "") -> None:
        """Poll the standard gRPC health service until `service` ("" = the whole server) is SERVING;
        raise TwoStageError(DEADLINE_EXCEEDED) naming the last state seen when `timeout` passes."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _not_ready(self.target, service, timeout, last)
            try:
                reply = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                           timeout=min(remaining, 2.0), metadata=self._settings.metadata)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            time.sleep(min(_HEALTH_POLL_S, max(deadline - time.monotonic(), 0)))


_HEALTH_POLL_S = 0.2


def _not_ready(target: str, service: str, timeout: float, last: str) -> TwoStageError:
    return TwoStageError(grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"server {target} (health service {service!r}) not SERVING after {timeout:g} s; last: {last}")


def _retry_delay(err: grpc.RpcError, attempt: int, retry: RetryPolicy, deadline: float) -> float | None:
    """Seconds to sleep before the next attempt, or None when the error must be raised now."""
    if err.code() != grpc.StatusCode.UNAVAILABLE or attempt >= retry.max_attempts:
        return None
    delay = retry.backoff_s(attempt)
    if time.monotonic() + delay >= deadline:
        return None
    return delay


class AsyncClient:
    __doc__ = ("asyncio twostage client (grpc.aio); `await close()` it or use `async with`. Create it inside "
               "the event loop that uses it.\n" + _CLIENT_DOC)

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = DEFAULT_TIMEOUT_S,
                 api_key: str | None = None, tls: bool = False, root_certs: PemSource | None = None,
                 client_cert: PemSource | None = None, client_key: PemSource | None = None,
                 server_name: str | None = None, max_attempts: int | None = None, retry: RetryPolicy | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self._settings = _settings(target, timeout=timeout, api_key=api_key, tls=tls, root_certs=root_certs,
                                   client_cert=client_cert, client_key=client_key, server_name=server_name,
                                   max_attempts=max_attempts, retry=retry, max_message_bytes=max_message_bytes)
        s = self._settings
        if s.credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=list(s.options))
        else:
            self._channel = grpc.aio.secure_channel(target, s.credentials, options=list(s.options))
        self._stub = pb_grpc.TwoStageStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @classmethod
    def connect(cls, target: str = DEFAULT_TARGET, **options: Any) -> "AsyncClient":
        return cls(target, **options)

    @property
    def target(self) -> str:
        return self._settings.target

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        s = self._settings
        deadline = time.monotonic() + (timeout or s.timeout)
        rpc = getattr(self._stub, method)
        attempt = 1
        while True:
            try:
                return await rpc(request, timeout=max(deadline - time.monotonic(), 0.001), metadata=s.metadata)
            except grpc.RpcError as err:
                delay = _retry_delay(err, attempt, s.retry, deadline)
                if delay is None:
                    raise _error_from_rpc(err) from err
            await asyncio.sleep(delay)
            attempt += 1

    async def search(self, query: str, *, top_k: int = 0, candidates: int = 0, skip_rerank: bool = False,
                     filter: Mapping[str, Any] | None = None, ids_only: bool = False, rerank_budget_ms: int = 0,
                     raw_scores: bool = False, max_query_tokens: int = 0, max_document_tokens: int = 0,
                     expansion_search: int = 0, timeout: float | None = None) -> SearchResult:
        """See Client.search."""
        request = search_request(query, top_k=top_k, candidates=candidates, skip_rerank=skip_rerank, filter=filter,
                                 ids_only=ids_only, rerank_budget_ms=rerank_budget_ms, raw_scores=raw_scores,
                                 max_query_tokens=max_query_tokens, max_document_tokens=max_document_tokens,
                                 expansion_search=expansion_search)
        return search_result_from_proto(await self._call("Search", request, timeout))

    async def rerank(self, query: str, texts: Sequence[str] | None = None, *,
                     document_ids: Sequence[str] | None = None, top_n: int = 0, return_documents: bool = False,
                     raw_scores: bool = False, truncate: bool = True, max_query_tokens: int = 0,
                     max_document_tokens: int = 0, chunk_long_documents: bool = False,
                     chunk_overlap_tokens: int = 0, timeout: float | None = None) -> RerankResults:
        """See Client.rerank."""
        request = rerank_request(query, texts, document_ids=document_ids, top_n=top_n,
                                 return_documents=return_documents, raw_scores=raw_scores, truncate=truncate,
                                 max_query_tokens=max_query_tokens, max_document_tokens=max_document_tokens,
                                 chunk_long_documents=chunk_long_documents, chunk_overlap_tokens=chunk_overlap_tokens)
        return rerank_results_from_proto(await self._call("Rerank", request, timeout))

    async def embed(self, texts: Sequence[str], *, truncate: bool = True, timeout: float | None = None) -> EmbedResult:
        """See Client.embed."""
        return embed_result_from_proto(await self._call("Embed", embed_request(texts, truncate=truncate), timeout))

    async def upsert(self, documents: Iterable[Document | Mapping[str, Any]], *,
                     timeout: float | None = None) -> UpsertResult:
        """See Client.upsert."""
        return upsert_result_from_proto(await self._call("Upsert", upsert_request(documents), timeout))

    async def delete(self, ids: Sequence[str], *, timeout: float | None = None) -> DeleteResult:
        """See Client.delete."""
        return delete_result_from_proto(await self._call("Delete", delete_request(ids), timeout))

    async def info(self, *, timeout: float | None = None) -> Info:
        """See Client.info."""
        return info_from_proto(await self._call("Info", pb.InfoRequest(), timeout))

    async def wait_ready(self, timeout: float = 60.0, *, service: str = "") -> None:
        """See Client.wait_ready."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _not_ready(self.target, service, timeout, last)
            try:
                reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                                 timeout=min(remaining, 2.0), metadata=self._settings.metadata)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            await asyncio.sleep(min(_HEALTH_POLL_S, max(deadline - time.monotonic(), 0)))
