"""Things the benchmarks prepare once and cache between runs (under `--cache`, outside the repository):

- `fp32_model_set`: a model set whose bi-encoder serves the exported fp32 graph (`model_fp32.onnx`, kept beside
  the int8 `model.onnx` by the export step) instead of the int8 one; the cross-encoder is the same directory.
- `corpus_index`: an index directory built from a BEIR corpus with the code path of `twostage index build`
  (the server's batcher and bi-encoder, then `build_index`), reused while models, corpus and settings match.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from twostage.model.manifest import read_manifest, sha256_file, verify_model_dir


def bi_encoder_fingerprint(models: Path) -> str:
    """sha256 of the served bi-encoder graph, from its manifest."""
    manifest = read_manifest(Path(models) / "bi-encoder")
    return manifest["files"][manifest["model_file"]]


def _variant_dir(out: Path, role: str) -> Path | None:
    """The role folder of a fresh model-set variant at `out`; None when a finished one is already there."""
    folder = out / role
    if (folder / "manifest.json").is_file():
        return None
    if out.exists():
        shutil.rmtree(out)
    folder.mkdir(parents=True)
    return folder


def fp32_model_set(models: Path, cache: Path) -> Path:
    """A model set in `cache` whose bi-encoder manifest points at `model_fp32.onnx` (files are symlinks)."""
    models = Path(models).resolve()
    src = verify_model_dir(models / "bi-encoder", "bi-encoder")
    fp32_file = src.manifest.get("fp32_file")
    if not fp32_file or not (src.path / fp32_file).is_file():
        raise SystemExit(f"{src.path / 'manifest.json'}: no fp32 graph kept beside the int8 one (fp32_file is "
                         f"{fp32_file!r}); re-export without discarding it to compare fp32 and int8")
    out = Path(cache) / f"models-fp32-bi-encoder-{src.manifest['files'][fp32_file][:12]}"
    bi = _variant_dir(out, "bi-encoder")
    if bi is None:
        return out
    for name in src.manifest["files"]:
        (bi / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src.path / name, bi / name)
    manifest = dict(src.manifest)
    manifest["model_file"] = fp32_file
    manifest["quantization"] = {"mode": "none", "note": "fp32 variant made by bench/prepare.py for comparison"}
    (bi / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.symlink(models / "cross-encoder", out / "cross-encoder")
    verify_model_dir(bi, "bi-encoder")
    return out


def source_onnx(manifest: dict[str, Any]) -> Path | None:
    """The ONNX file a model directory was exported from (a packaged or local ONNX source), if it is here."""
    from twostage.export.sources import PACKAGED_DEFAULTS, packaged_model_dir

    source = manifest.get("fingerprint_inputs", {}).get("source", {})
    if source.get("format") != "onnx" or not source.get("onnx_file"):
        return None
    directory: Path | None
    if source.get("kind") == "package":
        model = next((m for m in PACKAGED_DEFAULTS.values() if m.package == source.get("id")), None)
        try:
            directory = packaged_model_dir(model) if model is not None else None
        except ModuleNotFoundError:
            directory = None
    else:
        directory = Path(str(source.get("id", "")))
    path = directory / source["onnx_file"] if directory is not None else None
    return path if path is not None and path.is_file() else None


def fp32_cross_encoder_set(models: Path, cache: Path) -> Path:
    """A model set in `cache` whose cross-encoder is the fp32 rebuild of the served cross-encoder's int8 source:
    the source's own weights, dequantized exactly (export/dequantize.py), run in fp32 (no activation
    quantization). No fp32 checkpoint of the packaged reranker exists offline; this is the closest fp32 model.
    The bi-encoder is the served one (symlinked)."""
    import onnx

    from twostage.export.dequantize import dequantize_model

    models = Path(models).resolve()
    served = verify_model_dir(models / "cross-encoder", "cross-encoder")
    source = source_onnx(served.manifest)
    if source is None:
        raise SystemExit(f"{served.path}: not exported from an int8 ONNX file found here; no fp32 rebuild to make")
    out = Path(cache) / f"models-fp32-rebuild-cross-encoder-{sha256_file(source)[:12]}"
    ce = _variant_dir(out, "cross-encoder")
    if ce is None:
        return out
    record = dequantize_model(source, ce / "model.onnx")
    files = {name: digest for name, digest in served.manifest["files"].items() if name != served.manifest["model_file"]}
    for name in files:
        os.symlink(served.path / name, ce / name)
    files["model.onnx"] = sha256_file(ce / "model.onnx")
    graph = onnx.load(str(ce / "model.onnx"), load_external_data=False).graph
    manifest = dict(served.manifest, model_file="model.onnx", files=files, output=graph.output[0].name)
    manifest["quantization"] = {"mode": "none", "note": f"fp32 rebuild of {source} made by bench/prepare.py",
                                "rebuild": record}
    manifest.pop("fp32_file", None)
    (ce / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.symlink(models / "bi-encoder", out / "bi-encoder")
    verify_model_dir(ce, "cross-encoder")
    return out


def corpus_index(models: Path, corpus: Path, cache: Path, threads: int, dtype: str = "f32",
                 connectivity: int = 16, expansion_add: int = 128, expansion_search: int = 128) -> tuple[Path, dict[str, Any]]:
    """Build (or reuse) an index of `corpus` embedded by `models`' bi-encoder; returns the directory and build facts."""
    from bench.common import server_threads
    from twostage.server.cli import BackgroundEmbedder
    from twostage.server.config import Config
    from twostage.server.index.settings import IndexSettings
    from twostage.server.indexing import build_index

    settings = IndexSettings(dtype=dtype, connectivity=connectivity, expansion_add=expansion_add,
                             expansion_search=expansion_search)
    key_doc = {"model": bi_encoder_fingerprint(models), "corpus": sha256_file(corpus), "dtype": dtype,
               "connectivity": connectivity, "expansion_add": expansion_add}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    index_dir = Path(cache) / "indexes" / f"{corpus.parent.name}-{key}"
    done = index_dir.with_name(index_dir.name + ".done.json")
    if done.is_file() and index_dir.is_dir():
        return index_dir, json.loads(done.read_text())
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    config = Config(models=str(models), index=str(index_dir), **server_threads(threads), index_dtype=dtype,
                    index_connectivity=connectivity, index_expansion_add=expansion_add,
                    index_expansion_search=expansion_search, log_format="text", log_level="warning")
    t0 = time.perf_counter()
    embedder = BackgroundEmbedder(config)
    try:
        report = build_index(corpus, index_dir, embedder.embed, embedder.dimension, settings, progress=False,
                             embed_fingerprint=key_doc["model"])
    finally:
        embedder.close()
    facts = {"documents": report.documents, "build_s": time.perf_counter() - t0, "docs_per_s": report.docs_per_s,
             "settings": key_doc}
    done.write_text(json.dumps(facts, indent=2))
    return index_dir, facts
