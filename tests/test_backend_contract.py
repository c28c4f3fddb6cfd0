"""The index backend contract (`twostage.server.index.backend.IndexBackend`), run against every implementation.

`backend_factory` yields one factory per implementation; `factory.open()` opens the backend on the same
storage every time (a directory, a collection), so a test can close it and open it again as a restart would.
A new backend joins by adding a factory to FACTORIES. Inputs here are valid ones: the engine validates
requests before a backend sees them (tests/test_engine_index.py covers that edge).

Small random unit vectors, no models.
"""
from __future__ import annotations

import importlib.util
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pytest

from twostage.server.index.backend import Candidates, IndexBackend, StoredDoc
from twostage.server.index.embedded import DocumentIndex
from twostage.server.index.settings import IndexSettings

DIM = 16


class BackendFactory(Protocol):
    kind: str

    def open(self) -> IndexBackend:
        """The backend over this factory's storage (created empty on first open), dimension DIM, cos metric."""
        ...


@dataclass
class EmbeddedFactory:
    directory: Path
    kind: str = "embedded"

    def open(self) -> IndexBackend:
        return DocumentIndex.open(self.directory, DIM, IndexSettings(metric="cos"))


@dataclass
class MilvusFactory:
    """milvus-lite through pymilvus (an embedded Milvus server on a local `.db` path)."""

    path: Path
    kind: str = "milvus"

    def open(self) -> IndexBackend:
        from twostage.server.index.milvus import MilvusIndex, MilvusSettings, ModelFingerprint

        settings = MilvusSettings(uri=str(self.path), collection="contract", metric="cos")
        return MilvusIndex.open(settings, ModelFingerprint("contract-model", "e" * 64, DIM))


FACTORIES: dict[str, Callable[[Path], BackendFactory]] = {
    "embedded": lambda tmp: EmbeddedFactory(tmp / "index"),
}
if all(importlib.util.find_spec(m) for m in ("pymilvus", "milvus_lite")):
    FACTORIES["milvus"] = lambda tmp: MilvusFactory(tmp / "milvus.db")


@pytest.fixture(params=sorted(FACTORIES))
def backend_factory(request: pytest.FixtureRequest, tmp_path: Path) -> BackendFactory:
    return FACTORIES[request.param](tmp_path)


@pytest.fixture
def backend(backend_factory: BackendFactory):
    b = backend_factory.open()
    yield b
    b.close()


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def docs(n: int, prefix: str = "d", start: int = 0) -> list[StoredDoc]:
    return [StoredDoc(f"{prefix}{i}", f"text of {prefix}{i}", f"title {i}", {"n": i, "parity": i % 2})
            for i in range(start, start + n)]


def ids(found: Candidates) -> list[str]:
    return [h.id for h in found.hits]


def exact_order(vectors: np.ndarray, query: np.ndarray, keep: list[int] | None = None) -> list[int]:
    rows = list(range(len(vectors))) if keep is None else keep
    scores = vectors[rows] @ (query / np.linalg.norm(query))
    return [rows[j] for j in np.argsort(-scores, kind="stable")]


# ---------------------------------------------------------------------------------------------------- basics
def test_a_new_backend_is_empty_and_describes_itself(backend: IndexBackend):
    assert backend.size == 0 and backend.dimension == DIM and not backend.read_only
    assert backend.get(["anything"]) == {}
    empty = backend.search(unit_vectors(1)[0], 5)
    assert empty.hits == [] and not empty.exhausted
    assert backend.search(unit_vectors(1)[0], 5, filter={"n": 1}).exhausted  # no document can match
    described = backend.describe()
    assert described["kind"] == backend.kind and backend.kind
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in described.items())


def test_upsert_get_delete_and_counts(backend: IndexBackend):
    vectors = unit_vectors(20)
    assert backend.upsert(docs(20), vectors) == (20, 0)
    assert backend.size == 20
    got = backend.get(["d3", "d7", "missing"])
    assert set(got) == {"d3", "d7"}
    assert got["d3"] == StoredDoc("d3", "text of d3", "title 3", {"n": 3, "parity": 1})
    one = backend.search(vectors[0], 5, filter={"n": 4})  # a small index: every document is a candidate
    assert ids(one) == ["d4"] and one.exhausted
    assert backend.delete(["d7", "d3", "nope"]) == (2, ["nope"])
    assert backend.size == 18
    assert backend.get(["d3", "d7"]) == {}
    assert "d7" not in ids(backend.search(vectors[7], 18))
    assert backend.delete(["d7"]) == (0, ["d7"])
    assert backend.size == 18


def test_search_returns_ids_scores_and_ranks_best_first(backend: IndexBackend):
    vectors = unit_vectors(40, seed=1)
    backend.upsert(docs(40), vectors)
    query = unit_vectors(1, seed=2)[0]
    found = backend.search(query, 10)
    assert ids(found) == [f"d{i}" for i in exact_order(vectors, query)[:10]]
    assert [h.rank for h in found.hits] == list(range(10))
    expected = vectors @ query
    assert [h.score for h in found.hits] == pytest.approx(sorted(expected, reverse=True)[:10], abs=1e-4)
    top = backend.search(vectors[7], 1).hits[0]
    assert top.id == "d7" and top.score == pytest.approx(1.0, abs=1e-4)  # cos: similarity, higher is closer
    assert len(backend.search(query, 100).hits) == 40  # never more than there are


def test_upsert_replaces_text_metadata_and_vector(backend: IndexBackend):
    vectors = unit_vectors(10)
    backend.upsert(docs(10), vectors)
    new_vector = unit_vectors(1, seed=99)[0]
    assert backend.upsert([StoredDoc("d4", "new text", "", {"v": 2}), StoredDoc("d10", "fresh")],
                          np.stack([new_vector, unit_vectors(1, seed=5)[0]])) == (1, 1)
    assert backend.size == 11
    assert backend.get(["d4"])["d4"] == StoredDoc("d4", "new text", "", {"v": 2})
    assert ids(backend.search(new_vector, 1)) == ["d4"]
    assert "d4" not in ids(backend.search(vectors[4], 1))


def test_metadata_round_trips_as_json(backend: IndexBackend):
    metadata = {"int": 3, "float": 2.5, "bool": True, "none": None, "text": "grüße 🙂 \"quoted\"",
                "list": ["a", 1, False], "nested": {"deep": {"x": [1, 2]}}}
    backend.upsert([StoredDoc("m", "text", "title", metadata)], unit_vectors(1))
    assert backend.get(["m"])["m"].metadata == metadata


# --------------------------------------------------------------------------------------------------- filters
def test_filter_returns_only_matches_nearest_first(backend: IndexBackend):
    vectors = unit_vectors(60, seed=3)
    batch = [StoredDoc(f"d{i}", "t", "", {"lang": "de" if i % 10 == 0 else "en", "year": 2000 + i % 3,
                                          "flag": i % 4 == 0, "gone": None if i == 5 else 1})
             for i in range(60)]
    backend.upsert(batch, vectors)
    query = unit_vectors(1, seed=4)[0]

    found = backend.search(query, 4, filter={"lang": "de"})
    de = [i for i in range(60) if i % 10 == 0]
    assert ids(found) == [f"d{i}" for i in exact_order(vectors, query, de)[:4]]
    assert not found.exhausted and [h.rank for h in found.hits] == [0, 1, 2, 3]

    # numbers compare by value (protobuf Struct sends 2001 as 2001.0); several keys must all match
    found = backend.search(query, 60, filter={"year": 2001.0, "lang": "en"})
    assert sorted(ids(found)) == sorted(f"d{i}" for i in range(60) if i % 3 == 1 and i % 10)
    assert {h.id for h in backend.search(query, 60, filter={"flag": True}).hits} == {f"d{i}" for i in range(0, 60, 4)}
    assert backend.search(query, 5, filter={"year": True}).hits == []  # a boolean never equals a number
    assert backend.search(query, 5, filter={"flag": 1}).hits == []  # nor a number a boolean
    assert ids(backend.search(query, 5, filter={"gone": None})) == ["d5"]
    assert backend.search(query, 5, filter={"year": "2001"}).hits == []  # a string never equals a number


def test_filter_exhausted_when_fewer_than_k_match_in_the_whole_index(backend: IndexBackend):
    vectors = unit_vectors(50, seed=5)
    backend.upsert([StoredDoc(f"d{i}", "t", "", {"rare": i in (3, 17, 31)}) for i in range(50)], vectors)
    query = unit_vectors(1, seed=6)[0]
    found = backend.search(query, 5, filter={"rare": True})
    assert found.exhausted and sorted(ids(found)) == ["d17", "d3", "d31"]
    assert ids(found) == [f"d{i}" for i in exact_order(vectors, query, [3, 17, 31])]
    exact = backend.search(query, 3, filter={"rare": True})
    assert not exact.exhausted and len(exact.hits) == 3
    nothing = backend.search(query, 5, filter={"no such key": "x"})
    assert nothing.hits == [] and nothing.exhausted
    assert not backend.search(query, 5).exhausted  # no filter: never exhausted


def test_filter_keys_and_values_are_data_not_syntax(backend: IndexBackend):
    odd = ['a"b', "back\\slash", "it's", "x') OR 1=1 --", "$.path", "dotted.key", "\n", "ü"]
    backend.upsert([StoredDoc(f"d{i}", "t", "", {key: key}) for i, key in enumerate(odd)] +
                   [StoredDoc("plain", "t", "", {"k": "v"})], unit_vectors(len(odd) + 1, seed=7))
    query = unit_vectors(1, seed=8)[0]
    for i, key in enumerate(odd):
        assert ids(backend.search(query, 10, filter={key: key})) == [f"d{i}"]
        assert backend.search(query, 10, filter={"k": key}).hits == []


# ------------------------------------------------------------------------------------------------- restarts
def test_reopen_keeps_every_acknowledged_write(backend_factory: BackendFactory):
    vectors = unit_vectors(30, seed=9)
    backend = backend_factory.open()
    try:
        backend.upsert(docs(30), vectors)
        backend.delete(["d1", "d2"])
        backend.upsert([StoredDoc("d3", "replaced", "", {"v": 3})], unit_vectors(1, seed=10))
        before = [ids(backend.search(v, 5)) for v in vectors[:5]]
        filtered = ids(backend.search(vectors[0], 5, filter={"parity": 0}))
    finally:
        backend.close()
    backend = backend_factory.open()
    try:
        assert backend.size == 28
        assert backend.get(["d1", "d2"]) == {}
        assert backend.get(["d3"])["d3"] == StoredDoc("d3", "replaced", "", {"v": 3})
        assert backend.get(["d29"])["d29"] == docs(1, start=29)[0]
        assert [ids(backend.search(v, 5)) for v in vectors[:5]] == before
        assert ids(backend.search(vectors[0], 5, filter={"parity": 0})) == filtered
        assert backend.upsert(docs(1, start=30), unit_vectors(1, seed=11)) == (1, 0)  # still writable
    finally:
        backend.close()


# ---------------------------------------------------------------------------------------------- concurrency
def test_concurrent_searches_and_fetches_see_whole_writes_only(backend: IndexBackend):
    """A writer replaces or deletes pairs of documents (a{i}, b{i}) that share a vector, one pair per write;
    readers search and fetch meanwhile. No reader may see one document of a pair without the other, two
    versions of a pair, or an even pair (never deleted) missing while it is being replaced."""
    pairs = 40
    base = unit_vectors(pairs, seed=11)
    stop = threading.Event()
    errors: list[str] = []

    def pair_docs(i: int, version: int) -> list[StoredDoc]:
        return [StoredDoc(f"a{i}", f"v{version}"), StoredDoc(f"b{i}", f"v{version}")]

    for i in range(0, pairs, 2):
        backend.upsert(pair_docs(i, 0), np.stack([base[i], base[i]]))

    def writer() -> None:
        rng = random.Random(5)
        try:
            for version in range(1, 250):
                i = rng.randrange(pairs)
                if i % 2 and rng.random() < 0.3:  # odd pairs come and go; even ones stay once there
                    backend.delete([f"a{i}", f"b{i}"])
                else:
                    backend.upsert(pair_docs(i, version), np.stack([base[i], base[i]]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"writer failed: {exc!r}")
        finally:
            stop.set()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(pairs)
            hits = set(ids(backend.search(base[i], 2)))
            if len(hits & {f"a{i}", f"b{i}"}) == 1:
                errors.append(f"search saw half of pair {i}: {hits}")
            if i % 2 == 0 and hits != {f"a{i}", f"b{i}"}:
                errors.append(f"search lost pair {i} while it was being replaced: {hits}")
            got = backend.get([f"a{i}", f"b{i}"])
            if len(got) == 1 or (len(got) == 2 and got[f"a{i}"].text != got[f"b{i}"].text):
                errors.append(f"get saw half of pair {i}: {got}")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    stored = backend.get([f"{p}{i}" for i in range(pairs) for p in "ab"])
    assert backend.size == len(stored) and all(f"a{i}" in stored for i in range(0, pairs, 2))
