"""`twostage evaluate` (client/evaluate.py) and the BEIR reader (client/beir.py), on a BEIR folder written here and
the tiny models, in dense mode (the mode every backend answers): the table and JSON, figures equal to a direct
computation from Search results, tuning that never sees a reported query, a written config the server loads, and
the tuning arithmetic equal to the server's own ranking."""
from __future__ import annotations

import io
import json
import math
import tomllib
from pathlib import Path

import pytest

from twostage.client import evaluate as ev
from twostage.client.beir import DatasetError, load_split, read_qrels
from twostage.client.cli import main
from twostage.client.client import Client
from twostage.client.ir_metrics import ndcg_at_k, recall_at_k
from twostage.client.progress import ProgressBar
from twostage.client.types import Defaults
from twostage.server import fusion
from twostage.server.config import Config

TOPICS = {
    "coffee": "coffee is made from roasted seeds and hot water",
    "tea": "tea leaf in hot water with milk and sugar",
    "bike": "a bike on the road to work every day",
    "train": "the train to the city runs at night",
    "volcano": "a volcano is a mountain of hot rock and ash",
    "bees": "the bee visits each flower for sugar",
    "python": "python code for a search server with an index",
    "git": "git branch and commit for your code",
    "piano": "piano and guitar music for a song",
    "rain": "rain and sun for the plant and the tree",
}
QUERIES = {"coffee": "how is coffee made", "tea": "tea with milk", "bike": "bike to work", "train": "night train",
           "volcano": "why does a volcano have hot rock", "bees": "what does the bee do in the flower",
           "python": "python search server code", "git": "git commit branch", "piano": "piano song",
           "rain": "rain for the tree"}
TRAIN = {"coffee": "roasted coffee seeds", "tea": "hot tea leaf", "bike": "road bike", "train": "city train",
         "volcano": "mountain of ash", "bees": "bee and sugar", "python": "index for python", "git": "your code branch"}
FILLERS = ["the day is long", "a book on the table", "my phone and camera", "a game of chess"]
DENSE = ["--modes", "dense", "--rerank-mode", "dense"]


def write_beir(folder: Path) -> Path:
    """41 documents (4 per topic and a stray one); test: 10 judged queries graded 3/2/1/0, one unjudged, one
    judged irrelevant only; train: 8 other queries, binary, in queries_train.jsonl (as the shared SciFact keeps
    them)."""
    (folder / "qrels").mkdir(parents=True)
    docs, test, train = [], [], []
    for t, (topic, text) in enumerate(TOPICS.items()):
        for i, filler in enumerate(FILLERS):
            doc_id = f"{topic}-{i}"
            docs.append({"_id": doc_id, "title": topic if i == 0 else "", "text": f"{text} {filler}"})
            test.append((f"q{t}", doc_id, 3 - i))
            if i < 2 and topic in TRAIN:
                train.append((f"t{t}", doc_id, 1))
    docs.append({"_id": "stray", "text": "an empty room with a door and a window"})
    test.append(("zero", "stray", 0))
    queries = [{"_id": f"q{t}", "text": QUERIES[topic]} for t, topic in enumerate(TOPICS)]
    queries += [{"_id": "unjudged", "text": "a query nobody judged"}, {"_id": "zero", "text": "only irrelevant"}]
    train_queries = [{"_id": f"t{t}", "text": TRAIN[topic]} for t, topic in enumerate(TOPICS) if topic in TRAIN]
    header = "query-id\tcorpus-id\tscore\n"
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "queries_train.jsonl").write_text("".join(json.dumps(q) + "\n" for q in train_queries))
    (folder / "qrels" / "test.tsv").write_text(header + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in test))
    (folder / "qrels" / "train.tsv").write_text(header + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in train))
    return folder


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    return write_beir(tmp_path_factory.mktemp("beir") / "tiny")


@pytest.fixture(scope="module")
def target(tiny_models, beir):
    """The --models path: the corpus indexed by the index build code and served in this process."""
    with ev.embedded_server(tiny_models, beir / "corpus.jsonl", None, False, io.StringIO()) as address:
        yield address


@pytest.fixture
def client(target):
    with Client(target) as c:
        yield c


def dense_options(**changes) -> ev.Options:
    base = ev.Options(modes=("dense",), rerank_mode="dense", budgets=(0,), warmup=1, progress=False,
                      tune_candidates=(5, 20, 100))
    for name, value in changes.items():
        setattr(base, name, value)
    return base


# ------------------------------------------------------------------------------------------ BEIR reader
def test_split_keeps_judged_queries_with_their_graded_judgments(beir):
    test = load_split(beir, "test")
    assert list(test.queries) == [f"q{t}" for t in range(10)]  # not "unjudged", not "zero" (grade 0 only)
    assert test.qrels["q0"] == {"coffee-0": 3, "coffee-1": 2, "coffee-2": 1, "coffee-3": 0}
    train = load_split(beir, "train")
    assert list(train.queries) == [f"t{t}" for t in range(8)]  # from queries_train.jsonl
    assert train.queries["t0"] == TRAIN["coffee"]
    assert test.corpus == beir / "corpus.jsonl"


def test_reader_errors_name_the_file_and_line(tmp_path, beir):
    with pytest.raises(DatasetError, match=r"split 'dev'.*splits here: test, train"):
        load_split(beir, "dev")
    bad = tmp_path / "bad.tsv"
    bad.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\tlots\n")
    with pytest.raises(DatasetError, match=r"bad.tsv:3: grade 'lots' is not a number"):
        read_qrels(bad)
    bad.write_text("q1 d1\n")
    with pytest.raises(DatasetError, match=r"bad.tsv:1: expected 3 columns"):
        read_qrels(bad)
    trec = tmp_path / "trec.txt"
    trec.write_text("q1 0 d1 2\nq1 0 d2 0\n")  # TREC's four columns
    assert read_qrels(trec) == {"q1": {"d1": 2, "d2": 0}}
    folder = write_beir(tmp_path / "missing")
    (folder / "queries.jsonl").write_text('{"_id": "q0", "text": "only one"}\n')
    with pytest.raises(DatasetError, match=r"9 judged queries have no text"):
        load_split(folder, "test")


def test_progress_bar_counts_in_the_given_unit():
    bar = ProgressBar(40, label="evaluating", stream=io.StringIO(), unit="searches")
    bar.advance(10)
    assert bar.line().startswith("evaluating 10/40 searches  25.0%") and "searches/s" in bar.line()


# ------------------------------------------------------------------------------------------ the report
def test_cli_prints_the_table_and_writes_the_json(tiny_models, beir, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["evaluate", str(beir), "--models", str(tiny_models), *DENSE, "--budgets", "0,50", "--candidates",
                 "20", "--json", str(out), "--no-progress", "--warmup", "1"])
    assert code == 0
    table = capsys.readouterr().out
    assert "nDCG@10" in table and "R@100" in table and "client p50" in table and "server p99" in table
    report = json.loads(out.read_text())
    assert report["dataset"]["queries"] == 10 and report["server"]["documents"] == 41
    assert report["server"]["embedded"] is True and report["tune"] is None
    labels = [r["label"] for r in report["rows"]]
    assert labels == ["dense", "dense + rerank (adaptive, 20 cand., no budget)",
                      "dense + rerank (adaptive, 20 cand., budget 50 ms)"]
    for row in report["rows"]:
        assert row["label"] in table
        assert 0.0 <= row["ndcg@10"] <= 1.0 and row["queries"] == 10
        for side in ("client", "server"):
            lat = row["latency_ms"][side]
            assert 0.0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    stage1, reranked = report["rows"][0], report["rows"][1]
    assert stage1["recall@100"] == pytest.approx(1.0)  # 41 documents, all within the first 100
    assert stage1["reranked_mean"] == 0 and reranked["reranked_mean"] == 20
    assert reranked["recall@100"] is None and reranked["top_k"] == 20  # 20 candidates: recall@100 not measured


def test_json_to_stdout_leaves_the_table_on_stderr(tiny_models, beir, capsys):
    assert main(["evaluate", str(beir), "--models", str(tiny_models), *DENSE, "--budgets", "0", "--json", "-",
                 "--no-progress", "--max-queries", "3"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["dataset"]["queries"] == 3 and "nDCG@10" in captured.err


def test_row_figures_equal_a_direct_computation_from_search(client, beir):
    split = load_split(beir, "test")
    report = ev.run_evaluation(client, split, dense_options(budgets=(0,), candidates=30), io.StringIO())
    for row in report["rows"]:
        rankings = {}
        for qid, text in split.queries.items():
            hits = client.search(text, top_k=row["top_k"], candidates=row["candidates"], skip_rerank=not row["rerank"],
                                 retrieval_mode="dense").hits
            rankings[qid] = [h.id for h in hits]
        ndcg = sum(ndcg_at_k(rankings[q], split.qrels[q], 10) for q in rankings) / len(rankings)
        assert row["ndcg@10"] == pytest.approx(ndcg, abs=1e-12)
        if row["recall@100"] is not None:
            recall = sum(recall_at_k(rankings[q], split.qrels[q], 100) for q in rankings) / len(rankings)
            assert row["recall@100"] == pytest.approx(recall, abs=1e-12)


def test_bad_arguments_are_refused_with_the_flag_named(tiny_models, beir, capsys):
    assert main(["evaluate", str(beir), "--models", str(tiny_models), "--write-config", "x.toml"]) == 1
    assert "--write-config needs --tune" in capsys.readouterr().err
    assert main(["evaluate", str(beir), "--tune", "--tune-split", "test"]) == 1
    assert "tuning must use other queries" in capsys.readouterr().err
    assert main(["evaluate", str(beir), "--split", "dev"]) == 1
    assert "splits here: test, train" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(beir), "--modes", "dense,sparse"])
    assert "sparse: choose from dense, lexical, hybrid" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ tuning
def test_random_tuning_half_is_disjoint_from_the_reported_queries(beir):
    split = load_split(beir, "test")
    report, tune, how = ev.split_queries(split, dense_options(tune=True, seed=3))
    assert not set(report) & set(tune) and set(report) | set(tune) == set(split.queries)
    assert len(tune) == 5 and "seed 3" in how
    assert ev.split_queries(split, dense_options(tune=True, seed=3))[1] == tune  # seeded: reproducible
    assert ev.split_queries(split, dense_options(tune=True, seed=4))[1] != tune
    report, tune, how = ev.split_queries(split, dense_options(tune=True, tune_split=load_split(beir, "train")))
    assert report == split.queries and set(tune) == {f"t{t}" for t in range(8)} and how == "split 'train'"


def test_tuning_only_sends_tuning_queries_and_reports_the_others(client, beir):
    class Recording:
        def __init__(self, inner: Client):
            self.inner, self.queries = inner, []

        def search(self, query, **options):
            self.queries.append(query)
            return self.inner.search(query, **options)

        def rerank(self, query, texts=None, **options):
            self.queries.append(query)
            return self.inner.rerank(query, texts, **options)

    split = load_split(beir, "test")
    options = dense_options(tune=True)
    reported, tuning, _ = ev.split_queries(split, options)
    spy = Recording(client)
    result = ev.tune(spy, tuning, split.qrels, options, client.info().defaults, 1000, io.StringIO())
    assert spy.queries and set(spy.queries) <= set(tuning.values())
    assert not set(spy.queries) & set(reported.values())
    assert result["query_ids"] == list(tuning)
    report = ev.run_evaluation(client, split, options, io.StringIO())
    assert not set(report["tune"]["query_ids"]) & set(report["dataset"]["query_ids"])
    assert report["dataset"]["query_ids"] == list(reported)


def test_tune_writes_a_config_the_server_loads(tiny_models, beir, tmp_path, capsys):
    config_path, out = tmp_path / "tuned.toml", tmp_path / "tuned.json"
    assert main(["evaluate", str(beir), "--models", str(tiny_models), *DENSE, "--budgets", "0", "--tune",
                 "--tune-split", "train", "--tune-candidates", "5,20", "--tune-rerank-weights", "0.5,1,adaptive",
                 "--write-config", str(config_path), "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    tuned = report["tune"]
    chosen = tuned["chosen"]
    assert set(chosen) == {"retrieval_mode", "fusion", "fusion_weight", "rerank_weight", "default_candidates"}
    assert chosen["retrieval_mode"] == "dense" and chosen["default_candidates"] in (5, 20)
    assert chosen["rerank_weight"] in (0.5, 1.0, -1.0)
    assert len(tuned["grid"]) == 2 * 3 and tuned[f"ndcg@10"] == max(g["ndcg@10"] for g in tuned["grid"])
    rows = {r["label"]: r for r in report["rows"] if r["tuned"]}
    held_out = next(r for r in rows.values() if r["rerank"])
    assert held_out["candidates"] == chosen["default_candidates"] and tuned["held_out_ndcg@10"] == held_out["ndcg@10"]
    assert "tuned on 8 other queries (split 'train')" in capsys.readouterr().out

    config = Config.from_sources(config_file=str(config_path), env={})
    for key, value in chosen.items():
        assert getattr(config, key) == value
    assert tomllib.loads(config_path.read_text()) == chosen


def test_best_choice_prefers_fewer_candidates_on_a_tie():
    s = ev.Stage1("dense")
    scores = [(ev.Choice(s, 20, 1.0), 0.5), (ev.Choice(s, 20, 0.5), 0.6), (ev.Choice(s, 50, 0.5), 0.6),
              (ev.Choice(s, 100, 0.5), 0.61)]
    assert ev.best_choice(scores[:3]) == (ev.Choice(s, 20, 0.5), 0.6)
    assert ev.best_choice(scores) == (ev.Choice(s, 100, 0.5), 0.61)


def test_the_servers_defaults_are_found_in_the_grid_despite_32_bit_floats():
    defaults = Defaults(candidates=30, retrieval_mode="hybrid", fusion="convex", fusion_weight=ev.wire(0.7),
                        rerank_weight=-1.0)
    assert ev.wire(0.7) != 0.7
    assert ev.defaults_choice(defaults) == ev.Choice(ev.Stage1("hybrid", "convex", 0.7), 30, ev.ADAPTIVE)
    rrf = Defaults(candidates=100, retrieval_mode="hybrid", fusion="rrf", fusion_weight=0.5, rerank_weight=ev.wire(0.6))
    assert ev.defaults_choice(rrf) == ev.Choice(ev.Stage1("hybrid", "rrf"), 100, 0.6)
    assert ev.defaults_choice(rrf).stage1 in ev.stage1_grid(ev.Options())


def test_config_keeps_fusion_settings_a_dense_choice_does_not_use():
    defaults = Defaults(candidates=100, retrieval_mode="hybrid", fusion="rrf", fusion_weight=0.5, rerank_weight=-1)
    assert ev.Choice(ev.Stage1("dense"), 30, -1.0).config(defaults) == {
        "retrieval_mode": "dense", "fusion": "rrf", "fusion_weight": 0.5, "rerank_weight": -1.0,
        "default_candidates": 30}
    hybrid = ev.Choice(ev.Stage1("hybrid", "convex", 0.7), 20, 0.6).config(defaults)
    assert hybrid["fusion"] == "convex" and hybrid["fusion_weight"] == 0.7


def test_hybrid_candidates_fuse_lists_cut_at_the_servers_depth():
    """The server fuses both lists max(candidates, hybrid_depth) deep: what lies below that depth in a cached
    list must not move the min-max normalization."""
    dense = [fusion.Ranked(f"d{i}", 1.0 - i / 10, i) for i in range(6)]
    lexical = [fusion.Ranked(f"l{i}", 10.0 - i, i) for i in range(6)]
    lists = ev.QueryLists(dense=dense, lexical=lexical)
    got = ev.stage1_candidates(lists, ev.Stage1("hybrid", "convex", 0.5), 2, hybrid_depth=3)
    assert got == fusion.convex(dense[:3], lexical[:3], ev.wire(0.5))[:2]
    assert ev.stage1_candidates(lists, ev.Stage1("dense"), 2) == fusion.single(dense[:2], "dense")


def test_reranked_order_is_the_engines(client):
    """Weight 1 orders by the cross-encoder alone; weight 0 keeps stage-1 order; ties go to the stage-1 position."""
    cands = [fusion.Fused("a", 0.9), fusion.Fused("b", 0.5), fusion.Fused("c", 0.1)]
    ce = {"a": 0.2, "b": 0.9, "c": 0.2}
    assert ev.reranked_order(cands, ce, 1.0) == ["b", "a", "c"]
    assert ev.reranked_order(cands, ce, 0.0) == ["a", "b", "c"]
    assert ev.reranked_order(cands, ce, 0.5) == ["b", "a", "c"]  # b: 0.5*1 + 0.5*0.5 = 0.75 > a: 0.5
    assert ev.reranked_order([], ce, -1.0) == []


def local_vs_search(client, split, mode: str, fusion_method: str = "", fusion_weight: float | None = None) -> int:
    """Compare the tuning arithmetic with Search for every query and a few settings; returns the comparisons."""
    options = dense_options(modes=(mode,) if mode != "hybrid" else ("hybrid",), tune_candidates=(5, 20),
                            tune_fusions=(fusion_method,) if fusion_method else ("convex",),
                            tune_fusion_weights=(fusion_weight or 0.5,))
    lists = ev.fetch_lists(client, split.queries, options, ProgressBar(0, enabled=False), 1000)
    stage1 = ev.Stage1(mode, fusion_method, fusion_weight)
    compared = 0
    for qid, text in split.queries.items():
        for n in (5, 20):
            cands = ev.stage1_candidates(lists[qid], stage1, n)
            for weight in (0.0, 0.3, 0.7, 1.0, ev.ADAPTIVE):
                local = ev.reranked_order(cands, lists[qid].ce, weight)
                found = client.search(text, top_k=n, candidates=n, retrieval_mode=mode, fusion=fusion_method,
                                      fusion_weight=fusion_weight, ids_only=True,
                                      rerank_weight=None if weight < 0 else weight)
                assert_same_ranking(found.hits, local, (qid, n, weight))
                compared += 1
    return compared


def assert_same_ranking(hits, local: list[str], where: object, tie: float = 1e-5) -> None:
    """`local` is Search's order, except that hits whose server scores lie within `tie` of each other (where
    32-bit scores on the wire can swap exact ties) may come in any order among themselves."""
    server = [h.id for h in hits]
    assert sorted(server) == sorted(local), where
    groups, start = [], 0
    for i in range(1, len(hits) + 1):
        if i == len(hits) or hits[i - 1].score - hits[i].score > tie:
            groups.append((start, i))
            start = i
    for lo, hi in groups:
        assert set(server[lo:hi]) == set(local[lo:hi]), (where, server, local)


def test_local_ranking_equals_the_servers_search_in_dense_mode(client, beir):
    assert client.info().defaults.rerank_weight < 0  # so that leaving it unset asks for the adaptive rule
    assert local_vs_search(client, load_split(beir, "test"), "dense") == 10 * 2 * 5


def test_local_ranking_equals_the_servers_search_in_hybrid_mode(client, beir):
    from twostage.server.index.embedded import DocumentIndex

    if not hasattr(DocumentIndex, "lexical_search"):
        pytest.skip("the embedded backend has no lexical search in this build")
    split = load_split(beir, "test")
    assert local_vs_search(client, split, "hybrid", "convex", 0.7) == 100
    assert local_vs_search(client, split, "hybrid", "rrf") == 100


class ListServer:
    """A stand-in server for the hybrid tuning path (no lexical index needed): fixed dense and lexical lists per
    query and a cross-encoder that scores every document alike, so that stage 1 alone decides. The judged
    document is third in the dense list and second in the lexical one, behind a document the dense list puts
    last: only a hybrid stage 1 ranks it first."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        docs = [f"d{i}" for i in range(30)]
        self.dense = ["d1", "d2", "rel"] + docs[3:30]
        self.lexical = ["d29", "rel", "d21"]

    def search(self, query, *, retrieval_mode, top_k, **options):
        from types import SimpleNamespace as NS

        self.calls.append(("search", retrieval_mode))
        if retrieval_mode == "dense":
            hits = [NS(id=d, dense_score=0.9 - 0.01 * r, dense_rank=r) for r, d in enumerate(self.dense[:top_k])]
        else:
            scores = [12.0, 11.9, 1.0]
            hits = [NS(id=d, lexical_score=scores[r], lexical_rank=r) for r, d in enumerate(self.lexical[:top_k])]
        return NS(hits=hits)

    def rerank(self, query, *, document_ids):
        from types import SimpleNamespace as NS

        self.calls.append(("rerank", ",".join(document_ids)))
        return NS(budget_limited=False, results=[NS(index=i, score=0.5) for i in range(len(document_ids))])


def test_hybrid_tuning_fetches_two_lists_and_one_rerank_per_query_and_picks_hybrid():
    server = ListServer()
    options = ev.Options(tune=True, tune_candidates=(5, 10), tune_rerank_weights=(0.0, 1.0), progress=False)
    qrels = {"a": {"rel": 1}, "b": {"rel": 2}}
    defaults = Defaults(candidates=10, retrieval_mode="hybrid", fusion="convex", fusion_weight=0.5, rerank_weight=-1)
    result = ev.tune(server, {"a": "first", "b": "second"}, qrels, options, defaults, 1000, io.StringIO())
    assert [c[0] for c in server.calls] == ["search", "search", "rerank"] * 2
    assert {c[1] for c in server.calls if c[0] == "search"} == {"dense", "lexical"}
    reranked = set(server.calls[2][1].split(","))
    assert reranked == set(server.dense[:10]) | set(server.lexical)  # every candidate any grid point reranks
    assert len(result["grid"]) == (1 + 1 + 6 + 1) * 2 * 2  # dense, lexical, convex x 6 weights, rrf
    chosen = result["chosen"]
    assert chosen["retrieval_mode"] == "hybrid" and chosen["default_candidates"] == 5
    assert result["ndcg@10"] == pytest.approx(1.0)
    best = {label: max(g["ndcg@10"] for g in result["grid"] if g["stage1"] == label) for label in ("dense", "lexical")}
    assert best == {"dense": pytest.approx(0.5), "lexical": pytest.approx(1 / math.log2(3))}  # third, second place
    assert result["server_defaults_ndcg@10"] is None  # 10 candidates with the adaptive rule: not in this grid
