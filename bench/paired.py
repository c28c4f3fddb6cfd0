"""This tree's server against another build's, paired request by request: the unbudgeted Rerank RPC.

    python -m bench.paired --baseline-python /tmp/base/.venv/bin/python
    python -m bench.paired --baseline-python ... --quick    # a smoke run in seconds, figures meaningless

A restructuring or a scheduling change must not cost the unbudgeted path anything: this measures it. The
baseline is another checkout of twostage installed in its own environment, e.g. the commit before a change:

    git worktree add --detach /tmp/base 3597c0f
    python -m venv --system-site-packages /tmp/base/.venv     # or a copy of .venv
    /tmp/base/.venv/bin/python -m pip install --no-deps -e /tmp/base

Both servers run at once on loopback ports (each in its own process, the packaged models, an empty index:
only Rerank is called; idle, a server uses no CPU) with the same knobs. Each request is MS MARCO passages of
trec-dl-2019-subset (100 per request by default) for one of its queries.

- **Latency**, one client: every request goes to both servers back to back, the order alternating, for
  `--rounds` passes over the requests. Reported: each server's median and p95, and the median over requests of
  baseline time / this tree's time (above 1: this tree is faster).
- **Throughput**, two clients (both inference workers busy): alternating blocks of the requests on each server;
  pairs/s per block and the median ratio of this tree's to the baseline's over the rounds.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    ServerProcess,
    base_parser,
    document_text,
    finish_common_args,
    knob_setting,
    load_dataset,
    resolve_threads,
    save_result,
    server_threads,
    summarize,
)

DATASET = "trec-dl-2019-subset"
SERVERS = ("baseline", "this tree")


def build_requests(args: argparse.Namespace) -> list[Any]:
    from twostage.v1 import twostage_pb2 as pb

    ds = load_dataset(args.data, DATASET)
    qids = ds.judged_queries
    ids = list(ds.corpus)
    return [pb.RerankRequest(query=ds.queries[qids[k % len(qids)]],
                             texts=[document_text(*ds.corpus[ids[(k * args.docs + j) % len(ids)]])
                                    for j in range(args.docs)])
            for k in range(args.requests)]


def latency(stubs: dict[str, Any], requests: list[Any], rounds: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {name: [] for name in SERVERS}
    ratios: list[float] = []
    for r in range(rounds):
        for k, request in enumerate(requests):
            order = SERVERS if (r + k) % 2 == 0 else SERVERS[::-1]
            took = {}
            for name in order:
                t0 = time.perf_counter()
                stubs[name].Rerank(request, timeout=600)
                took[name] = time.perf_counter() - t0
                times[name].append(took[name] * 1000.0)
            ratios.append(took["baseline"] / took["this tree"])
    return {"ms": {name: summarize(v) for name, v in times.items()},
            "speed_ratio_median": statistics.median(ratios), "pairs": len(ratios)}


def throughput(stubs: dict[str, Any], requests: list[Any], rounds: int, docs: int) -> dict[str, Any]:
    rates: dict[str, list[float]] = {name: [] for name in SERVERS}
    for r in range(rounds):
        for name in (SERVERS if r % 2 == 0 else SERVERS[::-1]):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=2) as pool:
                list(pool.map(lambda req: stubs[name].Rerank(req, timeout=600), requests))
            rates[name].append(len(requests) * docs / (time.perf_counter() - t0))
    ratios = [new / old for new, old in zip(rates["this tree"], rates["baseline"], strict=True)]
    return {"pairs_per_s": rates, "ratio_per_round": ratios, "ratio_median": statistics.median(ratios)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--baseline-python", type=Path, required=True,
                   help="interpreter of an environment where `twostage` is the baseline build")
    p.add_argument("--requests", type=int, default=None, help="distinct requests (default 12; quick 2)")
    p.add_argument("--docs", type=int, default=None, help="passages per request (default 100; quick 8)")
    p.add_argument("--rounds", type=int, default=None, help="latency passes over the requests (default 3; quick 1)")
    p.add_argument("--throughput-rounds", type=int, default=None,
                   help="throughput blocks per server (default 4; quick 1)")
    p.add_argument("--set", dest="knobs", type=knob_setting, action="append", default=[], metavar="KNOB=VALUE",
                   help="a server config knob for this tree's server only (e.g. one the baseline lacks); repeatable")
    args = finish_common_args(p.parse_args(argv))
    args.knobs = dict(args.knobs)
    quick = args.quick
    args.requests = args.requests or (2 if quick else 12)
    args.docs = args.docs or (8 if quick else 100)
    args.rounds = args.rounds or (1 if quick else 3)
    args.throughput_rounds = args.throughput_rounds or (1 if quick else 4)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = resolve_threads(args.threads)
    requests = build_requests(args)
    work = Path(tempfile.mkdtemp(prefix="bench-paired-"))
    knobs = dict(server_threads(threads), log_level="warning")
    servers = {"baseline": ServerProcess(args.models, work / "index-baseline", python=str(args.baseline_python),
                                         **knobs),
               "this tree": ServerProcess(args.models, work / "index-this", **knobs, **args.knobs)}
    try:
        for server in servers.values():
            server.start()
        stubs = {name: server.stub() for name, server in servers.items()}
        for name in SERVERS:                          # lazy initialization, caches, the cost estimate
            for request in requests[:2]:
                stubs[name].Rerank(request, timeout=600)
        result: dict[str, Any] = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "threads": threads,
            "target": "this tree / baseline >= 0.97 (median ratio), latency and throughput",
            "latency": latency(stubs, requests, args.rounds),
            "throughput": throughput(stubs, requests, args.throughput_rounds, args.docs)}
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    lat, tp = result["latency"], result["throughput"]
    for name in SERVERS:
        print(f"{name:>10}: Rerank of {args.docs} passages p50 {lat['ms'][name]['p50']:.0f} ms, "
              f"p95 {lat['ms'][name]['p95']:.0f} ms; two clients {statistics.median(tp['pairs_per_s'][name]):.1f} "
              f"pairs/s (median of {args.throughput_rounds} blocks)")
    print(f"speed ratio (baseline time / this tree's, median of {lat['pairs']} pairs): "
          f"{lat['speed_ratio_median']:.3f}; throughput ratio (median of rounds): {tp['ratio_median']:.3f}")
    path = save_result("paired", result, args.out)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
