"""The one configuration object. Every knob has a default, a help text, and can be set from

1. a config file (`--config FILE`, TOML or JSON, flat keys as below, or grouped in [sections] whose
   keys are prefixed: `[rerank] max_batch_tokens = 4096` sets `rerank_max_batch_tokens`),
2. an environment variable `TWOSTAGE_<KEY>` (e.g. `TWOSTAGE_RERANK_MAX_DELAY_MS=5`),
3. a command-line flag `--<key-with-dashes>`,

later sources overriding earlier ones (flag > environment > file > default).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "TWOSTAGE_"


def knob(default: Any, help: str, *, choices: tuple | None = None, aliases: tuple[str, ...] = (),
         flag: bool = True) -> Any:
    """A config field. `aliases`: extra flag spellings; `flag=False`: no flag (secrets: a flag would show
    in the process list), only file and environment."""
    meta = {"help": help, "choices": choices, "aliases": aliases, "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # -- where things are
    models: str = knob("./models", "model set directory made by `twostage export` (holds bi-encoder/ and cross-encoder/)")
    index: str = knob("./index", "index directory (usearch HNSW + SQLite document store); created if missing")
    milvus_uri: str = knob("", "keep stage 1 in Milvus instead of the index directory: http(s)://host:port, or a local path ending in .db for the embedded milvus-lite (empty = the index directory; not together with `index`)")
    milvus_collection: str = knob("twostage", "Milvus collection (or alias) holding the documents; created if missing", aliases=("--collection",))
    milvus_token: str = knob("", "Milvus token (user:password or an API key); from the environment or the config file only, never logged", flag=False)
    milvus_timeout_s: float = knob(10.0, "seconds one Milvus call may take; past it the request fails with UNAVAILABLE")
    # -- network
    host: str = knob("127.0.0.1", "address to listen on (0.0.0.0 or [::] for all interfaces)")
    port: int = knob(50051, "gRPC port (0 = pick a free port and log it)")
    metrics_port: int = knob(9464, "Prometheus metrics HTTP port (0 = pick a free port, -1 = off)")
    max_message_bytes: int = knob(16 * 1024 * 1024, "largest gRPC message received or sent, in bytes")
    max_concurrent_rpcs: int = knob(256, "twostage RPCs served at once; beyond it new ones get RESOURCE_EXHAUSTED (health watches and reflection are not counted)")
    grace_period_s: float = knob(10.0, "on SIGTERM/SIGINT: seconds in-flight requests get to finish")
    # -- security
    tls_cert: str = knob("", "PEM server certificate chain (enables TLS with tls_key)")
    tls_key: str = knob("", "PEM server private key")
    tls_client_ca: str = knob("", "PEM CA bundle; when set, clients must present a certificate it signed")
    read_api_keys: list = knob([], "API keys allowed to call Search/Rerank/Embed/Info (comma-separated in env; empty with no write keys = auth off)")
    write_api_keys: list = knob([], "API keys allowed to call everything, including Upsert/Delete")
    # -- runtime
    execution_provider: str = knob("cpu", "ONNX Runtime execution provider", choices=("cpu", "cuda"))
    inference_workers: int = knob(0, "batches that run at once, across both models, each on its own thread (0 = the CPUs this process may use, from its affinity mask and cgroup CPU quota, with execution_provider cpu; 1 with cuda)")
    intra_op_threads: int = knob(0, "ONNX Runtime intra-op threads per running batch (0 = CPU cores / inference_workers, at least 1)")
    inference_nice: int = knob(0, "lower the inference worker threads' CPU priority by this much (Linux nice, 0-19; 0 = the process's own) so that answering requests and feeding batches come first when every core is busy")
    ort_allow_spinning: bool = knob(False, "let ONNX Runtime worker threads spin between ops (lower latency on an idle machine; off can help when cores are shared)")
    # -- batching (one batcher per model)
    batching: bool = knob(True, "dynamic batching across requests (off: each request's work runs alone)")
    embed_max_batch_tokens: int = knob(512, "bi-encoder: most padded tokens in one batch (small batches on one worker per core beat big ones on all cores: docs/benchmarks.md)")
    embed_max_batch_size: int = knob(64, "bi-encoder: most texts in one batch")
    embed_max_delay_ms: float = knob(0.5, "bi-encoder: longest wait for more work once a batch has started to fill (small: a lone query pays it in full)")
    embed_max_queued_tokens: int = knob(1_000_000, "bi-encoder: queued-token bound; beyond it RESOURCE_EXHAUSTED")
    rerank_max_batch_tokens: int = knob(256, "cross-encoder: most padded tokens in one batch (a longer pair runs alone; small batches on one worker per core beat big ones on all cores: docs/benchmarks.md)")
    rerank_max_batch_size: int = knob(16, "cross-encoder: most pairs in one batch")
    rerank_max_delay_ms: float = knob(2.0, "cross-encoder: longest wait for more work once a batch has started to fill")
    rerank_max_queued_tokens: int = knob(1_000_000, "cross-encoder: queued-token bound; beyond it RESOURCE_EXHAUSTED")
    free_worker_within_ms: float = knob(20.0, "while latency-critical work (a query embedding) may arrive, keep some inference worker predicted to free within this many ms by cutting other batches shorter (0 = off; server/batcher.py)")
    warm_up_batches: int = knob(12, "batches of assorted sizes each model runs at startup so that its cost estimate (fixed + per-token batch cost, used to plan latency budgets) is measured before the first request (0 = none)")
    # -- index
    index_metric: str = knob("cos", "vector metric", choices=("cos", "ip", "l2sq"))
    index_dtype: str = knob("f32", "stored scalar type of the HNSW index", choices=("f32", "f16", "i8"))
    index_connectivity: int = knob(16, "HNSW connectivity (M)")
    index_expansion_add: int = knob(128, "HNSW expansion factor at insertion (ef_construction)")
    index_expansion_search: int = knob(256, "HNSW expansion factor at search (ef); 256 keeps recall@100 vs exact search >= 0.95 (docs/benchmarks.md); an index of at most this many documents is searched exactly")
    index_view: bool = knob(False, "memory-map the saved index read-only (Upsert/Delete refused)")
    index_save_interval_s: float = knob(30.0, "seconds between snapshots of the HNSW graph (writes are durable in SQLite at once)")
    # -- request limits
    max_query_bytes: int = knob(4096, "longest query, UTF-8 bytes")
    max_text_bytes: int = knob(262_144, "longest document text or title, UTF-8 bytes")
    max_id_bytes: int = knob(256, "longest document id, UTF-8 bytes")
    max_rerank_documents: int = knob(1000, "most documents in one Rerank request")
    max_embed_texts: int = knob(1000, "most texts in one Embed request")
    max_upsert_documents: int = knob(1000, "most documents (or ids) in one Upsert (or Delete) request")
    max_metadata_bytes: int = knob(65_536, "largest document metadata, as compact JSON in UTF-8 bytes")
    max_filter_keys: int = knob(64, "most keys in one Search filter")
    max_top_k: int = knob(1000, "largest Search top_k")
    max_candidates: int = knob(1000, "largest Search candidates")
    # -- defaults for fields left at 0
    default_top_k: int = knob(10, "Search top_k when 0")
    default_candidates: int = knob(20, "Search candidates (stage-1 hits reranked) when 0")
    default_chunk_overlap_tokens: int = knob(32, "Rerank chunk_overlap_tokens when 0 (long-document mode)")
    default_latency_budget_ms: int = knob(0, "whole-request latency budget of Search and Rerank when a request gives none, in ms (0 = none; the gRPC deadline always applies)")
    latency_reserve_ms: float = knob(5.0, "kept back from every request's deadline (budget or gRPC deadline) for building, serializing and sending the response")
    filter_overfetch: int = knob(4, "with a metadata filter, fetch this many times more candidates per round")
    # -- retrieval and fusion (docs/benchmarks.md#hybrid-retrieval has the measurements behind the defaults)
    retrieval_mode: str = knob("hybrid", "Search stage 1 when a request leaves it unspecified", choices=("dense", "lexical", "hybrid"))
    fusion: str = knob("convex", "how hybrid retrieval fuses the dense and lexical lists", choices=("convex", "rrf"))
    fusion_weight: float = knob(0.5, "convex fusion: weight of the dense list in [0, 1] (the lexical list gets the rest)")
    hybrid_depth: int = knob(100, "hybrid retrieval: hits taken from each list before fusion (at least the request's candidates)")
    rerank_weight: float = knob(-1.0, "weight of the cross-encoder in a reranked hit's final score, in [0, 1] (1 = cross-encoder alone); negative = query-adaptive (set per query from the cross-encoder's own scores)")
    # -- logging
    log_level: str = knob("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = knob("json", "log format", choices=("json", "text"))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_sources(cls, args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None,
                     config_file: str | None = None) -> Config:
        """Defaults <- file <- environment <- flags (only flags the user actually gave)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        config_file = config_file or (getattr(args, "config", None) if args is not None else None)
        if config_file:
            values.update(_read_file(Path(config_file)))
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in env:
                values[f.name] = env[key]
        if args is not None:
            for f in fields(cls):
                v = getattr(args, f.name, None)
                if v is not None:
                    values[f.name] = v
        cfg = cls()
        for name, raw in values.items():
            setattr(cfg, name, _coerce(cls, name, raw))
        if "index" in values and cfg.milvus_uri:
            raise ValueError("invalid configuration: give either index (the embedded backend) or milvus_uri "
                             "(Milvus), not both")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        problems = []
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"{f.name}={getattr(self, f.name)!r} not one of {choices}")
        positive = [f.name for f in fields(self) if f.name.startswith(("max_", "embed_max", "rerank_max", "default_"))
                    and f.name != "default_latency_budget_ms"
                    or f.name in ("index_connectivity", "index_expansion_add", "index_expansion_search", "filter_overfetch")]
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        if not 0.0 <= self.fusion_weight <= 1.0:
            problems.append(f"fusion_weight must be in [0, 1] (got {self.fusion_weight})")
        if not self.rerank_weight <= 1.0:
            problems.append(f"rerank_weight must be at most 1 (negative = query-adaptive; got {self.rerank_weight})")
        for name in ("default_latency_budget_ms", "latency_reserve_ms", "free_worker_within_ms", "warm_up_batches"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if not 0 <= self.inference_nice <= 19:
            problems.append(f"inference_nice must be between 0 and 19 (got {self.inference_nice})")
        if self.hybrid_depth <= 0:
            problems.append(f"hybrid_depth must be > 0 (got {self.hybrid_depth})")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca needs tls_cert and tls_key")
        problems += _milvus_problems(self)
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))

    def as_dict(self, redact: bool = True) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if redact:
            for k in ("read_api_keys", "write_api_keys"):
                d[k] = [f"<{len(d[k])} keys>"] if d[k] else []
            d["milvus_token"] = "<set>" if d["milvus_token"] else ""
        return d


_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")


def _milvus_problems(cfg: Config) -> list[str]:
    """milvus_uri is empty, http(s)://host:port or a path ending in .db; the collection name is one Milvus
    accepts (letters, digits, underscores, not starting with a digit)."""
    problems = []
    uri = cfg.milvus_uri
    if uri:
        scheme, sep, rest = uri.partition("://")
        if sep:
            hostport = rest.rsplit("@", 1)[-1].rstrip("/")
            host, colon, port = hostport.rpartition(":")
            if scheme not in ("http", "https") or not colon or not host or not port.isdigit() or "/" in hostport:
                problems.append(f"milvus_uri={uri!r} must be http(s)://host:port or a local path ending in .db")
        elif not uri.endswith(".db"):
            problems.append(f"milvus_uri={uri!r} must be http(s)://host:port or a local path ending in .db")
    if not _COLLECTION_NAME.fullmatch(cfg.milvus_collection):
        problems.append(f"milvus_collection={cfg.milvus_collection!r} must be letters, digits and underscores, "
                        f"not starting with a digit, at most 201 characters")
    if cfg.milvus_timeout_s <= 0:
        problems.append(f"milvus_timeout_s must be > 0 (got {cfg.milvus_timeout_s})")
    return problems


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import tomllib
        data = tomllib.loads(text)
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                flat[f"{k}_{k2}".replace("-", "_")] = v2
        else:
            flat[k.replace("-", "_")] = v
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}")
    return flat


def default_of(f: dataclasses.Field[Any]) -> Any:
    """A knob's default value (a fresh list for list knobs)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _coerce(cls, name: str, raw: Any) -> Any:
    default = default_of(next(f for f in fields(cls) if f.name == name))
    try:
        if isinstance(default, bool):
            if isinstance(raw, str):
                low = raw.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(raw)
            return bool(raw)
        if isinstance(default, list):
            if isinstance(raw, str):
                return [p.strip() for p in raw.split(",") if p.strip()]
            return list(raw)
        return type(default)(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config {name}: cannot read {raw!r} as {type(default).__name__}") from exc


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Add a flag for every knob (or those in `only`), with its default and env variable in the help."""
    parser.add_argument("--config", default=None, help="config file (TOML or JSON); see docs/configuration.md")
    for f in fields(Config):
        if (only is not None and f.name not in only) or not f.metadata["flag"]:
            continue
        default = default_of(f)
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata['help']} (default: {default!r}; env {env})"
        flags = (flag, *f.metadata["aliases"])
        if isinstance(default, bool):
            parser.add_argument(*flags, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
        elif isinstance(default, list):
            parser.add_argument(*flags, dest=f.name, default=None, type=lambda s: [p for p in s.split(",") if p],
                                help=help_text + " comma-separated")
        else:
            parser.add_argument(*flags, dest=f.name, default=None, type=type(default),
                                choices=f.metadata.get("choices"), help=help_text)
