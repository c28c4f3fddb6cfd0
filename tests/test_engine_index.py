"""The engine at the index seam: requests are validated once, at the edge, before a backend sees them; a Search
fetches the documents it keeps with one `get`; a document deleted between the search and that fetch is skipped.

A real server on the tiny models (tests/tiny_models.py), called over gRPC; the backend is the embedded one,
wrapped where a test needs to count or interleave calls."""
from __future__ import annotations

import math
from collections.abc import Sequence

import grpc
import numpy as np
import pytest

from server_harness import ServerThread, make_config
from twostage.server.engine import check_filter
from twostage.server.errors import InvalidArgument
from twostage.server.index.backend import Candidates, Filter, IndexBackend, StoredDoc
from twostage.v1 import twostage_pb2 as pb

TOPICS = ["bread and coffee", "river and sea", "python code", "chess game", "bike on the road", "moon and star"]


class Recording:
    """An IndexBackend that forwards to another and records each call; `after_search` runs between a search
    and the engine's fetch (to interleave a concurrent write)."""

    def __init__(self, inner: IndexBackend):
        self.inner = inner
        self.kind = inner.kind
        self.calls: list[str] = []
        self.after_search = None

    @property
    def dimension(self) -> int:
        return self.inner.dimension

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    def search(self, vector: np.ndarray, k: int, *, filter: Filter | None = None,
               expansion_search: int | None = None) -> Candidates:
        self.calls.append("search")
        found = self.inner.search(vector, k, filter=filter, expansion_search=expansion_search)
        if self.after_search is not None:
            self.after_search(found)
        return found

    def lexical_search(self, text: str, k: int, *, filter: Filter | None = None) -> Candidates:
        self.calls.append("lexical_search")
        return self.inner.lexical_search(text, k, filter=filter)

    def get(self, ids: Sequence[str]) -> dict[str, StoredDoc]:
        self.calls.append("get")
        return self.inner.get(ids)

    def upsert(self, docs: Sequence[StoredDoc], vectors: np.ndarray) -> tuple[int, int]:
        self.calls.append("upsert")
        return self.inner.upsert(docs, vectors)

    def delete(self, ids: Sequence[str]) -> tuple[int, list[str]]:
        self.calls.append("delete")
        return self.inner.delete(ids)

    def describe(self) -> dict[str, str]:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def server(tiny_models, tmp_path):
    srv = ServerThread(make_config(tiny_models, tmp_path / "index", max_top_k=50))
    stub = srv.stub()
    stub.Upsert(pb.UpsertRequest(documents=[
        pb.Document(id=f"t{i}", title=topic.split()[0], text=f"a note about {topic}, number {i}")
        for i, topic in enumerate(TOPICS)]), timeout=60)
    engine = srv.running.service.engine
    srv.index = engine.index = Recording(engine.index)
    srv.dimension = srv.index.dimension
    yield srv
    srv.stop()


def test_a_search_fetches_its_documents_with_one_get(server):
    stub, index = server.stub(), server.index
    for request, gets in ((pb.SearchRequest(query="coffee", top_k=3), 1),
                          (pb.SearchRequest(query="coffee", top_k=3, skip_rerank=True), 1),
                          (pb.SearchRequest(query="coffee", top_k=3, ids_only=True), 1),  # reranking needs the text
                          (pb.SearchRequest(query="coffee", top_k=3, skip_rerank=True, ids_only=True), 0),
                          (pb.SearchRequest(query="coffee", top_k=3, filter={"none": "x"}), 0)):  # nothing found
        index.calls.clear()
        response = stub.Search(request, timeout=30)
        searches = sorted(c for c in index.calls if c != "get")  # hybrid (the default): both lists, in any order
        assert searches == ["lexical_search", "search"] and index.calls[-gets or len(index.calls):] == ["get"] * gets
        assert index.calls.count("get") == gets, request
        assert all(bool(h.document.text) != request.ids_only for h in response.hits)


def test_a_document_deleted_between_search_and_fetch_is_skipped(server):
    stub, index = server.stub(), server.index
    gone: list[str] = []

    def delete_the_best(found: Candidates) -> None:
        index.after_search = None
        gone.append(found.hits[0].id)
        index.inner.delete([found.hits[0].id])

    for skip_rerank in (False, True):
        index.after_search = delete_the_best
        response = stub.Search(pb.SearchRequest(query="river", top_k=10, skip_rerank=skip_rerank), timeout=30)
        assert gone[-1] not in [h.id for h in response.hits]
        remaining = len(TOPICS) - len(gone)
        assert len(response.hits) == response.candidates == remaining
        assert sorted(h.retrieval_rank for h in response.hits) == list(range(remaining))
        assert all(h.document.text for h in response.hits)
    assert stub.Info(pb.InfoRequest(), timeout=10).index.size == len(TOPICS) - 2


def invalid(call, *args) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return err.value.details()


def test_bad_documents_are_refused_at_the_edge_and_nothing_is_written(server):
    stub, index, dim = server.stub(), server.index, server.dimension

    def doc(doc_id: str, embedding=None, **metadata) -> pb.Document:
        d = pb.Document(id=doc_id, text=f"text of {doc_id}", embedding=embedding or [])
        d.metadata.update(metadata)
        return d

    ok = list(np.linspace(0.1, 1.0, dim))
    batch = [doc(f"n{i}") for i in range(8)]
    batch[7] = doc("n3")
    index.calls.clear()
    assert "duplicate id 'n3' at positions 3 and 7" in invalid(stub.Upsert, pb.UpsertRequest(documents=batch))
    assert f"documents[1].embedding: has 8 values; the index dimension is {dim}" in invalid(
        stub.Upsert, pb.UpsertRequest(documents=[doc("a", ok), doc("b", [1.0] * 8)]))
    assert "documents[1].embedding: contains NaN" in invalid(
        stub.Upsert, pb.UpsertRequest(documents=[doc("a", ok), doc("b", [math.nan] + ok[1:])]))
    assert "documents[2].embedding: is all zeros" in invalid(
        stub.Upsert, pb.UpsertRequest(documents=[doc("a", ok), doc("b", ok), doc("c", [0.0] * dim)]))
    assert "documents[0].metadata.x: numbers must be finite" in invalid(
        stub.Upsert, pb.UpsertRequest(documents=[doc("a", ok, x=math.inf)]))
    assert "ids" in invalid(stub.Delete, pb.DeleteRequest(ids=[]))
    assert "top_k" in invalid(stub.Search, pb.SearchRequest(query="x", top_k=51))
    assert "expansion_search" in invalid(stub.Search, pb.SearchRequest(query="x", expansion_search=5000))
    assert "filter.tags" in invalid(stub.Search, pb.SearchRequest(query="x", filter={"tags": ["a"]}))
    assert index.calls == []  # refused before reaching the backend
    assert index.size == len(TOPICS) and not index.get(["n0", "n3", "a", "b", "c"])


def test_filter_validation_names_the_key():
    check_filter({"lang": "de", "year": 2020, "ok": True, "none": None, "ratio": 0.5}, 8)
    for bad, field in (({"a": object()}, "filter.a"), ({"a": [1]}, "filter.a"), ({"a": {"b": 1}}, "filter.a"),
                       ({"a": math.nan}, "filter.a"), ({"": 1}, "filter"), ({3: 1}, "filter")):
        with pytest.raises(InvalidArgument) as err:
            check_filter(bad, 8)
        assert err.value.field == field, bad
    with pytest.raises(InvalidArgument, match="has 3 keys; the limit is 2"):
        check_filter({"a": 1, "b": 2, "c": 3}, 2)
