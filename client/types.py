"""What the typed client hands out and takes in: plain frozen dataclasses and the per-call options.

No protobuf here (client/convert.py maps these to and from the generated messages) and no transport
(client/channel.py), so that the CLI's output code can import the types without a channel.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeAlias, TypedDict

import grpc

JsonValue: TypeAlias = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]
JsonObject: TypeAlias = dict[str, JsonValue]


class TwoStageError(Exception):
    """A failed call: the gRPC status code and the server's (or the client's) message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")


# ----------------------------------------------------------------------------------- call options


class SearchOptions(TypedDict, total=False):
    """Keyword options of `search` (proto SearchRequest; 0 / False / None = the server's default)."""

    top_k: int
    candidates: int
    skip_rerank: bool
    filter: JsonObject | None
    ids_only: bool
    rerank_budget_ms: int  # deprecated alias of latency_budget_ms
    raw_scores: bool
    max_query_tokens: int
    max_document_tokens: int
    expansion_search: int
    retrieval_mode: str  # "dense", "lexical" or "hybrid" ("" = server default)
    fusion: str  # "convex" or "rrf" ("" = server default)
    fusion_weight: float | None  # convex fusion: weight of the dense list (None = server default)
    rerank_weight: float | None  # weight of the cross-encoder in the final score (None = server default)
    latency_budget_ms: int  # whole-request budget (0 = server default)


class RerankOptions(TypedDict, total=False):
    """Keyword options of `rerank` (proto RerankRequest; truncate=False refuses over-long pairs)."""

    document_ids: list[str] | tuple[str, ...] | None
    top_n: int
    return_documents: bool
    raw_scores: bool
    truncate: bool
    max_query_tokens: int
    max_document_tokens: int
    chunk_long_documents: bool
    chunk_overlap_tokens: int
    latency_budget_ms: int  # whole-request budget (0 = server default)
    first_stage_scores: list[float] | tuple[float, ...] | None  # fused with the cross-encoder when given
    rerank_weight: float | None  # cross-encoder weight for that fusion (None = server default)


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Document:
    """A stored document. `metadata` is a JSON object; `embedding` is only sent by Upsert."""

    id: str
    text: str = ""
    title: str = ""
    metadata: JsonObject = field(default_factory=dict)
    embedding: tuple[float, ...] = ()


@dataclass(frozen=True)
class StageTiming:
    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    inference_ms: float = 0.0
    batches: int = 0
    items: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Timing:
    """Where the server spent the time of one request (milliseconds)."""

    total_ms: float = 0.0
    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    inference_ms: float = 0.0
    embed: StageTiming = StageTiming()
    ann_ms: float = 0.0
    rerank: StageTiming = StageTiming()
    store_ms: float = 0.0
    lexical_ms: float = 0.0


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
    rerank_score: float
    retrieval_score: float
    reranked: bool
    retrieval_rank: int  # 0-based position in the stage-1 candidate list (as in the proto)
    document: Document | None  # None when ids_only
    dense_score: float = 0.0
    lexical_score: float = 0.0
    dense_rank: int = -1  # 0-based; -1 = not in the dense list
    lexical_rank: int = -1  # 0-based; -1 = not in the lexical list


@dataclass(frozen=True)
class SearchResult:
    hits: tuple[SearchHit, ...]
    score_kind: str  # "normalized", "raw" or "similarity"
    candidates: int
    reranked: int
    filter_exhausted: bool
    timing: Timing
    retrieval_mode: str = ""  # "dense", "lexical" or "hybrid"
    budget_limited: bool = False
    rerank_weight: float = 0.0
    latency_budget_ms: int = 0


@dataclass(frozen=True)
class RerankResult:
    index: int  # 0-based position of the document in the request
    score: float
    id: str
    text: str
    chunks: int
    best_chunk: int  # 0-based
    truncated: bool
    scored: bool = True  # False: left out by the latency budget


@dataclass(frozen=True)
class RerankResults:
    results: tuple[RerankResult, ...]
    score_kind: str
    timing: Timing
    scored: int = 0
    budget_limited: bool = False
    latency_budget_ms: int = 0


@dataclass(frozen=True)
class EmbedResult:
    embeddings: tuple[tuple[float, ...], ...]
    dimension: int
    normalized: bool
    timing: Timing


@dataclass(frozen=True)
class UpsertResult:
    inserted: int
    updated: int
    index_size: int
    timing: Timing


@dataclass(frozen=True)
class DeleteResult:
    deleted: int
    not_found: tuple[str, ...]
    index_size: int
    timing: Timing


@dataclass(frozen=True)
class ModelInfo:
    role: str = ""
    name: str = ""
    source: str = ""
    revision: str = ""
    max_length: int = 0
    dimension: int = 0
    pooling: str = ""
    normalize: bool = False
    quantization: str = ""
    sha256: str = ""
    providers: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchingInfo:
    enabled: bool = False
    max_batch_tokens: int = 0
    max_batch_size: int = 0
    max_delay_ms: float = 0.0
    max_queued_tokens: int = 0


@dataclass(frozen=True)
class IndexInfo:
    size: int = 0
    dimension: int = 0
    metric: str = ""
    dtype: str = ""
    connectivity: int = 0
    expansion_add: int = 0
    expansion_search: int = 0
    read_only: bool = False
    backend: str = ""  # "embedded" (usearch + SQLite) or "milvus"
    collection: str = ""  # the Milvus collection (milvus backend only)


@dataclass(frozen=True)
class Limits:
    max_query_bytes: int = 0
    max_text_bytes: int = 0
    max_id_bytes: int = 0
    max_rerank_documents: int = 0
    max_embed_texts: int = 0
    max_upsert_documents: int = 0
    max_top_k: int = 0
    max_candidates: int = 0
    max_message_bytes: int = 0
    max_concurrent_rpcs: int = 0
    max_metadata_bytes: int = 0
    max_filter_keys: int = 0


@dataclass(frozen=True)
class Defaults:
    top_k: int = 0
    candidates: int = 0
    chunk_overlap_tokens: int = 0
    latency_budget_ms: int = 0
    retrieval_mode: str = ""
    fusion: str = ""
    fusion_weight: float = 0.0
    rerank_weight: float = 0.0  # negative = query-adaptive


@dataclass(frozen=True)
class Info:
    server_version: str
    bi_encoder: ModelInfo
    cross_encoder: ModelInfo
    embed_batching: BatchingInfo
    rerank_batching: BatchingInfo
    index: IndexInfo
    limits: Limits
    defaults: Defaults


def to_jsonable(value: object, *, omit_empty: bool = False) -> JsonValue:
    """A result dataclass (or tuple/list of them) as plain JSON-ready dicts and lists.

    omit_empty=True leaves out dataclass fields that hold nothing (an empty string or tuple, or None,
    or an empty metadata dict): what the server did not send because it was not asked for, such as a
    Search hit's `embedding` or a Rerank result's `text` without return_documents. Numbers and booleans
    are always kept (0 and false are answers), and so is everything inside a metadata object."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: JsonObject = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if omit_empty and (item is None or (isinstance(item, (str, tuple, dict)) and not item)):
                continue
            out[f.name] = to_jsonable(item, omit_empty=omit_empty)
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, omit_empty=omit_empty) for v in value]
    if isinstance(value, dict):  # a metadata object: user data, printed whole
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"to_jsonable: cannot represent {type(value).__name__}")
