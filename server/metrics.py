"""Prometheus metrics, served over HTTP on `metrics_port`. One registry per server so tests can run several."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    """Counters and histograms per RPC and status, batcher queue/batch figures, index size."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("twostage_requests_total", "RPCs by method and status code", ["method", "code"],
                                registry=r)
        self.latency = Histogram("twostage_request_seconds", "RPC latency by method and status code",
                                 ["method", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("twostage_queue_seconds", "time work waited in a batcher queue", ["model"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.batch_items = Histogram("twostage_batch_items", "items (texts or pairs) per model batch", ["model"],
                                     buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("twostage_batch_tokens", "padded tokens per model batch", ["model"],
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.padding_ratio = Histogram("twostage_batch_padding_ratio", "padding tokens / padded tokens per batch",
                                       ["model"], buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9, 1.0),
                                       registry=r)
        self.inference = Histogram("twostage_batch_inference_seconds", "model inference time per batch", ["model"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.cost_fixed = Gauge("twostage_batch_cost_fixed_seconds",
                                "estimated fixed cost of one model batch on one worker (online fit)", ["model"],
                                registry=r)
        self.cost_per_token = Gauge("twostage_batch_cost_per_token_seconds",
                                    "estimated cost per padded token of a model batch on one worker (online fit)",
                                    ["model"], registry=r)
        self.cost_spread = Gauge("twostage_batch_cost_relative_error",
                                 "recent relative error of the batch cost predictions", ["model"], registry=r)
        self.deadline_dropped = Counter("twostage_deadline_dropped_items_total",
                                        "items of budgeted requests not run because they could not end by the "
                                        "deadline", ["model"], registry=r)
        self.budget_limited = Counter("twostage_budget_limited_requests_total",
                                      "requests whose latency budget cut reranking short", ["method"], registry=r)
        self.index_size = Gauge("twostage_index_documents", "documents in the index", registry=r)
        self.inflight = Gauge("twostage_inflight_requests", "RPCs being served now", registry=r)

    # batcher hook (see server/batcher.py)
    def observe_batch(self, model: str, items: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        self.batch_items.labels(model).observe(items)
        self.batch_tokens.labels(model).observe(padded_tokens)
        if padded_tokens > 0:
            self.padding_ratio.labels(model).observe(1.0 - real_tokens / padded_tokens)
        self.inference.labels(model).observe(seconds)

    def observe_queue(self, model: str, seconds: float) -> None:
        self.queue.labels(model).observe(seconds)

    def observe_cost(self, model: str, fixed_s: float, per_token_s: float, spread: float) -> None:
        self.cost_fixed.labels(model).set(fixed_s)
        self.cost_per_token.labels(model).set(per_token_s)
        self.cost_spread.labels(model).set(spread)

    def observe_dropped(self, model: str, items: int) -> None:
        self.deadline_dropped.labels(model).inc(items)

    def observe_budget_limited(self, method: str) -> None:
        self.budget_limited.labels(method).inc()

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method, code).observe(seconds)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint; returns the bound port (port 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
