"""Stage-1 search: index build time, memory, latency of embed + ANN top 100, and recall@100 against exact search.

    python -m bench.search                  # full run: 1,000,000 synthetic vectors + SciFact (see docs/benchmarks.md)
    python -m bench.search --n 200000       # smaller synthetic set
    python -m bench.search --quick          # smoke run, seconds, figures meaningless

Parts (one JSON file, bench/results/search.json):

1. Synthetic: `--n` 384-d unit vectors drawn around `--clusters` random centres (cosine metric), queries drawn
   the same way, exact top 100 by numpy as ground truth. Contenders, built with the server's HNSW settings
   (connectivity 16, expansion_add 128): the raw usearch `Index` at f32/f16/i8, FAISS `IndexHNSWFlat` (if
   installed), exact numpy. Each is searched one query at a time, single-threaded (as one request is), at several
   expansion_search values. The raw usearch Index is what `DocumentIndex` wraps; building 1M documents through the
   SQLite store as well would add the store's write time to every build, so the project's own `DocumentIndex` is
   measured at `--docindex-n` documents (the same vectors) instead: upsert time, `search` latency (with the store
   lookup) and recall against its own `exact_search`.
2. Embed + ANN: the bi-encoder's single-query embedding latency (the server's tokenizer, batcher and model, on
   real query texts) is added query by query to the ANN latency of part 1.
3. SciFact: the corpus indexed with `twostage index build`'s code path, served by a real server; the Search RPC
   with skip_rerank (embed + ANN top 100 + store) end to end, and recall@100 of the ANN against exact search.

Generated vectors, ground truth and built indexes are cached under `--cache` (keyed by size, seed and settings),
so a second run skips the builds (their times are then read from the cache's records).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.common import (ServerProcess, base_parser, dir_size_bytes, finish_common_args, format_table,
                          load_dataset, resolve_threads, save_result, summarize, server_threads)

K = 100


# ------------------------------------------------------------------------------------------ data
def synthetic_paths(cache: Path, n: int, dim: int, clusters: int, queries: int, seed: int) -> dict[str, Path]:
    stem = f"synthetic-n{n}-d{dim}-c{clusters}-s{seed}"
    root = Path(cache) / "synthetic"
    return {"base": root / f"{stem}.base.npy", "queries": root / f"{stem}.q{queries}.queries.npy",
            "truth": root / f"{stem}.q{queries}.truth{K}.npy"}


def _draw(rng: np.random.Generator, centres: np.ndarray, count: int, spread: float) -> np.ndarray:
    """Unit vectors around randomly chosen centres: centre + isotropic noise of norm ~spread, normalized."""
    dim = centres.shape[1]
    picks = rng.integers(0, len(centres), size=count)
    x = centres[picks] + rng.standard_normal((count, dim), dtype=np.float32) * (spread / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def synthetic_data(cache: Path, n: int, dim: int, clusters: int, queries: int, seed: int = 7,
                   spread: float = 1.0, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(base [n, dim], queries [q, dim], exact top-K ids [q, K]); generated once, then read from the cache."""
    paths = synthetic_paths(cache, n, dim, clusters, queries, seed)
    paths["base"].parent.mkdir(parents=True, exist_ok=True)
    facts: dict[str, Any] = {"cached": True}
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    if not paths["base"].is_file():
        facts["cached"] = False
        t0 = time.perf_counter()
        tmp = paths["base"].with_suffix(".tmp.npy")
        base = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            base[start:stop] = _draw(np.random.default_rng([seed, start]), centres, stop - start, spread)
        base.flush()
        del base
        tmp.rename(paths["base"])
        facts["generate_s"] = time.perf_counter() - t0
    if not paths["queries"].is_file():
        np.save(paths["queries"], _draw(np.random.default_rng([seed, 2**32 - 1]), centres, queries, spread))
    base = np.load(paths["base"])  # in memory: the indexes are built from RAM
    qs = np.load(paths["queries"])
    if not paths["truth"].is_file():
        t0 = time.perf_counter()
        np.save(paths["truth"], exact_top_k(base, qs, K))
        facts["ground_truth_s"] = time.perf_counter() - t0
    return base, qs, np.load(paths["truth"]), facts


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65_536) -> np.ndarray:
    """Ids of the k highest inner products (cosine on unit vectors) per query, best first."""
    k = min(k, len(base))
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    best = np.zeros((len(queries), 0), dtype=np.float32)
    for start in range(0, len(base), chunk):
        scores = queries @ base[start:start + chunk].T
        ids = np.broadcast_to(np.arange(start, start + scores.shape[1], dtype=np.int64), scores.shape)
        best = np.concatenate([best, scores], axis=1)
        best_ids = np.concatenate([best_ids, ids], axis=1)
        if best.shape[1] > k:
            keep = np.argpartition(-best, k - 1, axis=1)[:, :k]
            best = np.take_along_axis(best, keep, axis=1)
            best_ids = np.take_along_axis(best_ids, keep, axis=1)
    order = np.argsort(-best, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, axis=1)


def recall(found: Sequence[Sequence[int]], truth: np.ndarray, k: int = K) -> float:
    """Mean over queries of |found[:k] & truth[:k]| / k."""
    k = min(k, truth.shape[1])
    return float(np.mean([len(set(np.asarray(f[:k]).tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1000.0


# ------------------------------------------------------------------------------------- contenders
def usearch_index(base: np.ndarray, dtype: str, connectivity: int, expansion_add: int, threads: int,
                  cache: Path, tag: str) -> tuple[Any, dict[str, Any]]:
    """A raw usearch Index over `base` (keys 0..n-1) with the server's settings; built once, then restored."""
    from usearch.index import Index

    path = Path(cache) / "indexes" / f"usearch-{tag}-{dtype}-M{connectivity}-efc{expansion_add}.usearch"
    record = path.with_suffix(".json")
    index = Index(ndim=base.shape[1], metric="cos", dtype=dtype, connectivity=connectivity,
                  expansion_add=expansion_add)
    if path.is_file() and record.is_file():
        facts = json.loads(record.read_text())
        index.load(str(path))
        facts["cached"] = True
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        index.add(np.arange(len(base), dtype=np.uint64), base, threads=threads)
        facts = {"build_s": time.perf_counter() - t0, "threads": threads, "cached": False}
        index.save(str(path))
        record.write_text(json.dumps(facts))
    facts.update({"memory_usage_bytes": int(index.memory_usage), "file_bytes": path.stat().st_size,
                  "file": str(path)})
    return index, facts


def evaluate_usearch(index: Any, queries: np.ndarray, truth: np.ndarray, expansions: list[int],
                     latency_queries: int, threads: int) -> dict[str, Any]:
    out = {}
    for ef in expansions:
        index.expansion_search = ef
        lat, found = [], []
        for q in queries[:latency_queries]:
            m, ms = timed(lambda: index.search(q, K, threads=1))
            lat.append(ms)
            found.append(m.keys)
        batch, batch_ms = timed(lambda: index.search(queries, K, threads=threads))
        found_all = [batch.keys[i, :batch.counts[i]] for i in range(len(queries))]
        out[str(ef)] = {"latency_ms": summarize(lat), f"recall_at_{K}": recall(found_all, truth),
                        "single_query_recall": recall(found, truth[:latency_queries]),
                        "batch_qps": len(queries) / (batch_ms / 1000.0), "_latencies": lat}
    return out


def faiss_index(base: np.ndarray, connectivity: int, expansion_add: int, threads: int, cache: Path,
                tag: str) -> tuple[Any, dict[str, Any]]:
    import faiss

    faiss.omp_set_num_threads(threads)
    path = Path(cache) / "indexes" / f"faiss-hnswflat-{tag}-M{connectivity}-efc{expansion_add}.faiss"
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file():
        index = faiss.read_index(str(path))
        facts = json.loads(record.read_text())
        facts["cached"] = True
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        index = faiss.IndexHNSWFlat(base.shape[1], connectivity, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = expansion_add
        t0 = time.perf_counter()
        index.add(base)
        facts = {"build_s": time.perf_counter() - t0, "threads": threads, "cached": False}
        faiss.write_index(index, str(path))
        record.write_text(json.dumps(facts))
    facts.update({"file_bytes": path.stat().st_size, "file": str(path)})
    return index, facts


def evaluate_faiss(index: Any, queries: np.ndarray, truth: np.ndarray, expansions: list[int], latency_queries: int,
                   threads: int) -> dict[str, Any]:
    import faiss

    out = {}
    for ef in expansions:
        index.hnsw.efSearch = ef
        faiss.omp_set_num_threads(1)
        lat, found = [], []
        for q in queries[:latency_queries]:
            (_, ids), ms = timed(lambda: index.search(q[None, :], K))
            lat.append(ms)
            found.append(ids[0])
        faiss.omp_set_num_threads(threads)
        (_, ids), batch_ms = timed(lambda: index.search(queries, K))
        out[str(ef)] = {"latency_ms": summarize(lat), f"recall_at_{K}": recall(list(ids), truth),
                        "single_query_recall": recall(found, truth[:latency_queries]),
                        "batch_qps": len(queries) / (batch_ms / 1000.0), "_latencies": lat}
    return out


def evaluate_exact(base: np.ndarray, queries: np.ndarray, latency_queries: int) -> dict[str, Any]:
    lat = []
    for q in queries[:latency_queries]:
        def one() -> np.ndarray:
            scores = base @ q
            top = np.argpartition(-scores, K - 1)[:K] if len(scores) > K else np.arange(len(scores))
            return top[np.argsort(-scores[top])]
        _, ms = timed(one)
        lat.append(ms)
    return {"latency_ms": summarize(lat), f"recall_at_{K}": 1.0, "_latencies": lat}


def evaluate_document_index(base: np.ndarray, queries: np.ndarray, dtype: str, connectivity: int,
                            expansion_add: int, expansions: list[int], latency_queries: int,
                            chunk: int = 5000) -> dict[str, Any]:
    """The project's DocumentIndex (usearch + SQLite store) at len(base) documents: upsert, search, recall."""
    from twostage.server.index.backend import StoredDoc
    from twostage.server.index.embedded import DocumentIndex
    from twostage.server.index.settings import IndexSettings

    settings = IndexSettings(metric="cos", dtype=dtype, connectivity=connectivity, expansion_add=expansion_add)
    tmp = Path(tempfile.mkdtemp(prefix="bench-docindex-"))
    try:
        index = DocumentIndex.open(tmp / "index", base.shape[1], settings)
        t0 = time.perf_counter()
        for start in range(0, len(base), chunk):
            stop = min(len(base), start + chunk)
            index.upsert([StoredDoc(id=f"d{i}", text=f"synthetic document {i}") for i in range(start, stop)],
                         base[start:stop])
        upsert_s = time.perf_counter() - t0
        exact = index.exact_search_batch(queries, K)
        truth = [[h.id for h in r.hits] for r in exact]
        per_ef = {}
        for ef in expansions:
            lat, found = [], []
            for q in queries[:latency_queries]:
                r, ms = timed(lambda: index.search(q, K, expansion_search=ef))
                lat.append(ms)
                found.append([h.id for h in r.hits])
            hits = [sum(1 for i in f if i in set(t)) / min(K, len(t)) for f, t in zip(found, truth)]
            per_ef[str(ef)] = {"latency_ms": summarize(lat), f"recall_at_{K}": float(np.mean(hits))}
        t0 = time.perf_counter()
        index.close()
        close_s = time.perf_counter() - t0
        return {"documents": len(base), "upsert_s": upsert_s, "upsert_docs_per_s": len(base) / upsert_s,
                "close_with_snapshot_s": close_s, "directory_bytes": dir_size_bytes(tmp / "index"),
                "expansion_search": per_ef}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ embedding
def embed_latencies(models: Path, texts: list[str], threads: int) -> list[float]:
    """Single-text embedding latency through the server's tokenizer, batcher and bi-encoder (in-process)."""
    from twostage.server.cli import BackgroundEmbedder
    from twostage.server.config import Config

    embedder = BackgroundEmbedder(Config(models=str(models), **server_threads(threads)))
    try:
        embedder.embed(texts[:2])
        return [timed(lambda: embedder.embed([t]))[1] for t in texts]
    finally:
        embedder.close()


def scifact_section(args: argparse.Namespace, threads: int, latency_queries: int) -> dict[str, Any]:
    """SciFact served by a real server: dense Search RPC (skip_rerank) latency, and ANN recall against exact search."""
    from bench.prepare import corpus_index
    from twostage.server.index.embedded import DocumentIndex
    from twostage.server.index.settings import IndexSettings
    from twostage.v1 import twostage_pb2 as pb

    ds = load_dataset(args.data, "scifact")
    index_dir, build = corpus_index(args.models, args.data / "scifact" / "corpus.jsonl", args.cache, threads)
    queries = list(ds.queries.values())[:latency_queries]
    work = Path(tempfile.mkdtemp(prefix="bench-search-scifact-"))
    try:
        shutil.copytree(index_dir, work / "index")
        lat, timings, results = [], [], []
        with ServerProcess(args.models, work / "index", **server_threads(threads)) as server:
            stub = server.stub()
            for q in queries[:2]:
                stub.Search(pb.SearchRequest(query=q, skip_rerank=True, ids_only=True, top_k=K, candidates=K,
                                             retrieval_mode=pb.RETRIEVAL_MODE_DENSE), timeout=60)
            for q in queries:
                resp, ms = timed(lambda: stub.Search(pb.SearchRequest(query=q, skip_rerank=True, ids_only=True,
                                                                      top_k=K, candidates=K,
                                                                      retrieval_mode=pb.RETRIEVAL_MODE_DENSE),
                                                     timeout=60))
                lat.append(ms)
                t = resp.timing
                timings.append({"total_ms": t.total_ms, "embed_ms": t.embed.tokenize_ms + t.embed.queue_ms +
                                t.embed.inference_ms, "ann_ms": t.ann_ms, "store_ms": t.store_ms})
                results.append([h.id for h in resp.hits])
        # recall: the same query vectors, ANN (search) against exact_search, on the index in-process
        from twostage.server.cli import BackgroundEmbedder
        from twostage.server.config import Config

        embedder = BackgroundEmbedder(Config(models=str(args.models), **server_threads(threads)))
        try:
            vectors = np.concatenate([embedder.embed([q]) for q in queries])  # one at a time, as the RPC does
        finally:
            embedder.close()
        index = DocumentIndex.open(work / "index", int(vectors.shape[1]), IndexSettings())
        try:
            ann = [[h.id for h in index.search(v, K).hits] for v in vectors]
            exact = [[h.id for h in r.hits] for r in index.exact_search_batch(vectors, K)]
        finally:
            index.close()
        rec = float(np.mean([len(set(a) & set(e)) / max(1, len(e)) for a, e in zip(ann, exact)]))
        same_as_rpc = float(np.mean([a == r for a, r in zip(ann, results)]))
        # the same real embeddings through every contender (raw indexes over the stored vectors)
        _, doc_vectors = stored_vectors(work / "index")
        truth = exact_top_k(doc_vectors, vectors, K)
        contenders, rows, _ = compare_contenders(doc_vectors, vectors, truth, args, threads, index_dir.name, [],
                                                 exact_queries=len(vectors))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mean = {k: float(np.mean([t[k] for t in timings])) for k in ("total_ms", "embed_ms", "ann_ms", "store_ms")}
    return {"documents": len(ds.corpus), "queries": len(queries), "index_build": build,
            "search_rpc_latency_ms": summarize(lat), "server_timing_mean_ms": mean,
            "embed_plus_ann_ms": summarize([t["embed_ms"] + t["ann_ms"] for t in timings]),
            f"recall_at_{K}": rec, "rpc_hits_equal_in_process_ann": same_as_rpc,
            "expansion_search": IndexSettings().expansion_search, "contenders": contenders, "_rows": rows}


CONTENDER_HEADERS = ["contender", "ef", "build s", "MiB", "p50 ms", "p99 ms", f"recall@{K}", "batch q/s",
                     "embed+ANN p50 ms"]


def compare_contenders(base: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace,
                       threads: int, tag: str, embed_ms: list[float], exact_queries: int | None = None
                       ) -> tuple[dict[str, Any], list[list[Any]], dict[str, str]]:
    """usearch per dtype, FAISS and exact numpy over the same vectors and queries: (results, table rows, notes)."""
    contenders: dict[str, Any] = {}
    notes: dict[str, str] = {}
    latency_queries = min(args.latency_queries, len(queries))
    for dtype in args.dtypes:
        index, facts = usearch_index(base, dtype, args.connectivity, args.expansion_add, threads, args.cache, tag)
        contenders[f"usearch-{dtype}"] = {"build": facts, "expansion_search": evaluate_usearch(
            index, queries, truth, args.expansions, latency_queries, threads)}
        del index
    if not args.no_faiss:
        try:
            import faiss  # noqa: F401  (is it installed?)
        except ImportError:
            notes["faiss"] = "not installed (pip install faiss-cpu)"
        else:
            index, facts = faiss_index(base, args.connectivity, args.expansion_add, threads, args.cache, tag)
            contenders["faiss-hnswflat-f32"] = {"build": facts, "expansion_search": evaluate_faiss(
                index, queries, truth, args.expansions, latency_queries, threads)}
            del index
    contenders["exact-numpy-f32"] = {"build": {"build_s": 0.0, "memory_usage_bytes": int(base.nbytes)},
                                     "expansion_search": {"-": evaluate_exact(
                                         base, queries, min(len(queries), exact_queries or args.exact_queries))}}
    rows = []
    for name, c in contenders.items():
        for ef, e in c["expansion_search"].items():
            lat = e["latency_ms"]
            ann_ms = e.pop("_latencies")
            if embed_ms:
                n = min(len(embed_ms), len(ann_ms))
                paired = np.asarray(embed_ms[:n]) + np.asarray(ann_ms[:n])
                e["embed_plus_ann_ms"] = summarize(paired)
                e["embed_plus_ann_p50_ms"] = float(np.median(paired))
            rows.append([name, ef, c["build"].get("build_s"), (c["build"].get("memory_usage_bytes") or
                         c["build"].get("file_bytes") or 0) / 2**20, lat["p50"], lat["p99"], e.get(f"recall_at_{K}"),
                         e.get("batch_qps"), e.get("embed_plus_ann_p50_ms")])
    return contenders, rows, notes


def stored_vectors(index_dir: Path) -> tuple[list[str], np.ndarray]:
    """Every document id and float32 vector of an index directory's store (the documented SQLite layout)."""
    import sqlite3

    from twostage.server.index.layout import STORE_FILE

    conn = sqlite3.connect(f"file:{index_dir / STORE_FILE}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT id, vector FROM documents ORDER BY key").fetchall()
    finally:
        conn.close()
    return [r[0] for r in rows], np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows]).astype(np.float32)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="synthetic vectors (default 1,000,000; quick 2,000)")
    p.add_argument("--dim", type=int, default=384, help="vector dimension")
    p.add_argument("--clusters", type=int, default=None, help="cluster centres (default n/1000, at least 10)")
    p.add_argument("--queries", type=int, default=None, help="synthetic queries (default 1,000; quick 20)")
    p.add_argument("--latency-queries", type=int, default=None,
                   help="queries timed one by one per setting (default 300; quick 10)")
    p.add_argument("--exact-queries", type=int, default=None, help="queries timed for exact numpy (default 20; quick 3)")
    p.add_argument("--dtypes", default="f32,f16,i8", help="usearch scalar types")
    p.add_argument("--expansions", default=None, help="expansion_search values (default 16,32,64,128,256; quick 16,64)")
    p.add_argument("--connectivity", type=int, default=16, help="HNSW connectivity (the server default)")
    p.add_argument("--expansion-add", type=int, default=128, help="HNSW expansion_add (the server default)")
    p.add_argument("--docindex-n", type=int, default=None,
                   help="documents for the DocumentIndex measurement (default 100,000; quick 500; 0 = skip)")
    p.add_argument("--no-faiss", action="store_true", help="skip FAISS")
    p.add_argument("--no-scifact", action="store_true", help="skip the SciFact part (needs the model set)")
    p.add_argument("--build-only", action="store_true",
                   help="only build (and cache) the 1M-vector indexes, measure nothing: lets the long builds run "
                        "while the machine is busy, and the timed run later on an idle machine (the recorded build "
                        "times are then those of the busy machine)")
    args = finish_common_args(p.parse_args(argv))
    q = args.quick
    args.n = args.n if args.n is not None else (2000 if q else 1_000_000)
    args.clusters = args.clusters if args.clusters is not None else max(10, args.n // 1000)
    args.queries = args.queries if args.queries is not None else (20 if q else 1000)
    args.latency_queries = min(args.queries, args.latency_queries if args.latency_queries is not None else (10 if q else 300))
    args.exact_queries = min(args.queries, args.exact_queries if args.exact_queries is not None else (3 if q else 20))
    args.dtypes = args.dtypes.split(",")
    args.expansions = [int(x) for x in (args.expansions or ("16,64" if q else "16,32,64,128,256")).split(",")]
    args.docindex_n = min(args.n, args.docindex_n if args.docindex_n is not None else (500 if q else 100_000))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = resolve_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    base, queries, truth, data_facts = synthetic_data(args.cache, args.n, args.dim, args.clusters, args.queries)
    tag = f"n{args.n}-d{args.dim}-c{args.clusters}"
    if args.build_only:
        built = [usearch_index(base, dtype, args.connectivity, args.expansion_add, threads, args.cache, tag)[1]
                 for dtype in args.dtypes]
        if not args.no_faiss:
            built.append(faiss_index(base, args.connectivity, args.expansion_add, threads, args.cache, tag)[1])
        for facts in built:
            if not facts.get("cached") and facts.get("file"):
                record = Path(facts["file"]).with_suffix(".json")
                stored = json.loads(record.read_text())
                stored["note"] = "built by --build-only: the machine may have been busy; build_s is an upper bound"
                record.write_text(json.dumps(stored))
            print({k: v for k, v in facts.items() if k != "file"})
        return 0
    result: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "threads": threads,
        "synthetic": {"n": args.n, "dim": args.dim, "clusters": args.clusters, "queries": args.queries,
                      "data": data_facts, "contenders": {}},
        "notes": [
            "ANN latency: one query at a time, one thread, k=100; batch_qps: all queries in one call, all threads.",
            "Raw usearch Index with the server's settings (connectivity, expansion_add, cos metric) at --n; the "
            "project's DocumentIndex (usearch + SQLite store) measured at --docindex-n documents.",
            "embed_plus_ann: single-query bi-encoder latency (server tokenizer + batcher + int8 model, in-process, "
            "real query texts) added query by query to the single-query ANN latency.",
        ]}
    embed_ms: list[float] = []
    if not args.no_scifact:
        ds = load_dataset(args.data, "scifact")
        texts = list(ds.queries.values())
        texts = (texts * (args.latency_queries // max(1, len(texts)) + 1))[:args.latency_queries]
        embed_ms = embed_latencies(args.models, texts, threads)
        result["embed_single_query_ms"] = summarize(embed_ms)
    contenders, rows, notes = compare_contenders(base, queries, truth, args, threads, tag, embed_ms)
    result["synthetic"]["contenders"] = contenders
    result.update(notes)
    print(f"\n== synthetic: {args.n:,} x {args.dim} vectors, {args.clusters} clusters, {args.queries} queries, k={K}")
    print(format_table(CONTENDER_HEADERS, rows))
    if embed_ms:
        print(f"single-query embedding (bi-encoder, in-process): p50 {np.median(embed_ms):.2f} ms")
    if args.docindex_n:
        result["document_index"] = {}
        drows = []
        for dtype in args.dtypes:
            d = evaluate_document_index(base[:args.docindex_n], queries[:args.latency_queries], dtype, args.connectivity,
                                        args.expansion_add, args.expansions, args.latency_queries)
            result["document_index"][dtype] = d
            for ef, e in d["expansion_search"].items():
                drows.append([dtype, ef, d["upsert_s"], d["directory_bytes"] / 2**20, e["latency_ms"]["p50"],
                              e["latency_ms"]["p99"], e[f"recall_at_{K}"]])
        print(f"\n== DocumentIndex (usearch + SQLite store), {args.docindex_n:,} documents")
        print(format_table(["dtype", "ef", "upsert s", "dir MiB", "search p50 ms", "p99 ms", f"recall@{K}"], drows))
    if not args.no_scifact:
        s = scifact_section(args, threads, args.latency_queries)
        result["scifact"] = s
        print(f"\n== SciFact ({s['documents']:,} abstracts), Search RPC skip_rerank top {K}, {s['queries']} queries")
        print(format_table(["search RPC p50 ms", "p99 ms", "embed+ANN p50 ms", "server embed ms", "ann ms", "store ms",
                            f"recall@{K}"],
                           [[s["search_rpc_latency_ms"]["p50"], s["search_rpc_latency_ms"]["p99"],
                             s["embed_plus_ann_ms"]["p50"], s["server_timing_mean_ms"]["embed_ms"],
                             s["server_timing_mean_ms"]["ann_ms"], s["server_timing_mean_ms"]["store_ms"],
                             s[f"recall_at_{K}"]]]))
        print(f"SciFact embeddings ({s['documents']:,} documents, {s['queries']} queries) through each contender:")
        print(format_table(CONTENDER_HEADERS, s.pop("_rows")))
    result["targets"] = {"wanted": "embed + ANN p50 <= 10 ms at recall@100 >= 0.95 over 1M",
                         "measured": best_setting(contenders, 0.95)}
    print(f"\n== target: {result['targets']['wanted']}; fastest setting reaching recall@{K} >= 0.95:")
    print(format_table(["contender", "expansion_search", "ANN p50 ms", f"recall@{K}", "embed+ANN p50 ms"],
                       [[n, b["expansion_search"], b["ann_p50_ms"], b[f"recall_at_{K}"], b["embed_plus_ann_p50_ms"]]
                        if b else [n, "none", None, None, None] for n, b in result["targets"]["measured"].items()]))
    path = save_result("search", result, args.out)
    print(f"\nsaved {path}")
    return 0


def best_setting(contenders: dict[str, Any], min_recall: float) -> dict[str, Any]:
    """Per contender: the fastest expansion_search reaching `min_recall` (None when none does)."""
    out = {}
    for name, c in contenders.items():
        ok = [(e["latency_ms"]["p50"], ef, e) for ef, e in c["expansion_search"].items()
              if (e.get(f"recall_at_{K}") or 0) >= min_recall]
        if ok:
            p50, ef, e = min(ok, key=lambda t: t[0])
            out[name] = {"expansion_search": ef, "ann_p50_ms": p50, f"recall_at_{K}": e[f"recall_at_{K}"],
                         "embed_plus_ann_p50_ms": e.get("embed_plus_ann_p50_ms")}
        else:
            out[name] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
