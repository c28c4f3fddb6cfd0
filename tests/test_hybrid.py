"""Hybrid retrieval end to end on the real packaged models: a rare exact term that only BM25 finds and a
paraphrase that only the bi-encoder finds both come first in hybrid mode; the modes, fusion options and
per-hit stage-1 scores through the Search RPC. The corpus is written here (no dataset text)."""
from __future__ import annotations

import grpc
import pytest

from twostage.v1 import twostage_pb2 as pb

pytestmark = pytest.mark.slow

# Error-code documents that read alike: only the exact code tells them apart.
CODES = ["7Q9Z", "3K2M", "8W1P", "5T6R", "2H4J", "9L0X"]
CAUSES = ["a blocked drain hose", "a worn door seal", "a failed heating element", "a jammed spray arm",
          "a loose water inlet valve", "a tripped thermal fuse"]
CORPUS = [
    *({"id": f"code-{code}", "title": "Dishwasher service note",
       "text": f"Error E-{code} on the dishwasher display is caused by {cause}. Switch the machine off before "
               f"inspecting it."} for code, cause in zip(CODES, CAUSES)),
    {"id": "cooling", "title": "",
     "text": "Keeping a notebook computer cool: raise its rear edge so air can flow under the chassis, clear dust "
             "from the fan vents, and avoid soft surfaces such as beds and cushions."},
    {"id": "bus", "title": "", "text": "The night bus will stop at every shelter along the coast road after midnight."},
    {"id": "bag", "title": "", "text": "A padded sleeve protects a laptop from scratches in a backpack."},
    {"id": "bread", "title": "", "text": "Sourdough bread needs a long, slow rise in a cool kitchen."},
    {"id": "garden", "title": "", "text": "Tomato plants want full sun, steady watering and a sturdy cane."},
    {"id": "tides", "title": "", "text": "Spring tides happen when the sun and the moon line up with the earth."},
]
RARE_QUERY = "what does E-7Q9Z mean"
PARAPHRASE_QUERY = "how can I prevent my laptop overheating"


@pytest.fixture(scope="module")
def hybrid_server(real_models, tmp_path_factory):
    from server_harness import ServerThread, make_config

    srv = ServerThread(make_config(real_models, tmp_path_factory.mktemp("hybrid-index")))
    srv.stub().Upsert(pb.UpsertRequest(documents=[pb.Document(**d) for d in CORPUS]), timeout=300)
    yield srv
    srv.stop()


def search(srv, query: str, **fields) -> pb.SearchResponse:
    return srv.stub().Search(pb.SearchRequest(query=query, top_k=5, **fields), timeout=120)


def ids(response: pb.SearchResponse) -> list[str]:
    return [h.id for h in response.hits]


def test_hybrid_puts_the_rare_term_and_the_paraphrase_first(hybrid_server):
    rare_dense = search(hybrid_server, RARE_QUERY, retrieval_mode=pb.RETRIEVAL_MODE_DENSE, skip_rerank=True)
    assert ids(rare_dense)[0] != "code-7Q9Z", "the test needs a code the bi-encoder alone does not put first"
    para_lexical = search(hybrid_server, PARAPHRASE_QUERY, retrieval_mode=pb.RETRIEVAL_MODE_LEXICAL,
                          skip_rerank=True)
    assert "cooling" not in ids(para_lexical), "the paraphrase shares no term with its query"

    for query, expected in ((RARE_QUERY, "code-7Q9Z"), (PARAPHRASE_QUERY, "cooling")):
        stage1 = search(hybrid_server, query, skip_rerank=True)
        assert stage1.retrieval_mode == pb.RETRIEVAL_MODE_HYBRID  # the default
        assert expected in ids(stage1)
        full = search(hybrid_server, query)
        assert ids(full)[0] == expected, (query, ids(full))
        assert full.reranked == full.candidates > 0


def test_lexical_mode_finds_the_exact_code_with_bm25_scores(hybrid_server):
    out = search(hybrid_server, RARE_QUERY, retrieval_mode=pb.RETRIEVAL_MODE_LEXICAL, skip_rerank=True)
    assert ids(out)[0] == "code-7Q9Z"
    top = out.hits[0]
    assert top.lexical_rank == 0 and top.lexical_score > 0 and top.dense_rank == -1
    assert top.retrieval_score == pytest.approx(top.lexical_score)


def test_hybrid_hits_carry_both_lists_scores_and_ranks(hybrid_server):
    out = search(hybrid_server, RARE_QUERY, skip_rerank=True, fusion=pb.FUSION_CONVEX, fusion_weight=0.5)
    top = out.hits[0]
    assert top.id == "code-7Q9Z"
    assert top.lexical_rank == 0 and top.dense_rank >= 0 and top.dense_score > 0
    for hit in out.hits:
        assert 0.0 <= hit.retrieval_score <= 1.0 + 1e-6
    rrf = search(hybrid_server, RARE_QUERY, skip_rerank=True, fusion=pb.FUSION_RRF)
    for hit in rrf.hits:
        ranks = [r for r in (hit.dense_rank, hit.lexical_rank) if r >= 0]
        assert hit.retrieval_score == pytest.approx(sum(1 / (61 + r) for r in ranks), rel=1e-5)


def test_rerank_weight_one_orders_by_the_cross_encoder_alone(hybrid_server):
    out = search(hybrid_server, PARAPHRASE_QUERY, rerank_weight=1.0)
    assert out.rerank_weight == pytest.approx(1.0)
    scores = [h.rerank_score for h in out.hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h.score == h.rerank_score for h in out.hits)
    fused = search(hybrid_server, PARAPHRASE_QUERY, rerank_weight=0.5)
    assert fused.rerank_weight == pytest.approx(0.5)
    assert all(0.0 <= h.score <= 1.0 + 1e-6 for h in fused.hits)
    adaptive = search(hybrid_server, PARAPHRASE_QUERY)
    assert 0.0 < adaptive.rerank_weight <= 1.0


def test_filters_and_ids_only_work_in_every_mode(hybrid_server):
    for mode in (pb.RETRIEVAL_MODE_DENSE, pb.RETRIEVAL_MODE_LEXICAL, pb.RETRIEVAL_MODE_HYBRID):
        request = pb.SearchRequest(query=RARE_QUERY, top_k=3, retrieval_mode=mode, ids_only=True)
        request.filter.update({"missing-key": "x"})
        out = hybrid_server.stub().Search(request, timeout=120)
        assert list(out.hits) == [] and out.filter_exhausted
        out = search(hybrid_server, RARE_QUERY, retrieval_mode=mode, ids_only=True)
        assert out.hits and all(not h.HasField("document") for h in out.hits)


@pytest.mark.parametrize("field, value, message", [
    ("fusion_weight", 1.5, "fusion_weight"),
    ("rerank_weight", -0.1, "rerank_weight"),
    ("retrieval_mode", 9, "retrieval_mode"),
    ("fusion", 7, "fusion"),
])
def test_bad_fusion_options_name_the_field(hybrid_server, field, value, message):
    with pytest.raises(grpc.RpcError) as err:
        search(hybrid_server, RARE_QUERY, **{field: value})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
