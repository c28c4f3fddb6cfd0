"""The embedded backend (usearch HNSW + SQLite) beyond the backend contract (tests/test_backend_contract.py):
scores per metric, snapshots and crash safety, view mode, filter strategies, HNSW recall and exactness, the
store reads a search makes.

Synthetic vectors only (no models)."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from twostage.server.errors import FailedPrecondition
from twostage.server.index.backend import StoredDoc, embedding_text
from twostage.server.index.embedded import DocumentIndex
from twostage.server.index.filters import json_equal, metadata_matches
from twostage.server.index.layout import SNAPSHOT_META_FILE, STORE_FILE
from twostage.server.index.settings import IndexSettings
from twostage.server.index.store import DocumentStore

DIM = 16


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def clustered(n: int, dim: int, clusters: int, seed: int, noise: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embedding_like(n: int, dim: int, clusters: int, seed: int, latent_dim: int = 64) -> np.ndarray:
    """Clustered unit vectors with low intrinsic dimension, like sentence embeddings: cluster centres
    plus spread in a `latent_dim` space, mapped into `dim` dimensions, plus a little isotropic noise.
    (Isotropic 384-d noise would make all points of a cluster nearly equidistant, so "nearest" loses
    its meaning; real embeddings do not look like that.)"""
    fixed = np.random.default_rng(100)  # centres and projection shared by corpus and queries
    centers = fixed.normal(size=(clusters, latent_dim))
    projection = fixed.normal(size=(latent_dim, dim)) / np.sqrt(latent_dim)
    rng = np.random.default_rng(seed)
    z = centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, latent_dim))
    x = (z @ projection + 0.05 * rng.normal(size=(n, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def docs(n: int, prefix: str = "d", start: int = 0, **meta) -> list[StoredDoc]:
    return [StoredDoc(f"{prefix}{i}", f"text of {prefix}{i}", f"title {i}", {"n": i, **meta})
            for i in range(start, start + n)]


def open_index(path: Path, dim: int = DIM, **settings) -> DocumentIndex:
    return DocumentIndex.open(path, dim, IndexSettings(**settings))


def run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (a separate process can crash or skip close())."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=120, check=True)


# ---------------------------------------------------------------------------------------------
# Basic operations
# ---------------------------------------------------------------------------------------------


def test_a_replaced_document_gets_a_new_key_and_keys_are_never_reused(tmp_path):
    vectors = unit_vectors(10)
    with open_index(tmp_path / "ix") as index:
        index.upsert(docs(10), vectors)
        old_key = index._store.existing(["d4"])["d4"]
        index.delete(["d9"])
        index.upsert([StoredDoc("d4", "new text"), StoredDoc("d9", "back")], unit_vectors(2, seed=99))
        new_keys = index._store.existing(["d4", "d9"])
        assert new_keys["d4"] > old_key and new_keys["d9"] > new_keys["d4"] > 9  # monotonic, the old ones unused
        assert sorted(index._graph.keys().tolist()) == sorted(index._store.keys().tolist())
        index.verify()


def test_embedding_text_joins_title_and_text():
    assert embedding_text("Title", "body") == "Title. body"
    assert embedding_text("", "body") == "body"
    assert embedding_text("   ", "body") == "body"


@pytest.mark.parametrize("metric", ["ip", "l2sq", "cos"])
def test_scores_follow_the_metric(tmp_path, metric):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(30, DIM)).astype(np.float32)
    query = rng.normal(size=DIM).astype(np.float32)
    with open_index(tmp_path / "ix", metric=metric) as index:
        index.upsert(docs(30), vectors)
        if metric == "ip":
            expected = vectors @ query
        elif metric == "l2sq":
            expected = -((vectors - query) ** 2).sum(axis=1)
        else:
            expected = (vectors @ query) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(query)
        order = np.argsort(-expected)[:5]
        for result in (index.search(query, 5), index.exact_search(query, 5)):
            assert [h.id for h in result.hits] == [f"d{i}" for i in order]
            assert [h.score for h in result.hits] == pytest.approx(expected[order].tolist(), rel=1e-4, abs=1e-4)


def test_expansion_search_override_is_per_request(tmp_path):
    vectors = unit_vectors(200)
    with open_index(tmp_path / "ix", expansion_search=64) as index:
        index.upsert(docs(200), vectors)
        assert index.search(vectors[9], 5, expansion_search=300).hits[0].id == "d9"
        assert index._graph.hnsw.expansion_search == 64


def test_search_reads_ids_only_and_metadata_only_to_filter(tmp_path, monkeypatch):
    """A search maps graph keys to ids and nothing more (the engine fetches the documents it keeps with one
    `get`); with a filter it also reads the metadata the filter needs, never text or title."""
    reads: list[str] = []
    for name in ("get", "ids_of", "rows_of", "scan"):
        real = getattr(DocumentStore, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(DocumentStore, name, spy)
    vectors = unit_vectors(300, seed=2)
    batch = [StoredDoc(f"d{i}", "long text " * 50, "title", {"rare": i == 7}) for i in range(300)]
    with open_index(tmp_path / "ix", expansion_search=64) as index:
        index.upsert(batch, vectors)
        reads.clear()
        assert [h.id for h in index.search(vectors[3], 5).hits][0] == "d3"
        assert reads == ["ids_of"]
        reads.clear()
        index.search(vectors[3], 5, filter={"rare": False})  # met on the HNSW path
        assert set(reads) == {"rows_of"}
        reads.clear()
        assert [h.id for h in index.search(vectors[3], 5, filter={"rare": True}).hits] == ["d7"]  # a scan
        assert "get" not in reads and "scan" in reads


# ---------------------------------------------------------------------------------------------
# Persistence and crash safety
# ---------------------------------------------------------------------------------------------


def test_persistence_across_close_and_reopen(tmp_path):
    path = tmp_path / "ix"
    vectors = unit_vectors(50)
    with open_index(path) as index:
        assert index.opened_from == "new"
        index.upsert(docs(50), vectors)
        index.delete(["d1"])
        before = index.search(vectors[10], 5)
    with open_index(path) as index:
        assert index.opened_from == "snapshot"
        assert index.size == 49 and index.verify() == 49
        assert index.search(vectors[10], 5) == before
        assert index.get(["d1"]) == {}
        assert index.get(["d2"])["d2"].metadata == {"n": 2}


def test_writes_after_the_last_snapshot_are_replayed(tmp_path):
    path = tmp_path / "ix"
    run_child("""
        import sys, os, numpy as np
        from twostage.server.index import DocumentIndex, IndexSettings, StoredDoc
        ix = DocumentIndex.open(sys.argv[1], 16, IndexSettings())
        v = np.random.default_rng(0).normal(size=(60, 16)).astype(np.float32)
        ix.upsert([StoredDoc(f"d{i}", "t") for i in range(50)], v[:50])
        ix.save()
        ix.upsert([StoredDoc(f"d{i}", "t") for i in range(50, 60)], v[50:])
        ix.delete([f"d{i}" for i in range(5)])
        os._exit(0)  # no close(): the snapshot misses the last two writes
    """, str(path))
    with open_index(path) as index:
        assert index.opened_from == "snapshot + replay (+10 -5)"
        assert index.size == 55 and index.verify() == 55
        assert index.get(["d0"]) == {} and "d59" in index.get(["d59"])


def test_corrupt_or_truncated_snapshot_is_not_loaded(tmp_path):
    path = tmp_path / "ix"
    vectors = unit_vectors(300)
    with open_index(path) as index:
        index.upsert(docs(300), vectors)
    meta = json.loads((path / SNAPSHOT_META_FILE).read_text())
    snapshot = path / meta["file"]
    data = snapshot.read_bytes()

    snapshot.write_bytes(data[: len(data) // 2])  # truncated
    with open_index(path) as index:
        assert index.opened_from.startswith("rebuild") and "bytes" in index.opened_from
        assert index.size == 300 and index.search(vectors[42], 1).hits[0].id == "d42"
    meta = json.loads((path / SNAPSHOT_META_FILE).read_text())  # the rebuild wrote a fresh snapshot
    snapshot = path / meta["file"]
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, flipped bits
    snapshot.write_bytes(bytes(data))
    with open_index(path) as index:
        assert "sha256" in index.opened_from
        assert index.size == 300 and index.verify() == 300

    (path / SNAPSHOT_META_FILE).write_text("{not json")
    (path / "hnsw-000000000099.usearch.tmp").write_bytes(b"half a file")  # a save cut short
    with open_index(path) as index:
        assert index.opened_from.startswith("rebuild")
        assert index.search(vectors[7], 1).hits[0].id == "d7"
    assert not list(path.glob("*.tmp"))


def test_snapshot_ahead_of_store_is_not_loaded(tmp_path):
    path = tmp_path / "ix"
    with open_index(path) as index:
        index.upsert(docs(10), unit_vectors(10))
    meta = json.loads((path / SNAPSHOT_META_FILE).read_text())
    meta["seq"] = 1000
    (path / SNAPSHOT_META_FILE).write_text(json.dumps(meta))
    with open_index(path) as index:
        assert "ahead of the store" in index.opened_from
        assert index.size == 10


_CRASH_CHILD = """
import sys, numpy as np
from twostage.server.index import DocumentIndex, IndexSettings, StoredDoc
path, round_no = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(round_no)


def say(*words):  # one write per line, so a kill cannot split a line
    sys.stdout.write(" ".join(map(str, words)) + "\\n")
    sys.stdout.flush()


ix = DocumentIndex.open(path, 16, IndexSettings(expansion_add=32))
say("opened", ix.size)
live = []
n = 0
while True:
    n += 1
    new = [f"r{round_no}-{n}-{j}" for j in range(4)]
    replace = [str(x) for x in rng.choice(live, size=min(2, len(live)), replace=False)] if live else []
    batch = [StoredDoc(i, f"v{round_no}x{n} common") for i in new + replace]
    say("plan upsert", n, ",".join(new + replace))
    ix.upsert(batch, rng.normal(size=(len(batch), 16)).astype(np.float32))
    say("ack upsert", n, ",".join(new + replace))
    live += new
    if n % 3 == 0:
        gone = [live.pop(int(rng.integers(len(live)))) for _ in range(2)]
        say("plan delete", n, ",".join(gone))
        ix.delete(gone)
        say("ack delete", n, ",".join(gone))
    ix.maybe_save(0.0)  # snapshot after every write, so kills land inside saves too
"""


def test_kill_9_during_upserts_loses_no_acknowledged_write(tmp_path):
    """A child upserts (and deletes) in a loop, printing each write before it starts and after it is
    acknowledged; it is SIGKILLed at a random moment. After reopening, the store, the graph and the lexical
    index hold the same documents, every acknowledged write is there, and the write in flight is all or
    nothing."""
    path = tmp_path / "ix"
    script = tmp_path / "child.py"
    script.write_text(_CRASH_CHILD)
    rng = random.Random(1234)
    expected: dict[str, str] = {}  # id -> text of its last acknowledged upsert
    deleted: set[str] = set()
    for round_no in range(1, 4):
        child = subprocess.Popen([sys.executable, str(script), str(path), str(round_no)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().startswith("opened")
        kill_after = rng.randint(8, 40)
        lines: list[str] = []
        while sum(x.startswith("ack") for x in lines) < kill_after:
            line = child.stdout.readline()
            assert line, child.stderr.read()
            lines.append(line.strip())
        threading.Event().wait(rng.uniform(0, 0.02))
        os.kill(child.pid, signal.SIGKILL)
        # read the rest through the same buffered stream (communicate() would bypass its read-ahead)
        rest = child.stdout.read()
        lines += rest.split("\n")[:-1]  # drop an unterminated last line
        child.wait()
        child.stdout.close()
        child.stderr.close()
        in_flight = None
        for line in lines:
            kind, op, n, ids = line.split(" ", 3)
            if kind == "plan":
                in_flight = (op, f"v{round_no}x{n} common", ids.split(","))
                continue
            in_flight = None
            for i in ids.split(","):
                if op == "upsert":
                    expected[i] = f"v{round_no}x{n} common"
                    deleted.discard(i)
                else:
                    del expected[i]
                    deleted.add(i)

        with open_index(path, expansion_add=32) as index:
            assert index.verify() == index.size  # store keys == graph keys; lexical index == stored texts
            unsure = set(in_flight[2]) if in_flight else set()
            stored = index.get([*expected, *deleted, *unsure])
            for doc_id, text in expected.items():  # every acknowledged upsert is there...
                if doc_id not in unsure:
                    assert doc_id in stored and stored[doc_id].text == text, (doc_id, index.opened_from)
            for doc_id in deleted:  # ...and every acknowledged delete
                assert doc_id not in stored or doc_id in unsure
            if in_flight:  # the write in flight was applied entirely or not at all
                op, text, ids = in_flight
                if op == "upsert":
                    done = [i in stored and stored[i].text == text for i in ids]
                else:
                    done = [i not in stored for i in ids]
                assert all(done) or not any(done), (in_flight, done)
                for i in ids:
                    if i in stored:
                        expected[i] = stored[i].text
                        deleted.discard(i)
                    else:
                        expected.pop(i, None)
                        deleted.add(i)
            assert index.size == len(expected)  # nothing else is stored
            # the lexical index holds exactly the stored texts: every document by the word all share, each
            # version's documents by that version's word
            assert {h.id for h in index.lexical_search("common", len(expected) + 10).hits} == set(expected)
            by_text: dict[str, set[str]] = {}
            for doc_id, text in expected.items():
                by_text.setdefault(text, set()).add(doc_id)
            for text, doc_ids in by_text.items():
                word = text.split()[0]
                assert {h.id for h in index.lexical_search(word, 100).hits} == doc_ids, (word, index.opened_from)


def test_second_open_of_the_same_directory_is_refused(tmp_path):
    with open_index(tmp_path / "ix"):
        with pytest.raises(FailedPrecondition, match="in use by another process"):
            open_index(tmp_path / "ix")


def test_dimension_or_metric_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "ix"
    with open_index(path) as index:
        index.upsert(docs(3), unit_vectors(3))
    with pytest.raises(FailedPrecondition, match=r"dimension 16 and metric 'cos'.*dimension 32"):
        DocumentIndex.open(path, 32, IndexSettings())
    with pytest.raises(FailedPrecondition, match=r"metric 'ip'"):
        DocumentIndex.open(path, DIM, IndexSettings(metric="ip"))


def test_changed_hnsw_settings_rebuild_the_graph(tmp_path):
    path = tmp_path / "ix"
    vectors = unit_vectors(100)
    with open_index(path) as index:
        index.upsert(docs(100), vectors)
    with open_index(path, dtype="f16") as index:
        assert "dtype 'f32' differs from 'f16'" in index.opened_from
        assert index.search(vectors[3], 1).hits[0].id == "d3"
    with open_index(path, dtype="f16") as index:
        assert index.opened_from == "snapshot"


def as_format_1(path: Path) -> None:
    """Turn the store in `path` into what store format 1 (before the lexical index) left on disk: the same
    `meta` and `documents` tables, no FTS5 table, no triggers, format "1"."""
    conn = sqlite3.connect(path / STORE_FILE)
    with conn:
        for trigger in ("insert", "delete", "update"):
            conn.execute(f"DROP TRIGGER documents_lexical_{trigger}")
        conn.execute("DROP TABLE lexical")
        conn.execute("UPDATE meta SET value = '1' WHERE name = 'format'")
    assert {name for (name,) in conn.execute("SELECT name FROM sqlite_master")} == {
        "meta", "sqlite_autoindex_meta_1", "documents", "sqlite_autoindex_documents_1", "sqlite_sequence"}
    conn.close()


def store_format(path: Path) -> str:
    conn = sqlite3.connect(path / STORE_FILE)
    try:
        return conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()[0]
    finally:
        conn.close()


def test_a_format_1_index_is_upgraded_in_place_when_opened_writable(tmp_path, caplog):
    path = tmp_path / "ix"
    vectors = unit_vectors(40)
    batch = [StoredDoc(f"d{i}", f"text number {i} about {'cats' if i % 2 else 'dogs'}", f"title {i}", {"n": i})
             for i in range(40)]
    with open_index(path) as index:
        index.upsert(batch, vectors)
        index.delete(["d5"])
        nearest = [h.id for h in index.search(vectors[7], 5).hits]
    as_format_1(path)
    with caplog.at_level("WARNING", logger="twostage.index"):
        with open_index(path) as index:
            assert "upgraded store format 1 -> 2" in caplog.text and "39 documents" in caplog.text
            assert index.opened_from == "snapshot"  # the graph is untouched
            assert index.verify() == 39
            assert index.get([d.id for d in batch]) == {d.id: d for d in batch if d.id != "d5"}
            assert [h.id for h in index.search(vectors[7], 5).hits] == nearest
            assert [h.id for h in index.lexical_search("number 12", 3).hits][0] == "d12"
            assert {h.id for h in index.lexical_search("cats", 40).hits} == {f"d{i}" for i in range(1, 40, 2)} - {"d5"}
            index.upsert([StoredDoc("new", "fresh words")], unit_vectors(1, seed=3))  # triggers work
            assert [h.id for h in index.lexical_search("fresh", 3).hits] == ["new"]
    assert store_format(path) == "2"
    caplog.clear()
    with caplog.at_level("WARNING", logger="twostage.index"):
        with open_index(path) as index:
            assert "upgraded" not in caplog.text and index.size == 40 and index.verify() == 40


def test_a_format_1_index_opened_read_only_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / "ix"
    with open_index(path) as index:
        index.upsert(docs(20), unit_vectors(20))
    as_format_1(path)
    before = (path / STORE_FILE).read_bytes()
    with pytest.raises(FailedPrecondition, match=r"store format 1.*index_view.*twostage index build") as refused:
        open_index(path, view=True)
    assert str(path) in str(refused.value)
    assert store_format(path) == "1" and (path / STORE_FILE).read_bytes() == before
    with open_index(path) as index:  # opened writable once: upgraded, nothing lost
        assert index.size == 20 and index.verify() == 20
    with open_index(path, view=True) as view:
        assert view.get(["d3"])["d3"] == docs(20)[3]
        assert [h.id for h in view.lexical_search("d3", 5).hits] == ["d3"]


def test_an_unknown_store_format_is_refused(tmp_path):
    path = tmp_path / "ix"
    with open_index(path):
        pass
    conn = sqlite3.connect(path / STORE_FILE)
    with conn:
        conn.execute("UPDATE meta SET value = '99' WHERE name = 'format'")
    conn.close()
    with pytest.raises(FailedPrecondition, match="store format 99 is not 2"):
        open_index(path)


# ---------------------------------------------------------------------------------------------
# View mode
# ---------------------------------------------------------------------------------------------


def test_view_mode_searches_and_refuses_writes(tmp_path):
    path = tmp_path / "ix"
    vectors = unit_vectors(100)
    with open_index(path) as index:
        index.upsert(docs(100), vectors)
    with open_index(path, view=True) as view:
        assert view.read_only and view.opened_from == "snapshot (view)"
        assert view.search(vectors[5], 1).hits[0].id == "d5"
        with pytest.raises(FailedPrecondition, match="read-only"):
            view.upsert(docs(1), vectors[:1])
        with pytest.raises(FailedPrecondition, match="read-only"):
            view.delete(["d1"])
        assert view.size == 100
        with open_index(path, view=True) as second:  # views share the directory
            assert second.size == 100
        with pytest.raises(FailedPrecondition, match="in use"):
            open_index(path)


def test_view_mode_refreshes_a_stale_snapshot(tmp_path):
    path = tmp_path / "ix"
    run_child("""
        import sys, os, numpy as np
        from twostage.server.index import DocumentIndex, IndexSettings, StoredDoc
        ix = DocumentIndex.open(sys.argv[1], 16, IndexSettings())
        v = np.random.default_rng(0).normal(size=(30, 16)).astype(np.float32)
        ix.upsert([StoredDoc(f"d{i}", "t") for i in range(20)], v[:20])
        ix.save()
        ix.upsert([StoredDoc(f"d{i}", "t") for i in range(20, 30)], v[20:])
        os._exit(0)
    """, str(path))
    with open_index(path, view=True) as view:
        assert view.opened_from == "snapshot (view, refreshed)"
        assert view.size == 30 and view.verify() == 30


def test_view_of_missing_index_is_an_error(tmp_path):
    with pytest.raises(FailedPrecondition, match="no index"):
        open_index(tmp_path / "nothing", view=True)


# ---------------------------------------------------------------------------------------------
# Metadata filter
# ---------------------------------------------------------------------------------------------


def test_json_equal_and_metadata_matches():
    assert json_equal(3, 3.0) and json_equal([1, {"a": 2.0}], [1.0, {"a": 2}])
    assert not json_equal(True, 1) and not json_equal(0, False) and not json_equal("1", 1)
    assert json_equal(None, None) and not json_equal(None, 0)
    assert not json_equal({"a": 1}, {"a": 1, "b": 2})
    assert metadata_matches({"lang": "de", "year": 2020}, {"year": 2020.0})
    assert not metadata_matches({"lang": "de"}, {"lang": "de", "year": 2020})
    assert metadata_matches({"x": 1}, {})


def filter_corpus(n: int = 5000, rare_every: int = 50):
    vectors = clustered(n, 32, 40, seed=3)
    batch = [StoredDoc(f"d{i}", f"t{i}", "", {"lang": "de" if i % rare_every == 0 else "en",
                                               "year": 2000 + i % 7, "flag": 1, "tags": ["a", i % 2]})
             for i in range(n)]
    return vectors, batch


def exact_filtered(vectors, batch, query, predicate, k):
    keep = [i for i, d in enumerate(batch) if predicate(d.metadata)]
    scores = vectors[keep] @ (query / np.linalg.norm(query))
    return [batch[keep[j]].id for j in np.argsort(-scores)[:k]]


def test_filter_correct_when_it_removes_98_percent(tmp_path):
    vectors, batch = filter_corpus()  # 100 of 5000 documents have lang=de
    queries = clustered(20, 32, 40, seed=4)
    with open_index(tmp_path / "ix", dim=32) as index:
        for start in range(0, len(batch), 1000):
            index.upsert(batch[start:start + 1000], vectors[start:start + 1000])
        strategies = set()
        for q in queries:
            result = index.search(q, 10, filter={"lang": "de"})
            strategies.add(result.strategy)
            ids = [h.id for h in result.hits]
            assert len(ids) == 10 and not result.exhausted
            assert all(int(i[1:]) % 50 == 0 for i in ids)  # no wrong documents
            scores = [h.score for h in result.hits]
            assert scores == sorted(scores, reverse=True)
            truth = exact_filtered(vectors, batch, q, lambda m: m["lang"] == "de", 10)
            if result.strategy == "scan":
                assert ids == truth
            else:
                assert len(set(ids) & set(truth)) >= 9
        # more wanted than exist: every matching document, flagged exhausted
        result = index.search(queries[0], 150, filter={"lang": "de"})
        assert result.exhausted and len(result.hits) == 100 and result.strategy == "scan"
        assert {h.id for h in result.hits} == {f"d{i}" for i in range(0, 5000, 50)}
        # numbers compare as JSON values: protobuf Struct sends 2003 as 2003.0
        result = index.search(queries[1], 20, filter={"year": 2003.0, "lang": "de"})
        assert result.hits and all(batch[int(h.id[1:])].metadata["year"] == 2003 for h in result.hits)
        assert len(result.hits) == len([d for d in batch if d.metadata == {**d.metadata, "year": 2003, "lang": "de"}])
        assert index.search(queries[1], 5, filter={"flag": True}).hits == []  # 1 is not true
        assert index.search(queries[1], 5, filter={"flag": 2**70}).hits == []  # beyond SQLite integers
        assert index.search(queries[1], 5, filter={"tags": ["a", 1.0]}).hits
        none = index.search(queries[1], 5, filter={"nokey": "x"})
        assert none.hits == [] and none.exhausted
        # an unselective filter stays on the HNSW path and still returns only matches
        common = index.search(queries[2], 10, filter={"lang": "en"})
        assert common.strategy == "ann" and all(int(h.id[1:]) % 50 for h in common.hits)
        assert len(common.hits) == 10
    assert strategies == {"ann", "scan"}  # both ways of meeting a selective filter were exercised


# ---------------------------------------------------------------------------------------------
# Recall
# ---------------------------------------------------------------------------------------------


def test_hnsw_recall_vs_exact_on_clustered_vectors(tmp_path):
    n, dim, k = 20_000, 384, 10
    vectors = embedding_like(n, dim, 200, seed=7)
    queries = embedding_like(100, dim, 200, seed=8)
    with open_index(tmp_path / "ix", dim=dim) as index:  # default settings: expansion_search=128
        batch = [StoredDoc(f"d{i}", "") for i in range(n)]
        for start in range(0, n, 5000):
            index.upsert(batch[start:start + 5000], vectors[start:start + 5000])
        approx = index.search_batch(queries, k)
        exact = index.exact_search_batch(queries, k)
    recall = np.mean([len({h.id for h in a.hits} & {h.id for h in e.hits}) / k for a, e in zip(approx, exact)])
    print(f"recall@{k} HNSW vs exact, {n} x {dim} clustered, expansion_search=128: {recall:.4f}")
    assert recall >= 0.95


def test_filter_on_a_small_index_reads_every_document(tmp_path):
    vectors = unit_vectors(20)
    batch = [StoredDoc(f"d{i}", "t", "", {"odd": i % 4 == 1}) for i in range(20)]
    with open_index(tmp_path / "ix") as index:
        index.upsert(batch, vectors)
        result = index.search(vectors[0], 10, filter={"odd": True})
        assert result.strategy == "ann-all" and result.exhausted
        assert sorted(h.id for h in result.hits) == sorted(f"d{i}" for i in range(1, 20, 4))


def test_maybe_save_writes_a_snapshot_only_when_due_and_changed(tmp_path):
    with open_index(tmp_path / "ix") as index:
        index.upsert(docs(5), unit_vectors(5))
        assert not index.maybe_save(3600)  # not due yet
        assert index.maybe_save(0)  # due and changed
        assert not index.maybe_save(0)  # nothing new
        assert json.loads((tmp_path / "ix" / SNAPSHOT_META_FILE).read_text())["count"] == 5


def test_a_graph_no_larger_than_expansion_search_is_searched_exactly(tmp_path, monkeypatch):
    """While the index holds no more vectors than a search would visit, usearch compares against all of them
    (no node can be missed, however often documents were replaced); past that size, HNSW."""
    from usearch.index import Index

    calls = []
    real = Index.search

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("exact", False))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Index, "search", spy)
    base = unit_vectors(60, seed=4)
    with open_index(tmp_path / "ix", expansion_search=64) as index:
        index.upsert(docs(60), base)
        for round_ in range(5):  # replace every document again and again
            index.upsert([StoredDoc(f"d{i}", f"v{round_}") for i in range(60)], base)
        for i in range(60):
            assert index.search(base[i], 1).hits[0].id == f"d{i}"
        assert calls and all(calls)
        calls.clear()
        index.upsert(docs(20, start=60), unit_vectors(20, seed=5))  # 80 > 64
        index.search(base[0], 1)
        assert calls == [False]
