"""The embedded backend's lexical index (SQLite FTS5 in documents.sqlite3) on SciFact: build cost, disk cost,
lexical top-100 latency, and BM25 quality with and without the stop-word list.

    python -m bench.lexical_index            # SciFact (5,183 abstracts), a few minutes
    python -m bench.lexical_index --quick    # 300 documents, seconds, figures meaningless

No model is involved: the documents get deterministic random 384-d vectors, so the build times are the index's
own cost (store, graph, lexical index), without embedding. Builds go through `build_index` (the code path of
`twostage index build`) in three variants, taking turns, `--repeats` times each:

  * `triggers`  : as shipped, the FTS5 table is kept in step by triggers as each batch of documents commits;
  * `no-lexical`: the triggers removed, so nothing but documents, vectors and graph are written (what a store
                  before the lexical index cost);
  * `rebuild`   : `no-lexical` plus one `INSERT INTO lexical(lexical) VALUES('rebuild')` at the end (the
                  bulk-load alternative to triggers).

Then, on the `triggers` build: the bytes of each table (SQLite's dbstat), `lexical_search` top 100 for every
test query one at a time (wall clock and the thread's CPU time, which the other processes on a shared machine
disturb less), with a filter that keeps a tenth of the documents, and after FTS5's `optimize` (segments merged
into one); nDCG@10 / recall@100 on the test and train queries with the stop-word list and without it.
Last, how the latency grows with the collection: the corpus `--scale` times over (ids made unique, the words the
same, so every query matches `--scale` times as many documents; 8-d vectors, as the lexical index ignores them).
Writes bench/results/lexical_index.json.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (base_parser, finish_common_args, format_table, load_dataset, read_jsonl, save_result,
                          summarize)
from twostage.client.ir_metrics import evaluate_run as evaluate
from twostage.server.index import embedded, store
from twostage.server.index.embedded import DocumentIndex
from twostage.server.index.layout import STORE_FILE
from twostage.server.index.lexical import match_expression, query_terms
from twostage.server.index.settings import IndexSettings
from twostage.server.indexing import build_index

DIM = 384
K = 100


def fake_embed(texts: list[str]) -> np.ndarray:
    """Deterministic unit vectors seeded by each text's hash (no model: build times are the index's own)."""
    out = np.empty((len(texts), DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
        out[i] = v / np.linalg.norm(v)
    return out


@contextlib.contextmanager
def lexical_upkeep(variant: str) -> Iterator[None]:
    """Build-time behaviour of the store for one variant (see the module docstring)."""
    shipped = store._LEXICAL_SCHEMA
    if variant != "triggers":
        store._LEXICAL_SCHEMA = tuple(s for s in shipped if not s.lstrip().startswith("CREATE TRIGGER"))
    try:
        yield
    finally:
        store._LEXICAL_SCHEMA = shipped


def build(corpus: Path, index_dir: Path, variant: str) -> dict[str, float]:
    shutil.rmtree(index_dir, ignore_errors=True)
    started = time.perf_counter()
    with lexical_upkeep(variant):
        build_index(corpus, index_dir, fake_embed, DIM, IndexSettings(), progress=False)
    seconds = time.perf_counter() - started
    out = {"seconds": seconds}
    if variant == "rebuild":
        conn = sqlite3.connect(index_dir / STORE_FILE)
        t = time.perf_counter()
        with conn:
            conn.execute("INSERT INTO lexical(lexical) VALUES ('rebuild')")
        out["rebuild_seconds"] = time.perf_counter() - t
        out["seconds"] += out["rebuild_seconds"]
        conn.close()
    return out


def table_bytes(index_dir: Path) -> dict[str, int]:
    """Bytes of pages per table (an index counts with its table), from SQLite's dbstat."""
    conn = sqlite3.connect(index_dir / STORE_FILE)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows = conn.execute("SELECT s.name, m.tbl_name, SUM(s.pgsize) FROM dbstat AS s "
                            "LEFT JOIN sqlite_master AS m ON m.name = s.name GROUP BY s.name").fetchall()
    finally:
        conn.close()
    out: dict[str, int] = {}
    for name, table, size in rows:
        owner = table or name
        group = "lexical (FTS5)" if owner.startswith("lexical") else owner
        out[group] = out.get(group, 0) + int(size)
    out["file"] = (index_dir / STORE_FILE).stat().st_size
    return out


def latency(search: Callable[[str], object], queries: list[str]) -> dict[str, dict[str, float]]:
    wall, cpu = [], []
    for q in queries:
        w, c = time.perf_counter(), time.thread_time()
        search(q)
        cpu.append((time.thread_time() - c) * 1e3)
        wall.append((time.perf_counter() - w) * 1e3)
    return {"wall_ms": summarize(wall), "cpu_ms": summarize(cpu)}


def matches(index_dir: Path, queries: list[str]) -> dict[str, float]:
    """How many documents a query's OR of words matches (FTS5 scores every one of them)."""
    conn = sqlite3.connect(index_dir / STORE_FILE)
    counts = [conn.execute("SELECT count(*) FROM lexical WHERE lexical MATCH ?", (match_expression(t),)).fetchone()[0]
              for t in (query_terms(q) for q in queries) if t]
    conn.close()
    return summarize(counts)


@contextlib.contextmanager
def without_stop_words() -> Iterator[None]:
    """lexical_search with an empty stop-word list (for comparison)."""
    shipped = embedded.query_terms
    embedded.query_terms = lambda text: shipped(text, stop_words=frozenset())  # type: ignore[assignment]
    try:
        yield
    finally:
        embedded.query_terms = shipped


def quality(index: DocumentIndex, dataset_queries: dict[str, str], qrels: dict[str, dict[str, int]],
            stop_words: bool) -> dict[str, float]:
    with contextlib.nullcontext() if stop_words else without_stop_words():
        run = {qid: [h.id for h in index.lexical_search(q, K).hits] for qid, q in dataset_queries.items()}
    return evaluate(run, qrels, list(dataset_queries))


def scaled_latency(test: Any, ids: list[str], copies: int, index_dir: Path, queries: list[str]) -> dict[str, Any]:
    """lexical_search top 100 over the corpus `copies` times over."""
    from twostage.server.index.backend import StoredDoc
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    with DocumentIndex.open(index_dir, 8, IndexSettings()) as ix:
        for copy in range(copies):
            for start in range(0, len(ids), 1000):
                chunk = ids[start:start + 1000]
                ix.upsert([StoredDoc(f"{doc_id}~{copy}", test.corpus[doc_id][1], test.corpus[doc_id][0])
                           for doc_id in chunk], rng.standard_normal((len(chunk), 8)).astype(np.float32))
        upsert_s = time.perf_counter() - started
        for q in queries[:20]:
            ix.lexical_search(q, K)
        lat = latency(lambda q: ix.lexical_search(q, K), queries)
        documents = ix.size
    return {"copies": copies, "documents": documents, "upsert_seconds": upsert_s, **lat,
            "matches_per_query": matches(index_dir, queries)}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="builds per variant (they take turns)")
    p.add_argument("--scale", type=int, default=10, help="copies of the corpus for the latency-growth part")
    args = finish_common_args(p.parse_args(argv))
    test = load_dataset(args.data, "scifact", "test")
    train = load_dataset(args.data, "scifact", "train")
    train_queries = args.data / "scifact" / "queries_train.jsonl"  # the shared copy keeps train queries apart
    if train_queries.is_file():
        train.queries = {str(q["_id"]): str(q["text"]) for q in read_jsonl(train_queries) if str(q["_id"]) in train.qrels}
    ids = list(test.corpus)[:300] if args.quick else list(test.corpus)
    work = Path(tempfile.mkdtemp(prefix="lexical-bench-", dir=args.cache if args.cache.is_dir() else None))
    try:
        corpus = work / "corpus.jsonl"  # a temporary copy with a `metadata` field for the filter (deleted below)
        with open(corpus, "w", encoding="utf-8") as fh:
            for n, doc_id in enumerate(ids):
                title, text = test.corpus[doc_id]
                fh.write(json.dumps({"_id": doc_id, "title": title, "text": text, "metadata": {"tenth": n % 10}}) + "\n")

        variants = ("triggers", "no-lexical", "rebuild")
        builds: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                builds[v].append(build(corpus, work / v, v))
        build_summary = {v: {"seconds_median": float(np.median([b["seconds"] for b in runs])), "runs": runs}
                         for v, runs in builds.items()}

        index_dir = work / "triggers"
        sizes = table_bytes(index_dir)
        test_queries = list(test.queries.values())
        optimized_dir = work / "optimized"
        shutil.copytree(index_dir, optimized_dir)
        conn = sqlite3.connect(optimized_dir / STORE_FILE)
        with conn:
            conn.execute("INSERT INTO lexical(lexical) VALUES ('optimize')")
        conn.close()
        settings = IndexSettings()
        with DocumentIndex.open(index_dir, DIM, settings) as ix, DocumentIndex.open(optimized_dir, DIM, settings) as opt:
            for q in test_queries[:20]:  # warm the page cache
                ix.lexical_search(q, K)
                opt.lexical_search(q, K)
            lat = {
                "top100": latency(lambda q: ix.lexical_search(q, K), test_queries),
                "top100_optimized": latency(lambda q: opt.lexical_search(q, K), test_queries),
                "top100_filter_tenth": latency(lambda q: ix.lexical_search(q, K, filter={"tenth": 3}), test_queries),
            }
            with without_stop_words():
                lat["top100_no_stop_words"] = latency(lambda q: ix.lexical_search(q, K), test_queries)
            qual = {}
            for split, ds in (("test", test), ("train", train)) if train.qrels else (("test", test),):
                for name, words in (("stop_words", True), ("no_stop_words", False)):
                    qual[f"{split}_{name}"] = quality(ix, ds.queries, ds.qrels, words)
        match_counts = matches(index_dir, test_queries)
        scaled = scaled_latency(test, ids, args.scale, work / "scaled", test_queries)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(format_table(["build variant", "median s", "runs s"],
                       [[v, f"{s['seconds_median']:.2f}", ", ".join(f"{r['seconds']:.2f}" for r in s["runs"])]
                        for v, s in build_summary.items()]))
    print(format_table(["table", "MiB"], [[k, f"{v / 2**20:.2f}"] for k, v in sizes.items()]))
    print(format_table(["lexical_search", "wall p50 ms", "wall p99 ms", "CPU p50 ms", "CPU p99 ms"],
                       [[k, f"{v['wall_ms']['p50']:.2f}", f"{v['wall_ms']['p99']:.2f}", f"{v['cpu_ms']['p50']:.2f}",
                         f"{v['cpu_ms']['p99']:.2f}"] for k, v in lat.items()]))
    print(f"documents matched per test query (OR of its words): p50 {match_counts['p50']:.0f} of {len(ids)}")
    print(f"{scaled['documents']} documents (corpus x {scaled['copies']}): top100 wall p50 "
          f"{scaled['wall_ms']['p50']:.2f} ms, CPU p50 {scaled['cpu_ms']['p50']:.2f} ms p99 {scaled['cpu_ms']['p99']:.2f} ms, "
          f"matches p50 {scaled['matches_per_query']['p50']:.0f}")
    print(format_table(["queries", "nDCG@10", "recall@100"],
                       [[k, f"{v['ndcg@10']:.4f}", f"{v['recall@100']:.4f}"] for k, v in qual.items()]))
    payload: dict[str, Any] = {
        "config": {"quick": args.quick, "documents": len(ids), "repeats": args.repeats, "dimension": DIM, "k": K},
        "build": build_summary, "table_bytes": sizes, "latency": lat, "matches_per_query": match_counts,
        "quality": qual, "scaled": scaled}
    print(f"saved {save_result('lexical_index', payload, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
