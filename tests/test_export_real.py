"""Export the real packaged models (the offline defaults) and check what gets served: int8 bi-encoder
embeddings agree with fp32 and rank related sentences above unrelated ones; the packaged int8 cross-encoder,
rebuilt in fp32, fused and quantized again with static scales, agrees with the source and ranks a relevant
passage first. About a minute and a half on 2 cores."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from twostage.model.embedder import Embedder
from twostage.model.manifest import verify_model_dir
from twostage.model.onnx_model import ModelSpec
from twostage.model.reranker import Reranker

pytestmark = pytest.mark.slow

SENTENCES = [
    "The heavy rain flooded the low streets near the harbour.",
    "Streets by the port were under water after the downpour.",
    "She tuned the old piano before the evening recital.",
    "Compilers turn source code into machine instructions.",
    "Our flight was cancelled because of fog at the airport.",
    "Thick fog forced the airline to cancel our plane.",
]
RERANK_QUERY = "how long do you boil an egg for a runny yolk"
RERANK_PASSAGES = [
    "The central heating boiler needs a service every year to stay efficient.",
    "For a soft, runny yolk, lower the egg into boiling water and cook it for about six minutes.",
    "Chickens lay more eggs in spring when the days get longer.",
    "A yolk-yellow paint brightens a dark hallway.",
    "Runny noses are common in children during the winter months.",
]


def embed(model_dir, file_name, texts):
    """Vectors from one ONNX file of the directory, run as the server runs its model file."""
    spec = dataclasses.replace(ModelSpec.from_model_dir(verify_model_dir(model_dir, "bi-encoder")),
                               model_path=model_dir / file_name)
    return Embedder(spec).embed(texts)


def test_packaged_bi_encoder_int8_agrees_with_fp32_and_ranks_meaning(real_models):
    model_dir = real_models / "bi-encoder"
    m = verify_model_dir(model_dir, "bi-encoder").manifest
    assert (m["source"]["kind"], m["pooling"], m["normalize"], m["dimension"], m["max_length"]) == \
        ("package", "mean", True, 384, 256)
    assert m["quantization"]["mode"] == "static-int8" and m["quantization"]["per_channel"] is True
    assert m["gate"]["passed"] and m["gate"]["metrics"]["mean_cosine"] >= 0.99
    assert m["gate"]["metrics"]["batch_variation"] <= 1e-5
    assert m["optimization"]["fp32"]["fused"]["Attention (ONNX, replacing MultiHeadAttention)"] == 6

    served, fp32 = embed(model_dir, "model.onnx", SENTENCES), embed(model_dir, "model_fp32.onnx", SENTENCES)
    cosines = (served * fp32).sum(axis=1)
    assert cosines.min() >= 0.98, cosines
    sims = served @ served.T
    # Paraphrase pairs (0,1) and (4,5) are closer to each other than to any unrelated sentence.
    for a, b in ((0, 1), (4, 5)):
        others = [i for i in range(len(SENTENCES)) if i not in (a, b)]
        assert sims[a, b] > max(sims[a, others]) and sims[a, b] > max(sims[b, others]), sims


def test_packaged_cross_encoder_is_valid_and_ranks_the_relevant_passage_first(real_models):
    model_dir = real_models / "cross-encoder"
    m = verify_model_dir(model_dir, "cross-encoder").manifest
    assert (m["source"]["kind"], m["source"]["format"], m["labels"], m["positive_label"]) == \
        ("package", "onnx", ["LABEL_0"], 0)
    q = m["quantization"]
    assert (q["mode"], q["applied_by"], q["source_quantization"]["mode"]) == \
        ("static-int8", "twostage export", "dynamic-int8")
    assert m["optimization"]["dequantized"]["rewritten"] == {"DequantizeLinear": 3, "MatMulInteger": 74}
    assert m["optimization"]["fp32"]["check"]["max_difference"] < 1e-4  # fusions are exact on the rebuild
    assert m["fp32_file"] is None
    assert m["gate"]["reference"] == "source-onnx" and m["gate"]["passed"]
    figures = m["gate"]["metrics"]
    assert figures["spearman"] >= 0.99 and figures["top1_agreement"] == 1.0 and figures["batch_variation"] <= 1e-4
    assert m["gate"]["secondary"]["metrics"]["spearman"] >= 0.99
    scores = Reranker.open(model_dir).score(RERANK_QUERY, RERANK_PASSAGES).raw
    assert int(np.argmax(scores)) == 1, scores
    assert scores[1] > np.delete(scores, 1).max() + 1.0, scores
