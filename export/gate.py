"""The accuracy gate: run the reference model (fp32, or the source ONNX) and the model to be served on a
calibration set and measure how closely they agree.

Figures, all computed on what the server computes (postprocess.embeddings_from_hidden / raw_scores):

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

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError
from .manifest import sha256_file
from .modelinfo import read_json
from .onnx_ops import inference_session
from .postprocess import embeddings_from_hidden, l2_normalize, raw_scores

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
        return [(q, p) for q, ps in zip(self.queries, self.passages) for p in ps]

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


def load_tokenizer(tokenizer_path: Path, max_length: int) -> Any:
    """A `tokenizers` tokenizer that truncates at max_length and pads to the longest in the batch,
    whatever padding/truncation the file has baked in."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    padding = tokenizer.padding
    pad_id, pad_token = (padding["pad_id"], padding["pad_token"]) if padding else (None, None)
    if pad_token is None:
        config = read_json(Path(tokenizer_path).with_name("tokenizer_config.json")) or {}
        configured = config.get("pad_token")
        if isinstance(configured, dict):
            configured = configured.get("content")
        for candidate in (configured, "[PAD]", "<pad>"):
            if isinstance(candidate, str) and tokenizer.token_to_id(candidate) is not None:
                pad_id, pad_token = tokenizer.token_to_id(candidate), candidate
                break
        else:
            pad_id, pad_token = 0, tokenizer.id_to_token(0) or "[PAD]"
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def encode(tokenizer: Any, batch: list[Any], input_names: list[str]) -> dict[str, np.ndarray]:
    """Feeds for one batch of texts (or (query, passage) pairs)."""
    encodings = tokenizer.encode_batch(batch)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}
    if "token_type_ids" in input_names:
        feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
    if "position_ids" in input_names:
        feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
    return feeds


class OnnxModel:
    """One ONNX file run the way the server runs it."""

    def __init__(self, path: Path, output: str):
        self.path = Path(path)
        self.session = inference_session(path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output = output

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        try:
            return self.session.run([self.output], {k: v for k, v in feeds.items() if k in self.input_names})[0]
        except Exception as exc:
            raise ExportError(f"{self.path}: inference failed: {exc}") from exc

    def embed(self, tokenizer: Any, texts: list[str], pooling: str, normalize: bool) -> np.ndarray:
        out = []
        for start in range(0, len(texts), BATCH_SIZE):
            feeds = encode(tokenizer, texts[start:start + BATCH_SIZE], self.input_names)
            hidden = self._run(feeds)
            if hidden.ndim != 3:
                raise ExportError(f"{self.path}: output {self.output} has shape {hidden.shape}, expected "
                                  "[batch, sequence, hidden]")
            out.append(embeddings_from_hidden(hidden, feeds["attention_mask"], pooling, normalize))
        return np.concatenate(out)

    def logits(self, tokenizer: Any, pairs: list[tuple[str, str]]) -> np.ndarray:
        out = []
        for start in range(0, len(pairs), BATCH_SIZE):
            logits = np.asarray(self._run(encode(tokenizer, pairs[start:start + BATCH_SIZE], self.input_names)))
            out.append(logits.reshape(logits.shape[0], -1))
        return np.concatenate(out).astype(np.float32)


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
    overlaps = [overlap_at_k(r, c) for r, c in zip(ref_sim, cand_sim)]
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
    best_same = [int(np.argmax(ref_scores[a:b]) == np.argmax(cand_scores[a:b])) for a, b in zip(bounds, bounds[1:])]
    metrics = {
        "spearman": spearman(ref_scores, cand_scores),
        "top10_overlap": overlap_at_k(ref_scores, cand_scores),
        "top1_agreement": float(np.mean(best_same)),
        "max_abs_diff": float(np.max(np.abs(ref_scores - cand_scores))),
    }
    ref_rows = [ref_scores[a:b] for a, b in zip(bounds, bounds[1:])]
    cand_rows = [cand_scores[a:b] for a, b in zip(bounds, bounds[1:])]
    metrics.update(_hit_at_1(cal, ref_rows, cand_rows, global_passages=False))
    return metrics


def _hit_at_1(cal: Calibration, ref_rows: Any, cand_rows: Any, global_passages: bool) -> dict[str, float]:
    """Share of labelled queries whose best-scored passage is labelled relevant (for each model)."""
    offsets = np.cumsum([0] + [len(p) for p in cal.passages])
    hits = {"reference": [], "candidate": []}
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
class Outputs:
    """What one model serves for the calibration set: embeddings (queries, then passages) or raw scores."""

    role: str
    queries: np.ndarray | None = None
    passages: np.ndarray | None = None
    scores: np.ndarray | None = None
    dimension: int = 0


def items(subject: GateSubject, cal: Calibration) -> list[Any]:
    """The calibration inputs of a role: texts (queries, then passages) or (query, passage) pairs."""
    if subject.role == "bi-encoder":
        return list(cal.queries) + [p for ps in cal.passages for p in ps]
    return cal.pairs


def serve(model: OnnxModel, subject: GateSubject, tokenizer: Any, batch: list[Any]) -> np.ndarray:
    """What the server returns for a batch: embeddings [n, dim] or raw scores [n]."""
    if subject.role == "bi-encoder":
        return model.embed(tokenizer, batch, subject.pooling or "mean", subject.normalize)
    return raw_scores(model.logits(tokenizer, batch), subject.positive_label)


def served_outputs(subject: GateSubject, path: Path, cal: Calibration) -> Outputs:
    """Run one model on the whole calibration set the way the server runs it."""
    tokenizer = load_tokenizer(subject.tokenizer_path, subject.max_length)
    model = OnnxModel(path, subject.output)
    if subject.role == "bi-encoder":
        flat = [p for ps in cal.passages for p in ps]
        queries = model.embed(tokenizer, cal.queries, subject.pooling or "mean", subject.normalize)
        passages = model.embed(tokenizer, flat, subject.pooling or "mean", subject.normalize)
        return Outputs(subject.role, queries=queries, passages=passages, dimension=int(queries.shape[1]))
    logits = model.logits(tokenizer, cal.pairs)
    return Outputs(subject.role, scores=raw_scores(logits, subject.positive_label), dimension=int(logits.shape[1]))


def compare(cal: Calibration, reference: Outputs, candidate: Outputs) -> dict[str, float]:
    """Agreement figures of two models' outputs (module docstring)."""
    if reference.dimension != candidate.dimension:
        raise ExportError(f"the served model outputs {candidate.dimension} values per input, the reference "
                          f"{reference.dimension}")
    if reference.role == "bi-encoder":
        return bi_encoder_metrics(cal, reference.queries, reference.passages, candidate.queries, candidate.passages)
    return cross_encoder_metrics(cal, reference.scores, candidate.scores)


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


def mixed_lengths(subject: GateSubject, cal: Calibration, count: int) -> list[Any]:
    """`count` calibration inputs spread from the shortest to the longest (in tokens)."""
    tokenizer = load_tokenizer(subject.tokenizer_path, subject.max_length)
    pool = items(subject, cal)
    lengths = [len(e.ids) for e in tokenizer.encode_batch(pool)]
    order = np.argsort(lengths, kind="mergesort")
    picks = sorted({int(order[int(round(i))]) for i in np.linspace(0, len(pool) - 1, count)})
    rng = np.random.default_rng(0)  # mixed order, so that short rows sit next to long ones in the batch
    return [pool[i] for i in rng.permutation(picks)]


def batch_variation(subject: GateSubject, path: Path, cal: Calibration, count: int = 16) -> float:
    """How much a row's served output changes between scoring it alone and inside one padded batch of `count`
    calibration inputs of mixed lengths (see `difference`)."""
    tokenizer = load_tokenizer(subject.tokenizer_path, subject.max_length)
    model = OnnxModel(path, subject.output)
    batch = mixed_lengths(subject, cal, count)
    together = serve(model, subject, tokenizer, batch)
    alone = np.concatenate([serve(model, subject, tokenizer, [item]) for item in batch])
    return difference(subject, alone, together)


def agreement(subject: GateSubject, a: Path, b: Path, cal: Calibration, count: int = 32) -> float:
    """`difference` between two models on `count` calibration inputs of mixed lengths, in one batch."""
    tokenizer = load_tokenizer(subject.tokenizer_path, subject.max_length)
    batch = mixed_lengths(subject, cal, count)
    return difference(subject, serve(OnnxModel(a, subject.output), subject, tokenizer, batch),
                      serve(OnnxModel(b, subject.output), subject, tokenizer, batch))


def calibration_inputs(subject: GateSubject, cal: Calibration, input_names: list[str], batch_size: int = 16,
                       long_inputs: int = 8) -> list[dict[str, np.ndarray]]:
    """Model feeds for activation calibration: every calibration input in batches, plus `long_inputs` inputs
    built by joining one query's passages (cut at max_length), so that the activation ranges also cover long
    inputs and late positions."""
    tokenizer = load_tokenizer(subject.tokenizer_path, subject.max_length)
    pool = items(subject, cal)
    joined = [" ".join(ps) for ps in cal.passages[:long_inputs]]
    long = joined if subject.role == "bi-encoder" else list(zip(cal.queries[:long_inputs], joined))
    feeds = [encode(tokenizer, pool[i:i + batch_size], input_names) for i in range(0, len(pool), batch_size)]
    feeds += [encode(tokenizer, long[i:i + 4], input_names) for i in range(0, len(long), 4)]
    return feeds


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
