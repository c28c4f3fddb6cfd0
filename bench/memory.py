"""Memory: index size and server RSS with 1,000,000 documents at f32, f16 and i8.

    python -m bench.memory                  # full run (reuses bench.search's cached 1M indexes, builds them if missing)
    python -m bench.memory --quick          # smoke run, seconds, figures meaningless

What is measured (bench/results/memory.json):

1. The raw usearch index of `--n` synthetic 384-d vectors per dtype, built with the server's HNSW settings
   (the same cached files bench.search builds): its file size, `Index.memory_usage`, and the resident-set growth
   of a fresh child process that loads it into RAM (as the server does) and then runs 1,000 searches; also the
   growth when it is memory-mapped read-only instead (`index_view`).
2. The real server (child process) with the exported models and an empty index: RSS once SERVING and after one
   Search and one 100-passage Rerank (models, arenas and gRPC included).
3. The real server over a DocumentIndex of `--server-docs` synthetic documents (usearch graph + SQLite store with
   each document's text and float32 vector): RSS and SQLite store size, hence bytes per document.

The server's RSS at 1M documents is reported as (2) + the loaded-index growth of (1): the sum of two measured
parts, not one measurement of a 1M-document server. The SQLite store lives on disk and in the page cache, not
in the RSS; its size at 1M is extrapolated from (3) per document.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (REPO_ROOT, ServerProcess, base_parser, dir_size_bytes, finish_common_args, format_table,
                          resolve_threads, save_result, server_threads)
from bench.search import synthetic_data, usearch_index
from twostage.server.index.layout import STORE_FILE

_LOAD_SNIPPET = """
import json, sys
import numpy as np
from usearch.index import Index

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

path, ndim, view = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
queries = np.random.default_rng(0).standard_normal((1000, ndim)).astype(np.float32)
before = rss()
index = Index.restore(path, view=view)
loaded = rss()
for q in queries:
    index.search(q, 100, threads=1)
searched = rss()
print(json.dumps({"rss_before": before, "rss_loaded": loaded, "rss_after_searches": searched,
                  "memory_usage": int(index.memory_usage), "size": len(index)}))
"""


def load_in_child(path: Path, ndim: int, view: bool) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _LOAD_SNIPPET, str(path), str(ndim), "1" if view else "0"],
                         capture_output=True, text=True, timeout=1800, cwd=REPO_ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"loading {path} failed: {out.stderr[-2000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    data["rss_growth_loaded"] = data["rss_loaded"] - data["rss_before"]
    data["rss_growth_after_searches"] = data["rss_after_searches"] - data["rss_before"]
    return data


def warm_requests(server: ServerProcess) -> None:
    """One Search and one 100-passage Rerank, so the RSS includes the arenas a working server holds."""
    from twostage.v1 import twostage_pb2 as pb

    stub = server.stub()
    stub.Search(pb.SearchRequest(query="how much memory does a server use", skip_rerank=True), timeout=120)
    passages = [f"passage number {i} about memory use, resident sets and index sizes in a search server " * 4
                for i in range(100)]
    stub.Rerank(pb.RerankRequest(query="how much memory does a server use", texts=passages), timeout=600)


def server_rss(models: Path, index_dir: Path, threads: int) -> dict[str, int]:
    with ServerProcess(models, index_dir, **server_threads(threads)) as server:
        ready = server.rss_bytes()
        warm_requests(server)
        return {"rss_serving": ready, "rss_after_requests": server.rss_bytes(), "peak_rss": server.peak_rss_bytes()}


def document_index_with(n: int, dimension: int, directory: Path, text_bytes: int, seed: int = 3) -> None:
    """Fill a DocumentIndex with n synthetic documents (unit vectors, ~text_bytes of text each), then close it."""
    from twostage.server.index.backend import StoredDoc
    from twostage.server.index.embedded import DocumentIndex
    from twostage.server.index.settings import IndexSettings

    rng = np.random.default_rng(seed)
    filler = ("lorem ipsum dolor sit amet consectetur " * (text_bytes // 38 + 1))[:text_bytes]
    index = DocumentIndex.open(directory, dimension, IndexSettings())
    try:
        for start in range(0, n, 5000):
            stop = min(n, start + 5000)
            vectors = rng.standard_normal((stop - start, dimension)).astype(np.float32)
            index.upsert([StoredDoc(id=f"m{i}", text=f"{i} {filler}") for i in range(start, stop)], vectors)
    finally:
        index.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="vectors in the raw index (default 1,000,000; quick 2,000)")
    p.add_argument("--dim", type=int, default=384, help="vector dimension of the raw index")
    p.add_argument("--clusters", type=int, default=None, help="as bench.search (default n/1000, at least 10)")
    p.add_argument("--queries", type=int, default=None, help="as bench.search, to share its cache (default 1,000; quick 20)")
    p.add_argument("--dtypes", default="f32,f16,i8", help="usearch scalar types")
    p.add_argument("--connectivity", type=int, default=16)
    p.add_argument("--expansion-add", type=int, default=128)
    p.add_argument("--server-docs", type=int, default=None,
                   help="documents in the DocumentIndex the server opens (default 50,000; quick 300)")
    p.add_argument("--text-bytes", type=int, default=350, help="text per synthetic document (MS MARCO passages ~350 B)")
    args = finish_common_args(p.parse_args(argv))
    q = args.quick
    args.n = args.n if args.n is not None else (2000 if q else 1_000_000)
    args.clusters = args.clusters if args.clusters is not None else max(10, args.n // 1000)
    args.queries = args.queries if args.queries is not None else (20 if q else 1000)
    args.dtypes = args.dtypes.split(",")
    args.server_docs = args.server_docs if args.server_docs is not None else (300 if q else 50_000)
    return args


def main(argv: list[str] | None = None) -> int:
    from twostage.model.manifest import read_manifest

    args = parse_args(argv)
    threads = resolve_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    base, _, _, _ = synthetic_data(args.cache, args.n, args.dim, args.clusters, args.queries)
    tag = f"n{args.n}-d{args.dim}-c{args.clusters}"
    result: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "notes": [line.strip() for line in __doc__.split("\n\n")[2:]], "raw_index": {}}
    rows = []
    for dtype in args.dtypes:
        _, facts = usearch_index(base, dtype, args.connectivity, args.expansion_add, threads, args.cache, tag)
        path = Path(facts["file"])
        loaded = load_in_child(path, args.dim, view=False)
        viewed = load_in_child(path, args.dim, view=True)
        result["raw_index"][dtype] = {"file_bytes": facts["file_bytes"], "build": facts, "loaded": loaded,
                                      "memory_mapped": viewed}
        rows.append([dtype, facts["file_bytes"] / 2**20, loaded["memory_usage"] / 2**20,
                     loaded["rss_growth_loaded"] / 2**20, loaded["rss_growth_after_searches"] / 2**20,
                     viewed["rss_growth_after_searches"] / 2**20])
    del base
    print(f"\n== raw usearch index, {args.n:,} x {args.dim} (connectivity {args.connectivity})")
    print(format_table(["dtype", "file MiB", "memory_usage MiB", "RSS +loaded MiB", "RSS +1k searches MiB",
                        "mmap view RSS MiB"], rows))

    dimension = int(read_manifest(args.models / "bi-encoder")["dimension"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        empty = server_rss(args.models, tmp / "empty", threads)
        document_index_with(args.server_docs, dimension, tmp / "docs", args.text_bytes)
        directory_bytes = dir_size_bytes(tmp / "docs")
        store_bytes = sum(p.stat().st_size for p in (tmp / "docs").glob(f"{STORE_FILE}*"))
        filled = server_rss(args.models, tmp / "docs", threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_doc_rss = (filled["rss_after_requests"] - empty["rss_after_requests"]) / max(1, args.server_docs)
    result["server"] = {
        "empty_index": empty,
        "with_documents": {"documents": args.server_docs, "dimension": dimension, "text_bytes": args.text_bytes,
                           "index_directory_bytes": directory_bytes, "sqlite_store_bytes": store_bytes, **filled,
                           "rss_per_document_bytes": per_doc_rss,
                           "sqlite_store_bytes_per_document": store_bytes / max(1, args.server_docs)}}
    estimate = {}
    for dtype, r in result["raw_index"].items():
        estimate[dtype] = {
            "server_rss_bytes": empty["rss_after_requests"] + r["loaded"]["rss_growth_after_searches"],
            "index_file_bytes": r["file_bytes"],
            "sqlite_store_bytes_extrapolated": store_bytes / max(1, args.server_docs) * args.n,
            "how": "server RSS with an empty index + RSS growth of loading this index and searching it (both "
                   "measured); SQLite store size (text + float32 vector per document, whatever the HNSW dtype) "
                   "extrapolated per document from the DocumentIndex measurement"}
    result["estimate_at_n"] = {"n": args.n, "dtypes": estimate}
    print(f"\n== server RSS: empty index {empty['rss_after_requests'] / 2**20:.0f} MiB (after a Search and a Rerank); "
          f"{args.server_docs:,} documents {filled['rss_after_requests'] / 2**20:.0f} MiB; SQLite store "
          f"{store_bytes / 2**20:.1f} MiB ({store_bytes / max(1, args.server_docs):.0f} B/document)")
    print(format_table(["dtype", f"server RSS at {args.n:,} MiB (sum)", "index file MiB",
                        "SQLite store MiB (extrap.)"],
                       [[d, e["server_rss_bytes"] / 2**20, e["index_file_bytes"] / 2**20,
                         e["sqlite_store_bytes_extrapolated"] / 2**20] for d, e in estimate.items()]))
    path = save_result("memory", result, args.out)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
