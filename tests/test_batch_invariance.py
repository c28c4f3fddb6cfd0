"""A row's result does not depend on the batch it is computed in: scoring a pair (or embedding a text) alone
gives the same output as inside a padded batch of 16 inputs of mixed lengths, through the model layer the server runs (twostage.model).

The exported int8 models use static activation scales (twostage.export.int8), so this holds up to float
rounding. A dynamically quantized model (one activation scale per padded batch) is the control: the same
measurement catches it."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from twostage.export.manifest import write_manifest
from twostage.model.embedder import Embedder
from twostage.model.manifest import read_manifest
from twostage.model.reranker import Reranker

MAX_SCORE_CHANGE = 1e-4
MAX_COSINE_DISTANCE = 1e-5

# Words of the tiny models' vocabulary too (tests/tiny_models.py), so that one word is one token there.
WORDS = ("the rain on the river and the sea at night when the water is cold and the road to the city is a stone "
         "road by the mountain with a tree and a bird in the sun").split()
QUERY = "why is the river water cold at night"


def mixed_texts(count: int = 16, longest: int = 150) -> list[str]:
    """`count` texts from 1 to `longest` words, in an order that puts short ones beside long ones."""
    lengths = np.linspace(1, longest, count).astype(int)
    order = np.random.default_rng(7).permutation(count)
    return [" ".join(WORDS[(start + i) % len(WORDS)] for i in range(lengths[k])) for start, k in enumerate(order)]


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return 1.0 - (a * b).sum(axis=1)


def score_change(model: Reranker, docs: list[str]) -> float:
    """Largest change of a pair's logits between scoring it alone and in one batch with all the others."""
    pairs = model.encode(QUERY, docs)
    together = model.run_batch(pairs)
    alone = np.vstack([model.run_batch([pair]) for pair in pairs])
    # Another batch, other companions (reversed order, half of them): the same rows again.
    half = pairs[::-2]
    again = model.run_batch(half)
    return float(max(np.abs(together - alone).max(), np.abs(again - alone[::-2]).max()))


def embedding_change(model: Embedder, texts: list[str]) -> float:
    encoded = model.encode(texts)
    together = model.run_batch(encoded)
    alone = np.vstack([model.run_batch([item]) for item in encoded])
    return float(cosine_distance(together, alone).max())


def test_tiny_cross_encoder_scores_a_pair_the_same_alone_or_in_a_batch(tiny_models):
    model = Reranker.open(tiny_models / "cross-encoder")
    assert model.manifest["quantization"]["mode"] == "static-int8"
    docs = mixed_texts(longest=100)  # the tiny model takes 128 tokens
    assert len({len(p) for p in model.encode(QUERY, docs)}) == 16  # 16 different lengths, so real padding
    assert score_change(model, docs) <= MAX_SCORE_CHANGE


def test_tiny_bi_encoder_embeds_a_text_the_same_alone_or_in_a_batch(tiny_models):
    model = Embedder.open(tiny_models / "bi-encoder")
    assert model.manifest["quantization"]["mode"] == "static-int8"
    assert embedding_change(model, mixed_texts(longest=60)) <= MAX_COSINE_DISTANCE


def test_a_dynamically_quantized_model_fails_the_same_check(tiny_models, tmp_path):
    """Control: the kept fp32 graph quantized dynamically (as ONNX Runtime's quantize_dynamic does, per-tensor
    activation scales over the padded batch) moves a text's embedding with its batch-mates."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    directory = tmp_path / "bi-encoder"
    shutil.copytree(tiny_models / "bi-encoder", directory)
    manifest = read_manifest(directory)
    quantize_dynamic(str(directory / manifest["fp32_file"]), str(directory / "model.onnx"),
                     weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
    write_manifest(directory, {**manifest, "quantization": {"mode": "dynamic-int8"}})
    model = Embedder.open(directory)
    assert embedding_change(model, mixed_texts(longest=60)) > MAX_COSINE_DISTANCE


@pytest.mark.slow
def test_packaged_cross_encoder_scores_a_pair_the_same_alone_or_in_a_batch(real_models):
    model = Reranker.open(real_models / "cross-encoder")
    assert model.manifest["quantization"]["mode"] == "static-int8"
    docs = mixed_texts(longest=200)
    assert max(len(p) for p in model.encode(QUERY, docs)) > 180
    assert score_change(model, docs) <= MAX_SCORE_CHANGE


@pytest.mark.slow
def test_packaged_bi_encoder_embeds_a_text_the_same_alone_or_in_a_batch(real_models):
    model = Embedder.open(real_models / "bi-encoder")
    assert model.manifest["quantization"]["mode"] == "static-int8"
    assert embedding_change(model, mixed_texts(longest=200)) <= MAX_COSINE_DISTANCE
