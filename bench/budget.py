"""Latency budgets (issue 13's targets): how close Search stays to its budget, what each budget costs in quality,
under concurrency and beside a big Rerank, and how fast an impossible deadline is refused.

    python -m bench.budget                       # SciFact (first 100 judged queries) + trec-dl-2019-subset (43)
    python -m bench.budget --max-queries 0       # every judged query
    python -m bench.budget --quick               # smoke run, seconds, figures meaningless

Each dataset's corpus is indexed with `twostage index build`'s code path (bench/prepare.py) and served by a real
server in a child process (one single-thread inference worker per CPU, its defaults otherwise; stage 1 is
`--mode`, dense by default). The client is Python gRPC on the same machine, so every latency is the client's wall
time and includes the client's own work. Sections:

- **sweep** (one client): for every judged query, in turn, a stage-1-only Search (`skip_rerank`), a Search with
  each budget (`--budgets`), and an unbudgeted Search reranking all `--candidates`; per setting p50/p99 latency,
  pairs reranked per request, share budget-limited, failures and nDCG@10 (top_k 10). Settings take turns query by
  query, so drift on the machine hits them alike.
- **concurrent**: `--clients` closed-loop clients (one asyncio gRPC channel each) sending Searches with a
  `--concurrent-budget-ms` budget for `--concurrent-requests` requests in all: p50/p99, failures, and the share of
  requests that got at least one pair reranked; then the same clients with stage-1-only Searches (`skip_rerank`),
  the floor under any budget at that load.
- **head_of_line** (first dataset): a stage-1-only Search and a 50 ms-budget Search, each measured idle and while
  a Rerank of `--big-rerank` passages (corpus texts) runs; p99 against the idle p99 and against the budget.
- **unbudgeted** (first dataset): the throughput of unbudgeted Rerank calls of 100 passages from two clients, on
  servers with the defaults against servers with the changes of this feature that touch unbudgeted work turned
  off (`free_worker_within_ms` 0, no cost warm-up), in alternating blocks (`--unbudgeted-rounds`), one server at
  a time: the pairs/s ratio.
- **flood** (first dataset): `--flood-calls` unbudgeted Rerank calls of 100 passages with `--flood-deadline-s`
  deadlines from `--flood-threads` threads: how many were refused (RESOURCE_EXHAUSTED), how fast (p99), how many
  failed otherwise, and the pairs/s of the accepted ones against a run of the accepted count alone.

No timing is asserted; the JSON holds every figure and the issue's targets beside them.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (Dataset, ServerProcess, base_parser, document_text, finish_common_args, format_table,
                          knob_setting, load_dataset, metric_delta, parse_metrics, resolve_threads, save_result,
                          server_threads, summarize)
from twostage.client.ir_metrics import ndcg_at_k
from bench.prepare import corpus_index

SECTIONS = ("sweep", "concurrent", "head_of_line", "flood", "unbudgeted")
STAGE_ONE = "stage 1 only"
FULL = "full rerank"
TARGETS = {
    "one_client": "p99 <= 1.1 x budget and p50 <= budget (budgets 50/100/200/500 ms)",
    "concurrent": "16 clients at 100 ms: p99 <= 1.2 x budget, no request failed",
    "head_of_line": "during a Rerank of 1,000 passages: stage-1-only Search p99 <= 2 x its idle p99; "
                    "50 ms-budget Search p99 <= 1.2 x budget",
    "unbudgeted": "unbudgeted behaviour and throughput unchanged (ratio >= 0.97)",
    "flood": "256 Rerank calls of 100 passages, 3 s deadlines, 64 threads: refusals within 50 ms (p99), "
             "throughput on the accepted ones not lower",
}


def setting_name(budget_ms: int) -> str:
    return f"budget {budget_ms} ms"


# ------------------------------------------------------------------------------------------- sweep
def search_once(stub: Any, pb: Any, query: str, *, budget_ms: int = 0, skip_rerank: bool = False,
                candidates: int, mode: str, timeout: float = 120.0) -> tuple[float, Any, str]:
    """One Search: (client wall seconds, response or None, status code name)."""
    import grpc

    request = pb.SearchRequest(query=query, top_k=10, candidates=candidates, skip_rerank=skip_rerank, ids_only=True,
                               latency_budget_ms=budget_ms, retrieval_mode=mode)
    t0 = time.perf_counter()
    try:
        response = stub.Search(request, timeout=timeout)
        return time.perf_counter() - t0, response, "OK"
    except grpc.RpcError as err:
        return time.perf_counter() - t0, None, err.code().name


def summarize_setting(rows: list[tuple[float, Any, str]], qids: list[str], ds: Dataset,
                      budget_ms: int | None) -> dict[str, Any]:
    ok = [(s, r) for s, r, code in rows if code == "OK"]
    latency = summarize([s * 1000.0 for s, _, _ in rows])
    ndcg = [ndcg_at_k([h.id for h in r.hits], ds.qrels.get(q, {}), 10)
            for (s, r, code), q in zip(rows, qids) if code == "OK"]
    out: dict[str, Any] = {
        "requests": len(rows), "failures": {c: sum(1 for *_, code in rows if code == c)
                                            for c in sorted({code for *_, code in rows if code != "OK"})},
        "latency_ms": latency, "ndcg@10": sum(ndcg) / len(qids) if qids else None,
        "pairs_reranked": summarize([r.reranked for _, r in ok]),
        "budget_limited_share": (sum(r.budget_limited for _, r in ok) / len(ok)) if ok else None,
        "server_total_ms": summarize([r.timing.total_ms for _, r in ok]),
    }
    if budget_ms:
        out["p99_over_budget"] = latency.get("p99", 0.0) / budget_ms
        out["p50_over_budget"] = latency.get("p50", 0.0) / budget_ms
        out["meets_target"] = bool(latency.get("n") and latency["p99"] <= 1.1 * budget_ms
                                   and latency["p50"] <= budget_ms and not out["failures"])
    return out


def sweep(stub: Any, pb: Any, ds: Dataset, qids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    settings: list[tuple[str, dict[str, Any]]] = [(STAGE_ONE, {"skip_rerank": True})]
    settings += [(setting_name(b), {"budget_ms": b}) for b in args.budgets]
    settings.append((FULL, {}))
    rows: dict[str, list[tuple[float, Any, str]]] = {name: [] for name, _ in settings}
    t0 = time.perf_counter()
    for n, qid in enumerate(qids):
        for name, options in settings:
            rows[name].append(search_once(stub, pb, ds.queries[qid], candidates=args.candidates, mode=args.mode,
                                          **options))
        if args.progress and (n + 1) % 25 == 0:
            print(f"  {ds.name}: {n + 1}/{len(qids)} queries, {time.perf_counter() - t0:.0f} s", flush=True)
    return {name: summarize_setting(rows[name], qids, ds, options.get("budget_ms")) for name, options in settings}


# -------------------------------------------------------------------------------------- concurrency
def concurrent(target: str, ds: Dataset, qids: list[str], args: argparse.Namespace,
               stage_one_only: bool = False) -> dict[str, Any]:
    """`args.clients` closed-loop clients, each on its own channel in one asyncio loop, sending budgeted Searches
    (or, with `stage_one_only`, Searches with `skip_rerank`: the floor under any budget at that load)."""
    import grpc

    from twostage.v1 import twostage_pb2 as pb
    from twostage.v1 import twostage_pb2_grpc as pb_grpc

    budget_ms = args.concurrent_budget_ms
    results: list[tuple[float, Any, str]] = []
    counter = iter(range(args.concurrent_requests))

    async def client(c: int) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.TwoStageStub(channel)
            for k in counter:
                query = ds.queries[qids[(k * 7 + c) % len(qids)]]
                request = pb.SearchRequest(query=query, top_k=10, candidates=args.candidates, ids_only=True,
                                           retrieval_mode=args.mode)
                if stage_one_only:
                    request.skip_rerank = True
                else:
                    request.latency_budget_ms = budget_ms
                t0 = time.perf_counter()
                try:
                    response = await stub.Search(request, timeout=60)
                    results.append((time.perf_counter() - t0, response, "OK"))
                except grpc.RpcError as err:
                    results.append((time.perf_counter() - t0, None, err.code().name))

    async def run_all() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(args.clients)))
        return time.perf_counter() - t0

    wall = asyncio.run(run_all())
    ok = [r for _, r, code in results if code == "OK"]
    latency = summarize([s * 1000.0 for s, _, _ in results])
    failures = {c: sum(1 for *_, code in results if code == c) for c in {code for *_, code in results if code != "OK"}}
    return {"clients": args.clients, "budget_ms": budget_ms, "requests": len(results), "wall_s": wall,
            "latency_ms": latency, "failures": failures,
            "share_with_a_pair_reranked": (sum(r.reranked > 0 for r in ok) / len(ok)) if ok else None,
            "pairs_reranked": summarize([r.reranked for r in ok]),
            "budget_limited_share": (sum(r.budget_limited for r in ok) / len(ok)) if ok else None,
            "p99_over_budget": latency.get("p99", 0.0) / budget_ms,
            "meets_target": bool(latency.get("n") and latency["p99"] <= 1.2 * budget_ms and not failures)}


# ------------------------------------------------------------------------------------ head of line
def head_of_line(server: ServerProcess, ds: Dataset, qids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """A stage-1-only Search and a 50 ms-budget Search, idle and while a big unbudgeted Rerank runs."""
    from twostage.v1 import twostage_pb2 as pb

    stub = server.stub()
    big_stub = server.stub()
    passages = [document_text(*ds.corpus[d]) for d in list(ds.corpus)[:args.big_rerank]]
    while len(passages) < args.big_rerank:                       # a tiny corpus: repeat it
        passages += passages[:args.big_rerank - len(passages)]
    kinds = {"stage 1 only": {"skip_rerank": True}, "budget 50 ms": {"budget_ms": 50}}

    def probe(kind: str, k: int) -> tuple[float, Any, str]:
        return search_once(stub, pb, ds.queries[qids[k % len(qids)]], candidates=args.candidates, mode=args.mode,
                           **kinds[kind])

    idle: dict[str, list[float]] = {kind: [] for kind in kinds}
    busy: dict[str, list[float]] = {kind: [] for kind in kinds}
    failures: dict[str, int] = {kind: 0 for kind in kinds}
    for k in range(args.hol_samples):
        for kind in kinds:
            seconds, _, code = probe(kind, k)
            idle[kind].append(seconds * 1000.0)
            time.sleep(0.005)
    rerank_s: list[float] = []
    k = 0
    while min(len(v) for v in busy.values()) < args.hol_samples and len(rerank_s) < args.hol_max_reranks:
        done = threading.Event()

        def big() -> None:
            t0 = time.perf_counter()
            big_stub.Rerank(pb.RerankRequest(query=ds.queries[qids[0]], texts=passages), timeout=600)
            rerank_s.append(time.perf_counter() - t0)
            done.set()

        worker = threading.Thread(target=big)
        worker.start()
        time.sleep(0.05)                                         # let its batches take both workers
        while not done.is_set():
            kind = list(kinds)[k % len(kinds)]
            seconds, _, code = probe(kind, k)
            if not done.is_set():                                # the Rerank was still running when it returned
                busy[kind].append(seconds * 1000.0)
                failures[kind] += code != "OK"
            k += 1
            time.sleep(0.005)
        worker.join()
    out: dict[str, Any] = {"big_rerank_passages": args.big_rerank, "big_rerank_s": summarize(rerank_s)}
    for kind in kinds:
        i, b = summarize(idle[kind]), summarize(busy[kind])
        out[kind] = {"idle_ms": i, "during_rerank_ms": b, "failures_during": failures[kind],
                     "p99_ratio_busy_over_idle": (b["p99"] / i["p99"]) if b.get("n") and i.get("n") else None}
    stage1, budgeted = out["stage 1 only"], out["budget 50 ms"]
    out["meets_target"] = {
        "stage_1_p99_within_2x_idle": stage1["p99_ratio_busy_over_idle"] is not None
        and stage1["p99_ratio_busy_over_idle"] <= 2.0,
        "budget_50_p99_within_1.2x": bool(budgeted["during_rerank_ms"].get("n"))
        and budgeted["during_rerank_ms"]["p99"] <= 1.2 * 50}
    return out


# ------------------------------------------------------------------------------------------- flood
def flood(server: ServerProcess, ds: Dataset, qids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Unbudgeted Rerank calls with a deadline from many threads: refused at once, or served at full speed."""
    import grpc

    from twostage.v1 import twostage_pb2 as pb

    ids = list(ds.corpus)
    stubs = [server.stub() for _ in range(min(args.flood_threads, 16))]

    def passages(k: int) -> list[str]:
        return [document_text(*ds.corpus[ids[(k * 100 + j) % len(ids)]]) for j in range(100)]

    requests = [pb.RerankRequest(query=ds.queries[qids[k % len(qids)]], texts=passages(k))
                for k in range(args.flood_calls)]                # built before the clock starts

    def call(k: int) -> tuple[float, float, str]:
        request = requests[k]
        started = time.perf_counter()
        try:
            stubs[k % len(stubs)].Rerank(request, timeout=args.flood_deadline_s)
            code = "OK"
        except grpc.RpcError as err:
            code = err.code().name
        return started, time.perf_counter(), code

    before = parse_metrics(server.metrics_text())
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.flood_threads) as pool:
        calls = list(pool.map(call, range(args.flood_calls)))
    wall = time.perf_counter() - t0
    after = parse_metrics(server.metrics_text())
    # the server's own time for its refusals (its RPC latency histogram): the client's share is the rest
    refused_server = metric_delta(before, after, "twostage_request_seconds_count", method="Rerank",
                                  code="RESOURCE_EXHAUSTED")
    within = {le: metric_delta(before, after, "twostage_request_seconds_bucket", method="Rerank",
                               code="RESOURCE_EXHAUSTED", le=le) for le in ("0.01", "0.025", "0.05", "0.1")}
    by_code: dict[str, list[float]] = {}
    for started, ended, code in calls:
        by_code.setdefault(code, []).append((ended - started) * 1000.0)
    accepted = len(by_code.get("OK", []))
    accepted_span = [(s, e) for s, e, code in calls if code == "OK"]
    busy_s = (max(e for _, e in accepted_span) - min(s for s, _ in accepted_span)) if accepted_span else 0.0
    # the same number of calls alone, two at a time (both workers busy), for the throughput they get unhindered
    t1 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda k: stubs[k % len(stubs)].Rerank(
            pb.RerankRequest(query=ds.queries[qids[k % len(qids)]], texts=passages(k)), timeout=600),
            range(max(accepted, 2))))
    alone_s = time.perf_counter() - t1
    refused = by_code.get("RESOURCE_EXHAUSTED", [])
    out = {"calls": args.flood_calls, "threads": args.flood_threads, "deadline_s": args.flood_deadline_s,
           "wall_s": wall, "codes": {c: len(v) for c, v in by_code.items()},
           "latency_ms_by_code": {c: summarize(v) for c, v in by_code.items()},
           "server_refusals": refused_server,
           "server_refusals_within_s": {le: (n / refused_server if refused_server else None) for le, n in within.items()},
           "accepted_pairs_per_s": (accepted * 100 / busy_s) if busy_s else None,
           "alone_pairs_per_s": max(accepted, 2) * 100 / alone_s}
    out["throughput_ratio"] = (out["accepted_pairs_per_s"] / out["alone_pairs_per_s"]) \
        if out["accepted_pairs_per_s"] else None
    out["meets_target"] = bool(refused) and summarize(refused)["p99"] <= 50.0 \
        and not by_code.get("DEADLINE_EXCEEDED") and (out["throughput_ratio"] or 0) >= 0.97
    return out


# -------------------------------------------------------------------------------------- unbudgeted
def unbudgeted(args: argparse.Namespace, ds: Dataset, qids: list[str], index: Path, threads: int) -> dict[str, Any]:
    """Pairs/s of unbudgeted Rerank calls (2 clients x `--unbudgeted-requests` calls of 100 passages) on servers
    with the defaults and with the free-worker bound and warm-up off, in alternating blocks."""
    from twostage.v1 import twostage_pb2 as pb

    ids = list(ds.corpus)
    requests = [pb.RerankRequest(query=ds.queries[qids[k % len(qids)]],
                                 texts=[document_text(*ds.corpus[ids[(k * 100 + j) % len(ids)]]) for j in range(100)])
                for k in range(args.unbudgeted_requests)]
    variants = {"defaults": {}, "bound and warm-up off": {"free_worker_within_ms": 0.0, "warm_up_batches": 0}}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.unbudgeted_rounds):
        for name, knobs in variants.items():
            with ServerProcess(args.models, index, **server_threads(threads), retrieval_mode=args.mode_name,
                               **{**args.knobs, **knobs}) as server:
                stubs = [server.stub(), server.stub()]
                stubs[0].Rerank(requests[0], timeout=600)        # the first call pays lazy initialization
                t0 = time.perf_counter()
                with ThreadPoolExecutor(max_workers=2) as pool:
                    list(pool.map(lambda k: stubs[k % 2].Rerank(requests[k], timeout=600), range(len(requests))))
                rates[name].append(len(requests) * 100 / (time.perf_counter() - t0))
    out: dict[str, Any] = {"requests_per_block": len(requests), "rounds": args.unbudgeted_rounds,
                           "pairs_per_s": rates}
    ratios = [a / b for a, b in zip(rates["defaults"], rates["bound and warm-up off"])]
    out["ratio_per_round"] = ratios
    out["ratio_median"] = sorted(ratios)[len(ratios) // 2] if ratios else None
    out["meets_target"] = bool(ratios) and out["ratio_median"] >= 0.97
    return out


# ------------------------------------------------------------------------------------------- driver
def run_dataset(args: argparse.Namespace, name: str, threads: int, first: bool) -> dict[str, Any]:
    from twostage.v1 import twostage_pb2 as pb

    ds = load_dataset(args.data, name)
    qids = ds.judged_queries[:args.max_queries] if args.max_queries else ds.judged_queries
    index_dir, index_facts = corpus_index(args.models, args.data / name / "corpus.jsonl", args.cache, threads)
    work = Path(tempfile.mkdtemp(prefix=f"bench-budget-{name}-"))
    shutil.copytree(index_dir, work / "index")
    result: dict[str, Any] = {"dataset": name, "documents": len(ds.corpus), "queries": len(qids),
                              "index": index_facts}
    mode = {"dense": pb.RETRIEVAL_MODE_DENSE, "lexical": pb.RETRIEVAL_MODE_LEXICAL,
            "hybrid": pb.RETRIEVAL_MODE_HYBRID}[args.mode_name]
    args.mode = mode
    try:
        with ServerProcess(args.models, work / "index", **server_threads(threads),
                           retrieval_mode=args.mode_name, **args.knobs) as server:
            stub = server.stub()
            for qid in qids[:3]:                                 # warm the caches and the cost estimate
                search_once(stub, pb, ds.queries[qid], candidates=args.candidates, mode=mode)
            t0 = time.perf_counter()
            if "sweep" in args.sections:
                result["sweep"] = sweep(stub, pb, ds, qids, args)
            if "concurrent" in args.sections:
                result["concurrent"] = concurrent(server.target, ds, qids, args)
                result["concurrent"]["stage_1_only"] = concurrent(server.target, ds, qids, args,
                                                                  stage_one_only=True)
            if first and "head_of_line" in args.sections:
                result["head_of_line"] = head_of_line(server, ds, qids, args)
            if first and "flood" in args.sections:
                result["flood"] = flood(server, ds, qids, args)
            result["measure_s"] = time.perf_counter() - t0
        if first and "unbudgeted" in args.sections:
            result["unbudgeted"] = unbudgeted(args, ds, qids, work / "index", threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def print_dataset(res: dict[str, Any]) -> None:
    print(f"\n== {res['dataset']}: {res['queries']} judged queries, {res['documents']:,} documents")
    rows = []
    for setting, r in res.get("sweep", {}).items():
        lat, pairs = r["latency_ms"], r["pairs_reranked"]
        rows.append([setting, lat.get("p50"), lat.get("p99"), pairs.get("mean"), r["budget_limited_share"],
                     r["ndcg@10"], sum(r["failures"].values()),
                     {True: "yes", False: "NO"}.get(r.get("meets_target"), "")])
    print(format_table(["setting (1 client)", "p50 ms", "p99 ms", "pairs reranked", "budget-limited",
                        "nDCG@10", "failed", "target"], rows))
    c = res.get("concurrent")
    if c:
        print(f"  {c['clients']} clients at {c['budget_ms']} ms: p50 {c['latency_ms'].get('p50', 0):.0f} ms, p99 "
              f"{c['latency_ms'].get('p99', 0):.0f} ms, failed {sum(c['failures'].values())}, with >= 1 pair reranked "
              f"{(c['share_with_a_pair_reranked'] or 0):.0%}, pairs reranked mean "
              f"{c['pairs_reranked'].get('mean', 0):.1f} (target {'met' if c['meets_target'] else 'MISSED'})")
        s1 = c.get("stage_1_only")
        if s1:
            print(f"  {s1['clients']} clients, stage 1 only (skip_rerank): p50 {s1['latency_ms'].get('p50', 0):.0f} ms, "
                  f"p99 {s1['latency_ms'].get('p99', 0):.0f} ms, failed {sum(s1['failures'].values())}")
    if "head_of_line" in res:
        h = res["head_of_line"]
        for kind in ("stage 1 only", "budget 50 ms"):
            k = h[kind]
            print(f"  {kind}: idle p50 {k['idle_ms'].get('p50', 0):.1f} / p99 {k['idle_ms'].get('p99', 0):.1f} ms; "
                  f"during a Rerank of {h['big_rerank_passages']} passages p50 "
                  f"{k['during_rerank_ms'].get('p50', 0):.1f} / p99 {k['during_rerank_ms'].get('p99', 0):.1f} ms "
                  f"(n={k['during_rerank_ms'].get('n', 0)})")
        print(f"  head-of-line targets: {h['meets_target']}")
    if "unbudgeted" in res:
        u = res["unbudgeted"]
        print(f"  unbudgeted Rerank throughput, defaults vs bound and warm-up off: {u['pairs_per_s']}; ratio "
              f"{u['ratio_median']:.3f} (target {'met' if u['meets_target'] else 'MISSED'})")
    if "flood" in res:
        f = res["flood"]
        refused = f["latency_ms_by_code"].get("RESOURCE_EXHAUSTED", {})
        print(f"  flood of {f['calls']} Rerank calls ({f['threads']} threads, {f['deadline_s']} s deadlines): "
              f"{f['codes']}; refusals p99 {refused.get('p99', 0):.1f} ms; accepted {f['accepted_pairs_per_s'] or 0:.0f} "
              f"pairs/s vs alone {f['alone_pairs_per_s']:.0f} (target {'met' if f['meets_target'] else 'MISSED'})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="trec-dl-2019-subset,scifact", help="comma-separated dataset names (the "
                   "first also gets the head-of-line and flood sections)")
    p.add_argument("--max-queries", type=int, default=None,
                   help="judged queries per dataset, 0 = all (default 100; quick 4)")
    p.add_argument("--budgets", default=None, help="comma-separated budgets in ms (default 50,100,200,500; "
                                                   "quick 50,200)")
    p.add_argument("--candidates", type=int, default=100, help="stage-1 candidates per Search (reranked in full "
                                                               "without a budget)")
    p.add_argument("--mode", dest="mode_name", choices=("dense", "lexical", "hybrid"), default="dense",
                   help="stage-1 retrieval mode of every Search")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 16; quick 4)")
    p.add_argument("--concurrent-budget-ms", type=int, default=100, help="their budget")
    p.add_argument("--concurrent-requests", type=int, default=None,
                   help="requests in all in the concurrent section (default 400; quick 16)")
    p.add_argument("--big-rerank", type=int, default=None, help="passages in the head-of-line Rerank (default 1000; "
                                                                "quick 40)")
    p.add_argument("--hol-samples", type=int, default=None, help="probes of each kind, idle and busy (default 100; "
                                                                 "quick 4)")
    p.add_argument("--hol-max-reranks", type=int, default=20, help="most big Reranks run to collect the samples")
    p.add_argument("--flood-calls", type=int, default=None, help="Rerank calls in the flood (default 256; quick 8)")
    p.add_argument("--flood-threads", type=int, default=None, help="threads sending them (default 64; quick 4)")
    p.add_argument("--flood-deadline-s", type=float, default=3.0, help="their gRPC deadline")
    p.add_argument("--unbudgeted-rounds", type=int, default=None, help="alternating blocks per variant in the "
                                                                       "unbudgeted section (default 2; quick 1)")
    p.add_argument("--unbudgeted-requests", type=int, default=None, help="Rerank calls per block (default 12; "
                                                                         "quick 2)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated sections to run")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="print progress")
    p.add_argument("--set", dest="knobs", type=knob_setting, action="append", default=[], metavar="KNOB=VALUE",
                   help="a server config knob (server/config.py) for every server the run starts; repeatable")
    args = finish_common_args(p.parse_args(argv))
    args.knobs = dict(args.knobs)

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if args.quick else full)

    args.max_queries = pick(args.max_queries, 100, 4)
    args.budgets = [int(b) for b in pick(args.budgets, "50,100,200,500", "50,200").split(",")]
    args.clients = pick(args.clients, 16, 4)
    args.concurrent_requests = pick(args.concurrent_requests, 400, 16)
    args.big_rerank = pick(args.big_rerank, 1000, 40)
    args.hol_samples = pick(args.hol_samples, 100, 4)
    args.flood_calls = pick(args.flood_calls, 256, 8)
    args.flood_threads = pick(args.flood_threads, 64, 4)
    args.unbudgeted_rounds = pick(args.unbudgeted_rounds, 2, 1)
    args.unbudgeted_requests = pick(args.unbudgeted_requests, 12, 2)
    args.datasets = args.datasets.split(",")
    args.sections = args.sections.split(",")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = resolve_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result: dict[str, Any] = {
        "config": config, "threads": threads, "targets": TARGETS,
        "notes": [
            "Latency is the client's wall time (Python gRPC on the same machine, competing for the same CPUs).",
            "Budgets are whole-request budgets (SearchRequest.latency_budget_ms), counted by the server from the "
            "request's arrival; the client's time on either side of the server is outside them.",
            f"Stage 1 is {args.mode_name} retrieval; candidates per Search: {args.candidates}.",
        ], "datasets": []}
    for n, name in enumerate(args.datasets):
        res = run_dataset(args, name, threads, first=n == 0)
        result["datasets"].append(res)
        print_dataset(res)
    path = save_result("budget", result, args.out)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
