"""End-to-end: the real server on a loopback port, called through the generated stubs, with the real
packaged models (exported once per session by the `real_models` fixture)."""
from __future__ import annotations

import re
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server_harness import ServerThread, make_config
from twostage.v1 import twostage_pb2 as pb

pytestmark = pytest.mark.slow

# A small corpus written for this test: distinct topics, one clearly right answer per query below.
CORPUS = [
    ("bread", "Baking sourdough", "Sourdough bread rises thanks to a fermented starter of flour and water that holds wild yeast and lactic bacteria.", {"topic": "cooking"}),
    ("pasta", "Cooking pasta", "Boil dried pasta in plenty of salted water and drain it a minute before it is fully soft.", {"topic": "cooking"}),
    ("tea", "Green tea", "Green tea leaves are steamed or pan-fired soon after picking, which stops oxidation and keeps them green.", {"topic": "cooking"}),
    ("mars", "The red planet", "Mars looks red because iron minerals in its dust and rocks have oxidized into rust.", {"topic": "astronomy"}),
    ("moon", "Lunar phases", "The Moon shows phases because we see different portions of its sunlit half as it orbits the Earth.", {"topic": "astronomy"}),
    ("saturn", "Saturn's rings", "Saturn's rings are made mostly of chunks of water ice, from grains of dust to pieces as large as houses.", {"topic": "astronomy"}),
    ("python", "Python lists", "In Python, a list is a mutable sequence; append adds an item to the end and pop removes one.", {"topic": "programming"}),
    ("git", "Git branches", "A git branch is a movable pointer to a commit, so creating one is cheap and fast.", {"topic": "programming"}),
    ("sql", "SQL joins", "An inner join returns only the rows whose keys match in both tables.", {"topic": "programming"}),
    ("heart", "The heart", "The human heart has four chambers: two atria receive blood and two ventricles pump it out.", {"topic": "medicine"}),
    ("vaccine", "Vaccines", "Vaccines train the immune system to recognise a pathogen without causing the disease itself.", {"topic": "medicine"}),
    ("insulin", "Insulin", "Insulin is a hormone made by the pancreas that lets cells take up glucose from the blood.", {"topic": "medicine"}),
    ("offside", "Football offside", "A player is offside when nearer to the opponents' goal line than both the ball and the second-last defender.", {"topic": "sports"}),
    ("marathon", "Marathon distance", "A marathon is 42.195 kilometres long, a distance fixed for the 1908 London Olympics.", {"topic": "sports"}),
    ("nile", "The Nile", "The Nile flows north through eleven countries before reaching the Mediterranean Sea in Egypt.", {"topic": "geography"}),
    ("everest", "Mount Everest", "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.", {"topic": "geography"}),
    ("inflation", "Inflation", "Inflation is the rate at which the general level of prices rises, eroding what money can buy.", {"topic": "finance"}),
    ("bond", "Bonds", "When interest rates rise, the market price of existing bonds usually falls.", {"topic": "finance"}),
    ("photosynthesis", "Photosynthesis", "Plants turn light, water and carbon dioxide into sugar and oxygen in their chloroplasts.", {"topic": "biology"}),
    ("dna", "DNA", "DNA is a double helix whose two strands are held together by pairs of bases.", {"topic": "biology"}),
]

QUERIES = [
    ("why is mars red", "mars"),
    ("how do plants make sugar from sunlight", "photosynthesis"),
    ("what hormone controls blood sugar", "insulin"),
    ("tallest mountain in the world", "everest"),
    ("how long is a marathon race", "marathon"),
    ("what happens to bond prices when rates go up", "bond"),
]


def upsert_corpus(stub) -> pb.UpsertResponse:
    docs = []
    for doc_id, title, text, meta in CORPUS:
        d = pb.Document(id=doc_id, title=title, text=text)
        d.metadata.update(meta)
        docs.append(d)
    return stub.Upsert(pb.UpsertRequest(documents=docs), timeout=120)


@pytest.fixture(scope="module")
def server(real_models, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("index")
    srv = ServerThread(make_config(real_models, index_dir))
    upsert_corpus(srv.stub())
    yield srv
    srv.stop()


def health_status(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_turns_serving_only_after_loading(real_models, tmp_path):
    srv = ServerThread(make_config(real_models, tmp_path / "idx"), wait=False)
    try:
        ch = srv.channel()
        assert health_status(ch) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            srv.stub().Info(pb.InfoRequest(), timeout=10)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE,)
        srv.wait_loaded()
        assert health_status(ch) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(ch, "twostage.v1.TwoStage") == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop()


def test_info_describes_models_index_and_limits(server):
    info = server.stub().Info(pb.InfoRequest(), timeout=10)
    assert info.bi_encoder.dimension == 384 and info.bi_encoder.pooling == "mean" and info.bi_encoder.normalize
    assert info.cross_encoder.max_length == 512
    assert info.index.size == len(CORPUS) and info.index.dimension == 384
    assert info.limits.max_top_k == server.config.max_top_k
    assert info.rerank_batching.max_batch_size == server.config.rerank_max_batch_size
    assert info.server_version


@pytest.mark.parametrize("query,expected", QUERIES)
def test_search_finds_the_right_document(server, query, expected):
    resp = server.stub().Search(pb.SearchRequest(query=query, top_k=3), timeout=60)
    assert resp.hits[0].id == expected, [(h.id, h.score) for h in resp.hits]
    assert resp.score_kind == pb.SCORE_KIND_NORMALIZED
    assert resp.reranked == len(CORPUS)  # default 100 candidates > corpus size: all reranked
    top = resp.hits[0]
    assert top.reranked and 0.0 <= top.rerank_score <= 1.0 and top.document.text
    t = resp.timing
    assert t.total_ms > 0 and t.embed.inference_ms > 0 and t.rerank.inference_ms > 0 and t.ann_ms > 0
    assert t.total_ms >= t.rerank.inference_ms


def test_search_without_rerank_and_ids_only(server):
    resp = server.stub().Search(pb.SearchRequest(query="why is mars red", top_k=5, skip_rerank=True, ids_only=True),
                                timeout=60)
    assert resp.score_kind == pb.SCORE_KIND_SIMILARITY and resp.reranked == 0
    assert resp.hits[0].id == "mars"
    assert not resp.hits[0].document.text and not resp.hits[0].reranked
    scores = [h.retrieval_score for h in resp.hits]
    assert scores == sorted(scores, reverse=True)


def test_search_filter_keeps_only_matching_documents(server):
    flt = {"topic": "finance"}
    req = pb.SearchRequest(query="why is mars red", top_k=5)
    req.filter.update(flt)
    resp = server.stub().Search(req, timeout=60)
    assert {h.id for h in resp.hits} == {"inflation", "bond"}
    assert resp.filter_exhausted  # only 2 finance documents exist, fewer than top_k


def test_rerank_orders_relevant_passage_first_with_packaged_cross_encoder(server):
    texts = [
        "The stock market closed higher after the central bank held rates steady.",
        "Penguins huddle together through the Antarctic winter to keep warm.",
        "To reset a forgotten router password, hold the reset button for ten seconds until the lights blink.",
        "The violin has four strings tuned in perfect fifths.",
    ]
    resp = server.stub().Rerank(pb.RerankRequest(query="how do I reset my router password", texts=texts,
                                                 return_documents=True), timeout=60)
    assert resp.results[0].index == 2 and resp.results[0].text == texts[2]
    assert resp.score_kind == pb.SCORE_KIND_NORMALIZED
    assert resp.results[0].score > 0.5 > resp.results[-1].score
    raw = server.stub().Rerank(pb.RerankRequest(query="how do I reset my router password", texts=texts, raw_scores=True,
                                                top_n=2), timeout=60)
    assert raw.score_kind == pb.SCORE_KIND_RAW and len(raw.results) == 2 and raw.results[0].index == 2
    assert raw.results[0].score > 1.0  # a logit, not a probability


def test_rerank_by_stored_ids_and_unknown_id(server):
    resp = server.stub().Rerank(pb.RerankRequest(query="what hormone controls blood sugar",
                                                 document_ids=["heart", "insulin", "nile"]), timeout=60)
    assert resp.results[0].id == "insulin"
    with pytest.raises(grpc.RpcError) as err:
        server.stub().Rerank(pb.RerankRequest(query="q", document_ids=["insulin", "no-such-doc"]), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-doc" in err.value.details()


def test_long_document_mode_scores_by_best_chunk(server):
    filler = " ".join(f"Paragraph {i} talks about the weather in a small coastal town and its fishing boats." for i in range(60))
    needle = ("Router password reset guide: to reset a forgotten router password, hold the reset button on the back "
              "of the router for ten seconds, then log in with the default password printed on its label.")
    query = "how do I reset my router password"
    stub = server.stub()
    plain = stub.Rerank(pb.RerankRequest(query=query, texts=[filler + " " + needle, filler]), timeout=60)
    chunked = stub.Rerank(pb.RerankRequest(query=query, texts=[filler + " " + needle, filler],
                                           chunk_long_documents=True, raw_scores=True), timeout=60)
    by_index = {r.index: r for r in plain.results}
    assert by_index[0].truncated and by_index[1].truncated
    # truncated to the model limit, the needle is cut off: both documents look alike
    assert abs(by_index[0].score - by_index[1].score) < 0.05
    best = {r.index: r for r in chunked.results}
    assert best[0].chunks > 1 and best[0].best_chunk == best[0].chunks - 1  # the needle is in the last chunk
    assert chunked.results[0].index == 0 and best[0].score > best[1].score + 3.0  # logits


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _metric(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{name}\{{{labels}\}} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_concurrent_requests_are_merged_and_match_sequential(server):
    stub = server.stub()
    docs = [text for _, _, text, _ in CORPUS]
    queries = [q for q, _ in QUERIES]
    sequential = [stub.Rerank(pb.RerankRequest(query=q, texts=[d]), timeout=60).results[0].score
                  for q in queries for d in docs[:2]]
    before = _scrape(server.running.metrics_port)
    batches_before = _metric(before, "twostage_batch_items_count", 'model="cross-encoder"')
    singles_before = _metric(before, "twostage_batch_items_bucket", 'le="1.0",model="cross-encoder"')
    results: dict[int, float] = {}
    barrier = threading.Barrier(len(sequential))

    def one(i: int) -> None:
        q, d = queries[i // 2], docs[i % 2]
        barrier.wait()
        results[i] = stub.Rerank(pb.RerankRequest(query=q, texts=[d]), timeout=60).results[0].score

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sequential))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = _scrape(server.running.metrics_port)
    batches = _metric(after, "twostage_batch_items_count", 'model="cross-encoder"') - batches_before
    singles = _metric(after, "twostage_batch_items_bucket", 'le="1.0",model="cross-encoder"') - singles_before
    assert batches < len(sequential), "concurrent one-pair requests should share batches"
    assert singles < batches, "at least one batch should carry more than one pair"
    for i, s in enumerate(sequential):
        assert results[i] == pytest.approx(s, abs=2e-3)
    assert "twostage_requests_total" in after and "twostage_index_documents" in after


def test_upsert_delete_and_persistence_across_restart(real_models, tmp_path):
    cfg = make_config(real_models, tmp_path / "idx")
    with ServerThread(cfg) as srv:
        stub = srv.stub()
        assert upsert_corpus(stub).inserted == len(CORPUS)
        again = upsert_corpus(stub)
        assert again.inserted == 0 and again.updated == len(CORPUS) and again.index_size == len(CORPUS)
        new = pb.Document(id="kite", title="Kites", text="A kite flies because wind pushing on its tilted surface creates lift.")
        assert stub.Upsert(pb.UpsertRequest(documents=[new]), timeout=60).index_size == len(CORPUS) + 1
        d = stub.Delete(pb.DeleteRequest(ids=["nile", "missing-id"]), timeout=60)
        assert d.deleted == 1 and list(d.not_found) == ["missing-id"] and d.index_size == len(CORPUS)
        hits = stub.Search(pb.SearchRequest(query="which river flows north through egypt", top_k=3), timeout=60).hits
        assert "nile" not in {h.id for h in hits}
    with ServerThread(cfg) as srv:  # restart on the same index directory
        stub = srv.stub()
        assert stub.Info(pb.InfoRequest(), timeout=10).index.size == len(CORPUS)
        hits = stub.Search(pb.SearchRequest(query="why does a kite fly", top_k=1), timeout=60).hits
        assert hits[0].id == "kite"
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(pb.RerankRequest(query="q", document_ids=["nile"]), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_embed_matches_dimension_and_normalization(server):
    resp = server.stub().Embed(pb.EmbedRequest(texts=["a cat sat on the mat", "stock prices fell"]), timeout=60)
    assert resp.dimension == 384 and resp.normalized and len(resp.embeddings) == 2
    v = resp.embeddings[0].values
    assert abs(sum(x * x for x in v) - 1.0) < 1e-3


def big_metadata_doc() -> pb.Document:
    d = pb.Document(id="big", text="t")
    d.metadata.update({"blob": "x" * 70_000})
    return d


def wide_filter_request() -> pb.SearchRequest:
    r = pb.SearchRequest(query="q")
    r.filter.update({f"k{i}": i for i in range(65)})
    return r


def test_bad_input_gets_invalid_argument_and_server_keeps_serving(server):
    stub = server.stub()
    cases = [
        (lambda: stub.Search(pb.SearchRequest(query="   "), timeout=10), "query"),
        (lambda: stub.Search(pb.SearchRequest(query="x", top_k=100000), timeout=10), "top_k"),
        (lambda: stub.Rerank(pb.RerankRequest(query="x"), timeout=10), "texts"),
        (lambda: stub.Upsert(pb.UpsertRequest(documents=[pb.Document(id="a", text="t"), pb.Document(id="a", text="u")]), timeout=10), "duplicate"),
        (lambda: stub.Upsert(pb.UpsertRequest(documents=[pb.Document(id="a", text="t", embedding=[0.1, 0.2])]), timeout=10), "dimension"),
        (lambda: stub.Upsert(pb.UpsertRequest(documents=[big_metadata_doc()]), timeout=10), "documents[0].metadata"),
        (lambda: stub.Rerank(pb.RerankRequest(query="q", texts=["t"], truncation=7), timeout=10), "truncation"),
        (lambda: stub.Search(wide_filter_request(), timeout=10), "the limit is 64"),
        (lambda: stub.Search(pb.SearchRequest(query="q", skip_rerank=True, max_query_tokens=100000), timeout=10), "max_query_tokens"),
    ]
    for call, needle in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert needle in err.value.details()
    assert stub.Search(pb.SearchRequest(query="why is mars red", top_k=1), timeout=60).hits[0].id == "mars"


def test_rerank_budget_reranks_a_prefix_and_keeps_the_rest_in_stage1_order(real_models, tmp_path):
    with ServerThread(make_config(real_models, tmp_path / "idx", rerank_max_batch_size=8)) as srv:
        stub = srv.stub()
        upsert_corpus(stub)
        n = len(CORPUS)
        full = stub.Search(pb.SearchRequest(query="why is mars red", top_k=n, candidates=n), timeout=60)
        assert full.reranked == n and not full.budget_limited
        # A budget too short for all the pairs: what is reranked is a stage-1 prefix, first by score, and the
        # rest follow in stage-1 order; the response says the budget cut in (never late, never an error for it).
        # Half of what reranking everything took: stage 1 fits, all the pairs do not (scales with the machine's load).
        budget = max(1, int(full.timing.total_ms / 2))
        for budget_ms, alias in ((budget, False), (budget, True)):
            request = pb.SearchRequest(query="why is mars red", top_k=n, candidates=n)
            if alias:
                request.rerank_budget_ms = budget_ms  # the deprecated alias acts as the whole-request budget
            else:
                request.latency_budget_ms = budget_ms
            tight = stub.Search(request, timeout=60)
            assert tight.budget_limited and tight.reranked < n and tight.latency_budget_ms == budget_ms
            k = tight.reranked
            reranked, rest = tight.hits[:k], tight.hits[k:]
            assert all(h.reranked for h in reranked) and not any(h.reranked for h in rest)
            assert sorted(h.retrieval_rank for h in reranked) == list(range(k))
            assert [h.retrieval_rank for h in rest] == list(range(k, n))  # the rest follow in stage-1 order
            scores = [h.score for h in reranked]
            assert scores == sorted(scores, reverse=True)
        # A generous budget reranks everything.
        loose = stub.Search(pb.SearchRequest(query="why is mars red", top_k=n, candidates=n, latency_budget_ms=60000),
                            timeout=60)
        assert loose.reranked == n and not loose.budget_limited


def test_token_caps_and_truncation_none(server):
    stub = server.stub()
    long_query = "router password reset " * 40
    capped = stub.Rerank(pb.RerankRequest(query=long_query, texts=["Hold the reset button for ten seconds."],
                                          max_query_tokens=8), timeout=60)
    assert capped.results[0].truncated
    with pytest.raises(grpc.RpcError) as err:
        stub.Rerank(pb.RerankRequest(query=long_query, texts=["short text"], max_query_tokens=8,
                                     truncation=pb.TRUNCATION_NONE), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_query_tokens=8" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Rerank(pb.RerankRequest(query="q", texts=["t"], max_document_tokens=100000), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_document_tokens" in err.value.details()
