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
    assert backend.lexical_search("anything", 5).hits == []
    assert backend.lexical_search("anything", 5, filter={"n": 1}).exhausted
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


# --------------------------------------------------------------------------------------------------- lexical
WORDY = [  # (id, title, text, metadata): text written for these tests
    ("kite", "Kites", "A kite flies because wind on its tilted surface makes lift.", {"topic": "physics", "year": 2001}),
    ("bread", "Bread", "Bread rises because yeast makes gas while the dough rests.", {"topic": "food", "year": 2002}),
    ("orchid", "Orchids", "Zygomorphic flowers such as orchids have one plane of symmetry.", {"topic": "botany", "year": 2003}),
    ("river", "Rivers", "A river carries sand and silt to the sea and builds a delta.", {"topic": "earth", "year": 2001}),
    ("wind", "Wind power", "Wind turns the blades of a turbine, and the turbine makes power.", {"topic": "physics", "year": 2002}),
    ("tide", "Tides", "The moon pulls the sea, and the sea rises and falls twice a day.", {"topic": "earth", "year": 2003}),
    ("antenna", "Antennas", "The near field of an antenna stores energy; the far field carries it away.",
     {"topic": "physics", "year": 2004}),
    ("field", "Fields", "A farmer sows wheat in the field in spring.", {"topic": "food", "year": 2004}),
]


def wordy(backend: IndexBackend) -> None:
    backend.upsert([StoredDoc(i, text, title, meta) for i, title, text, meta in WORDY], unit_vectors(len(WORDY), seed=20))


def test_lexical_search_finds_a_rare_exact_word_first(backend: IndexBackend):
    wordy(backend)
    found = backend.lexical_search("which flowers are zygomorphic", 5)
    assert ids(found)[0] == "orchid" and not found.exhausted
    assert ids(backend.lexical_search("ZYGOMORPHIC", 5)) == ["orchid"]  # case does not matter
    wind = backend.lexical_search("wind makes lift", 8)
    assert ids(wind)[0] == "kite"  # has all three words
    assert set(ids(wind)) == {"kite", "wind", "bread"}  # any word may match
    assert [h.rank for h in wind.hits] == list(range(len(wind.hits)))
    scores = [h.score for h in wind.hits]
    assert all(s > 0 for s in scores) and scores == sorted(scores, reverse=True)  # BM25: positive, best first
    assert ids(backend.lexical_search("wind makes lift", 2)) == ids(wind)[:2]  # k bounds the list
    nothing = backend.lexical_search("quasar", 5)
    assert nothing.hits == [] and not nothing.exhausted  # no filter: never exhausted
    assert backend.lexical_search("", 5).hits == []
    assert backend.lexical_search("  ,;!? ", 5).hits == []


def test_lexical_search_follows_upserts_and_deletes(backend: IndexBackend):
    wordy(backend)
    backend.upsert([StoredDoc("orchid", "Actinomorphic flowers have many planes of symmetry.", "Lilies", {})],
                   unit_vectors(1, seed=21))
    assert backend.lexical_search("zygomorphic", 5).hits == []  # the old words left with the old version
    assert ids(backend.lexical_search("actinomorphic lilies", 5)) == ["orchid"]
    backend.delete(["orchid", "kite"])
    assert backend.lexical_search("actinomorphic", 5).hits == []
    assert "kite" not in ids(backend.lexical_search("wind lift", 10))
    backend.upsert([StoredDoc("kite", "Back again: the kite.", "", {})], unit_vectors(1, seed=22))
    assert ids(backend.lexical_search("kite", 5)) == ["kite"]


def test_lexical_search_with_a_filter(backend: IndexBackend):
    wordy(backend)
    physics = backend.lexical_search("wind sea field", 2, filter={"topic": "physics"})
    assert len(physics.hits) == 2 and not physics.exhausted
    assert set(ids(physics)) <= {"kite", "wind", "antenna"}
    every = backend.lexical_search("wind sea field", 10, filter={"topic": "physics"})
    assert set(ids(every)) == {"kite", "wind", "antenna"} and every.exhausted  # fewer than k match both
    unfiltered = ids(backend.lexical_search("wind sea field", 10))
    if backend.kind == "milvus":
        return  # milvus-lite scores BM25 within the filtered rows, so the order may differ (docs/milvus.md)
    assert ids(every) == [i for i in unfiltered if i in {"kite", "wind", "antenna"}]  # same order as without
    assert [h.rank for h in every.hits] == [0, 1, 2]
    # same filter semantics as dense search: numbers by value, several keys all match, types never mix
    assert ids(backend.lexical_search("sea", 10, filter={"year": 2003.0})) == ["tide"]
    assert ids(backend.lexical_search("sea", 10, filter={"year": 2001, "topic": "earth"})) == ["river"]
    assert backend.lexical_search("sea", 10, filter={"year": "2003"}).hits == []
    none = backend.lexical_search("zygomorphic", 3, filter={"topic": "food"})
    assert none.hits == [] and none.exhausted
    assert backend.lexical_search("", 3, filter={"topic": "food"}).exhausted


HOSTILE = [
    '"', '""', '"antenna', 'antenna"', '"near field"', "antenna*", "*", "ante*", "NEAR(antenna field, 1)",
    "NEAR(", "antenna NOT field", "NOT antenna", "antenna AND", "OR", "AND OR NOT", "title:antenna",
    "text:antenna", "{title text}: antenna", "-antenna", "- title : antenna", "^antenna", "^", "(antenna",
    "antenna)", "((()))", "antenna + field", "'; DROP TABLE documents; --", "a\"b", "\\", "\x00antenna",
    "antenna\x00field", "\n\t\r", "grüße", "Ｆｉｅｌｄ", "🙂", "🙂antenna🙂", "天线", "هوائي", "e\u0301",
    "antenna " * 5000, "x" * 100_000, " ".join(f"w{i}" for i in range(20_000)),
]


@pytest.mark.parametrize("query", HOSTILE, ids=lambda q: repr(q[:20]) + (f"...({len(q)})" if len(q) > 20 else ""))
def test_lexical_query_text_is_never_syntax(backend: IndexBackend, query: str):
    """Whatever the text holds (quotes, operators, column names, prefixes, NUL, any script, 100,000 characters),
    a lexical search returns hits or none and never fails."""
    wordy(backend)
    found = backend.lexical_search(query, 5)
    assert isinstance(found, Candidates) and len(found.hits) <= 5
    assert all(h.score > 0 for h in found.hits)
    backend.lexical_search(query, 5, filter={"topic": "physics"})


def test_lexical_operators_and_columns_are_plain_words(backend: IndexBackend):
    wordy(backend)
    # as FTS5 syntax "antenna NOT field" would exclude the antenna document (it says "field"); as words it is
    # that document's best match
    assert ids(backend.lexical_search("antenna NOT field", 5))[0] == "antenna"
    assert set(ids(backend.lexical_search("antenna NOT field", 5))) == {"antenna", "field"}
    # as syntax "title:field" would look in titles only, where the antenna document lacks the word
    assert set(ids(backend.lexical_search("title:field", 5))) == {"antenna", "field"}
    assert ids(backend.lexical_search("ante*", 5)) == []  # no prefix queries: "ante" is not a word here
    assert ids(backend.lexical_search('"near field', 5))[0] == "antenna"
    near = ids(backend.lexical_search("NEAR(farmer wheat, 0)", 5))  # as syntax: nothing (the words are 1 apart)
    assert near[0] == "field" and set(near) == {"field", "antenna"}  # "near" is a word of the antenna text
    assert ids(backend.lexical_search("-wheat", 5)) == ["field"]
    assert ids(backend.lexical_search("(yeast", 5)) == ["bread"]


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
        lexical = backend.lexical_search("title 7 d29 replaced", 30)
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
        again = backend.lexical_search("title 7 d29 replaced", 30)  # the terms came back with the documents
        assert ids(again) == ids(lexical) and {"d3", "d7", "d29"} <= set(ids(again))
        assert [h.score for h in again.hits] == pytest.approx([h.score for h in lexical.hits])
        assert backend.lexical_search("d1", 5).hits == []  # and deleted ones stayed gone
        assert backend.upsert(docs(1, start=30), unit_vectors(1, seed=11)) == (1, 0)  # still writable
        assert ids(backend.lexical_search("d30", 5)) == ["d30"]
    finally:
        backend.close()


# ---------------------------------------------------------------------------------------------- concurrency
def test_concurrent_searches_and_fetches_see_whole_writes_only(backend: IndexBackend):
    """A writer replaces or deletes pairs of documents (a{i}, b{i}) that share a vector and a word, one pair per
    write; readers search (by vector and by word) and fetch meanwhile. No reader may see one document of a pair
    without the other, two versions of a pair, or an even pair (never deleted) missing while it is being
    replaced."""
    pairs = 40
    base = unit_vectors(pairs, seed=11)
    stop = threading.Event()
    errors: list[str] = []

    def pair_docs(i: int, version: int) -> list[StoredDoc]:  # the word pair{i} finds both by lexical search
        return [StoredDoc(f"a{i}", f"pair{i} v{version}"), StoredDoc(f"b{i}", f"pair{i} v{version}")]

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
            words = set(ids(backend.lexical_search(f"pair{i}", 4)))
            if words not in (set(), {f"a{i}", f"b{i}"}):
                errors.append(f"lexical search saw half of pair {i} (or another pair): {words}")
            if i % 2 == 0 and not words:
                errors.append(f"lexical search lost pair {i} while it was being replaced")
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
