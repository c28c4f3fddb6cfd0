"""Same candidates, same ranking: SciFact served from the embedded backend and from Milvus (milvus-lite), compared.

    python -m bench.milvus_parity                # SciFact test split: 5,183 documents, 300 queries
    python -m bench.milvus_parity --quick        # 300 documents, 10 queries: a smoke run, figures meaningless

The backend changes where stage-1 candidates come from, not what they are: this measures it. The corpus is
embedded once, by the served bi-encoder through the code path of `twostage index build` (the server's batcher,
`BackgroundEmbedder`), and the same vectors go into both backends through their own build paths:
`build_index` (usearch HNSW + SQLite) and `build_collection` (a Milvus collection behind an alias), each
handed a lookup of the precomputed vectors instead of the model. Then a real server per backend (same
settings) answers every query:

- the Milvus server: Search with rerank (top 100 of 100 candidates) and Search with `skip_rerank`;
- the embedded server: Search with `skip_rerank`. Its reranked ranking is its dense top 100 ordered as the
  engine orders reranked hits (cross-encoder score, then stage-1 position), with the scores the Milvus
  server's Search gave the same (query, document) pairs, and the embedded server's Rerank RPC
  (document_ids) for candidates Milvus did not return. The served cross-encoder scores a pair the same in any
  batch (static int8, `batch_variation` 0 in its manifest), so this is the ranking the embedded server's own
  reranked Search returns, at half the cross-encoder work (the part that costs: ~30,000 pairs per pass);
  every `--check-every`th query also gets that reranked Search, and the JSON counts any that differ.

Reported per backend: nDCG@10 and recall@100 with and without rerank; between the backends: the largest
nDCG@10 difference, and per query the overlap of the two top-100 candidate lists and whether the top-10
lists are identical.

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
from twostage.client.ir_metrics import evaluate_run as evaluate
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
def engine_order(ids: list[str], scores: dict[str, float]) -> list[str]:
    """The engine's order of reranked hits (server/engine.py): cross-encoder score, then stage-1 position."""
    return [d for _, _, d in sorted((-scores[d], i, d) for i, d in enumerate(ids))]


def query_record(stubs: dict[str, Any], query: str, check: bool) -> dict[str, Any]:
    """One query's rankings from both servers (see the module docstring for which come from where)."""
    from twostage.v1 import twostage_pb2 as pb

    def search(backend: str, rerank: bool) -> Any:
        # dense stage 1 (the comparison is of the ANN candidates; the two backends' BM25 analysers differ) and the
        # cross-encoder alone, so that the rankings depend on nothing but the candidates
        return stubs[backend].Search(pb.SearchRequest(query=query, top_k=DEPTH, candidates=DEPTH, ids_only=True,
                                                      skip_rerank=not rerank, retrieval_mode=pb.RETRIEVAL_MODE_DENSE,
                                                      rerank_weight=1.0), timeout=900)

    t0 = time.perf_counter()
    full = search("milvus", rerank=True)
    scores = {h.id: h.rerank_score for h in full.hits if h.reranked}
    rec: dict[str, Any] = {"milvus": {"dense + rerank": [h.id for h in full.hits],
                                      "dense": [h.id for h in search("milvus", rerank=False).hits]},
                           "embedded": {"dense": [h.id for h in search("embedded", rerank=False).hits]}}
    stage1 = [h.id for h in sorted(full.hits, key=lambda h: h.retrieval_rank)]
    rec["stage1_differs_from_skip_rerank"] = stage1 != rec["milvus"]["dense"]
    dense = rec["embedded"]["dense"]
    missing = [d for d in dense if d not in scores]
    if missing:  # the embedded backend's candidates that Milvus did not return, scored by the embedded server
        resp = stubs["embedded"].Rerank(pb.RerankRequest(query=query, document_ids=missing), timeout=900)
        scores.update({missing[r.index]: r.score for r in resp.results})
    rec["rerank_pairs_scored_by_rerank_rpc"] = len(missing)
    rec["embedded"]["dense + rerank"] = engine_order(dense, scores)
    rec["checked"] = check
    if check:  # the embedded server's own reranked Search must agree
        rec["checked_differs"] = [h.id for h in search("embedded", rerank=True).hits] != rec["embedded"]["dense + rerank"]
    rec["seconds"] = time.perf_counter() - t0
    return rec


def run_queries(milvus: ServerProcess, embedded: ServerProcess, queries: dict[str, str], check_every: int,
                journal: Path, progress: bool) -> dict[str, dict[str, Any]]:
    """Every query's record, appended to `journal` (JSON lines of ids and figures) as it is made; queries
    already in the journal are not run again, so an interrupted run resumes where it stopped."""
    done: dict[str, dict[str, Any]] = {}
    if journal.is_file():
        for line in journal.read_text().splitlines():
            rec = json.loads(line)
            done[rec["qid"]] = rec
    stubs = {"milvus": milvus.stub(), "embedded": embedded.stub()}
    todo = [q for q in queries if q not in done]
    if done:
        print(f"    resuming: {len(queries) - len(todo)} queries already in {journal}", flush=True)
    t0 = time.perf_counter()
    with open(journal, "a") as out:
        for qid in todo:
            n = list(queries).index(qid)
            rec = {"qid": qid, **query_record(stubs, queries[qid], bool(check_every) and n % check_every == 0)}
            out.write(json.dumps(rec) + "\n")
            out.flush()
            done[qid] = rec
            if progress and len(done) % 25 == 0:
                print(f"    {len(done)}/{len(queries)} queries, {time.perf_counter() - t0:.0f} s", flush=True)
    return {q: done[q] for q in queries}


def journal_path(args: argparse.Namespace, corpus: Path) -> Path:
    """Where this run's per-query records go: keyed by both models, the corpus and the options that matter."""
    from twostage.model.manifest import read_manifest, sha256_file

    parts = [json.dumps(read_manifest(Path(args.models) / role)["files"], sort_keys=True)
             for role in ("bi-encoder", "cross-encoder")]
    parts += [sha256_file(corpus), str(DEPTH), str(args.check_every)]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    path = Path(args.cache) / "milvus-parity" / f"{corpus.parent.name}-{key}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh and path.exists():
        path.unlink()
    return path


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
    p.add_argument("--check-every", type=int, default=None,
                   help="every Nth query also gets the embedded server's own reranked Search, which must equal the "
                        "order computed from the scores (default 15; quick 1; 0 = never)")
    p.add_argument("--fresh", action="store_true",
                   help="ignore the per-query records of an earlier, interrupted run (by default it is resumed)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="print progress")
    args = finish_common_args(p.parse_args(argv))
    args.max_queries = args.max_queries if args.max_queries is not None else (10 if args.quick else 0)
    args.check_every = args.check_every if args.check_every is not None else (1 if args.quick else 15)
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
    try:
        vectors, texts, facts["embedding"] = corpus_vectors(args.models, corpus, args.cache, threads)
        facts["documents"] = len(texts)
        lookup = VectorLookup(texts, vectors)
        print(f"{len(texts):,} documents embedded ({facts['embedding']})", flush=True)
        facts["build"] = {"embedded": build_embedded(args.models, corpus, lookup, vectors.shape[1], work / "index"),
                          "milvus": build_milvus(args.models, corpus, lookup, str(work / "lite.db"))}
        print(f"built: {facts['build']}", flush=True)
        milvus_server = ServerProcess(args.models, work / "unused", milvus_uri=str(work / "lite.db"),
                                      milvus_collection=COLLECTION, milvus_timeout_s=120.0, **server_threads(threads))
        with milvus_server, ServerProcess(args.models, work / "index", **server_threads(threads)) as embedded_server:
            print("  querying both backends", flush=True)
            records = run_queries(milvus_server, embedded_server, {q: ds.queries[q] for q in queries},
                                  args.check_every, journal_path(args, corpus), args.progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    runs = {b: {m: {q: r[b][m] for q, r in records.items()} for m in MODES} for b in BACKENDS}
    checked = [r for r in records.values() if r["checked"]]
    facts["queries_run"] = {
        "query_s": sum(r["seconds"] for r in records.values()),
        "stage1_differs_from_skip_rerank": sum(r["stage1_differs_from_skip_rerank"] for r in records.values()),
        "rerank_pairs_scored_by_rerank_rpc": sum(r["rerank_pairs_scored_by_rerank_rpc"] for r in records.values()),
        "checked_queries": len(checked), "checked_queries_differing": sum(r["checked_differs"] for r in checked)}
    qids = list(queries)
    quality = {b: {m: evaluate(runs[b][m], ds.qrels, qids, 10, DEPTH) for m in MODES} for b in BACKENDS}
    difference = {m: {"ndcg@10": abs(quality["embedded"][m]["ndcg@10"] - quality["milvus"][m]["ndcg@10"]),
                      f"recall@{DEPTH}": abs(quality["embedded"][m][f"recall@{DEPTH}"]
                                             - quality["milvus"][m][f"recall@{DEPTH}"])} for m in MODES}
    agreement = {"dense": {**compare(runs["embedded"]["dense"], runs["milvus"]["dense"], qids, DEPTH),
                           **compare(runs["embedded"]["dense"], runs["milvus"]["dense"], qids, 10)},
                 "dense + rerank": compare(runs["embedded"]["dense + rerank"], runs["milvus"]["dense + rerank"], qids, 10)}
    largest = max(d["ndcg@10"] for d in difference.values())
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "facts": facts,
              "quality": quality, "difference": difference, "largest_ndcg10_difference": largest,
              "within_0_005": largest <= 0.005, "agreement": agreement,
              "notes": ["One set of document vectors (the served int8 bi-encoder) built into both backends; "
                        "queries through the Search RPC of a real server per backend, with the same settings. The "
                        "embedded backend's reranked ranking is computed from cross-encoder scores of the same "
                        "pairs (see the module docstring); facts.queries_run.checked_queries_differing counts "
                        "checked queries where its own reranked Search disagreed.",
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
