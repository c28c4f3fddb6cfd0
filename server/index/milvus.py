"""Stage 1 on Milvus: the documents and their vectors in one Milvus collection, for corpora or traffic that
outgrow one machine. The embedded backend (server/index.py: usearch + SQLite) stays the default; this one
is chosen with `milvus_uri` (`http(s)://host:port`, or a local path ending in `.db` for the embedded
milvus-lite). pymilvus is imported only when a `MilvusIndex` connects, so the serving install does not
need it (`pip install 'twostage[milvus]'` adds it).

Collection schema (created on first use, or by `twostage index build --milvus-uri`):

    id        VARCHAR primary key         the caller's id
    text      VARCHAR                     the document text, as given
    title     VARCHAR                     the title, as given
    lexical   VARCHAR, analysed           "title. text" (`embedding_text`): what BM25 indexes
    metadata  JSON                        the metadata object
    vector    FLOAT_VECTOR(dimension)     the bi-encoder embedding; HNSW index, metric from `index_metric`
    sparse    SPARSE_FLOAT_VECTOR         output of a BM25 Function over `lexical`; sparse inverted index

Why a separate `lexical` field: a BM25 Function reads exactly one field, and BM25 should read what the
bi-encoder and the cross-encoder read (the title matters: BEIR's BM25 baselines index title + text). Keeping
`text` as given means `get` returns documents unchanged; the cost is the text stored twice. Milvus caps a
VARCHAR at 65,535 bytes, so a document whose "title. text" is longer is refused with INVALID_ARGUMENT.
milvus-lite accepts the analyser settings but tokenizes with `\\w+` + lowercase only (no stemming, and it
takes the stop-word list literally), so lexical results through milvus-lite differ from a real Milvus.

Model fingerprint. The collection's properties record the bi-encoder (name, sha256 of its ONNX file,
dimension) and the metric; a collection made for another model or metric is refused with a message naming
both, at startup and whenever the health check sees that the collection behind the name changed.

Scores (`Candidate.score`) mean what the embedded backend's mean, higher is closer: COSINE and IP come back
from Milvus as the similarity itself; L2 comes back as the squared distance and is negated (the embedded
backend's `l2sq` score). Lexical scores are BM25 scores, made positive (milvus-lite reports them negated).

Filters. A metadata filter (equality on top-level keys, `json_equal` semantics: 3 == 3.0, booleans only
equal booleans) is pushed to Milvus as an expression that every matching document satisfies — a superset
— and every returned hit is checked again with `metadata_matches`, which is the definition. Keys and values
become string literals escaped by `milvus_string` (backslash, quote, newline, carriage return, tab); a key
or value that cannot be written safely in both Milvus's and milvus-lite's grammar (quotes, backslashes or
brackets in a key; other control characters anywhere; integers beyond int64; null) is not pushed down: it is
left to the post-check. Nothing a caller sends can therefore change the structure of the expression. Like
the embedded backend, a filtered search over-fetches (`filter_overfetch` times k, growing) until k hits
match or Milvus has returned everything the expression admits; past Milvus's top-k cap it scans the
admitted documents with a query iterator and scores them exactly.

Consistency and atomicity. Every read asks for Strong consistency, so an acknowledged Upsert or Delete is
seen by the next Search, as with the embedded backend. Unlike the embedded backend, a Search running while
an Upsert of several documents is applied may see part of it (Milvus applies one request as a delete and
an insert, not as one transaction), and inserted/updated/not_found counts are exact for writes from this
process (serialized by a mutex) but can be off by writes that other replicas make at the same moment.

Availability. Every pymilvus call goes through `_milvus_call`, the one place that maps "Milvus cannot be
reached" to `Unavailable` (gRPC UNAVAILABLE) and reloads a collection that Milvus released (after a restart
a collection must be loaded before it can be searched). `check()` is what the server's health watcher
calls.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from ..errors import FailedPrecondition, InvalidArgument, TwoStageError, Unavailable
from .backend import Candidate, Candidates, StoredDoc, embedding_text
from .filters import metadata_matches

if TYPE_CHECKING:
    from pathlib import Path
    from typing import TextIO

    from pymilvus import MilvusClient

    from ..config import Config
    from ..indexing import BuildReport

log = logging.getLogger("twostage.milvus")




MAX_VARCHAR_BYTES = 65_535  # Milvus's VARCHAR max_length (bytes in Milvus; milvus-lite counts characters)
MAX_TOPK = 16_384  # Milvus refuses a search whose limit exceeds this
SCHEMA_VERSION = "1"
PROPERTY_PREFIX = "twostage."
BUILD_INFIX = "__build_"  # staging collections of `index build`: <collection>__build_<UTC time>
METRIC_OF = {"cos": "COSINE", "ip": "IP", "l2sq": "L2"}
ANALYZER_PARAMS = {"tokenizer": "standard",
                   "filter": ["lowercase", {"type": "stemmer", "language": "english"},
                              {"type": "stop", "stop_words": ["_english_"]}]}
_ID_CHUNK = 500  # ids per query
_SCAN_BATCH = 2048  # rows per query-iterator batch in a filtered scan
_OUTPUT_DOC = ["id", "text", "title", "metadata"]
_NOT_LOADED = 101  # Milvus error code: collection not loaded
_COLLECTION_NOT_FOUND = 100
_CONNECT_FAILED = 2  # pymilvus Status.CONNECT_FAILED

T = TypeVar("T")

# Clients per local `.db` path in this process: pymilvus starts an in-process milvus-lite server for a path
# and never stops it; the last MilvusIndex on a path to close stops it (freeing the data directory, which
# milvus-lite lets one process use at a time).
_local_users: dict[str, int] = {}
_local_lock = threading.Lock()


def _is_local(uri: str) -> bool:
    return "://" not in uri and uri.endswith(".db")


class _EmbeddingModel(Protocol):
    """What the fingerprint reads from a loaded bi-encoder."""

    @property
    def name(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def dimension(self) -> int: ...


# ---------------------------------------------------------------------------------------------
# Settings and fingerprint
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MilvusSettings:
    """Where the collection is and how it is indexed and searched."""

    uri: str
    collection: str = "twostage"
    token: str = field(default="", repr=False)
    metric: str = "cos"
    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 256
    filter_overfetch: int = 4
    timeout_s: float = 10.0

    @classmethod
    def from_config(cls, config: Config) -> MilvusSettings:
        return cls(uri=config.milvus_uri, collection=config.milvus_collection, token=config.milvus_token,
                   metric=config.index_metric, connectivity=int(config.index_connectivity),
                   expansion_add=int(config.index_expansion_add),
                   expansion_search=int(config.index_expansion_search),
                   filter_overfetch=int(config.filter_overfetch), timeout_s=float(config.milvus_timeout_s))

    @property
    def safe_uri(self) -> str:
        """The URI without any user:password part (for logs and messages)."""
        scheme, sep, rest = self.uri.partition("://")
        if sep and "@" in rest.split("/", 1)[0]:
            return f"{scheme}://{rest.split('@', 1)[1]}"
        return self.uri


@dataclass(frozen=True)
class ModelFingerprint:
    """The bi-encoder whose vectors a collection holds."""

    name: str
    sha256: str
    dimension: int

    @classmethod
    def of(cls, model: _EmbeddingModel) -> ModelFingerprint:
        """From a loaded embedding model (its manifest name, ONNX sha256 and dimension)."""
        return cls(str(model.name), str(model.sha256), int(model.dimension))

    def properties(self) -> dict[str, str]:
        return {f"{PROPERTY_PREFIX}model": self.name, f"{PROPERTY_PREFIX}model_sha256": self.sha256,
                f"{PROPERTY_PREFIX}dimension": str(self.dimension)}

    @classmethod
    def from_properties(cls, props: Mapping[str, str]) -> ModelFingerprint | None:
        try:
            return cls(props[f"{PROPERTY_PREFIX}model"], props[f"{PROPERTY_PREFIX}model_sha256"],
                       int(props[f"{PROPERTY_PREFIX}dimension"]))
        except (KeyError, ValueError):
            return None

    def __str__(self) -> str:
        return f"{self.name} (sha256 {self.sha256[:16]}, dimension {self.dimension})"


# ---------------------------------------------------------------------------------------------
# Filter expressions
# ---------------------------------------------------------------------------------------------

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE_IN_KEY = set("\"'\\[]")


def _plain_char(c: str) -> bool:
    """Neither a control character (other than the escaped \\n \\r \\t) nor a lone surrogate."""
    return c in _ESCAPES or unicodedata.category(c) not in ("Cc", "Cs")


def milvus_string(value: str) -> str | None:
    """`value` as a double-quoted Milvus string literal, or None when it cannot be written safely.

    Only the escapes both Milvus's grammar (C-style, unquoted by Go's strconv) and milvus-lite's lexer
    read the same way are used; any other control character makes the value unsafe (None)."""
    if not all(_plain_char(c) for c in value):
        return None
    return '"' + "".join(_ESCAPES.get(c, c) for c in value) + '"'


def _json_access(key: str) -> str | None:
    """`metadata["key"]`, or None for a key Milvus cannot address safely. Milvus splits a JSON path on
    brackets and strips quotes without unescaping, so keys with quotes, backslashes or brackets (and
    control characters) are left to the post-check."""
    if not key or any(c in _UNSAFE_IN_KEY for c in key) or not all(_plain_char(c) and c not in _ESCAPES for c in key):
        return None
    return f'metadata["{key}"]'


def _number_literals(value: int | float) -> list[str]:
    """Literals that together match every JSON number equal to `value`: an integral value is written both
    as an integer and as a float (3 and 3.0), since Milvus may compare an integer literal only with
    integers and a float literal only with floats. An integer beyond int64 gives none (post-check only)."""
    if isinstance(value, int) and not -2**63 <= value < 2**63:
        return []
    literals = []
    if isinstance(value, int) or (value.is_integer() and -2**63 <= value < 2**63):
        literals.append(str(int(value)))
    if float(value) == value:
        literals.append(repr(float(value)))
    return literals


def filter_expression(flt: Mapping[str, object]) -> str:
    """A Milvus filter expression that every document matching `flt` satisfies ("" = no condition).
    The post-check with `metadata_matches` decides; clauses Milvus cannot be trusted with are left out."""
    clauses: list[str] = []
    for key, value in flt.items():
        access = _json_access(key)
        if access is None:
            continue
        if isinstance(value, bool):
            clauses.append(f"{access} == {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            literals = _number_literals(value)
            if literals:
                clauses.append(" or ".join(f"{access} == {lit}" for lit in literals))
        elif isinstance(value, str):
            literal = milvus_string(value)
            if literal is not None:
                clauses.append(f"{access} == {literal}")
        # null, lists and objects: left to the post-check
    return " and ".join(f"({c})" for c in clauses)


def _and(*conditions: str) -> str:
    return " and ".join(f"({c})" for c in conditions if c)


def _ids_expression(ids: Sequence[str]) -> str:
    """`id in [...]` over the ids that can be written as literals ("" when none can). An id that cannot
    (a control character other than newline, return or tab) can never be stored: `check_documents`
    refuses it, so leaving it out of a lookup is the same as not finding it."""
    literals = [lit for lit in (milvus_string(i) for i in ids) if lit is not None]
    return f"id in [{', '.join(literals)}]" if literals else ""


# ---------------------------------------------------------------------------------------------
# Errors: the one place that decides what "Milvus is unreachable" means
# ---------------------------------------------------------------------------------------------


def _error_code(exc: BaseException) -> object:
    code = getattr(exc, "code", None)
    return code() if callable(code) else code


def _is_unreachable(exc: BaseException) -> bool:
    import grpc

    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    code = _error_code(exc)
    if isinstance(code, grpc.StatusCode):
        return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    from pymilvus.exceptions import ConnectError, MilvusException, MilvusUnavailableException

    if isinstance(exc, (ConnectError, MilvusUnavailableException)):
        return True
    return isinstance(exc, MilvusException) and (code == _CONNECT_FAILED or "Retry timeout" in str(exc))


def _message(exc: BaseException) -> str:
    return str(getattr(exc, "message", "") or exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Document checks (the embedded backend's rules, plus Milvus's VARCHAR cap)
# ---------------------------------------------------------------------------------------------


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", errors="surrogatepass"))


def check_documents(docs: Sequence[StoredDoc], vectors: object, dimension: int, metric: str) -> np.ndarray:
    """The float32 matrix of `vectors` after checking ids, fields and vectors; InvalidArgument names the field."""
    if not docs:
        raise InvalidArgument("documents", "at least one document is required")
    first_at: dict[str, int] = {}
    for i, doc in enumerate(docs):
        if not isinstance(doc.id, str) or not doc.id:
            raise InvalidArgument(f"documents[{i}].id", "must be a non-empty string")
        if doc.id in first_at:
            raise InvalidArgument("documents", f"duplicate id {doc.id!r} at positions {first_at[doc.id]} and {i}")
        first_at[doc.id] = i
        if milvus_string(doc.id) is None:
            raise InvalidArgument(f"documents[{i}].id", "contains a control character (other than newline, "
                                  "return or tab), which a Milvus filter expression cannot hold")
        if not isinstance(doc.text, str) or not isinstance(doc.title, str):
            raise InvalidArgument(f"documents[{i}]", "text and title must be strings")
        if not isinstance(doc.metadata, dict) or not all(isinstance(k, str) for k in doc.metadata):
            raise InvalidArgument(f"documents[{i}].metadata", "must be a JSON object with string keys")
        try:
            json.dumps(doc.metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"documents[{i}].metadata", f"not JSON ({exc})") from None
        for name, value in (("id", doc.id), ("text", embedding_text(doc.title, doc.text))):
            size = _utf8_len(value)
            if size > MAX_VARCHAR_BYTES:
                what = "title + text" if name == "text" and doc.title.strip() else name
                raise InvalidArgument(f"documents[{i}].{name}",
                                      f"{what} is {size} bytes; a Milvus VARCHAR holds at most {MAX_VARCHAR_BYTES}")
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(docs):
        raise InvalidArgument("documents", f"{len(docs)} documents but vectors of shape {tuple(matrix.shape)}")
    if matrix.shape[1] != dimension:
        raise InvalidArgument("documents[0].embedding",
                              f"has {matrix.shape[1]} values; the index dimension is {dimension}")
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        raise InvalidArgument(f"documents[{int(np.argmin(finite))}].embedding", "contains NaN or infinity")
    if metric == "cos":
        zero = ~np.any(matrix != 0, axis=1)
        if zero.any():
            raise InvalidArgument(f"documents[{int(np.argmax(zero))}].embedding",
                                  "is all zeros, which has no direction under the cos metric")
    return np.ascontiguousarray(matrix)


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    """A Milvus search hit before the post-check."""

    id: str
    score: float
    metadata: dict | None


class MilvusIndex:
    """The index backend on a Milvus collection. Construct, then `connect()` (or use `MilvusIndex.open`)."""

    kind = "milvus"

    def __init__(self, settings: MilvusSettings, fingerprint: ModelFingerprint):
        if settings.metric not in METRIC_OF:
            raise ValueError(f"metric {settings.metric!r} not one of {tuple(METRIC_OF)}")
        self.settings = settings
        self.fingerprint = fingerprint
        self._client: MilvusClient | None = None
        self._connect_lock = threading.Lock()
        self._write_mutex = threading.Lock()
        self._verified = False  # the collection behind the name was checked against the fingerprint
        self._resolved = ""  # the collection the name resolves to (itself, or an alias's target)
        self._count = 0
        self._closed = False

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, settings: MilvusSettings, fingerprint: ModelFingerprint, *,
             properties: Mapping[str, str] | None = None) -> MilvusIndex:
        """Connect, creating the collection when it does not exist (with extra `properties`)."""
        index = cls(settings, fingerprint)
        try:
            index.connect(create=True, properties=properties)
        except BaseException:
            index.close()
            raise
        return index

    def connect(self, *, create: bool = True, properties: Mapping[str, str] | None = None) -> None:
        """Reach Milvus, create the collection if missing (when `create`), check it against the model
        fingerprint and metric, and load it. Raises Unavailable while Milvus cannot be reached and
        FailedPrecondition for a collection made for another model."""
        with self._connect_lock:
            self._check_open()
            if self._client is None:
                self._client = self._call("connecting", self._new_client, retry_load=False)
            if create and not self._call("checking the collection", self._exists, retry_load=False):
                self._create(properties or {})
            self._verify()
            self._ensure_loaded()
            self._refresh_count()

    def _new_client(self) -> MilvusClient:
        try:
            from pymilvus import MilvusClient
            from pymilvus.exceptions import ConnectionConfigException
        except ImportError as exc:
            raise FailedPrecondition(f"the Milvus backend needs pymilvus ({exc}): pip install 'twostage[milvus]' "
                                     f"(and milvus-lite for a local .db)") from None

        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # it logs a traceback per failed call
        # pymilvus imports scipy.sparse lazily on first use, which is not thread-safe: concurrent first Searches
        # failed with "partially initialized module" (docs/benchmarks.md, section 7). Import it here, once.
        with contextlib.suppress(ImportError):
            import scipy.sparse  # noqa: F401
        uri = self.settings.uri
        if not _is_local(uri):
            return MilvusClient(uri=uri, token=self.settings.token, timeout=self.settings.timeout_s)
        with _local_lock:
            try:
                client = MilvusClient(uri=uri, timeout=self.settings.timeout_s)
            except ConnectionConfigException as exc:
                raise FailedPrecondition(
                    f"cannot open the milvus-lite data directory {uri} ({_message(exc)}): its parent folder must "
                    f"exist, and milvus-lite lets one process at a time use it (is a server or a build running "
                    f"on it?)") from None
            _local_users[uri] = _local_users.get(uri, 0) + 1
            return client

    def _release_local(self) -> None:
        with _local_lock:
            left = _local_users.get(self.settings.uri, 0) - 1
            if left > 0:
                _local_users[self.settings.uri] = left
                return
            _local_users.pop(self.settings.uri, None)
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.settings.uri)

    @property
    def client(self) -> MilvusClient:
        if self._client is None:
            raise Unavailable(f"not connected to Milvus at {self.settings.safe_uri} yet")
        return self._client

    def _exists(self) -> bool:
        return bool(self.client.has_collection(self.settings.collection, timeout=self.settings.timeout_s))

    def _create(self, properties: Mapping[str, str]) -> None:
        from pymilvus import DataType, Function, FunctionType
        from pymilvus.exceptions import MilvusException

        c = self.client
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_VARCHAR_BYTES)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_VARCHAR_BYTES)
        schema.add_field("title", DataType.VARCHAR, max_length=MAX_VARCHAR_BYTES)
        schema.add_field("lexical", DataType.VARCHAR, max_length=MAX_VARCHAR_BYTES, enable_analyzer=True,
                         analyzer_params=ANALYZER_PARAMS)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.fingerprint.dimension)
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["lexical"],
                                     output_field_names=["sparse"]))
        index_params = c.prepare_index_params()
        index_params.add_index("vector", index_type="HNSW", metric_type=METRIC_OF[self.settings.metric],
                               params={"M": self.settings.connectivity, "efConstruction": self.settings.expansion_add})
        index_params.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        props = {f"{PROPERTY_PREFIX}schema": SCHEMA_VERSION, f"{PROPERTY_PREFIX}metric": self.settings.metric,
                 **self.fingerprint.properties(), **properties}
        try:
            self._call("creating the collection", lambda: c.create_collection(
                self.settings.collection, schema=schema, index_params=index_params, consistency_level="Strong",
                properties=props, timeout=self.settings.timeout_s), retry_load=False)
        except MilvusException:
            if not self._call("checking the collection", self._exists, retry_load=False):
                raise  # not a race with another replica creating it
        log.info("created Milvus collection %s at %s for %s", self.settings.collection, self.settings.safe_uri,
                 self.fingerprint)

    def _describe(self) -> dict:
        return self.client.describe_collection(self.settings.collection, timeout=self.settings.timeout_s)

    def _verify(self) -> None:
        """Check the collection behind the name against the model fingerprint and metric. Until a check
        passes again after one failed, every request repeats it (so a request after an `index build`
        switched the name to a collection of another model fails with the same message as the health check)."""
        try:
            self._resolved = self._checked_collection()
        except BaseException:
            self._verified = False
            raise
        self._verified = True

    def _checked_collection(self) -> str:
        """The collection the name resolves to, after checking its schema version, fingerprint and metric."""
        name = self.settings.collection
        try:
            desc = self._call("describing the collection", self._describe, retry_load=False)
        except Exception as exc:
            if _error_code(exc) == _COLLECTION_NOT_FOUND:
                raise Unavailable(f"Milvus collection {name!r} does not exist at {self.settings.safe_uri}") from None
            raise
        props = {str(k): str(v) for k, v in (desc.get("properties") or {}).items()}
        theirs = ModelFingerprint.from_properties(props)
        if theirs is None or props.get(f"{PROPERTY_PREFIX}schema") != SCHEMA_VERSION:
            raise FailedPrecondition(
                f"Milvus collection {name!r} at {self.settings.safe_uri} was not created by twostage (schema "
                f"{SCHEMA_VERSION}): its properties have no model fingerprint; use another collection name")
        dims = [int(f.get("params", {}).get("dim", 0)) for f in desc.get("fields", []) if f.get("name") == "vector"]
        if dims and dims[0] != theirs.dimension:
            theirs = ModelFingerprint(theirs.name, theirs.sha256, dims[0])
        if theirs != self.fingerprint:
            raise FailedPrecondition(
                f"Milvus collection {name!r} holds vectors of the bi-encoder {theirs}, but this server's "
                f"bi-encoder is {self.fingerprint}; use another collection name, or rebuild it with "
                f"`twostage index build --milvus-uri ... --collection {name}`")
        their_metric = props.get(f"{PROPERTY_PREFIX}metric", "")
        if their_metric != self.settings.metric:
            raise FailedPrecondition(
                f"Milvus collection {name!r} was built with metric {their_metric!r}, but index_metric is "
                f"{self.settings.metric!r}; use the collection's metric or another collection name")
        return str(desc.get("collection_name") or name)

    def _ensure_loaded(self) -> None:
        from pymilvus.client.types import LoadState

        c, name, timeout = self.client, self.settings.collection, self.settings.timeout_s
        state = self._call("reading the load state", lambda: c.get_load_state(name, timeout=timeout),
                           retry_load=False)
        if state.get("state") != LoadState.Loaded:
            log.info("loading Milvus collection %s", name)
            self._call("loading the collection", lambda: c.load_collection(name, timeout=timeout), retry_load=False)

    def check(self) -> None:
        """Health probe (the server's watcher calls it every second or so): Milvus reachable, the collection
        there, made for this model, and loaded. Raises Unavailable or FailedPrecondition otherwise."""
        self.connect(create=False)

    # ------------------------------------------------------------------ calls
    def _call(self, what: str, fn: Callable[[], T], *, retry_load: bool = True) -> T:
        """Run one pymilvus call: "unreachable" becomes Unavailable; a collection Milvus released (a Milvus
        restart) is loaded again and the call retried once."""
        try:
            return fn()
        except TwoStageError:
            raise
        except Exception as exc:
            if _is_unreachable(exc):
                raise Unavailable(f"Milvus at {self.settings.safe_uri} is unreachable ({what}): "
                                  f"{_message(exc)}") from None
            code = _error_code(exc)
            if retry_load and code == _NOT_LOADED:
                self._ensure_loaded()
                return self._call(what, fn, retry_load=False)
            if code == _COLLECTION_NOT_FOUND and self._verified:
                self._verified = False
                raise Unavailable(f"Milvus collection {self.settings.collection!r} is gone from "
                                  f"{self.settings.safe_uri} ({what})") from None
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"the Milvus index {self.settings.collection!r} is closed")

    def _ready(self) -> MilvusClient:
        self._check_open()
        if not self._verified:
            self.connect(create=False)
        return self.client

    # ------------------------------------------------------------------ properties
    @property
    def dimension(self) -> int:
        return self.fingerprint.dimension

    @property
    def size(self) -> int:
        """Documents in the collection, as of the last write or health check from this process (other
        replicas' writes show within a health-check interval)."""
        return self._count

    @property
    def read_only(self) -> bool:
        return False

    @property
    def collection(self) -> str:
        return self.settings.collection

    def _refresh_count(self) -> int:
        c, name, timeout = self.client, self.settings.collection, self.settings.timeout_s
        rows = self._call("counting", lambda: c.query(name, filter="", output_fields=["count(*)"],
                                                      consistency_level="Strong", timeout=timeout))
        self._count = int(rows[0]["count(*)"]) if rows else 0
        return self._count

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "uri": self.settings.safe_uri, "collection": self.settings.collection,
                "resolved_collection": self._resolved, "metric": self.settings.metric, "dtype": "f32",
                "connectivity": str(self.settings.connectivity), "expansion_add": str(self.settings.expansion_add),
                "index": f"HNSW M={self.settings.connectivity} efConstruction={self.settings.expansion_add}",
                "expansion_search": str(self.settings.expansion_search), "model": str(self.fingerprint)}

    # ------------------------------------------------------------------ search
    def _query_vector(self, vector: object) -> list[float]:
        q = np.asarray(vector, dtype=np.float32)
        if q.ndim != 1 or q.shape[0] != self.dimension:
            raise InvalidArgument("vector", f"has shape {tuple(q.shape)}; the index dimension is {self.dimension}")
        if not np.all(np.isfinite(q)):
            raise InvalidArgument("vector", "contains NaN or infinity")
        return q.tolist()

    def _dense_score(self, distance: float) -> float:
        return -float(distance) if self.settings.metric == "l2sq" else float(distance)

    def search(self, vector: object, k: int, *, filter: dict | None = None,
               expansion_search: int | None = None) -> Candidates:
        """The k nearest documents to `vector` (matching `filter`, when given, on metadata)."""
        q = self._query_vector(vector)
        k = _check_k(k)
        if expansion_search is not None and expansion_search < 0:
            raise InvalidArgument("expansion_search", f"must be >= 0 (got {expansion_search})")
        ef = int(expansion_search or self.settings.expansion_search)

        def run(limit: int, expr: str, with_metadata: bool) -> list[_Raw]:
            params = {"metric_type": METRIC_OF[self.settings.metric], "params": {"ef": max(ef, limit)}}
            return self._search_raw([q], "vector", params, limit, expr, with_metadata, self._dense_score)

        return self._filtered(run, k, filter, scan_query=q, strategy="ann")

    def lexical_search(self, text: str, k: int, *, filter: dict | None = None) -> Candidates:
        """The k best documents for `text` by BM25 over "title. text" (Milvus's own BM25 Function).
        Scores are BM25 scores, positive, higher is better. Only documents holding a query term are
        candidates, so `exhausted` here means: fewer than k documents both match the filter and hold a term."""
        if not isinstance(text, str):
            raise InvalidArgument("query", "must be a string")
        k = _check_k(k)
        if not text.strip():
            return Candidates([], exhausted=bool(filter), strategy="empty")

        def run(limit: int, expr: str, with_metadata: bool) -> list[_Raw]:
            return self._search_raw([text], "sparse", {"metric_type": "BM25"}, limit, expr, with_metadata,
                                    lambda d: abs(float(d)))

        return self._filtered(run, k, filter, scan_query=None, strategy="bm25")

    def _search_raw(self, data: list, field: str, params: dict, limit: int, expr: str, with_metadata: bool,
                    score: Callable[[float], float]) -> list[_Raw]:
        c = self._ready()
        name, timeout = self.settings.collection, self.settings.timeout_s
        result = self._call("searching", lambda: c.search(
            name, data=data, anns_field=field, limit=limit, filter=expr, search_params=params,
            output_fields=["metadata"] if with_metadata else [], consistency_level="Strong", timeout=timeout))
        rows = result[0] if result else []
        return [_Raw(str(r["id"]), score(r["distance"]),
                     (r.get("entity") or {}).get("metadata") if with_metadata else None) for r in rows]

    def _filtered(self, run: Callable[[int, str, bool], list[_Raw]], k: int, flt: dict | None,
                  scan_query: list[float] | None, strategy: str) -> Candidates:
        """Search, over-fetching and post-checking with `metadata_matches` while a filter is given.
        Strategies: "<s>" (one search), "<s>-all" (Milvus returned every document the expression admits),
        "scan" (exact, dense only) or "bm25-capped" (lexical, stopped at Milvus's top-k cap)."""
        if not flt:
            return Candidates(_ranked(run(k, "", False)), strategy=strategy)
        expr = filter_expression(flt)
        fetch = min(MAX_TOPK, k * max(1, self.settings.filter_overfetch))
        while True:
            raw = run(fetch, expr, True)
            matches = [h for h in raw if isinstance(h.metadata, dict) and metadata_matches(h.metadata, flt)]
            if len(matches) >= k:
                return Candidates(_ranked(matches[:k]), strategy=strategy)
            if len(raw) < fetch:  # Milvus returned every document the expression admits
                return Candidates(_ranked(matches), exhausted=True, strategy=f"{strategy}-all")
            if fetch >= MAX_TOPK:
                break
            fetch = min(MAX_TOPK, fetch * 4)
        if scan_query is None:  # lexical: no exact scan; what the capped search found is the answer
            return Candidates(_ranked(matches), exhausted=False, strategy="bm25-capped")
        return self._scan(scan_query, k, flt, expr)

    def _scan(self, q: list[float], k: int, flt: dict, expr: str) -> Candidates:
        """Exact search over the documents the expression admits and the filter matches."""
        c = self._ready()
        iterator = self._call("scanning", lambda: c.query_iterator(
            self.settings.collection, batch_size=_SCAN_BATCH, filter=expr, output_fields=["id", "metadata", "vector"],
            consistency_level="Strong", timeout=self.settings.timeout_s))
        ids: list[str] = []
        scores: list[np.ndarray] = []
        query = np.asarray(q, dtype=np.float32)
        try:
            while batch := self._call("scanning", iterator.next):
                rows = [r for r in batch
                        if isinstance(r.get("metadata"), dict) and metadata_matches(r["metadata"], flt)]
                if rows:
                    ids += [str(r["id"]) for r in rows]
                    scores.append(self._exact_scores(query, np.asarray([r["vector"] for r in rows], dtype=np.float32)))
        finally:
            iterator.close()
        if not ids:
            return Candidates([], exhausted=True, strategy="scan")
        all_scores = np.concatenate(scores)
        order = np.argsort(-all_scores, kind="stable")[:k]
        return Candidates([Candidate(ids[i], float(all_scores[i]), r) for r, i in enumerate(order)],
                          exhausted=len(ids) < k, strategy="scan")

    def _exact_scores(self, q: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        if self.settings.metric == "ip":
            return (vectors @ q).astype(np.float64)
        if self.settings.metric == "cos":
            qn = q / max(float(np.linalg.norm(q)), 1e-30)
            vn = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
            return (vn @ qn).astype(np.float64)
        return -((vectors - q) ** 2).sum(axis=1).astype(np.float64)

    # ------------------------------------------------------------------ reads
    def _query_ids(self, ids: Sequence[str], fields: list[str]) -> list[dict]:
        c = self._ready()
        name, timeout = self.settings.collection, self.settings.timeout_s
        rows: list[dict] = []
        for chunk in _chunks(list(ids)):
            expr = _ids_expression(chunk)
            if not expr:
                continue
            rows += self._call("reading documents", functools.partial(
                c.query, name, filter=expr, output_fields=fields, consistency_level="Strong", timeout=timeout))
        return rows

    def get(self, ids: Sequence[str]) -> dict[str, StoredDoc]:
        """Stored documents by id (ids not stored are absent from the result)."""
        rows = self._query_ids(list(dict.fromkeys(ids)), _OUTPUT_DOC)
        return {str(r["id"]): StoredDoc(str(r["id"]), r.get("text") or "", r.get("title") or "",
                                        dict(r.get("metadata") or {})) for r in rows}

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Those of `ids` that are stored."""
        return {str(r["id"]) for r in self._query_ids(list(dict.fromkeys(ids)), ["id"])}

    # ------------------------------------------------------------------ writes
    def upsert(self, docs: Sequence[StoredDoc], vectors: object) -> tuple[int, int]:
        """Insert or replace `docs` (row i of `vectors` is docs[i]'s embedding). Returns (inserted, updated)."""
        matrix = check_documents(docs, vectors, self.dimension, self.settings.metric)
        rows = [{"id": d.id, "text": d.text, "title": d.title, "lexical": embedding_text(d.title, d.text),
                 "metadata": d.metadata, "vector": v.tolist()} for d, v in zip(docs, matrix, strict=True)]
        with self._write_mutex:
            c = self._ready()
            old = self.existing_ids([d.id for d in docs])
            self._call("writing documents", lambda: c.upsert(self.settings.collection, rows,
                                                             timeout=self.settings.timeout_s))
            self._refresh_count()
        return len(docs) - len(old), len(old)

    def delete(self, ids: Sequence[str]) -> tuple[int, list[str]]:
        """Remove documents by id. Returns (deleted, ids that were not stored)."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            raise InvalidArgument("ids", "at least one id is required")
        with self._write_mutex:
            c = self._ready()
            found = self.existing_ids(ids)
            if found:
                present = [i for i in ids if i in found]
                for chunk in _chunks(present):
                    self._call("deleting documents", functools.partial(
                        c.delete, self.settings.collection, ids=list(chunk), timeout=self.settings.timeout_s))
                self._refresh_count()
        return len(found), [i for i in ids if i not in found]

    def maybe_save(self, interval_s: float) -> bool:
        """Nothing to snapshot: Milvus persists writes itself."""
        return False

    def close(self) -> None:
        """Let go of the connection (the collection stays in Milvus)."""
        if self._closed:
            return
        self._closed = True
        with self._connect_lock:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()
                self._client = None
                if _is_local(self.settings.uri):
                    self._release_local()

    def __enter__(self) -> MilvusIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_k(k: int) -> int:
    if int(k) <= 0:
        raise InvalidArgument("top_k", f"must be > 0 (got {k})")
    return int(k)


def _ranked(raw: list[_Raw]) -> list[Candidate]:
    return [Candidate(h.id, h.score, i) for i, h in enumerate(raw)]


def _chunks(items: list[str], size: int = _ID_CHUNK) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---------------------------------------------------------------------------------------------
# `twostage index build --milvus-uri URI --collection NAME`
# ---------------------------------------------------------------------------------------------


def _alias_target(index: MilvusIndex, name: str) -> str | None:
    """The collection alias `name` points at, or None when `name` is not an alias."""
    c = index.client
    try:
        found = index._call("reading aliases", lambda: c.describe_alias(name, timeout=index.settings.timeout_s),
                            retry_load=False)
    except Unavailable:
        raise
    except Exception:  # noqa: BLE001 - Milvus answers "no such alias" with an error
        return None
    return str(found.get("collection_name") or "") or None


def _properties(index: MilvusIndex, name: str) -> dict[str, str]:
    c = index.client
    desc = index._call("describing a collection", lambda: c.describe_collection(name, timeout=index.settings.timeout_s),
                       retry_load=False)
    return {str(k): str(v) for k, v in (desc.get("properties") or {}).items()}


def build_collection(corpus: Path | str, settings: MilvusSettings, fingerprint: ModelFingerprint,
                     embed: Callable[[list[str]], np.ndarray], *, batch_size: int = 256, progress: bool = True,
                     progress_stream: TextIO | None = None) -> BuildReport:
    """Embed every document of `corpus` into a new collection and make `settings.collection` name it.

    The name is a Milvus alias, switched in one step, so servers on it move from the old documents to the
    new ones at once, and a crash leaves the old ones served. The new collection is
    `<name>__build_<UTC time>`; an interrupted build of the same corpus for the same model is resumed (ids
    already there are skipped), any other leftover build collection is dropped. If `name` is still a plain
    collection (made by `twostage serve`), it is dropped just before the alias is created: servers answer
    UNAVAILABLE for that moment and recover by themselves. A collection not made by twostage is never
    dropped."""
    from pathlib import Path

    from ..indexing import BuildReport, ProgressBar, _batches, _check_embeddings, check_corpus, iter_corpus_lines

    corpus = Path(corpus)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0 (got {batch_size})")
    started = time.monotonic()
    name = settings.collection
    summary = check_corpus(corpus)
    if progress:
        print(f"checked {corpus}: {summary.documents} documents in {time.monotonic() - started:.1f} s",
              file=progress_stream, flush=True)
    state = {f"{PROPERTY_PREFIX}build_corpus_sha256": summary.sha256,
             f"{PROPERTY_PREFIX}build_documents": str(summary.documents)}
    admin = MilvusIndex(settings, fingerprint)
    admin._client = admin._call("connecting", admin._new_client, retry_load=False)
    try:
        c = admin.client
        live = _alias_target(admin, name)
        plain = live is None and admin._call("checking the collection", admin._exists, retry_load=False)
        if plain and _properties(admin, name).get(f"{PROPERTY_PREFIX}schema") != SCHEMA_VERSION:
            raise FailedPrecondition(f"Milvus collection {name!r} was not created by twostage; not replacing it "
                                     f"(choose another --collection)")
        staging = None
        wanted = {**state, **fingerprint.properties(), f"{PROPERTY_PREFIX}metric": settings.metric}
        for other in admin._call("listing collections", lambda: c.list_collections(timeout=settings.timeout_s)):
            if not str(other).startswith(name + BUILD_INFIX) or other == live:
                continue
            props = _properties(admin, other)
            if staging is None and all(props.get(k) == v for k, v in wanted.items()):
                staging = str(other)
            else:
                log.info("dropping the leftover build collection %s", other)
                admin._call("dropping a collection",
                            functools.partial(c.drop_collection, other, timeout=settings.timeout_s))
        resumed = staging is not None
        staging = staging or name + BUILD_INFIX + time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        embedded = skipped = 0
        bar = ProgressBar(summary.documents, stream=progress_stream, enabled=progress)
        with MilvusIndex.open(dataclasses.replace(settings, collection=staging), fingerprint,
                              properties=state) as index:
            for batch in _batches(iter_corpus_lines(corpus), batch_size):
                if resumed:
                    stored = index.existing_ids([d.id for d in batch])
                    if stored:
                        skipped += len(stored)
                        bar.advance(len(stored), timed=False)
                        batch = [d for d in batch if d.id not in stored]
                        if not batch:
                            continue
                vectors = _check_embeddings(embed([embedding_text(d.title, d.text) for d in batch]),
                                            len(batch), fingerprint.dimension)
                index.upsert(batch, vectors)
                embedded += len(batch)
                bar.advance(len(batch))
            bar.close()
            if index._refresh_count() != summary.documents:
                raise RuntimeError(f"collection {staging} holds {index.size} documents but {corpus} has "
                                   f"{summary.documents}; run the build again to resume it")
        timeout = settings.timeout_s
        if live is not None:
            admin._call("switching the alias", lambda: c.alter_alias(staging, name, timeout=timeout))
            admin._call("dropping the previous collection", lambda: c.drop_collection(live, timeout=timeout))
        else:
            if plain:
                admin._call("dropping the previous collection", lambda: c.drop_collection(name, timeout=timeout))
            admin._call("creating the alias", lambda: c.create_alias(staging, name, timeout=timeout))
    finally:
        admin.close()
    seconds = time.monotonic() - started
    return BuildReport(index_dir=f"Milvus collection {name} (alias of {staging}) at {settings.safe_uri}",
                       documents=summary.documents, embedded=embedded, skipped=skipped, resumed=resumed,
                       seconds=round(seconds, 3), docs_per_s=round(embedded / seconds, 2) if seconds > 0 else 0.0,
                       corpus_sha256=summary.sha256)
