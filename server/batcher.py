"""Dynamic batching of model work across concurrent requests (one `Batcher` per model, asyncio).

A request submits its encoded items (texts or pairs) and awaits one `BatchResult` with a row per item, in
the caller's order. A loop task forms batches from the pending pool and runs each on a worker thread of an
`InferencePool` (ONNX Runtime releases the GIL, so the event loop keeps serving). The pool is shared by the
batchers of a process and runs at most `workers` batches at once, across models; a batch is formed only
when a worker is free, so work that arrives while every worker is busy joins the next batch.

Why several small batches at once instead of one big batch on all cores: on this 2-core CPU, 100 MS MARCO
pairs through the 12-layer int8 reranker took a median 951 ms as batches of at most 256 padded tokens on two
single-thread workers, against 1,400-1,500 ms as batches of 16 pairs on one two-thread worker (same session;
/tmp measurements recorded in docs/benchmarks.md): no per-op thread hand-offs, and a batch's activations stay
in the core's cache.

Batch limits: at most ``max_batch_size`` items and at most ``max_batch_tokens`` padded tokens (count x longest
item). An item longer than the token budget runs alone. When the loop is idle and the pending work cannot
fill a batch, it waits up to ``max_delay_ms`` after the oldest pending item arrived for more work.

Scheduling policy (fairness). Every request gets a finish tag when it is submitted::

    tag = tokens dispatched by this batcher so far + tokens of the request

and pending requests are served in tag order (ties by arrival), a batch taking items from the first request,
then the next, until a limit is reached; so one batch may carry the end of one request and the start of the
next. This is shortest-job-first measured against a clock that only moves as work is done: a small request
arriving behind a huge one gets a smaller tag and goes in the next batch, while a huge request cannot be
starved, because every later arrival's tag grows with the work dispatched meanwhile. Requests of similar
size run in arrival order, each finishing as early as possible (no round-robin smearing). Within a request,
items are taken longest first: consecutive batches hold items of similar length and pad little, and the last
batches are the shortest, so the workers finish a request's work at nearly the same time (shortest first left
one worker running a long pair alone at the end: 100 MS MARCO pairs, paired median 3 % slower).

Admission: pending (not yet dispatched) tokens are bounded by ``max_queued_tokens``; a submit that would
exceed it fails at once with `ResourceExhausted`. A request whose awaiting task is cancelled has its pending
items removed (tokens freed); a request whose deadline (``time.monotonic()`` seconds) passes before all its
items were dispatched is dropped and its caller gets `DeadlineExceeded`; expired items never reach the model.

``enabled=False`` is the no-batching baseline: each batch holds items of one request only (still split by the
limits), with no delay, requests served in the same order.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from twostage.server.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from twostage.model.tokenization import Encoded, padded_tokens


class BatchMetrics(Protocol):
    """What the batcher reports; the server wires these to Prometheus."""

    def observe_batch(self, model: str, items: int, real_tokens: int, padded_tokens: int, seconds: float) -> None: ...

    def observe_queue(self, model: str, seconds: float) -> None: ...


@dataclass
class BatchStats:
    """Where one request's model time went."""

    queue_ms: float = 0.0      # submit -> first of its items entered a batch
    inference_ms: float = 0.0  # wall time from the start of its first batch to the end of its last (batches of
                               # one request may run at once on several workers, so this is not their sum)
    batches: int = 0
    items: int = 0
    tokens: int = 0            # real (unpadded) tokens


@dataclass
class BatchResult:
    outputs: np.ndarray        # one row per submitted item, in submit order
    stats: BatchStats


class InferencePool:
    """Worker threads that run model batches: at most `workers` at once, shared by every batcher given it.

    A batcher takes a slot (`acquire`) before it forms a batch and gives it back (`release`) when the batch is
    done; waiting batchers get slots in the order they asked. Slots are per event loop (the first loop that
    acquires one owns the pool).
    """

    def __init__(self, workers: int = 1, name: str = "twostage-inference"):
        if workers <= 0:
            raise ValueError(f"inference pool: workers must be > 0 (got {workers})")
        self.workers = workers
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._slots: asyncio.Semaphore | None = None
        self._lock = threading.Lock()

    def _semaphore(self) -> asyncio.Semaphore:
        with self._lock:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.workers)
            return self._slots

    async def acquire(self) -> None:
        await self._semaphore().acquire()

    def release(self) -> None:
        self._semaphore().release()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False)


class _Request:
    """One submit's items and their progress through the batcher."""

    def __init__(self, items: Sequence[Encoded], tag: int, seq: int, deadline: float | None,
                 future: asyncio.Future):
        self.items = items
        self.order = sorted(range(len(items)), key=lambda i: -len(items[i]))  # longest first (module docstring)
        self.next = 0                      # position in `order` of the first undispatched item
        self.undispatched_tokens = sum(len(e) for e in items)
        self.remaining = len(items)        # items whose output has not arrived
        self.tag = tag
        self.seq = seq
        self.deadline = deadline
        self.future = future
        self.submitted = time.monotonic()
        self.outputs: np.ndarray | None = None
        self.first_started = float("inf")  # perf_counter span of its batches
        self.last_ended = float("-inf")
        self.stats = BatchStats(items=len(items), tokens=self.undispatched_tokens)

    @property
    def sort_key(self) -> tuple[int, int]:
        return self.tag, self.seq

    @property
    def has_pending(self) -> bool:
        return self.next < len(self.order)

    def peek_length(self, offset: int) -> int:
        return len(self.items[self.order[self.next + offset]])


class Batcher:
    """Collects items from concurrent `submit` calls into padded-token-bounded batches for one model."""

    def __init__(self, name: str, run_batch: Callable[[list[Encoded]], np.ndarray], *, max_batch_tokens: int,
                 max_batch_size: int, max_delay_ms: float, max_queued_tokens: int, enabled: bool = True,
                 pool: InferencePool | None = None, metrics: BatchMetrics | None = None):
        for knob, value in (("max_batch_tokens", max_batch_tokens), ("max_batch_size", max_batch_size),
                            ("max_queued_tokens", max_queued_tokens)):
            if value <= 0:
                raise ValueError(f"{name} batcher: {knob} must be > 0 (got {value})")
        self.name = name
        self.run_batch = run_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_delay_s = max(0.0, max_delay_ms) / 1000.0
        self.max_queued_tokens = max_queued_tokens
        self.enabled = enabled
        self.metrics = metrics
        self._own_pool = pool is None
        self.pool = pool or InferencePool(1, name=f"batcher-{name}")
        self._running: set[asyncio.Task] = set()  # batches on a worker
        self._pending: list[_Request] = []      # requests with undispatched items, in sort_key order
        self._queued_tokens = 0
        self._dispatched_tokens = 0             # the virtual clock of the finish tags
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the batch loop on the running event loop."""
        if self._task is not None:
            raise RuntimeError(f"{self.name} batcher already started")
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Refuse new work, let queued work finish for up to `drain_timeout` s, then fail the rest (Unavailable)."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=max(0.0, drain_timeout))
            except asyncio.TimeoutError:
                for task in [self._task, *self._running]:
                    task.cancel()
                await asyncio.gather(self._task, *self._running, return_exceptions=True)
            self._task = None
        for request in list(self._pending):
            self._fail(request, Unavailable(f"{self.name} batcher stopped before this request's work ran"))
        if self._own_pool:
            self.pool.shutdown()

    @property
    def queued_tokens(self) -> int:
        """Tokens submitted and not yet dispatched to the model."""
        return self._queued_tokens

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ submit
    async def submit(self, items: Sequence[Encoded], *, deadline: float | None = None) -> BatchResult:
        """Run `items` through the model (batched with other requests' items); rows come back in item order."""
        if self._closing or self._task is None:
            raise Unavailable(f"{self.name} batcher is not running")
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"{self.name}: deadline passed before the work was queued")
        future = asyncio.get_running_loop().create_future()
        request = _Request(items, 0, next(self._seq), deadline, future)
        if not items:
            return BatchResult(np.zeros((0, 0), dtype=np.float32), request.stats)
        tokens = request.undispatched_tokens
        if self._queued_tokens + tokens > self.max_queued_tokens:
            raise ResourceExhausted(
                f"{self.name} queue holds {self._queued_tokens} tokens and this request adds {tokens}; "
                f"max_queued_tokens={self.max_queued_tokens}")
        request.tag = self._dispatched_tokens + tokens
        self._enqueue(request)
        try:
            await future
        except asyncio.CancelledError:
            self._remove(request)
            raise
        return BatchResult(request.outputs, request.stats)

    def _enqueue(self, request: _Request) -> None:
        position = len(self._pending)
        while position > 0 and self._pending[position - 1].sort_key > request.sort_key:
            position -= 1
        self._pending.insert(position, request)
        self._queued_tokens += request.undispatched_tokens
        self._wake.set()

    def _remove(self, request: _Request) -> None:
        """Drop a request's undispatched items and free their tokens (idempotent)."""
        if request in self._pending:
            self._pending.remove(request)
            self._queued_tokens -= request.undispatched_tokens
            request.undispatched_tokens = 0
            request.next = len(request.order)

    def _fail(self, request: _Request, error: BaseException) -> None:
        self._remove(request)
        if not request.future.done():
            request.future.set_exception(error)

    # ------------------------------------------------------------------ batch formation
    def _drop_expired(self, now: float) -> None:
        for request in list(self._pending):
            if request.future.done():          # cancelled while we were busy
                self._remove(request)
            elif request.deadline is not None and now >= request.deadline:
                self._fail(request, DeadlineExceeded(
                    f"{self.name}: deadline passed after {(now - request.submitted) * 1000:.1f} ms in the queue, "
                    f"before all of the request's work ran"))

    def _plan(self) -> tuple[list[tuple[_Request, int]], bool]:
        """Choose the next batch without taking it: [(request, count)] and whether a limit closed it."""
        plan: list[tuple[_Request, int]] = []
        size = longest = 0
        for request in self._pending:
            count = 0
            while request.next + count < len(request.order):
                length = request.peek_length(count)
                grown = max(longest, length)
                if size > 0 and (size + 1 > self.max_batch_size or (size + 1) * grown > self.max_batch_tokens):
                    if count:
                        plan.append((request, count))
                    return plan, True
                size, longest, count = size + 1, grown, count + 1
            plan.append((request, count))
            if not self.enabled:
                return plan, True
        return plan, size >= self.max_batch_size

    def _take(self, plan: list[tuple[_Request, int]]) -> tuple[list[Encoded], list[tuple[_Request, list[int]]]]:
        """Remove the planned items from the pending pool; return the batch and where each row belongs."""
        batch: list[Encoded] = []
        owners: list[tuple[_Request, list[int]]] = []
        now = time.monotonic()
        for request, count in plan:
            indices = request.order[request.next:request.next + count]
            if request.next == 0:
                request.stats.queue_ms = (now - request.submitted) * 1000.0
                if self.metrics is not None:
                    self.metrics.observe_queue(self.name, now - request.submitted)
            request.next += count
            tokens = sum(len(request.items[i]) for i in indices)
            request.undispatched_tokens -= tokens
            self._queued_tokens -= tokens
            self._dispatched_tokens += tokens
            if not request.has_pending:
                self._pending.remove(request)
            batch.extend(request.items[i] for i in indices)
            owners.append((request, indices))
        return batch, owners

    async def _work_ready(self) -> bool:
        """Wait until a batch should be formed (full, or the oldest item waited max_delay_ms); False when
        stopping with nothing left."""
        while True:
            self._drop_expired(time.monotonic())
            if not self._pending:
                if self._closing:
                    return False
                self._wake.clear()
                await self._wake.wait()
                continue
            _, full = self._plan()
            oldest = min(r.submitted for r in self._pending)
            wait = oldest + self.max_delay_s - time.monotonic()
            if full or wait <= 0 or not self.enabled or self._closing:
                return True
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------------ execution
    def _timed_run(self, batch: list[Encoded]) -> tuple[np.ndarray, float, float]:
        started = time.perf_counter()
        outputs = self.run_batch(batch)
        return outputs, started, time.perf_counter()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while await self._work_ready():
                await self.pool.acquire()
                # The batch is formed now, with everything that arrived while waiting for the worker.
                self._drop_expired(time.monotonic())
                if not self._pending:
                    self.pool.release()
                    continue
                plan, _ = self._plan()
                batch, owners = self._take(plan)
                task = loop.create_task(self._run(loop, batch, owners), name=f"batch-{self.name}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)
        except asyncio.CancelledError:
            for task in list(self._running):
                task.cancel()
            raise

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Encoded],
                   owners: list[tuple[_Request, list[int]]]) -> None:
        """Run one batch on a pool worker (the slot is already held; released here) and hand out its rows."""
        try:
            outputs, started, ended = await loop.run_in_executor(self.pool.executor, self._timed_run, batch)
            outputs = np.asarray(outputs)
            if len(outputs) != len(batch):
                raise RuntimeError(f"{self.name}: model returned {len(outputs)} rows for a batch of {len(batch)}")
        except asyncio.CancelledError:
            for request, _ in owners:
                self._fail(request, Unavailable(f"{self.name} batcher stopped while this request's work ran"))
            raise
        except Exception as exc:  # the model failed: every request in the batch fails with it
            for request, _ in owners:
                self._fail(request, exc)
            return
        finally:
            self.pool.release()
        if self.metrics is not None:
            self.metrics.observe_batch(self.name, len(batch), sum(len(e) for e in batch),
                                       padded_tokens(batch), ended - started)
        self._deliver(outputs, started, ended, owners)

    def _deliver(self, outputs: np.ndarray, started: float, ended: float,
                 owners: list[tuple[_Request, list[int]]]) -> None:
        row = 0
        for request, indices in owners:
            rows = outputs[row:row + len(indices)]
            row += len(indices)
            if request.future.done():       # cancelled, expired or failed meanwhile
                continue
            if request.outputs is None:
                request.outputs = np.empty((len(request.items),) + rows.shape[1:], dtype=rows.dtype)
            request.outputs[indices] = rows
            request.first_started = min(request.first_started, started)
            request.last_ended = max(request.last_ended, ended)
            request.stats.inference_ms = (request.last_ended - request.first_started) * 1000.0
            request.stats.batches += 1
            request.remaining -= len(indices)
            if request.remaining == 0:
                request.future.set_result(None)
