"""A thin typed client for the twostage gRPC service (sync `Client` and asyncio `AsyncClient`).

Requests are built from keyword arguments that mirror the proto fields (0 / False = server default);
responses come back as small frozen dataclasses with plain Python values (metadata as dicts), never raw
protobuf. Every call has a deadline (client default 30 s, overridable per call) that covers all of its
attempts. gRPC itself retries calls that fail with UNAVAILABLE (jittered exponential backoff, at most
4 attempts by default) and, given several servers, spreads calls over them (round_robin), calling only
servers whose health service reports twostage.v1.TwoStage SERVING (client-side health checking; off with
health_check=False): see client/channel.py. Every other failure is raised at once. All failures are raised as
`TwoStageError(code, message)`.

    with Client("127.0.0.1:50051", api_key="...") as client:
        client.wait_ready(timeout=60)
        for hit in client.search("why is the sky blue", top_k=5).hits:
            print(hit.id, hit.score, hit.document.text)

    Client(["10.0.0.1:50051", "10.0.0.2:50051"])   # replicas, or "10.0.0.1:50051,10.0.0.2:50051"
    Client("dns:///twostage.default.svc.cluster.local:50051")   # every address the name resolves to

The two classes share everything but the call itself: request building and result reading live in
client/convert.py, the channel settings in client/channel.py, and each public method is one line that
builds the request, calls the stub (awaited or not) and converts the response.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Self, TypeVar, Unpack

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twostage.client import convert
from twostage.client.channel import DEFAULT_TARGET, ClientOptions, Connection, connection
from twostage.client.types import (
    DeleteResult,
    Document,
    EmbedResult,
    Info,
    JsonValue,
    RerankOptions,
    RerankResults,
    SearchOptions,
    SearchResult,
    TwoStageError,
    UpsertResult,
)
from twostage.v1 import twostage_pb2 as pb, twostage_pb2_grpc as pb_grpc

ResponseT = TypeVar("ResponseT", bound=Message)


@dataclass(frozen=True)
class _Method(Generic[ResponseT]):
    """A unary method of the service: its stub attribute and its response type."""

    name: str
    response: type[ResponseT]

    def checked(self, response: object) -> ResponseT:
        if not isinstance(response, self.response):
            raise TwoStageError(grpc.StatusCode.INTERNAL, f"{self.name}: unexpected response "
                                                          f"{type(response).__name__}")
        return response


_SEARCH = _Method("Search", pb.SearchResponse)
_RERANK = _Method("Rerank", pb.RerankResponse)
_EMBED = _Method("Embed", pb.EmbedResponse)
_UPSERT = _Method("Upsert", pb.UpsertResponse)
_DELETE = _Method("Delete", pb.DeleteResponse)
_INFO = _Method("Info", pb.InfoResponse)


def error_from_rpc(err: grpc.RpcError) -> TwoStageError:
    """A gRPC failure as TwoStageError(code, details)."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return TwoStageError(code or grpc.StatusCode.UNKNOWN, details or "")


_HEALTH_POLL_S = 0.2
_HEALTH_CHECK_TIMEOUT_S = 2.0


class _ReadyWait:
    """One wait_ready: polls of the standard health service until SERVING or the timeout."""

    def __init__(self, target: str, service: str, timeout: float):
        self.target, self.service, self.timeout = target, service, timeout
        self.request = health_pb2.HealthCheckRequest(service=service)
        self.deadline = time.monotonic() + timeout
        self.last = "no answer"

    def check_timeout(self) -> float:
        """The deadline of the next check; raises DEADLINE_EXCEEDED naming the last state when time is up."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TwoStageError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"server {self.target} (health service {self.service!r}) not SERVING after "
                                f"{self.timeout:g} s; last: {self.last}")
        return min(remaining, _HEALTH_CHECK_TIMEOUT_S)

    def serving(self, reply: health_pb2.HealthCheckResponse) -> bool:
        self.last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def failed(self, err: grpc.RpcError) -> None:
        self.last = f"{err.code().name}: {err.details()}"

    def pause(self) -> float:
        return min(_HEALTH_POLL_S, max(self.deadline - time.monotonic(), 0.0))


class _ClientBase:
    """Options, channel settings and target shared by Client and AsyncClient."""

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, **options: Unpack[ClientOptions]):
        self._connection: Connection = connection(target, **options)

    @classmethod
    def connect(cls, target: str | Sequence[str] = DEFAULT_TARGET, **options: Unpack[ClientOptions]) -> Self:
        """Same as the constructor; reads better at call sites."""
        return cls(target, **options)

    @property
    def target(self) -> str:
        """The gRPC target the channel dials (several addresses become one ipv4:/ipv6: target)."""
        return self._connection.target

    def _timeout(self, timeout: float | None) -> float:
        return timeout or self._connection.timeout


_OPTIONS_DOC = """
    target: "host:port"; several "IP:PORT" (a list, or comma-separated) for replicas; or a URI gRPC
        resolves, e.g. "dns:///name:port" (every address of the name). Calls go round_robin over the
        servers that are up; a call that fails with UNAVAILABLE is retried, possibly on another one.
    Options (keyword; see twostage.client.channel.ClientOptions):
    timeout: default deadline of each call in seconds, covering all its attempts (per call: timeout=).
    api_key: sent as `authorization: Bearer <key>` metadata on every call.
    tls: use TLS with the system trust store (implied by any of the next four).
    root_certs, client_cert, client_key: PEM bytes or file paths (client_cert + client_key = mutual TLS).
    server_name: TLS server name to verify instead of the target's host (e.g. connecting by IP; set it
        with several targets).
    max_attempts: attempts per call while the server is UNAVAILABLE, 1-5 (shortcut for retry.max_attempts).
    retry: full retry policy (RetryPolicy: attempts and backoff times).
    max_message_bytes: largest message sent or received.
    health_check: True (default): gRPC watches each server's health service and calls only servers that
        report "twostage.v1.TwoStage" SERVING (not one still loading, draining, or cut off from its index
        backend); a server without a health service counts as serving, one whose health service does not
        know that name as not serving. False: call every server that accepts a connection.
"""


class Client(_ClientBase):
    __doc__ = "Synchronous twostage client; close() it or use it as a context manager.\n" + _OPTIONS_DOC

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, **options: Unpack[ClientOptions]):
        super().__init__(target, **options)
        c = self._connection
        self._channel = (grpc.insecure_channel(c.target, options=list(c.options)) if c.credentials is None
                         else grpc.secure_channel(c.target, c.credentials, options=list(c.options)))
        self._stub = pb_grpc.TwoStageStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: _Method[ResponseT], request: Message, timeout: float | None) -> ResponseT:
        try:
            response = getattr(self._stub, method.name)(request, timeout=self._timeout(timeout),
                                                        metadata=self._connection.metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return method.checked(response)

    def search(self, query: str, *, timeout: float | None = None, **options: Unpack[SearchOptions]) -> SearchResult:
        """Two-stage search. Options (SearchOptions): top_k, candidates, skip_rerank, filter (a JSON object),
        ids_only, rerank_budget_ms, raw_scores, max_query_tokens, max_document_tokens, expansion_search;
        left at 0/False they take the server defaults (see info().defaults)."""
        return convert.search_result_from_proto(self._call(_SEARCH, convert.search_request(query, **options), timeout))

    def rerank(self, query: str, texts: Sequence[str] | None = None, *, timeout: float | None = None,
               **options: Unpack[RerankOptions]) -> RerankResults:
        """Score the query against texts, or against stored documents by id; best first. Options
        (RerankOptions): document_ids, top_n, return_documents, raw_scores, truncate, max_query_tokens,
        max_document_tokens, chunk_long_documents, chunk_overlap_tokens."""
        request = convert.rerank_request(query, texts, **options)
        return convert.rerank_results_from_proto(self._call(_RERANK, request, timeout))

    def embed(self, texts: Sequence[str], *, truncate: bool = True, timeout: float | None = None) -> EmbedResult:
        """Bi-encoder embeddings, one per text, in order."""
        return convert.embed_result_from_proto(self._call(_EMBED, convert.embed_request(texts, truncate=truncate),
                                                          timeout))

    def upsert(self, documents: Iterable[Document | Mapping[str, JsonValue]], *,
               timeout: float | None = None) -> UpsertResult:
        """Insert or replace documents (Document objects or dicts with id/_id, text, title, metadata, embedding)."""
        return convert.upsert_result_from_proto(self._call(_UPSERT, convert.upsert_request(documents), timeout))

    def delete(self, ids: Sequence[str], *, timeout: float | None = None) -> DeleteResult:
        """Delete documents by id; unknown ids are reported in not_found."""
        return convert.delete_result_from_proto(self._call(_DELETE, convert.delete_request(ids), timeout))

    def info(self, *, timeout: float | None = None) -> Info:
        """Models, limits, defaults, batching and index state of the server."""
        return convert.info_from_proto(self._call(_INFO, pb.InfoRequest(), timeout))

    def wait_ready(self, timeout: float = 60.0, *, service: str = "") -> None:
        """Poll the standard gRPC health service until `service` ("" = the whole server) is SERVING;
        raise TwoStageError(DEADLINE_EXCEEDED) naming the last state seen when `timeout` passes. With
        health_check on, the channel reaches only servers whose twostage.v1.TwoStage is SERVING, so this
        also waits for that (meanwhile the last state is UNAVAILABLE "backend unhealthy")."""
        wait = _ReadyWait(self.target, service, timeout)
        while True:
            try:
                if wait.serving(self._health.Check(wait.request, timeout=wait.check_timeout(),
                                                   metadata=self._connection.metadata)):
                    return
            except grpc.RpcError as err:
                wait.failed(err)
            time.sleep(wait.pause())


class AsyncClient(_ClientBase):
    __doc__ = ("asyncio twostage client (grpc.aio); `await close()` it or use `async with`. Create it inside "
               "the event loop that uses it.\n" + _OPTIONS_DOC)

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, **options: Unpack[ClientOptions]):
        super().__init__(target, **options)
        c = self._connection
        self._channel = (grpc.aio.insecure_channel(c.target, options=list(c.options)) if c.credentials is None
                         else grpc.aio.secure_channel(c.target, c.credentials, options=list(c.options)))
        self._stub = pb_grpc.TwoStageStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: _Method[ResponseT], request: Message, timeout: float | None) -> ResponseT:
        try:
            response = await getattr(self._stub, method.name)(request, timeout=self._timeout(timeout),
                                                              metadata=self._connection.metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return method.checked(response)

    async def search(self, query: str, *, timeout: float | None = None,
                     **options: Unpack[SearchOptions]) -> SearchResult:
        """See Client.search."""
        return convert.search_result_from_proto(
            await self._call(_SEARCH, convert.search_request(query, **options), timeout))

    async def rerank(self, query: str, texts: Sequence[str] | None = None, *, timeout: float | None = None,
                     **options: Unpack[RerankOptions]) -> RerankResults:
        """See Client.rerank."""
        request = convert.rerank_request(query, texts, **options)
        return convert.rerank_results_from_proto(await self._call(_RERANK, request, timeout))

    async def embed(self, texts: Sequence[str], *, truncate: bool = True, timeout: float | None = None) -> EmbedResult:
        """See Client.embed."""
        return convert.embed_result_from_proto(
            await self._call(_EMBED, convert.embed_request(texts, truncate=truncate), timeout))

    async def upsert(self, documents: Iterable[Document | Mapping[str, JsonValue]], *,
                     timeout: float | None = None) -> UpsertResult:
        """See Client.upsert."""
        return convert.upsert_result_from_proto(await self._call(_UPSERT, convert.upsert_request(documents), timeout))

    async def delete(self, ids: Sequence[str], *, timeout: float | None = None) -> DeleteResult:
        """See Client.delete."""
        return convert.delete_result_from_proto(await self._call(_DELETE, convert.delete_request(ids), timeout))

    async def info(self, *, timeout: float | None = None) -> Info:
        """See Client.info."""
        return convert.info_from_proto(await self._call(_INFO, pb.InfoRequest(), timeout))

    async def wait_ready(self, timeout: float = 60.0, *, service: str = "") -> None:
        """See Client.wait_ready."""
        wait = _ReadyWait(self.target, service, timeout)
        while True:
            try:
                if wait.serving(await self._health.Check(wait.request, timeout=wait.check_timeout(),
                                                         metadata=self._connection.metadata)):
                    return
            except grpc.RpcError as err:
                wait.failed(err)
            await asyncio.sleep(wait.pause())
