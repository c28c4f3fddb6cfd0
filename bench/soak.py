"""Soak test: mixed Search / Rerank / Upsert load at the edge of capacity, on loopback, for a bounded time.

    python -m bench.soak --models models                 # 5 minutes (default --duration 300)
    python -m bench.soak --models models --duration 120
    python -m bench.soak --models DIR --quick            # 30 s smoke run; figures meaningless

What it does:

1. starts the real server in a child process (`bench.common.ServerProcess`, loopback ports, a fresh index in a
   temporary directory) with a bounded `max_concurrent_rpcs`, and seeds the index with synthetic documents
   written here (no dataset text);
2. calibrates: a closed loop of `--concurrency` callers runs the mix for `--calibrate` seconds; the completed
   requests per second are the capacity;
3. soaks: an open loop sends the same mix as Poisson arrivals at `--load` x capacity (1.0 = the edge) for
   `--duration` seconds, every call with a `--deadline`. Upserts replace documents within a fixed id range, so
   the index size stays bounded and memory growth means a leak, not more data.

It reports, per `--window` seconds (by request start): requests by status code, p50/p99 latency of the
successful calls (overall and per RPC), and the server's RSS at the window's end; then the totals and the RSS
growth from the start of the soak to its end. Verdict (exit status 1 when it fails): no status outside
OK / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED, the server still SERVING and answering at the end, and RSS growth
below `--rss-growth-limit` (default 10 %). Timings are reported, never asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (ServerProcess, base_parser, finish_common_args, format_table, save_result, server_threads,
                          summarize)

EXPECTED_CODES = {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
KINDS = ("search", "rerank", "upsert")

# Synthetic text: sentences assembled from these words (written for this benchmark).
SUBJECTS = ["the river", "a small boat", "the old bridge", "a mountain trail", "the city library", "a coffee shop",
            "the night train", "a garden hose", "the school choir", "a wind turbine", "the harbour crane",
            "a chess club", "the bakery oven", "a solar panel", "the bike lane", "a weather balloon"]
VERBS = ["crosses", "needs", "powers", "follows", "opens near", "waits for", "carries", "protects", "warms",
         "replaces", "measures", "feeds", "lights", "slows", "repairs", "joins"]
OBJECTS = ["the valley", "fresh bread", "the morning market", "a quiet street", "the winter storm", "old maps",
           "the evening tide", "a broken fence", "the first snow", "the station clock", "warm soup", "a red kite",
           "the stone wall", "the rain gauge", "the ferry dock", "a paper lantern"]


def sentence(rng: np.random.Generator) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"


def passage(rng: np.random.Generator, sentences: int) -> str:
    return ". ".join(sentence(rng) for _ in range(sentences)).capitalize() + "."


@dataclass
class Record:
    start_s: float      # since the phase began
    kind: str
    code: str
    latency_s: float


class Load:
    """Builds requests for the mix and calls the server over one grpc.aio channel."""

    def __init__(self, target: str, args: argparse.Namespace, corpus_ids: list[str], seed: int):
        import grpc

        from twostage.v1 import twostage_pb2 as pb
        from twostage.v1 import twostage_pb2_grpc as pb_grpc

        self.grpc = grpc
        self.pb = pb
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.TwoStageStub(self.channel)
        self.args = args
        self.corpus_ids = corpus_ids
        self.rng = np.random.default_rng(seed)
        weights = np.array([args.search_weight, args.rerank_weight, args.upsert_weight], dtype=np.float64)
        self.weights = weights / weights.sum()

    def pick(self) -> str:
        return str(self.rng.choice(KINDS, p=self.weights))

    async def call(self, kind: str) -> tuple[str, float]:
        pb, args = self.pb, self.args
        if kind == "search":
            request, method = pb.SearchRequest(query=sentence(self.rng), top_k=10, candidates=args.candidates), \
                self.stub.Search
        elif kind == "rerank":
            request = pb.RerankRequest(query=sentence(self.rng),
                                       texts=[passage(self.rng, 3) for _ in range(args.rerank_documents)])
            method = self.stub.Rerank
        else:
            ids = self.rng.choice(args.upsert_ids, size=args.upsert_batch, replace=False)
            request = pb.UpsertRequest(documents=[pb.Document(id=f"soak-{i}", text=passage(self.rng, 4))
                                                  for i in ids])
            method = self.stub.Upsert
        started = time.perf_counter()
        try:
            await method(request, timeout=args.deadline)
            code = "OK"
        except self.grpc.aio.AioRpcError as err:
            code = err.code().name
        return code, time.perf_counter() - started

    async def close(self) -> None:
        await self.channel.close()


async def closed_loop(load: Load, concurrency: int, seconds: float) -> list[Record]:
    records: list[Record] = []
    t0 = time.perf_counter()

    async def caller() -> None:
        while time.perf_counter() - t0 < seconds:
            kind = load.pick()
            start = time.perf_counter() - t0
            code, latency = await load.call(kind)
            records.append(Record(start, kind, code, latency))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return records


async def open_loop(load: Load, rate: float, seconds: float, max_outstanding: int, window_s: float,
                    sample_rss) -> tuple[list[Record], list[tuple[float, int]]]:
    """Poisson arrivals at `rate`/s; arrivals beyond `max_outstanding` are counted as CLIENT_BACKLOG."""
    records: list[Record] = []
    rss: list[tuple[float, int]] = []
    outstanding: set[asyncio.Task] = set()
    t0 = time.perf_counter()

    async def one(kind: str, start: float) -> None:
        code, latency = await load.call(kind)
        records.append(Record(start, kind, code, latency))

    async def sampler() -> None:
        k = 1
        while True:
            await asyncio.sleep(max(0.0, t0 + k * window_s - time.perf_counter()))
            rss.append((time.perf_counter() - t0, sample_rss()))
            k += 1

    sampling = asyncio.create_task(sampler())
    next_at = 0.0
    while True:
        next_at += float(load.rng.exponential(1.0 / rate))
        if next_at >= seconds:
            break
        await asyncio.sleep(max(0.0, t0 + next_at - time.perf_counter()))
        kind = load.pick()
        if len(outstanding) >= max_outstanding:
            records.append(Record(next_at, kind, "CLIENT_BACKLOG", 0.0))
            continue
        task = asyncio.create_task(one(kind, time.perf_counter() - t0))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
    if outstanding:
        await asyncio.gather(*outstanding)
    sampling.cancel()
    rss.append((time.perf_counter() - t0, sample_rss()))
    return records, rss


def window_rows(records: list[Record], rss: list[tuple[float, int]], window_s: float,
                seconds: float) -> list[dict[str, Any]]:
    rows = []
    for w in range(int(np.ceil(seconds / window_s))):
        lo, hi = w * window_s, (w + 1) * window_s
        inside = [r for r in records if lo <= r.start_s < hi]
        ok = [r.latency_s * 1000 for r in inside if r.code == "OK"]
        per_kind = {k: summarize([r.latency_s * 1000 for r in inside if r.code == "OK" and r.kind == k])
                    for k in KINDS}
        rss_at = next((b for t, b in rss if t >= hi - 0.5), rss[-1][1] if rss else 0)
        rows.append({"window": f"{lo:.0f}-{hi:.0f}s", "requests": len(inside),
                     "ok_per_s": len(ok) / window_s,
                     "codes": dict(Counter(r.code for r in inside)),
                     "latency_ms": summarize(ok), "latency_ms_by_rpc": per_kind, "rss_mib": rss_at / 2**20})
    return rows


def seed_index(server: ServerProcess, count: int, seed: int) -> list[str]:
    from twostage.v1 import twostage_pb2 as pb

    rng = np.random.default_rng(seed)
    stub = server.stub()
    ids = [f"seed-{i}" for i in range(count)]
    for start in range(0, count, 64):
        docs = [pb.Document(id=i, title=sentence(rng), text=passage(rng, 5)) for i in ids[start:start + 64]]
        stub.Upsert(pb.UpsertRequest(documents=docs), timeout=600)
    return ids


def server_still_answers(server: ServerProcess) -> bool:
    from twostage.v1 import twostage_pb2 as pb

    try:
        server.wait_serving(30)
        server.stub().Search(pb.SearchRequest(query="the river crosses the valley", top_k=3), timeout=60)
        return True
    except Exception:  # any failure here is the finding
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of open-loop load (--quick: 30)")
    p.add_argument("--window", type=float, default=10.0, help="seconds per reporting window")
    p.add_argument("--calibrate", type=float, default=20.0, help="seconds of closed-loop calibration (--quick: 5)")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop callers during calibration")
    p.add_argument("--load", type=float, default=1.0, help="offered load as a fraction of the calibrated capacity")
    p.add_argument("--deadline", type=float, default=2.0, help="deadline of every call, seconds")
    p.add_argument("--max-concurrent-rpcs", type=int, default=32, help="server max_concurrent_rpcs")
    p.add_argument("--max-outstanding", type=int, default=0,
                   help="client-side cap on calls in flight (0 = 2 x max-concurrent-rpcs)")
    p.add_argument("--documents", type=int, default=5000, help="documents seeded into the index (--quick: 300)")
    p.add_argument("--candidates", type=int, default=50, help="Search candidates reranked per query")
    p.add_argument("--rerank-documents", type=int, default=20, help="texts per Rerank call")
    p.add_argument("--upsert-batch", type=int, default=4, help="documents per Upsert call")
    p.add_argument("--upsert-ids", type=int, default=2000, help="id range Upserts replace within (bounds the index)")
    p.add_argument("--search-weight", type=float, default=0.6)
    p.add_argument("--rerank-weight", type=float, default=0.3)
    p.add_argument("--upsert-weight", type=float, default=0.1)
    p.add_argument("--rss-growth-limit", type=float, default=0.10, help="largest accepted RSS growth (fraction)")
    p.add_argument("--seed", type=int, default=0)
    args = finish_common_args(p.parse_args(argv))
    if args.quick:
        args.duration = min(args.duration, 30.0)
        args.calibrate = min(args.calibrate, 5.0)
        args.documents = min(args.documents, 300)
        args.upsert_ids = min(args.upsert_ids, 300)
    args.max_outstanding = args.max_outstanding or 2 * args.max_concurrent_rpcs
    return args


async def soak(args: argparse.Namespace, server: ServerProcess, corpus_ids: list[str]) -> dict[str, Any]:
    load = Load(server.target, args, corpus_ids, args.seed + 1)
    try:
        calibration = await closed_loop(load, args.concurrency, args.calibrate)
        ok = sum(r.code == "OK" for r in calibration)
        capacity = ok / args.calibrate
        if capacity <= 0:
            raise RuntimeError(f"calibration completed no request: {Counter(r.code for r in calibration)}")
        rate = capacity * args.load
        print(f"capacity {capacity:.1f} requests/s (closed loop, {args.concurrency} callers); "
              f"offering {rate:.1f}/s for {args.duration:.0f} s", flush=True)
        rss_start = server.rss_bytes()
        records, rss = await open_loop(load, rate, args.duration, args.max_outstanding, args.window,
                                       server.rss_bytes)
    finally:
        await load.close()
    rss_end = server.rss_bytes()
    codes = Counter(r.code for r in records)
    windows = window_rows(records, rss, args.window, args.duration)
    ok_latency = [r.latency_s * 1000 for r in records if r.code == "OK"]
    return {"capacity_rps": capacity, "offered_rps": rate,
            "calibration_codes": dict(Counter(r.code for r in calibration)),
            "codes": dict(codes), "codes_by_rpc": {k: dict(Counter(r.code for r in records if r.kind == k))
                                                   for k in KINDS},
            "latency_ms": summarize(ok_latency), "windows": windows,
            "rss_start_mib": rss_start / 2**20, "rss_end_mib": rss_end / 2**20,
            "rss_growth": (rss_end - rss_start) / rss_start if rss_start else None}


def print_report(result: dict[str, Any], args: argparse.Namespace) -> None:
    codes = sorted({c for w in result["windows"] for c in w["codes"]})
    rows = []
    for w in result["windows"]:
        lat = w["latency_ms"]
        rows.append([w["window"], w["requests"], w["ok_per_s"], *[w["codes"].get(c, 0) for c in codes],
                     lat.get("p50"), lat.get("p99"),
                     *[w["latency_ms_by_rpc"][k].get("p99") for k in KINDS], w["rss_mib"]])
    headers = ["window", "requests", "ok/s", *codes, "p50 ms", "p99 ms", *[f"{k} p99" for k in KINDS], "RSS MiB"]
    print(format_table(headers, rows))
    print(f"\nstatus totals: {result['codes']}")
    print(f"by RPC: {result['codes_by_rpc']}")
    lat = result["latency_ms"]
    if lat.get("n"):
        print(f"OK latency: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms over {lat['n']} calls")
    print(f"server RSS: {result['rss_start_mib']:.1f} MiB at the start of the soak, {result['rss_end_mib']:.1f} MiB at "
          f"the end ({100 * result['rss_growth']:+.1f} %; limit {100 * args.rss_growth_limit:.0f} %)")
    for problem in result["problems"]:
        print(f"FAIL: {problem}")
    print("verdict:", "PASS" if not result["problems"] else "FAIL")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="twostage-soak-"))
    try:
        server = ServerProcess(args.models, workdir / "index", log_path=workdir / "server.log",
                               max_concurrent_rpcs=args.max_concurrent_rpcs, **server_threads(args.threads),
                               rerank_max_batch_size=32)
        with server:
            corpus_ids = seed_index(server, args.documents, args.seed)
            result = asyncio.run(soak(args, server, corpus_ids))
            answering = server_still_answers(server)
            log_tail = server.log_tail(2000)
        problems = []
        unexpected = {c: n for c, n in result["codes"].items() if c not in EXPECTED_CODES | {"CLIENT_BACKLOG"}}
        if unexpected:
            problems.append(f"undocumented status codes under load: {unexpected}")
        if not answering:
            problems.append("the server no longer answers a normal Search after the soak")
        if result["rss_growth"] is not None and result["rss_growth"] > args.rss_growth_limit:
            problems.append(f"RSS grew {100 * result['rss_growth']:.1f} % (limit {100 * args.rss_growth_limit:.0f} %)")
        result["problems"] = problems
        result["server_log_tail"] = log_tail if problems else ""
        print_report(result, args)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        path = save_result("soak", {"config": config, **result}, args.out)
        print(f"wrote {path}")
        return 1 if problems else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
