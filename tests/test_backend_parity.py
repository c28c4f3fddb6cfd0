"""Parity of the two backends, the embedded one (usearch + SQLite) and Milvus (through milvus-lite), beyond the
contract suite (test_backend_contract.py): writes and their counts, visibility of acknowledged writes, filters with JSON
equality, restart, scores by metric, refusal of a mismatched index, and the same Search/Rerank/Upsert/Delete
answers through a server on either backend. What only one backend promises is tested in its own file
(test_index.py: snapshots, crash safety, half-writes never seen; test_milvus.py: escaping, health)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from twostage.server.errors import FailedPrecondition, InvalidArgument
from twostage.server.index.backend import StoredDoc
from twostage.server.index.embedded import DocumentIndex
from twostage.server.index.filters import metadata_matches
from twostage.server.index.settings import IndexSettings

DIM = 8
BACKENDS = ["embedded", pytest.param("milvus", marks=pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("pymilvus", "milvus_lite")),
    reason="pymilvus and milvus-lite are not installed"))]


def opener(kind: str, root: Path, dim: int = DIM, metric: str = "cos") -> Callable[[], object]:
    """A function that opens (again) the same index of backend `kind` under `root`."""
    if kind == "embedded":
        return lambda: DocumentIndex.open(root / "index", dim, IndexSettings(metric=metric))
    from twostage.server.index.milvus import MilvusIndex, MilvusSettings, ModelFingerprint

    settings = MilvusSettings(uri=str(root / "milvus.db"), collection="contract", metric=metric)
    return lambda: MilvusIndex.open(settings, ModelFingerprint("contract-model", "e" * 64, dim))


@pytest.fixture(params=BACKENDS)
def kind(request) -> str:
    return request.param


def vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_writes_report_their_counts_and_reads_see_them(kind, tmp_path):
    with opener(kind, tmp_path)() as ix:
        v = vectors(5)
        assert ix.upsert([StoredDoc(f"d{i}", f"text {i}", f"title {i}", {"i": i}) for i in range(5)], v) == (5, 0)
        assert ix.upsert([StoredDoc("d0", "replaced", "", {"i": -1}), StoredDoc("d5", "new")], v[:2]) == (1, 1)
        assert ix.size == 6
        assert ix.get(["d0", "nope"]) == {"d0": StoredDoc("d0", "replaced", "", {"i": -1})}
        assert ix.delete(["d1", "nope", "d2"]) == (2, ["nope"])
        assert ix.size == 4
        assert ix.delete(["d1"]) == (0, ["d1"])


def test_acknowledged_writes_are_seen_by_the_next_search(kind, tmp_path):
    with opener(kind, tmp_path)() as ix:
        v = vectors(6, seed=1)
        ix.upsert([StoredDoc(f"d{i}", "x") for i in range(6)], v)
        assert ix.search(v[3], 1).hits[0].id == "d3"
        ix.upsert([StoredDoc("d3", "moved")], v[5:6] * -1.0)  # d3 now points the other way
        assert ix.search(v[3], 1).hits[0].id != "d3"
        assert ix.search(-v[5], 1).hits[0].id == "d3"
        ix.delete(["d4"])
        assert "d4" not in {h.id for h in ix.search(v[4], 6).hits}


METADATA = {"int3": {"n": 3}, "float3": {"n": 3.0}, "str3": {"n": "3"}, "true": {"n": True}, "one": {"n": 1},
            "null": {"n": None}, "none": {}, "topic": {"topic": "physics", "year": 2020},
            "topic2": {"topic": "physics", "year": 2021.0}, "quote": {"topic": 'say "hi"'}}
FILTERS = [{"n": 3}, {"n": 3.0}, {"n": "3"}, {"n": True}, {"n": 1}, {"n": None}, {"topic": "physics"},
           {"topic": "physics", "year": 2021}, {"topic": 'say "hi"'}, {"missing": 1}]


def test_filters_follow_json_equality_and_report_exhaustion(kind, tmp_path):
    with opener(kind, tmp_path)() as ix:
        ids = list(METADATA)
        ix.upsert([StoredDoc(i, f"text {i}", "", METADATA[i]) for i in ids], vectors(len(ids), seed=2))
        q = vectors(1, seed=3)[0]
        for flt in FILTERS:
            expected = {i for i in ids if metadata_matches(METADATA[i], flt)}
            found = ix.search(q, len(ids), filter=flt)
            assert {h.id for h in found.hits} == expected, flt
            assert found.exhausted, flt  # every filter here leaves fewer than len(ids) documents
        assert not ix.search(q, 1, filter={"topic": "physics"}).exhausted


def test_restart_keeps_documents_and_answers(kind, tmp_path):
    open_index = opener(kind, tmp_path)
    v = vectors(12, seed=4)
    with open_index() as ix:
        ix.upsert([StoredDoc(f"d{i}", f"text {i}", "", {"i": i}) for i in range(12)], v)
        ix.delete(["d7"])
        before = [(h.id, round(h.score, 5)) for h in ix.search(v[2], 5).hits]
    with open_index() as ix:
        assert ix.size == 11
        assert ix.get(["d7", "d8"]).keys() == {"d8"}
        assert [(h.id, round(h.score, 5)) for h in ix.search(v[2], 5).hits] == before


@pytest.mark.parametrize("metric", ["cos", "ip", "l2sq"])
def test_scores_mean_the_same_on_every_backend(kind, tmp_path, metric):
    with opener(kind, tmp_path, metric=metric)() as ix:
        v = vectors(20, seed=5)
        ix.upsert([StoredDoc(f"d{i}", "x") for i in range(20)], v)
        q = vectors(1, seed=6)[0]
        if metric == "cos":
            exact = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
        elif metric == "ip":
            exact = v @ q
        else:
            exact = -((v - q) ** 2).sum(axis=1)
        order = np.argsort(-exact)[:5]
        hits = ix.search(q, 5).hits
        assert [h.id for h in hits] == [f"d{i}" for i in order]
        assert [h.score for h in hits] == pytest.approx([float(exact[i]) for i in order], rel=1e-4, abs=1e-4)


def test_an_index_of_another_dimension_is_refused_naming_both(kind, tmp_path):
    with opener(kind, tmp_path)() as ix:
        ix.upsert([StoredDoc("a", "x")], vectors(1))
    with pytest.raises(FailedPrecondition) as err:
        opener(kind, tmp_path, dim=DIM * 2)()
    assert f"dimension {DIM}" in str(err.value) and f"dimension {DIM * 2}" in str(err.value)


def test_both_backends_give_the_same_candidates(tmp_path):
    """The backend changes where candidates come from, not what they are."""
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    v = vectors(200, seed=8)
    docs = [StoredDoc(f"d{i}", f"text {i}", "", {"even": i % 2 == 0}) for i in range(200)]
    answers = []
    for kind in ("embedded", "milvus"):
        with opener(kind, tmp_path)() as ix:
            ix.upsert(docs, v)
            # expansion_search above the corpus size: both searches are exact, so approximation cannot differ
            answers.append([[h.id for h in ix.search(q, 10, filter=f, expansion_search=512).hits]
                            for q in vectors(5, seed=9) for f in (None, {"even": True})])
    assert answers[0] == answers[1]


# ---------------------------------------------------------------------------------------------
# Through the server (tiny models): the same requests, the same answers, on either backend
# ---------------------------------------------------------------------------------------------

SERVER_DOCS = [("kite", "Kites", "A kite flies because wind on its tilted surface makes lift.", {"topic": "physics"}),
               ("bread", "Bread", "Bread rises because yeast makes gas in the dough.", {"topic": "cooking"}),
               ("moon", "The Moon", "The Moon shows phases as it orbits the Earth.", {"topic": "physics"}),
               ("tea", "Tea", "Green tea leaves are steamed soon after picking.", {"topic": "cooking", "year": 3})]


def _serve_and_ask(kind: str, models: Path, root: Path) -> list:
    import grpc

    from server_harness import ServerThread, make_config
    from twostage.v1 import twostage_pb2 as pb

    root.mkdir(parents=True, exist_ok=True)
    extra = {"milvus_uri": str(root / "serve.db"), "milvus_collection": "served"} if kind == "milvus" else {}
    answers: list = []
    with ServerThread(make_config(models, root / "index", **extra)) as srv:
        stub = srv.stub()
        docs = []
        for doc_id, title, text, meta in SERVER_DOCS:
            d = pb.Document(id=doc_id, title=title, text=text)
            d.metadata.update(meta)
            docs.append(d)
        up = stub.Upsert(pb.UpsertRequest(documents=docs), timeout=60)
        answers.append((up.inserted, up.updated, up.index_size))
        up = stub.Upsert(pb.UpsertRequest(documents=[docs[0]]), timeout=60)
        answers.append((up.inserted, up.updated, up.index_size))
        for request in (pb.SearchRequest(query="why does a kite fly", top_k=3),
                        pb.SearchRequest(query="why does a kite fly", top_k=4, skip_rerank=True),
                        pb.SearchRequest(query="tea", top_k=4, ids_only=True, filter={"topic": "cooking"}),
                        pb.SearchRequest(query="tea", top_k=4, filter={"year": 3.0})):
            found = stub.Search(request, timeout=60)
            answers.append([(h.id, round(h.score, 4), h.retrieval_rank, h.document.text) for h in found.hits])
            answers.append((found.candidates, found.filter_exhausted))
        rerank = stub.Rerank(pb.RerankRequest(query="kite", document_ids=["moon", "kite"]), timeout=60)
        answers.append([(r.id, round(r.score, 4)) for r in rerank.results])
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(pb.RerankRequest(query="kite", document_ids=["nope"]), timeout=60)
        answers.append(err.value.code())
        gone = stub.Delete(pb.DeleteRequest(ids=["tea", "nope"]), timeout=60)
        answers.append((gone.deleted, list(gone.not_found), gone.index_size))
        info = stub.Info(pb.InfoRequest(), timeout=10).index
        answers.append((info.size, info.dimension, info.metric))
        assert info.backend == kind and info.collection == ("served" if kind == "milvus" else "")
    return answers


def test_server_answers_the_same_on_both_backends(tiny_models, tmp_path):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    embedded = _serve_and_ask("embedded", tiny_models, tmp_path / "e")
    milvus = _serve_and_ask("milvus", tiny_models, tmp_path / "m")
    assert embedded == milvus
    assert embedded[0] == (4, 0, 4) and embedded[1] == (0, 1, 4)
