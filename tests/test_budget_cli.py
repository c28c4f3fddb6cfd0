"""What the CLI says about latency budgets: Info shows the server's default budget; search and rerank print how
many candidates the cross-encoder scored and, when the budget cut in, a note saying so; rerank sends
--latency-budget-ms. Against an in-process fake servicer (test_cli.py's), answering as a budget-limited server."""
from __future__ import annotations

import json
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest

from test_cli import FakeService, run_cli
from twostage.v1 import twostage_pb2 as pb
from twostage.v1 import twostage_pb2_grpc as pb_grpc


class BudgetedService(FakeService):
    """Answers Search and Rerank as a server whose 40 ms budget left part of the work undone; Info with a
    default budget of 250 ms."""

    def Search(self, request, context):
        self._seen("Search", request, context)
        hits = [pb.SearchHit(id=f"d{i}", score=1.0 - i / 10, rerank_score=0.9 - i / 10 if i < 3 else 0.0,
                             retrieval_score=0.5, reranked=i < 3, retrieval_rank=i) for i in range(5)]
        return pb.SearchResponse(hits=hits, score_kind=pb.SCORE_KIND_NORMALIZED, candidates=20, reranked=3,
                                 budget_limited=True, latency_budget_ms=40, timing=pb.Timing(total_ms=41.0))

    def Rerank(self, request, context):
        self._seen("Rerank", request, context)
        n = len(request.texts)
        results = [pb.RerankResult(index=i, score=0.8 - i / 10, chunks=1, scored=True) for i in range(2)]
        results += [pb.RerankResult(index=i, score=0.0, chunks=1, scored=False) for i in range(2, n)]
        return pb.RerankResponse(results=results, score_kind=pb.SCORE_KIND_NORMALIZED, scored=2,
                                 budget_limited=n > 2, latency_budget_ms=request.latency_budget_ms or 250,
                                 timing=pb.Timing(total_ms=40.0))

    def Info(self, request, context):
        info = super().Info(request, context)
        info.defaults.latency_budget_ms = 250
        return info


@pytest.fixture
def budgeted():
    service = BudgetedService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TwoStageServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield SimpleNamespace(service=service, target=f"127.0.0.1:{port}")
    server.stop(None)


def test_info_shows_the_default_budget(budgeted, capsys):
    code, out, _ = run_cli(["info", "--target", budgeted.target], capsys)
    assert code == 0 and "latency budget 250 ms" in out
    code, out, _ = run_cli(["info", "--target", budgeted.target, "--json"], capsys)
    assert json.loads(out)["defaults"]["latency_budget_ms"] == 250


def test_search_says_how_many_were_reranked_and_that_the_budget_cut_in(budgeted, capsys):
    code, out, _ = run_cli(["search", "tides", "--target", budgeted.target, "--latency-budget-ms", "40"], capsys)
    assert code == 0
    assert "3 reranked" in out and "latency budget (40 ms) cut reranking short: 3 of 20 candidates" in out
    assert budgeted.service.requests[-1][1].latency_budget_ms == 40


def test_rerank_sends_the_budget_and_marks_unscored_documents(budgeted, capsys):
    argv = ["rerank", "tides", "--doc", "moon", "--doc", "sea", "--doc", "sun", "--doc", "salt", "--target",
            budgeted.target, "--latency-budget-ms", "40"]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and budgeted.service.requests[-1][1].latency_budget_ms == 40
    assert "4 results (2 scored;" in out
    assert "latency budget (40 ms) cut scoring short: 2 documents scored" in out
    rows = [line.split() for line in out.splitlines()[2:6]]
    assert [row[3] for row in rows] == ["0.8000", "0.7000", "-", "-"]       # unscored: no score shown
    code, out, _ = run_cli(argv + ["--json"], capsys)
    data = json.loads(out)
    assert data["scored"] == 2 and data["budget_limited"] and [r["scored"] for r in data["results"]] == [
        True, True, False, False]


def test_rerank_within_budget_prints_no_note(budgeted, capsys):
    code, out, _ = run_cli(["rerank", "tides", "--doc", "moon", "--doc", "sea", "--target", budgeted.target],
                           capsys)
    assert code == 0 and "2 results (2 scored;" in out and "note:" not in out
