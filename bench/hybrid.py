"""Retrieval modes, fusion and reranking at latency budgets, measured by `twostage evaluate`'s own code.

    python -m bench.hybrid                             # SciFact test (300 queries) + trec-dl-2019-subset (43)
    python -m bench.hybrid --tune                      # + tuning (SciFact: on its train split; TREC DL: a seeded half)
    python -m bench.hybrid --modes dense --rerank-mode dense   # a backend without lexical search
    python -m bench.hybrid --quick                     # smoke run, seconds, figures meaningless

Per dataset, the corpus is indexed with `twostage index build`'s code path (bench/prepare.py, cached), served by a
real server in a child process with default settings, and evaluated by `twostage.client.evaluate.run_evaluation`,
the function `twostage evaluate` runs: the same rows (dense, lexical, hybrid stage 1 alone; hybrid + cross-encoder
at each budget), the same metrics (twostage.client.ir_metrics) and the same tuning. `twostage evaluate DATA
--models DIR` builds its index with the same code and serves the same defaults, so its quality figures are
these (only latency differs: it serves in its own process).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench.common import (ServerProcess, base_parser, finish_common_args, resolve_threads, save_result,
                          server_threads)
from bench.prepare import corpus_index
from twostage.client import evaluate as ev
from twostage.client.beir import available_splits, load_split
from twostage.client.types import JsonValue


def run_dataset(args: argparse.Namespace, name: str, threads: int) -> dict[str, JsonValue]:
    from twostage.client.client import Client
    from twostage.server.config import Config

    folder = args.data / name
    split = load_split(folder, "test")
    tune_split = None
    if args.tune and "train" in available_splits(folder):
        tune_split = load_split(folder, "train")
    options = ev.Options(modes=args.modes, rerank_mode=args.rerank_mode, budgets=args.budgets,
                         max_queries=args.max_queries, progress=args.progress, tune=args.tune, tune_split=tune_split)
    index_dir, build = corpus_index(args.models, split.corpus, args.cache, threads,
                                    expansion_search=Config().index_expansion_search)
    work = Path(tempfile.mkdtemp(prefix=f"bench-hybrid-{name}-"))
    try:
        shutil.copytree(index_dir, work / "index")
        with ServerProcess(args.models, work / "index", **server_threads(threads)) as server:
            with Client(server.target, timeout=900) as client:
                report = ev.run_evaluation(client, split, options, sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["dataset"]["name"] = name
    report["index_build"] = build
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="scifact,trec-dl-2019-subset", help="comma-separated dataset names")
    p.add_argument("--modes", default=",".join(ev.MODES), help="stage-1 modes measured alone and tuned over")
    p.add_argument("--rerank-mode", default="hybrid", choices=ev.MODES, help="the stage 1 under the reranked rows")
    p.add_argument("--budgets", default=None, help="latency budgets of the reranked rows, ms (default 0,50,100,200; "
                                                   "quick 0)")
    p.add_argument("--max-queries", type=int, default=None, help="queries per dataset (default all; quick 3)")
    p.add_argument("--tune", action="store_true", help="also tune (twostage evaluate --tune) and measure the choice")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="print progress")
    args = finish_common_args(p.parse_args(argv))
    args.datasets = args.datasets.split(",")
    args.modes = tuple(m for m in args.modes.split(",") if m)
    args.budgets = tuple(int(b) for b in (args.budgets or ("0" if args.quick else "0,50,100,200")).split(","))
    args.max_queries = args.max_queries if args.max_queries is not None else (3 if args.quick else 0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = resolve_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    result: dict[str, JsonValue] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "threads": threads,
        "notes": ["Each dataset's report is what `twostage evaluate DATA --target SERVER --json -` prints, measured "
                  "against a real server in a child process over an index built with `twostage index build`'s "
                  "code path; server settings are the defaults.",
                  "Graded relevance (TREC DL grades 1-3) with linear gains for nDCG; recall counts grade > 0."],
        "datasets": []}
    for name in args.datasets:
        report = run_dataset(args, name, threads)
        result["datasets"].append(report)
        print(f"\n== {name}")
        print(ev.report_table(report))
    path = save_result("hybrid", result, args.out)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
