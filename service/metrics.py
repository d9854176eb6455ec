"""Serving metrics in Prometheus format, one registry per app.

Owns the metric definitions (TTFT, TPOT and end-to-end latency histograms, queue depth, running batch
size, KV cache usage and preemptions, token and request counters, engine step time) and the per-request timer
that feeds them. Ignores HTTP routing and placement metrics (the lead's admin routes export those).
"""

from __future__ import annotations

import time
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.async_engine import AsyncEngine, StepStats

RequestStatus = Literal["stop", "length", "abort", "error", "rejected"]
# up to 30 minutes: past the default request_timeout_s (300 s) and a long generation's end-to-end time (vLLM's go
# to 7680 s); a quantile past the last bucket would read as that bucket's bound
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                    600.0, 1800.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


class ServingMetrics:
    """Metrics of one app; queue depth and batch size are read from the engine at scrape time."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("vibe_time_to_first_token_seconds", "Time from request arrival to its first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("vibe_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per request.",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("vibe_e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.step = Histogram("vibe_engine_step_seconds", "Wall time of one engine step (one model forward).",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vibe_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.cached_prompt_tokens = Counter("vibe_prefix_cache_hit_tokens",
                                            "Prompt tokens served from the prefix cache instead of prefilled.",
                                            registry=r)
        self.generation_tokens = Counter("vibe_generation_tokens", "Generated tokens.", registry=r)
        self.requests = Counter("vibe_requests", "Generation requests by final status.", ["status"], registry=r)
        for status in get_args(RequestStatus):  # each from 0: increase() misses a series' first sample
            self.requests.labels(status=status)
        Gauge("vibe_num_requests_waiting", "Requests waiting for a slot.", registry=r).set_function(
            lambda: engine.num_waiting)
        Gauge("vibe_num_requests_running", "Sequences in the running batch.", registry=r).set_function(
            lambda: engine.num_running)
        Gauge("vibe_kv_cache_usage_perc", "Share of the KV cache's blocks held by running sequences (0-1).",
              registry=r).set_function(lambda: engine.kv_cache_usage)
        self.preemptions = Counter("vibe_num_preemptions", "Running sequences preempted for want of KV cache blocks "
                                   "(prefilled again later).", registry=r)
        self.step_retries = Counter("vibe_num_step_retries", "Requests kept to run again after their step failed on "
                                    "an expert device (retried, not failed).", registry=r)
        self._engine = engine
        # counters that follow the engine's own totals (its attribute), and how much of each they have counted
        self._follows = {"num_preemptions": self.preemptions, "num_step_retries": self.step_retries}
        self._counted = dict.fromkeys(self._follows, 0)
        engine.add_step_listener(self._on_step)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def start_request(self) -> RequestTimer:
        return RequestTimer(self)

    def _on_step(self, stats: StepStats) -> None:
        self.step.observe(stats.seconds)
        for name, counter in self._follows.items():
            value = getattr(self._engine, name)
            if value > self._counted[name]:
                counter.inc(value - self._counted[name])
                self._counted[name] = value


class RequestTimer:
    """Times one request from its arrival; call `on_tokens` per output (of each choice) and `finish` once."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self._metrics = metrics
        self._start = time.perf_counter()
        self._first: float | None = None
        self._last = self._start
        self._num_tokens: dict[int, int] = {}  # per choice
        self._done = False

    def on_tokens(self, num_tokens: int, choice: int = 0) -> None:
        if num_tokens == 0:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self._metrics.ttft.observe(now - self._start)
        self._last = now
        self._num_tokens[choice] = self._num_tokens.get(choice, 0) + num_tokens
        self._metrics.generation_tokens.inc(num_tokens)

    def on_cached(self, num_tokens: int) -> None:
        """Prompt tokens of the request that the prefix cache held (counted at its first token)."""
        self._metrics.cached_prompt_tokens.inc(num_tokens)

    def finish(self, status: RequestStatus, num_prompt_tokens: int = 0) -> None:
        """Record the request's end (only the first call counts)."""
        if self._done:
            return
        self._done = True
        self._metrics.requests.labels(status=status).inc()
        self._metrics.prompt_tokens.inc(num_prompt_tokens)
        if self._first is not None:
            self._metrics.e2e.observe(self._last - self._start)
        longest = max(self._num_tokens.values(), default=0)  # choices decode side by side: the longest one's pace
        if self._first is not None and longest > 1:
            self._metrics.tpot.observe((self._last - self._first) / (longest - 1))
