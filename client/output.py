"""How the CLI prints results: aligned text tables by default, JSON with --json.

Ranks and positions count from 0 everywhere, as in the proto and the JSON: the table's `rank` is the
hit's position in the answer (its index in `hits` / `results`), `retrieval_rank` its position in the
stage-1 candidate list, `index` the document's position in the request.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from typing import TextIO

from twostage.client.types import Info, JsonValue, RerankResults, SearchResult, Timing, to_jsonable

ELLIPSIS = "…"


def terminal_width(default: int = 120) -> int:
    return max(60, shutil.get_terminal_size((default, 24)).columns)


def shorten(text: str, width: int) -> str:
    """One line of at most `width` characters (newlines folded, an ellipsis where cut)."""
    text = " ".join(text.split())
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: max(width - 1, 0)].rstrip() + ELLIPSIS


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[str] = (),
                 max_width: int | None = None, shrink: str | None = None) -> str:
    """An aligned text table. Columns named in `right` are right-aligned; when the table is wider
    than `max_width`, the column named `shrink` is cut down (with an ellipsis) to fit."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if max_width is not None and shrink is not None and shrink in headers:
        col = list(headers).index(shrink)
        overflow = sum(widths) + 2 * (len(widths) - 1) - max_width
        if overflow > 0:
            widths[col] = max(len(headers[col]), widths[col] - overflow)
            for r in cells[1:]:
                r[col] = shorten(r[col], widths[col])
    lines = []
    for r in cells:
        parts = [c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(r, widths, headers, strict=True)]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_score(value: float) -> str:
    return f"{value:.4f}"


def timing_line(timing: Timing) -> str:
    """One line saying where the server spent the time."""
    parts = [f"total {timing.total_ms:.1f} ms"]
    if timing.embed.items:
        parts.append(f"embed {timing.embed.inference_ms:.1f} ms")
    if timing.ann_ms:
        parts.append(f"ann {timing.ann_ms:.2f} ms")
    if timing.rerank.items:
        parts.append(f"rerank {timing.rerank.inference_ms:.1f} ms ({timing.rerank.items} pairs, "
                     f"{timing.rerank.batches} batches)")
    if timing.queue_ms:
        parts.append(f"queued {timing.queue_ms:.1f} ms")
    return ", ".join(parts)


RANKS_NOTE = "ranks count from 0, as in --json"


def search_table(result: SearchResult, *, width: int | None = None) -> str:
    """Search hits; `rank` and `retrieval_rank` (the stage-1 position) count from 0, as in the JSON."""
    headers = ["rank", "id", "score", "rerank", "retrieval", "retrieval_rank", "text"]
    rows: list[list[object]] = []
    for rank, hit in enumerate(result.hits):
        doc = hit.document
        text = "" if doc is None else (f"{doc.title}. {doc.text}" if doc.title else doc.text)
        rows.append([rank, hit.id, format_score(hit.score),
                     format_score(hit.rerank_score) if hit.reranked else "-",
                     format_score(hit.retrieval_score), hit.retrieval_rank, text])
    table = format_table(headers, rows, right=("rank", "score", "rerank", "retrieval", "retrieval_rank"),
                         max_width=width or terminal_width(), shrink="text")
    mode = f"{result.retrieval_mode} stage 1, " if result.retrieval_mode else ""
    weight = f", cross-encoder weight {result.rerank_weight:.2f}" if result.reranked else ""
    summary = (f"{len(result.hits)} hits from {result.candidates} candidates ({mode}{result.reranked} reranked"
               f"{weight}; scores: {result.score_kind}; {RANKS_NOTE}); {timing_line(result.timing)}")
    if result.budget_limited:
        summary += (f"\nnote: the latency budget ({result.latency_budget_ms} ms) cut reranking short: "
                    f"{result.reranked} of {result.candidates} candidates reranked")
    if result.filter_exhausted:
        summary += "\nnote: the filter matched fewer documents than requested"
    return f"{table}\n{summary}"


def rerank_table(results: RerankResults, texts: Sequence[str] = (), *, width: int | None = None) -> str:
    """Rerank results; `texts` (the request's texts) fill in the text column when the server did not
    return documents. `rank`, `index` and the best chunk count from 0, as in the JSON."""
    headers = ["rank", "index", "id", "score", "text"]
    rows: list[list[object]] = []
    for rank, r in enumerate(results.results):
        text = r.text or (texts[r.index] if r.index < len(texts) else "")
        if r.chunks > 1:
            text = f"[best chunk {r.best_chunk} of 0-{r.chunks - 1}] {text}"
        if r.truncated:
            text = f"[truncated] {text}"
        unscored = results.budget_limited and not r.scored
        rows.append([rank, r.index, r.id or "-", "-" if unscored else format_score(r.score), text])
    table = format_table(headers, rows, right=("rank", "index", "score"), max_width=width or terminal_width(),
                         shrink="text")
    scored = f"{results.scored} scored; " if results.scored or results.budget_limited else ""
    summary = (f"{len(results.results)} results ({scored}scores: {results.score_kind}; {RANKS_NOTE}); "
               f"{timing_line(results.timing)}")
    if results.budget_limited:
        summary += (f"\nnote: the latency budget ({results.latency_budget_ms} ms) cut scoring short: "
                    f"{results.scored} documents scored; the unscored ones (score -) follow in request order")
    return f"{table}\n{summary}"


def info_text(info: Info) -> str:
    """A readable summary of Info."""
    lines = [f"twostage server {info.server_version}"]
    for m in (info.bi_encoder, info.cross_encoder):
        detail = f"dim {m.dimension}, max {m.max_length} tokens"
        if m.pooling:
            detail += f", {m.pooling} pooling{', normalized' if m.normalize else ''}"
        lines.append(f"  {m.role or 'model'}: {m.name} ({m.source}) {detail}; {m.quantization or 'no quantization'}; "
                     f"{', '.join(m.providers) or 'no providers'}")
    for name, b in (("embed", info.embed_batching), ("rerank", info.rerank_batching)):
        state = "on" if b.enabled else "off"
        lines.append(f"  {name} batching {state}: <= {b.max_batch_size} items / {b.max_batch_tokens} tokens per batch, "
                     f"wait <= {b.max_delay_ms:g} ms, queue <= {b.max_queued_tokens} tokens")
    ix = info.index
    lines.append(f"  index: {ix.size} documents, dim {ix.dimension}, {ix.metric}/{ix.dtype}, M={ix.connectivity}, "
                 f"ef_add={ix.expansion_add}, ef_search={ix.expansion_search}{', read-only' if ix.read_only else ''}")
    d = info.defaults
    budget = f"{d.latency_budget_ms} ms" if d.latency_budget_ms else "none"
    lines.append(f"  defaults: top_k={d.top_k}, candidates={d.candidates}, "
                 f"chunk_overlap_tokens={d.chunk_overlap_tokens}, latency budget {budget}")
    lines.append("  limits: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(info.limits).items()))
    return "\n".join(lines)


def print_json(value: object, out: TextIO) -> None:
    """Result dataclasses as indented JSON, without the fields that hold nothing (what the server did
    not send because it was not asked for, e.g. a hit's embedding, or a Rerank text without
    --return-documents); numbers and booleans are always printed."""
    data: JsonValue = to_jsonable(value, omit_empty=True)
    json.dump(data, out, indent=2, ensure_ascii=False)
    out.write("\n")
