"""`twostage demo`: from nothing to a side-by-side view of bi-encoder-only and reranked results.

Steps: export the packaged models into --models unless they are there already, start the server in
this process on a free loopback port (`twostage.server.app.serve_in_background`), upsert the sample
corpus into a fresh index, run each sample query twice (skip_rerank, then reranked, over the same
candidate pool) and report at which rank each finds the known right answer. The server is stopped on
the way out.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TextIO

from twostage.client.client import AsyncClient
from twostage.client.output import format_score, shorten, terminal_width
from twostage.client.types import SearchHit

UPSERT_BATCH = 64
MARK = "*"  # marks the known right answer in the tables


# ------------------------------------------------------------------------------------ sample data


@dataclass(frozen=True)
class SampleQuery:
    id: str
    text: str
    relevant: tuple[str, ...]


def packaged_data(name: str) -> Path:
    """Path of a file shipped in twostage/client/data."""
    return Path(str(resources.files("twostage.client").joinpath("data", name)))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    return rows


def load_corpus(path: Path) -> list[dict[str, Any]]:
    """BEIR-style corpus lines {"_id", "title", "text", "metadata"} as upsertable dicts."""
    docs = []
    for number, row in enumerate(read_jsonl(path), 1):
        if "_id" not in row or "text" not in row:
            raise ValueError(f"{path}: document {number} needs '_id' and 'text'")
        docs.append({"id": str(row["_id"]), "title": row.get("title", ""), "text": row["text"],
                     "metadata": row.get("metadata") or {}})
    return docs


def load_queries(path: Path) -> list[SampleQuery]:
    """Query lines {"_id", "text", "relevant": [doc ids]}."""
    queries = []
    for number, row in enumerate(read_jsonl(path), 1):
        if not row.get("_id") or not row.get("text") or not row.get("relevant"):
            raise ValueError(f"{path}: query {number} needs '_id', 'text' and a non-empty 'relevant' list")
        queries.append(SampleQuery(id=str(row["_id"]), text=row["text"], relevant=tuple(map(str, row["relevant"]))))
    return queries


# ------------------------------------------------------------------------------------ comparison


@dataclass(frozen=True)
class QueryComparison:
    query: SampleQuery
    bi_encoder: tuple[SearchHit, ...]   # stage 1 only, by similarity
    reranked: tuple[SearchHit, ...]     # the same candidates, reranked by the cross-encoder
    bi_encoder_rank: int | None         # 1-based rank of the first right answer, None when absent
    reranked_rank: int | None


def answer_rank(hits: Sequence[SearchHit], relevant: Sequence[str]) -> int | None:
    """1-based rank of the first hit whose id is a right answer, or None."""
    for rank, hit in enumerate(hits, 1):
        if hit.id in relevant:
            return rank
    return None


async def compare_query(client: AsyncClient, query: SampleQuery, *, top_k: int, candidates: int) -> QueryComparison:
    """Search twice over the same candidate pool: stage 1 only, then with reranking."""
    plain = await client.search(query.text, top_k=top_k, candidates=candidates, skip_rerank=True)
    reranked = await client.search(query.text, top_k=top_k, candidates=candidates)
    return QueryComparison(query=query, bi_encoder=plain.hits, reranked=reranked.hits,
                           bi_encoder_rank=answer_rank(plain.hits, query.relevant),
                           reranked_rank=answer_rank(reranked.hits, query.relevant))


@dataclass(frozen=True)
class Summary:
    queries: int
    bi_encoder_at_1: int
    reranked_at_1: int
    bi_encoder_mrr: float
    reranked_mrr: float
    improved: int   # queries where reranking moved the answer up (or into the top_k)
    worsened: int


def summarize(comparisons: Sequence[QueryComparison]) -> Summary:
    def mrr(ranks: list[int | None]) -> float:
        return sum(1.0 / r for r in ranks if r) / len(ranks) if ranks else 0.0

    bi = [c.bi_encoder_rank for c in comparisons]
    rr = [c.reranked_rank for c in comparisons]
    changes = [rank_change(c) for c in comparisons]
    return Summary(queries=len(comparisons), bi_encoder_at_1=sum(1 for r in bi if r == 1),
                   reranked_at_1=sum(1 for r in rr if r == 1), bi_encoder_mrr=mrr(bi), reranked_mrr=mrr(rr),
                   improved=changes.count(1), worsened=changes.count(-1))


def rank_change(c: QueryComparison) -> int:
    """1 when reranking moved the right answer up (or into the list), -1 when down (or out), else 0."""
    absent = float("inf")
    before, after = c.bi_encoder_rank or absent, c.reranked_rank or absent
    return (after < before) - (after > before)


def _rank_word(rank: int | None) -> str:
    return f"rank {rank}" if rank else "not found"


def format_comparison(c: QueryComparison, *, width: int | None = None) -> str:
    """The two result lists side by side: rank, id (right answer marked *), score, short text."""
    width = width or terminal_width()
    half = (width - 7) // 2  # "NN  " prefix and " | " divider
    id_width = max([len(h.id) for h in c.bi_encoder + c.reranked] + [2]) + 2
    text_width = max(half - id_width - 8, 10)

    def cell(hit: SearchHit | None) -> str:
        if hit is None:
            return " " * half
        mark = MARK if hit.id in c.query.relevant else " "
        doc = hit.document
        text = "" if doc is None else (f"{doc.title}. {doc.text}" if doc.title else doc.text)
        return f"{mark}{hit.id:<{id_width - 1}}{format_score(hit.score):>7} {shorten(text, text_width)}".ljust(half)

    change = {1: " (reranking moved it up)", -1: " (reranking moved it down)", 0: ""}[rank_change(c)]
    lines = [f"[{c.query.id}] {c.query.text}",
             f"     answer {', '.join(c.query.relevant)}: bi-encoder only {_rank_word(c.bi_encoder_rank)}, "
             f"reranked {_rank_word(c.reranked_rank)}{change}",
             f"  #  {'bi-encoder only (similarity)'.ljust(half)} | reranked (cross-encoder score)"]
    for i in range(max(len(c.bi_encoder), len(c.reranked))):
        left = c.bi_encoder[i] if i < len(c.bi_encoder) else None
        right = c.reranked[i] if i < len(c.reranked) else None
        lines.append(f"{i + 1:>3}  {cell(left)} | {cell(right)}".rstrip())
    return "\n".join(lines)


def format_summary(summary: Summary, *, top_k: int, candidates: int) -> str:
    n = summary.queries
    return "\n".join([
        f"{n} queries, top {top_k} of {candidates} candidates ({MARK} = the known right answer)",
        f"  bi-encoder only: right answer first for {summary.bi_encoder_at_1}/{n}, "
        f"MRR@{top_k} {summary.bi_encoder_mrr:.3f}",
        f"  reranked:        right answer first for {summary.reranked_at_1}/{n}, "
        f"MRR@{top_k} {summary.reranked_mrr:.3f}",
        f"  reranking moved the right answer up for {summary.improved} queries and down for {summary.worsened}",
    ])


def comparison_as_json(c: QueryComparison) -> dict[str, Any]:
    def hits(hs: Sequence[SearchHit]) -> list[dict[str, Any]]:
        return [{"id": h.id, "score": h.score, "retrieval_rank": h.retrieval_rank, "relevant": h.id in c.query.relevant}
                for h in hs]

    return {"query_id": c.query.id, "query": c.query.text, "relevant": list(c.query.relevant),
            "bi_encoder_rank": c.bi_encoder_rank, "reranked_rank": c.reranked_rank,
            "bi_encoder": hits(c.bi_encoder), "reranked": hits(c.reranked)}


# ---------------------------------------------------------------------------------- setup steps


def log(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def models_present(models: Path) -> bool:
    return all((models / role / "manifest.json").is_file() for role in ("bi-encoder", "cross-encoder"))


def ensure_models(models: Path) -> None:
    """Export the packaged default models into `models` unless both model directories are there."""
    if models_present(models):
        log(f"using the models in {models}")
        return
    try:
        from twostage.export.cli import add_arguments, run
    except ImportError as exc:
        raise RuntimeError(f"no models in {models} and the export step is not installed ({exc}); "
                           f"install with pip install '.[export,models]' or pass --models DIR") from exc
    log(f"exporting the packaged models to {models} (once; takes a few minutes)")
    parser = argparse.ArgumentParser(prog="twostage export")
    add_arguments(parser)
    code = run(parser.parse_args(["--out", str(models)]))
    if code or not models_present(models):
        raise RuntimeError(f"export into {models} failed (exit code {code})")


async def index_corpus(client: AsyncClient, docs: Sequence[dict[str, Any]], *, batch: int = UPSERT_BATCH) -> int:
    """Upsert the documents in batches; returns the index size afterwards."""
    size = 0
    for start in range(0, len(docs), batch):
        result = await client.upsert(docs[start:start + batch], timeout=300)
        size = result.index_size
        log(f"indexed {min(start + batch, len(docs))}/{len(docs)} documents")
    return size


class DemoServer(Protocol):
    target: str

    async def stop(self) -> None: ...


StartServer = Callable[[Path, Path], Awaitable[DemoServer]]


@dataclass
class _InProcessServer:
    running: Any  # twostage.server.app.RunningServer
    target: str

    async def stop(self) -> None:
        await self.running.stop()


async def start_server(models: Path, index: Path) -> DemoServer:
    """The real server in this process on a free loopback port, SERVING when this returns. Auth and TLS
    settings from the environment are overridden (off): the demo's own client talks to it."""
    try:
        from twostage.server.app import serve_in_background
        from twostage.server.config import Config
    except ImportError as exc:
        raise RuntimeError(f"the server is not installed ({exc})") from exc
    flags = argparse.Namespace(models=str(models), index=str(index), host="127.0.0.1", port=0, metrics_port=-1,
                               log_level="warning", read_api_keys=[], write_api_keys=[], tls_cert="", tls_key="",
                               tls_client_ca="")
    running = await serve_in_background(Config.from_sources(flags))
    return _InProcessServer(running, f"127.0.0.1:{running.port}")


@contextlib.contextmanager
def index_directory(path: Path | None) -> Any:
    """The given index directory, or a temporary one removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="twostage-demo-") as tmp:
        yield Path(tmp) / "index"


# ------------------------------------------------------------------------------------- the demo


@dataclass(frozen=True)
class DemoReport:
    comparisons: tuple[QueryComparison, ...]
    summary: Summary
    top_k: int
    candidates: int
    target: str


async def run_demo(*, models: Path, corpus: Path, queries: Path, index: Path | None = None, top_k: int = 5,
                   candidates: int = 50, server_factory: StartServer | None = None,
                   prepare_models: Callable[[Path], None] = ensure_models) -> DemoReport:
    """The whole demo; returns what it found (printing is the caller's job)."""
    docs = load_corpus(corpus)
    sample = load_queries(queries)
    prepare_models(models)
    factory = server_factory or start_server
    with index_directory(index) as index_dir:
        log("starting the server")
        server = await factory(models, index_dir)
        try:
            log(f"server SERVING on {server.target}")
            async with AsyncClient(server.target, timeout=120) as client:
                await index_corpus(client, docs)
                comparisons = [await compare_query(client, q, top_k=top_k, candidates=candidates) for q in sample]
        finally:
            log("stopping the server")
            await server.stop()
    return DemoReport(comparisons=tuple(comparisons), summary=summarize(comparisons), top_k=top_k,
                      candidates=candidates, target=server.target)


def print_report(report: DemoReport, out: TextIO, *, as_json: bool = False, width: int | None = None) -> None:
    if as_json:
        json.dump({"top_k": report.top_k, "candidates": report.candidates,
                   "summary": vars(report.summary),
                   "queries": [comparison_as_json(c) for c in report.comparisons]}, out, indent=2)
        out.write("\n")
        return
    for c in report.comparisons:
        out.write(format_comparison(c, width=width) + "\n\n")
    out.write(format_summary(report.summary, top_k=report.top_k, candidates=report.candidates) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=Path, default=Path("./models"),
                        help="model set directory; the packaged models are exported there first when it has none "
                             "(default: ./models)")
    parser.add_argument("--index", type=Path, default=None,
                        help="index directory to build and keep (default: a temporary directory, removed afterwards)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="BEIR-style JSONL corpus with _id, title, text, metadata "
                             "(default: the packaged sample corpus, 200 passages)")
    parser.add_argument("--queries", type=Path, default=None,
                        help='JSONL queries {"_id", "text", "relevant": [ids]} '
                             '(default: the packaged 12 sample queries)')
    parser.add_argument("--top-k", type=int, default=5, help="hits shown per query and list (default: 5)")
    parser.add_argument("--candidates", type=int, default=50,
                        help="stage-1 candidates, the same pool for both lists (default: 50)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (default: side-by-side tables)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    report = asyncio.run(run_demo(models=args.models, index=args.index, top_k=args.top_k, candidates=args.candidates,
                                  corpus=args.corpus or packaged_data("sample_corpus.jsonl"),
                                  queries=args.queries or packaged_data("sample_queries.jsonl")))
    print_report(report, out, as_json=args.json)
    return 0

