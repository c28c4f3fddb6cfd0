"""Overload and time: beyond the concurrency limit or the batch-queue bound a request is refused at once
(RESOURCE_EXHAUSTED) instead of waiting; an expired deadline or a cancelled call drops its queued work, which
never reaches the model, and frees its queue slot.

To hold work in flight deterministically the bi-encoder batcher is configured to wait `HOLD_MS` for a batch
to fill (huge batch limits, long `embed_max_delay_ms`), so every Embed call stays queued for that long.
The tests read the batcher's queue state (`engine.embedder.batcher`) and the model's batch counters (the
Prometheus endpoint and `engine.embedder.model.batches_run`) to know what happened; they never patch anything.
"""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import grpc
import pytest

from server_harness import ServerThread, make_config
from twostage.v1 import twostage_pb2 as pb

HOLD_MS = 1000.0
LONG_TEXT = " ".join(["river water flows to the sea"] * 200)   # longer than the model: cut to max_length tokens
HOLDING = dict(embed_max_delay_ms=HOLD_MS, embed_max_batch_size=1000, embed_max_batch_tokens=1_000_000)


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def code_of(future) -> grpc.StatusCode:
    try:
        future.result()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def scrape(srv: ServerThread) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.running.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def bi_encoder_items(srv: ServerThread) -> tuple[float, float]:
    """(batches, items) the bi-encoder batcher has run, from the Prometheus histogram."""
    text = scrape(srv)

    def value(name: str) -> float:
        m = re.search(rf'^{name}\{{model="bi-encoder"\}} ([0-9.e+-]+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    return value("twostage_batch_items_count"), value("twostage_batch_items_sum")


@pytest.fixture(scope="module")
def queue_server(tiny_models, tmp_path_factory):
    """Its bi-encoder queue holds one LONG_TEXT (max_length tokens) but not two."""
    tokens = int(json.loads((tiny_models / "bi-encoder" / "manifest.json").read_text())["max_length"])
    srv = ServerThread(make_config(tiny_models, tmp_path_factory.mktemp("queue-index"),
                                   embed_max_queued_tokens=tokens * 3 // 2, **HOLDING))
    first = srv.stub().Embed(pb.EmbedRequest(texts=[LONG_TEXT]), timeout=30)
    assert first.timing.embed.tokens == tokens, "LONG_TEXT should fill the model's max_length"
    srv.text_tokens = tokens
    yield srv
    srv.stop()


def batcher(srv: ServerThread):
    return srv.running.engine.embedder.batcher


def test_concurrency_limit_refuses_at_once_and_cancel_frees_a_slot(tiny_models, tmp_path):
    cfg = make_config(tiny_models, tmp_path / "idx", max_concurrent_rpcs=2, **HOLDING)
    with ServerThread(cfg) as srv:
        stub = srv.stub()
        held = [stub.Embed.future(pb.EmbedRequest(texts=[f"held call {i}"]), timeout=60) for i in range(2)]
        wait_until(lambda: batcher(srv).pending_requests == 2, "both calls are queued")
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(pb.EmbedRequest(texts=["one too many"]), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not any(f.done() for f in held), "the refusal came before the admitted calls finished"
        held[0].cancel()
        wait_until(lambda: batcher(srv).pending_requests == 1, "the cancelled call left the queue")
        admitted = stub.Embed.future(pb.EmbedRequest(texts=["takes the freed slot"]), timeout=60)
        assert code_of(held[1]) == grpc.StatusCode.OK
        assert code_of(admitted) == grpc.StatusCode.OK
        assert held[0].cancelled()


def test_flood_gets_only_ok_or_immediate_resource_exhausted(tiny_models, tmp_path):
    cfg = make_config(tiny_models, tmp_path / "idx", max_concurrent_rpcs=4, **HOLDING)
    with ServerThread(cfg) as srv:
        stub = srv.stub()
        finished: list[grpc.StatusCode] = []
        lock = threading.Lock()

        def record(future) -> None:
            with lock:
                finished.append(code_of(future))

        futures = []
        for i in range(32):
            f = stub.Embed.future(pb.EmbedRequest(texts=[f"flood {i}"]), timeout=60)
            f.add_done_callback(record)
            futures.append(f)
        codes = [code_of(f) for f in futures]
        wait_until(lambda: len(finished) == len(futures), "every callback ran")
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert 1 <= codes.count(grpc.StatusCode.OK) <= 8
        first_ok = finished.index(grpc.StatusCode.OK)
        assert grpc.StatusCode.RESOURCE_EXHAUSTED not in finished[first_ok:], \
            "every refusal came back before any admitted (held) call finished"
        assert len(stub.Embed(pb.EmbedRequest(texts=["after the flood"]), timeout=60).embeddings) == 1


def test_full_batch_queue_refuses_at_once_naming_the_bound(queue_server):
    stub = queue_server.stub()
    held = stub.Embed.future(pb.EmbedRequest(texts=[LONG_TEXT]), timeout=60)
    wait_until(lambda: batcher(queue_server).queued_tokens == queue_server.text_tokens, "the first call is queued")
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.EmbedRequest(texts=[LONG_TEXT]), timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"max_queued_tokens={queue_server.text_tokens * 3 // 2}" in err.value.details()
    assert not held.done(), "the refusal came before the queued call finished"
    assert code_of(held) == grpc.StatusCode.OK
    assert len(stub.Embed(pb.EmbedRequest(texts=[LONG_TEXT]), timeout=60).embeddings) == 1


def test_expired_deadline_drops_the_work_before_inference(queue_server):
    stub = queue_server.stub()
    model = queue_server.running.engine.embedder.model
    batches, items = bi_encoder_items(queue_server)
    runs = model.batches_run
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.EmbedRequest(texts=["nobody waits for this", "nor this"]), timeout=HOLD_MS / 1000 / 5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: batcher(queue_server).pending_requests == 0, "the expired work left the queue")
    time.sleep(2 * HOLD_MS / 1000)     # past the point where the held batch would have run
    assert model.batches_run == runs, "expired work reached the model"
    assert bi_encoder_items(queue_server) == (batches, items)
    stub.Embed(pb.EmbedRequest(texts=["counted"]), timeout=30)
    assert bi_encoder_items(queue_server) == (batches + 1, items + 1), "the counters do move for real work"


def test_cancelled_call_frees_its_queue_slot_and_never_runs(queue_server):
    stub = queue_server.stub()
    batches, items = bi_encoder_items(queue_server)
    doomed = stub.Embed.future(pb.EmbedRequest(texts=[LONG_TEXT]), timeout=60)
    wait_until(lambda: batcher(queue_server).queued_tokens == queue_server.text_tokens, "the call is queued")
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.EmbedRequest(texts=[LONG_TEXT]), timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    doomed.cancel()
    wait_until(lambda: batcher(queue_server).queued_tokens == 0, "the cancelled call freed its tokens")
    assert len(stub.Embed(pb.EmbedRequest(texts=[LONG_TEXT]), timeout=60).embeddings) == 1
    assert bi_encoder_items(queue_server) == (batches + 1, items + 1), "only the admitted call's text ran"
    assert doomed.cancelled()


def test_health_watches_do_not_take_the_slots_of_calls(tiny_models, tmp_path):
    # a health-checking client holds one Watch stream per channel for as long as the channel lives
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cfg = make_config(tiny_models, tmp_path / "idx", max_concurrent_rpcs=1)
    with ServerThread(cfg) as srv:
        channels = [grpc.insecure_channel(srv.target) for _ in range(3)]
        try:
            watches = [health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="twostage.v1.TwoStage"))
                       for ch in channels]
            assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
            assert len(srv.stub().Embed(pb.EmbedRequest(texts=["past three open watches"]), timeout=30).embeddings) == 1
            for w in watches:
                w.cancel()
        finally:
            for ch in channels:
                ch.close()
