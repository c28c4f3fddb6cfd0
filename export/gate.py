"""The accuracy gate: run the reference model (fp32, or the source ONNX) and the model to be served on a
calibration set and measure how closely they agree.

The gate has no runtime of its own: both models run through the model layer's `Embedder` / `Reranker`
(twostage.model), the classes the server serves with, so the figures describe the graph exactly as served:
same tokenization and truncation, same padding, same session options and left-out rewrites, same pooling,
normalization and positive label.

Figures:

bi-encoder
  mean_cosine, min_cosine   cosine between reference and served embeddings of every query and passage.
  top10_overlap             for each query, all calibration passages ranked by cosine similarity; the share
                            of the reference's top 10 that the served model also puts in its top 10, averaged
                            over queries (top10_overlap_min: the worst query).
  spearman                  rank correlation of the query-passage similarities of the calibration pairs.
cross-encoder
  spearman                  rank correlation of the raw scores of all calibration pairs.
  top10_overlap             all pairs ranked by score (one global ranking, since each query has only a few
                            passages): share of the reference's 10 best pairs among the served model's 10 best.
  top1_agreement            share of queries whose best passage is the same for both models.
  max_abs_diff              largest raw-score difference.
both, when the calibration file labels relevant passages
  reference_hit_at_1, candidate_hit_at_1   share of queries whose best passage is a labelled relevant one.
both, of the served model alone
  batch_variation           how much a row's output changes between scoring it alone and inside one padded
                            batch of 16 calibration inputs of mixed lengths: largest raw-score difference
                            (cross-encoder) or cosine distance 1 - cos (bi-encoder).

Checked: bi-encoder mean_cosine >= min_cosine and top10_overlap >= min_top10_overlap; cross-encoder
spearman >= min_spearman and top10_overlap >= min_top10_overlap; both batch_variation <= its maximum. Other
figures are recorded only.
"""
from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.model.manifest import sha256_file
from twostage.model.postprocess import l2_normalize

from .errors import ExportError

if TYPE_CHECKING:  # the model layer's sessions import onnxruntime, which `twostage export --help` must not load
    from twostage.model.embedder import Embedder
    from twostage.model.reranker import Reranker
    from twostage.model.tokenization import Encoded

BUILTIN_CALIBRATION = Path(__file__).resolve().parent / "data" / "calibration.jsonl"
TOP_K = 10
BATCH_SIZE = 32
CHECKED_METRICS = {
    "bi-encoder": {"mean_cosine": "min_cosine", "top10_overlap": "min_top10_overlap",
                   "batch_variation": "max_batch_variation_cosine"},
    "cross-encoder": {"spearman": "min_spearman", "top10_overlap": "min_top10_overlap",
                      "batch_variation": "max_batch_variation_score"},
}


@dataclass(frozen=True)
class Thresholds:
    """Defaults, from all-MiniLM-L6-v2 on the built-in set: per-channel int8 scores mean_cosine 0.994 and
    top10_overlap 0.92; per-tensor int8 (visibly worse) 0.966 and 0.82. The defaults pass the first and
    reject the second."""

    min_cosine: float = 0.98
    min_spearman: float = 0.98
    min_top10_overlap: float = 0.85
    # A row's output alone vs inside a padded batch of mixed lengths (`batch_variation`): raw score difference
    # (cross-encoder) and cosine distance (bi-encoder). Dynamic int8 quantization moved scores by up to 0.8.
    max_batch_variation_score: float = 1e-4
    max_batch_variation_cosine: float = 1e-5


@dataclass(frozen=True)
class Calibration:
    name: str  # "builtin" or the file path
    sha256: str
    queries: list[str]
    passages: list[list[str]]  # passages[i] belong to queries[i]
    relevant: list[list[int]]  # indices into passages[i]; empty when not labelled

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(q, p) for q, ps in zip(self.queries, self.passages, strict=True) for p in ps]

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "queries": len(self.queries),
                "passages": sum(len(p) for p in self.passages)}


def load_calibration(path: Path | None = None) -> Calibration:
    """Read a calibration jsonl: one object per line, {"query": str, "passages": [str, ...],
    "relevant": [index, ...] (optional)}. None reads the built-in set."""
    file = Path(path) if path is not None else BUILTIN_CALIBRATION
    if not file.is_file():
        raise ExportError(f"{file}: calibration file not found")
    queries, passages, relevant = [], [], []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExportError(f"{where}: not JSON: {exc}") from exc
        if not isinstance(item, dict):
            raise ExportError(f"{where}: expected an object with 'query' and 'passages'")
        query, texts = item.get("query"), item.get("passages")
        if not isinstance(query, str) or not query.strip():
            raise ExportError(f"{where}: 'query' must be a non-empty string")
        if (not isinstance(texts, list) or not texts
                or not all(isinstance(t, str) and t.strip() for t in texts)):
            raise ExportError(f"{where}: 'passages' must be a non-empty list of non-empty strings")
        labels = item.get("relevant", [])
        if isinstance(labels, int) and not isinstance(labels, bool):
            labels = [labels]
        if (not isinstance(labels, list)
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(texts) for i in labels)):
            raise ExportError(f"{where}: 'relevant' must list passage indices below {len(texts)}")
        queries.append(query)
        passages.append(texts)
        relevant.append(labels)
    if len(queries) < 2:
        raise ExportError(f"{file}: needs at least 2 queries, found {len(queries)}")
    name = "builtin" if path is None else str(file)
    return Calibration(name, sha256_file(file), queries, passages, relevant)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation; 1.0 for two identical constant inputs, 0.0 when only one is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if np.array_equal(np.asarray(a), np.asarray(b)) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def top_k(scores: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-np.asarray(scores), kind="mergesort")[:k].tolist())


def overlap_at_k(reference: np.ndarray, candidate: np.ndarray, k: int = TOP_K) -> float:
    k = min(k, len(reference))
    return len(top_k(reference, k) & top_k(candidate, k)) / k


def bi_encoder_metrics(cal: Calibration, ref_q: np.ndarray, ref_p: np.ndarray, cand_q: np.ndarray,
                       cand_p: np.ndarray) -> dict[str, float]:
    """Agreement of two sets of query / passage embeddings (passages flattened in calibration order)."""
    ref_all, cand_all = l2_normalize(np.vstack([ref_q, ref_p])), l2_normalize(np.vstack([cand_q, cand_p]))
    cosines = (ref_all * cand_all).sum(axis=1)
    ref_sim = l2_normalize(ref_q) @ l2_normalize(ref_p).T  # [queries, all passages]
    cand_sim = l2_normalize(cand_q) @ l2_normalize(cand_p).T
    overlaps = [overlap_at_k(r, c) for r, c in zip(ref_sim, cand_sim, strict=True)]
    owner = np.repeat(np.arange(len(cal.queries)), [len(p) for p in cal.passages])
    pair_ref = ref_sim[owner, np.arange(len(owner))]
    pair_cand = cand_sim[owner, np.arange(len(owner))]
    metrics = {
        "mean_cosine": float(cosines.mean()), "min_cosine": float(cosines.min()),
        "top10_overlap": float(np.mean(overlaps)), "top10_overlap_min": float(np.min(overlaps)),
        "spearman": spearman(pair_ref, pair_cand),
    }
    metrics.update(_hit_at_1(cal, ref_sim, cand_sim, global_passages=True))
    return metrics


def cross_encoder_metrics(cal: Calibration, ref_scores: np.ndarray, cand_scores: np.ndarray) -> dict[str, float]:
    """Agreement of two score vectors over all calibration pairs (in calibration order)."""
    bounds = np.cumsum([0] + [len(p) for p in cal.passages])
    best_same = [int(np.argmax(ref_scores[a:b]) == np.argmax(cand_scores[a:b])) for a, b in itertools.pairwise(bounds)]
    metrics = {
        "spearman": spearman(ref_scores, cand_scores),
        "top10_overlap": overlap_at_k(ref_scores, cand_scores),
        "top1_agreement": float(np.mean(best_same)),
        "max_abs_diff": float(np.max(np.abs(ref_scores - cand_scores))),
    }
    ref_rows = [ref_scores[a:b] for a, b in itertools.pairwise(bounds)]
    cand_rows = [cand_scores[a:b] for a, b in itertools.pairwise(bounds)]
    metrics.update(_hit_at_1(cal, ref_rows, cand_rows, global_passages=False))
    return metrics


def _hit_at_1(cal: Calibration, ref_rows: np.ndarray | list[np.ndarray], cand_rows: np.ndarray | list[np.ndarray],
              global_passages: bool) -> dict[str, float]:
    """Share of labelled queries whose best-scored passage is labelled relevant (for each model). Row i holds
    query i's scores: over all passages (`global_passages`) or over its own."""
    offsets = np.cumsum([0] + [len(p) for p in cal.passages])
    hits: dict[str, list[bool]] = {"reference": [], "candidate": []}
    for i, labels in enumerate(cal.relevant):
        if not labels:
            continue
        wanted = {int(offsets[i]) + j for j in labels} if global_passages else set(labels)
        for name, rows in (("reference", ref_rows), ("candidate", cand_rows)):
            hits[name].append(int(np.argmax(rows[i])) in wanted)
    if not hits["reference"]:
        return {}
    return {"reference_hit_at_1": float(np.mean(hits["reference"])),
            "candidate_hit_at_1": float(np.mean(hits["candidate"]))}


@dataclass(frozen=True)
class GateSubject:
    """What the gate needs to know about the model being exported."""

    role: str
    tokenizer_path: Path
    max_length: int
    output: str
    pooling: str | None = None
    normalize: bool = False
    positive_label: int = 0


@dataclass(frozen=True)
class ServedEmbeddings:
    """What a bi-encoder serves for the calibration set."""

    queries: np.ndarray   # [queries, dimension]
    passages: np.ndarray  # [all passages, dimension], in calibration order

    @property
    def dimension(self) -> int:
        return int(self.queries.shape[1])


@dataclass(frozen=True)
class ServedScores:
    """What a cross-encoder serves for the calibration pairs."""

    scores: np.ndarray  # raw score of each pair, in calibration order
    dimension: int      # logits per pair


Outputs = ServedEmbeddings | ServedScores


def items(subject: GateSubject, cal: Calibration) -> list[Any]:
    """The calibration inputs of a role: texts (queries, then passages) or (query, passage) pairs."""
    if subject.role == "bi-encoder":
        return list(cal.queries) + [p for ps in cal.passages for p in ps]
    return cal.pairs


@contextlib.contextmanager
def model_errors(path: Path, doing: str) -> Iterator[None]:
    """Any failure of ONNX Runtime on `path` as an ExportError naming the file."""
    try:
        yield
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{path}: {doing}: {exc}") from exc


def open_model(subject: GateSubject, path: Path) -> Embedder | Reranker:
    """The model layer's `Embedder` / `Reranker` on one ONNX file: the class, session options and tokenizer
    handling the server uses."""
    from twostage.model.embedder import Embedder
    from twostage.model.onnx_model import ModelSpec
    from twostage.model.reranker import Reranker

    spec = ModelSpec(Path(path), subject.tokenizer_path, subject.output, subject.max_length,
                     pooling=subject.pooling or "mean", normalize=subject.normalize,
                     positive_label=subject.positive_label)
    with model_errors(path, "ONNX Runtime cannot load the model"):
        return Embedder(spec) if subject.role == "bi-encoder" else Reranker(spec)


def by_query(pairs: Sequence[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """(query, passages) for each run of consecutive pairs with the same query, in order."""
    for query, run in itertools.groupby(pairs, key=lambda pair: pair[0]):
        yield query, [passage for _, passage in run]


def encode(model: Embedder | Reranker, batch: Sequence[Any]) -> list[Encoded]:
    """Model inputs for texts (bi-encoder) or (query, passage) pairs (cross-encoder), cut to max_length as the
    server cuts them."""
    from twostage.model.embedder import Embedder

    if isinstance(model, Embedder):
        return model.encode(batch)
    return [e for query, passages in by_query(batch) for e in model.encode(query, passages)]


def serve(model: Embedder | Reranker, batch: Sequence[Any]) -> np.ndarray:
    """What the server returns for `batch` run as one padded batch: embeddings [n, dim] or raw scores [n]."""
    from twostage.model.embedder import Embedder

    with model_errors(model.spec.model_path, "inference failed"):
        rows = model.run_batch(encode(model, batch))
        return rows if isinstance(model, Embedder) else model.scores(rows).raw


def served_outputs(subject: GateSubject, path: Path, cal: Calibration) -> Outputs:
    """Run one model on the whole calibration set the way the server runs it, BATCH_SIZE inputs at a time."""
    from twostage.model.embedder import Embedder

    model = open_model(subject, path)
    with model_errors(path, "inference failed"):
        if isinstance(model, Embedder):
            return ServedEmbeddings(queries=model.embed(cal.queries, BATCH_SIZE),
                                    passages=model.embed([p for ps in cal.passages for p in ps], BATCH_SIZE))
        logits = model.run_batches(encode(model, cal.pairs), BATCH_SIZE)
        return ServedScores(scores=model.scores(logits).raw, dimension=int(logits.shape[1]))


def compare(cal: Calibration, reference: Outputs, candidate: Outputs) -> dict[str, float]:
    """Agreement figures of two models' outputs (module docstring)."""
    if reference.dimension != candidate.dimension:
        raise ExportError(f"the served model outputs {candidate.dimension} values per input, the reference "
                          f"{reference.dimension}")
    if isinstance(reference, ServedEmbeddings) and isinstance(candidate, ServedEmbeddings):
        return bi_encoder_metrics(cal, reference.queries, reference.passages, candidate.queries, candidate.passages)
    if isinstance(reference, ServedScores) and isinstance(candidate, ServedScores):
        return cross_encoder_metrics(cal, reference.scores, candidate.scores)
    raise ExportError("cannot compare a bi-encoder's outputs with a cross-encoder's")


def measure(subject: GateSubject, reference: Path, candidate: Path, cal: Calibration) -> tuple[dict[str, float], int]:
    """Run both models on the calibration set. Returns (figures, served dimension)."""
    served = served_outputs(subject, candidate, cal)
    return compare(cal, served_outputs(subject, reference, cal), served), served.dimension


def difference(subject: GateSubject, a: np.ndarray, b: np.ndarray) -> float:
    """How far two served outputs are apart: largest raw-score difference (cross-encoder) or largest cosine
    distance 1 - cos (bi-encoder)."""
    if subject.role == "bi-encoder":
        return float(np.max(1.0 - (l2_normalize(a) * l2_normalize(b)).sum(axis=1)))
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def mixed_lengths(model: Embedder | Reranker, subject: GateSubject, cal: Calibration, count: int) -> list[Any]:
    """`count` calibration inputs spread from the shortest to the longest (in tokens, as `model` encodes them)."""
    pool = items(subject, cal)
    lengths = [len(e) for e in encode(model, pool)]
    order = np.argsort(lengths, kind="mergesort")
    picks = sorted({int(order[int(round(i))]) for i in np.linspace(0, len(pool) - 1, count)})
    rng = np.random.default_rng(0)  # mixed order, so that short rows sit next to long ones in the batch
    return [pool[i] for i in rng.permutation(picks)]


def batch_variation(subject: GateSubject, path: Path, cal: Calibration, count: int = 16) -> float:
    """How much a row's served output changes between scoring it alone and inside one padded batch of `count`
    calibration inputs of mixed lengths (see `difference`)."""
    model = open_model(subject, path)
    batch = mixed_lengths(model, subject, cal, count)
    together = serve(model, batch)
    alone = np.concatenate([serve(model, [item]) for item in batch])
    return difference(subject, alone, together)


def agreement(subject: GateSubject, a: Path, b: Path, cal: Calibration, count: int = 32) -> float:
    """`difference` between two models on `count` calibration inputs of mixed lengths, in one batch."""
    model_a, model_b = open_model(subject, a), open_model(subject, b)
    batch = mixed_lengths(model_a, subject, cal, count)
    return difference(subject, serve(model_a, batch), serve(model_b, batch))


def calibration_inputs(subject: GateSubject, cal: Calibration, input_names: list[str], batch_size: int = 16,
                       long_inputs: int = 8) -> list[dict[str, np.ndarray]]:
    """Model feeds (int64, the graph's `input_names`) for activation calibration: every calibration input in
    batches, plus `long_inputs` inputs built by joining one query's passages (cut at max_length), so that the
    activation ranges also cover long inputs and late positions. Tokenized and padded by the model layer, as
    the server does; no session is needed."""
    from twostage.model.onnx_model import KNOWN_INPUTS, model_feeds, pad_batch
    from twostage.model.tokenization import ModelTokenizer, encode_pairs, encode_texts

    tokenizer = ModelTokenizer.from_file(subject.tokenizer_path)
    int64 = {name: np.int64 for name in input_names if name in KNOWN_INPUTS}

    def feeds(batch: list[Any]) -> dict[str, np.ndarray]:
        if subject.role == "bi-encoder":
            encoded = encode_texts(tokenizer, batch, subject.max_length)
        else:
            encoded = [e for query, passages in by_query(batch)
                       for e in encode_pairs(tokenizer, query, passages, subject.max_length)]
        return model_feeds(pad_batch(encoded, tokenizer.pad_id), int64)

    pool = items(subject, cal)
    joined = [" ".join(ps) for ps in cal.passages[:long_inputs]]
    long = joined if subject.role == "bi-encoder" else list(zip(cal.queries[:long_inputs], joined, strict=True))
    return ([feeds(pool[i:i + batch_size]) for i in range(0, len(pool), batch_size)]
            + [feeds(long[i:i + 4]) for i in range(0, len(long), 4)])


def evaluate(role: str, figures: dict[str, float], thresholds: Thresholds) -> list[str]:
    """The failed checks, each as 'metric value < threshold_name threshold'."""
    limits = asdict(thresholds)
    failures = []
    for metric, limit_name in CHECKED_METRICS[role].items():
        if metric not in figures:
            continue
        value, limit = figures[metric], limits[limit_name]
        if limit_name.startswith("max_"):
            if not value <= limit:
                failures.append(f"{metric} {value:.3g} > {limit_name.replace('_', '-')} {limit}")
        elif not value >= limit:
            failures.append(f"{metric} {value:.4f} < {limit_name.replace('_', '-')} {limit}")
    return failures


def gate_record(role: str, reference_name: str, candidate_name: str, cal: Calibration, figures: dict[str, float],
                thresholds: Thresholds) -> dict[str, Any]:
    failures = evaluate(role, figures, thresholds)
    return {
        "passed": not failures, "reference": reference_name, "candidate": candidate_name,
        "calibration": cal.record(), "pairs": len(cal.pairs),
        "metrics": {k: (float(f"{v:.4g}") if k == "batch_variation" else round(v, 6)) for k, v in figures.items()},
        "thresholds": asdict(thresholds), "checked": dict(CHECKED_METRICS[role]), "failures": failures,
    }


def format_figures(figures: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" if k == "batch_variation" else f"{k} {v:.4f}" for k, v in figures.items())
