"""The model directory contract: `manifest.json` beside the ONNX and tokenizer files, and its verification.

The export step writes it (twostage.export.manifest); the server, `twostage index build` and the benchmarks load
only directories whose manifest verifies (`verify_model_dir`). Pure standard library.

A model directory looks like::

    cross-encoder/
      manifest.json
      model.onnx            # the served model (static int8 unless quantization was refused)
      model_fp32.onnx       # optimized fp32 kept beside it (absent for an already-int8 source, whose fp32
                            # rebuild is not an original fp32 model)
      tokenizer.json        # fast tokenizer; plus any tokenizer_config.json, vocab.txt, ...

Manifest fields (``FORMAT`` = "twostage-model/1")::

    format, role ("bi-encoder" | "cross-encoder"), task ("embedding" | "rerank"),
    name, source {kind: hub|checkpoint|onnx|package, id, path, revision},
    model_file, fp32_file (or null), tokenizer_file,
    inputs [names], output (name),
    max_length, dimension (embedding size, or number of labels for a cross-encoder),
    pooling ("mean"|"cls"|"max"|null), normalize (bool),
    labels ([names] for cross-encoders), positive_label (index used as the score),
    quantization {mode, target, per_channel, reduce_range, weight_type} ,
    opset, onnxruntime_version, tool_versions {..},
    gate {passed, reference, calibration, pairs, metrics{..}, thresholds{..}},
    files {relative path: sha256}    # every file in the directory except manifest.json

Optional fields written by `twostage export` (readers must not require them)::

    source.format ("checkpoint"|"onnx"), source.onnx_file, source.package_version,
    quantization.applied_by ("twostage export"|"source"), quantization.activation_type,
    quantization.op_types, quantization.reason (why none),
    quantization (mode "static-int8") {activation_scales, calibration_tokens, calibration, operator, matmuls,
        activations, bias_folded, batch_invariant, source_quantization (an int8 source's own scheme)},
    optimization {dequantized {tool, rewritten} (int8 sources), fp32 {tool, model_type, opt_level,
        fusions_enabled, fused{op: count}, opset, check {reference, inputs, max_difference, tolerance}},
        first_token_readout {file: {tensors_sliced, attentions_narrowed}} (only when applied)},
    pooling_origin (the config file pooling was read from, or "default"),
    query_prefix (bi-encoder: text prepended to each search query, never to documents, before embedding;
        "" for none; null for cross-encoders; absent in older manifests = none), query_prefix_origin,
    gate.candidate, gate.checked {metric: threshold name}, gate.failures [..],
    gate.metrics.batch_variation (a row alone vs in a padded batch: score difference / cosine distance),
    gate.secondary {reference, metrics} (an int8 source: figures against its fp32 rebuild),
    gate.served (the reference name, when the gate failed and the reference is served),
    facts {model_type},
    fingerprint (sha256 of fingerprint_inputs: source revision, options, calibration, tool versions),
    fingerprint_inputs {..}
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "twostage-model/1"
MANIFEST_NAME = "manifest.json"
ROLES = {"bi-encoder": "embedding", "cross-encoder": "rerank"}
REQUIRED_FIELDS = (
    "format", "role", "task", "name", "source", "model_file", "tokenizer_file", "inputs", "output",
    "max_length", "dimension", "quantization", "opset", "onnxruntime_version", "gate", "files",
)


class ManifestError(Exception):
    """A model directory is missing, incomplete, or does not match its manifest. The message names the file."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    """Parse manifest.json without verifying checksums."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found (is {directory} a directory made by `twostage export`?)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [f for f in REQUIRED_FIELDS if f not in manifest]
    if missing:
        raise ManifestError(f"{path}: missing fields {missing}")
    if manifest["role"] not in ROLES or ROLES[manifest["role"]] != manifest["task"]:
        raise ManifestError(f"{path}: role/task {manifest['role']!r}/{manifest['task']!r} not one of {ROLES}")
    return manifest


@dataclass(frozen=True)
class ModelDir:
    """A verified model directory."""

    path: Path
    manifest: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest["model_file"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer_file"]

    @property
    def query_prefix(self) -> str:
        """Text to prepend to a search query before embedding it with this bi-encoder ("" for none)."""
        return str(self.manifest.get("query_prefix") or "")


def verify_model_dir(directory: Path, expected_role: str | None = None) -> ModelDir:
    """Check manifest.json and the sha256 of every file it lists; raise ManifestError naming the first bad file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ManifestError(f"{directory}: model directory not found")
    manifest = read_manifest(directory)
    if expected_role is not None and manifest["role"] != expected_role:
        raise ManifestError(
            f"{directory / MANIFEST_NAME}: role is {manifest['role']!r}, expected {expected_role!r}"
        )
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"{directory / MANIFEST_NAME}: 'files' lists no checksums")
    for needed in (manifest["model_file"], manifest["tokenizer_file"]):
        if needed not in files:
            raise ManifestError(f"{directory / needed}: required file is not covered by the manifest checksums")
    for rel, expected in sorted(files.items()):
        path = directory / rel
        if not path.is_file():
            raise ManifestError(f"{path}: listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ManifestError(f"{path}: sha256 mismatch (manifest {expected[:12]}…, file {actual[:12]}…): "
                                "the file was modified or truncated after export")
    return ModelDir(path=directory, manifest=manifest)
