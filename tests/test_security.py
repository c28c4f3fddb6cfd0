"""Access control: API keys (read / write), TLS and mutual TLS, message-size limits.

Three layers of tests:

1. `twostage.server.auth` on its own (method -> access, header parsing, constant-time key check);
2. the interceptor in front of the real `TwoStageService` on a real grpc.aio server with no models loaded
   (authorised calls then answer UNAVAILABLE "still loading", refused ones UNAUTHENTICATED /
   PERMISSION_DENIED) - this needs nothing but the interceptor;
3. the whole server (`ServerThread` + `tiny_models`): API keys configured through the Config (needs the
   interceptor wired into `app.start_server`), TLS and mTLS with certificates generated here with the
   `openssl` command line, and the max message size on receive and send.
"""
from __future__ import annotations

import asyncio
import logging
import math
import shutil
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from server_harness import ServerThread, make_config
from twostage.server import auth
from twostage.server.auth import (Access, ApiKeyInterceptor, ApiKeys, DecodeGuardInterceptor, bearer_token,
                                  required_access)
from twostage.server.service import TwoStageService
from twostage.v1 import twostage_pb2 as pb
from twostage.v1 import twostage_pb2_grpc as pb_grpc

READ_KEY = "read-key-3f9c1e7a"
WRITE_KEY = "write-key-8b2d4c6e"
OTHER_READ_KEY = "read-key-second-51aa"
SERVICE = "twostage.v1.TwoStage"


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


# ------------------------------------------------------------------------------------------------ unit
@pytest.mark.parametrize("method,need", [
    ("/twostage.v1.TwoStage/Search", Access.READ),
    ("/twostage.v1.TwoStage/Rerank", Access.READ),
    ("/twostage.v1.TwoStage/Embed", Access.READ),
    ("/twostage.v1.TwoStage/Info", Access.READ),
    ("/twostage.v1.TwoStage/Upsert", Access.WRITE),
    ("/twostage.v1.TwoStage/Delete", Access.WRITE),
    ("/twostage.v1.TwoStage/SomethingNew", Access.WRITE),   # unknown method: fail closed
    ("/other.Service/Search", Access.WRITE),                 # same name, other service
    ("/grpc.health.v1.Health/Check", Access.NONE),
    ("/grpc.health.v1.Health/Watch", Access.NONE),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Access.NONE),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Access.NONE),
])
def test_required_access_per_method(method, need):
    assert required_access(method) is need


@pytest.mark.parametrize("metadata,token", [
    ((("authorization", "Bearer abc"),), "abc"),
    ((("authorization", "bearer   abc  "),), "abc"),
    ((("Authorization", "BEARER abc"),), "abc"),
    ((("x-other", "1"), ("authorization", "Bearer abc")), "abc"),
    ((("authorization", "Basic abc"),), None),
    ((("authorization", "Bearer"),), None),
    ((("authorization", "Bearer   "),), None),
    ((("authorization", "abc"),), None),
    ((), None),
    (None, None),
])
def test_bearer_token_parsing(metadata, token):
    assert bearer_token(metadata) == token


def test_api_keys_grant_read_write_or_nothing():
    keys = ApiKeys([READ_KEY, OTHER_READ_KEY], [WRITE_KEY])
    assert keys.enabled
    assert keys.access_of(READ_KEY) is Access.READ
    assert keys.access_of(OTHER_READ_KEY) is Access.READ
    assert keys.access_of(WRITE_KEY) is Access.WRITE
    assert keys.access_of(None) is Access.NONE
    assert keys.access_of("") is Access.NONE
    assert keys.access_of(READ_KEY + "x") is Access.NONE
    assert keys.access_of(READ_KEY[:-1]) is Access.NONE
    assert not ApiKeys([], []).enabled


@pytest.mark.parametrize("bad", ["", " padded", "has space", "tab\tkey"])
def test_api_keys_refuse_unusable_keys(bad):
    with pytest.raises(ValueError, match="read_api_keys\\[0\\]"):
        ApiKeys([bad], [])


def test_key_check_compares_every_key_without_early_exit(monkeypatch):
    """Constant time: the number of comparisons does not depend on whether or where a key matches."""
    reads = [f"read-{i}" for i in range(5)]
    writes = [f"write-{i}" for i in range(3)]
    keys = ApiKeys(reads, writes)
    calls: list[tuple[int, int]] = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented in [reads[0], reads[-1], writes[0], writes[-1], "nope", None, "x" * 1000]:
        calls.clear()
        keys.access_of(presented)
        assert len(calls) == len(reads) + len(writes), presented
        assert all(a == b == 32 for a, b in calls), "digests of equal length are compared, not the raw keys"


def test_interceptor_from_config_is_off_without_keys():
    cfg = make_config(Path("m"), Path("i"))
    assert ApiKeyInterceptor.from_config(cfg) is None
    cfg = make_config(Path("m"), Path("i"), read_api_keys=[READ_KEY])
    assert isinstance(ApiKeyInterceptor.from_config(cfg), ApiKeyInterceptor)


# ------------------------------------------------------------ interceptor on a real server, no models
class GateServer:
    """A grpc.aio server with the interceptors (API keys, then the decode guard) in front of the real
    TwoStageService (no engine loaded), health and reflection, on its own event loop thread."""

    def __init__(self, interceptor: ApiKeyInterceptor):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.refusals: list[tuple[str, str]] = []
        self.port = asyncio.run_coroutine_threadsafe(self._start(interceptor), self.loop).result(30)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    async def _start(self, interceptor: ApiKeyInterceptor) -> int:
        self.server = grpc.aio.server(interceptors=[interceptor, DecodeGuardInterceptor()])
        self.service = TwoStageService(info=lambda engine: pb.InfoResponse())
        pb_grpc.add_TwoStageServicer_to_server(self.service, self.server)
        hs = health.aio.HealthServicer()
        await hs.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(hs, self.server)
        reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def stop(self) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def gate():
    refusals: list[tuple[str, str]] = []
    srv = GateServer(ApiKeyInterceptor([READ_KEY, OTHER_READ_KEY], [WRITE_KEY],
                                       observe_rpc=lambda m, code, s: refusals.append((m, code))))
    srv.refusals = refusals
    yield srv
    srv.stop()


def call_code(fn, request, metadata=()) -> grpc.StatusCode:
    try:
        fn(request, metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


READ_CALLS = [("Search", pb.SearchRequest(query="q")), ("Rerank", pb.RerankRequest(query="q", texts=["t"])),
              ("Embed", pb.EmbedRequest(texts=["t"])), ("Info", pb.InfoRequest())]
WRITE_CALLS = [("Upsert", pb.UpsertRequest(documents=[pb.Document(id="a", text="t")])),
               ("Delete", pb.DeleteRequest(ids=["a"]))]
# An authorised call reaches the service, which answers UNAVAILABLE because no models are loaded.
PASSED = grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("name,request_", READ_CALLS + WRITE_CALLS)
def test_gate_refuses_missing_malformed_and_unknown_keys(gate, name, request_):
    fn = getattr(pb_grpc.TwoStageStub(gate.channel), name)
    for md in [(), bearer("not-a-key"), bearer(READ_KEY + " extra"), (("authorization", READ_KEY),),
               (("authorization", f"Basic {WRITE_KEY}"),), (("x-api-key", WRITE_KEY),)]:
        assert call_code(fn, request_, md) == grpc.StatusCode.UNAUTHENTICATED, (name, md)


@pytest.mark.parametrize("name,request_", READ_CALLS)
def test_gate_lets_read_and_write_keys_read(gate, name, request_):
    fn = getattr(pb_grpc.TwoStageStub(gate.channel), name)
    for key in (READ_KEY, OTHER_READ_KEY, WRITE_KEY):
        assert call_code(fn, request_, bearer(key)) == PASSED


@pytest.mark.parametrize("name,request_", WRITE_CALLS)
def test_gate_write_rpcs_need_a_write_key(gate, name, request_):
    fn = getattr(pb_grpc.TwoStageStub(gate.channel), name)
    assert call_code(fn, request_, bearer(READ_KEY)) == grpc.StatusCode.PERMISSION_DENIED
    assert call_code(fn, request_, bearer(WRITE_KEY)) == PASSED


def test_gate_leaves_health_and_reflection_open(gate):
    check = health_pb2_grpc.HealthStub(gate.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(gate.channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert SERVICE in names


def test_gate_reports_refusals_and_never_logs_keys(gate, caplog):
    stub = pb_grpc.TwoStageStub(gate.channel)
    wrong = "wrong-key-0c7d1f"
    with caplog.at_level(logging.DEBUG):
        call_code(stub.Info, pb.InfoRequest(), bearer(wrong))
        call_code(stub.Upsert, WRITE_CALLS[0][1], bearer(READ_KEY))
        call_code(stub.Info, pb.InfoRequest(), bearer(WRITE_KEY))
    assert ("Info", "UNAUTHENTICATED") in gate.refusals and ("Upsert", "PERMISSION_DENIED") in gate.refusals
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "rpc refused" in logged
    for key in (wrong, READ_KEY, WRITE_KEY):
        assert key not in logged


def deep_filter_search(depth: int) -> pb.SearchRequest:
    node: dict = {"leaf": 1}
    for _ in range(depth):
        node = {"n": node}
    request = pb.SearchRequest(query="q")
    request.filter.update(node)   # in place: a Struct this deep cannot be parsed back, only built
    return request


def test_gate_answers_undecodable_requests_with_invalid_argument(gate):
    stub = pb_grpc.TwoStageStub(gate.channel)
    too_deep = deep_filter_search(120)     # beyond the protobuf decoder's nesting limit
    assert call_code(stub.Search, too_deep) == grpc.StatusCode.UNAUTHENTICATED     # keys are checked first
    try:
        stub.Search(too_deep, metadata=bearer(READ_KEY), timeout=10)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "could not be decoded" in err.details()
    else:
        pytest.fail("an undecodable request was accepted")
    raw = gate.channel.unary_unary("/twostage.v1.TwoStage/Upsert", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
    assert call_code(raw, b"\x0a\xff\xff\xff", bearer(WRITE_KEY)) == grpc.StatusCode.INVALID_ARGUMENT
    assert call_code(stub.Search, deep_filter_search(20), bearer(READ_KEY)) == PASSED   # decodable: served


# ------------------------------------------------------------------------- the whole server, API keys
@pytest.fixture(scope="module")
def keyed_server(tiny_models, tmp_path_factory):
    """Needs the interceptor wired into app.start_server (see docs/security.md)."""
    cfg = make_config(tiny_models, tmp_path_factory.mktemp("keyed-index"),
                      read_api_keys=[READ_KEY], write_api_keys=[WRITE_KEY])
    srv = ServerThread(cfg)
    yield srv
    srv.stop()


def test_server_enforces_api_keys_end_to_end(keyed_server):
    stub = keyed_server.stub()
    doc = pb.UpsertRequest(documents=[pb.Document(id="k1", text="keys guard the write path")])
    assert call_code(stub.Info, pb.InfoRequest()) == grpc.StatusCode.UNAUTHENTICATED
    assert call_code(stub.Search, pb.SearchRequest(query="keys"), bearer("guess")) == grpc.StatusCode.UNAUTHENTICATED
    assert call_code(stub.Upsert, doc, bearer(READ_KEY)) == grpc.StatusCode.PERMISSION_DENIED
    assert call_code(stub.Delete, pb.DeleteRequest(ids=["k1"]), bearer(READ_KEY)) == grpc.StatusCode.PERMISSION_DENIED
    assert stub.Upsert(doc, metadata=bearer(WRITE_KEY), timeout=30).inserted == 1
    hits = stub.Search(pb.SearchRequest(query="write path", top_k=1), metadata=bearer(READ_KEY), timeout=30).hits
    assert [h.id for h in hits] == ["k1"]
    assert stub.Info(pb.InfoRequest(), metadata=bearer(WRITE_KEY), timeout=10).index.size == 1
    check = health_pb2_grpc.HealthStub(keyed_server.channel()).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_typed_client_sends_the_key(keyed_server):
    from twostage.client import Client

    with Client(keyed_server.target, api_key=READ_KEY, max_attempts=1) as client:
        assert client.info().index.dimension > 0
    with Client(keyed_server.target, api_key="wrong", max_attempts=1) as client:
        with pytest.raises(Exception) as err:
            client.info()
        assert getattr(err.value, "code", None) == grpc.StatusCode.UNAUTHENTICATED


# ------------------------------------------------------------------------------------------ TLS, mTLS
def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


def make_leaf(d: Path, name: str, ca: str, usage: str) -> tuple[Path, Path]:
    """A certificate signed by CA `ca` for `usage` (serverAuth with localhost / 127.0.0.1, or clientAuth)."""
    ext = d / f"{name}.ext"
    lines = [f"extendedKeyUsage={usage}", "basicConstraints=CA:FALSE"]
    if usage == "serverAuth":
        lines.append("subjectAltName=DNS:localhost,IP:127.0.0.1")
    ext.write_text("\n".join(lines) + "\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    out: dict[str, Path] = {}
    for ca in ("server-ca", "client-ca", "rogue-ca"):
        out[ca], _ = make_ca(d, ca)
    out["server.pem"], out["server.key"] = make_leaf(d, "server", "server-ca", "serverAuth")
    out["client.pem"], out["client.key"] = make_leaf(d, "client", "client-ca", "clientAuth")
    out["rogue-client.pem"], out["rogue-client.key"] = make_leaf(d, "rogue-client", "rogue-ca", "clientAuth")
    return out


def tls_code(target: str, root: Path, cert: Path | None = None, key: Path | None = None,
             host: str = "localhost") -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(root_certificates=root.read_bytes(),
                                         private_key=key.read_bytes() if key else None,
                                         certificate_chain=cert.read_bytes() if cert else None)
    port = target.rsplit(":", 1)[1]
    with grpc.secure_channel(f"{host}:{port}", creds) as ch:
        return call_code(pb_grpc.TwoStageStub(ch).Embed, pb.EmbedRequest(texts=["over tls"]))


def plaintext_code(target: str) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as ch:
        return call_code(pb_grpc.TwoStageStub(ch).Embed, pb.EmbedRequest(texts=["in the clear"]))


def test_tls_server_serves_only_tls_clients_that_trust_it(tiny_models, tmp_path, pki):
    cfg = make_config(tiny_models, tmp_path / "idx", tls_cert=str(pki["server.pem"]), tls_key=str(pki["server.key"]))
    with ServerThread(cfg, wait=True) as srv:
        assert tls_code(srv.target, pki["server-ca"]) == grpc.StatusCode.OK
        assert tls_code(srv.target, pki["server-ca"], host="127.0.0.1") == grpc.StatusCode.OK
        assert tls_code(srv.target, pki["rogue-ca"]) == grpc.StatusCode.UNAVAILABLE   # server not trusted
        assert plaintext_code(srv.target) == grpc.StatusCode.UNAVAILABLE                # no cleartext


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(tiny_models, tmp_path, pki):
    cfg = make_config(tiny_models, tmp_path / "idx", tls_cert=str(pki["server.pem"]), tls_key=str(pki["server.key"]),
                      tls_client_ca=str(pki["client-ca"]))
    with ServerThread(cfg, wait=True) as srv:
        assert tls_code(srv.target, pki["server-ca"], pki["client.pem"], pki["client.key"]) == grpc.StatusCode.OK
        assert tls_code(srv.target, pki["server-ca"]) == grpc.StatusCode.UNAVAILABLE
        assert tls_code(srv.target, pki["server-ca"], pki["rogue-client.pem"],
                        pki["rogue-client.key"]) == grpc.StatusCode.UNAVAILABLE
        assert plaintext_code(srv.target) == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------------------------ message size
MAX_MESSAGE = 64 * 1024


@pytest.fixture(scope="module")
def small_message_server(tiny_models, tmp_path_factory):
    cfg = make_config(tiny_models, tmp_path_factory.mktemp("msg-index"), max_message_bytes=MAX_MESSAGE,
                      max_text_bytes=4 * MAX_MESSAGE, max_embed_texts=100_000)
    srv = ServerThread(cfg)
    yield srv
    srv.stop()


def test_oversized_request_is_refused_and_server_keeps_serving(small_message_server):
    stub = small_message_server.stub()
    big = "word " * (MAX_MESSAGE // 5 + 1000)           # > max_message_bytes, < max_text_bytes
    assert len(big.encode()) > MAX_MESSAGE
    assert call_code(stub.Embed, pb.EmbedRequest(texts=[big])) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(stub.Embed(pb.EmbedRequest(texts=["still serving"]), timeout=30).embeddings) == 1


def test_oversized_response_is_refused_and_server_keeps_serving(small_message_server):
    stub = small_message_server.stub()
    dim = stub.Info(pb.InfoRequest(), timeout=10).bi_encoder.dimension
    count = math.ceil(2 * MAX_MESSAGE / (4 * dim))       # the floats alone are twice the limit
    request = pb.EmbedRequest(texts=["tiny"] * count)
    assert request.ByteSize() < MAX_MESSAGE
    assert call_code(stub.Embed, request) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(stub.Embed(pb.EmbedRequest(texts=["still serving"] * 3), timeout=30).embeddings) == 3
