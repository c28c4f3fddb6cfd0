"""How model outputs become embeddings and scores: pooling and L2 normalization for the bi-encoder, the positive
label's raw logit and its sigmoid / softmax probability for the cross-encoder. `Embedder` and `Reranker` apply
them, for the server and the export's gate alike, so that the figures the gate records describe exactly what is
served. numpy only."""
from __future__ import annotations

import numpy as np

POOLING_MODES = ("mean", "cls", "max")


def pool(hidden: np.ndarray, attention_mask: np.ndarray, mode: str) -> np.ndarray:
    """Token embeddings [batch, seq, dim] + mask [batch, seq] -> sentence embeddings [batch, dim] (float32)."""
    hidden = hidden.astype(np.float32, copy=False)
    if mode == "cls":
        return hidden[:, 0, :].copy()
    mask = attention_mask.astype(np.float32)[:, :, None]
    if mode == "mean":
        summed = (hidden * mask).sum(axis=1)
        counts = np.clip(mask.sum(axis=1), 1e-9, None)
        return summed / counts
    if mode == "max":
        masked = np.where(mask > 0, hidden, -np.inf)
        out = masked.max(axis=1)
        return np.where(np.isfinite(out), out, 0.0).astype(np.float32)
    raise ValueError(f"pooling mode {mode!r} not one of {POOLING_MODES}")


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.clip(norms, 1e-12, None)).astype(np.float32)


def embeddings_from_hidden(hidden: np.ndarray, attention_mask: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    """Token embeddings -> sentence embeddings [batch, dim] (float32), pooled and optionally L2-normalized."""
    vectors = pool(hidden, attention_mask, pooling)
    return l2_normalize(vectors) if normalize else vectors.astype(np.float32)


def raw_scores(logits: np.ndarray, positive_label: int = 0) -> np.ndarray:
    """Cross-encoder logits [batch, labels] (or [batch]) -> one raw score per pair."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim == 1:
        return logits
    if logits.shape[1] == 1:
        return logits[:, 0]
    return logits[:, positive_label]


def normalized_scores(logits: np.ndarray, positive_label: int = 0) -> np.ndarray:
    """Sigmoid of the single logit, or softmax probability of the positive label for multi-label heads."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim == 1 or logits.shape[1] == 1:
        return sigmoid(logits.reshape(-1))
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    return probs[:, positive_label].astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, computed in float64 and returned as float32."""
    return (1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))).astype(np.float32)
