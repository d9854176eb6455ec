"""Serving metrics in Prometheus format, one registry per app.

Owns the metric definitions (TTFT, TPOT and end-to-end latency histograms, queue depth, running batch
size, KV cache usage and preemptions, token and request counters, engine step time), the per-request timer
that feeds them, and the exposition of several ingress replicas' metrics from any one of them: a scrape through
Serve's proxy reaches one replica at random, so each replica exposes every replica's serving series, labelled
``replica``, its own live and the others' as they last sent them (`snapshot`, `set_peers`: the deployment passes
them through the coordinator every couple of seconds). Without that, one series jumped between unrelated counters,
each drop read as a counter reset (2 replicas at 1 request/s each read as 109 requests/s). Every sample carries the
time its replica took it (its own clock): a copy older than what a scrape of its replica gave is one Prometheus
rejects as out of order, not a counter that went down (a copy is up to a few seconds old). Collectors added with
`add_shared` (the coordinator's placement metrics, the same from every replica) are exposed unlabelled. Ignores
HTTP routing.
"""

from __future__ import annotations

import time
from typing import Any, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from service.async_engine import AsyncEngine, StepStats

# timeout: cut at the engine's request_timeout_s (a client that stopped reading, an overload), not an engine failure
RequestStatus = Literal["stop", "length", "abort", "timeout", "error", "rejected"]
PEERS_TTL_S = 10.0  # the other replicas' snapshots are exposed this long after they were taken (then left out)
# One replica's serving metrics as plain data: "at" (time.time() when taken) and "families", (family, type, help, unit,
# [(sample, labels, value)]) per family (a list of families alone: a replica from before "at", exposed untimed)
Snapshot = dict[str, Any]
# up to 30 minutes: past the default request_timeout_s (300 s) and a long generation's end-to-end time (vLLM's go
# to 7680 s); a quantile past the last bucket would read as that bucket's bound
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                    600.0, 1800.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


class ServingMetrics:
    """Metrics of one app; queue depth and batch size are read from the engine at scrape time."""

    def __init__(self, engine: AsyncEngine, replica: str | None = None) -> None:
        self.registry = CollectorRegistry()  # this replica's serving metrics
        self.replica = replica  # its label value, once it has one (None: exposed unlabelled, a lone process)
        self._peers: dict[str, Snapshot] = {}
        self._peers_at = 0.0  # when they arrived (time.monotonic)
        self._shared: list = []
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
        """The Prometheus text exposition of every metric: this replica's and its peers' (labelled ``replica``
        when it has a name), then the shared collectors'."""
        return generate_latest(_Exposition(self))

    def add_shared(self, collector) -> None:
        """Expose ``collector``'s metrics (a prometheus_client collector) unlabelled: the same from every replica."""
        self._shared.append(collector)

    def snapshot(self) -> Snapshot:
        """This replica's serving metrics as plain data, with when they were taken (for its peers to expose)."""
        at = time.time()
        return {"at": at, "families": [(family.name, family.type, family.documentation, family.unit,
                                        [(sample.name, dict(sample.labels), sample.value) for sample in family.samples])
                                       for family in self.registry.collect()]}

    def set_peers(self, peers: dict[str, Snapshot]) -> None:
        """The other replicas' latest snapshots, by replica name (this one's own is ignored: it is exposed live),
        exposed for PEERS_TTL_S after they arrived, and while taken within it: a peer's frozen counters shown beside its
        live ones (a scrape reaches either replica) while the coordinator does not answer, or one it kept from a
        replica whose exchange stalled (for up to 30 s: a review), are left out."""
        self._peers = {name: snapshot for name, snapshot in peers.items() if name != self.replica}
        self._peers_at = time.monotonic()

    def start_request(self) -> RequestTimer:
        return RequestTimer(self)

    def _on_step(self, stats: StepStats) -> None:
        self.step.observe(stats.seconds)
        for name, counter in self._follows.items():
            value = getattr(self._engine, name)
            if value > self._counted[name]:
                counter.inc(value - self._counted[name])
                self._counted[name] = value


class _Exposition:
    """What `generate_latest` renders for a ServingMetrics (a collector registry's interface: ``collect``)."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self._metrics = metrics

    def collect(self):
        metrics = self._metrics
        if metrics.replica is None:
            yield from metrics.registry.collect()
        else:
            families: dict[str, Metric] = {}
            fresh = time.monotonic() - metrics._peers_at <= PEERS_TTL_S
            peers = sorted(metrics._peers.items()) if fresh else []
            now = time.time()
            for replica, snapshot in ((metrics.replica, metrics.snapshot()), *peers):
                at, taken = (snapshot["at"], snapshot["families"]) if isinstance(snapshot, dict) else (None, snapshot)
                if at is not None and now - at > PEERS_TTL_S:
                    continue
                for name, kind, help_text, unit, samples in taken:
                    family = families.setdefault(name, Metric(name, help_text, kind, unit))
                    for sample, labels, value in samples:
                        family.add_sample(sample, {**labels, "replica": replica}, value, timestamp=at)
            yield from families.values()
        for collector in metrics._shared:
            yield from collector.collect()


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
