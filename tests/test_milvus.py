"""The Milvus backend (server/index/milvus.py) against milvus-lite: writes and their counts, filters (with their JSON
equality and injection attempts), lexical search, refusal of a collection made for another model, reopening,
`index build` into a collection, and health while Milvus goes away and comes back."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from twostage.server.index import milvus as milvus_mod  # noqa: E402
from twostage.server.config import Config  # noqa: E402
from twostage.server.errors import FailedPrecondition, InvalidArgument, Unavailable  # noqa: E402
from twostage.server.index import StoredDoc, metadata_matches  # noqa: E402
from twostage.server.index.milvus import (  # noqa: E402
    MilvusIndex,
    MilvusSettings,
    ModelFingerprint,
    filter_expression,
    milvus_string,
)

DIM = 8
MODEL = ModelFingerprint("tiny-bi-encoder", "a" * 64, DIM)

# Keys and values written to break out of a string literal or a JSON path.
HOSTILE_STRINGS = [
    'quote " inside',
    "single ' quote",
    "back\\slash",
    "trailing backslash \\",
    '" || true || "',
    '" or metadata["k"] != "',
    "] or 1==1",
    '"] or 1==1 or metadata["',
    "new\nline",
    "tab\tand\rreturn",
    "unicodé ✓ 数据",
    "control \x01 char",
    "",
]


def rng_vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def lite_uri(tmp_path_factory):
    """One embedded milvus-lite data directory for the module; each test uses its own collection. An index
    held open for the whole module keeps the in-process milvus-lite server running between tests."""
    uri = str(tmp_path_factory.mktemp("milvus") / "lite.db")
    with MilvusIndex.open(MilvusSettings(uri=uri, collection="t_anchor"), MODEL):
        yield uri


@pytest.fixture
def index(lite_uri, request):
    name = "t_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:60]
    ix = MilvusIndex.open(MilvusSettings(uri=lite_uri, collection=name, timeout_s=10.0), MODEL)
    yield ix
    ix.close()


# ---------------------------------------------------------------------------------------------
# Filter expressions (no Milvus needed)
# ---------------------------------------------------------------------------------------------


def _comparisons(node) -> list[tuple[tuple, object]]:
    """(JSON path, literal value) of every comparison in a parsed milvus-lite expression; fails on any node
    that is not AND / OR / `path == literal`."""
    from milvus_lite.search.filter import ast

    if isinstance(node, (ast.And, ast.Or)):
        return [c for operand in node.operands for c in _comparisons(operand)]
    assert isinstance(node, ast.CmpOp) and node.op == "==", node
    assert isinstance(node.left, ast.PathAccess) and node.left.base.name == "metadata", node
    assert isinstance(node.right, (ast.IntLit, ast.FloatLit, ast.StringLit, ast.BoolLit)), node
    return [(node.left.path, node.right.value)]


@pytest.mark.parametrize("value", HOSTILE_STRINGS)
def test_hostile_values_stay_inside_their_string_literal(value):
    from milvus_lite.search.filter import parse_expr

    expr = filter_expression({"k": value, "other": 1})
    if milvus_string(value) is None:  # not safely writable: left to the post-check
        assert "control" in value and expr == '(metadata["other"] == 1 or metadata["other"] == 1.0)'
        return
    assert _comparisons(parse_expr(expr)) == [(("k",), value), (("other",), 1), (("other",), 1.0)]


@pytest.mark.parametrize("key", HOSTILE_STRINGS + ["a/b", "ключ", "x~y", "sp ace"])
def test_hostile_keys_are_addressed_exactly_or_left_out(key):
    from milvus_lite.search.filter import parse_expr

    expr = filter_expression({key: "v", "safe": True})
    parsed = _comparisons(parse_expr(expr))
    if any(c in key for c in "\"'\\[]") or not key or any(ord(c) < 32 for c in key):
        assert parsed == [(("safe",), True)]  # the key is not pushed down at all
    else:
        assert parsed == [((key,), "v"), (("safe",), True)]


def test_number_literals_match_integers_and_floats_alike():
    from milvus_lite.search.filter import parse_expr

    assert _comparisons(parse_expr(filter_expression({"n": 3}))) == [(("n",), 3), (("n",), 3.0)]
    assert _comparisons(parse_expr(filter_expression({"n": 3.0}))) == [(("n",), 3), (("n",), 3.0)]
    assert _comparisons(parse_expr(filter_expression({"n": -2.5}))) == [(("n",), -2.5)]
    assert _comparisons(parse_expr(filter_expression({"n": 10**18}))) == [(("n",), 10**18), (("n",), 1e18)]
    assert filter_expression({"n": 2**70}) == ""  # beyond int64: post-check only
    assert filter_expression({"n": None}) == ""  # null: post-check only
    assert filter_expression({"b": False}) == '(metadata["b"] == false)'


# ---------------------------------------------------------------------------------------------
# Writes, reads, counts
# ---------------------------------------------------------------------------------------------


def test_upsert_reports_inserted_and_updated_and_delete_reports_not_found(index):
    docs = [StoredDoc(f"d{i}", f"text {i}", f"title {i}", {"i": i}) for i in range(6)]
    vectors = rng_vectors(6)
    assert index.upsert(docs, vectors) == (6, 0)
    assert index.size == 6
    changed = [StoredDoc("d0", "new text", "", {"i": 100}), StoredDoc("d9", "fresh", "", {})]
    assert index.upsert(changed, rng_vectors(2, seed=1)) == (1, 1)
    assert index.size == 7
    got = index.get(["d0", "d9", "missing"])
    assert set(got) == {"d0", "d9"}
    assert got["d0"] == StoredDoc("d0", "new text", "", {"i": 100})
    deleted, not_found = index.delete(["d1", "missing", "d2", "also-missing"])
    assert (deleted, not_found) == (2, ["missing", "also-missing"])
    assert index.size == 5
    assert index.delete(["d1"]) == (0, ["d1"])
    assert {h.id for h in index.search(vectors[1], 10).hits}.isdisjoint({"d1", "d2"})


def test_search_scores_are_similarities_best_first(index):
    vectors = rng_vectors(10, seed=3)
    index.upsert([StoredDoc(f"v{i}", f"doc {i}") for i in range(10)], vectors)
    found = index.search(vectors[4], 3)
    assert found.hits[0].id == "v4" and found.hits[0].score == pytest.approx(1.0, abs=1e-5)
    normed = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = normed @ normed[4]
    for hit in found.hits:
        assert hit.score == pytest.approx(float(expected[int(hit.id[1:])]), abs=1e-4)
    assert [h.rank for h in found.hits] == [0, 1, 2]
    assert [h.score for h in found.hits] == sorted((h.score for h in found.hits), reverse=True)


def test_l2sq_scores_are_negated_squared_distances(lite_uri):
    settings = MilvusSettings(uri=lite_uri, collection="t_l2", metric="l2sq")
    with MilvusIndex.open(settings, MODEL) as ix:
        vectors = rng_vectors(5, seed=4)
        ix.upsert([StoredDoc(f"p{i}", "x") for i in range(5)], vectors)
        hit = ix.search(vectors[0] + 0.5, 1).hits[0]
        assert hit.id == "p0" and hit.score == pytest.approx(-DIM * 0.25, rel=1e-4)


def test_bad_documents_are_refused_naming_the_field(index):
    with pytest.raises(InvalidArgument, match=r"documents\[0\]\.embedding.*all zeros"):
        index.upsert([StoredDoc("z", "t")], np.zeros((1, DIM), np.float32))
    with pytest.raises(InvalidArgument, match=r"documents\[1\]\.text.*65535"):
        index.upsert([StoredDoc("a", "t"), StoredDoc("b", "x" * 70_000)], rng_vectors(2))
    with pytest.raises(InvalidArgument, match=r"documents\[0\]\.id.*control character"):
        index.upsert([StoredDoc("bad\x02id", "t")], rng_vectors(1))
    with pytest.raises(InvalidArgument, match="dimension"):
        index.upsert([StoredDoc("a", "t")], np.ones((1, DIM + 1), np.float32))
    assert index.size == 0
    assert index.get(["bad\x02id"]) == {}  # an id no collection can hold is simply not found


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------

FILTER_DOCS = [
    ("int3", {"n": 3, "kind": "a"}),
    ("float3", {"n": 3.0, "kind": "a"}),
    ("float3.5", {"n": 3.5, "kind": "b"}),
    ("true", {"flag": True, "n": 1}),
    ("false", {"flag": False, "n": 0}),
    ("one", {"flag": 1}),
    ("zero", {"flag": 0}),
    ("null", {"maybe": None}),
    ("str3", {"n": "3"}),
    ("nested", {"n": [3], "kind": {"x": 1}}),
    *[(f"hostile{i}", {"k": s, 'we"ird': s, "br[0]": s}) for i, s in enumerate(HOSTILE_STRINGS)
      if milvus_string(s) is not None],
]


@pytest.fixture(scope="module")
def filtered(lite_uri):
    """A collection of FILTER_DOCS (read-only for the tests using it)."""
    with MilvusIndex.open(MilvusSettings(uri=lite_uri, collection="t_filtered"), MODEL) as index:
        docs = [StoredDoc(doc_id, f"text of {doc_id}", "", meta) for doc_id, meta in FILTER_DOCS]
        index.upsert(docs, rng_vectors(len(docs), seed=7))
        yield index, {d.id: d.metadata for d in docs}


FILTERS = [
    {"n": 3}, {"n": 3.0}, {"n": 3.5}, {"n": "3"}, {"kind": "a"}, {"n": 3, "kind": "a"},
    {"flag": True}, {"flag": False}, {"flag": 1}, {"flag": 0}, {"maybe": None}, {"absent": None},
    {"n": 1}, {"n": 0}, {"n": 2**70},
    *[{"k": s} for s in HOSTILE_STRINGS], *[{'we"ird': s} for s in HOSTILE_STRINGS[:4]],
    {"br[0]": "] or 1==1"},
]


@pytest.mark.parametrize("flt", FILTERS, ids=lambda f: json.dumps(f, ensure_ascii=True)[:40])
def test_filtered_search_returns_exactly_the_matching_documents(filtered, flt):
    index, metadata = filtered
    expected = {doc_id for doc_id, meta in metadata.items() if metadata_matches(meta, flt)}
    found = index.search(rng_vectors(1, seed=99)[0], len(metadata), filter=flt)
    assert {h.id for h in found.hits} == expected
    assert found.exhausted == (len(expected) < len(metadata))
    few = index.search(rng_vectors(1, seed=98)[0], 1, filter=flt)
    assert len(few.hits) == min(1, len(expected))


def test_json_equality_follows_the_embedded_backend(filtered):
    index, _ = filtered
    q = rng_vectors(1, seed=5)[0]

    def ids(flt):
        return {h.id for h in index.search(q, 50, filter=flt).hits}

    assert ids({"n": 3}) == ids({"n": 3.0}) == {"int3", "float3"}  # numbers by value
    assert ids({"flag": True}) == {"true"} and ids({"flag": 1}) == {"one"}  # booleans only equal booleans
    assert ids({"flag": False}) == {"false"} and ids({"flag": 0}) == {"zero"}
    assert ids({"n": 1}) == {"true"}  # the int 1 of "true", not any boolean
    assert ids({"maybe": None}) == {"null"}  # null matches a present null only
    assert ids({"n": "3"}) == {"str3"}


def test_injection_attempts_do_not_widen_the_milvus_expression(filtered):
    """The raw expression (before the post-check) selects only documents that hold the literal value."""
    index, metadata = filtered
    for hostile in HOSTILE_STRINGS:
        expr = filter_expression({"k": hostile})
        if not expr:
            continue
        rows = index.client.query(index.collection, filter=expr, output_fields=["id", "metadata"],
                                  consistency_level="Strong")
        assert {r["id"] for r in rows} == {d for d, m in metadata.items() if m.get("k") == hostile}, hostile


def test_selective_filter_past_the_topk_cap_scans_exactly(filtered, monkeypatch):
    index, metadata = filtered
    monkeypatch.setattr(milvus_mod, "MAX_TOPK", 4)  # force the scan after one capped round
    flt = {'we"ird': "back\\slash"}  # a key that is never pushed down: Milvus sees no condition
    found = index.search(rng_vectors(1, seed=11)[0], 3, filter=flt)
    assert found.strategy == "scan"
    assert {h.id for h in found.hits} == {d for d, m in metadata.items() if metadata_matches(m, flt)}
    assert found.exhausted


# ---------------------------------------------------------------------------------------------
# Lexical search
# ---------------------------------------------------------------------------------------------


def test_lexical_search_ranks_by_bm25_over_title_and_text(index):
    docs = [StoredDoc("kite", "It flies on a string in strong wind.", "Zephyrkite", {"topic": "toys"}),
            StoredDoc("boat", "A zephyrkite sail catches wind too, zephyrkite zephyrkite.", "Sailing",
                      {"topic": "sea"}),
            StoredDoc("bread", "Flour, water and salt make a simple loaf.", "Baking", {"topic": "food"})]
    index.upsert(docs, rng_vectors(3, seed=12))
    found = index.lexical_search("zephyrkite", 10)
    assert [h.id for h in found.hits] == ["boat", "kite"]  # three occurrences beat one in the title
    assert all(h.score > 0 for h in found.hits) and found.hits[0].score > found.hits[1].score
    assert [h.id for h in index.lexical_search("zephyrkite", 10, filter={"topic": "toys"}).hits] == ["kite"]
    assert index.lexical_search("   ", 10).hits == []
    assert index.lexical_search("quasar", 10).hits == []


# ---------------------------------------------------------------------------------------------
# Collections: fingerprint, reopen, reload
# ---------------------------------------------------------------------------------------------


def test_collection_of_another_model_is_refused_naming_both(lite_uri):
    settings = MilvusSettings(uri=lite_uri, collection="t_fingerprint")
    MilvusIndex.open(settings, MODEL).close()
    for other in (ModelFingerprint("tiny-bi-encoder", "b" * 64, DIM), ModelFingerprint("bigger", "a" * 64, DIM * 2)):
        with pytest.raises(FailedPrecondition) as err:
            MilvusIndex.open(settings, other)
        assert str(MODEL) in str(err.value) and str(other) in str(err.value) and "t_fingerprint" in str(err.value)
    with pytest.raises(FailedPrecondition, match="metric 'cos'.*'ip'"):
        MilvusIndex.open(MilvusSettings(uri=lite_uri, collection="t_fingerprint", metric="ip"), MODEL)


def test_collection_not_made_by_twostage_is_refused(lite_uri):
    with MilvusIndex.open(MilvusSettings(uri=lite_uri, collection="t_probe"), MODEL) as probe:
        probe.client.create_collection("t_foreign", dimension=DIM)
    with pytest.raises(FailedPrecondition, match="not created by twostage"):
        MilvusIndex.open(MilvusSettings(uri=lite_uri, collection="t_foreign"), MODEL)


def test_reopen_keeps_documents_and_a_released_collection_is_loaded_again(lite_uri):
    settings = MilvusSettings(uri=lite_uri, collection="t_reopen")
    vectors = rng_vectors(4, seed=13)
    with MilvusIndex.open(settings, MODEL) as ix:
        ix.upsert([StoredDoc(f"r{i}", f"text {i}", "", {"i": i}) for i in range(4)], vectors)
    with MilvusIndex.open(settings, MODEL) as ix:
        assert ix.size == 4
        ix.client.release_collection("t_reopen")  # what a Milvus restart leaves behind
        assert ix.search(vectors[2], 1).hits[0].id == "r2"
        ix.client.release_collection("t_reopen")
        ix.check()
        assert ix.client.get_load_state("t_reopen")["state"].name == "Loaded"


def test_alias_switched_to_another_models_collection_is_refused_while_serving(lite_uri):
    other = ModelFingerprint("other", "d" * 64, DIM)
    with MilvusIndex.open(MilvusSettings(uri=lite_uri, collection="t_target_a"), MODEL) as a, \
            MilvusIndex.open(MilvusSettings(uri=lite_uri, collection="t_target_b"), other):
        a.upsert([StoredDoc("x", "text")], rng_vectors(1))
        a.client.create_alias("t_target_a", "t_switch")
        with MilvusIndex.open(MilvusSettings(uri=lite_uri, collection="t_switch"), MODEL) as served:
            assert served.describe()["resolved_collection"] == "t_target_a"
            assert served.search(rng_vectors(1)[0], 1).hits[0].id == "x"
            a.client.alter_alias("t_target_b", "t_switch")
            with pytest.raises(FailedPrecondition, match="holds vectors of the bi-encoder other"):
                served.check()
            with pytest.raises(FailedPrecondition, match="holds vectors of the bi-encoder other"):
                served.search(rng_vectors(1)[0], 1)
            a.client.alter_alias("t_target_a", "t_switch")
            served.check()
            assert served.search(rng_vectors(1)[0], 1).hits[0].id == "x"


def test_unreachable_milvus_is_unavailable():
    port = _free_port()
    ix = MilvusIndex(MilvusSettings(uri=f"http://127.0.0.1:{port}", collection="x", timeout_s=1.0), MODEL)
    started = time.monotonic()
    with pytest.raises(Unavailable, match=f"127.0.0.1:{port}"):
        ix.connect()
    assert time.monotonic() - started < 15
    with pytest.raises(Unavailable):
        ix.search(rng_vectors(1)[0], 3)


# ---------------------------------------------------------------------------------------------
# Configuration and CLI
# ---------------------------------------------------------------------------------------------


def test_config_validates_uri_and_collection_and_hides_the_token(tmp_path):
    env = {"TWOSTAGE_MILVUS_TOKEN": "root:Secret-Token"}
    ok = Config.from_sources(env={**env, "TWOSTAGE_MILVUS_URI": "https://milvus.example:19530"})
    assert ok.milvus_token == "root:Secret-Token"
    assert "Secret-Token" not in json.dumps(ok.as_dict())
    Config.from_sources(env={"TWOSTAGE_MILVUS_URI": str(tmp_path / "x.db")})
    for bad in ("milvus.example:19530", "ftp://h:1", "http://h", "http://h:port", str(tmp_path / "x.sqlite")):
        with pytest.raises(ValueError, match="milvus_uri"):
            Config.from_sources(env={"TWOSTAGE_MILVUS_URI": bad})
    with pytest.raises(ValueError, match="milvus_collection"):
        Config.from_sources(env={"TWOSTAGE_MILVUS_COLLECTION": "bad-name"})
    with pytest.raises(ValueError, match="index.*milvus_uri.*not both"):
        Config.from_sources(env={"TWOSTAGE_INDEX": "./idx", "TWOSTAGE_MILVUS_URI": "http://h:1"})


def test_cli_takes_milvus_uri_and_collection_but_no_token_flag():
    import argparse

    from twostage.server.config import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--milvus-uri", "http://h:19530", "--collection", "docs"])
    cfg = Config.from_sources(args, env={})
    assert (cfg.milvus_uri, cfg.milvus_collection) == ("http://h:19530", "docs")
    with pytest.raises(SystemExit):
        parser.parse_args(["--milvus-token", "x"])


def test_serving_install_needs_no_pymilvus(tmp_path):
    """pymilvus is imported only when a Milvus backend connects; without it that says what to install."""
    code = ("import sys; sys.modules['pymilvus'] = None; sys.modules['milvus_lite'] = None\n"
            "import twostage.server.app, twostage.server.cli\n"
            "from twostage.server.index.milvus import MilvusIndex, MilvusSettings, ModelFingerprint\n"
            "from twostage.server.errors import FailedPrecondition\n"
            "try:\n"
            "    MilvusIndex.open(MilvusSettings(uri='http://127.0.0.1:1'), ModelFingerprint('m', 'a', 2))\n"
            "except FailedPrecondition as exc:\n"
            "    print(exc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pip install 'twostage[milvus]'" in r.stdout


def test_index_build_into_milvus_switches_the_alias(tiny_models, tmp_path):
    """`twostage index build --milvus-uri` builds a new collection and points the name at it; a second
    build replaces the documents at once."""
    uri = str(tmp_path / "build.db")
    corpus = tmp_path / "corpus.jsonl"

    def build(rows) -> subprocess.CompletedProcess:
        corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return subprocess.run([sys.executable, "-m", "twostage.client.cli", "index", "build", "--corpus", str(corpus),
                               "--models", str(tiny_models), "--milvus-uri", uri, "--collection", "docs",
                               "--no-progress", "--log-format", "text"],
                              capture_output=True, text=True, timeout=300)

    first = [{"_id": f"a{i}", "title": "T", "text": f"first corpus document {i}", "metadata": {"i": i}}
             for i in range(5)]
    r = build(first)
    assert r.returncode == 0, r.stderr
    from twostage.model.model_set import open_embedder

    fingerprint = ModelFingerprint.of(open_embedder(tiny_models))
    with MilvusIndex.open(MilvusSettings(uri=uri, collection="docs"), fingerprint) as ix:
        assert ix.size == 5
        assert ix.client.describe_alias("docs")["collection_name"].startswith("docs__build_")
        assert ix.get(["a3"])["a3"].metadata == {"i": 3}
    r = build([{"_id": "b0", "text": "second corpus"}])
    assert r.returncode == 0, r.stderr
    with MilvusIndex.open(MilvusSettings(uri=uri, collection="docs"), fingerprint) as ix:
        assert ix.size == 1 and set(ix.get(["a0", "b0"])) == {"b0"}
        assert len(ix.client.list_collections()) == 1  # the previous collection was dropped


# ---------------------------------------------------------------------------------------------
# The server on a milvus-lite server process: health follows Milvus
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiteServer:
    """`milvus-lite server` (as `python -m milvus_lite server`) in a subprocess on a loopback port."""

    def __init__(self, data_dir: Path, port: int):
        self.data_dir, self.port = data_dir, port
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir),
                   "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert self.proc.poll() is None, "milvus-lite server exited"
            time.sleep(0.1)
        raise TimeoutError("milvus-lite server did not start listening")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


def test_server_health_follows_milvus_and_recovers(tiny_models, tmp_path):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from server_harness import ServerThread, make_config
    from twostage.v1 import twostage_pb2 as pb

    lite = LiteServer(tmp_path / "milvus-data", _free_port())
    srv = ServerThread(make_config(tiny_models, tmp_path / "unused", milvus_uri=lite.uri, milvus_collection="live",
                                   milvus_timeout_s=3.0), wait=False)
    try:
        health = health_pb2_grpc.HealthStub(srv.channel())
        stub = srv.stub()

        def status(service: str = "twostage.v1.TwoStage") -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        time.sleep(1.0)  # the server is up, Milvus is not: not serving, and requests are UNAVAILABLE
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(pb.SearchRequest(query="kite"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        lite.start()
        srv.wait_loaded()
        assert status() == health_pb2.HealthCheckResponse.SERVING
        info = stub.Info(pb.InfoRequest(), timeout=10)
        assert (info.index.backend, info.index.collection) == ("milvus", "live")
        docs = [pb.Document(id="kite", title="Kites", text="A kite flies on the wind."),
                pb.Document(id="bread", title="Bread", text="Bread is baked from flour and water.")]
        assert stub.Upsert(pb.UpsertRequest(documents=docs), timeout=30).inserted == 2
        found = stub.Search(pb.SearchRequest(query="kite wind", top_k=2), timeout=30)
        assert {h.id for h in found.hits} == {"kite", "bread"}

        lite.kill()
        _wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30)
        # readiness follows Milvus; liveness (the process, service "") stays up: a restart would not help
        assert status("") == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(pb.SearchRequest(query="kite"), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        rerank = stub.Rerank(pb.RerankRequest(query="kite", texts=["a kite", "bread"]), timeout=30)
        assert len(rerank.results) == 2  # what does not need Milvus keeps working

        lite.start()  # same data directory
        _wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, timeout=60)
        found = stub.Search(pb.SearchRequest(query="kite wind", top_k=2, skip_rerank=True), timeout=30)
        assert {h.id for h in found.hits} == {"kite", "bread"}
        assert stub.Info(pb.InfoRequest(), timeout=10).index.size == 2
    finally:
        srv.stop()
        lite.kill()


def test_server_refuses_a_collection_of_another_model(tiny_models, tmp_path):
    import asyncio

    from server_harness import make_config
    from twostage.server.app import serve_in_background

    uri = str(tmp_path / "other.db")
    MilvusIndex.open(MilvusSettings(uri=uri, collection="docs"), ModelFingerprint("other", "c" * 64, 32)).close()
    config = make_config(tiny_models, tmp_path / "unused", milvus_uri=uri, milvus_collection="docs")
    with pytest.raises(FailedPrecondition, match="other.*tiny|holds vectors of the bi-encoder other"):
        asyncio.run(serve_in_background(config))
