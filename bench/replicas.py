"""Replicas over one Milvus: calls per replica, failed calls, and how soon a restarted replica takes traffic again.

    python -m bench.replicas                     # 3 replicas, 16 client threads, one replica killed and restarted
    python -m bench.replicas --quick             # shorter phases: a smoke run, figures meaningless

The scenario (also what tests/test_replicas.py runs, with shorter phases and the tiny test models): one
`milvus-lite server` process on a loopback port; N `twostage serve --milvus-uri http://127.0.0.1:P
--collection C` replica processes on fixed loopback ports, metrics on; a few documents upserted through the
client; then C threads sending Search through one typed client that targets every replica (gRPC's
round_robin, its health checking and retry policy, client/channel.py). Phases: `warm` (all replicas up), `down`
(replica 0 killed with SIGKILL), `rejoin` (replica 0 restarted on the same ports, until it has served a
Search), `after` (all up again). Calls per replica come from each replica's own Prometheus counter
(`twostage_requests_total{method="Search",code="OK"}`), scraped at every phase boundary; the killed
replica's count is its last scrape before the kill. Failed calls are what the client raised, by status.

The time for the restarted replica to take traffic again is split in two: restart -> SERVING (the process
starting: imports, models, Milvus connection) and SERVING -> first served Search. The server opens its port
before it loads, so the clients' channel reconnects while it loads, but health checking keeps calls away from
it until it reports twostage.v1.TwoStage SERVING; the counter counts a call when it completes, so the second part
includes one call's duration (recorded as the median Search time).

milvus-lite 3.x is a Python re-implementation of the Milvus API, not the Milvus server, and every process
here shares one machine: the call rates say nothing about Milvus's or twostage's speed.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twostage.client import Client, TwoStageError

SEARCH_OK = ("twostage_requests_total", "Search", "OK")
CLI = [sys.executable, "-m", "twostage.client.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, what: str, timeout: float, step: float = 0.05) -> float:
    """Poll until `predicate()` is true; returns the monotonic time it was seen true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(step)


# ------------------------------------------------------------------------------------------- processes
class MilvusLite:
    """`milvus-lite server` (as `python -m milvus_lite server`) on a loopback port."""

    def __init__(self, data_dir: Path, log_path: Path):
        self.data_dir, self.log_path, self.port = data_dir, log_path, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir",
                                          str(self.data_dir), "--host", "127.0.0.1", "--port", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited with {self.proc.returncode}; see {self.log_path}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, "milvus-lite listens", timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


class Replica:
    """One `twostage serve` process on fixed loopback ports (kept across a restart), backed by Milvus."""

    def __init__(self, name: str, models: Path, milvus_uri: str, collection: str, log_dir: Path,
                 extra_flags: tuple[str, ...] = ()):
        self.name, self.models, self.milvus_uri, self.collection = name, models, milvus_uri, collection
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = log_dir / f"{name}.log"
        self.extra_flags = extra_flags
        self.proc: subprocess.Popen | None = None
        self._channel: grpc.Channel | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        args = CLI + ["serve", "--models", str(self.models), "--milvus-uri", self.milvus_uri, "--collection",
                      self.collection, "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port",
                      str(self.metrics_port), "--log-format", "text", "--log-level", "warning", *self.extra_flags]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye to the clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.close_channel()

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def serving(self) -> bool:
        """Health (service "twostage.v1.TwoStage": readiness, which follows Milvus) is SERVING."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"replica {self.name} exited with {self.proc and self.proc.returncode}:\n"
                               f"{self.log_tail()}")
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.target)
        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service="twostage.v1.TwoStage"), timeout=2)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def served(self) -> float | None:
        """Searches this process has answered OK (its Prometheus counter); None when the endpoint is down."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        return search_ok_count(text)


def search_ok_count(metrics_text: str) -> float:
    """twostage_requests_total{method="Search",code="OK"} from a Prometheus text page (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    name, method, code = SEARCH_OK
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("method") == method and sample.labels.get("code") == code:
                return float(sample.value)
    return 0.0


# ------------------------------------------------------------------------------------------- load
@dataclass
class Load:
    """`clients` threads calling Search in a loop through one shared client until stopped; every outcome is
    kept as (monotonic end time, status name, seconds the call took)."""

    client: Client
    queries: list[str]
    clients: int
    search_options: dict[str, int | bool] = field(default_factory=dict)
    outcomes: list[tuple[float, str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]

    def _run(self, worker: int) -> None:
        n = worker
        while not self._stop.is_set():
            query = self.queries[n % len(self.queries)]
            n += 1
            started = time.monotonic()
            try:
                self.client.search(query, **self.search_options)
                code = "OK"
            except TwoStageError as err:
                code = err.code.name
                self.failures.append(f"{code}: {err}")
            ended = time.monotonic()
            self.outcomes.append((ended, code, ended - started))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 120.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    def counts(self, since: float = 0.0, until: float = float("inf")) -> Counter[str]:
        return Counter(code for t, code, _ in list(self.outcomes) if since <= t < until)

    def median_seconds(self) -> float:
        """Median duration of the calls that succeeded."""
        durations = sorted(d for _, code, d in self.outcomes if code == "OK")
        return durations[len(durations) // 2] if durations else 0.0


# ------------------------------------------------------------------------------------------- scenario
@dataclass
class Phases:
    warm_s: float = 3.0        # all replicas up
    down_s: float = 4.0        # replica 0 killed, before it is restarted
    after_s: float = 3.0       # after the restarted replica served its first Search
    start_timeout_s: float = 120.0
    rejoin_timeout_s: float = 120.0


@dataclass
class ScenarioResult:
    replicas: list[str]
    served: dict[str, dict[str, float]]      # phase -> replica -> Searches answered OK (counter delta)
    client: dict[str, dict[str, int]]        # phase -> status -> calls (as the client saw them)
    failures: list[str]                      # every failed call, "CODE: message"
    restart_to_serving_s: float
    serving_to_first_call_s: float
    restart_to_first_call_s: float
    total_client_ok: int
    total_served_ok: float
    call_p50_s: float                        # median duration of a successful Search, retries included
    seconds: dict[str, float] = field(default_factory=dict)


def sample_documents() -> list[dict[str, object]]:
    """Documents written for this scenario (no dataset text)."""
    topics = ["kites fly on the wind", "bread rises with yeast", "rivers run to the sea", "bees make honey",
              "the moon pulls the tides", "iron rusts in rain", "volcanoes erupt molten rock", "sleep stores memory"]
    return [{"id": f"doc-{i}", "title": topics[i % len(topics)].split()[0].title(),
             "text": f"{topics[i % len(topics)]}; note {i} on the same subject", "metadata": {"n": i}}
            for i in range(40)]


QUERIES = ["why does a kite fly", "how does bread rise", "where do rivers go", "how do bees make honey",
           "what causes tides", "why does iron rust", "why do volcanoes erupt", "what does sleep do"]


# phase -> (scrape at its start, scrape at its end)
PHASES = {"warm": ("start", "kill"), "down": ("kill", "restart"), "rejoin": ("restart", "rejoined"),
          "after": ("rejoined", "end")}


def _delta(before: float | None, after: float | None) -> float:
    """Searches a replica served between two scrapes: none if it was down at the end; counted from 0 if it
    was down at the start (a restarted process starts a fresh counter)."""
    if after is None:
        return 0.0
    return after - (before or 0.0)


def run_scenario(models: Path, work: Path, *, replicas: int = 3, clients: int = 16, phases: Phases = Phases(),
                 search_options: dict[str, int | bool] | None = None, call_timeout_s: float = 30.0,
                 replica_flags: tuple[str, ...] = (), log: Callable[[str], None] = print) -> ScenarioResult:
    """Run the scenario described in the module docstring; every process started here is stopped on return."""
    work.mkdir(parents=True, exist_ok=True)
    lite = MilvusLite(work / "milvus-data", work / "milvus-lite.log")
    nodes = [Replica(f"replica-{i}", models, lite.uri, "replicas", work, replica_flags) for i in range(replicas)]
    t_begin = time.monotonic()
    seconds: dict[str, float] = {}
    try:
        lite.start()
        # The first replica creates the collection, then the others start (together). Replicas that start
        # together on a collection that does not exist yet can race to create it, and against milvus-lite the
        # loser exits ("File exists"): the backend's concurrent-creation check does not cover that case.
        nodes[0].start()
        wait_for(nodes[0].serving, f"{nodes[0].name} is SERVING", phases.start_timeout_s)
        for node in nodes[1:]:
            node.start()
        for node in nodes[1:]:
            wait_for(node.serving, f"{node.name} is SERVING", phases.start_timeout_s)
        seconds["startup"] = time.monotonic() - t_begin
        log(f"  {replicas} replicas serving after {seconds['startup']:.1f} s")
        with Client([n.target for n in nodes], timeout=call_timeout_s) as client:
            client.upsert(sample_documents())
            load = Load(client, QUERIES, clients, dict(search_options or {}))
            scrapes: dict[str, dict[str, float | None]] = {}

            def scrape(label: str) -> None:  # replica 0 last: the kill follows its scrape at once
                scrapes[label] = {n.name: n.served() for n in reversed(nodes)}

            scrape("start")
            t_load = time.monotonic()
            load.start()
            try:
                time.sleep(phases.warm_s)
                scrape("kill")
                t_kill = time.monotonic()
                nodes[0].kill()
                log(f"  killed {nodes[0].name} (SIGKILL) after {load.counts()['OK']} calls")
                time.sleep(phases.down_s)
                scrape("restart")
                t_restart = time.monotonic()
                nodes[0].start()
                t_serving = wait_for(nodes[0].serving, f"{nodes[0].name} is SERVING again", phases.rejoin_timeout_s)
                t_first = wait_for(lambda: (nodes[0].served() or 0) > 0, f"{nodes[0].name} serves a Search",
                                   phases.rejoin_timeout_s)
                scrape("rejoined")
                log(f"  {nodes[0].name} SERVING {t_serving - t_restart:.1f} s after the restart, first Search "
                    f"served {t_first - t_serving:.1f} s later")
                time.sleep(phases.after_s)
            finally:
                load.stop(call_timeout_s + 30)
            t_end = time.monotonic()
            scrape("end")  # after the last call came back, so that every call the client saw is counted
    finally:
        for node in nodes:
            node.kill()
        lite.stop()
    seconds["load"] = t_end - t_load
    served = {phase: {n.name: _delta(scrapes[a][n.name], scrapes[b][n.name]) for n in nodes}
              for phase, (a, b) in PHASES.items()}
    edges = {"warm": (0.0, t_kill), "down": (t_kill, t_restart), "rejoin": (t_restart, t_first),
             "after": (t_first, float("inf"))}
    client_counts = {phase: dict(load.counts(a, b)) for phase, (a, b) in edges.items()}
    total_served = sum(v for phase in served.values() for v in phase.values())
    return ScenarioResult(replicas=[n.name for n in nodes], served=served, client=client_counts,
                          failures=list(load.failures), restart_to_serving_s=t_serving - t_restart,
                          serving_to_first_call_s=t_first - t_serving, restart_to_first_call_s=t_first - t_restart,
                          total_client_ok=load.counts()["OK"], total_served_ok=total_served,
                          call_p50_s=load.median_seconds(), seconds=seconds)


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench.common import base_parser, finish_common_args

    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=3, help="twostage serve processes")
    p.add_argument("--clients", type=int, default=16, help="threads calling Search through one client")
    p.add_argument("--warm-s", type=float, default=None, help="seconds of load before the kill (default 10; quick 2)")
    p.add_argument("--down-s", default=None,
                   help="comma-separated seconds replica 0 stays down, one run each (default 5,20,60; quick 2)")
    p.add_argument("--after-s", type=float, default=None,
                   help="seconds of load after the restarted replica's first Search (default 10; quick 2)")
    p.add_argument("--call-timeout-s", type=float, default=30.0, help="the callers' deadline per Search")
    p.add_argument("--top-k", type=int, default=10, help="Search top_k")
    p.add_argument("--candidates", type=int, default=100, help="Search candidates (the sample holds 40 documents)")
    args = finish_common_args(p.parse_args(argv))
    args.warm_s = args.warm_s if args.warm_s is not None else (2.0 if args.quick else 10.0)
    args.after_s = args.after_s if args.after_s is not None else (2.0 if args.quick else 10.0)
    args.down_s = [float(x) for x in (args.down_s or ("2" if args.quick else "5,20,60")).split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    import dataclasses
    import shutil
    import tempfile

    from bench.common import format_table, package_versions, resolve_threads, save_result

    args = parse_args(argv)
    runs = []
    for down_s in args.down_s:
        print(f"run: replica-0 down for {down_s:.0f} s", flush=True)
        work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
        try:
            result = run_scenario(args.models, work, replicas=args.replicas, clients=args.clients,
                                  phases=Phases(warm_s=args.warm_s, down_s=down_s, after_s=args.after_s),
                                  search_options={"top_k": args.top_k, "candidates": args.candidates},
                                  call_timeout_s=args.call_timeout_s, log=lambda line: print(line, flush=True))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        runs.append({"down_s": down_s, **dataclasses.asdict(result)})
        failures = Counter(f.split(":", 1)[0] for f in result.failures)
        print(format_table(["phase", *result.replicas, "client OK", "client failed"],
                           [[phase, *[int(v) for v in served.values()], result.client[phase].get("OK", 0),
                             sum(n for code, n in result.client[phase].items() if code != "OK")]
                            for phase, served in result.served.items()]))
        print(f"  failed calls: {dict(failures) or 0}; restart -> SERVING {result.restart_to_serving_s:.1f} s, "
              f"SERVING -> first Search {result.serving_to_first_call_s:.2f} s (a Search takes "
              f"{result.call_p50_s:.2f} s, median)", flush=True)
    payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "threads": resolve_threads(args.threads),
               "versions": package_versions(["grpcio", "pymilvus", "milvus-lite"]), "runs": runs,
               "notes": ["Calls per replica: each replica's twostage_requests_total{method=Search,code=OK}, scraped at "
                         "the phase boundaries; replica-0's restarted process counts from 0.",
                         "Every process (milvus-lite, the replicas, the client threads) shares this machine's CPUs; "
                         "milvus-lite is a Python re-implementation of the Milvus API, not the Milvus server. Call "
                         "rates here are not throughput figures."]}
    path = save_result("replicas", payload, args.out)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
