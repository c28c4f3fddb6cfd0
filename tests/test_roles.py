"""The per-role serving objects (server/roles.py): model + batcher + scoring behind `embed` and `score`, on a shared
inference pool, started and stopped by their owner."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from twostage.model.model_set import open_model_set
from twostage.model.postprocess import sigmoid
from twostage.model.session import SessionSettings
from twostage.server.batcher import InferencePool
from twostage.server.config import Config
from twostage.server.errors import InvalidArgument, Unavailable
from twostage.server.roles import BatchLimits, EmbeddingRole, RerankRole, session_settings

WORDS = ("the river water is cold at night and sea dark when moon not in sky bird tree road city rain sun "
         "mountain stone glass paper music song train house door window book").split()
# Not periodic, so that no two chunks of it are the same tokens (no ties between chunk scores).
LONG = " ".join(np.random.default_rng(3).choice(WORDS, 160))


@pytest.fixture(scope="module")
def models(tiny_models):
    return open_model_set(tiny_models, SessionSettings(intra_op_threads=1))


def run_roles(models, body):
    """Run `body(embedding_role, rerank_role)` with both roles started on one two-worker pool, then stop them."""
    embedder, reranker = models
    limits = BatchLimits.from_config(Config(), "embed")

    async def main():
        pool = InferencePool(2)
        roles = EmbeddingRole(embedder, pool, limits), RerankRole(reranker, pool, limits)
        for role in roles:
            role.start()
        try:
            return await body(*roles)
        finally:
            for role in roles:
                await role.stop()
            pool.shutdown()

    return asyncio.run(main())


def test_embed_returns_the_models_vectors_and_what_the_call_cost(models):
    embedder, _ = models
    texts = ["the cat", LONG, "why is the sea salt water"]

    async def body(embedding, _):
        return await embedding.embed(texts)

    embedded = run_roles(models, body)
    np.testing.assert_allclose(embedded.vectors, embedder.embed(texts), atol=1e-6)
    assert embedded.vectors.dtype == np.float32 and embedded.stats.items == 3
    assert embedded.stats.tokens == sum(len(e) for e in embedder.encode(texts)) and embedded.tokenize_ms >= 0


def test_embed_caps_tokens_or_refuses_naming_the_field(models):
    async def body(embedding, _):
        capped = await embedding.embed([LONG], max_tokens=8, field="query")
        with pytest.raises(InvalidArgument) as refused:
            await embedding.embed(["the cat", LONG], truncate=False)
        return capped, refused.value

    capped, refused = run_roles(models, body)
    assert capped.stats.tokens == 8
    assert refused.field == "texts[1]"


def test_score_gives_raw_and_normalized_scores_with_chunk_facts(models):
    _, reranker = models
    query, docs = "why is the river cold", ["the river is cold", LONG, "a cat"]

    async def body(_, rerank):
        return (await rerank.score(query, docs),
                await rerank.score(query, docs, chunk_long=True, chunk_overlap=8))

    whole, chunked = run_roles(models, body)
    d = whole.documents
    np.testing.assert_array_equal(d.normalized, sigmoid(d.raw))       # one-logit model: sigmoid of the logit
    np.testing.assert_allclose(d.raw, reranker.score(query, docs).raw, atol=1e-5)
    assert d.chunks == [1, 1, 1] and d.best_chunk == [0, 0, 0] and d.truncated == [False, True, False]
    c = chunked.documents
    assert c.chunks[1] > 1 and c.chunks[0] == c.chunks[2] == 1 and not any(c.truncated)
    assert chunked.stats.items == sum(c.chunks)
    pairs, owner = reranker.encode_chunks(query, docs, overlap=8)
    scores = reranker.scores(reranker.run_batch(pairs))
    long_chunks = [j for j, o in enumerate(owner) if o == 1]
    best = long_chunks[int(np.argmax(scores.normalized[long_chunks]))]
    assert c.best_chunk[1] == best - long_chunks[0]
    np.testing.assert_allclose(c.raw[1], scores.raw[best], atol=1e-5)


def test_a_stopped_role_refuses_work(models):
    async def body(embedding, _):
        await embedding.stop()
        with pytest.raises(Unavailable):
            await embedding.embed(["the cat"])

    run_roles(models, body)


def test_session_settings_follow_the_config():
    s = session_settings(Config(inference_workers=1, intra_op_threads=3, ort_allow_spinning=False))
    assert (s.intra_op_threads, s.allow_spinning, s.execution_provider) == (3, False, "cpu")
