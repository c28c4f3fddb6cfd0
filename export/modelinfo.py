"""Read what the served model needs from a checkpoint's configuration files: pooling and normalization
(sentence-transformers config), the query prefix, max_length, and cross-encoder labels. Also copies tokenizer
files.

Pure standard library except `ensure_fast_tokenizer`, which imports transformers only when a checkpoint
ships no tokenizer.json.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from twostage.model.postprocess import POOLING_MODES

from .errors import ExportError

# Files that make up a Hugging Face tokenizer, copied verbatim into the model directory.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
)
# Architectures whose position table reserves two slots for the padding offset.
_POSITION_OFFSET_TWO = {"roberta", "xlm-roberta", "camembert", "longformer"}
_FALLBACK_MAX_LENGTH = 512
# Label names taken as "this pair is relevant" for a multi-label cross-encoder head.
_POSITIVE_LABEL_NAMES = {"relevant", "label_1", "entailment", "positive", "yes", "true", "match"}
# sentence-transformers modules the served graph + postprocess reproduce.
_ST_SUPPORTED = ("Transformer", "Pooling", "Normalize")
# Query instructions a model's authors recommend for short-query retrieval, by hub id, for models whose files do
# not carry one (config_sentence_transformers.json "prompts"). BAAI/bge-small-en-v1.5: its model card
# (https://huggingface.co/BAAI/bge-small-en-v1.5, the instruction table under "Usage") gives this prefix for
# queries searching passages; passages get none.
KNOWN_QUERY_PREFIXES = {"BAAI/bge-small-en-v1.5": "Represent this sentence for searching relevant passages: "}


J = TypeVar("J", dict, list)


def _read_json_as(path: Path, expected: type[J], what: str) -> J | None:
    """Parse a JSON file holding `expected`; None when absent. A malformed file, or one holding anything else,
    is an error naming it ("expected <what>")."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable JSON: {exc}") from exc
    if not isinstance(data, expected):
        raise ExportError(f"{path}: expected {what}")
    return data


def read_json(path: Path) -> dict[str, Any] | None:
    """Parse a JSON object file; None when absent. A malformed file is an error naming it."""
    return _read_json_as(path, dict, "a JSON object")


@dataclass(frozen=True)
class PoolingInfo:
    pooling: str
    normalize: bool
    origin: str  # the file the choice came from, or "default"


def pooling_from_config(config: dict[str, Any], path: Path) -> str:
    """Map a sentence-transformers Pooling config onto one of POOLING_MODES."""
    if isinstance(config.get("pooling_mode"), str):
        mode = {"mean": "mean", "cls": "cls", "max": "max"}.get(config["pooling_mode"])
        if mode is None:
            raise ExportError(f"{path}: pooling_mode {config['pooling_mode']!r} is not supported "
                              f"(supported: {list(POOLING_MODES)})")
        return mode
    flags = {
        "cls": config.get("pooling_mode_cls_token", False),
        "mean": config.get("pooling_mode_mean_tokens", False),
        "max": config.get("pooling_mode_max_tokens", False),
    }
    unsupported = [k for k in ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                               "pooling_mode_lasttoken") if config.get(k)]
    chosen = [mode for mode, on in flags.items() if on]
    if unsupported or len(chosen) != 1:
        raise ExportError(f"{path}: pooling must be exactly one of {list(POOLING_MODES)}; the config enables "
                          f"{chosen + unsupported or 'none'}")
    return chosen[0]


def read_pooling(model_dir: Path) -> PoolingInfo:
    """Pooling mode and normalization from modules.json / <pooling dir>/config.json.

    Without sentence-transformers files: mean pooling without normalization (sentence-transformers'
    own default for a plain transformer checkpoint), origin "default"."""
    model_dir = Path(model_dir)
    modules_path = model_dir / "modules.json"
    modules = _read_json_as(modules_path, list, "a list of modules")
    if modules is None:
        pooling_cfg_path = model_dir / "1_Pooling" / "config.json"
        cfg = read_json(pooling_cfg_path)
        if cfg is None:
            return PoolingInfo("mean", False, "default")
        return PoolingInfo(pooling_from_config(cfg, pooling_cfg_path), False, str(pooling_cfg_path))
    pooling_dir = None
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _ST_SUPPORTED:
            raise ExportError(f"{modules_path}: module {module.get('type')!r} is not supported; the served model "
                              f"reproduces only {list(_ST_SUPPORTED)}")
        if kind == "Pooling":
            pooling_dir = model_dir / module.get("path", "")
        elif kind == "Normalize":
            normalize = True
    if pooling_dir is None:
        raise ExportError(f"{modules_path}: no Pooling module listed")
    cfg_path = pooling_dir / "config.json"
    cfg = read_json(cfg_path)
    if cfg is None:
        raise ExportError(f"{cfg_path}: missing (modules.json lists a Pooling module there)")
    return PoolingInfo(pooling_from_config(cfg, cfg_path), normalize, str(modules_path))


def given_pooling(read: PoolingInfo, pooling: str | None, normalize: bool | None) -> tuple[PoolingInfo, list[str]]:
    """Apply --pooling / --normalize to what the model's files say: a given value wins. Returns the result and a
    warning for each given value that contradicts the files (none when the files said nothing, origin
    "default")."""
    warnings = []
    given = []
    if pooling is not None:
        if pooling not in POOLING_MODES:
            raise ExportError(f"--pooling {pooling!r}: not one of {list(POOLING_MODES)}")
        if read.origin != "default" and pooling != read.pooling:
            warnings.append(f"--pooling {pooling} overrides pooling {read.pooling} stated by {read.origin}")
        given.append(f"--pooling {pooling}")
    if normalize is not None:
        if read.origin != "default" and normalize != read.normalize:
            warnings.append(f"--{'' if normalize else 'no-'}normalize overrides normalize {read.normalize} stated "
                            f"by {read.origin}")
        given.append("--normalize" if normalize else "--no-normalize")
    if not given:
        return read, warnings
    if len(given) == 1:
        given.append(f"{'normalize' if pooling is not None else 'pooling'} from {read.origin}")
    result = PoolingInfo(read.pooling if pooling is None else pooling,
                         read.normalize if normalize is None else normalize, "; ".join(given))
    return result, warnings


@dataclass(frozen=True)
class QueryPrefix:
    text: str  # prepended to each query before embedding; "" for none
    origin: str  # the file or record it came from, or "none"


def read_query_prefix(model_dir: Path, name: str) -> QueryPrefix:
    """The query prefix of a bi-encoder: sentence-transformers' `prompts["query"]` in
    config_sentence_transformers.json, else the model authors' recommendation for a known model (by hub id),
    else none."""
    path = Path(model_dir) / "config_sentence_transformers.json"
    config = read_json(path)
    prompts = config.get("prompts") if isinstance(config, dict) else None
    if isinstance(prompts, dict) and isinstance(prompts.get("query"), str):
        return QueryPrefix(prompts["query"], f"{path} prompts.query")
    if name in KNOWN_QUERY_PREFIXES:
        return QueryPrefix(KNOWN_QUERY_PREFIXES[name], f"model card of {name}")
    return QueryPrefix("", "none")


def position_limit(hf_config: dict[str, Any] | None) -> int | None:
    """Longest input the position table allows, or None when unknown."""
    if not hf_config or not isinstance(hf_config.get("max_position_embeddings"), int):
        return None
    limit = hf_config["max_position_embeddings"]
    if hf_config.get("model_type") in _POSITION_OFFSET_TWO:
        limit -= 2
    return limit


def read_max_length(model_dir: Path, role: str, hf_config: dict[str, Any] | None = None) -> int:
    """Bi-encoder: sentence_bert_config.json max_seq_length; otherwise (and for cross-encoders) the
    tokenizer's model_max_length, else its baked-in truncation, else 512 — always capped by the
    position table (max_position_embeddings)."""
    model_dir = Path(model_dir)
    limit = position_limit(hf_config)
    if role == "bi-encoder":
        st = read_json(model_dir / "sentence_bert_config.json")
        if st and isinstance(st.get("max_seq_length"), int) and st["max_seq_length"] > 0:
            return min(st["max_seq_length"], limit) if limit else st["max_seq_length"]
    candidate = None
    tok_cfg = read_json(model_dir / "tokenizer_config.json") or {}
    value = tok_cfg.get("model_max_length")
    if isinstance(value, (int, float)) and 0 < value < 1_000_000:
        candidate = int(value)
    if candidate is None:
        tok = read_json(model_dir / "tokenizer.json") or {}
        truncation = tok.get("truncation") or {}
        if isinstance(truncation.get("max_length"), int):
            candidate = truncation["max_length"]
    if candidate is None:
        candidate = _FALLBACK_MAX_LENGTH
    return min(candidate, limit) if limit else candidate


def label_names(hf_config: dict[str, Any] | None, num_labels: int) -> list[str]:
    """Label names in index order from config.json id2label, else LABEL_i."""
    id2label = (hf_config or {}).get("id2label") or {}
    names = []
    for i in range(num_labels):
        names.append(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))))
    return names


def choose_positive_label(labels: list[str]) -> int:
    """The label index used as the relevance score: 0 for a single logit; otherwise the label named like
    "relevant"/"LABEL_1"/"entailment" (case-insensitive, exact name), else the last one."""
    if len(labels) <= 1:
        return 0
    for index, name in enumerate(labels):
        if name.strip().lower().replace("-", "_").replace(" ", "_") in _POSITIVE_LABEL_NAMES:
            return index
    return len(labels) - 1


def copy_tokenizer_files(source_dirs: list[Path], dest: Path) -> list[str]:
    """Copy known tokenizer files from the first directory that has each; return the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        for directory in source_dirs:
            path = Path(directory) / name
            if path.is_file():
                shutil.copyfile(path, Path(dest) / name)
                copied.append(name)
                break
    return copied


def ensure_fast_tokenizer(source_dir: Path, dest: Path) -> None:
    """Make sure dest/tokenizer.json exists, converting the slow tokenizer in source_dir with transformers."""
    if (Path(dest) / "tokenizer.json").is_file():
        return
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ExportError(f"{source_dir}: no tokenizer.json, and transformers (needed to convert the tokenizer) "
                          "is not installed: pip install 'twostage[export]'") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source_dir), use_fast=True)
    except Exception as exc:  # transformers raises many kinds here
        raise ExportError(f"{source_dir}: no tokenizer.json and the tokenizer could not be loaded: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{source_dir}: no tokenizer.json and no fast tokenizer conversion is available")
    tokenizer.save_pretrained(str(dest))
    if not (Path(dest) / "tokenizer.json").is_file():
        raise ExportError(f"{source_dir}: converting the tokenizer did not produce tokenizer.json")
