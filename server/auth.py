"""Ingress protection for the gRPC server: API-key access control, a bound on calls in progress and a guard for
undecodable requests.

Clients send ``authorization: Bearer <key>`` metadata. Two key sets come from the config:

- ``read_api_keys`` may call the read RPCs (Search, Rerank, Embed, Info);
- ``write_api_keys`` may call everything, including the write RPCs (Upsert, Delete).

The gRPC health service (``grpc.health.v1.Health``) and server reflection stay reachable without a key,
so that load balancers and ``grpcurl`` can probe the server. Every other method, including methods this
module does not know, needs a key (fail closed): a missing or unknown key gets UNAUTHENTICATED, a read
key on a write RPC gets PERMISSION_DENIED. With no keys configured at all, auth is off and
`ApiKeyInterceptor.from_config` returns None.

Keys are compared in constant time: the presented key and every configured key are reduced to SHA-256
digests (so that key lengths do not leak either) and compared with `hmac.compare_digest`, over all keys,
without stopping at the first match. Keys are never logged; refusals are logged with the method and the
reason only.

`ConcurrencyLimitInterceptor` bounds the twostage.v1.TwoStage RPCs in progress (``max_concurrent_rpcs``): one
past the bound gets RESOURCE_EXHAUSTED before its request is decoded. Health and reflection streams are not
counted: a client that checks health holds one Watch stream for as long as its channel lives, and those must
not use up the slots of real calls (gRPC's own `maximum_concurrent_rpcs` counts every stream alike).

`DecodeGuardInterceptor` makes a request that cannot be decoded (e.g. a Struct nested deeper than the
protobuf decoder allows) answer INVALID_ARGUMENT instead of gRPC's default UNKNOWN: it parses the request
itself and hands the parsed message to the real handler.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger("twostage.auth")

TWOSTAGE_SERVICE = "twostage.v1.TwoStage"
READ_METHODS = frozenset({"Search", "Rerank", "Embed", "Info"})
WRITE_METHODS = frozenset({"Upsert", "Delete"})
# Services reachable without a key (probes and tooling).
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})
AUTH_HEADER = "authorization"
SCHEME = "bearer"


class Access(enum.IntEnum):
    """What a presented key allows; ordered so that `have >= need` is the check."""

    NONE = 0
    READ = 1
    WRITE = 2


def required_access(method: str) -> Access:
    """The access a full gRPC method name (``/package.Service/Method``) needs; NONE for open services.

    Unknown methods, of this service or any other, need WRITE (fail closed).
    """
    service, _, name = method.lstrip("/").rpartition("/")
    if service in OPEN_SERVICES:
        return Access.NONE
    if service == TWOSTAGE_SERVICE and name in READ_METHODS:
        return Access.READ
    return Access.WRITE


def bearer_token(metadata: Iterable[Any] | None) -> str | None:
    """The key from ``authorization: Bearer <key>`` metadata, or None when absent or malformed.

    The scheme is matched case-insensitively; with several authorization entries the first one counts.
    """
    for item in metadata or ():
        key, value = item[0], item[1]
        if key.lower() != AUTH_HEADER:
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != SCHEME or not token:
            return None
        return token
    return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The configured read and write keys, stored as digests; `access_of` checks one presented key."""

    def __init__(self, read_keys: Sequence[str], write_keys: Sequence[str]):
        for name, keys in (("read_api_keys", read_keys), ("write_api_keys", write_keys)):
            for i, key in enumerate(keys):
                if not key or key != key.strip() or any(c.isspace() for c in key):
                    raise ValueError(f"{name}[{i}]: an API key must be non-empty and contain no whitespace")
        self._read = [_digest(k) for k in read_keys]
        self._write = [_digest(k) for k in write_keys]

    @property
    def enabled(self) -> bool:
        return bool(self._read or self._write)

    def access_of(self, presented: str | None) -> Access:
        """WRITE for a write key, READ for a read key, NONE otherwise. Time does not depend on which key
        matched or where: every configured key is compared, with no early exit."""
        candidate = _digest(presented if presented is not None else "")
        is_read = 0
        for digest in self._read:
            is_read |= hmac.compare_digest(candidate, digest)
        is_write = 0
        for digest in self._write:
            is_write |= hmac.compare_digest(candidate, digest)
        if is_write:
            return Access.WRITE
        if is_read:
            return Access.READ
        return Access.NONE


RpcObserver = Callable[[str, str, float], None]


def _refusal(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts; the request is never deserialized."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    request_streaming = bool(handler and handler.request_streaming)
    response_streaming = bool(handler and handler.response_streaming)
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Checks ``authorization: Bearer <key>`` on every RPC except health and reflection.

    `observe_rpc(method, code_name, seconds)` (e.g. `Metrics.observe_rpc`) is told about each refusal,
    since refused RPCs never reach the service.
    """

    def __init__(self, read_keys: Sequence[str], write_keys: Sequence[str], observe_rpc: RpcObserver | None = None):
        self.keys = ApiKeys(read_keys, write_keys)
        self.observe_rpc = observe_rpc

    @classmethod
    def from_config(cls, config: Any, observe_rpc: RpcObserver | None = None) -> ApiKeyInterceptor | None:
        """The interceptor for `config.read_api_keys` / `config.write_api_keys`; None when both are empty."""
        if not config.read_api_keys and not config.write_api_keys:
            return None
        return cls(config.read_api_keys, config.write_api_keys, observe_rpc)

    async def intercept_service(self,
                                continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        started = time.perf_counter()
        method = handler_call_details.method
        need = required_access(method)
        if need is Access.NONE:
            return await continuation(handler_call_details)
        have = self.keys.access_of(bearer_token(handler_call_details.invocation_metadata))
        if have >= need:
            return await continuation(handler_call_details)
        if have is Access.NONE:
            code = grpc.StatusCode.UNAUTHENTICATED
            message = "missing or unknown API key: send metadata 'authorization: Bearer <key>'"
        else:
            code = grpc.StatusCode.PERMISSION_DENIED
            message = f"{method.rsplit('/', 1)[-1]} needs a write API key; this key may only read"
        log.info("rpc refused", extra={"rpc": method, "code": code.name})
        if self.observe_rpc is not None:
            self.observe_rpc(method.rsplit("/", 1)[-1], code.name, time.perf_counter() - started)
        return _refusal(await continuation(handler_call_details), code, message)


class ConcurrencyLimitInterceptor(grpc.aio.ServerInterceptor):
    """At most `limit` unary RPCs of `service` in progress at once (module docstring); `active` is how many are."""

    def __init__(self, limit: int, service: str, observe_rpc: RpcObserver | None = None):
        if limit <= 0:
            raise ValueError(f"max_concurrent_rpcs must be > 0 (got {limit})")
        self.limit = limit
        self.prefix = f"/{service}/"
        self.observe_rpc = observe_rpc
        self.active = 0

    async def intercept_service(self,
                                continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if (not handler_call_details.method.startswith(self.prefix) or handler is None
                or handler.request_streaming or handler.response_streaming or handler.unary_unary is None):
            return handler
        behaviour = handler.unary_unary
        method = handler_call_details.method.rsplit("/", 1)[-1]

        async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.active >= self.limit:
                if self.observe_rpc is not None:
                    self.observe_rpc(method, grpc.StatusCode.RESOURCE_EXHAUSTED.name, 0.0)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"the server is serving max_concurrent_rpcs={self.limit} calls; retry shortly "
                                    "or on another replica")
            self.active += 1
            try:
                return await behaviour(request, context)
            finally:
                self.active -= 1

        return grpc.unary_unary_rpc_method_handler(limited, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Unary requests that fail to decode get INVALID_ARGUMENT (gRPC's own deserializer answers UNKNOWN).

    Streaming handlers (health Watch, reflection) are passed through unchanged.
    """

    async def intercept_service(self,
                                continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if (handler is None or handler.request_streaming or handler.response_streaming
                or handler.request_deserializer is None or handler.unary_unary is None):
            return handler
        parse = handler.request_deserializer
        behaviour = handler.unary_unary
        method = handler_call_details.method.rsplit("/", 1)[-1]

        async def guarded(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                request = parse(raw)
            except DecodeError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{method} request could not be decoded: {exc}")
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded, request_deserializer=None,
                                                   response_serializer=handler.response_serializer)
