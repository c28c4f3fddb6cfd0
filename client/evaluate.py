"""`twostage evaluate`: what each retrieval mode and reranking buy on your own judged queries, through the Search
RPC of a real server, and (`--tune`) the server settings that do best on them.

    twostage evaluate DATA --target HOST:PORT       a running server that already holds DATA's corpus
    twostage evaluate DATA --models DIR             index DATA/corpus.jsonl into a temporary directory
                                                    (the `twostage index build` code path), serve it in
                                                    this process, evaluate, remove it

DATA is a BEIR-layout folder (client/beir.py). For each setting ("row") every judged query of the split goes
through Search, one at a time, and the row gets nDCG@10, recall@100 and latency percentiles: the client's wall
time per call and the server's own `timing.total_ms`. The rows: each stage-1 mode alone (`skip_rerank`,
top_k = candidates = 100), then stage 1 + cross-encoder at each latency budget (`--budgets`, 0 = none). A
reranked row asks for its candidate count as top_k (at most 100) so that the server reranks exactly the
candidates it is configured for; when that is fewer than 100 its recall@100 is not measured (null).

Tuning (`--tune`) chooses the stage-1 mode, fusion and dense weight, the cross-encoder weight (fixed values
and the query-adaptive rule) and the candidate count that maximise mean nDCG@10 on tuning queries that are
never reported: a seeded random half of the split (`--tune-fraction`, `--seed`), or another split
(`--tune-split train`). It is cheap: per tuning query one Search per list (dense, lexical; stage 1 only, 100
deep) and one Rerank call with the document ids of every candidate any grid point could rerank; each grid
point's ranking is then computed here with the server's own pure functions (twostage.server.fusion), in the
order the engine applies them (server/engine.py `_stage_one`, `_final_scores`). Tuning therefore reproduces
the server's arithmetic: the same lists, the same cross-encoder scores (the served cross-encoder gives a pair
the same score alone or in any batch), the same fusion; only scores sent as 32-bit floats (BM25) and float
weights are rounded as on the wire, which can swap exact ties (tests/test_evaluate.py checks a local ranking
against Search's). The chosen values are then measured on the held-out queries through Search, and
`--write-config FILE` writes them as a TOML file `twostage serve --config FILE` loads.

The query-adaptive rule cannot be asked for in a request (a request's rerank_weight is 0..1; unset means the
server's default), so it is in the grid only when the server's default is adaptive (the shipped default).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final, NotRequired, TextIO, TypedDict

import numpy as np

from twostage.client.beir import Split, load_split
from twostage.client.ir_metrics import evaluate_run, ndcg_at_k
from twostage.client.progress import ProgressBar
from twostage.client.types import Defaults, SearchOptions, SearchResult
from twostage.server import fusion as server_fusion

if TYPE_CHECKING:
    from twostage.client.client import Client

DEPTH = 100          # recall@DEPTH, and the depth of the stage-1 rows and of the lists tuning fetches
NDCG_K = 10
MODES = ("dense", "lexical", "hybrid")
ADAPTIVE = -1.0      # the config value that selects the query-adaptive cross-encoder weight
DEFAULT_BUDGETS = (0, 50, 100, 200)
DEFAULT_FUSION_WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DEFAULT_RERANK_WEIGHTS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, ADAPTIVE)
DEFAULT_CANDIDATES = (20, 30, 50, 100)
SERVER_HYBRID_DEPTH = 100  # server/config.py hybrid_depth's default (Info does not report it)
# The report's metric keys, spelled out so that the report's TypedDicts can name them (f"ndcg@{NDCG_K}" and
# f"recall@{DEPTH}"; keep them in step with NDCG_K and DEPTH).
NDCG: Final = "ndcg@10"
RECALL: Final = "recall@100"
DEFAULTS_NDCG: Final = "server_defaults_ndcg@10"
HELD_OUT_NDCG: Final = "held_out_ndcg@10"


# ------------------------------------------------------------------------------------------ the report
# What `run_evaluation` returns and --json writes; the TypedDicts only type it (it stays plain JSON).
class Latency(TypedDict):
    p50: float | None
    p90: float | None
    p99: float | None
    mean: float | None


class LatencyMs(TypedDict):
    client: Latency
    server: Latency


Row = TypedDict("Row", {
    "label": str, "mode": str, "rerank": bool, "candidates": int, "top_k": int, "fusion": str | None,
    "fusion_weight": float | None, "rerank_weight": float | None, "latency_budget_ms": int, "tuned": bool,
    "queries": int, "ndcg@10": float, "recall@100": float | None, "latency_ms": LatencyMs,
    "reranked_mean": float, "budget_limited": float})

GridPoint = TypedDict("GridPoint", {"stage1": str, "candidates": int, "rerank_weight": float, "ndcg@10": float})

Tuning = TypedDict("Tuning", {
    "queries": int, "chosen_from": str, "query_ids": list[str], "notes": list[str],
    "chosen": dict[str, str | float | int], "ndcg@10": float, "server_defaults_ndcg@10": float | None,
    "grid": list[GridPoint], "held_out_ndcg@10": NotRequired[float]})


class Dataset(TypedDict):
    folder: str
    split: str
    queries: int
    judged_queries: int
    query_ids: list[str]


class Server(TypedDict):
    version: str
    bi_encoder: str
    cross_encoder: str
    documents: int
    defaults: dict[str, str | float | int]
    embedded: NotRequired[bool]
    target: NotRequired[str]


class Measure(TypedDict):
    ndcg_k: int
    recall_k: int
    warmup: int
    hybrid_depth: int
    latency: str


class Report(TypedDict):
    dataset: Dataset
    server: Server
    measure: Measure
    rows: list[Row]
    tune: Tuning | None


def wire(value: float) -> float:
    """A float as it arrives on the server: proto `float` fields are 32-bit."""
    return float(np.float32(value))


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Setting:
    """One row: how every query is searched. None / "" / 0 = the server's default."""

    label: str
    mode: str
    rerank: bool
    candidates: int = DEPTH
    fusion: str = ""
    fusion_weight: float | None = None
    rerank_weight: float | None = None
    budget_ms: int = 0
    tuned: bool = False

    @property
    def top_k(self) -> int:
        return min(self.candidates, DEPTH)

    def search_options(self) -> SearchOptions:
        """Keyword arguments of Client.search."""
        return SearchOptions(top_k=self.top_k, candidates=self.candidates, skip_rerank=not self.rerank, ids_only=True,
                             retrieval_mode=self.mode, fusion=self.fusion, fusion_weight=self.fusion_weight,
                             rerank_weight=self.rerank_weight, latency_budget_ms=self.budget_ms)


def describe_stage1(mode: str, fusion_method: str, weight: float | None) -> str:
    if mode != "hybrid":
        return mode
    if fusion_method == "rrf":
        return "hybrid (rrf)"
    return f"hybrid ({fusion_method} {weight:g})" if weight is not None else f"hybrid ({fusion_method})"


def describe_rerank(weight: float | None) -> str:
    return "adaptive" if weight is None or weight < 0 else f"{weight:g}"


@dataclass
class Options:
    """What `twostage evaluate` measures; the CLI flags map onto these one to one."""

    modes: tuple[str, ...] = MODES
    rerank_mode: str = "hybrid"
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    candidates: int = 0                 # reranked rows; 0 = the server's default_candidates
    fusion: str = ""
    fusion_weight: float | None = None
    rerank_weight: float | None = None
    warmup: int = 3
    max_queries: int = 0
    progress: bool = True
    tune: bool = False
    tune_split: Split | None = None
    tune_fraction: float = 0.5
    seed: int = 0
    tune_fusions: tuple[str, ...] = server_fusion.FUSIONS
    tune_fusion_weights: tuple[float, ...] = DEFAULT_FUSION_WEIGHTS
    tune_rerank_weights: tuple[float, ...] = DEFAULT_RERANK_WEIGHTS
    tune_candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    hybrid_depth: int = SERVER_HYBRID_DEPTH


def default_settings(options: Options, defaults: Defaults) -> list[Setting]:
    """The rows before tuning: each mode alone, then the rerank mode with the cross-encoder at each budget."""
    rows = []
    for mode in options.modes:
        hybrid = mode == "hybrid"
        method = (options.fusion or defaults.fusion) if hybrid else ""
        weight = options.fusion_weight if options.fusion_weight is not None else defaults.fusion_weight
        rows.append(Setting(describe_stage1(mode, method, weight if hybrid else None), mode, rerank=False,
                            fusion=options.fusion if hybrid else "",
                            fusion_weight=options.fusion_weight if hybrid else None))
    mode = options.rerank_mode
    hybrid = mode == "hybrid"
    candidates = options.candidates or defaults.candidates or DEPTH
    stage1 = describe_stage1(mode, (options.fusion or defaults.fusion) if hybrid else "",
                             options.fusion_weight if options.fusion_weight is not None else defaults.fusion_weight)
    weight = options.rerank_weight if options.rerank_weight is not None else defaults.rerank_weight
    for budget in options.budgets:
        when = f"budget {budget} ms" if budget else (f"server budget {defaults.latency_budget_ms} ms"
                                                      if defaults.latency_budget_ms else "no budget")
        label = f"{stage1} + rerank ({describe_rerank(weight)}, {candidates} cand., {when})"
        rows.append(Setting(label, mode, rerank=True, candidates=candidates, fusion=options.fusion if hybrid else "",
                            fusion_weight=options.fusion_weight if hybrid else None,
                            rerank_weight=options.rerank_weight, budget_ms=budget))
    return rows


# ------------------------------------------------------------------------------------------- rows
@dataclass
class RowRun:
    """What one setting gave over the reported queries."""

    setting: Setting
    rankings: dict[str, list[str]] = field(default_factory=dict)
    client_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    reranked: list[int] = field(default_factory=list)
    budget_limited: int = 0


def run_setting(client: Client, queries: Mapping[str, str], setting: Setting, bar: ProgressBar,
                warmup: int = 0) -> RowRun:
    """Search every query once with `setting`, one at a time, after `warmup` unrecorded calls."""
    options = setting.search_options()
    for text in list(queries.values())[:warmup]:
        client.search(text, **options)
    run = RowRun(setting)
    for qid, text in queries.items():
        started = time.perf_counter()
        result: SearchResult = client.search(text, **options)
        run.client_ms.append((time.perf_counter() - started) * 1000.0)
        run.server_ms.append(result.timing.total_ms)
        run.rankings[qid] = [h.id for h in result.hits]
        run.reranked.append(result.reranked)
        run.budget_limited += int(result.budget_limited)
        bar.advance(1)
    return run


def percentiles(values: Sequence[float]) -> Latency:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(arr.mean())}


def summarize(run: RowRun, qrels: Mapping[str, Mapping[str, int]]) -> Row:
    """One row of the report: the setting, quality and latency."""
    s = run.setting
    queries = list(run.rankings)
    scores = evaluate_run(run.rankings, qrels, queries, NDCG_K, DEPTH)
    return {
        "label": s.label, "mode": s.mode, "rerank": s.rerank, "candidates": s.candidates, "top_k": s.top_k,
        "fusion": s.fusion or None, "fusion_weight": s.fusion_weight, "rerank_weight": s.rerank_weight,
        "latency_budget_ms": s.budget_ms, "tuned": s.tuned, "queries": len(queries),
        NDCG: scores[NDCG],
        RECALL: scores[RECALL] if s.top_k >= DEPTH else None,
        "latency_ms": {"client": percentiles(run.client_ms), "server": percentiles(run.server_ms)},
        "reranked_mean": float(np.mean(run.reranked)) if run.reranked else 0.0,
        "budget_limited": run.budget_limited / len(queries) if queries else 0.0,
    }


# ------------------------------------------------------------------------------------------ tuning
@dataclass(frozen=True)
class Stage1:
    """A stage-1 choice of the grid."""

    mode: str
    fusion: str = ""
    fusion_weight: float | None = None

    @property
    def label(self) -> str:
        return describe_stage1(self.mode, self.fusion, self.fusion_weight)


@dataclass
class QueryLists:
    """One query's cached stage-1 lists (100 deep) and the cross-encoder's normalized score per candidate."""

    dense: list[server_fusion.Ranked] = field(default_factory=list)
    lexical: list[server_fusion.Ranked] = field(default_factory=list)
    ce: dict[str, float] = field(default_factory=dict)


def stage1_candidates(lists: QueryLists, stage1: Stage1, candidates: int,
                      hybrid_depth: int = SERVER_HYBRID_DEPTH) -> list[server_fusion.Fused]:
    """The server's stage-1 candidates for these settings (engine `_stage_one`, then the cut to `candidates`):
    one list alone, or both lists `max(candidates, hybrid_depth)` deep fused."""
    if stage1.mode == "dense":
        return server_fusion.single(lists.dense[:candidates], "dense")
    if stage1.mode == "lexical":
        return server_fusion.single(lists.lexical[:candidates], "lexical")
    depth = max(candidates, hybrid_depth)
    weight = wire(stage1.fusion_weight) if stage1.fusion_weight is not None else 0.0  # rrf has none
    return server_fusion.fuse(lists.dense[:depth], lists.lexical[:depth], stage1.fusion, weight)[:candidates]


def reranked_order(candidates: Sequence[server_fusion.Fused], ce: Mapping[str, float],
                   rerank_weight: float) -> list[str]:
    """The engine's final order once every candidate is reranked (`_final_scores`, then by score and stage-1
    position): the cross-encoder weight (negative = the query-adaptive rule) mixes both min-max normalized."""
    if not candidates:
        return []
    scores = np.array([ce[c.id] for c in candidates], dtype=np.float64)
    weight = server_fusion.adaptive_rerank_weight(scores) if rerank_weight < 0 else min(wire(rerank_weight), 1.0)
    final = server_fusion.rerank_fused(scores, [c.score for c in candidates], weight)
    order = np.lexsort((np.arange(len(candidates)), -final))  # by score, then stage-1 position
    return [candidates[i].id for i in order]


def stage1_grid(options: Options) -> list[Stage1]:
    grid: list[Stage1] = []
    for mode in options.modes:
        if mode != "hybrid":
            grid.append(Stage1(mode))
            continue
        for method in options.tune_fusions:
            if method == "rrf":
                grid.append(Stage1("hybrid", "rrf"))
            else:
                grid.extend(Stage1("hybrid", method, w) for w in options.tune_fusion_weights)
    return grid


def fetch_lists(client: Client, queries: Mapping[str, str], options: Options, bar: ProgressBar,
                max_rerank_documents: int) -> dict[str, QueryLists]:
    """Per tuning query: the dense and lexical lists the grid needs (Search, stage 1 only) and the cross-encoder
    scores of every candidate any grid point reranks (Rerank with document ids)."""
    depth = max(DEPTH, options.hybrid_depth, *options.tune_candidates)
    need_dense = bool({"dense", "hybrid"} & set(options.modes))
    need_lexical = bool({"lexical", "hybrid"} & set(options.modes))
    grid = stage1_grid(options)
    most = max(options.tune_candidates)
    out: dict[str, QueryLists] = {}
    for qid, text in queries.items():
        lists = QueryLists()
        if need_dense:
            found = client.search(text, top_k=depth, candidates=depth, skip_rerank=True, ids_only=True,
                                  retrieval_mode="dense")
            lists.dense = [server_fusion.Ranked(h.id, h.dense_score, h.dense_rank) for h in found.hits]
        if need_lexical:
            found = client.search(text, top_k=depth, candidates=depth, skip_rerank=True, ids_only=True,
                                  retrieval_mode="lexical")
            lists.lexical = [server_fusion.Ranked(h.id, h.lexical_score, h.lexical_rank) for h in found.hits]
        wanted = list(dict.fromkeys(c.id for s in grid
                                    for c in stage1_candidates(lists, s, most, options.hybrid_depth)))
        for lo in range(0, len(wanted), max_rerank_documents):
            ids = wanted[lo:lo + max_rerank_documents]
            scored = client.rerank(text, document_ids=ids)
            if scored.budget_limited or len(scored.results) != len(ids):
                raise RuntimeError("the server's default latency budget left candidates unscored by Rerank; tuning "
                                   "needs every score: evaluate against a server without a default budget")
            lists.ce.update((ids[r.index], r.score) for r in scored.results)
        out[qid] = lists
        bar.advance(1)
    return out


def defaults_choice(defaults: Defaults) -> Choice:
    """The grid point of the server's defaults (Info reports weights as 32-bit floats: rounded back here)."""
    hybrid = defaults.retrieval_mode == "hybrid"
    convex = hybrid and defaults.fusion == "convex"
    stage1 = Stage1(defaults.retrieval_mode, defaults.fusion if hybrid else "",
                    round(defaults.fusion_weight, 6) if convex else None)
    weight = ADAPTIVE if defaults.rerank_weight < 0 else round(defaults.rerank_weight, 6)
    return Choice(stage1, defaults.candidates, weight)


@dataclass(frozen=True)
class Choice:
    """One grid point."""

    stage1: Stage1
    candidates: int
    rerank_weight: float  # negative = the query-adaptive rule

    def config(self, defaults: Defaults) -> dict[str, str | float | int]:
        """The server knobs (server/config.py names) that select this choice; fusion settings the choice does
        not use keep the server's current values."""
        hybrid = self.stage1.mode == "hybrid"
        weight = self.stage1.fusion_weight if hybrid and self.stage1.fusion_weight is not None else \
            defaults.fusion_weight
        return {"retrieval_mode": self.stage1.mode,
                "fusion": self.stage1.fusion if hybrid else (defaults.fusion or "convex"),
                "fusion_weight": round(float(weight), 6),
                "rerank_weight": ADAPTIVE if self.rerank_weight < 0 else self.rerank_weight,
                "default_candidates": self.candidates}


def grid_scores(lists: Mapping[str, QueryLists], qrels: Mapping[str, Mapping[str, int]], options: Options,
                rerank_weights: Sequence[float]) -> list[tuple[Choice, float]]:
    """Mean nDCG@10 over the tuning queries for every grid point, in the grid's order (fewest candidates first)."""
    totals: dict[Choice, float] = {}
    grid = stage1_grid(options)
    for qid, q in lists.items():
        judged = qrels.get(qid, {})
        for stage1 in grid:
            for n in sorted(options.tune_candidates):
                cands = stage1_candidates(q, stage1, n, options.hybrid_depth)
                for w in rerank_weights:
                    choice = Choice(stage1, n, w)
                    totals[choice] = totals.get(choice, 0.0) + ndcg_at_k(reranked_order(cands, q.ce, w), judged, NDCG_K)
    count = max(len(lists), 1)
    ordered = [Choice(s, n, w) for n in sorted(options.tune_candidates) for s in grid for w in rerank_weights]
    return [(c, totals.get(c, 0.0) / count) for c in ordered]


def best_choice(scores: Sequence[tuple[Choice, float]]) -> tuple[Choice, float]:
    """The highest mean nDCG@10; on a tie, the earliest in grid order (fewest candidates)."""
    best = scores[0]
    for choice, value in scores[1:]:
        if value > best[1] + 1e-12:
            best = (choice, value)
    return best


def split_queries(split: Split, options: Options) -> tuple[dict[str, str], dict[str, str], str]:
    """(reported queries, tuning queries, how the tuning queries were chosen). The two never share a query id."""
    report = dict(split.queries)
    if not options.tune:
        tune: dict[str, str] = {}
        how = ""
    elif options.tune_split is not None:
        tune = {q: t for q, t in options.tune_split.queries.items() if q not in report}
        dropped = len(options.tune_split.queries) - len(tune)
        how = f"split {options.tune_split.name!r}" + (f" (less {dropped} queries also in {split.name!r})"
                                                      if dropped else "")
    else:
        ids = sorted(report)
        random.Random(options.seed).shuffle(ids)
        chosen = set(ids[:round(len(ids) * options.tune_fraction)])
        tune = {q: t for q, t in report.items() if q in chosen}
        report = {q: t for q, t in report.items() if q not in chosen}
        how = f"random {options.tune_fraction:g} of split {split.name!r} (seed {options.seed})"
    if options.max_queries:
        report = dict(list(report.items())[:options.max_queries])
        tune = dict(list(tune.items())[:options.max_queries])
    assert not set(report) & set(tune), "a tuning query is among the reported ones"
    if options.tune and (not tune or not report):
        raise ValueError(f"tuning needs queries on both sides: {len(tune)} to tune on, {len(report)} to report "
                         f"(--tune-fraction {options.tune_fraction:g}, {len(split.queries)} judged queries)")
    return report, tune, how


def tune(client: Client, queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]], options: Options,
         defaults: Defaults, max_rerank_documents: int, stream: TextIO) -> Tuning:
    """Choose the settings on `queries` (never the reported ones); returns the tuning part of the report."""
    notes: list[str] = []
    weights = list(options.tune_rerank_weights)
    if any(w < 0 for w in weights) and not defaults.rerank_weight < 0:
        weights = [w for w in weights if w >= 0]
        notes.append(f"the query-adaptive rule is left out: the server's default cross-encoder weight is "
                     f"{defaults.rerank_weight:g} and a request cannot ask for the rule")
    if not weights:
        raise ValueError("no cross-encoder weight left to tune")
    bar = ProgressBar(len(queries), label="tuning: lists and cross-encoder scores", stream=stream,
                      enabled=options.progress, unit="queries")
    lists = fetch_lists(client, queries, options, bar, max_rerank_documents)
    bar.close()
    scores = grid_scores(lists, qrels, options, weights)
    choice, value = best_choice(scores)
    by_choice = dict(scores)
    baseline = by_choice.get(defaults_choice(defaults))  # None when the grid does not hold the server's defaults
    if choice.rerank_weight == 0.0:
        notes.append("the cross-encoder does not help on these queries (weight 0 chosen): consider skip_rerank")
    return {
        "queries": len(queries), "chosen_from": "", "query_ids": list(queries), "notes": notes,
        "chosen": choice.config(defaults), NDCG: value,
        DEFAULTS_NDCG: baseline,
        "grid": [{"stage1": c.stage1.label, "candidates": c.candidates, "rerank_weight": c.rerank_weight,
                  NDCG: v} for c, v in scores],
    }


def tuned_settings(chosen: Mapping[str, str | float | int]) -> list[Setting]:
    """The held-out rows of a tuning result: its stage 1 alone, and reranked as chosen (through Search)."""
    mode = str(chosen["retrieval_mode"])
    hybrid = mode == "hybrid"
    method = str(chosen["fusion"]) if hybrid else ""
    weight = float(chosen["fusion_weight"]) if hybrid and method == "convex" else None
    rerank_weight = float(chosen["rerank_weight"])
    candidates = int(chosen["default_candidates"])
    stage1 = describe_stage1(mode, method, weight)
    return [Setting(f"tuned: {stage1}", mode, rerank=False, fusion=method, fusion_weight=weight, tuned=True),
            Setting(f"tuned: {stage1} + rerank ({describe_rerank(rerank_weight)}, {candidates} cand.)", mode,
                    rerank=True, candidates=candidates, fusion=method, fusion_weight=weight,
                    rerank_weight=None if rerank_weight < 0 else rerank_weight, tuned=True)]


def config_toml(report: Report) -> str:
    """A tuned report's chosen knobs as a TOML file for `twostage serve --config` (keys are server/config.py
    names), with where they come from in comments."""
    t, ds = report["tune"], report["dataset"]
    if t is None:
        raise ValueError("the report has no tuning result (evaluate with --tune)")
    lines = [f"# written by `twostage evaluate --tune` on {ds['folder']} ({t['chosen_from']}, {t['queries']} queries)",
             (f"# nDCG@{NDCG_K}: {t[NDCG]:.4f} on the tuning queries, {t[HELD_OUT_NDCG]:.4f} "
              f"on {ds['queries']} held-out queries of split {ds['split']!r} through Search"),
             "# rerank_weight < 0 selects the query-adaptive cross-encoder weight"]
    for key, value in t["chosen"].items():
        lines.append(f"{key} = {json.dumps(value)}")  # a JSON string, int or float is also TOML
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the run
def run_evaluation(client: Client, split: Split, options: Options, stream: TextIO = sys.stderr) -> Report:
    """Evaluate `split` on the server behind `client`; returns the report (what --json writes)."""
    info = client.info()
    defaults = info.defaults
    report_queries, tune_queries, how = split_queries(split, options)
    result: Report = {
        "dataset": {"folder": str(split.folder), "split": split.name, "queries": len(report_queries),
                    "judged_queries": len(split.queries), "query_ids": list(report_queries)},
        "server": {"version": info.server_version, "bi_encoder": info.bi_encoder.name,
                   "cross_encoder": info.cross_encoder.name, "documents": info.index.size,
                   "defaults": asdict(defaults)},
        "measure": {"ndcg_k": NDCG_K, "recall_k": DEPTH, "warmup": options.warmup, "hybrid_depth": options.hybrid_depth,
                    "latency": "one query at a time; client = wall time of the Search call, server = timing.total_ms"},
        "rows": [], "tune": None,
    }
    settings = default_settings(options, defaults)
    if options.tune:
        qrels = options.tune_split.qrels if options.tune_split is not None else split.qrels
        tuned = tune(client, tune_queries, qrels, options, defaults, info.limits.max_rerank_documents or 1000, stream)
        tuned["chosen_from"] = how
        result["tune"] = tuned
        settings += tuned_settings(tuned["chosen"])
    bar = ProgressBar(len(settings) * len(report_queries), label="evaluating", stream=stream,
                      enabled=options.progress, unit="searches")
    rows = [summarize(run_setting(client, report_queries, s, bar, options.warmup), split.qrels) for s in settings]
    bar.close()
    result["rows"] = rows
    if options.tune:
        tuned_rerank = next(r for r in rows if r["tuned"] and r["rerank"])
        tuned[HELD_OUT_NDCG] = tuned_rerank[NDCG]
    return result


# ------------------------------------------------------------------------------------------ output
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def report_table(report: Report) -> str:
    from twostage.client.output import format_table

    ds = report["dataset"]
    headers = ["setting", f"nDCG@{NDCG_K}", f"R@{DEPTH}", "client p50", "client p90", "client p99", "server p50",
               "server p90", "server p99", "reranked"]
    rows = []
    for r in report["rows"]:
        c, s = r["latency_ms"]["client"], r["latency_ms"]["server"]
        rows.append([r["label"], _figure(r[NDCG]), _figure(r[RECALL]), _ms(c["p50"]),
                     _ms(c["p90"]), _ms(c["p99"]), _ms(s["p50"]), _ms(s["p90"]), _ms(s["p99"]),
                     f"{r['reranked_mean']:.0f}" + (f" (cut {r['budget_limited']:.0%})" if r["budget_limited"]
                                                    else "")])
    lines = [(f"{ds['folder']} split {ds['split']}: {ds['queries']} queries, {report['server']['documents']} "
              "documents; latency in ms, one query at a time"),
             format_table(headers, rows, right=headers[1:])]
    t = report.get("tune")
    if t:
        chosen = ", ".join(f"{k}={v}" for k, v in t["chosen"].items())
        base = t[DEFAULTS_NDCG]
        lines.append(f"tuned on {t['queries']} other queries ({t['chosen_from']}): {chosen}")
        lines.append(f"  nDCG@{NDCG_K} on the tuning queries {t[NDCG]:.4f}"
                     + (f" (server defaults {base:.4f})" if base is not None else "")
                     + f"; held out, through Search: {t[HELD_OUT_NDCG]:.4f}")
        lines.extend(f"  note: {n}" for n in t["notes"])
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ embedded server
@contextmanager
def embedded_server(models: Path, corpus: Path, config_file: str | None, progress: bool,
                    stream: TextIO) -> Iterator[str]:
    """Index `corpus` into a temporary directory with `twostage index build`'s code path, serve it in this process
    on a free loopback port (settings from `config_file` and TWOSTAGE_* as for `twostage serve`), yield the
    target; stop and remove everything afterwards."""
    import asyncio
    import threading

    from twostage.server.app import serve_in_background
    from twostage.server.cli import BackgroundEmbedder
    from twostage.server.config import Config
    from twostage.server.index.settings import IndexSettings
    from twostage.server.indexing import build_index

    work = Path(tempfile.mkdtemp(prefix="twostage-evaluate-"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="evaluate-server", daemon=True)
    running = None
    try:
        config = Config.from_sources(config_file=config_file)
        config = replace(config, models=str(models), index=str(work / "index"), host="127.0.0.1", port=0,
                         metrics_port=-1, log_level="warning", log_format="text", index_save_interval_s=3600.0)
        config.validate()
        embedder = BackgroundEmbedder(config)
        try:
            build_index(corpus, Path(config.index), embedder.embed, embedder.dimension,
                        IndexSettings.from_config(config), batch_size=256, progress=progress,
                        embed_fingerprint=embedder.model.sha256, progress_stream=stream)
        finally:
            embedder.close()
        thread.start()
        running = asyncio.run_coroutine_threadsafe(serve_in_background(config), loop).result()
        yield running.target
    finally:
        if running is not None:
            asyncio.run_coroutine_threadsafe(running.stop(grace=0), loop).result(timeout=60)
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        loop.close()
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------ command line
def _list(kind: type, *, allow_adaptive: bool = False):
    def parse(text: str) -> tuple:
        values = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if allow_adaptive and part == "adaptive":
                values.append(ADAPTIVE)
                continue
            try:
                values.append(kind(part))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part!r} is not a {kind.__name__}") from None
        if not values:
            raise argparse.ArgumentTypeError("needs at least one value")
        return tuple(values)
    return parse


def _choices(allowed: Sequence[str]):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or 'nothing'}: choose from {', '.join(allowed)}")
        return values
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from twostage.client.cli import (
        _non_negative,
        _unit_interval,
        add_connection_arguments,
    )

    parser.description = (f"{parser.description}\n\n" + __doc__.split("\n\n", 2)[1])
    parser.add_argument("data", type=Path, help="BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    parser.add_argument("--split", default="test", help="the judged split to report on (default: test)")
    parser.add_argument("--models", type=Path, default=None, metavar="DIR",
                        help="instead of --target: index the folder's corpus with this model set into a temporary "
                             "directory and serve it in this process (default: use --target)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="with --models: server settings for the in-process server, as `twostage serve --config` "
                             "(default: the server's defaults)")
    what = parser.add_argument_group("what to measure")
    what.add_argument("--modes", type=_choices(MODES), default=MODES, metavar="MODE[,MODE...]",
                      help="stage-1 modes to measure alone (and to tune over): dense, lexical, hybrid "
                           "(default: all three)")
    what.add_argument("--rerank-mode", choices=MODES, default="hybrid",
                      help="the stage 1 under the reranked rows (default: hybrid)")
    what.add_argument("--budgets", type=_list(int), default=DEFAULT_BUDGETS, metavar="MS[,MS...]",
                      help="latency budgets of the reranked rows in ms, 0 = none (default: 0,50,100,200)")
    what.add_argument("--candidates", type=_non_negative, default=0,
                      help="candidates the reranked rows rerank (default: 0 = the server's default)")
    what.add_argument("--fusion", choices=server_fusion.FUSIONS, default="",
                      help="hybrid fusion of the untuned rows (default: the server's)")
    what.add_argument("--fusion-weight", type=_unit_interval, default=None, metavar="W",
                      help="convex fusion's dense weight for the untuned rows (default: the server's)")
    what.add_argument("--rerank-weight", type=_unit_interval, default=None, metavar="W",
                      help="cross-encoder weight of the untuned reranked rows (default: the server's)")
    what.add_argument("--max-queries", type=_non_negative, default=0,
                      help="evaluate (and tune on) at most this many queries each (default: 0 = all)")
    what.add_argument("--warmup", type=_non_negative, default=3,
                      help="unrecorded searches before each row's measured ones (default: 3)")
    what.add_argument("--hybrid-depth", type=int, default=SERVER_HYBRID_DEPTH,
                      help="the server's hybrid_depth knob, which tuning reproduces (Info does not report it; "
                           f"default: {SERVER_HYBRID_DEPTH}, the server's default)")
    tuning = parser.add_argument_group("tuning")
    tuning.add_argument("--tune", action="store_true",
                        help="choose mode, fusion weight, cross-encoder weight and candidates on queries that are "
                             "not reported (default: off)")
    tuning.add_argument("--tune-split", default=None, metavar="SPLIT",
                        help="tune on this split's queries (e.g. train) and report the whole --split (default: a "
                             "random part of --split)")
    tuning.add_argument("--tune-fraction", type=_unit_interval, default=0.5,
                        help="without --tune-split: the part of the queries tuned on (default: 0.5)")
    tuning.add_argument("--seed", type=int, default=0, help="seed of that random part (default: 0)")
    tuning.add_argument("--tune-fusions", type=_choices(server_fusion.FUSIONS), default=server_fusion.FUSIONS,
                        metavar="F[,F...]", help="hybrid fusions to try (default: convex,rrf)")
    tuning.add_argument("--tune-fusion-weights", type=_list(float), default=DEFAULT_FUSION_WEIGHTS,
                        metavar="W[,W...]", help="convex dense weights to try (default: 0.3,0.4,...,0.8)")
    tuning.add_argument("--tune-rerank-weights", type=_list(float, allow_adaptive=True),
                        default=DEFAULT_RERANK_WEIGHTS, metavar="W[,W...]",
                        help="cross-encoder weights to try, 'adaptive' for the query-adaptive rule "
                             "(default: 0,0.3,0.5,0.6,0.7,0.8,0.9,1,adaptive)")
    tuning.add_argument("--tune-candidates", type=_list(int), default=DEFAULT_CANDIDATES, metavar="N[,N...]",
                        help="candidate counts to try (default: 20,30,50,100)")
    tuning.add_argument("--write-config", type=Path, default=None, metavar="FILE",
                        help="with --tune: write the chosen settings as a TOML file for `twostage serve --config` "
                             "(default: none)")
    add_connection_arguments(parser, json_flag=False)
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the report as JSON to FILE, '-' for standard output (the table then goes "
                             "to standard error) (default: table only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines (default: show them)")


def options_from_args(args: argparse.Namespace) -> Options:
    for name in ("budgets", "tune_candidates"):
        if any(v < 0 for v in getattr(args, name)) or (name == "tune_candidates" and 0 in args.tune_candidates):
            raise ValueError(f"--{name.replace('_', '-')}: values must be {'> 0' if name != 'budgets' else '>= 0'}")
    if any(not (0.0 <= w <= 1.0) for w in args.tune_fusion_weights):
        raise ValueError("--tune-fusion-weights: values must be between 0 and 1")
    if any(w > 1.0 or (w < 0 and w != ADAPTIVE) for w in args.tune_rerank_weights):
        raise ValueError("--tune-rerank-weights: values must be between 0 and 1, or 'adaptive'")
    if args.hybrid_depth <= 0:
        raise ValueError(f"--hybrid-depth must be > 0 (got {args.hybrid_depth})")
    if args.write_config is not None and not args.tune:
        raise ValueError("--write-config needs --tune")
    if args.tune_split is not None and args.tune_split == args.split:
        raise ValueError(f"--tune-split {args.tune_split} is the split reported on: tuning must use other queries")
    tune_split = load_split(args.data, args.tune_split) if args.tune and args.tune_split else None
    return Options(modes=args.modes, rerank_mode=args.rerank_mode, budgets=args.budgets, candidates=args.candidates,
                   fusion=args.fusion, fusion_weight=args.fusion_weight, rerank_weight=args.rerank_weight,
                   warmup=args.warmup, max_queries=args.max_queries, progress=not args.no_progress, tune=args.tune,
                   tune_split=tune_split, tune_fraction=args.tune_fraction, seed=args.seed,
                   tune_fusions=args.tune_fusions, tune_fusion_weights=args.tune_fusion_weights,
                   tune_rerank_weights=args.tune_rerank_weights, tune_candidates=args.tune_candidates,
                   hybrid_depth=args.hybrid_depth)


def run(args: argparse.Namespace) -> int:
    from twostage.client.cli import client_from_args

    split = load_split(args.data, args.split)
    options = options_from_args(args)
    stream = sys.stderr
    if args.models is not None:
        with embedded_server(args.models, split.corpus, args.config, options.progress, stream) as target:
            args.target = target
            with client_from_args(args) as client:
                client.wait_ready(timeout=60)
                report = run_evaluation(client, split, options, stream)
        report["server"]["embedded"] = True
    else:
        with client_from_args(args) as client:
            report = run_evaluation(client, split, options, stream)
        report["server"]["target"] = args.target
    print(report_table(report), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.json is not None:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.write_config is not None:
        Path(args.write_config).write_text(config_toml(report))
        print(f"wrote {args.write_config}", file=sys.stderr)
    return 0
