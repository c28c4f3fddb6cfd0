"""Same candidates, same ranking: SciFact served from the embedded backend and from Milvus (milvus-lite), compared.

    python -m bench.milvus_parity                # SciFact test split: 5,183 documents, 300 queries
    python -m bench.milvus_parity --quick        # 300 documents, 10 queries: a smoke run, figures meaningless

The backend changes where stage-1 candidates come from, not what they are: this measures it. The corpus is
embedded once, by the served bi-encoder through the code path of `twostage index build` (the server's batcher,
`BackgroundEmbedder`), and the same vectors go into both backends through their own build paths:
`build_index` (usearch HNSW + SQLite) and `build_collection` (a Milvus collection behind an alias), each
handed a lookup of the precomputed vectors instead of the model. Then one real server per backend (one after
the other, same settings) answers every query twice through the Search RPC: `skip_rerank` (the bi-encoder's
dense ranking) and with the cross-encoder over the 100 candidates. Reported per backend: nDCG@10 and
recall@100 with and without rerank; between the backends: the largest nDCG@10 difference, and per query the
overlap of the two top-100 candidate lists and whether the ranked top-10 lists are identical.

milvus-lite 3.x is a Python re-implementation of the Milvus API (FAISS HNSW under it), not the Milvus
server: its build and query times here say nothing about Milvus's, and the JSON records them only as what
this run took.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (ServerProcess, base_parser, finish_common_args, format_table, load_dataset, package_versions,
                          resolve_threads, save_result, server_threads)
from bench.ir_metrics import evaluate
from bench.prepare import bi_encoder_fingerprint

DEPTH = 100
DATASET = "scifact"
COLLECTION = "scifact"
BACKENDS = ("embedded", "milvus")
MODES = ("dense", "dense + rerank")


# ------------------------------------------------------------------------------------------- corpus vectors
def corpus_texts(corpus: Path) -> list[str]:
    """What the bi-encoder reads for each document, exactly as both build paths form it, in corpus order."""
    from twostage.server.index.backend import embedding_text
    from twostage.server.indexing import iter_corpus

    return [embedding_text(d.title, d.text) for d in iter_corpus(corpus)]


def corpus_vectors(models: Path, corpus: Path, cache: Path, threads: int) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """The served bi-encoder's vectors of every document (cached by model and corpus); the texts; facts."""
    from twostage.model.manifest import sha256_file
    from twostage.server.cli import BackgroundEmbedder
    from twostage.server.config import Config

    texts = corpus_texts(corpus)
    key = hashlib.sha256(f"{bi_encoder_fingerprint(models)} {sha256_file(corpus)}".encode()).hexdigest()[:16]
    path = Path(cache) / "vectors" / f"{corpus.parent.name}-{key}.npy"
    if path.is_file():
        vectors = np.load(path)
        if len(vectors) == len(texts):
            return vectors, texts, {"embed_s": None, "cached": str(path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    config = Config(models=str(models), **server_threads(threads), log_format="text", log_level="warning")
    t0 = time.perf_counter()
    embedder = BackgroundEmbedder(config)
    try:
        vectors = np.concatenate([embedder.embed(texts[i:i + 256]) for i in range(0, len(texts), 256)])
    finally:
        embedder.close()
    seconds = time.perf_counter() - t0
    np.save(path, vectors)
    return vectors, texts, {"embed_s": seconds, "docs_per_s": len(texts) / seconds, "cached": str(path)}


class VectorLookup:
    """`embed(texts)` for the build paths that returns the precomputed vector of each text (no model runs)."""

    def __init__(self, texts: list[str], vectors: np.ndarray):
        self.rows = {t: i for i, t in enumerate(texts)}
        self.vectors = vectors

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.vectors[[self.rows[t] for t in texts]]


# ------------------------------------------------------------------------------------------- builds
def build_embedded(models: Path, corpus: Path, embed: VectorLookup, dimension: int, index_dir: Path) -> dict[str, Any]:
    from twostage.server.config import Config
    from twostage.server.index.settings import IndexSettings
    from twostage.server.indexing import build_index

    settings = IndexSettings.from_config(Config(models=str(models), index=str(index_dir)))
    t0 = time.perf_counter()
    report = build_index(corpus, index_dir, embed, dimension, settings, progress=False,
                         embed_fingerprint=bi_encoder_fingerprint(models))
    return {"documents": report.documents, "build_s": time.perf_counter() - t0}


def build_milvus(models: Path, corpus: Path, embed: VectorLookup, uri: str) -> dict[str, Any]:
    from twostage.model.model_set import open_embedder
    from twostage.server.config import Config
    from twostage.server.index.milvus import MilvusSettings, ModelFingerprint, build_collection

    fingerprint = ModelFingerprint.of(open_embedder(models))
    settings = MilvusSettings.from_config(Config(models=str(models), milvus_uri=uri, milvus_collection=COLLECTION,
                                                 milvus_timeout_s=120.0))
    t0 = time.perf_counter()
    report = build_collection(corpus, settings, fingerprint, embed, progress=False)
    return {"documents": report.documents, "build_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------- queries
def run_queries(server: ServerProcess, queries: dict[str, str], progress: bool) -> dict[str, Any]:
    """Per query: the dense top 100 (skip_rerank), the reranked top 100, and the stage-1 order the reranked
    Search saw (its hits sorted by retrieval_rank)."""
    from twostage.v1 import twostage_pb2 as pb

    stub = server.stub()
    dense: dict[str, list[str]] = {}
    reranked: dict[str, list[str]] = {}
    stage1_mismatch = 0
    t0 = time.perf_counter()
    for n, (qid, query) in enumerate(queries.items()):
        plain = stub.Search(pb.SearchRequest(query=query, top_k=DEPTH, candidates=DEPTH, skip_rerank=True,
                                             ids_only=True), timeout=900)
        full = stub.Search(pb.SearchRequest(query=query, top_k=DEPTH, candidates=DEPTH, ids_only=True), timeout=900)
        dense[qid] = [h.id for h in plain.hits]
        reranked[qid] = [h.id for h in full.hits]
        stage1_mismatch += [h.id for h in sorted(full.hits, key=lambda h: h.retrieval_rank)] != dense[qid]
        if progress and (n + 1) % 50 == 0:
            print(f"    {n + 1}/{len(queries)} queries, {time.perf_counter() - t0:.0f} s", flush=True)
    return {"dense": dense, "dense + rerank": reranked, "query_s": time.perf_counter() - t0,
            "stage1_differs_between_calls": stage1_mismatch}


def compare(a: dict[str, list[str]], b: dict[str, list[str]], queries: list[str], k: int) -> dict[str, float]:
    """Overlap of the top-k sets (mean, min) and the share of queries whose top-k lists are identical in order."""
    overlaps = [len(set(a[q][:k]) & set(b[q][:k])) / max(1, min(k, len(a[q]), len(b[q]))) for q in queries]
    same = [a[q][:k] == b[q][:k] for q in queries]
    return {f"top{k}_overlap_mean": float(np.mean(overlaps)), f"top{k}_overlap_min": float(np.min(overlaps)),
            f"top{k}_identical_order_share": float(np.mean(same))}


# ------------------------------------------------------------------------------------------- main
def quick_corpus(corpus: Path, qrels: dict[str, dict[str, int]], queries: list[str], out: Path, size: int) -> Path:
    """The first `size` documents plus those judged for `queries`, written to `out` (under the cache)."""
    keep = {d for q in queries for d in qrels.get(q, {})}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "corpus.jsonl"
    with open(corpus, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as dst:
        for n, line in enumerate(src):
            if line.strip() and (n < size or json.loads(line)["_id"] in keep):
                dst.write(line)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--max-queries", type=int, default=None, help="judged queries (default all 300; quick 10)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="print progress")
    args = finish_common_args(p.parse_args(argv))
    args.max_queries = args.max_queries if args.max_queries is not None else (10 if args.quick else 0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = resolve_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(args.data, DATASET)
    queries = ds.judged_queries[:args.max_queries] if args.max_queries else ds.judged_queries
    work = Path(tempfile.mkdtemp(prefix="bench-milvus-parity-"))
    corpus = args.data / DATASET / "corpus.jsonl"
    if args.quick:
        corpus = quick_corpus(corpus, ds.qrels, queries, args.cache / "milvus-parity-quick", 300)
    facts: dict[str, Any] = {"dataset": DATASET, "queries": len(queries), "depth": DEPTH, "threads": threads,
                             "versions": package_versions(["pymilvus", "milvus-lite", "usearch"])}
    runs: dict[str, dict[str, Any]] = {}
    try:
        vectors, texts, facts["embedding"] = corpus_vectors(args.models, corpus, args.cache, threads)
        facts["documents"] = len(texts)
        lookup = VectorLookup(texts, vectors)
        print(f"{len(texts):,} documents embedded ({facts['embedding']})", flush=True)
        facts["build"] = {"embedded": build_embedded(args.models, corpus, lookup, vectors.shape[1], work / "index"),
                          "milvus": build_milvus(args.models, corpus, lookup, str(work / "lite.db"))}
        print(f"built: {facts['build']}", flush=True)
        backends = {"embedded": {"index": work / "index"},
                    "milvus": {"index": work / "unused", "milvus_uri": str(work / "lite.db"),
                               "milvus_collection": COLLECTION, "milvus_timeout_s": 120.0}}
        for name, where in backends.items():
            print(f"  querying the {name} backend", flush=True)
            with ServerProcess(args.models, **where, **server_threads(threads)) as server:
                runs[name] = run_queries(server, {q: ds.queries[q] for q in queries}, args.progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    qids = list(queries)
    quality = {b: {m: evaluate(runs[b][m], ds.qrels, qids, 10, DEPTH) for m in MODES} for b in BACKENDS}
    difference = {m: {"ndcg@10": abs(quality["embedded"][m]["ndcg@10"] - quality["milvus"][m]["ndcg@10"]),
                      f"recall@{DEPTH}": abs(quality["embedded"][m][f"recall@{DEPTH}"]
                                             - quality["milvus"][m][f"recall@{DEPTH}"])} for m in MODES}
    agreement = {"dense": {**compare(runs["embedded"]["dense"], runs["milvus"]["dense"], qids, DEPTH),
                           **compare(runs["embedded"]["dense"], runs["milvus"]["dense"], qids, 10)},
                 "dense + rerank": compare(runs["embedded"]["dense + rerank"], runs["milvus"]["dense + rerank"], qids, 10)}
    facts["query_s"] = {b: runs[b]["query_s"] for b in BACKENDS}
    facts["stage1_differs_between_calls"] = {b: runs[b]["stage1_differs_between_calls"] for b in BACKENDS}
    largest = max(d["ndcg@10"] for d in difference.values())
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "facts": facts,
              "quality": quality, "difference": difference, "largest_ndcg10_difference": largest,
              "within_0_005": largest <= 0.005, "agreement": agreement,
              "notes": ["One set of document vectors (the served int8 bi-encoder) built into both backends; "
                        "queries through the Search RPC of a real server per backend, with the same settings.",
                        "milvus-lite is a Python re-implementation of the Milvus API, not the Milvus server: its "
                        "build and query times are not Milvus's."]}
    rows = [[b, m, quality[b][m]["ndcg@10"], quality[b][m][f"recall@{DEPTH}"]] for m in MODES for b in BACKENDS]
    print(format_table(["backend", "mode", "nDCG@10", f"recall@{DEPTH}"], rows))
    print(f"largest nDCG@10 difference: {largest:.4f} ({'within' if largest <= 0.005 else 'NOT within'} 0.005)")
    for mode, figures in agreement.items():
        print(f"  {mode}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    path = save_result("milvus_parity", result, args.out)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
