"""The typed client against an in-process fake servicer (a real gRPC server on a loopback port).

These tests check the client's own behaviour: request building, response conversion, retries on
UNAVAILABLE only (done by gRPC from the channel's service config), deadlines, the API-key metadata, TLS,
the error type, wait_ready, and several targets (replicas) called round robin. End-to-end tests against
the real server live elsewhere.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from twostage.client import AsyncClient, Client, Document, RetryPolicy, TwoStageError, to_jsonable
from twostage.client import channel
from twostage.v1 import twostage_pb2 as pb
from twostage.v1 import twostage_pb2_grpc as pb_grpc

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


@dataclass
class Seen:
    """What the fake server saw of one call."""
    method: str
    request: object
    metadata: dict
    time_remaining: float | None


@dataclass
class FakeTwoStage(pb_grpc.TwoStageServicer):
    """Returns canned responses; fails the next `unavailable` calls with UNAVAILABLE and the next
    `invalid` calls with INVALID_ARGUMENT."""
    unavailable: int = 0
    invalid: int = 0
    seen: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _enter(self, method, request, context):
        self.seen.append(Seen(method, request, dict(context.invocation_metadata()), context.time_remaining()))
        with self.lock:
            if self.unavailable > 0:
                self.unavailable -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
            if self.invalid > 0:
                self.invalid -= 1
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "top_k: 5000 is above limits.max_top_k (1000)")

    def Search(self, request, context):
        self._enter("Search", request, context)
        meta = json_format.ParseDict({"topic": "astronomy", "year": 2020, "tags": ["a", "b"], "w": 0.5},
                                     pb.Document().metadata)
        return pb.SearchResponse(
            hits=[pb.SearchHit(id="ast-1", score=0.9, rerank_score=0.9, retrieval_score=0.7, reranked=True,
                               retrieval_rank=3,
                               document=pb.Document(id="ast-1", text="The sky is blue.", title="Sky",
                                                    metadata=meta)),
                  pb.SearchHit(id="ast-2", score=0.5, retrieval_score=0.8, retrieval_rank=0)],
            score_kind=pb.SCORE_KIND_NORMALIZED, candidates=40, reranked=1, filter_exhausted=True,
            timing=pb.Timing(total_ms=12.5, ann_ms=0.25,
                             embed=pb.StageTiming(queue_ms=1.0, batches=1, items=1, tokens=7),
                             rerank=pb.StageTiming(inference_ms=8.0, batches=2, items=40, tokens=900)))

    def Rerank(self, request, context):
        self._enter("Rerank", request, context)
        return pb.RerankResponse(
            results=[pb.RerankResult(index=1, score=2.5, id="b", text="second", chunks=3, best_chunk=2, truncated=True),
                     pb.RerankResult(index=0, score=-1.0, id="a")],
            score_kind=pb.SCORE_KIND_RAW, timing=pb.Timing(total_ms=3.0))

    def Embed(self, request, context):
        self._enter("Embed", request, context)
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=[float(i), 0.5]) for i, _ in enumerate(request.texts)],
                                dimension=2, normalized=True)

    def Upsert(self, request, context):
        self._enter("Upsert", request, context)
        return pb.UpsertResponse(inserted=len(request.documents) - 1, updated=1, index_size=42)

    def Delete(self, request, context):
        self._enter("Delete", request, context)
        return pb.DeleteResponse(deleted=1, not_found=list(request.ids[1:]), index_size=41)

    def Info(self, request, context):
        self._enter("Info", request, context)
        return pb.InfoResponse(
            server_version="9.9.9",
            bi_encoder=pb.ModelInfo(role="bi-encoder", name="mini", dimension=384, pooling="mean", normalize=True,
                                    providers=["CPUExecutionProvider"]),
            cross_encoder=pb.ModelInfo(role="cross-encoder", name="ce", dimension=1, max_length=512),
            embed_batching=pb.BatchingInfo(enabled=True, max_batch_tokens=8192, max_delay_ms=2.0),
            rerank_batching=pb.BatchingInfo(enabled=True, max_batch_size=32),
            index=pb.IndexInfo(size=200, dimension=384, metric="cos", dtype="f32", read_only=False),
            limits=pb.Limits(max_top_k=1000, max_query_bytes=4096),
            defaults=pb.Defaults(top_k=10, candidates=100, chunk_overlap_tokens=32))


class CountingHealth(health_pb2_grpc.HealthServicer):
    """NOT_SERVING for the first `not_serving` checks, then SERVING."""

    def __init__(self, not_serving: int):
        self.not_serving = not_serving
        self.checks = 0

    def Check(self, request, context):
        self.checks += 1
        ok = self.checks > self.not_serving
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING)


def serving_health() -> health.HealthServicer:
    """grpc's health servicer reporting twostage.v1.TwoStage SERVING, as the real server does once loaded: the
    client's channel watches that service (client-side health checking) and calls only servers that report it."""
    servicer = health.HealthServicer()
    servicer.set(channel.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def start_server(servicer, health_servicer=None, credentials=None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TwoStageServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer or serving_health(), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def fake():
    servicer = FakeTwoStage()
    server, target = start_server(servicer)
    servicer.target = target
    yield servicer
    server.stop(None)


# ------------------------------------------------------------------------------------- conversion


def test_search_builds_request_and_converts_response(fake):
    with Client(fake.target) as client:
        result = client.search("why is the sky blue", top_k=5, candidates=40, filter={"topic": "astronomy", "n": 3},
                               rerank_budget_ms=20, raw_scores=True, max_query_tokens=16, max_document_tokens=200,
                               expansion_search=64)
    request = fake.seen[0].request
    assert request.query == "why is the sky blue"
    assert (request.top_k, request.candidates, request.rerank_budget_ms, request.expansion_search) == (5, 40, 20, 64)
    assert request.raw_scores and not request.skip_rerank and not request.ids_only
    assert (request.max_query_tokens, request.max_document_tokens) == (16, 200)
    assert json_format.MessageToDict(request.filter) == {"topic": "astronomy", "n": 3.0}

    assert result.score_kind == "normalized"
    assert (result.candidates, result.reranked, result.filter_exhausted) == (40, 1, True)
    first, second = result.hits
    assert (first.id, first.reranked, first.retrieval_rank) == ("ast-1", True, 3)
    assert first.score == pytest.approx(0.9) and first.retrieval_score == pytest.approx(0.7)
    assert first.document == Document(id="ast-1", text="The sky is blue.", title="Sky",
                                      metadata={"topic": "astronomy", "year": 2020, "tags": ["a", "b"], "w": 0.5})
    assert isinstance(first.document.metadata["year"], int)
    assert second.document is None and not second.reranked
    assert result.timing.total_ms == 12.5 and result.timing.ann_ms == 0.25
    assert (result.timing.embed.tokens, result.timing.rerank.items, result.timing.rerank.batches) == (7, 40, 2)


def test_search_leaves_unset_fields_at_proto_defaults(fake):
    with Client(fake.target) as client:
        client.search("q", skip_rerank=True, ids_only=True)
    request = fake.seen[0].request
    assert request.skip_rerank and request.ids_only
    assert (request.top_k, request.candidates) == (0, 0)
    assert not request.HasField("filter")


def test_rerank_texts_and_ids(fake):
    with Client(fake.target) as client:
        results = client.rerank("q", ["first", "second"], top_n=2, return_documents=True, truncate=False,
                                chunk_long_documents=True, chunk_overlap_tokens=16)
        client.rerank("q", document_ids=["a", "b"], raw_scores=True)
    by_text, by_ids = fake.seen[0].request, fake.seen[1].request
    assert list(by_text.texts) == ["first", "second"] and not by_text.document_ids
    assert by_text.truncation == pb.TRUNCATION_NONE and by_text.top_n == 2 and by_text.return_documents
    assert by_text.chunk_long_documents and by_text.chunk_overlap_tokens == 16
    assert list(by_ids.document_ids) == ["a", "b"] and not by_ids.texts
    assert by_ids.truncation == pb.TRUNCATION_END and by_ids.raw_scores
    assert results.score_kind == "raw"
    assert [(r.index, r.id) for r in results.results] == [(1, "b"), (0, "a")]
    assert (results.results[0].chunks, results.results[0].best_chunk, results.results[0].truncated) == (3, 2, True)


def test_rerank_refuses_a_bare_string():
    with pytest.raises(TypeError, match="texts and document_ids must be lists"):
        Client("127.0.0.1:1").rerank("q", "just one string")


def test_embed_upsert_delete_info(fake):
    with Client(fake.target) as client:
        embedded = client.embed(["a", "b", "c"])
        upserted = client.upsert([
            {"_id": "d1", "text": "one", "title": "T", "metadata": {"topic": "x"}},
            Document(id="d2", text="two", embedding=(0.25, 0.5)),
        ])
        deleted = client.delete(["d1", "zz"])
        info = client.info()
    assert embedded.embeddings == ((0.0, 0.5), (1.0, 0.5), (2.0, 0.5)) and embedded.dimension == 2
    assert embedded.normalized
    docs = fake.seen[1].request.documents
    assert [d.id for d in docs] == ["d1", "d2"]
    assert json_format.MessageToDict(docs[0].metadata) == {"topic": "x"} and docs[0].title == "T"
    assert list(docs[1].embedding) == [0.25, 0.5] and not docs[1].HasField("metadata")
    assert (upserted.inserted, upserted.updated, upserted.index_size) == (1, 1, 42)
    assert (deleted.deleted, deleted.not_found, deleted.index_size) == (1, ("zz",), 41)
    assert info.server_version == "9.9.9"
    assert info.bi_encoder.providers == ("CPUExecutionProvider",) and info.bi_encoder.dimension == 384
    assert info.cross_encoder.max_length == 512 and info.defaults.candidates == 100
    assert info.index.size == 200 and info.limits.max_top_k == 1000 and info.embed_batching.max_delay_ms == 2.0
    assert to_jsonable(info)["defaults"] == {"top_k": 10, "candidates": 100, "chunk_overlap_tokens": 32,
                                             "latency_budget_ms": 0, "retrieval_mode": "", "fusion": "",
                                             "fusion_weight": 0.0, "rerank_weight": 0.0}


def test_upsert_rejects_unknown_document_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['body'\]"):
        Client("127.0.0.1:1").upsert([{"id": "x", "body": "oops"}])


def test_client_and_server_read_a_struct_alike():
    """Both sides convert google.protobuf.Struct with json_format, whole numbers as int; the server
    still names the field of a non-finite number."""
    from twostage.client.convert import dict_from_struct, struct_from_dict
    from twostage.server import errors
    from twostage.server.service import struct_to_dict
    data = {"year": 2020, "w": 0.5, "big": 2.0**60, "tags": ["a", 1, None, True], "nested": {"n": -3, "e": {}},
            "none": None, "empty": []}
    message = struct_from_dict(data)
    assert dict_from_struct(message) == struct_to_dict(message, "filter") == data
    assert isinstance(struct_to_dict(message, "filter")["nested"]["n"], int)
    bad = struct_from_dict({"ok": 1, "deep": {"list": [1.0, float("nan")]}})
    with pytest.raises(errors.InvalidArgument) as caught:
        struct_to_dict(bad, "documents[2].metadata")
    assert str(caught.value).startswith("documents[2].metadata.deep.list[1]: numbers must be finite")


# --------------------------------------------------------------------------- retries and errors


def test_retries_unavailable_then_succeeds(fake):
    fake.unavailable = 2
    with Client(fake.target, retry=FAST_RETRY) as client:
        result = client.search("q")
    assert len(fake.seen) == 3 and result.hits[0].id == "ast-1"


def test_gives_up_after_max_attempts(fake):
    fake.unavailable = 10
    with Client(fake.target, retry=FAST_RETRY) as client:
        with pytest.raises(TwoStageError) as caught:
            client.info()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.message == "warming up"
    assert len(fake.seen) == 3


def test_max_attempts_shortcut_overrides_policy(fake):
    fake.unavailable = 10
    with Client(fake.target, retry=FAST_RETRY, max_attempts=1) as client:
        with pytest.raises(TwoStageError):
            client.info()
    assert len(fake.seen) == 1


def test_invalid_argument_is_not_retried(fake):
    fake.invalid = 1
    with Client(fake.target, retry=FAST_RETRY) as client:
        with pytest.raises(TwoStageError) as caught:
            client.search("q", top_k=5000)
        assert client.search("q").hits  # the next call goes through
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "limits.max_top_k" in caught.value.message and "INVALID_ARGUMENT" in str(caught.value)
    assert len(fake.seen) == 2


def test_unreachable_server_raises_unavailable():
    with socket_closed_port() as target, Client(target, retry=FAST_RETRY, timeout=5) as client:
        with pytest.raises(TwoStageError) as caught:
            client.info()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_deadline_is_sent_default_and_per_call(fake):
    with Client(fake.target, timeout=30) as client:
        client.info()
        client.info(timeout=5)
    default_remaining, per_call_remaining = (s.time_remaining for s in fake.seen)
    assert 5.5 < default_remaining <= 30.5  # gRPC rounds deadlines up slightly
    assert 0 < per_call_remaining <= 5.5


def test_api_key_is_sent_as_bearer_metadata(fake):
    with Client(fake.target, api_key="s3cret") as client:
        client.info()
    with Client(fake.target) as client:
        client.info()
    assert fake.seen[0].metadata["authorization"] == "Bearer s3cret"
    assert "authorization" not in fake.seen[1].metadata


def test_default_policy_retries_after_grpcs_backoff(fake):
    """The default policy (4 attempts, 0.1 s initial backoff) is in force: one UNAVAILABLE costs one
    backoff of about 0.1 s (gRPC jitters it by +-20 %), not an immediate retry and not a failure."""
    fake.unavailable = 1
    with Client(fake.target) as client:
        client.info()  # connected, so the timed call measures the backoff only
        fake.unavailable, fake.seen = 1, []
        started = time.monotonic()
        assert client.info().server_version == "9.9.9"
        elapsed = time.monotonic() - started
    assert len(fake.seen) == 2
    assert 0.07 <= elapsed < 1.0


def test_attempts_are_bounded_by_grpcs_limit(fake):
    fake.unavailable = 10
    with Client(fake.target, retry=FAST_RETRY, max_attempts=5) as client:
        with pytest.raises(TwoStageError) as caught:
            client.search("q")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and len(fake.seen) == 5
    with pytest.raises(ValueError, match="between 1 and 5"):
        Client(fake.target, max_attempts=6)  # gRPC would clamp it to 5 silently


def test_deadline_covers_every_attempt(fake):
    """The call's one deadline bounds its retries: a backoff longer than the deadline ends the call
    with DEADLINE_EXCEEDED at the deadline."""
    fake.unavailable = 10
    slow = RetryPolicy(max_attempts=5, initial_backoff_s=5.0, max_backoff_s=5.0)
    with Client(fake.target, retry=slow) as client:
        client.wait_ready(timeout=10)
        started = time.monotonic()
        with pytest.raises(TwoStageError) as caught:
            client.info(timeout=0.5)
        elapsed = time.monotonic() - started
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(fake.seen) == 1 and elapsed < 3.0


def test_a_large_request_stays_retryable(fake):
    """gRPC keeps a request for retrying only while it fits the retry buffer (256 KiB by default);
    the client raises it to the message limit, so a big Upsert is retried like a small one."""
    fake.unavailable = 1
    big = [{"id": f"d{i}", "text": "x" * 10_000} for i in range(60)]  # about 600 KB
    with Client(fake.target, retry=FAST_RETRY) as client:
        assert client.upsert(big).index_size == 42
    assert [s.method for s in fake.seen] == ["Upsert", "Upsert"]
    assert len(fake.seen[1].request.documents) == 60


def test_service_config_carries_the_retry_policy_round_robin_and_health_checking():
    config = channel.service_config(RetryPolicy())
    assert config == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": [{"service": "twostage.v1.TwoStage"}],
                          "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "2s",
                                          "backoffMultiplier": 2.0, "retryableStatusCodes": ["UNAVAILABLE"]}}],
        "healthCheckConfig": {"serviceName": "twostage.v1.TwoStage"}}
    assert "retryPolicy" not in channel.service_config(RetryPolicy(max_attempts=1))["methodConfig"][0]
    assert "healthCheckConfig" not in channel.service_config(RetryPolicy(), health_check=False)
    options = dict(channel.connection("127.0.0.1:1", max_attempts=2).options)
    sent = json.loads(options["grpc.service_config"])
    assert sent["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 2 and "healthCheckConfig" in sent
    assert options["grpc.enable_retries"] == 1
    unchecked = dict(channel.connection("127.0.0.1:1", health_check=False).options)
    assert "healthCheckConfig" not in json.loads(unchecked["grpc.service_config"])


def test_retry_policy_validation():
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="initial_backoff_s"):
        RetryPolicy(initial_backoff_s=0.001)  # grpcio can miss retry timers this short (grpc/grpc#41036)
    with pytest.raises(ValueError, match="max_backoff_s"):
        RetryPolicy(initial_backoff_s=1.0, max_backoff_s=0.5)
    with pytest.raises(ValueError, match="multiplier"):
        RetryPolicy(multiplier=0.5)
    with pytest.raises(TypeError, match="unknown client options"):
        Client("127.0.0.1:1", retries=3)


def test_invalid_client_options():
    with pytest.raises(ValueError, match="together"):
        Client("127.0.0.1:1", client_cert=b"x")
    with pytest.raises(ValueError, match="timeout"):
        Client("127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match="root_certs: cannot read"):
        Client("127.0.0.1:1", root_certs="/nonexistent/ca.pem")


# ----------------------------------------------------------------------------------- wait_ready


def test_wait_ready_polls_health_until_serving():
    health_servicer = CountingHealth(not_serving=2)
    server, target = start_server(FakeTwoStage(), health_servicer)
    try:
        with Client(target) as client:
            client.wait_ready(timeout=30)
    finally:
        server.stop(None)
    assert health_servicer.checks == 3


def test_wait_ready_times_out_naming_the_state():
    server, target = start_server(FakeTwoStage(), CountingHealth(not_serving=10**9))
    try:
        with Client(target) as client:
            with pytest.raises(TwoStageError) as caught:
                client.wait_ready(timeout=0.5)
    finally:
        server.stop(None)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "NOT_SERVING" in caught.value.message and target in caught.value.message


# ---------------------------------------------------------------------------------------- async


def test_async_client_converts_retries_and_raises(fake):
    async def scenario():
        async with AsyncClient(fake.target, retry=FAST_RETRY, api_key="k") as client:
            await client.wait_ready(timeout=10)
            fake.unavailable = 2
            result = await client.search("q", top_k=3)
            reranked = await client.rerank("q", ["x", "y"])
            fake.invalid = 1
            with pytest.raises(TwoStageError) as caught:
                await client.embed(["a"])
            embedded = await client.embed(["a"])
            upserted = await client.upsert([{"id": "a", "text": "t"}, {"id": "b", "text": "u"}])
            deleted = await client.delete(["a"])
            info = await client.info(timeout=4)
            return result, reranked, caught.value, embedded, upserted, deleted, info

    result, reranked, error, embedded, upserted, deleted, info = asyncio.run(scenario())
    assert result.hits[0].document.metadata["tags"] == ["a", "b"]
    assert [s.method for s in fake.seen[:3]] == ["Search"] * 3
    assert reranked.results[0].index == 1
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert embedded.embeddings == ((0.0, 0.5),)
    assert (upserted.inserted, deleted.deleted, info.server_version) == (1, 1, "9.9.9")
    assert all(s.metadata["authorization"] == "Bearer k" for s in fake.seen)
    assert 0 < fake.seen[-1].time_remaining <= 4.5


# ------------------------------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for the name twostage.test, and a client certificate (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not found")
    d = tmp_path_factory.mktemp("pki")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=test-ca")
    for name, cn in (("server", "twostage.test"), ("client", "test-client")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={cn}")
        (d / f"{name}.ext").write_text(f"subjectAltName=DNS:{cn}\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return d


def test_tls_with_server_name_override_and_mutual_tls(pki: Path):
    creds = grpc.ssl_server_credentials([((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
                                        root_certificates=(pki / "ca.pem").read_bytes(),
                                        require_client_auth=True)
    servicer = FakeTwoStage()
    server, target = start_server(servicer, credentials=creds)
    try:
        with Client(target, root_certs=pki / "ca.pem", client_cert=pki / "client.pem",
                    client_key=(pki / "client.key").read_bytes(), server_name="twostage.test") as client:
            assert client.info().server_version == "9.9.9"
        # Without a client certificate the handshake is refused.
        with Client(target, root_certs=pki / "ca.pem", server_name="twostage.test", max_attempts=1,
                    timeout=5) as client:
            with pytest.raises(TwoStageError) as caught:
                client.info()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)
    assert len(servicer.seen) == 1


# -------------------------------------------------------------------------------------- helpers


class socket_closed_port:
    """A loopback target nobody listens on."""

    def __enter__(self) -> str:
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return f"127.0.0.1:{port}"

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------ several targets (replicas)


@pytest.mark.parametrize("given, expected", [
    ("127.0.0.1:50051", "127.0.0.1:50051"),
    ("twostage.example:50051", "twostage.example:50051"),
    ("dns:///twostage.example:50051", "dns:///twostage.example:50051"),
    (["127.0.0.1:1", "10.0.0.2:2"], "ipv4:127.0.0.1:1,10.0.0.2:2"),
    ("127.0.0.1:1, 127.0.0.1:2,127.0.0.1:3", "ipv4:127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"),
    (["[::1]:1", "[fe80::2]:2"], "ipv6:[::1]:1,[fe80::2]:2"),
    (["dns:///one.example:1"], "dns:///one.example:1"),
])
def test_channel_target_forms(given, expected):
    assert channel.channel_target(given) == expected


@pytest.mark.parametrize("given, message", [
    ("replica-a:1,replica-b:2", "must be IP addresses.*dns:///"),
    (["127.0.0.1:1", "[::1]:2"], "mixes IPv4 and IPv6"),
    ("127.0.0.1:1,127.0.0.1", "port from 1 to 65535"),
    ("127.0.0.1:1,127.0.0.1:70000", "port from 1 to 65535"),
    ("127.0.0.1:1,,127.0.0.1:2", "empty address"),
    ([], "empty address"),
    ("dns:///a:1,dns:///b:2", "not resolver URIs"),
])
def test_channel_target_refusals(given, message):
    with pytest.raises(ValueError, match=message):
        Client(given)


class Replica(pb_grpc.TwoStageServicer):
    """A fake replica that counts its calls and names itself in Info.server_version."""

    def __init__(self, name: str):
        self.name, self.calls, self.lock = name, 0, threading.Lock()

    def Info(self, request, context):
        with self.lock:
            self.calls += 1
        return pb.InfoResponse(server_version=self.name)


def start_replica(replica: Replica, port: int = 0, health_servicer=None) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TwoStageServicer_to_server(replica, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer or serving_health(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


def test_calls_spread_over_replicas_and_survive_one_stopping():
    replicas = [Replica(f"r{i}") for i in range(3)]
    started = [start_replica(r) for r in replicas]
    try:
        with Client([f"127.0.0.1:{port}" for _, port in started], retry=FAST_RETRY, timeout=10) as client:
            assert client.target.startswith("ipv4:127.0.0.1:")
            answered = [client.info().server_version for _ in range(60)]
            assert all(answered.count(r.name) >= 10 for r in replicas), [r.calls for r in replicas]

            started[0][0].stop(None).wait()
            before = replicas[0].calls
            answered = [client.info().server_version for _ in range(40)]  # none fails
            assert replicas[0].calls == before and set(answered) == {"r1", "r2"}

            server, _ = start_replica(replicas[0], started[0][1])  # back on its port: it rejoins
            started[0] = (server, started[0][1])
            deadline = time.monotonic() + 30
            while replicas[0].calls == before and time.monotonic() < deadline:
                client.info()
                time.sleep(0.02)
            assert replicas[0].calls > before, "the restarted replica got no calls"
    finally:
        for server, _ in started:
            server.stop(None)


def test_async_client_and_a_dns_target_use_every_replica():
    replicas = [Replica(f"r{i}") for i in range(2)]
    started = [start_replica(r) for r in replicas]

    async def scenario(target):
        async with AsyncClient(target, timeout=10) as client:
            return [(await client.info()).server_version for _ in range(20)]

    try:
        answered = asyncio.run(scenario(f"127.0.0.1:{started[0][1]},127.0.0.1:{started[1][1]}"))
        assert answered.count("r0") >= 5 and answered.count("r1") >= 5
        with Client(f"dns:///localhost:{started[1][1]}", timeout=10) as client:  # gRPC's own resolver
            assert client.info().server_version == "r1"
    finally:
        for server, _ in started:
            server.stop(None)


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_calls_go_only_to_replicas_whose_health_reports_serving():
    """A replica that accepts connections but reports twostage.v1.TwoStage NOT_SERVING (loading, draining)
    gets no call; once it reports SERVING it takes calls again, and it stops when it turns NOT_SERVING.
    health_check=False calls it whatever it reports."""
    replicas = [Replica("r0"), Replica("r1")]
    r0_health = serving_health()
    r0_health.set(channel.SERVICE_NAME, NOT_SERVING)
    started = [start_replica(replicas[0], health_servicer=r0_health), start_replica(replicas[1])]
    targets = [f"127.0.0.1:{port}" for _, port in started]
    try:
        with Client(targets, retry=FAST_RETRY, timeout=10) as client:
            answered = [client.info().server_version for _ in range(40)]
            assert set(answered) == {"r1"} and replicas[0].calls == 0

            r0_health.set(channel.SERVICE_NAME, SERVING)  # loaded: the channel's health watch sees it
            wait_until(lambda: client.info().server_version == "r0", "r0 takes calls once SERVING")
            answered = [client.info().server_version for _ in range(40)]
            assert answered.count("r0") >= 10 and answered.count("r1") >= 10, answered

            r0_health.set(channel.SERVICE_NAME, NOT_SERVING)  # draining or cut off from its backend
            time.sleep(0.5)  # the health watch's update is asynchronous to the calls
            before = replicas[0].calls
            assert {client.info().server_version for _ in range(40)} == {"r1"} and replicas[0].calls == before

        with Client(targets, retry=FAST_RETRY, timeout=10, health_check=False) as client:
            answered = [client.info().server_version for _ in range(40)]
        assert answered.count("r0") >= 10 and answered.count("r1") >= 10, answered
    finally:
        for server, _ in started:
            server.stop(None)


def test_async_client_calls_only_replicas_reporting_serving():
    replicas = [Replica("r0"), Replica("r1")]
    r0_health = serving_health()
    r0_health.set(channel.SERVICE_NAME, NOT_SERVING)
    started = [start_replica(replicas[0], health_servicer=r0_health), start_replica(replicas[1])]

    async def answers(**options):
        async with AsyncClient([f"127.0.0.1:{port}" for _, port in started], timeout=10, **options) as client:
            return [(await client.info()).server_version for _ in range(20)]

    try:
        assert set(asyncio.run(answers())) == {"r1"} and replicas[0].calls == 0
        assert asyncio.run(answers(health_check=False)).count("r0") >= 5
    finally:
        for server, _ in started:
            server.stop(None)


def test_a_server_without_a_health_service_still_gets_calls():
    """gRPC's health-checking spec: a server whose Watch answers UNIMPLEMENTED counts as healthy (grpcio
    logs that it disables the check). One whose health service does not know twostage.v1.TwoStage answers
    SERVICE_UNKNOWN: not serving, so the client needs health_check=False for it."""
    replica = Replica("bare")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TwoStageServicer_to_server(replica, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    unknown, unknown_port = start_replica(Replica("unknown"), health_servicer=health.HealthServicer())
    try:
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            assert [client.info().server_version for _ in range(3)] == ["bare"] * 3
        with Client(f"127.0.0.1:{unknown_port}", retry=FAST_RETRY, timeout=10) as client:
            with pytest.raises(TwoStageError) as caught:
                client.info()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE  # at once, not at the deadline
        with Client(f"127.0.0.1:{unknown_port}", timeout=10, health_check=False) as client:
            assert client.info().server_version == "unknown"
    finally:
        server.stop(None)
        unknown.stop(None)


def test_wait_ready_waits_for_the_service_the_channel_watches():
    """With health checking the channel reaches no server whose twostage.v1.TwoStage is NOT_SERVING, so
    wait_ready() ("" = the process) also waits for readiness."""
    loading = serving_health()
    loading.set("", SERVING)
    loading.set(channel.SERVICE_NAME, NOT_SERVING)
    server, port = start_replica(Replica("r"), health_servicer=loading)
    try:
        with Client(f"127.0.0.1:{port}") as client:
            with pytest.raises(TwoStageError, match="backend unhealthy"):
                client.wait_ready(timeout=0.5)
            loading.set(channel.SERVICE_NAME, SERVING)
            client.wait_ready(timeout=20)
            assert client.info().server_version == "r"
        loading.set(channel.SERVICE_NAME, NOT_SERVING)
        with Client(f"127.0.0.1:{port}", health_check=False) as client:
            client.wait_ready(timeout=20)
    finally:
        server.stop(None)


REPLICA_PROCESS = """
import sys, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from twostage.v1 import twostage_pb2 as pb, twostage_pb2_grpc as pb_grpc

class Slow(pb_grpc.TwoStageServicer):
    def Info(self, request, context):
        time.sleep(0.02)  # calls are in flight when the process dies
        return pb.InfoResponse(server_version=sys.argv[1])

server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
pb_grpc.add_TwoStageServicer_to_server(Slow(), server)
health_servicer = health.HealthServicer()
health_servicer.set("twostage.v1.TwoStage", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
server.wait_for_termination()
"""


def test_a_replica_killed_under_load_costs_no_call():
    """kill -9 of one of three replica processes while 8 threads call: every call succeeds (in-flight
    calls on the dead replica fail UNAVAILABLE and gRPC retries them on the others)."""
    processes = [subprocess.Popen([sys.executable, "-c", REPLICA_PROCESS, f"p{i}"], stdout=subprocess.PIPE,
                                  text=True) for i in range(3)]
    try:
        ports = [int(p.stdout.readline()) for p in processes]
        answered: list[str] = []
        failures: list[str] = []
        stop = threading.Event()
        with Client([f"127.0.0.1:{port}" for port in ports], timeout=20) as client:
            client.wait_ready(timeout=20)

            def call_until_stopped():
                while not stop.is_set():
                    try:
                        answered.append(client.info().server_version)
                    except TwoStageError as err:
                        failures.append(str(err))

            threads = [threading.Thread(target=call_until_stopped) for _ in range(8)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            processes[0].kill()
            killed_at = len(answered)
            time.sleep(1.5)
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert not failures, failures[:3]
        assert answered[:killed_at].count("p0") > 0
        after = answered[killed_at + 8:]  # calls already in flight at the kill may have come back from p0
        assert len(after) > 50 and set(after) == {"p1", "p2"}
    finally:
        for p in processes:
            p.kill()
            p.wait()


def test_tls_to_several_replicas_verifies_the_server_name(pki: Path):
    creds = grpc.ssl_server_credentials([((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())])
    replicas = [Replica(f"r{i}") for i in range(2)]
    servers = []
    for replica in replicas:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_TwoStageServicer_to_server(replica, server)
        servers.append((server, server.add_secure_port("127.0.0.1:0", creds)))
        server.start()
    targets = [f"127.0.0.1:{port}" for _, port in servers]
    try:
        with Client(targets, root_certs=pki / "ca.pem", server_name="twostage.test", timeout=10) as client:
            answered = [client.info().server_version for _ in range(10)]
        assert answered.count("r0") >= 3 and answered.count("r1") >= 3
        with Client(targets, root_certs=pki / "ca.pem", timeout=5, max_attempts=1) as client:
            with pytest.raises(TwoStageError) as caught:
                client.info()  # the certificate names twostage.test, not the addresses
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        for server, _ in servers:
            server.stop(None)
