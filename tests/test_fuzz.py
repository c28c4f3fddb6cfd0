"""Property-based fuzzing of every RPC against a running server (tiny models, small limits).

Each RPC gets random and adversarial fields: odd unicode (emoji, combining marks, bidi controls,
zero-width and private-use characters, NUL and other control characters), strings just under, at and over
the byte limits and far beyond them (some beyond max_message_bytes), extreme integers, unknown enum
values, empty and oversized repeated fields, NaN / infinite / wrong-length embeddings, and nested or
deeply nested metadata and filters. Whatever comes in, the server must answer one of the documented
status codes - never INTERNAL or UNKNOWN - and still answer a normal request afterwards.

The number of examples per RPC is TWOSTAGE_FUZZ_EXAMPLES (default 60); runs are derandomized so that CI
is reproducible (set TWOSTAGE_FUZZ_RANDOM=1 to explore new inputs).
"""
from __future__ import annotations

import os

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server_harness import ServerThread, make_config
from twostage.v1 import twostage_pb2 as pb

LIMITS = dict(max_query_bytes=256, max_text_bytes=2048, max_id_bytes=32, max_rerank_documents=8,
              max_embed_texts=8, max_upsert_documents=8, max_top_k=20, max_candidates=40,
              max_message_bytes=256 * 1024)
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.DEADLINE_EXCEEDED}
SEED_IDS = ["seed-a", "seed-b", "seed-c"]
U32_MAX = 2**32 - 1

FUZZ = settings(max_examples=int(os.environ.get("TWOSTAGE_FUZZ_EXAMPLES", "60")), deadline=None,
                derandomize=not os.environ.get("TWOSTAGE_FUZZ_RANDOM"), database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    srv = ServerThread(make_config(tiny_models, tmp_path_factory.mktemp("fuzz-index"), **LIMITS))
    stub = srv.stub()
    stub.Upsert(pb.UpsertRequest(documents=[pb.Document(id=i, text=f"seed document {i} about rivers and hills")
                                            for i in SEED_IDS]), timeout=60)
    srv.dimension = stub.Info(pb.InfoRequest(), timeout=10).bi_encoder.dimension
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------------------ strategies
ODD = ["", " ", "\t\n\r ", "\x00", "a\x00b", "\x01\x02\x1b[31m\x7f", "\u200b\u200c\u200d", "\u202eevil\u202c",
       "\ufeffbom", "\U0010fffd\ue000", "🙂👍🏽👨‍👩‍👧", "e\u0301" * 40, "ｆｕｌｌｗｉｄｔｈ", "\r\n" * 30,
       "Ω≈ç√∫", "ﷺ", "𝕳𝖊𝖑𝖑𝖔", "null", "None", "' OR 1=1 --", "%s%n%x", "../../etc/passwd", "\\", "{}", "\u0000" * 5]


def around(limit: int, char: str = "x") -> st.SearchStrategy[str]:
    """Strings of `char` whose UTF-8 size is just under, at or just over `limit` bytes."""
    width = len(char.encode())
    return st.integers(max(0, limit // width - 2), limit // width + 2).map(lambda n: char * n)


def text(limit: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=30),
        st.sampled_from(ODD),
        around(limit), around(limit, "é"), around(limit, "🙂"),
        st.integers(10_000, 300_000).map(lambda n: "y" * n),   # beyond the text limit, some beyond the message limit
        st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=200),
    )


def u32(*interesting: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, U32_MAX),
                     st.sampled_from([0, 1, 2**31 - 1, 2**31, U32_MAX, *interesting]))


def truncation() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, 1, 2]), st.integers(-(2**31), 2**31 - 1))


json_scalar = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                        st.integers(-(2**63), 2**63), st.text(max_size=20), st.sampled_from(ODD))


def deep(depth: int) -> dict:
    node: dict = {"leaf": 1}
    for _ in range(depth):
        node = {"n": node}
    return node


json_object = st.one_of(
    st.dictionaries(st.text(max_size=12), st.recursive(
        json_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12), max_size=6),
    st.integers(1, 150).map(deep),                                # nested beyond the protobuf decoder's depth limit
    st.integers(100, 5000).map(lambda n: {f"k{i}": i for i in range(n)}),   # many keys
)


def texts(limit: int, count_limit: int) -> st.SearchStrategy[list[str]]:
    return st.one_of(st.lists(text(limit), max_size=count_limit + 2),
                     st.integers(count_limit + 1, 500).map(lambda n: ["t"] * n))


def ids() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(SEED_IDS), text(LIMITS["max_id_bytes"]), st.sampled_from(["unknown-id"]))


@st.composite
def search_requests(draw) -> pb.SearchRequest:
    req = pb.SearchRequest(
        query=draw(text(LIMITS["max_query_bytes"])), top_k=draw(u32(LIMITS["max_top_k"], LIMITS["max_top_k"] + 1)),
        candidates=draw(u32(LIMITS["max_candidates"], LIMITS["max_candidates"] + 1)),
        skip_rerank=draw(st.booleans()), ids_only=draw(st.booleans()), raw_scores=draw(st.booleans()),
        rerank_budget_ms=draw(u32(1, 5)), max_query_tokens=draw(u32(512, 513)),
        max_document_tokens=draw(u32(512, 513)), expansion_search=draw(u32(4096, 4097)))
    if draw(st.booleans()):
        req.filter.update(draw(json_object))
    return req


@st.composite
def rerank_requests(draw) -> pb.RerankRequest:
    n = LIMITS["max_rerank_documents"]
    req = pb.RerankRequest(
        query=draw(text(LIMITS["max_query_bytes"])), top_n=draw(u32(n, n + 1)),
        return_documents=draw(st.booleans()), raw_scores=draw(st.booleans()), truncation=draw(truncation()),
        max_query_tokens=draw(u32(512, 513)), max_document_tokens=draw(u32(512, 513)),
        chunk_long_documents=draw(st.booleans()), chunk_overlap_tokens=draw(u32(255, 256)))
    which = draw(st.sampled_from(["texts", "ids", "both", "none"]))
    if which in ("texts", "both"):
        req.texts.extend(draw(texts(LIMITS["max_text_bytes"], n)))
    if which in ("ids", "both"):
        req.document_ids.extend(draw(st.lists(ids(), max_size=n + 2)))
    return req


@st.composite
def embed_requests(draw) -> pb.EmbedRequest:
    return pb.EmbedRequest(texts=draw(texts(LIMITS["max_text_bytes"], LIMITS["max_embed_texts"])),
                           truncation=draw(truncation()))


def embedding(dim: int) -> st.SearchStrategy[list[float]]:
    f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
    return st.one_of(
        st.just([]),
        st.lists(st.floats(-1, 1, width=32), min_size=dim, max_size=dim),
        st.lists(f32, min_size=dim, max_size=dim),
        st.integers(0, 3).flatmap(lambda k: st.lists(f32, min_size=dim + k - 1 if k else 1, max_size=dim + k + 1)),
        st.integers(dim * 2, 20_000).map(lambda n: [0.5] * n),
        st.sampled_from([[float("nan")] * dim, [float("inf")] * dim, [3.4e38] * dim, [0.0] * dim, [1e-45] * dim]),
    )


@st.composite
def documents(draw, dim: int) -> dict:
    """Fields of one Document; metadata is set in place (a deep Struct cannot be copied between messages)."""
    return dict(id=draw(ids()), text=draw(text(LIMITS["max_text_bytes"])),
                title=draw(st.one_of(st.just(""), text(LIMITS["max_text_bytes"]))), embedding=draw(embedding(dim)),
                metadata=draw(st.one_of(st.none(), json_object)))


def upsert_request(docs: list[dict]) -> pb.UpsertRequest:
    request = pb.UpsertRequest()
    for fields in docs:
        doc = request.documents.add(id=fields["id"], text=fields["text"], title=fields.get("title", ""))
        doc.embedding.extend(fields.get("embedding", []))
        if fields.get("metadata") is not None:
            doc.metadata.update(fields["metadata"])
    return request


@st.composite
def upsert_requests(draw, dim: int) -> pb.UpsertRequest:
    n = LIMITS["max_upsert_documents"]
    docs = draw(st.one_of(st.lists(documents(dim), max_size=n + 2),
                          st.integers(n + 1, 300).map(lambda k: [dict(id=f"bulk-{i}", text="t") for i in range(k)])))
    if docs and draw(st.booleans()):
        docs.append(dict(id=docs[0]["id"], text="duplicate id"))
    return upsert_request(docs)


@st.composite
def delete_requests(draw) -> pb.DeleteRequest:
    n = LIMITS["max_upsert_documents"]
    return pb.DeleteRequest(ids=draw(st.one_of(
        st.lists(st.one_of(ids(), st.just("never-stored")), max_size=n + 2),
        st.integers(n + 1, 2000).map(lambda k: [f"x{i}" for i in range(k)]))))


# ------------------------------------------------------------------ adversarial cases tried on every run
def search_with_filter(value: dict) -> pb.SearchRequest:
    request = pb.SearchRequest(query="rivers", top_k=3)
    request.filter.update(value)
    return request


SEARCH_CASES = [search_with_filter({"x": float("nan")}), search_with_filter({"x": float("-inf")}),
                search_with_filter(deep(120)), search_with_filter({"a": {"b": 1}}), search_with_filter({"": 1}),
                search_with_filter({"a": [1, 2]}), search_with_filter({f"k{i}": i for i in range(2000)}),
                pb.SearchRequest(query="q", top_k=U32_MAX, candidates=U32_MAX),
                pb.SearchRequest(query="\x00"), pb.SearchRequest(query="q", expansion_search=U32_MAX)]
RERANK_CASES = [pb.RerankRequest(query="q"), pb.RerankRequest(query="q", texts=["a"], document_ids=["seed-a"]),
                pb.RerankRequest(query="q", document_ids=["seed-a", "seed-a"]),
                pb.RerankRequest(query="q", document_ids=["missing"]),
                pb.RerankRequest(query="q", texts=["a"], truncation=99, chunk_long_documents=True,
                                 chunk_overlap_tokens=U32_MAX),
                pb.RerankRequest(query="q", texts=["word " * 400], truncation=pb.TRUNCATION_NONE)]
EMBED_CASES = [pb.EmbedRequest(), pb.EmbedRequest(texts=[""]), pb.EmbedRequest(texts=["a"], truncation=-7),
               pb.EmbedRequest(texts=["word " * 400], truncation=pb.TRUNCATION_NONE)]
UPSERT_CASES = [upsert_request([]), upsert_request([dict(id="m1", text="t", metadata={"x": float("nan")})]),
                upsert_request([dict(id="m2", text="t", metadata={"x": [float("inf")]})]),
                upsert_request([dict(id="m3", text="t", metadata=deep(120))]),
                upsert_request([dict(id="m4", text="t", metadata=deep(40))]),
                upsert_request([dict(id="e1", text="t", embedding=[float("nan")] * 32)]),
                upsert_request([dict(id="e2", text="t", embedding=[1.0] * 31)]),
                upsert_request([dict(id="e3", text="t", embedding=[0.0] * 32)]),
                upsert_request([dict(id="", text="t")]), upsert_request([dict(id="d", text="t"), dict(id="d", text="u")])]
DELETE_CASES = [pb.DeleteRequest(), pb.DeleteRequest(ids=[""]), pb.DeleteRequest(ids=["a", "a"]),
                pb.DeleteRequest(ids=["x" * 10_000])]


def with_examples(test, cases):
    for case in cases:
        test = example(case)(test)
    return test


# ---------------------------------------------------------------------------------------------- checks
def summary(request) -> str:
    text_form = str(request)
    return text_form if len(text_form) < 600 else text_form[:600] + f"... ({request.ByteSize()} bytes)"


def call(fn, request):
    """Call and check the status: documented codes only, and refusals say what was wrong."""
    try:
        return grpc.StatusCode.OK, fn(request, timeout=60)
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
        assert code in DOCUMENTED, f"{code.name}: {details}\nrequest: {summary(request)}"
        assert details.strip(), f"{code.name} without details\nrequest: {summary(request)}"
        return code, None


def assert_serving(server) -> None:
    stub = server.stub()
    assert len(stub.Embed(pb.EmbedRequest(texts=["a plain sentence"]), timeout=30).embeddings) == 1
    resp = stub.Search(pb.SearchRequest(query="rivers and hills", top_k=3), timeout=30)
    assert resp.hits, "the seed documents should still be found"
    assert stub.Info(pb.InfoRequest(), timeout=10).index.size >= 1


# ------------------------------------------------------------------------------------------------ tests
def test_fuzz_search(server):
    stub = server.stub()

    @FUZZ
    @given(search_requests())
    def run(request):
        code, resp = call(stub.Search, request)
        if code == grpc.StatusCode.OK:
            limit = request.top_k or server.config.default_top_k
            assert len(resp.hits) <= limit and resp.reranked <= resp.candidates

    run = with_examples(run, SEARCH_CASES)
    run()
    assert_serving(server)


def test_fuzz_rerank(server):
    stub = server.stub()

    @FUZZ
    @given(rerank_requests())
    def run(request):
        code, resp = call(stub.Rerank, request)
        if code == grpc.StatusCode.OK:
            n = len(request.texts) or len(request.document_ids)
            assert len(resp.results) == (min(n, request.top_n) if request.top_n else n)
            assert sorted(r.index for r in resp.results) == sorted(set(r.index for r in resp.results))

    run = with_examples(run, RERANK_CASES)
    run()
    assert_serving(server)


def test_fuzz_embed(server):
    stub = server.stub()

    @FUZZ
    @given(embed_requests())
    def run(request):
        code, resp = call(stub.Embed, request)
        if code == grpc.StatusCode.OK:
            assert len(resp.embeddings) == len(request.texts)
            assert all(len(e.values) == resp.dimension for e in resp.embeddings)

    run = with_examples(run, EMBED_CASES)
    run()
    assert_serving(server)


def test_fuzz_upsert(server):
    stub = server.stub()

    @FUZZ
    @given(upsert_requests(server.dimension))
    def run(request):
        code, resp = call(stub.Upsert, request)
        if code == grpc.StatusCode.OK:
            assert resp.inserted + resp.updated == len(request.documents)

    run = with_examples(run, UPSERT_CASES)
    run()
    assert_serving(server)


def test_fuzz_delete(server):
    stub = server.stub()
    protected = set(SEED_IDS)

    @FUZZ
    @given(delete_requests())
    def run(request):
        request = pb.DeleteRequest(ids=[i for i in request.ids if i not in protected] or ["never-stored"])
        code, resp = call(stub.Delete, request)
        if code == grpc.StatusCode.OK:
            assert resp.deleted + len(resp.not_found) == len(request.ids)

    run = with_examples(run, DELETE_CASES)
    run()
    assert_serving(server)


def test_fuzz_info_and_raw_garbage(server):
    """Info takes no fields; unknown fields and undecodable bytes must not crash anything either."""
    channel = server.channel()
    methods = ["Search", "Rerank", "Embed", "Upsert", "Delete", "Info"]

    @FUZZ
    @given(st.sampled_from(methods), st.binary(max_size=2000))
    def run(method, payload):
        fn = channel.unary_unary(f"/twostage.v1.TwoStage/{method}", request_serializer=lambda b: b,
                                 response_deserializer=lambda b: b)
        call(fn, payload)

    run()
    assert_serving(server)
