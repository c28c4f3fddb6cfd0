"""The cross-encoder: (query, document) pairs -> raw and normalized scores with the manifest's positive label, and
in long-document mode each document's best chunk."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from twostage.model.onnx_model import OnnxModel
from twostage.model.postprocess import normalized_scores, raw_scores
from twostage.model.tokenization import ChunkedPairs, Encoded, chunk_document_pairs, encode_pairs


@dataclass(frozen=True)
class PairScores:
    """One score per pair: the positive label's logit, and its sigmoid (one logit) or softmax probability."""

    raw: np.ndarray         # float32 [pairs]
    normalized: np.ndarray  # float32 [pairs]


@dataclass(frozen=True)
class DocumentScores:
    """One score per document: that of its best chunk (the only chunk outside long-document mode)."""

    raw: np.ndarray          # float32 [documents]
    normalized: np.ndarray   # float32 [documents]
    chunks: list[int]        # chunks scored per document
    best_chunk: list[int]    # index of the best chunk within its document
    truncated: list[bool]    # whether any of the document's pairs lost content


def best_chunks(scores: PairScores, pairs: Sequence[Encoded], doc_of_pair: Sequence[int],
                documents: int) -> DocumentScores:
    """Each document's best pair, chosen on the normalized score (for a single-logit model the same order as the
    raw logit); ties go to the earlier chunk."""
    best_raw = np.full(documents, -np.inf, dtype=np.float32)
    best_norm = np.full(documents, -np.inf, dtype=np.float32)
    best_chunk = [0] * documents
    chunks = [0] * documents
    truncated = [False] * documents
    for j, d in enumerate(doc_of_pair):
        if chunks[d] == 0 or scores.normalized[j] > best_norm[d]:
            best_norm[d] = scores.normalized[j]
            best_raw[d] = scores.raw[j]
            best_chunk[d] = chunks[d]
        chunks[d] += 1
        truncated[d] = truncated[d] or bool(pairs[j].truncated)
    return DocumentScores(best_raw, best_norm, chunks, best_chunk, truncated)


class Reranker(OnnxModel):
    """(query, document) pairs -> logits [n, labels] (`run_batch`, what the server's batcher calls) -> scores
    (`scores`). `encode` cuts each pair to max_length; `encode_chunks` splits long documents into windows."""

    role = "cross-encoder"

    @property
    def positive_label(self) -> int:
        return self.spec.positive_label

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.get("labels") or [])

    def encode(self, query: str, docs: Sequence[str], *, max_query_tokens: int = 0, max_doc_tokens: int = 0,
               truncate: bool = True, query_field: str = "query", doc_field: str = "texts") -> list[Encoded]:
        """One pair per document, cut to max_length (policy: twostage.model.tokenization)."""
        return encode_pairs(self.tokenizer, query, docs, self.max_length, max_query_tokens=max_query_tokens,
                            max_doc_tokens=max_doc_tokens, truncate=truncate, query_field=query_field,
                            doc_field=doc_field)

    def encode_chunks(self, query: str, docs: Sequence[str], *, overlap: int = 0, max_query_tokens: int = 0,
                      max_doc_tokens: int = 0) -> ChunkedPairs:
        """Long-document mode: every document as overlapping windows beside the query, nothing dropped."""
        return chunk_document_pairs(self.tokenizer, query, docs, self.max_length, overlap=overlap,
                                    max_query_tokens=max_query_tokens, max_doc_tokens=max_doc_tokens)

    def scores(self, logits: np.ndarray) -> PairScores:
        """Raw and normalized score of each row of `run_batch` output."""
        return PairScores(raw_scores(logits, self.positive_label), normalized_scores(logits, self.positive_label))

    def score(self, query: str, docs: Sequence[str], batch_size: int = 32) -> PairScores:
        """Scores of (query, doc) pairs cut to max_length, run `batch_size` pairs at a time in document order."""
        return self.scores(self.run_batches(self.encode(query, docs), batch_size))

    def postprocess(self, output: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        logits = output.astype(np.float32, copy=False)
        return logits[:, None] if logits.ndim == 1 else logits

    def warm_up_batch(self) -> list[Encoded]:
        return self.encode("warm up query", ["a warm up passage", "another, longer warm up passage to pad"])
