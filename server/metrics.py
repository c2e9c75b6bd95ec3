"""Prometheus metrics for one server, in its own registry, served over HTTP on their own port.

A registry per server (not prometheus_client's global one) lets tests run several servers in
one process and read each one's counters.
"""

from __future__ import annotations

from collections.abc import Callable
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from tandem.server.engine.batcher import CostModel
from tandem.server.engine.search import Result

# Seconds: the rerank budget is 100 ms, so resolution is finest around it.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
# A CPU's batches stop at 32 pairs and 1,024 tokens; a GPU's reach 1,024 pairs and 65,536.
PAIR_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 1536, 2048, 4096, 8192, 16384, 32768, 65536)
FRACTION_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
# Tenths: the last bucket below 1.0 is where the pool's tail starts (TAIL_FRACTION).
RANK_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TAIL_FRACTION = 0.9


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tandem_requests",
            "Finished calls by method and gRPC status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tandem_request_seconds",
            "Call latency as the server saw it, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "tandem_http_requests",
            "Finished HTTP requests by route and HTTP status ('other' for unknown paths)",
            ["route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "tandem_http_request_seconds",
            "HTTP request latency as the server saw it, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "tandem_stage_seconds",
            "Time per stage of a call: embed, search, tokenize, queue, rerank",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_pairs = Histogram(
            "tandem_batch_pairs",
            "Pairs per reranker run",
            buckets=PAIR_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "tandem_batch_seconds",
            "Seconds per reranker run, as the batcher's cost model observes it",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cost_per_token = Gauge(
            "tandem_rerank_cost_seconds_per_token",
            "The batcher's learned seconds per padded token (what budgets are planned with)",
            registry=self.registry,
        )
        self.cost_per_run = Gauge(
            "tandem_rerank_cost_seconds_per_run",
            "The batcher's fixed seconds per run (a GPU's, from its start-up probe; 0 on a CPU)",
            registry=self.registry,
        )
        self.batch_tokens = Histogram(
            "tandem_batch_padded_tokens",
            "Padded tokens per reranker run",
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.reranked_fraction = Histogram(
            "tandem_reranked_fraction",
            "Share of a call's candidates the reranker scored within the budget",
            buckets=FRACTION_BUCKETS,
            registry=self.registry,
        )
        self.winner_rank = Histogram(
            "tandem_winner_stage1_rank_fraction",
            "Where each reranked hit a Search returned stood in stage 1: (rank + 1) / "
            "candidates, so 1.0 is the last candidate of recall_k; by first stage",
            ["first_stage"],
            buckets=RANK_BUCKETS,
            registry=self.registry,
        )
        self.winners_from_tail = Counter(
            "tandem_winners_from_pool_tail",
            "Reranked hits a Search returned that came from the last tenth of its candidates: "
            "often, and recall_k is too small; by first stage",
            ["first_stage"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "tandem_rejections",
            "Calls refused before any work: in_flight, concurrency_limit, queue_wait, "
            "queue_full, too_shallow (min_rerank), unauthenticated",
            ["reason"],
            registry=self.registry,
        )
        self.in_flight = Gauge("tandem_in_flight", "Calls being served now", registry=self.registry)
        self.loop_lag = Histogram(
            "tandem_event_loop_lag_seconds",
            "How late the event loop wakes a 5 ms timer: the wait every call sees on arrival",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
            registry=self.registry,
        )
        self.concurrency_limit = Gauge(
            "tandem_concurrency_limit",
            "Search/Rerank/Embed calls let run at once, as the adaptive limit stands now",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "tandem_rerank_queue_pairs",
            "Pairs waiting for the reranker",
            registry=self.registry,
        )
        self.documents = Gauge(
            "tandem_documents", "Documents in the collection", registry=self.registry
        )

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def watch_documents(self, count: Callable[[], int]) -> None:
        self.documents.set_function(count)

    def watch_cost(self, cost: Callable[[], CostModel | None]) -> None:
        """The cost model of the batcher of the moment (a published reranker brings its own)."""
        none = CostModel(seconds_per_token=0.0)  # no reranker: nothing planned
        self.cost_per_token.set_function(lambda: (cost() or none).seconds_per_token)
        self.cost_per_run.set_function(lambda: (cost() or none).seconds_per_run)

    def observe_batch(self, pairs: int, padded_tokens: int, seconds: float) -> None:
        self.batch_pairs.observe(pairs)
        self.batch_tokens.observe(padded_tokens)
        self.batch_seconds.observe(seconds)

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, milliseconds in timings_ms.items():
            if stage != "total":
                self.stages.labels(stage).observe(milliseconds / 1000)

    def observe_search(self, result: Result) -> None:
        """Where the reranker's winners stood in stage 1 (``winner_rank``)."""
        if result.first_stage is None or not result.candidates:
            return
        stage = result.first_stage.value
        ranks = self.winner_rank.labels(stage)
        tail = self.winners_from_tail.labels(stage)  # shown at 0 before the first one
        for hit in result.hits:
            if hit.reranked:
                ranks.observe((hit.stage1_rank + 1) / result.candidates)
                if hit.stage1_rank >= TAIL_FRACTION * result.candidates:
                    tail.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsEndpoint(server, thread)


class MetricsEndpoint:
    """The /metrics HTTP server's handle: its port, and how to stop it."""

    def __init__(self, server: WSGIServer, thread: Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
