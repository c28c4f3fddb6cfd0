"""The `twostage` CLI (lazy wiring, help, client subcommands, output) and the demo's logic, against an
in-process fake servicer. The real server end to end is tested elsewhere."""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
import types
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from twostage.client import cli, demo
from twostage.client.output import format_table, shorten
from twostage.v1 import twostage_pb2 as pb
from twostage.v1 import twostage_pb2_grpc as pb_grpc


class FakeService(pb_grpc.TwoStageServicer):
    """Keeps upserted documents; Search answers with the id orders configured per query
    (`stage1[query]` for skip_rerank, `reranked[query]` otherwise)."""

    def __init__(self):
        self.docs: dict[str, pb.Document] = {}
        self.stage1: dict[str, list[str]] = {}
        self.reranked: dict[str, list[str]] = {}
        self.requests: list[tuple[str, object, dict]] = []
        self.fail_with: grpc.StatusCode | None = None

    def _seen(self, name, request, context):
        self.requests.append((name, request, dict(context.invocation_metadata())))
        if self.fail_with is not None:
            context.abort(self.fail_with, "query: must not be empty")

    def Upsert(self, request, context):
        self._seen("Upsert", request, context)
        for d in request.documents:
            self.docs[d.id] = d
        return pb.UpsertResponse(inserted=len(request.documents), index_size=len(self.docs))

    def Search(self, request, context):
        self._seen("Search", request, context)
        order = (self.stage1 if request.skip_rerank else self.reranked).get(request.query, list(self.docs))
        hits = []
        for rank, doc_id in enumerate(order[: request.top_k or 10]):
            score = 1.0 - rank / 10
            hits.append(pb.SearchHit(id=doc_id, score=score, rerank_score=0 if request.skip_rerank else score,
                                     retrieval_score=score, reranked=not request.skip_rerank,
                                     retrieval_rank=self.stage1.get(request.query, order).index(doc_id),
                                     document=None if request.ids_only else self.docs.get(doc_id)))
        kind = pb.SCORE_KIND_SIMILARITY if request.skip_rerank else pb.SCORE_KIND_NORMALIZED
        return pb.SearchResponse(hits=hits, score_kind=kind, candidates=request.candidates or 100,
                                 reranked=0 if request.skip_rerank else len(hits),
                                 timing=pb.Timing(total_ms=4.0, ann_ms=0.5))

    def Rerank(self, request, context):
        self._seen("Rerank", request, context)
        items = list(request.texts) or list(request.document_ids)
        scored = sorted(((len(t), i) for i, t in enumerate(items)), reverse=True)  # longest text first
        results = [pb.RerankResult(index=i, score=float(n), id=request.document_ids[i] if request.document_ids else "",
                                   chunks=1) for n, i in scored]
        return pb.RerankResponse(results=results[: request.top_n or None], score_kind=pb.SCORE_KIND_RAW)

    def Info(self, request, context):
        self._seen("Info", request, context)
        return pb.InfoResponse(server_version="1.2.3", bi_encoder=pb.ModelInfo(role="bi-encoder", name="mini-bi"),
                               cross_encoder=pb.ModelInfo(role="cross-encoder", name="mini-ce"),
                               index=pb.IndexInfo(size=len(self.docs), metric="cos"),
                               defaults=pb.Defaults(top_k=10, candidates=100))


class FakeServer:
    def __init__(self):
        self.service = FakeService()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_TwoStageServicer_to_server(self.service, self.server)
        self.health = health.HealthServicer()
        # what the real server reports once loaded; the client's channel calls only servers reporting it
        self.health.set("twostage.v1.TwoStage", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True
        self.server.stop(None)


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.server.stop(None)


def run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------- wiring


def test_top_level_help_lists_commands_without_importing_heavy_modules():
    script = ("import sys\nfrom twostage.client import cli\n"
              "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
              "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'torch', 'onnxruntime', 'numpy')\n"
              "               or m.startswith(('twostage.server', 'twostage.export', 'twostage.client.client')))\n"
              "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    for command in ("export", "index", "serve", "search", "rerank", "info", "evaluate", "demo"):
        assert f"    {command} " in out
    assert "HEAVY []" in out


@pytest.mark.parametrize("command", ["search", "rerank", "info", "evaluate", "demo"])
def test_every_option_of_client_commands_states_its_default(command):
    parser = cli.build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert options
    missing = [a.option_strings[0] for a in options if "default" not in (a.help or "")]
    assert missing == []


@pytest.mark.parametrize("argv", [["export", "--help"], ["serve", "--help"], ["index", "build", "--help"],
                                  ["search", "--help"], ["evaluate", "--help"], ["demo", "--help"]])
def test_subcommand_help_exits_cleanly(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 0
    assert "usage: twostage " + " ".join(argv[:-1]) in capsys.readouterr().out


def test_unimportable_command_still_listed_and_explains(monkeypatch, capsys):
    broken = cli.Command("serve", "run the gRPC server", "twostage.server.no_such_module", "add_serve_arguments",
                         "run_serve")
    monkeypatch.setattr(cli, "COMMANDS", tuple(broken if c.name == "serve" else c for c in cli.COMMANDS))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "serve" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "UNAVAILABLE in this installation" in capsys.readouterr().out
    code, _, err = run_cli(["serve", "--models", "/models", "--port", "1"], capsys)
    assert code == 1 and "twostage.server.no_such_module" in err and "unavailable" in err


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["info", "--no-such-option"])
    assert exited.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


# ------------------------------------------------------------------------------ client commands


def test_search_json_sends_fields_and_api_key_from_env(fake, capsys, monkeypatch):
    fake.service.docs = {"a": pb.Document(id="a", text="alpha text", title="A"), "b": pb.Document(id="b", text="beta")}
    monkeypatch.setenv("TWOSTAGE_API_KEY", "env-key")
    code, out, _ = run_cli(["search", "what is alpha", "--target", fake.target, "--top-k", "2", "--candidates", "7",
                            "--filter", '{"topic": "x"}', "--raw-scores", "--rerank-budget-ms", "15", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert [h["id"] for h in result["hits"]] == ["a", "b"]
    assert result["hits"][0]["document"]["title"] == "A" and result["score_kind"] == "normalized"
    name, request, metadata = fake.service.requests[0]
    assert (request.top_k, request.candidates, request.rerank_budget_ms) == (2, 7, 15) and request.raw_scores
    assert json_format.MessageToDict(request.filter) == {"topic": "x"}
    assert metadata["authorization"] == "Bearer env-key"


def test_search_table_and_target_from_env(fake, capsys, monkeypatch):
    fake.service.docs = {"doc-1": pb.Document(id="doc-1", text="the first document")}
    monkeypatch.setenv("TWOSTAGE_TARGET", fake.target)
    code, out, _ = run_cli(["search", "first", "--skip-rerank", "--api-key", "flag-key"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "id", "score", "rerank", "retrieval", "retrieval_rank", "text"]
    assert "doc-1" in lines[2] and "the first document" in lines[2]
    assert "1 hits from 100 candidates (0 reranked; scores: similarity; ranks count from 0" in out
    assert fake.service.requests[0][1].skip_rerank
    assert fake.service.requests[0][2]["authorization"] == "Bearer flag-key"


def test_search_table_and_json_count_ranks_from_zero(fake, capsys):
    """One convention: the table shows the same 0-based retrieval_rank as the JSON (and the proto), and
    its rank column is the 0-based position in hits."""
    for doc_id in ("d1", "d2", "d3"):
        fake.service.docs[doc_id] = pb.Document(id=doc_id, text=f"text of {doc_id}")
    fake.service.stage1 = {"q": ["d1", "d2", "d3"]}
    fake.service.reranked = {"q": ["d3", "d1", "d2"]}
    code, out, _ = run_cli(["search", "q", "--target", fake.target], capsys)
    assert code == 0
    rows = [line.split() for line in out.splitlines()[2:5]]
    table = [(int(r[0]), r[1], int(r[5])) for r in rows]
    assert table == [(0, "d3", 2), (1, "d1", 0), (2, "d2", 1)]
    code, out, _ = run_cli(["search", "q", "--target", fake.target, "--json"], capsys)
    hits = json.loads(out)["hits"]
    assert [(i, h["id"], h["retrieval_rank"]) for i, h in enumerate(hits)] == table


def test_json_leaves_out_what_was_not_asked_for(fake, capsys):
    meta = json_format.ParseDict({"topic": "x", "note": ""}, pb.Document().metadata)
    fake.service.docs = {"a": pb.Document(id="a", text="alpha", title="A", metadata=meta),
                         "b": pb.Document(id="b", text="beta")}
    fake.service.stage1 = {"q": ["a", "b"]}
    code, out, _ = run_cli(["search", "q", "--target", fake.target, "--skip-rerank", "--json"], capsys)
    assert code == 0
    a, b = json.loads(out)["hits"]
    assert a["document"] == {"id": "a", "text": "alpha", "title": "A", "metadata": {"topic": "x", "note": ""}}
    assert b["document"] == {"id": "b", "text": "beta"}  # no title, metadata or embedding it never had
    assert (a["retrieval_rank"], a["reranked"], a["rerank_score"]) == (0, False, 0.0)  # answers, kept
    assert '"embedding"' not in out
    code, out, _ = run_cli(["search", "q", "--target", fake.target, "--ids-only", "--json"], capsys)
    assert all("document" not in hit for hit in json.loads(out)["hits"])
    code, out, _ = run_cli(["rerank", "q", "--target", fake.target, "--doc", "one", "--doc", "three", "--json"],
                           capsys)
    results = json.loads(out)["results"]
    assert [sorted(r) for r in results] == [["best_chunk", "chunks", "index", "score", "scored", "truncated"]] * 2


def test_several_targets_and_their_refusals(fake, capsys):
    code, out, _ = run_cli(["info", "--target", f"{closed_port_target()},{fake.target}", "--json"], capsys)
    assert code == 0 and json.loads(out)["server_version"] == "1.2.3"  # round robin skips the dead one
    code, _, err = run_cli(["info", "--target", "replica-a:1,replica-b:2"], capsys)
    assert code == 1 and "must be IP addresses" in err and "dns:///" in err
    with pytest.raises(SystemExit) as exited:
        cli.main(["info", "--max-attempts", "6"])
    assert exited.value.code == 2 and "--max-attempts" in capsys.readouterr().err


def closed_port_target() -> str:
    """A loopback address nobody listens on."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_rerank_texts_from_flags_and_file(fake, capsys, tmp_path):
    docs_file = tmp_path / "docs.txt"
    docs_file.write_text("a much longer document text\n\n  \nmid length\n")
    code, out, _ = run_cli(["rerank", "q", "--target", fake.target, "--doc", "short", "--docs-file", str(docs_file),
                            "--no-truncate", "--top-n", "2"], capsys)
    assert code == 0
    request = fake.service.requests[0][1]
    assert list(request.texts) == ["short", "a much longer document text", "mid length"]
    assert request.truncation == pb.TRUNCATION_NONE and request.top_n == 2
    rows = out.splitlines()[2:4]
    assert "a much longer document text" in rows[0] and "mid length" in rows[1]  # texts filled in locally


def test_rerank_ids_comma_separated_and_repeated(fake, capsys):
    code, out, _ = run_cli(["rerank", "q", "--target", fake.target, "--ids", "x1,x22", "--ids", "x333", "--json"],
                           capsys)
    assert code == 0
    assert list(fake.service.requests[0][1].document_ids) == ["x1", "x22", "x333"]
    assert [r["id"] for r in json.loads(out)["results"]] == ["x333", "x22", "x1"]


@pytest.mark.parametrize("argv, message", [
    (["--doc", "t", "--ids", "a"], "not both"),
    ([], "no documents"),
    (["--docs-file", "/nonexistent/docs.txt"], "--docs-file /nonexistent/docs.txt"),
])
def test_rerank_input_errors(argv, message, capsys):
    code, _, err = run_cli(["rerank", "q", "--target", "127.0.0.1:1", *argv], capsys)
    assert code == 1 and message in err


def test_info_table_and_json(fake, capsys):
    code, out, _ = run_cli(["info", "--target", fake.target], capsys)
    assert code == 0 and "twostage server 1.2.3" in out and "mini-bi" in out and "mini-ce" in out
    code, out, _ = run_cli(["info", "--target", fake.target, "--json"], capsys)
    assert json.loads(out)["defaults"]["candidates"] == 100


def test_server_error_is_one_line_with_status(fake, capsys):
    fake.service.fail_with = grpc.StatusCode.INVALID_ARGUMENT
    code, out, err = run_cli(["search", " ", "--target", fake.target], capsys)
    assert code == 1 and out == ""
    assert err.strip() == "twostage search: error: INVALID_ARGUMENT: query: must not be empty"


def test_a_server_not_serving_gets_no_call_unless_health_checks_are_off(fake, capsys):
    fake.health.set("twostage.v1.TwoStage", health_pb2.HealthCheckResponse.NOT_SERVING)  # e.g. still loading
    code, _, err = run_cli(["info", "--target", fake.target, "--max-attempts", "1", "--timeout", "5"], capsys)
    assert code == 1 and "UNAVAILABLE" in err and fake.service.requests == []
    assert "is up but its health check does not say SERVING" in err and "is a server running" not in err
    code, out, _ = run_cli(["info", "--target", fake.target, "--no-health-check", "--json"], capsys)
    assert code == 0 and json.loads(out)["server_version"] == "1.2.3"


def test_unreachable_server_hints_at_target(capsys):
    code, _, err = run_cli(["info", "--target", "127.0.0.1:1", "--max-attempts", "1", "--timeout", "5"], capsys)
    assert code == 1 and "UNAVAILABLE" in err and "is a server running at 127.0.0.1:1?" in err


def test_bad_filter_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["search", "q", "--filter", "[1, 2]"])
    assert exited.value.code == 2 and "must be a JSON object" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- output


def test_table_shrinks_the_text_column_to_fit():
    table = format_table(["id", "text"], [["a", "x" * 200], ["bb", "short"]], max_width=40, shrink="text")
    lines = table.splitlines()
    assert all(len(line) <= 40 for line in lines)
    assert lines[2].endswith("…") and lines[3].endswith("short")
    assert shorten("one\ntwo   three", 100) == "one two three"


# ------------------------------------------------------------------------------------------ demo


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_demo_indexes_compares_and_stops(tmp_path):
    server = FakeServer()
    svc = server.service
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [
        {"_id": f"d{i}", "title": f"T{i}", "text": f"text number {i}", "metadata": {"topic": "t"}}
        for i in range(1, 71)])
    queries = write_jsonl(tmp_path / "queries.jsonl", [
        {"_id": "q1", "text": "first query", "relevant": ["d2"]},
        {"_id": "q2", "text": "second query", "relevant": ["d9"]},
        {"_id": "q3", "text": "third query", "relevant": ["d5"]},
    ])
    svc.stage1 = {"first query": ["d1", "d2", "d3"], "second query": ["d9", "d8", "d7", "d6"],
                  "third query": ["d4", "d5"]}
    svc.reranked = {"first query": ["d2", "d1", "d3"], "second query": ["d8", "d7", "d6"],
                    "third query": ["d5", "d4"]}
    prepared = []

    async def factory(models: Path, index: Path):
        assert index.name == "index"  # a fresh temporary index directory
        return server

    report = asyncio.run(demo.run_demo(models=tmp_path / "models", corpus=corpus, queries=queries, top_k=3,
                                       candidates=20, server_factory=factory, prepare_models=prepared.append))
    assert prepared == [tmp_path / "models"] and server.stopped
    upserts = [r for name, r, _ in svc.requests if name == "Upsert"]
    assert [len(r.documents) for r in upserts] == [64, 6] and len(svc.docs) == 70
    assert svc.docs["d3"].title == "T3" and json_format.MessageToDict(svc.docs["d3"].metadata) == {"topic": "t"}
    searches = [r for name, r, _ in svc.requests if name == "Search"]
    assert [(r.query, r.skip_rerank, r.top_k, r.candidates) for r in searches[:2]] == [
        ("first query", True, 3, 20), ("first query", False, 3, 20)]
    ranks = [(c.bi_encoder_rank, c.reranked_rank) for c in report.comparisons]
    assert ranks == [(2, 1), (1, None), (2, 1)]
    s = report.summary
    assert (s.bi_encoder_at_1, s.reranked_at_1, s.improved, s.worsened) == (1, 2, 2, 1)
    assert s.bi_encoder_mrr == pytest.approx((0.5 + 1 + 0.5) / 3) and s.reranked_mrr == pytest.approx(2 / 3)

    first = demo.format_comparison(report.comparisons[0], width=100).splitlines()
    assert first[0] == "[q1] first query"
    assert "bi-encoder only rank 2, reranked rank 1 (reranking moved it up)" in first[1]
    assert first[3].split()[:3] == ["1", "d1", "1.0000"] and "*d2" in first[3].split("|")[1]
    assert "*d2" in first[4].split("|")[0]
    assert "reranked not found (reranking moved it down)" in demo.format_comparison(report.comparisons[1])

    out = io.StringIO()
    demo.print_report(report, out, as_json=True)
    data = json.loads(out.getvalue())
    assert data["summary"]["reranked_at_1"] == 2 and data["queries"][1]["reranked_rank"] is None
    assert data["queries"][0]["reranked"][0] == {"id": "d2", "score": 1.0, "retrieval_rank": 1, "relevant": True}


def test_demo_stops_the_server_when_a_step_fails(tmp_path):
    server = FakeServer()
    server.service.fail_with = grpc.StatusCode.INTERNAL
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "x"}])
    queries = write_jsonl(tmp_path / "q.jsonl", [{"_id": "q", "text": "x", "relevant": ["a"]}])

    async def factory(models, index):
        return server

    with pytest.raises(Exception, match="INTERNAL"):
        asyncio.run(demo.run_demo(models=tmp_path, corpus=corpus, queries=queries, server_factory=factory,
                                  prepare_models=lambda _: None))
    assert server.stopped


def test_ensure_models_exports_only_when_missing(tmp_path, monkeypatch):
    calls = []

    def add_arguments(parser):
        parser.add_argument("--out", required=True)
        parser.add_argument("--force", action="store_true")

    def run(args):
        calls.append(args)
        for role in ("bi-encoder", "cross-encoder"):
            (Path(args.out) / role).mkdir(parents=True)
            (Path(args.out) / role / "manifest.json").write_text("{}")
        return 0

    monkeypatch.setitem(sys.modules, "twostage.export.cli",
                        types.SimpleNamespace(add_arguments=add_arguments, run=run))
    models = tmp_path / "models"
    demo.ensure_models(models)
    demo.ensure_models(models)
    assert len(calls) == 1 and calls[0].out == str(models) and not calls[0].force


def test_ensure_models_without_export_step_explains(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "twostage.export.cli", None)
    with pytest.raises(RuntimeError, match=r"no models in .* export step is not installed"):
        demo.ensure_models(tmp_path / "models")


def test_packaged_sample_data_is_consistent():
    corpus = demo.load_corpus(demo.packaged_data("sample_corpus.jsonl"))
    queries = demo.load_queries(demo.packaged_data("sample_queries.jsonl"))
    ids = [d["id"] for d in corpus]
    assert 150 <= len(corpus) <= 250 and len(set(ids)) == len(ids)
    topics = {d["metadata"]["topic"] for d in corpus}
    assert len(topics) >= 10
    assert all(d["title"] and 40 <= len(d["text"]) <= 400 for d in corpus)
    assert len(queries) >= 10 and all(set(q.relevant) <= set(ids) for q in queries)


def test_load_queries_names_the_bad_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"_id": "q1", "text": "x", "relevant": ["a"]}\n{"_id": "q2", "text": "y"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl: query 2 needs"):
        demo.load_queries(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"q.jsonl:1: not valid JSON"):
        demo.load_queries(path)



def test_demo_end_to_end_on_the_real_server_with_tiny_models(tiny_models, tmp_path):
    """The real in-process server (random tiny models: the ranks mean nothing, the wiring does)."""
    from twostage.client import Client, TwoStageError
    corpus = write_jsonl(tmp_path / "c.jsonl", [
        {"_id": f"d{i}", "title": f"title {i}", "text": f"some text about subject number {i}",
         "metadata": {"topic": "even" if i % 2 == 0 else "odd"}} for i in range(12)])
    queries = write_jsonl(tmp_path / "q.jsonl", [
        {"_id": "q1", "text": "subject number 3", "relevant": ["d3"]},
        {"_id": "q2", "text": "text about 7", "relevant": ["d7", "d8"]}])
    report = asyncio.run(demo.run_demo(models=tiny_models, corpus=corpus, queries=queries, index=tmp_path / "index",
                                       top_k=4, candidates=8))
    assert [c.query.id for c in report.comparisons] == ["q1", "q2"]
    for c in report.comparisons:
        assert len(c.bi_encoder) == 4 and len(c.reranked) == 4
        assert not any(h.reranked for h in c.bi_encoder) and all(h.reranked for h in c.reranked)
        assert {h.id for h in c.bi_encoder + c.reranked} <= {f"d{i}" for i in range(12)}
        assert [h.retrieval_rank for h in c.bi_encoder] == [0, 1, 2, 3]
        assert c.bi_encoder_rank == demo.answer_rank(c.bi_encoder, c.query.relevant)
    assert any((tmp_path / "index").iterdir())
    with Client(report.target, max_attempts=1, timeout=5) as client:
        with pytest.raises(TwoStageError):
            client.info()  # stopped


def test_package_license_is_an_spdx_string():
    """setuptools >= 77 deprecates the `project.license` table (a warning on every install)."""
    import tomllib
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]
