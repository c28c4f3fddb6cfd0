"""How the client reaches the server: one gRPC channel per client, configured once.

gRPC does the retries and the load balancing itself, from the service config given to the channel
(`grpc.service_config`): calls that fail with UNAVAILABLE are retried with jittered exponential backoff
up to a bounded number of attempts, within the call's deadline, and with several servers (replicas)
the `round_robin` policy spreads calls over every one that is up. A retry may go to another replica,
so a replica that goes down costs no call that a retry can save. Nothing here loops or sleeps.

With health checking on (the default), gRPC also watches each server's standard health service
(grpc.health.v1 `Watch` of "twostage.v1.TwoStage", the server's readiness) and round_robin sends calls
only to servers that report SERVING: a replica that has opened its port but is still loading, or has
lost its backend, or is draining, gets no calls, so a call's retries cannot all land on it. Per gRPC's
health-checking spec, a server without the health service (Watch answers UNIMPLEMENTED) counts as
healthy; one that has the health service but does not list "twostage.v1.TwoStage" (SERVICE_UNKNOWN)
counts as not serving. Turn it off (`health_check=False`) for servers behind such a health service.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, Unpack

import grpc

from twostage.v1 import twostage_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 30.0
# Matches the server's default max_message_bytes; gRPC's own receive default (4 MiB) is too small for
# large Embed responses.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# gRPC clamps retryPolicy.maxAttempts at 5 (with a log line, not an error): refuse more instead.
MAX_ATTEMPTS_LIMIT = 5
# grpcio 1.85 can miss a retry timer of about a millisecond and then wait out the whole deadline
# (grpc/grpc#41036); 10 ms keeps clear of it.
MIN_BACKOFF_S = 0.01

# Target forms gRPC resolves itself (passed through unchanged).
RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TwoStage"].full_name

PemSource = bytes | str | os.PathLike[str]
ChannelOption = tuple[str, str | int]


class ServiceConfig(TypedDict, total=False):
    """gRPC's service config, as far as the client sets it (JSON field names of grpc.service_config.ServiceConfig)."""

    loadBalancingConfig: list[dict[str, dict[str, object]]]
    methodConfig: list[dict[str, object]]
    healthCheckConfig: dict[str, str]


@dataclass(frozen=True)
class RetryPolicy:
    """Retry on UNAVAILABLE only, by gRPC (the channel's service config). The wait after attempt n is
    about min(max_backoff_s, initial_backoff_s * multiplier**(n-1)), jittered by gRPC (grpcio's core
    draws it within +-20 % of that), and every attempt falls within the call's one deadline: when the
    deadline passes during a wait the call fails with DEADLINE_EXCEEDED. max_attempts counts the first
    attempt; 1 turns retries off."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT} (gRPC's limit), "
                             f"got {self.max_attempts}")
        if self.initial_backoff_s < MIN_BACKOFF_S or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(f"backoff times must satisfy {MIN_BACKOFF_S} s <= initial_backoff_s <= max_backoff_s "
                             f"(got {self.initial_backoff_s} and {self.max_backoff_s})")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1 (got {self.multiplier})")


def _duration(seconds: float) -> str:
    """Seconds as a protobuf JSON Duration ("0.1s", "2s")."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(retry: RetryPolicy, health_check: bool = True) -> ServiceConfig:
    """The channel's service config: round_robin over every address of the target (only those whose health
    service reports twostage.v1.TwoStage SERVING, when `health_check`), and the retry policy for every
    method of twostage.v1.TwoStage (none when retry.max_attempts is 1)."""
    method: dict[str, object] = {"name": [{"service": SERVICE_NAME}]}
    if retry.max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": retry.max_attempts,
            "initialBackoff": _duration(retry.initial_backoff_s),
            "maxBackoff": _duration(retry.max_backoff_s),
            "backoffMultiplier": retry.multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    config: ServiceConfig = {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method]}
    if health_check:
        config["healthCheckConfig"] = {"serviceName": SERVICE_NAME}
    return config


def channel_target(target: str | Sequence[str]) -> str:
    """One gRPC target string for one server or several replicas.

    One "host:port", or a URI that gRPC resolves itself (e.g. "dns:///name:port", whose DNS records may
    list every replica), is used as given. Several "host:port" (a list, or one string with commas)
    become one "ipv4:a:p,b:q" (or "ipv6:[a]:p,[b]:q") target; gRPC has no target form that lists host
    names, so each must be an IP address: for names, give one dns:/// target that resolves to all."""
    parts = [p.strip() for p in target.split(",")] if isinstance(target, str) else [str(p).strip() for p in target]
    if not parts or any(not p for p in parts):
        raise ValueError(f"target {target!r}: empty address (expected host:port, a list of them, or dns:///name:port)")
    if len(parts) == 1:
        return parts[0]
    addresses = [_ip_address(p) for p in parts]
    families = {version for version, _ in addresses}
    if len(families) > 1:
        raise ValueError(f"target {target!r}: mixes IPv4 and IPv6 addresses; gRPC takes one family per target")
    return f"ipv{families.pop()}:" + ",".join(address for _, address in addresses)


def _ip_address(part: str) -> tuple[int, str]:
    """(IP version, "address:port") of one element of a target list."""
    if part.startswith(RESOLVER_SCHEMES):
        raise ValueError(f"target {part!r}: a list of targets takes plain IP:PORT addresses, not resolver URIs")
    host, sep, port = part.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {part!r}: expected IP:PORT with a port from 1 to 65535")
    try:
        ip = ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        raise ValueError(f"target {part!r}: several targets must be IP addresses; for host names give one "
                         f"dns:///NAME:PORT target whose DNS records list every server") from None
    return ip.version, (f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")


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


class ClientOptions(TypedDict, total=False):
    """Options of Client and AsyncClient (after the target); defaults in brackets."""

    timeout: float                  # default deadline of each call in seconds, all its attempts included [30]
    api_key: str | None             # sent as `authorization: Bearer <key>` metadata on every call [none]
    tls: bool                       # TLS with the system trust store; implied by the next four [False]
    root_certs: PemSource | None    # PEM bytes or file path of the CA to trust [the system trust store]
    client_cert: PemSource | None   # with client_key: mutual TLS [none]
    client_key: PemSource | None
    server_name: str | None         # TLS name to verify instead of the target's host (e.g. by IP) [the host]
    max_attempts: int | None        # attempts per call while UNAVAILABLE, 1-5 (retry.max_attempts) [4]
    retry: RetryPolicy | None       # the whole retry policy [RetryPolicy()]
    max_message_bytes: int          # largest message sent or received [16 MiB]
    health_check: bool              # call only servers whose health service reports SERVING [True]


@dataclass(frozen=True)
class Connection:
    """Everything a client needs to open its channel and make calls."""

    target: str                         # the gRPC target string the channel dials
    timeout: float                      # default deadline of a call, seconds, all attempts included
    retry: RetryPolicy
    metadata: tuple[tuple[str, str], ...]
    credentials: grpc.ChannelCredentials | None
    options: tuple[ChannelOption, ...]


def connection(target: str | Sequence[str], **options: Unpack[ClientOptions]) -> Connection:
    """Check the client's options and turn them into channel settings."""
    unknown = sorted(set(options) - set(ClientOptions.__annotations__))
    if unknown:
        raise TypeError(f"unknown client options {unknown}; known: {sorted(ClientOptions.__annotations__)}")
    timeout = options.get("timeout", DEFAULT_TIMEOUT_S)
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds (got {timeout})")
    retry = options.get("retry") or RetryPolicy()
    max_attempts = options.get("max_attempts")
    if max_attempts is not None:
        retry = dataclasses.replace(retry, max_attempts=max_attempts)
    root_certs, client_cert, client_key = (options.get("root_certs"), options.get("client_cert"),
                                           options.get("client_key"))
    server_name = options.get("server_name")
    use_tls = options.get("tls", False) or any(x is not None
                                               for x in (root_certs, client_cert, client_key, server_name))
    credentials = channel_credentials(root_certs, client_cert, client_key) if use_tls else None
    max_message_bytes = options.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
    channel_options: list[ChannelOption] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),  # grpcio's default; stated because the retries depend on it
        ("grpc.service_config", json.dumps(service_config(retry, options.get("health_check", True)))),
        # The client's policy applies, not one a DNS TXT record might publish.
        ("grpc.service_config_disable_resolution", 1),
        # gRPC keeps a request for retrying only while it fits this buffer (256 KiB by default): let every
        # request the server accepts stay retryable, a large Upsert included.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
    ]
    if server_name:
        channel_options.append(("grpc.ssl_target_name_override", server_name))
    api_key = options.get("api_key")
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    return Connection(target=channel_target(target), timeout=float(timeout), retry=retry, metadata=metadata,
                      credentials=credentials, options=tuple(channel_options))
