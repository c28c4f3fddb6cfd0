"""Retrieval quality through the server's own code path: nDCG@10 and recall@100.

    python -m bench.quality                          # SciFact test (300 queries) + trec-dl-2019-subset (43)
    python -m bench.quality --datasets trec-dl-2019-subset
    python -m bench.quality --quick                  # smoke run, seconds, figures meaningless

Per dataset, the corpus is indexed twice with `twostage index build`'s code path (bench/prepare.py): once with the
served int8 bi-encoder and once with the exported fp32 bi-encoder (`model_fp32.onnx`, through a model-set variant
whose manifest points at it). Two real servers serve them. For every judged query:

- server A (int8 bi-encoder): Search(top_k=100, candidates=100) gives the two-stage ranking and, through each
  hit's retrieval_rank, the bi-encoder-only ranking;
- server B (fp32 bi-encoder): Search(skip_rerank, 100) gives the fp32 bi-encoder-only ranking;
- BM25 (bm25s, k1=0.9, b=0.4, English stop words, Snowball stemmer when PyStemmer is installed) gives 100 ids;
- the cross-encoder scores for the fp32 and BM25 candidates that A's Search did not already score come from A's
  Rerank RPC with document_ids (same pair text and tokenization as Search); those lists are then ordered as the
  engine orders reranked hits (score, then stage-1 rank).

The cross-encoder exists only as int8 offline (the packaged ms-marco-MiniLM-L-12-v2 is an int8 ONNX file; the
export re-quantizes it with static scales), so every two-stage figure uses the served int8 cross-encoder; the
fp32/int8 comparison is the bi-encoder's. The served graph is batch-invariant (static activation scales), so a
pair scored inside Search and again by Rerank must get the same score; the JSON records the largest difference
seen (Search scores vs. Rerank scores of the same pairs) as a check.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from bench.common import (Dataset, ServerProcess, base_parser, document_text, finish_common_args, format_table,
                          load_dataset, resolve_threads, save_result, server_threads)
from bench.prepare import corpus_index, fp32_cross_encoder_set, fp32_model_set
from twostage.client.ir_metrics import evaluate_run

DEPTH = 100
TWO_STAGE_INT8 = "two-stage (int8 bi-encoder + int8 cross-encoder)"
TWO_STAGE_CE_FP32 = "two-stage (int8 bi-encoder + fp32-rebuild cross-encoder)"
REFERENCE = {"scifact": {"all-MiniLM-L6-v2 ndcg@10 (MTEB)": 0.645, "all-MiniLM-L6-v2 ndcg@10 (reproduced on this copy)": 0.6451,
                         "all-MiniLM-L6-v2 recall@100 (this copy)": 0.925, "BM25 k1=0.9 b=0.4 ndcg@10 (this copy)": 0.676}}


# ------------------------------------------------------------------------------------------- BM25
class Bm25:
    """bm25s over `document_text(title, text)` of every corpus document."""

    def __init__(self, dataset: Dataset):
        import bm25s

        try:
            import Stemmer  # PyStemmer

            self.stemmer = Stemmer.Stemmer("english")
            self.stemming = "snowball-english"
        except ImportError:
            self.stemmer = None
            self.stemming = "none (PyStemmer not installed)"
        self.bm25s = bm25s
        self.ids = list(dataset.corpus)
        tokens = bm25s.tokenize([document_text(*dataset.corpus[d]) for d in self.ids], stopwords="en",
                                stemmer=self.stemmer, show_progress=False)
        self.retriever = bm25s.BM25(k1=0.9, b=0.4)
        self.retriever.index(tokens, show_progress=False)

    def search(self, query: str, k: int) -> list[str]:
        tokens = self.bm25s.tokenize([query], stopwords="en", stemmer=self.stemmer, show_progress=False)
        if not tokens.vocab:  # only stop words
            return []
        docs, scores = self.retriever.retrieve(tokens, k=min(k, len(self.ids)), show_progress=False)
        return [self.ids[int(i)] for i, s in zip(docs[0], scores[0]) if s > 0]


# ------------------------------------------------------------------------------------------- runs
def rerank_order(ids: list[str], scores: dict[str, float]) -> list[str]:
    """The engine's order for reranked hits: cross-encoder score, then stage-1 position."""
    return [d for _, _, d in sorted((-scores[d], i, d) for i, d in enumerate(ids))]


def score_missing(stub: Any, query: str, ids: list[str], scores: dict[str, float]) -> int:
    """Fill `scores` for `ids` not yet scored, with one Rerank(document_ids) call; returns how many were scored."""
    from twostage.v1 import twostage_pb2 as pb

    missing = [d for d in dict.fromkeys(ids) if d not in scores]
    if missing:
        resp = stub.Rerank(pb.RerankRequest(query=query, document_ids=missing), timeout=900)
        for r in resp.results:
            scores[missing[r.index]] = r.score
    return len(missing)


def consistency(stub: Any, query: str, hits: list[Any]) -> float:
    """Largest |Search rerank_score - Rerank score| over the same (query, document) pairs."""
    from twostage.v1 import twostage_pb2 as pb

    ids = [h.id for h in hits]
    resp = stub.Rerank(pb.RerankRequest(query=query, document_ids=ids), timeout=900)
    again = {ids[r.index]: r.score for r in resp.results}
    return max((abs(h.rerank_score - again[h.id]) for h in hits), default=0.0)


def run_dataset(args: argparse.Namespace, name: str, threads: int) -> dict[str, Any]:
    from twostage.v1 import twostage_pb2 as pb

    ds = load_dataset(args.data, name)
    corpus = args.data / name / "corpus.jsonl"
    queries = ds.judged_queries[:args.max_queries] if args.max_queries else ds.judged_queries
    facts: dict[str, Any] = {"documents": len(ds.corpus), "queries": len(queries), "depth": DEPTH}
    t0 = time.perf_counter()
    idx8, facts["index_int8"] = corpus_index(args.models, corpus, args.cache, threads)
    variants = {"int8": (args.models, idx8)}
    try:
        fp32_models = fp32_model_set(args.models, args.cache)
        idx32, facts["index_fp32"] = corpus_index(fp32_models, corpus, args.cache, threads)
        variants["fp32"] = (fp32_models, idx32)
    except SystemExit as exc:
        facts["fp32_bi_encoder"] = f"skipped: {exc}"
    facts["index_s"] = time.perf_counter() - t0
    ce_fp32_models = None
    if args.ce_fp32_queries:
        try:
            ce_fp32_models = fp32_cross_encoder_set(args.models, args.cache)
        except SystemExit as exc:
            facts["fp32_cross_encoder"] = f"skipped: {exc}"
    bm25 = None
    if args.no_bm25:
        facts["bm25_stemming"] = "skipped (--no-bm25)"
    else:
        try:
            bm25 = Bm25(ds)
            facts["bm25_stemming"] = bm25.stemming
        except ImportError:
            facts["bm25_stemming"] = "skipped: bm25s not installed (pip install bm25s)"
    runs: dict[str, dict[str, list[str]]] = {}

    def put(method: str, qid: str, ranking: list[str]) -> None:
        runs.setdefault(method, {})[qid] = ranking

    work = Path(tempfile.mkdtemp(prefix=f"bench-quality-{name}-"))
    servers: dict[str, ServerProcess] = {}
    try:
        for label, (models, index_dir) in variants.items():
            shutil.copytree(index_dir, work / label)
            servers[label] = ServerProcess(models, work / label, **server_threads(threads)).start()
        if ce_fp32_models is not None:
            shutil.copytree(idx8, work / "ce-fp32")
            servers["ce-fp32"] = ServerProcess(ce_fp32_models, work / "ce-fp32", **server_threads(threads)).start()
        a = servers["int8"].stub()
        b = servers["fp32"].stub() if "fp32" in servers else None
        c = servers["ce-fp32"].stub() if "ce-fp32" in servers else None
        diffs, extra_pairs = [], 0
        t0 = time.perf_counter()
        for n, qid in enumerate(queries):
            query = ds.queries[qid]
            resp = a.Search(pb.SearchRequest(query=query, top_k=DEPTH, candidates=DEPTH, ids_only=True), timeout=900)
            stage1 = [h.id for h in sorted(resp.hits, key=lambda h: h.retrieval_rank)]
            put("bi-encoder int8", qid, stage1)
            put(TWO_STAGE_INT8, qid, [h.id for h in resp.hits])
            scores = {h.id: h.rerank_score for h in resp.hits if h.reranked}
            if c is not None and n < args.ce_fp32_queries:
                scores32: dict[str, float] = {}
                score_missing(c, query, stage1, scores32)
                put(TWO_STAGE_CE_FP32, qid, rerank_order(stage1, scores32))
            if n < args.consistency_queries:
                diffs.append(consistency(a, query, list(resp.hits)))
            if b is not None:
                resp32 = b.Search(pb.SearchRequest(query=query, top_k=DEPTH, candidates=DEPTH, skip_rerank=True,
                                                   ids_only=True), timeout=900)
                fp32_ids = [h.id for h in resp32.hits]
                put("bi-encoder fp32", qid, fp32_ids)
                extra_pairs += score_missing(a, query, fp32_ids, scores)
                put("two-stage (fp32 bi-encoder + int8 cross-encoder)", qid, rerank_order(fp32_ids, scores))
            if bm25 is not None:
                bm_ids = bm25.search(query, DEPTH)
                put("BM25", qid, bm_ids)
                extra_pairs += score_missing(a, query, bm_ids, scores) if bm_ids else 0
                put("cross-encoder over BM25 top 100", qid, rerank_order(bm_ids, scores))
            if args.progress and (n + 1) % 25 == 0:
                print(f"  {name}: {n + 1}/{len(queries)} queries, {time.perf_counter() - t0:.0f} s", flush=True)
        facts["query_s"] = time.perf_counter() - t0
        facts["extra_rerank_pairs"] = extra_pairs
        facts["search_vs_rerank_max_abs_score_diff"] = max(diffs) if diffs else None
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    methods = {m: evaluate_run(run, ds.qrels, queries, 10, DEPTH) for m, run in runs.items()
               if m != TWO_STAGE_CE_FP32}
    if TWO_STAGE_CE_FP32 in runs:  # on its first queries only, beside the int8 cross-encoder on the same queries
        subset = [q for q in queries if q in runs[TWO_STAGE_CE_FP32]]
        facts["fp32_cross_encoder_queries"] = len(subset)
        methods[f"{TWO_STAGE_INT8}, first {len(subset)} queries"] = evaluate_run(runs[TWO_STAGE_INT8], ds.qrels,
                                                                                subset, 10, DEPTH)
        methods[f"{TWO_STAGE_CE_FP32}, first {len(subset)} queries"] = evaluate_run(runs[TWO_STAGE_CE_FP32],
                                                                                   ds.qrels, subset, 10, DEPTH)
    return {"dataset": name, "facts": facts, "methods": methods, "reference": REFERENCE.get(name, {})}


def print_dataset(res: dict[str, Any]) -> None:
    f = res["facts"]
    print(f"\n== {res['dataset']}: {f['queries']} judged queries, {f['documents']:,} documents "
          f"(BM25 stemming: {f['bm25_stemming']})")
    rows = [[m, r["ndcg@10"], r[f"recall@{DEPTH}"]] for m, r in res["methods"].items()]
    print(format_table(["method", "nDCG@10", f"recall@{DEPTH}"], rows))
    for label, value in res["reference"].items():
        print(f"  reference: {label} = {value}")
    if f.get("search_vs_rerank_max_abs_score_diff") is not None:
        print(f"  Search vs Rerank scores of the same pairs: max |diff| {f['search_vs_rerank_max_abs_score_diff']:.4f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="scifact,trec-dl-2019-subset", help="comma-separated dataset names")
    p.add_argument("--max-queries", type=int, default=None, help="judged queries per dataset (default all; quick 3)")
    p.add_argument("--consistency-queries", type=int, default=3,
                   help="queries whose Search scores are compared with Rerank scores of the same pairs")
    p.add_argument("--no-bm25", action="store_true", help="skip BM25 and the cross-encoder over BM25 candidates")
    p.add_argument("--ce-fp32-queries", type=int, default=None,
                   help="also rerank the first N queries' int8 bi-encoder candidates with the fp32 rebuild of the "
                        "cross-encoder's int8 source (bench/prepare.py), to price the served re-quantization "
                        "(default 50; quick 2; 0 = skip)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="print progress")
    args = finish_common_args(p.parse_args(argv))
    args.max_queries = args.max_queries if args.max_queries is not None else (3 if args.quick else 0)
    args.ce_fp32_queries = args.ce_fp32_queries if args.ce_fp32_queries is not None else (2 if args.quick else 50)
    args.datasets = args.datasets.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = resolve_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "threads": threads,
        "notes": [
            "All rankings come from real twostage servers (Search and Rerank RPCs) over indexes built with the "
            "`twostage index build` code path; BM25 is bm25s.",
            "The cross-encoder ships as int8 ONNX only (cross-encoder/ms-marco-MiniLM-L-12-v2, no fp32 checkpoint "
            "offline): fp32/int8 refers to the bi-encoder, except for the 'fp32-rebuild cross-encoder' rows: the "
            "source's weights dequantized and run in fp32, on the first --ce-fp32-queries queries.",
            "Graded relevance (TREC DL grades 1-3) with linear gains for nDCG; recall counts grade > 0.",
            "trec-dl-2019-subset is a 5,000-passage sample: its figures are relative, not comparable with "
            "full-collection results.",
        ], "datasets": []}
    for name in args.datasets:
        res = run_dataset(args, name, threads)
        result["datasets"].append(res)
        print_dataset(res)
    path = save_result("quality", result, args.out)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
