"""Replicas over one Milvus (issue 14, item 5): three `twostage serve` processes on loopback ports share one
collection of a `milvus-lite server` process; 16 threads call Search through one client that targets all
three (round_robin + retries, client/channel.py). One replica is killed with SIGKILL mid-run and later
restarted on the same ports. Every call must succeed, or fail only with the deadline the caller set (while the
replica dies, and while it comes back); the calls spread over the replicas that are up (each replica's own
Prometheus request counter); and the restarted replica takes calls again.

The scenario itself is bench/replicas.py (`run_scenario`), which the benchmark runs with longer phases and
the real models; here it runs with the tiny test models and short phases."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.replicas import Phases, ScenarioResult, run_scenario, search_ok_count  # noqa: E402

CLIENTS = 16
CALL_TIMEOUT_S = 30.0  # the caller's deadline: the only failure allowed is running past it


@pytest.fixture(scope="module")
def scenario(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> ScenarioResult:
    work = tmp_path_factory.mktemp("replicas")
    result = run_scenario(tiny_models, work, replicas=3, clients=CLIENTS,
                          phases=Phases(warm_s=2.0, down_s=3.0, after_s=2.0, start_timeout_s=120.0,
                                        rejoin_timeout_s=90.0),
                          search_options={"top_k": 3, "candidates": 10}, call_timeout_s=CALL_TIMEOUT_S,
                          replica_flags=("--intra-op-threads", "1", "--inference-workers", "1"), log=lambda _: None)
    print(f"replica scenario: {result}")
    return result


def _failed(scenario: ScenarioResult, phases: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Calls that ended in `phases` with a status other than OK or the caller's DEADLINE_EXCEEDED."""
    allowed = {"OK", "DEADLINE_EXCEEDED"}
    return {phase: {code: n for code, n in scenario.client[phase].items() if code not in allowed} for phase in phases
            if set(scenario.client[phase]) - allowed}


def test_a_replica_killed_under_load_costs_no_call(scenario):
    """Calls in flight on the killed replica fail UNAVAILABLE there and gRPC retries them on the others."""
    assert not _failed(scenario, ("warm", "down")), scenario.failures[:5]
    assert scenario.client["down"].get("OK", 0) >= 20, scenario.client
    assert scenario.total_client_ok > 100, scenario.client


def test_a_restarting_replica_costs_no_call(scenario):
    """A restarted replica opens its port before it has loaded (and stays NOT_SERVING while Milvus is out of its
    reach). The client's channel watches each replica's health (client/channel.py, healthCheckConfig) and sends
    calls only to replicas reporting SERVING, so no call, nor any of its retries, lands on one still loading."""
    assert not _failed(scenario, ("rejoin", "after")), scenario.failures[:5]


def test_calls_spread_over_the_replicas_that_are_up(scenario):
    killed, *live = scenario.replicas
    warm, down = scenario.served["warm"], scenario.served["down"]
    assert all(warm[r] > 0 for r in scenario.replicas), warm  # before the kill: every replica takes calls
    assert down[killed] == 0
    down_total = sum(down.values())
    assert down_total >= 20, down
    for r in live:  # round robin over the two left: each takes a fair share, not a trickle
        assert down[r] >= 0.25 * down_total, down


def test_the_restarted_replica_takes_calls_again(scenario):
    killed, *live = scenario.replicas
    assert scenario.served["rejoin"][killed] > 0
    after = scenario.served["after"]
    assert after[killed] > 0 and all(after[r] > 0 for r in live), after
    # the clients' channel found it again soon after it was ready (gRPC's reconnect backoff is bounded)
    assert scenario.serving_to_first_call_s < 60, scenario


def test_replica_counters_account_for_the_calls_the_client_saw(scenario):
    """Every Search the client got OK was answered by some replica, and counted there. A few may be counted
    twice or not at all around the kill (answered by the killed replica after its last scrape, or its reply
    lost with the process and the call retried): fewer than one per client thread."""
    assert abs(scenario.total_served_ok - scenario.total_client_ok) <= CLIENTS, scenario


def test_search_ok_count_reads_the_request_counter():
    text = ('# HELP twostage_requests_total RPCs by method and status code\n'
            '# TYPE twostage_requests_total counter\n'
            'twostage_requests_total{code="OK",method="Search"} 12.0\n'
            'twostage_requests_total{code="UNAVAILABLE",method="Search"} 3.0\n'
            'twostage_requests_total{code="OK",method="Upsert"} 1.0\n')
    assert search_ok_count(text) == 12.0
    assert search_ok_count("") == 0.0
