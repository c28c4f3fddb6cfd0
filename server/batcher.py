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
fill a batch, it waits up to ``max_delay_ms`` after the oldest pending item arrived for more work (not while
budgeted work is pending: it was planned to start at once).

Cost model: each batcher keeps a `CostModel` (server/cost.py) of its model's batch time on one worker (fixed
+ per padded token), refitted after every batch from its measured duration. It predicts when running batches
end, how long queued work will take, and whether a batch can finish before a deadline.

Scheduling policy (fairness). Every request gets a finish tag when it is submitted::

    tag = tokens dispatched by this batcher so far + the request's size

and pending requests are served in tag order (ties by arrival), a batch taking items from the first request,
then the next, until a limit is reached; so one batch may carry the end of one request and the start of the
next. This is shortest-job-first measured against a clock that only moves as work is done: a small request
arriving behind a huge one gets a smaller tag and goes in the next batch, while a huge request cannot be
starved, because every later arrival's tag grows with the work dispatched meanwhile. Requests of similar
size run in arrival order, each finishing as early as possible (no round-robin smearing). Within a request,
items are taken longest first: consecutive batches hold items of similar length and pad little, and the last
batches are the shortest, so the workers finish a request's work at nearly the same time (shortest first left
one worker running a long pair alone at the end: 100 MS MARCO pairs, paired median 3 % slower).

A request served on time is never overdue: the clock advances with its own items. One whose tag the clock has
passed (it waited for its turn behind others, like a big index build) would then run all its remaining items
ahead of everything that arrives later; instead, each time some of its items are dispatched, the rest is
re-tagged behind the clock by what it just got (``clock + tokens just dispatched``, about a batch). Later
arrivals smaller than that interleave with it, so no one waits behind the rest of a long request for more than
about one batch per worker, while the overdue request is served like one more client taking turns (fair
queuing): a batch's worth after each request that was waiting with a smaller tag.

A request's size is its tokens. A *budgeted* request (below) is placed by its deadline instead: with ``slack``
the tokens the pool can run before the deadline (time left x the pool's token rate from the cost model), its
size is ``(slack - tokens) / 2``, halfway from now to its latest start on the virtual clock (which, while the
pool is saturated, advances at the token rate). Among budgeted requests this is least-laxity-first, a form of
earliest deadline first that also puts the request with more work to do before its deadline first; requests of
one budget arriving in turn are served in turn, so what each planned (`plan_prefix`) against the work queued
ahead of it holds. Against unbudgeted work the halfway point leaves room to absorb a misestimate while still
letting small requests that arrive meanwhile go first. It cannot starve anyone: its tag is still at least the
clock at its submit, so a request with tag T can be overtaken only by later arrivals submitted before the
clock reaches T, as for any small request; a flood of budgeted work delays the start of an index build by at
most the build's own size in dispatched tokens, after which the build takes turns with it (overdue, above).
The price of that guarantee: while an older request is overdue, budgeted work that arrives shares the workers
with it and degrades (returns less).

Priority between batchers (one pool, several models). Each submit has a `Priority`: INTERACTIVE (a query
embedding, work a caller waits on before anything else can proceed), NORMAL, or BULK (index builds, upserts).
When a worker frees, it goes to the waiting batcher whose most urgent pending request has the earliest
urgency time::

    urgency = waiting since + WAIT_ALLOWANCE_S[priority]      (and at most its deadline, when budgeted)

where "waiting since" is when that batcher began waiting for this worker (about when it was last given one).
A query embedding therefore gets the next free worker ahead of rerank batches, a budgeted request whose
deadline is near ahead of both, and no class starves: a batcher waiting with work of a lower class gets a
worker at the latest once it has waited the difference of the allowances longer than the others, so under
saturation by more urgent work NORMAL work gets a worker at least every 100 ms, BULK work every 150 ms
against NORMAL and 250 ms against INTERACTIVE. Without a callback the pool serves waiters in arrival order.

No head-of-line blocking: with ``free_worker_within_ms`` > 0 on the pool, a batch that does not start with
INTERACTIVE work is cut to a predicted ``free_worker_within_ms`` whenever no other worker is predicted to
free within that bound (a batch running past its predicted end counts as not freeing), so some worker always
frees within the bound for latency-critical work that arrives (the price: while the pool is saturated one
worker runs short batches, each paying the model's fixed batch cost).

Budgeted requests (``submit(..., budgeted=True)``, which needs a deadline) degrade instead of failing: an item
is started only in a batch predicted (cost model `upper`, the batch starting now on a free worker) to end by
the deadlines of the budgeted items in it; an item that could not end in time even alone is dropped, and at
the deadline every undispatched item is dropped and the caller gets the rows that are done
(`BatchResult.completed`). Dropped work never reaches the model. A request that is done early returns early.

Admission: pending (not yet dispatched) tokens are bounded by ``max_queued_tokens``; a submit that would
exceed it fails at once with `ResourceExhausted`. A request whose awaiting task is cancelled has its pending
items removed (tokens freed); an unbudgeted request whose deadline (``time.monotonic()`` seconds) passes
before all its items were dispatched is dropped and its caller gets `DeadlineExceeded`; expired items never
reach the model. `predict_wait` tells a caller, before it submits, when its work is predicted to be done, so a
deadline that cannot be met can be refused at once; `plan_prefix` tells a budgeted caller how many of its
items fit.

``enabled=False`` is the no-batching baseline: each batch holds items of one request only (still split by the
limits), with no delay, requests served in the same order.
"""
from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from twostage.model.tokenization import Encoded, padded_tokens
from twostage.server.cost import CostModel
from twostage.server.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from twostage.server.planner import affordable_prefix, batch_fits, finish_in

log = logging.getLogger("twostage.batcher")


class Priority(enum.IntEnum):
    """How long a request's work may wait for a worker while other models' work goes first (module docstring)."""

    INTERACTIVE = 0   # a caller waits on it before anything else can proceed (a query embedding)
    NORMAL = 1
    BULK = 2          # index builds, upserts


WAIT_ALLOWANCE_S = {Priority.INTERACTIVE: 0.0, Priority.NORMAL: 0.1, Priority.BULK: 0.25}

# From forming a batch to its rows reaching the caller, beyond the model's own time: the hand-off to the
# worker thread and back to the event loop. Deadline checks add it to a batch's predicted duration.
START_LATENCY_S = 0.001
# `plan_prefix` plans to end this much before the deadline: the start latency plus the event-loop turns between
# planning and the batches being formed, so that the batcher's own check does not cut off the plan's tail.
PLAN_SLACK_S = 0.002


class BatchMetrics(Protocol):
    """What the batcher reports; the server wires these to Prometheus."""

    def observe_batch(self, model: str, items: int, real_tokens: int, padded_tokens: int, seconds: float) -> None: ...

    def observe_queue(self, model: str, seconds: float) -> None: ...

    def observe_cost(self, model: str, fixed_s: float, per_token_s: float, spread: float) -> None: ...

    def observe_dropped(self, model: str, items: int) -> None: ...


@dataclass
class BatchStats:
    """Where one request's model time went."""

    queue_ms: float = 0.0      # submit -> first of its items entered a batch
    inference_ms: float = 0.0  # wall time from the start of its first batch to the end of its last (batches of
                               # one request may run at once on several workers, so this is not their sum)
    batches: int = 0
    items: int = 0
    tokens: int = 0            # real (unpadded) tokens
    dropped: int = 0           # items of a budgeted request not run: they could not end before its deadline


@dataclass
class BatchResult:
    outputs: np.ndarray        # one row per submitted item, in submit order (NaN rows where not completed)
    stats: BatchStats
    # bool per item: its row is the model's output; left out = every row
    completed: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.completed is None:
            self.completed = np.ones(len(self.outputs), dtype=bool)

    @property
    def partial(self) -> bool:
        """Whether a deadline left some items without output (budgeted submits only)."""
        return not bool(self.completed.all())


class Worker:
    """One held pool slot; `busy_until` is when its current batch is predicted to end (time.monotonic s)."""

    __slots__ = ("busy_until",)

    def __init__(self, busy_until: float):
        self.busy_until = busy_until


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (Linux schedules threads apart). Model batches then yield
    the CPU to the event loop and the gRPC threads, which answer requests and feed the batches: on a machine with
    no core to spare, a query's parse, ANN search and reply otherwise wait behind running batches."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as exc:   # not Linux, or not allowed: run at the process's priority
        log.warning("inference threads keep the process's priority: %s", exc)


class InferencePool:
    """Worker threads that run model batches: at most `workers` at once, shared by every batcher given it.

    A batcher takes a slot (`acquire`, which returns a `Worker`) before it forms a batch and gives it back
    (`release`) when the batch is done. When a slot frees and several batchers wait, it goes to the one whose
    `urgency` callback returns the earliest time, ties (and waiters without a callback, whose urgency is when
    they asked) in the order they asked. The state is per event loop: use one pool from one loop.

    ``free_worker_within_ms``: see `batch_time_limit` and the module docstring (0 = off).
    """

    def __init__(self, workers: int = 1, name: str = "twostage-inference", *, free_worker_within_ms: float = 0.0,
                 nice: int = 0):
        if workers <= 0:
            raise ValueError(f"inference pool: workers must be > 0 (got {workers})")
        if free_worker_within_ms < 0:
            raise ValueError(f"inference pool: free_worker_within_ms must be >= 0 (got {free_worker_within_ms})")
        if not 0 <= nice <= 19:
            raise ValueError(f"inference pool: nice must be between 0 and 19 (got {nice})")
        self.workers = workers
        self.free_worker_within_s = free_worker_within_ms / 1000.0
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name,
                                           initializer=lower_thread_priority, initargs=(nice,))
        self._free = workers
        self._busy: set[Worker] = set()
        self._waiters: list[tuple[int, Callable[[], float], asyncio.Future]] = []
        self._seq = itertools.count()

    async def acquire(self, urgency: Callable[[], float] | None = None) -> Worker:
        """Wait for a free slot; `urgency` (read when a slot frees) orders this waiter among the others."""
        if self._free > 0 and not self._waiters:
            return self._grant()
        asked = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        waiter = (next(self._seq), urgency or (lambda: asked), future)
        self._waiters.append(waiter)
        try:
            return await future
        except asyncio.CancelledError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif future.done() and not future.cancelled():
                self.release(future.result())      # granted as we were cancelled: pass it on
            raise

    def _grant(self) -> Worker:
        self._free -= 1
        worker = Worker(time.monotonic())
        self._busy.add(worker)
        return worker

    def release(self, worker: Worker) -> None:
        """Give a slot back (once; a second release of the same `Worker` does nothing)."""
        if worker not in self._busy:
            return
        self._busy.remove(worker)
        self._free += 1
        while self._waiters:
            waiter = min(self._waiters, key=lambda w: (w[1](), w[0]))
            self._waiters.remove(waiter)
            if not waiter[2].done():               # a cancelled waiter is skipped
                waiter[2].set_result(self._grant())
                return

    def free_in(self, now: float) -> list[float]:
        """Seconds from `now` until each worker is predicted free (0 for a free one); one entry per worker."""
        return [max(0.0, w.busy_until - now) for w in self._busy] + [0.0] * self._free

    def batch_time_limit(self, worker: Worker, now: float) -> float | None:
        """Most seconds the batch about to run on `worker` should take so that some worker frees within
        ``free_worker_within_ms``; None when another worker already will (or the bound is off). A batch already
        past its predicted end (or a worker granted and not yet given its batch) may run on: it does not count."""
        bound = self.free_worker_within_s
        if bound <= 0 or self._free > 0:
            return None
        if any(now < w.busy_until <= now + bound for w in self._busy if w is not worker):
            return None
        return bound

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False)


class _Request:
    """One submit's items and their progress through the batcher."""

    def __init__(self, items: Sequence[Encoded], tag: int, seq: int, deadline: float | None,
                 future: asyncio.Future, *, budgeted: bool = False, priority: Priority = Priority.NORMAL):
        self.items = items
        self.order = sorted(range(len(items)), key=lambda i: -len(items[i]))  # longest first (module docstring)
        self.next = 0                      # position in `order` of the first undispatched item
        self.dispatched = False            # some item has entered a batch
        self.undispatched_tokens = sum(len(e) for e in items)
        self.remaining = len(items)        # items neither done nor dropped
        self.tag = tag
        self.seq = seq
        self.deadline = deadline
        self.budgeted = budgeted
        # when budgeted work must end (submit guarantees budgeted work a deadline); never for other work
        self.end = deadline if budgeted and deadline is not None else float("inf")
        self.priority = priority
        self.future = future
        self.submitted = time.monotonic()
        self.outputs: np.ndarray | None = None
        self.completed = np.zeros(len(items), dtype=bool)
        self.timer: asyncio.TimerHandle | None = None
        self.first_started = float("inf")  # perf_counter span of its batches
        self.last_ended = float("-inf")
        self.stats = BatchStats(items=len(items), tokens=self.undispatched_tokens)

    @property
    def sort_key(self) -> tuple[int, int]:
        return self.tag, self.seq

    @property
    def has_pending(self) -> bool:
        return self.next < len(self.order)

    @property
    def undispatched_items(self) -> int:
        return len(self.order) - self.next

    def peek_length(self, offset: int) -> int:
        return len(self.items[self.order[self.next + offset]])


class Batcher:
    """Collects items from concurrent `submit` calls into padded-token-bounded batches for one model."""

    def __init__(self, name: str, run_batch: Callable[[list[Encoded]], np.ndarray], *, max_batch_tokens: int,
                 max_batch_size: int, max_delay_ms: float, max_queued_tokens: int, enabled: bool = True,
                 pool: InferencePool | None = None, metrics: BatchMetrics | None = None,
                 cost: CostModel | None = None):
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
        self.cost = cost or CostModel(token_scale=max_batch_tokens)
        self._own_pool = pool is None
        self.pool = pool or InferencePool(1, name=f"batcher-{name}")
        self._running: set[asyncio.Task] = set()  # batches on a worker
        self._pending: list[_Request] = []      # requests with undispatched items, in sort_key order
        self._queued_tokens = 0
        self._dispatched_tokens = 0             # the virtual clock of the finish tags
        self._padding = 1.0                     # recent padded / real tokens per batch (predicting queued work)
        self._waiting_since = 0.0               # when the loop began waiting for a worker
        self._seq = itertools.count()
        self._wake = asyncio.Event()
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
            except TimeoutError:
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
    async def submit(self, items: Sequence[Encoded], *, deadline: float | None = None, budgeted: bool = False,
                     priority: Priority = Priority.NORMAL) -> BatchResult:
        """Run `items` through the model (batched with other requests' items); rows come back in item order.

        `deadline` is a time.monotonic() instant. Unbudgeted, the request fails with DeadlineExceeded when it
        passes before all its items were dispatched. ``budgeted=True`` (needs a deadline): what cannot end by
        the deadline is not run and the result says which rows are done (`BatchResult.completed`)."""
        if budgeted and deadline is None:
            raise ValueError(f"{self.name}: a budgeted submit needs a deadline")
        if self._closing or self._task is None:
            raise Unavailable(f"{self.name} batcher is not running")
        now = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        request = _Request(items, 0, next(self._seq), deadline, future, budgeted=budgeted, priority=priority)
        if deadline is not None and now >= deadline:
            if not budgeted:
                raise DeadlineExceeded(f"{self.name}: deadline passed before the work was queued")
            request.remaining = 0
            self._count_dropped(request, len(items))
            return self._result(request)
        if not items:
            return BatchResult(np.zeros((0, 0), dtype=np.float32), request.stats)
        tokens = request.undispatched_tokens
        if self._queued_tokens + tokens > self.max_queued_tokens:
            raise ResourceExhausted(
                f"{self.name} queue holds {self._queued_tokens} tokens and this request adds {tokens}; "
                f"max_queued_tokens={self.max_queued_tokens}")
        request.tag = self._dispatched_tokens + self._size(tokens, deadline if budgeted else None, now)
        self._enqueue(request)
        if budgeted:
            request.timer = asyncio.get_running_loop().call_later(request.end - now, self._expire, request)
        try:
            await future
        except asyncio.CancelledError:
            self._remove(request)
            raise
        finally:
            if request.timer is not None:
                request.timer.cancel()
        return self._result(request)

    def _size(self, tokens: int, budget_deadline: float | None, now: float) -> int:
        """A request's size for its finish tag: its tokens, or for a budgeted one half its virtual laxity (the
        tokens the pool can run before its deadline less its own; module docstring)."""
        if budget_deadline is None:
            return tokens
        rate = self.pool.workers * self.max_batch_tokens / max(self.cost.predict(self.max_batch_tokens), 1e-9)
        slack = max(0.0, budget_deadline - now) * rate
        return max(0, int((slack - tokens) / 2))

    def _result(self, request: _Request) -> BatchResult:
        outputs = request.outputs
        if outputs is None:
            outputs = np.full((len(request.items), 0), np.nan, dtype=np.float32)
        elif not request.completed.all() and outputs.dtype.kind == "f":
            outputs[~request.completed] = np.nan
        return BatchResult(outputs, request.stats, request.completed.copy())

    def _enqueue(self, request: _Request) -> None:
        self._insert(request)
        self._queued_tokens += request.undispatched_tokens
        self._wake.set()

    def _insert(self, request: _Request) -> None:
        """Put a request into the pending pool at its sort_key."""
        position = len(self._pending)
        while position > 0 and self._pending[position - 1].sort_key > request.sort_key:
            position -= 1
        self._pending.insert(position, request)

    def _remove(self, request: _Request) -> int:
        """Drop a request's undispatched items and free their tokens (idempotent); returns how many."""
        dropped = 0
        if request in self._pending:
            self._pending.remove(request)
            self._queued_tokens -= request.undispatched_tokens
            request.undispatched_tokens = 0
            dropped = request.undispatched_items
            request.next = len(request.order)
        return dropped

    def _fail(self, request: _Request, error: BaseException) -> None:
        self._remove(request)
        if not request.future.done():
            request.future.set_exception(error)

    def _count_dropped(self, request: _Request, items: int) -> None:
        if items:
            request.stats.dropped += items
            if self.metrics is not None:
                self.metrics.observe_dropped(self.name, items)

    def _expire(self, request: _Request) -> None:
        """A budgeted request's deadline: drop its undispatched items and hand back what is done."""
        dropped = self._remove(request)
        request.remaining -= dropped
        self._count_dropped(request, dropped)
        if not request.future.done():
            request.future.set_result(None)
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------ predictions
    def _work_ahead_s(self, tag: int) -> float:
        """Worker-seconds of the pending work that a new request with finish tag `tag` would queue behind: of
        each request with a smaller tag, what the clock lets run before `tag`, at most ``tag - clock`` tokens
        (more of a long one would make it overdue, and it would then take turns)."""
        window = max(0, tag - self._dispatched_tokens)
        tokens = items = 0.0
        for request in self._pending:
            if request.tag <= tag and request.undispatched_tokens:
                share = min(request.undispatched_tokens, window)
                tokens += share
                items += request.undispatched_items * share / request.undispatched_tokens
        if not tokens:
            return 0.0
        padded = tokens * self._padding
        batches = max(math.ceil(padded / self.max_batch_tokens), math.ceil(items / self.max_batch_size))
        return batches * self.cost.predict(padded / batches)

    def predict_wait(self, lengths: Sequence[int], *, deadline: float | None = None, budgeted: bool = False) -> float:
        """Seconds from now until a request whose items have these token lengths, submitted now, is predicted to
        be done: behind this batcher's pending work that would go first and the batches running on the pool.
        Other models' queued work is not counted (it may go first only by priority), so the figure is a floor
        fit to refuse a deadline that cannot be met (fail fast), not to promise one."""
        now = time.monotonic()
        tag = self._dispatched_tokens + self._size(sum(lengths), deadline if budgeted else None, now)
        return finish_in(lengths, cost=self.cost, free_in=self.pool.free_in(now), ahead_s=self._work_ahead_s(tag),
                         max_batch_size=self.max_batch_size, max_batch_tokens=self.max_batch_tokens, safe=False)

    def plan_prefix(self, lengths: Sequence[int], *, deadline: float) -> int:
        """How many of `lengths` (a prefix, in the caller's order) a budgeted submit made now can expect to have
        done by `deadline`, behind the work queued ahead and on the workers as they free (`affordable_prefix`)."""
        now = time.monotonic()
        tag = self._dispatched_tokens + self._size(sum(lengths), deadline, now)
        return affordable_prefix(lengths, time_left_s=deadline - now - PLAN_SLACK_S, cost=self.cost,
                                 free_in=self.pool.free_in(now), ahead_s=self._work_ahead_s(tag),
                                 max_batch_size=self.max_batch_size, max_batch_tokens=self.max_batch_tokens)

    # ------------------------------------------------------------------ batch formation
    def _drop_expired(self, now: float) -> None:
        """Remove cancelled requests, fail unbudgeted requests past their deadline, and for budgeted ones drop
        items that could not end by the deadline even if started now (or all of them, once it has passed)."""
        for request in list(self._pending):
            if request.future.done():          # cancelled while we were busy
                self._remove(request)
            elif request.budgeted:
                if now >= request.end:
                    self._expire(request)
                    continue
                dropped = 0
                while request.has_pending and \
                        now + START_LATENCY_S + self.cost.upper(request.peek_length(0)) > request.end:
                    length = request.peek_length(0)
                    request.next += 1
                    request.undispatched_tokens -= length
                    self._queued_tokens -= length
                    dropped += 1
                if dropped:
                    request.remaining -= dropped
                    self._count_dropped(request, dropped)
                    if not request.has_pending:
                        self._pending.remove(request)
                    if request.remaining == 0:
                        request.future.set_result(None)
            elif request.deadline is not None and now >= request.deadline:
                self._fail(request, DeadlineExceeded(
                    f"{self.name}: deadline passed after {(now - request.submitted) * 1000:.1f} ms in the queue, "
                    f"before all of the request's work ran"))

    def _plan(self, now: float, worker: Worker | None = None) -> tuple[list[tuple[_Request, int]], bool]:
        """Choose the next batch, to start at `now`, without taking it: [(request, count)] and whether a limit
        closed it. On `worker`, a batch not led by INTERACTIVE work obeys the pool's `batch_time_limit`."""
        token_limit = None
        if worker is not None and self._pending and self._pending[0].priority != Priority.INTERACTIVE:
            seconds = self.pool.batch_time_limit(worker, now)
            if seconds is not None:
                token_limit = self.cost.tokens_within(seconds)
        plan: list[tuple[_Request, int]] = []
        size = longest = 0
        must_end = float("inf")                # earliest deadline of the budgeted items taken
        for request in self._pending:
            count = 0
            own_end = request.end
            while request.next + count < len(request.order):
                length = request.peek_length(count)
                grown = max(longest, length)
                # a lone item always fits: the one that could not end by its deadline was dropped already
                if size > 0 and (
                        not batch_fits(size, longest, length, max_batch_size=self.max_batch_size,
                                       max_batch_tokens=self.max_batch_tokens, token_limit=token_limit)
                        or now + START_LATENCY_S + self.cost.upper((size + 1) * grown) > min(must_end, own_end)):
                    if count:
                        plan.append((request, count))
                    return plan, True
                size, longest, count = size + 1, grown, count + 1
                must_end = min(must_end, own_end)
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
            if not request.dispatched:
                request.dispatched = True
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
        for request, indices in owners:
            if request.has_pending and request.tag <= self._dispatched_tokens:
                # Overdue (the clock passed its tag): its rest goes behind the clock by what it just got.
                self._pending.remove(request)
                request.tag = self._dispatched_tokens + sum(len(request.items[i]) for i in indices)
                self._insert(request)
        return batch, owners

    def _urgency(self) -> float:
        """When a worker should come to this batcher at the latest (module docstring: priority between batchers)."""
        best = float("inf")
        for request in self._pending:
            urgency = self._waiting_since + WAIT_ALLOWANCE_S[request.priority]
            if request.budgeted:
                urgency = min(urgency, request.end)
            best = min(best, urgency)
        return best

    async def _work_ready(self) -> bool:
        """Wait until a batch should be formed (full, or the oldest item waited max_delay_ms); False when
        stopping with nothing left."""
        while True:
            now = time.monotonic()
            self._drop_expired(now)
            if not self._pending:
                if self._closing:
                    return False
                self._wake.clear()
                await self._wake.wait()
                continue
            _, full = self._plan(now)
            oldest = min(r.submitted for r in self._pending)
            wait = oldest + self.max_delay_s - time.monotonic()
            if full or wait <= 0 or not self.enabled or self._closing or any(r.budgeted for r in self._pending):
                return True
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except TimeoutError:
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
                self._waiting_since = time.monotonic()
                worker = await self.pool.acquire(self._urgency)
                # The batch is formed now, with everything that arrived while waiting for the worker.
                now = time.monotonic()
                self._drop_expired(now)
                if not self._pending:
                    self.pool.release(worker)
                    continue
                plan, _ = self._plan(now, worker)
                batch, owners = self._take(plan)
                padded = padded_tokens(batch)
                worker.busy_until = now + self.cost.predict(padded)
                task = loop.create_task(self._run(loop, batch, owners, worker), name=f"batch-{self.name}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)
        except asyncio.CancelledError:
            for task in list(self._running):
                task.cancel()
            raise

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Encoded],
                   owners: list[tuple[_Request, list[int]]], worker: Worker) -> None:
        """Run one batch on a pool worker (`worker` is already held; released here) and hand out its rows."""
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
            self.pool.release(worker)
        padded = padded_tokens(batch)
        real = sum(len(e) for e in batch)
        self.cost.observe(padded, ended - started)
        if real:
            self._padding = 0.9 * self._padding + 0.1 * padded / real
        if self.metrics is not None:
            self.metrics.observe_batch(self.name, len(batch), real, padded, ended - started)
            self.metrics.observe_cost(self.name, self.cost.fixed_s, self.cost.per_token_s, self.cost.spread)
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
            request.completed[indices] = True
            request.first_started = min(request.first_started, started)
            request.last_ended = max(request.last_ended, ended)
            request.stats.inference_ms = (request.last_ended - request.first_started) * 1000.0
            request.stats.batches += 1
            request.remaining -= len(indices)
            if request.remaining == 0:
                request.future.set_result(None)
