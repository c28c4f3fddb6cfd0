from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Truncation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_UNSPECIFIED: _ClassVar[Truncation]
    TRUNCATION_END: _ClassVar[Truncation]
    TRUNCATION_NONE: _ClassVar[Truncation]

class ScoreKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_KIND_UNSPECIFIED: _ClassVar[ScoreKind]
    SCORE_KIND_NORMALIZED: _ClassVar[ScoreKind]
    SCORE_KIND_RAW: _ClassVar[ScoreKind]
    SCORE_KIND_SIMILARITY: _ClassVar[ScoreKind]

class RetrievalMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRIEVAL_MODE_UNSPECIFIED: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_DENSE: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_LEXICAL: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_HYBRID: _ClassVar[RetrievalMode]

class Fusion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUSION_UNSPECIFIED: _ClassVar[Fusion]
    FUSION_RRF: _ClassVar[Fusion]
    FUSION_CONVEX: _ClassVar[Fusion]
TRUNCATION_UNSPECIFIED: Truncation
TRUNCATION_END: Truncation
TRUNCATION_NONE: Truncation
SCORE_KIND_UNSPECIFIED: ScoreKind
SCORE_KIND_NORMALIZED: ScoreKind
SCORE_KIND_RAW: ScoreKind
SCORE_KIND_SIMILARITY: ScoreKind
RETRIEVAL_MODE_UNSPECIFIED: RetrievalMode
RETRIEVAL_MODE_DENSE: RetrievalMode
RETRIEVAL_MODE_LEXICAL: RetrievalMode
RETRIEVAL_MODE_HYBRID: RetrievalMode
FUSION_UNSPECIFIED: Fusion
FUSION_RRF: Fusion
FUSION_CONVEX: Fusion

class Document(_message.Message):
    __slots__ = ("id", "text", "title", "metadata", "embedding")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    title: str
    metadata: _struct_pb2.Struct
    embedding: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., title: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., embedding: _Optional[_Iterable[float]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("queue_ms", "tokenize_ms", "inference_ms", "batches", "items", "tokens")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    tokenize_ms: float
    inference_ms: float
    batches: int
    items: int
    tokens: int
    def __init__(self, queue_ms: _Optional[float] = ..., tokenize_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., batches: _Optional[int] = ..., items: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("total_ms", "queue_ms", "tokenize_ms", "inference_ms", "embed", "ann_ms", "rerank", "store_ms", "lexical_ms")
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    ANN_MS_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    STORE_MS_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_MS_FIELD_NUMBER: _ClassVar[int]
    total_ms: float
    queue_ms: float
    tokenize_ms: float
    inference_ms: float
    embed: StageTiming
    ann_ms: float
    rerank: StageTiming
    store_ms: float
    lexical_ms: float
    def __init__(self, total_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., tokenize_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., embed: _Optional[_Union[StageTiming, _Mapping]] = ..., ann_ms: _Optional[float] = ..., rerank: _Optional[_Union[StageTiming, _Mapping]] = ..., store_ms: _Optional[float] = ..., lexical_ms: _Optional[float] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "top_k", "candidates", "skip_rerank", "filter", "ids_only", "rerank_budget_ms", "raw_scores", "max_query_tokens", "max_document_tokens", "expansion_search", "retrieval_mode", "fusion", "fusion_weight", "rerank_weight", "latency_budget_ms")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SKIP_RERANK_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    IDS_ONLY_FIELD_NUMBER: _ClassVar[int]
    RERANK_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPANSION_SEARCH_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MODE_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    FUSION_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RERANK_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    query: str
    top_k: int
    candidates: int
    skip_rerank: bool
    filter: _struct_pb2.Struct
    ids_only: bool
    rerank_budget_ms: int
    raw_scores: bool
    max_query_tokens: int
    max_document_tokens: int
    expansion_search: int
    retrieval_mode: RetrievalMode
    fusion: Fusion
    fusion_weight: float
    rerank_weight: float
    latency_budget_ms: int
    def __init__(self, query: _Optional[str] = ..., top_k: _Optional[int] = ..., candidates: _Optional[int] = ..., skip_rerank: _Optional[bool] = ..., filter: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., ids_only: _Optional[bool] = ..., rerank_budget_ms: _Optional[int] = ..., raw_scores: _Optional[bool] = ..., max_query_tokens: _Optional[int] = ..., max_document_tokens: _Optional[int] = ..., expansion_search: _Optional[int] = ..., retrieval_mode: _Optional[_Union[RetrievalMode, str]] = ..., fusion: _Optional[_Union[Fusion, str]] = ..., fusion_weight: _Optional[float] = ..., rerank_weight: _Optional[float] = ..., latency_budget_ms: _Optional[int] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("id", "score", "rerank_score", "retrieval_score", "reranked", "retrieval_rank", "document", "dense_score", "lexical_score", "dense_rank", "lexical_rank")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RERANK_SCORE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    RERANKED_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_RANK_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    DENSE_SCORE_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    DENSE_RANK_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_RANK_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    rerank_score: float
    retrieval_score: float
    reranked: bool
    retrieval_rank: int
    document: Document
    dense_score: float
    lexical_score: float
    dense_rank: int
    lexical_rank: int
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., rerank_score: _Optional[float] = ..., retrieval_score: _Optional[float] = ..., reranked: _Optional[bool] = ..., retrieval_rank: _Optional[int] = ..., document: _Optional[_Union[Document, _Mapping]] = ..., dense_score: _Optional[float] = ..., lexical_score: _Optional[float] = ..., dense_rank: _Optional[int] = ..., lexical_rank: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "score_kind", "candidates", "reranked", "filter_exhausted", "timing", "retrieval_mode", "budget_limited", "rerank_weight", "latency_budget_ms")
    HITS_FIELD_NUMBER: _ClassVar[int]
    SCORE_KIND_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    RERANKED_FIELD_NUMBER: _ClassVar[int]
    FILTER_EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MODE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_LIMITED_FIELD_NUMBER: _ClassVar[int]
    RERANK_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    score_kind: ScoreKind
    candidates: int
    reranked: int
    filter_exhausted: bool
    timing: Timing
    retrieval_mode: RetrievalMode
    budget_limited: bool
    rerank_weight: float
    latency_budget_ms: int
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., score_kind: _Optional[_Union[ScoreKind, str]] = ..., candidates: _Optional[int] = ..., reranked: _Optional[int] = ..., filter_exhausted: _Optional[bool] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., retrieval_mode: _Optional[_Union[RetrievalMode, str]] = ..., budget_limited: _Optional[bool] = ..., rerank_weight: _Optional[float] = ..., latency_budget_ms: _Optional[int] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("query", "texts", "document_ids", "top_n", "return_documents", "raw_scores", "truncation", "max_query_tokens", "max_document_tokens", "chunk_long_documents", "chunk_overlap_tokens", "latency_budget_ms", "first_stage_scores", "rerank_weight")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    RETURN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_LONG_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OVERLAP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_STAGE_SCORES_FIELD_NUMBER: _ClassVar[int]
    RERANK_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    query: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    top_n: int
    return_documents: bool
    raw_scores: bool
    truncation: Truncation
    max_query_tokens: int
    max_document_tokens: int
    chunk_long_documents: bool
    chunk_overlap_tokens: int
    latency_budget_ms: int
    first_stage_scores: _containers.RepeatedScalarFieldContainer[float]
    rerank_weight: float
    def __init__(self, query: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., document_ids: _Optional[_Iterable[str]] = ..., top_n: _Optional[int] = ..., return_documents: _Optional[bool] = ..., raw_scores: _Optional[bool] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., max_query_tokens: _Optional[int] = ..., max_document_tokens: _Optional[int] = ..., chunk_long_documents: _Optional[bool] = ..., chunk_overlap_tokens: _Optional[int] = ..., latency_budget_ms: _Optional[int] = ..., first_stage_scores: _Optional[_Iterable[float]] = ..., rerank_weight: _Optional[float] = ...) -> None: ...

class RerankResult(_message.Message):
    __slots__ = ("index", "score", "id", "text", "chunks", "best_chunk", "truncated", "scored")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BEST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    id: str
    text: str
    chunks: int
    best_chunk: int
    truncated: bool
    scored: bool
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., id: _Optional[str] = ..., text: _Optional[str] = ..., chunks: _Optional[int] = ..., best_chunk: _Optional[int] = ..., truncated: _Optional[bool] = ..., scored: _Optional[bool] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("results", "score_kind", "timing", "scored", "budget_limited", "latency_budget_ms")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SCORE_KIND_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_LIMITED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RerankResult]
    score_kind: ScoreKind
    timing: Timing
    scored: int
    budget_limited: bool
    latency_budget_ms: int
    def __init__(self, results: _Optional[_Iterable[_Union[RerankResult, _Mapping]]] = ..., score_kind: _Optional[_Union[ScoreKind, str]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., scored: _Optional[int] = ..., budget_limited: _Optional[bool] = ..., latency_budget_ms: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("texts", "truncation")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    truncation: Truncation
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., truncation: _Optional[_Union[Truncation, str]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "dimension", "normalized", "timing")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dimension: int
    normalized: bool
    timing: Timing
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dimension: _Optional[int] = ..., normalized: _Optional[bool] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("inserted", "updated", "index_size", "timing")
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    INDEX_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    inserted: int
    updated: int
    index_size: int
    timing: Timing
    def __init__(self, inserted: _Optional[int] = ..., updated: _Optional[int] = ..., index_size: _Optional[int] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "not_found", "index_size", "timing")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    INDEX_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    index_size: int
    timing: Timing
    def __init__(self, deleted: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ..., index_size: _Optional[int] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("role", "name", "source", "revision", "max_length", "dimension", "pooling", "normalize", "quantization", "sha256", "providers")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    role: str
    name: str
    source: str
    revision: str
    max_length: int
    dimension: int
    pooling: str
    normalize: bool
    quantization: str
    sha256: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, role: _Optional[str] = ..., name: _Optional[str] = ..., source: _Optional[str] = ..., revision: _Optional[str] = ..., max_length: _Optional[int] = ..., dimension: _Optional[int] = ..., pooling: _Optional[str] = ..., normalize: _Optional[bool] = ..., quantization: _Optional[str] = ..., sha256: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchingInfo(_message.Message):
    __slots__ = ("enabled", "max_batch_tokens", "max_batch_size", "max_delay_ms", "max_queued_tokens")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    max_batch_tokens: int
    max_batch_size: int
    max_delay_ms: float
    max_queued_tokens: int
    def __init__(self, enabled: _Optional[bool] = ..., max_batch_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_delay_ms: _Optional[float] = ..., max_queued_tokens: _Optional[int] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("size", "dimension", "metric", "dtype", "connectivity", "expansion_add", "expansion_search", "read_only", "backend", "collection")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CONNECTIVITY_FIELD_NUMBER: _ClassVar[int]
    EXPANSION_ADD_FIELD_NUMBER: _ClassVar[int]
    EXPANSION_SEARCH_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    size: int
    dimension: int
    metric: str
    dtype: str
    connectivity: int
    expansion_add: int
    expansion_search: int
    read_only: bool
    backend: str
    collection: str
    def __init__(self, size: _Optional[int] = ..., dimension: _Optional[int] = ..., metric: _Optional[str] = ..., dtype: _Optional[str] = ..., connectivity: _Optional[int] = ..., expansion_add: _Optional[int] = ..., expansion_search: _Optional[int] = ..., read_only: _Optional[bool] = ..., backend: _Optional[str] = ..., collection: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_query_bytes", "max_text_bytes", "max_id_bytes", "max_rerank_documents", "max_embed_texts", "max_upsert_documents", "max_top_k", "max_candidates", "max_message_bytes", "max_concurrent_rpcs", "max_metadata_bytes", "max_filter_keys")
    MAX_QUERY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ID_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_RERANK_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_EMBED_TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_UPSERT_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_RPCS_FIELD_NUMBER: _ClassVar[int]
    MAX_METADATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_FILTER_KEYS_FIELD_NUMBER: _ClassVar[int]
    max_query_bytes: int
    max_text_bytes: int
    max_id_bytes: int
    max_rerank_documents: int
    max_embed_texts: int
    max_upsert_documents: int
    max_top_k: int
    max_candidates: int
    max_message_bytes: int
    max_concurrent_rpcs: int
    max_metadata_bytes: int
    max_filter_keys: int
    def __init__(self, max_query_bytes: _Optional[int] = ..., max_text_bytes: _Optional[int] = ..., max_id_bytes: _Optional[int] = ..., max_rerank_documents: _Optional[int] = ..., max_embed_texts: _Optional[int] = ..., max_upsert_documents: _Optional[int] = ..., max_top_k: _Optional[int] = ..., max_candidates: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_concurrent_rpcs: _Optional[int] = ..., max_metadata_bytes: _Optional[int] = ..., max_filter_keys: _Optional[int] = ...) -> None: ...

class Defaults(_message.Message):
    __slots__ = ("top_k", "candidates", "chunk_overlap_tokens", "latency_budget_ms", "retrieval_mode", "fusion", "fusion_weight", "rerank_weight")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OVERLAP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MODE_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    FUSION_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RERANK_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    candidates: int
    chunk_overlap_tokens: int
    latency_budget_ms: int
    retrieval_mode: RetrievalMode
    fusion: Fusion
    fusion_weight: float
    rerank_weight: float
    def __init__(self, top_k: _Optional[int] = ..., candidates: _Optional[int] = ..., chunk_overlap_tokens: _Optional[int] = ..., latency_budget_ms: _Optional[int] = ..., retrieval_mode: _Optional[_Union[RetrievalMode, str]] = ..., fusion: _Optional[_Union[Fusion, str]] = ..., fusion_weight: _Optional[float] = ..., rerank_weight: _Optional[float] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("server_version", "bi_encoder", "cross_encoder", "embed_batching", "rerank_batching", "index", "limits", "defaults")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    BI_ENCODER_FIELD_NUMBER: _ClassVar[int]
    CROSS_ENCODER_FIELD_NUMBER: _ClassVar[int]
    EMBED_BATCHING_FIELD_NUMBER: _ClassVar[int]
    RERANK_BATCHING_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    bi_encoder: ModelInfo
    cross_encoder: ModelInfo
    embed_batching: BatchingInfo
    rerank_batching: BatchingInfo
    index: IndexInfo
    limits: Limits
    defaults: Defaults
    def __init__(self, server_version: _Optional[str] = ..., bi_encoder: _Optional[_Union[ModelInfo, _Mapping]] = ..., cross_encoder: _Optional[_Union[ModelInfo, _Mapping]] = ..., embed_batching: _Optional[_Union[BatchingInfo, _Mapping]] = ..., rerank_batching: _Optional[_Union[BatchingInfo, _Mapping]] = ..., index: _Optional[_Union[IndexInfo, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., defaults: _Optional[_Union[Defaults, _Mapping]] = ...) -> None: ...
