"""Turning request text into model inputs: single texts (bi-encoder) and query/document pairs (cross-encoder).

The fast tokenizer is loaded from the model directory's tokenizer.json with its own padding and truncation
switched off (exported tokenizers often carry a fixed 512-token padding); `pad_batch` pads each batch to its
longest member instead, and truncation is decided here, per field, so that the response can say what was cut.

Special tokens are not hard-coded: `ModelTokenizer` probes the tokenizer's post-processor once (encoding a
tiny single text and a tiny pair) and records the layout, e.g. ``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]``
with their type ids. Texts are then tokenized without specials in one `encode_batch` call and the ids are
assembled around the recorded layout, which is both fast and exact.

Pair truncation policy (``truncate=True``):

1. the query is cut to ``max_query_tokens`` and the document to ``max_doc_tokens`` when those caps are set;
2. if the pair still exceeds ``max_length``, the document is cut first, but a query may not take more than
   half of the pair budget while the document needs it; a longer query is cut to what is left.

With ``truncate=False`` any cut raises `InvalidArgument` naming the field, its token count and the limit.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer

from twostage.model.errors import InvalidArgument

# One slot of a special-token layout: ("special", token_id, type_id) or ("sequence", 0|1, type_id).
Slot = tuple[str, int, int]


@dataclass(frozen=True, eq=False)
class Encoded:
    """One model input row: token ids with specials, their type ids, and whether content was cut."""

    ids: np.ndarray
    type_ids: np.ndarray
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)


def padded_tokens(items: Sequence[Encoded]) -> int:
    """Tokens a batch costs once padded to its longest member: count x longest length."""
    return len(items) * max((len(e) for e in items), default=0)


class ModelTokenizer:
    """A fast tokenizer with padding/truncation disabled and its special-token layout probed once."""

    def __init__(self, tokenizer: Tokenizer, source: str = "<tokenizer>"):
        padding = tokenizer.padding  # read the pad id before switching padding off
        self.pad_id = padding["pad_id"] if padding else _pad_id_by_name(tokenizer)
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.source = source
        self.single_layout = _probe_layout(tokenizer, pair=False, source=source)
        self.pair_layout = _probe_layout(tokenizer, pair=True, source=source)
        self.single_specials = sum(1 for kind, _, _ in self.single_layout if kind == "special")
        self.pair_specials = sum(1 for kind, _, _ in self.pair_layout if kind == "special")

    @classmethod
    def from_file(cls, path: str | Path) -> ModelTokenizer:
        return cls(Tokenizer.from_file(str(path)), source=str(path))

    def tokens(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens, in one batched call."""
        if isinstance(texts, str):
            raise TypeError("expected a sequence of texts, got one str")
        if not texts:
            return []
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def assemble(self, first: Sequence[int], second: Sequence[int] | None = None, truncated: bool = False) -> Encoded:
        """Place content ids into the single (second is None) or pair layout."""
        layout = self.single_layout if second is None else self.pair_layout
        ids: list[int] = []
        type_ids: list[int] = []
        parts = (first,) if second is None else (first, second)  # indexed by a "sequence" slot's value
        for kind, value, type_id in layout:
            if kind == "special":
                ids.append(value)
                type_ids.append(type_id)
            else:
                part = parts[value]
                ids.extend(part)
                type_ids.extend([type_id] * len(part))
        return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(type_ids, dtype=np.int64), truncated)


def _probe_layout(tokenizer: Tokenizer, pair: bool, source: str) -> list[Slot]:
    """Encode a tiny text (pair) with specials and read where specials and content land."""
    texts = ("a", "b") if pair else ("a",)
    enc = tokenizer.encode(*texts, add_special_tokens=True)
    layout: list[Slot] = []
    for token_id, type_id, seq, special in zip(enc.ids, enc.type_ids, enc.sequence_ids, enc.special_tokens_mask,
                                               strict=True):
        if special or seq is None:
            layout.append(("special", token_id, type_id))
        elif not (layout and layout[-1][0] == "sequence" and layout[-1][1] == seq):
            layout.append(("sequence", seq, type_id))
    wanted = {0, 1} if pair else {0}
    found = {value for kind, value, _ in layout if kind == "sequence"}
    if found != wanted:
        raise ValueError(f"{source}: cannot read the {'pair' if pair else 'single'} special-token layout "
                         f"(probe gave ids {enc.ids})")
    return layout


def _pad_id_by_name(tokenizer: Tokenizer) -> int:
    for token in ("[PAD]", "<pad>", "<PAD>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0


def encode_texts(tokenizer: ModelTokenizer, texts: Sequence[str], max_tokens: int, *, truncate: bool = True,
                 field: str = "texts") -> list[Encoded]:
    """Single texts with specials, each at most `max_tokens` tokens including the specials."""
    budget = max_tokens - tokenizer.single_specials
    if budget < 1:
        raise ValueError(f"max_tokens={max_tokens} leaves no room beside {tokenizer.single_specials} special tokens")
    out = []
    for i, ids in enumerate(tokenizer.tokens(texts)):
        cut = len(ids) > budget
        if cut and not truncate:
            raise InvalidArgument(f"{field}[{i}]", f"has {len(ids) + tokenizer.single_specials} tokens with special "
                                  f"tokens; the model takes at most {max_tokens} and truncation is NONE")
        out.append(tokenizer.assemble(ids[:budget], truncated=cut))
    return out


def _cap_query(tokenizer: ModelTokenizer, query: str, max_length: int, max_query_tokens: int, truncate: bool,
               query_field: str) -> tuple[list[int], bool]:
    """Query ids cut to the per-request cap (or refused when truncation is off)."""
    if max_length - tokenizer.pair_specials < 2:
        raise ValueError(f"max_length={max_length} leaves no room for a pair beside {tokenizer.pair_specials} specials")
    ids = tokenizer.tokens([query])[0]
    if max_query_tokens and len(ids) > max_query_tokens:
        if not truncate:
            raise InvalidArgument(query_field, f"has {len(ids)} tokens; max_query_tokens={max_query_tokens} "
                                  "and truncation is NONE")
        return ids[:max_query_tokens], True
    return ids, False


def encode_pairs(tokenizer: ModelTokenizer, query: str, docs: Sequence[str], max_length: int,
                 max_query_tokens: int = 0, max_doc_tokens: int = 0, truncate: bool = True, *,
                 query_field: str = "query", doc_field: str = "texts") -> list[Encoded]:
    """(query, document) pairs laid out as [CLS] q [SEP] d [SEP], cut to `max_length` per the module policy."""
    q_ids, q_cut = _cap_query(tokenizer, query, max_length, max_query_tokens, truncate, query_field)
    budget = max_length - tokenizer.pair_specials
    out = []
    for i, d_ids in enumerate(tokenizer.tokens(docs)):
        d_cut = False
        if max_doc_tokens and len(d_ids) > max_doc_tokens:
            if not truncate:
                raise InvalidArgument(f"{doc_field}[{i}]", f"has {len(d_ids)} tokens; max_document_tokens="
                                      f"{max_doc_tokens} and truncation is NONE")
            d_ids, d_cut = d_ids[:max_doc_tokens], True
        q_part, pair_q_cut = q_ids, False
        if len(q_part) + len(d_ids) > budget:
            if not truncate:
                pair_tokens = len(q_part) + len(d_ids) + tokenizer.pair_specials
                raise InvalidArgument(f"{doc_field}[{i}]", f"pair with the query has {pair_tokens} tokens; the model "
                                      f"takes at most {max_length} and truncation is NONE")
            query_room = budget - min(len(d_ids), budget // 2)
            if len(q_part) > query_room:
                q_part, pair_q_cut = q_part[:query_room], True
            d_ids, d_cut = d_ids[:budget - len(q_part)], True
        out.append(tokenizer.assemble(q_part, d_ids, truncated=q_cut or pair_q_cut or d_cut))
    return out


class ChunkedPairs(NamedTuple):
    """Long-document mode: one Encoded per chunk, and for each chunk the index of its document."""

    pairs: list[Encoded]
    doc_of_chunk: list[int]

    def chunks_per_document(self, n_docs: int) -> list[int]:
        counts = [0] * n_docs
        for d in self.doc_of_chunk:
            counts[d] += 1
        return counts


def chunk_windows(n_tokens: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token windows of at most `window` covering n_tokens, consecutive ones sharing `overlap`."""
    if window < 1:
        raise ValueError(f"chunk window must be >= 1 token (got {window})")
    overlap = max(0, min(overlap, window - 1))
    if n_tokens <= window:
        return [(0, n_tokens)]
    step = window - overlap
    starts = list(range(0, n_tokens - window, step)) + [n_tokens - window]
    return [(s, s + window) for s in starts]


def chunk_document_pairs(tokenizer: ModelTokenizer, query: str, docs: Sequence[str], max_length: int,
                         overlap: int = 0, max_query_tokens: int = 0, max_doc_tokens: int = 0,
                         truncate: bool = True, *, query_field: str = "query") -> ChunkedPairs:
    """Split each document into token windows that fit the pair budget beside the query, consecutive windows
    sharing `overlap` tokens. Returns (pairs, doc_of_chunk); unpacks as a tuple.

    The query is capped as in `encode_pairs` and may take at most half of the pair budget (cut beyond it,
    marking every pair truncated). `max_doc_tokens`, when set, bounds each chunk's window instead of cutting the
    document: no document content is dropped in this mode. The last window is aligned to the document end, so
    it may overlap its predecessor by more than `overlap`.
    """
    q_ids, q_cut = _cap_query(tokenizer, query, max_length, max_query_tokens, truncate, query_field)
    budget = max_length - tokenizer.pair_specials
    if len(q_ids) > budget // 2:
        if not truncate:
            raise InvalidArgument(query_field, f"has {len(q_ids)} tokens; long-document mode lets the query take "
                                  f"at most {budget // 2} of the {max_length}-token pair and truncation is NONE")
        q_ids, q_cut = q_ids[:budget // 2], True
    window = budget - len(q_ids)
    if max_doc_tokens:
        window = min(window, max_doc_tokens)
    pairs: list[Encoded] = []
    doc_of_chunk: list[int] = []
    for i, d_ids in enumerate(tokenizer.tokens(docs)):
        for start, end in chunk_windows(len(d_ids), window, overlap):
            pairs.append(tokenizer.assemble(q_ids, d_ids[start:end], truncated=q_cut))
            doc_of_chunk.append(i)
    return ChunkedPairs(pairs, doc_of_chunk)
