"""Which bi-encoder by default: query-embedding latency and document-embedding throughput of exported bi-encoders,
set against their public retrieval quality.

    python -m bench.bi_encoders --model minilm=DIR_A/bi-encoder --model bge=DIR_B/bi-encoder
    python -m bench.bi_encoders --quick --model ...          # smoke run, seconds, figures meaningless

Each model directory is what `twostage export` wrote (e.g. `twostage export --out DIR_B --only bi-encoder
--bi-encoder packaged:bge-small-en-v1.5`). Every model runs in this process through the server's own
`Embedder` (its tokenizer, padding, ONNX Runtime session on the served int8 graph, pooling and
normalization), with one intra-op thread.

- Query latency: SciFact test queries, one query per call (tokenize + inference + pooling), the contenders taking
  turns query by query with the order rotating, one untimed warm-up call each. A model whose manifest records a
  `query_prefix` is measured twice, with and without the prefix (the prefix adds tokens to every query).
- Document throughput: SciFact documents (title + text, as indexed), in chunks of 64 taken in turn by every
  contender; within a chunk, texts sorted by length and cut into batches of at most 512 padded tokens and 64
  texts (the server's bi-encoder batch bounds), a longer text alone. Each model at its manifest's max_length, and
  the models whose max_length exceeds 256 also at 256 tokens, the truncation of issue 12's quality figures.

Quality is not measured here: the nDCG@10 figures are issue 12's (SciFact test, 300 queries; trec-dl-2019-subset,
43 queries; int8 ONNX models; documents truncated at 256 tokens), keyed by the manifest's model name.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.common import (base_parser, document_text, finish_common_args, format_table, load_dataset, save_result,
                          summarize)

if TYPE_CHECKING:
    from twostage.model.embedder import Embedder
    from twostage.model.tokenization import Encoded

# Public figures (issue 12, measured outside the project with ONNX Runtime on the same int8 models): nDCG@10 of the
# bi-encoder alone (dense) and of the convex BM25 + dense hybrid (SciFact only).
PUBLIC_NDCG = {
    "sentence-transformers/all-MiniLM-L6-v2": {"scifact_dense": 0.647, "trec_dl_dense": 0.790,
                                               "scifact_hybrid": 0.732},
    "BAAI/bge-small-en-v1.5": {"scifact_dense": 0.704, "trec_dl_dense": 0.815, "scifact_hybrid": 0.735},
}
BATCH_TOKENS, BATCH_TEXTS, CHUNK = 512, 64, 64
ISSUE_TRUNCATION = 256


class Contender:
    """One exported bi-encoder, optionally with its query prefix and a document truncation."""

    def __init__(self, label: str, model: Embedder, prefix: str = ""):
        self.label, self.model, self.prefix = label, model, prefix

    def embed_query(self, query: str) -> np.ndarray:
        return self.model.run_batch(self.model.encode([self.prefix + query]))

    def document_batches(self, texts: Sequence[str], max_length: int) -> list[list[Encoded]]:
        """Texts cut at max_length tokens (specials included), sorted by length, in batches within the bounds."""
        tokenizer = self.model.tokenizer
        budget = max_length - tokenizer.single_specials
        encoded = sorted((tokenizer.assemble(ids[:budget]) for ids in tokenizer.tokens(list(texts))), key=len)
        batches: list[list[Encoded]] = []
        for enc in encoded:
            last = batches[-1] if batches else None
            if last is not None and len(last) < BATCH_TEXTS and (len(last) + 1) * len(enc) <= BATCH_TOKENS:
                last.append(enc)
            else:
                batches.append([enc])
        return batches


def load_contenders(specs: list[str], threads: int) -> list[Contender]:
    """One contender per `LABEL=DIR`, each model on `threads` intra-op threads."""
    from twostage.model.embedder import Embedder
    from twostage.model.session import SessionSettings

    loaded = []
    for spec in specs:
        label, _, directory = spec.partition("=")
        if not directory:
            raise SystemExit(f"--model {spec!r}: expected LABEL=DIR")
        loaded.append(Contender(label, Embedder.open(Path(directory), SessionSettings(intra_op_threads=threads))))
    return loaded


def query_latency(contenders: list[Contender], queries: list[str]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {c.label: [] for c in contenders}
    for c in contenders:
        c.embed_query("warm up query")
    for i, query in enumerate(queries):
        for c in contenders[i % len(contenders):] + contenders[:i % len(contenders)]:
            start = time.perf_counter()
            c.embed_query(query)
            times[c.label].append((time.perf_counter() - start) * 1000)
    return times


def document_throughput(runs: list[tuple[Contender, int]], texts: list[str]) -> dict[str, dict[str, float]]:
    seconds = {f"{c.label}@{n}": 0.0 for c, n in runs}
    tokens = dict.fromkeys(seconds, 0)
    for c, n in runs:
        for batch in c.document_batches(texts[:2], n):
            c.model.run_batch(batch)
    for number, start in enumerate(range(0, len(texts), CHUNK)):
        chunk = texts[start:start + CHUNK]
        shift = number % len(runs)
        for c, n in runs[shift:] + runs[:shift]:
            key = f"{c.label}@{n}"
            began = time.perf_counter()
            for batch in c.document_batches(chunk, n):
                c.model.run_batch(batch)
                tokens[key] += sum(len(e) for e in batch)
            seconds[key] += time.perf_counter() - began
    return {key: {"documents": len(texts), "seconds": seconds[key], "docs_per_s": len(texts) / seconds[key],
                  "real_tokens": tokens[key]} for key in seconds}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="LABEL=DIR",
                   help="an exported bi-encoder directory (repeat; two or more)")
    p.add_argument("--queries", type=int, default=None, help="timed queries per contender (default 200; quick 5)")
    p.add_argument("--documents", type=int, default=None, help="documents embedded per contender (default 512; "
                                                                "quick 16)")
    args = finish_common_args(p.parse_args(argv))
    args.queries = args.queries if args.queries is not None else (5 if args.quick else 200)
    args.documents = args.documents if args.documents is not None else (16 if args.quick else 512)
    args.threads = args.threads or 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ds = load_dataset(args.data, "scifact")
    pool = list(ds.queries.values())
    queries = [pool[i % len(pool)] for i in range(args.queries)]
    texts = [document_text(title, text) for title, text in list(ds.corpus.values())[:args.documents]]
    loaded = load_contenders(args.model, args.threads)
    contenders = []
    for contender in loaded:
        contenders.append(contender)
        if contender.model.manifest.get("query_prefix"):
            contenders.append(Contender(f"{contender.label}+prefix", contender.model,
                                        contender.model.manifest.get("query_prefix")))
    latencies = query_latency(contenders, queries)
    runs = []
    for contender in loaded:
        runs.append((contender, contender.model.max_length))
        if contender.model.max_length > ISSUE_TRUNCATION:
            runs.append((contender, ISSUE_TRUNCATION))
    throughput = document_throughput(runs, texts)

    models = {c.label: {"name": c.model.name, "path": str(c.model.spec.model_path.parent), "max_length": c.model.max_length,
                        "pooling": c.model.pooling, "normalize": c.model.normalize,
                        "query_prefix": c.model.manifest.get("query_prefix") or "", "model_sha256": c.model.sha256,
                        "public_ndcg_at_10": PUBLIC_NDCG.get(c.model.name)}
              for c in loaded}
    names = {c.label: c.model.name for c in loaded}
    rows = []
    for c in contenders:
        base = c.label.split("+")[0]
        stats = summarize(latencies[c.label])
        public = PUBLIC_NDCG.get(names[base]) or {}
        per_ms = {k: (v / stats["p50"]) for k, v in public.items()}
        rows.append([c.label, names[base], stats["p50"], stats["p95"], public.get("scifact_dense"),
                     per_ms.get("scifact_dense"), per_ms.get("trec_dl_dense"), per_ms.get("scifact_hybrid")])
    print(f"query embedding, one query per call, {args.threads} thread(s), {args.queries} queries each")
    print(format_table(["contender", "model", "p50 ms", "p95 ms", "SciFact nDCG", "SciFact nDCG/ms",
                        "TREC nDCG/ms", "hybrid nDCG/ms"], rows))
    print(f"\ndocument embedding, {len(texts)} SciFact documents, batches <= {BATCH_TOKENS} tokens / "
          f"{BATCH_TEXTS} texts")
    print(format_table(["contender@max_length", "docs/s", "s", "tokens"],
                       [[k, v["docs_per_s"], v["seconds"], v["real_tokens"]] for k, v in throughput.items()]))
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": models,
        "query_latency_ms": {label: {**summarize(v), "raw": v} for label, v in latencies.items()},
        "document_throughput": throughput,
        "notes": ["nDCG figures are issue 12's public measurements, not measured by this script.",
                  "Latency: Embedder.encode + run_batch of one query (tokenization, inference, pooling)."],
    }
    path = save_result("bi_encoders", result, args.out)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
