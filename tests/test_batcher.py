"""Scheduling behaviour of the dynamic batcher: merging, splitting, order, bounds, cancellation, deadlines,
fairness and the no-batching baseline. The model here is a plain function that reports, per row, which item
it saw and how long it was, and records every batch it is given (model equivalence is in test_runtime.py)."""
from __future__ import annotations

import asyncio
import math
import random
import threading
import time

import numpy as np
import pytest

from twostage.server.batcher import Batcher, InferencePool
from twostage.server.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from twostage.model.tokenization import Encoded


def item(marker: int, length: int) -> Encoded:
    """An input whose first id identifies it."""
    ids = np.full(length, 7, dtype=np.int64)
    ids[0] = marker
    return Encoded(ids, np.zeros(length, dtype=np.int64))


class RecordingModel:
    """run_batch for the batcher: row = (marker, length); records batches; can be held shut by a gate."""

    def __init__(self, gated: bool = False, fail_on: int | None = None):
        self.batches: list[list[int]] = []
        self.lengths: list[list[int]] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        if not gated:
            self.gate.set()
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, batch: list[Encoded]) -> np.ndarray:
        self.started.set()
        self.gate.wait(timeout=30)
        markers = [int(e.ids[0]) for e in batch]
        with self.lock:
            self.batches.append(markers)
            self.lengths.append([len(e) for e in batch])
        if self.fail_on is not None and self.fail_on in markers:
            raise RuntimeError(f"model failed on item {self.fail_on}")
        return np.array([[int(e.ids[0]), len(e)] for e in batch], dtype=np.float32)

    def seen(self) -> set[int]:
        with self.lock:
            return {m for b in self.batches for m in b}


class RecordingMetrics:
    def __init__(self):
        self.batches: list[tuple] = []
        self.queues: list[tuple] = []

    def observe_batch(self, model, items, real_tokens, padded_tokens, seconds):
        self.batches.append((model, items, real_tokens, padded_tokens, seconds))

    def observe_queue(self, model, seconds):
        self.queues.append((model, seconds))


def make(model, **overrides) -> Batcher:
    knobs = dict(max_batch_tokens=10_000, max_batch_size=32, max_delay_ms=20.0, max_queued_tokens=1_000_000)
    knobs.update(overrides)
    return Batcher("rerank", model, **knobs)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    model = RecordingModel()

    async def scenario():
        batcher = make(model, max_delay_ms=50.0)
        batcher.start()
        requests = [[item(100 * r + i, 3 + (i * r) % 5) for i in range(3)] for r in range(1, 9)]
        results = await asyncio.gather(*(batcher.submit(items) for items in requests))
        await batcher.stop()
        return requests, results

    requests, results = run(scenario())
    assert len(model.batches) < len(requests)
    assert max(len(b) for b in model.batches) > 3  # some batch carried items of more than one request
    for items, result in zip(requests, results):
        assert result.outputs[:, 0].tolist() == [int(e.ids[0]) for e in items]
        assert result.outputs[:, 1].tolist() == [len(e) for e in items]
        assert result.stats.items == 3 and result.stats.tokens == sum(len(e) for e in items)
        assert result.stats.batches >= 1 and result.stats.inference_ms > 0


def test_large_request_is_split_within_limits_and_merged_back_in_order():
    model = RecordingModel()
    rng = random.Random(3)
    items = [item(i + 1, rng.randint(2, 40)) for i in range(100)]

    async def scenario():
        batcher = make(model, max_batch_size=8, max_batch_tokens=200)
        batcher.start()
        result = await batcher.submit(items)
        await batcher.stop()
        return result

    result = run(scenario())
    assert result.outputs[:, 0].tolist() == list(range(1, 101))
    assert len(model.batches) >= math.ceil(100 / 8) and result.stats.batches == len(model.batches)
    for lengths in model.lengths:
        assert len(lengths) <= 8 and len(lengths) * max(lengths) <= 200
    # items are taken longest first, so batches hold neighbouring lengths and the shortest go last
    assert [n for lengths in model.lengths for n in lengths] == sorted((len(e) for e in items), reverse=True)


def test_item_longer_than_the_token_budget_runs_alone():
    model = RecordingModel()

    async def scenario():
        batcher = make(model, max_batch_tokens=50)
        batcher.start()
        result = await batcher.submit([item(1, 5), item(2, 80), item(3, 6)])
        await batcher.stop()
        return result

    result = run(scenario())
    assert result.outputs[:, 0].tolist() == [1, 2, 3]
    assert [2] in model.batches


def test_full_queue_refuses_at_once_and_cancellation_frees_it():
    model = RecordingModel(gated=True)

    async def scenario():
        batcher = make(model, max_queued_tokens=1000, max_batch_size=1)
        batcher.start()
        blocker = asyncio.create_task(batcher.submit([item(1, 10)]))
        await wait_until(model.started.is_set)       # the worker is busy with the blocker
        waiting = asyncio.create_task(batcher.submit([item(2, 300), item(3, 300)]))
        await wait_until(lambda: batcher.queued_tokens == 600)
        with pytest.raises(ResourceExhausted) as refused:
            await batcher.submit([item(4, 250), item(5, 250)])
        assert not model.gate.is_set()                 # refused while the model was still busy: no waiting
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert batcher.queued_tokens == 0
        admitted = asyncio.create_task(batcher.submit([item(4, 250), item(5, 250)]))
        await wait_until(lambda: batcher.queued_tokens == 500)
        model.gate.set()
        await blocker
        result = await admitted
        await batcher.stop()
        return str(refused.value), result

    message, result = run(scenario())
    assert "max_queued_tokens=1000" in message and "600" in message and "rerank" in message
    assert result.outputs[:, 0].tolist() == [4, 5]
    assert not {2, 3} & model.seen()                   # cancelled work never reached the model


def test_expired_deadline_is_dropped_before_inference():
    model = RecordingModel(gated=True)

    async def scenario():
        batcher = make(model, max_batch_size=1)
        batcher.start()
        blocker = asyncio.create_task(batcher.submit([item(1, 4)]))
        await wait_until(model.started.is_set)
        late = asyncio.create_task(batcher.submit([item(2, 4), item(3, 4)], deadline=time.monotonic() + 0.05))
        on_time = asyncio.create_task(batcher.submit([item(4, 4)], deadline=time.monotonic() + 60))
        await asyncio.sleep(0.2)                       # the first deadline passes while the model is busy
        model.gate.set()
        await blocker
        with pytest.raises(DeadlineExceeded):
            await late
        result = await on_time
        with pytest.raises(DeadlineExceeded):          # already expired: refused at submit
            await batcher.submit([item(5, 4)], deadline=time.monotonic() - 1)
        queued = batcher.queued_tokens
        await batcher.stop()
        return result, queued

    result, queued = run(scenario())
    assert result.outputs[:, 0].tolist() == [4]
    assert queued == 0
    assert model.seen() == {1, 4}
    assert len(model.batches) == 2


def test_small_request_is_not_starved_behind_a_huge_one():
    model = RecordingModel()
    finished: list[str] = []

    async def scenario():
        batcher = make(model, max_batch_size=4, max_delay_ms=0.0)
        batcher.start()

        async def request(name, items):
            result = await batcher.submit(items)
            finished.append(name)
            return result

        huge = asyncio.create_task(request("huge", [item(1000 + i, 8) for i in range(500)]))
        await wait_until(lambda: len(model.batches) >= 1)    # the huge request is being served
        small = await request("small", [item(1, 8)])
        batches_when_small_done = len(model.batches)
        big = await huge
        await batcher.stop()
        return small, big, batches_when_small_done

    small, big, batches_when_small_done = run(scenario())
    assert finished == ["small", "huge"]
    assert batches_when_small_done < 10                 # served within a few batches, not after 125
    assert small.outputs[:, 0].tolist() == [1]
    assert big.outputs[:, 0].tolist() == [1000 + i for i in range(500)]


def test_large_request_is_not_starved_by_a_stream_of_smaller_ones():
    model = RecordingModel()
    finished: list[str] = []

    async def scenario():
        batcher = make(model, max_batch_size=4, max_delay_ms=0.0)
        batcher.start()

        async def big():
            await batcher.submit([item(1000 + i, 8) for i in range(40)])
            finished.append("big")

        async def stream(base):
            for k in range(15):
                await batcher.submit([item(base + 4 * k + j, 8) for j in range(4)])
            finished.append(f"stream-{base}")

        await asyncio.gather(big(), stream(1), stream(500))
        await batcher.stop()

    run(scenario())
    # pure shortest-job-first would serve every 4-item request before the 40-item one
    assert finished[0] == "big"


def test_similar_requests_finish_in_arrival_order():
    model = RecordingModel()
    finished: list[int] = []

    async def scenario():
        batcher = make(model, max_batch_size=4, max_delay_ms=0.0)
        batcher.start()

        async def request(r):
            await batcher.submit([item(100 * r + i, 8) for i in range(12)])
            finished.append(r)

        await asyncio.gather(*(request(r) for r in (1, 2, 3)))
        await batcher.stop()

    run(scenario())
    assert finished == [1, 2, 3]
    first_request_batches = [b for b in model.batches if any(100 <= m < 200 for m in b)]
    assert len(first_request_batches) == 3              # not smeared round-robin over 9 batches


def test_batching_off_never_mixes_requests():
    model = RecordingModel()

    async def scenario():
        batcher = make(model, enabled=False, max_batch_size=4, max_delay_ms=50.0)
        batcher.start()
        sizes = (3, 6, 1, 9)
        requests = [[item(100 * (r + 1) + i, 5) for i in range(n)] for r, n in enumerate(sizes)]
        results = await asyncio.gather(*(batcher.submit(items) for items in requests))
        await batcher.stop()
        return sizes, requests, results

    sizes, requests, results = run(scenario())
    assert len(model.batches) == sum(math.ceil(n / 4) for n in sizes)
    for batch in model.batches:
        assert len({m // 100 for m in batch}) == 1
    for items, result in zip(requests, results):
        assert result.outputs[:, 0].tolist() == [int(e.ids[0]) for e in items]


def test_model_failure_reaches_the_callers_of_that_batch_only():
    model = RecordingModel(fail_on=13)

    async def scenario():
        batcher = make(model, enabled=False)
        batcher.start()
        bad = batcher.submit([item(12, 3), item(13, 3)])
        good = batcher.submit([item(14, 3)])
        outcomes = await asyncio.gather(bad, good, return_exceptions=True)
        await batcher.stop()
        return outcomes

    bad, good = run(scenario())
    assert isinstance(bad, RuntimeError) and "item 13" in str(bad)
    assert good.outputs[:, 0].tolist() == [14]


def test_metrics_hook_sees_every_batch_with_padded_tokens():
    model = RecordingModel()
    metrics = RecordingMetrics()

    async def scenario():
        batcher = Batcher("embed", model, max_batch_tokens=10_000, max_batch_size=2, max_delay_ms=0.0,
                          max_queued_tokens=10_000, metrics=metrics)
        batcher.start()
        await batcher.submit([item(1, 3), item(2, 7), item(3, 10)])
        await batcher.stop()

    run(scenario())
    assert [(m, n, real, padded) for m, n, real, padded, _ in metrics.batches] == [
        ("embed", 2, 17, 20), ("embed", 1, 3, 3)]  # longest first: (10, 7) padded to 2 x 10, then (3)
    assert len(metrics.queues) == 1 and metrics.queues[0][0] == "embed"


def test_stop_drains_queued_work_then_refuses_new_work():
    model = RecordingModel(gated=True)

    async def scenario():
        batcher = make(model, max_batch_size=1)
        batcher.start()
        first = asyncio.create_task(batcher.submit([item(1, 4)]))
        second = asyncio.create_task(batcher.submit([item(2, 4)]))
        await wait_until(model.started.is_set)
        stopping = asyncio.create_task(batcher.stop(drain_timeout=30))
        await asyncio.sleep(0)
        with pytest.raises(Unavailable):
            await batcher.submit([item(3, 4)])
        model.gate.set()
        await stopping
        return await first, await second

    first, second = run(scenario())
    assert first.outputs[:, 0].tolist() == [1] and second.outputs[:, 0].tolist() == [2]


def test_waits_up_to_max_delay_for_more_work_when_idle():
    model = RecordingModel()

    async def scenario():
        batcher = make(model, max_delay_ms=1000.0)
        batcher.start()
        tasks = []
        for r in range(3):
            tasks.append(asyncio.create_task(batcher.submit([item(10 * r + 1, 4), item(10 * r + 2, 4)])))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        await batcher.stop()

    run(scenario())
    assert model.batches == [[1, 2, 11, 12, 21, 22]]


class ConcurrencyProbe(RecordingModel):
    """A RecordingModel that holds each batch briefly and records how many batches ran at the same time."""

    def __init__(self, hold_s: float = 0.05):
        super().__init__()
        self.hold_s = hold_s
        self.running = 0
        self.most_at_once = 0

    def __call__(self, batch):
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.hold_s)
            return super().__call__(batch)
        finally:
            with self.lock:
                self.running -= 1


def test_pool_runs_batches_of_one_request_on_several_workers_at_once():
    model = ConcurrencyProbe()
    pool = InferencePool(2)
    items = [item(i + 1, 10) for i in range(8)]

    async def scenario():
        batcher = make(model, max_batch_size=2, pool=pool)
        batcher.start()
        result = await batcher.submit(items)
        await batcher.stop()
        return result

    result = run(scenario())
    pool.shutdown()
    assert model.most_at_once == 2  # two workers busy, never more
    assert result.outputs[:, 0].tolist() == list(range(1, 9))  # rows back in order although batches overlapped
    assert result.stats.batches == 4


def test_shared_pool_bounds_the_batches_of_all_batchers_together():
    model = ConcurrencyProbe(hold_s=0.02)
    pool = InferencePool(2)

    async def scenario():
        first, second = make(model, max_batch_size=1, pool=pool), make(model, max_batch_size=1, pool=pool)
        first.start()
        second.start()
        results = await asyncio.gather(first.submit([item(i, 5) for i in range(1, 7)]),
                                       second.submit([item(i, 5) for i in range(11, 17)]))
        await first.stop()
        await second.stop()
        return results

    a, b = run(scenario())
    pool.shutdown()
    assert model.most_at_once == 2  # 2 workers for both models: both ran at once, never 3 or 4
    assert a.outputs[:, 0].tolist() == list(range(1, 7)) and b.outputs[:, 0].tolist() == list(range(11, 17))


def test_work_arriving_while_every_worker_is_busy_joins_the_next_batch():
    model = RecordingModel(gated=True)
    pool = InferencePool(1)

    async def scenario():
        batcher = make(model, max_delay_ms=0.0, pool=pool)
        batcher.start()
        first = asyncio.create_task(batcher.submit([item(1, 4)]))
        await wait_until(model.started.is_set)
        later = [asyncio.create_task(batcher.submit([item(m, 4)])) for m in (2, 3, 4)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(first, *later)
        await batcher.stop()

    run(scenario())
    pool.shutdown()
    assert model.batches == [[1], [2, 3, 4]]
