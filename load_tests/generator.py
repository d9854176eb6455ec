"""The open-loop load generator: seeded Poisson request traces, sent with the official `openai` client.

Owns the request trace (arrival times, prompt choice and max_tokens, reproducible from a seed), sending
it as streamed chat completions at the scheduled times, per-request timing (TTFT: first non-empty
content chunk; E2E; output tokens from `stream_options.include_usage`; failures), and polling the admin
API (`/admin/stats`) and `/metrics` while a trace runs. Ignores SLOs and summaries (see `slo`), plots and
how the service was started.

    trace = make_trace(TraceConfig(rate_rps=2.0, duration_s=60, seed=0), load_workloads(["sharegpt_like"]))
    run = asyncio.run(run_trace(ClientConfig(base_url="http://127.0.0.1:8000", model="vibe-tiny-moe"), trace))
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

import httpx
import numpy as np
import openai
from tqdm import tqdm

from load_tests.workloads import Prompt

# Streams of the trace's random generator: arrivals and prompt choice never share draws, so one seed gives
# the same prompts at every rate. Arrivals are drawn given their count (make_trace): one seed gives the same
# pattern, scaled to the duration, only to traces of the same count (rate x duration); other counts draw other
# patterns, not this one scaled by 1 / rate.
_ARRIVALS, _CHOICES = 0, 1


@dataclass(frozen=True)
class TraceConfig:
    """A Poisson request trace.

    Attributes:
        rate_rps: mean arrivals per second (> 0).
        duration_s: arrivals fall in [0, duration_s) seconds (> 0).
        phases: ((start_s, workload names), ...) with start_s strictly increasing from 0: a request
            arriving at t draws its prompt uniformly from the sets of the last phase started by t.
        seed: seeds arrivals and prompt choice.
        max_tokens_cap: upper bound on each request's max_tokens (None: the workload's value).
    """

    rate_rps: float
    duration_s: float
    phases: tuple[tuple[float, tuple[str, ...]], ...] = ((0.0, ("sharegpt_like",)),)
    seed: int = 0
    max_tokens_cap: int | None = None

    def __post_init__(self) -> None:
        if not (np.isfinite(self.rate_rps) and self.rate_rps > 0):
            raise ValueError(f"rate_rps must be finite and > 0, got {self.rate_rps!r}")
        if not (np.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration_s must be finite and > 0, got {self.duration_s!r}")
        starts = [start for start, _ in self.phases]
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"phases must start at 0 with strictly increasing start times, got {starts}")
        if any(not names for _, names in self.phases):
            raise ValueError(f"every phase needs at least one workload, got {self.phases}")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap must be >= 1 or None, got {self.max_tokens_cap!r}")

    @property
    def workloads(self) -> tuple[str, ...]:
        """Every workload name the phases use, in first-use order."""
        return tuple(dict.fromkeys(name for _, names in self.phases for name in names))


@dataclass(frozen=True)
class RequestSpec:
    """One request of a trace: when it is sent (seconds after the trace starts), which prompt, how long."""

    index: int
    arrival_s: float
    prompt: Prompt
    max_tokens: int


def trace_requests(rate: float, duration_s: float) -> int:
    """Requests in a trace of `rate` over `duration_s`: round(rate x duration), as `make_trace` sends them."""
    return int(round(rate * duration_s))


def offered_rate(rate: float, duration_s: float) -> float:
    """The rate a trace of `rate` over `duration_s` offers: its requests over the duration (the frontier's scale)."""
    return trace_requests(rate, duration_s) / duration_s


def make_trace(config: TraceConfig, prompts: dict[str, list[Prompt]]) -> list[RequestSpec]:
    """The requests of `config`, in arrival order; `prompts` must hold every set the phases name."""
    if missing := [name for name in config.workloads if not prompts.get(name)]:
        raise ValueError(f"no prompts for workload(s) {missing}")
    arrivals_rng, choices_rng = (np.random.default_rng([config.seed, stream]) for stream in (_ARRIVALS, _CHOICES))
    # A Poisson process given its count: round(rate x duration) arrivals, spread as the first N points of a unit
    # Poisson process over the (N + 1)-th (the order statistics of N uniforms on the run). Scaling one unbounded
    # pattern to each rate instead sent, for seed 0, 11-13% fewer requests than every rate's label at once.
    count = trace_requests(config.rate_rps, config.duration_s)
    unit = np.cumsum(arrivals_rng.exponential(1.0, count + 1))
    arrivals = unit[:count] / unit[count] * config.duration_s
    starts = np.array([start for start, _ in config.phases])
    trace = []
    for index, arrival in enumerate(arrivals):
        names = config.phases[int(np.searchsorted(starts, arrival, side="right")) - 1][1]
        pool = [p for name in names for p in prompts[name]]
        prompt = pool[int(choices_rng.integers(len(pool)))]
        max_tokens = min(prompt.max_tokens, config.max_tokens_cap or prompt.max_tokens)
        trace.append(RequestSpec(index, float(arrival), prompt, max_tokens))
    return trace


@dataclass(frozen=True)
class RequestResult:
    """What one request measured; times in seconds, `sent_s` after the trace started.

    `ttft_s`: first non-empty content chunk, `e2e_s`: end of the stream, both from the request's scheduled
    arrival in a trace (a client late to send it, its event loop busy, is charged the delay: no coordinated
    omission; `sent_s` minus the arrival is that lag), from its sending otherwise; `output_tokens`: from the usage
    chunk (0 without one). `error` names the failure (None when the request completed).
    """

    index: int
    workload: str
    sent_s: float
    ttft_s: float | None
    e2e_s: float | None
    prompt_tokens: int
    output_tokens: int
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); None for a failed request or one with a single token."""
        if self.error is not None or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class ClientConfig:
    """How the trace is sent.

    Attributes:
        base_url: the service root, e.g. "http://127.0.0.1:8000" (the OpenAI API is under /v1).
        model: served model name.
        request_timeout_s: a request still running this long after it was sent fails ("timeout").
        drain_s: after the last arrival, requests still running this much later are cancelled
            ("cutoff"); bounds a run that overloads the service.
        ignore_eos: vLLM's extension: generate exactly max_tokens tokens (the trace fixes the load).
        temperature: 0 is greedy (same tokens, hence the same routing, under every placement).
        admin_token: bearer token for /admin/stats polling (None: no polling).
        poll_interval_s: seconds between /admin/stats polls.
    """

    base_url: str
    model: str
    request_timeout_s: float = 300.0
    drain_s: float = 120.0
    ignore_eos: bool = True
    temperature: float = 0.0
    admin_token: str | None = None
    poll_interval_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("request_timeout_s", "drain_s", "poll_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ClientConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.temperature < 0:
            raise ValueError(f"ClientConfig.temperature must be >= 0, got {self.temperature!r}")


@dataclass
class RunRecord:
    """One trace sent: per-request results, admin polls and the server's step-time counters.

    Attributes:
        started_wall: time.time() when the trace started (maps admin `started_at` stamps to run time).
        duration_s: from the trace's start until the last request ended or was cut off.
        results: one per request, in index order.
        polls: {"t": seconds after start, "version", "imbalance_per_layer", "devices"} per /admin/stats poll:
            every `poll_interval_s` from the first interval on (a poll at the start would read only the
            statistics window of what ran before; the first few still read part of it, for as long as the
            coordinator's window, `drift_window` passes, takes to fill), and one after the run.
        recalibrations: every recalibration record the polls saw that started during the run (deduplicated),
            without its moves.
        step_seconds: {"sum", "count"} of the engine step-time histogram over the run (from /metrics); empty
            when /metrics could not be read before or after the run (said in `notes`).
        events: {"name", "t"} of every scheduled event, `t` when it completed (seconds after start); an event
            whose action raised also has "error" (what it raised), `t` when it failed.
        notes: what could not be observed (a failed /metrics scrape), without costing the run's results.
    """

    started_wall: float
    duration_s: float = 0.0
    results: list[RequestResult] = field(default_factory=list)
    polls: list[dict] = field(default_factory=list)
    recalibrations: list[dict] = field(default_factory=list)
    step_seconds: dict[str, float] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class TraceClock:
    """One start for the traces of several apps sent side by side (`run_trace`'s ``clock``): each waits, after its
    own warm-up and /metrics scrape, until every one is ready, and all take the same start. Each app's trace began
    when its own warm-up ended: up to 107 ms (half an engine step) apart in the committed comparison, the app listed
    first the last to start in 6 of its 7 runs (a review)."""

    def __init__(self, parties: int) -> None:
        self._barrier = asyncio.Barrier(parties)
        self._start: tuple[float, float] | None = None

    async def start(self) -> tuple[float, float]:
        """(time.monotonic(), time.time()) of the common start, once every party is ready."""
        await self._barrier.wait()
        if self._start is None:
            self._start = (time.monotonic(), time.time())
        return self._start

    async def fail(self) -> None:
        """A party that cannot start: the others' waits raise (asyncio.BrokenBarrierError) instead of hanging."""
        await self._barrier.abort()


async def run_trace(config: ClientConfig, trace: list[RequestSpec], *, desc: str = "requests",
                    progress: bool = True, events: Sequence[Event] = (), clock: TraceClock | None = None) -> RunRecord:
    """Send every request of `trace` at its arrival time, wait for all (or the cutoff), return the record.

    `events` run at their times during the trace (e.g. an admin call that throttles a device); runs of one
    `clock` start their traces together (after every one's warm-up)."""
    if not trace:
        raise ValueError("the trace has no requests (raise the rate or the duration)")
    client = openai.AsyncOpenAI(base_url=f"{config.base_url}/v1", api_key="unused", max_retries=0,
                                timeout=config.request_timeout_s)
    poller = None
    try:
        async with httpx.AsyncClient(base_url=config.base_url, timeout=30) as http:
            notes: list[str] = []
            try:
                await warm_up(client, config, trace[0])
                steps_before = await _scrape_noted(http, notes, "before")
            except BaseException:
                if clock is not None:
                    await clock.fail()
                raise
            start, wall = await clock.start() if clock is not None else (time.monotonic(), time.time())
            record = RunRecord(started_wall=wall, notes=notes)
            bar = tqdm(total=len(trace), desc=desc, unit="req", disable=not progress, leave=False)
            poller = asyncio.create_task(_poll_admin(http, config, record, start))
            tasks = [asyncio.create_task(_send_at(client, config, spec, start, bar)) for spec in trace]
            scheduled = [asyncio.create_task(_run_event(event, start, record)) for event in events]
            done, pending = await asyncio.wait(tasks, timeout=trace[-1].arrival_s + config.drain_s)
            for task in pending:
                task.cancel()
            results = [t.result() if t in done else None for t in tasks]
            record.duration_s = time.monotonic() - start
            record.results = [r if r is not None else _cut_off(spec) for r, spec in zip(results, trace)]
            bar.close()
            await asyncio.gather(*scheduled)  # never raises: _run_event records a failed action
            await _stop(poller)
            await _poll_once(http, config, record, start)
            # A slow /metrics after an overloaded run costs the step times, not the measured requests
            steps_after = await _scrape_noted(http, record.notes, "after")
            if steps_before is not None and steps_after is not None:
                record.step_seconds = {k: steps_after[k] - steps_before[k] for k in steps_after}
    finally:  # also when the run raised: no poller left polling a closed client, no connections left open
        if poller is not None:
            await _stop(poller)
        await client.close()
    return record


async def _stop(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def warm_up(client: openai.AsyncOpenAI, config: ClientConfig, spec: RequestSpec) -> None:
    """One untimed 2-token request: the client's first stream pays one-off costs (a connection, building
    its response types) that would otherwise land on the first measured request's TTFT."""
    await send_request(client, config, replace(spec, max_tokens=2), time.monotonic())


@dataclass(frozen=True)
class Event:
    """Something to do `at_s` seconds into a trace: `action()` is awaited then, its end time recorded."""

    name: str
    at_s: float
    action: Callable[[], Awaitable[object]]


async def _run_event(event: Event, start: float, record: RunRecord) -> None:
    """Run one event at its time and record it. A failing action (e.g. drift's throttle POST answered with an
    error) is recorded with its error, never raised: raised, it surfaced only after every request had finished
    and made run_trace discard the run's measurements (an audit); the caller judges the run by its events."""
    await asyncio.sleep(max(0.0, start + event.at_s - time.monotonic()))
    try:
        await event.action()
    except Exception as exc:  # noqa: BLE001 - any failure of the action is the event's outcome, not the run's
        record.events.append({"name": event.name, "t": time.monotonic() - start,
                              "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
        return
    record.events.append({"name": event.name, "t": time.monotonic() - start})


def _cut_off(spec: RequestSpec) -> RequestResult:
    return RequestResult(spec.index, spec.prompt.workload, spec.arrival_s, None, None, 0, 0, "cutoff")


async def _send_at(client: openai.AsyncOpenAI, config: ClientConfig, spec: RequestSpec, start: float,
                   bar: tqdm) -> RequestResult:
    await asyncio.sleep(max(0.0, start + spec.arrival_s - time.monotonic()))
    result = await send_request(client, config, spec, start, arrival=start + spec.arrival_s)
    bar.update(1)
    return result


async def send_request(client: openai.AsyncOpenAI, config: ClientConfig, spec: RequestSpec,
                       start: float, arrival: float | None = None) -> RequestResult:
    """One streamed chat completion, timed from its scheduled `arrival` (time.monotonic(); None: from now); failures
    are recorded, never raised (any exception, as vLLM's benchmark_serving counts it: one malformed SSE chunk raising
    json.JSONDecodeError made run_trace raise and lose every result of the run, an audit). The whole request is
    bounded by `config.request_timeout_s` (the client's own timeout bounds each read only: a stream that keeps
    sending ran past it)."""
    sent = time.monotonic()
    origin = sent if arrival is None else min(arrival, sent)
    first = None
    usage = None
    try:
        async with asyncio.timeout(config.request_timeout_s):
            stream = await client.chat.completions.create(
                model=config.model, messages=list(spec.prompt.messages), max_tokens=spec.max_tokens,
                temperature=config.temperature, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": config.ignore_eos})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic()
                usage = chunk.usage or usage
    except Exception as exc:  # noqa: BLE001 - API and HTTP errors, timeouts, a malformed chunk: this request fails
        return RequestResult(spec.index, spec.prompt.workload, sent - start, None, None, 0, 0, _describe(exc))
    end = time.monotonic()
    error = None if usage is not None and first is not None else "incomplete stream (no content or no usage)"
    return RequestResult(spec.index, spec.prompt.workload, sent - start,
                         None if first is None else first - origin, end - origin,
                         usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0, error)


def _describe(exc: Exception) -> str:
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException | TimeoutError):
        return "timeout"
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__}" + (f" {status}" if status else "") + f": {str(exc)[:160]}"


# --- server-side observations ------------------------------------------------------------------------

def metric_total(text: str, name: str) -> float:
    """The sum of every sample named ``name`` in a /metrics text (over the ingress replicas' ``replica`` labels
    and any others; 0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name)


async def scrape_step_seconds(http: httpx.AsyncClient) -> dict[str, float]:
    """{"sum": seconds, "count": steps} of the engines' step-time histogram, from /metrics (zeros if absent)."""
    text = (await http.get("/metrics")).raise_for_status().text  # an error page would read as zero steps
    return {key: metric_total(text, f"vibe_engine_step_seconds_{key}") for key in ("sum", "count")}


async def _scrape_noted(http: httpx.AsyncClient, notes: list[str], when: str) -> dict[str, float] | None:
    """`scrape_step_seconds`, or None with a note added to `notes` when /metrics cannot be read."""
    try:
        return await scrape_step_seconds(http)
    except Exception as exc:  # noqa: BLE001 - an HTTP error, a timeout or a page that is not the metrics text
        notes.append(f"/metrics {when} the run: {type(exc).__name__}: {str(exc)[:160]} (no step times)")
        return None


async def fetch_admin(http: httpx.AsyncClient, token: str, path: str) -> dict:
    """GET an admin route as JSON; raises httpx.HTTPStatusError on a non-2xx answer."""
    response = await http.get(path, headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    return response.json()


async def _poll_admin(http: httpx.AsyncClient, config: ClientConfig, record: RunRecord, start: float) -> None:
    while config.admin_token is not None:  # first after an interval: at the start the window holds the run before
        await asyncio.sleep(config.poll_interval_s)
        await _poll_once(http, config, record, start)


async def _poll_once(http: httpx.AsyncClient, config: ClientConfig, record: RunRecord, start: float) -> None:
    if config.admin_token is None:
        return
    try:
        stats = await fetch_admin(http, config.admin_token, "/admin/stats")
        poll = {"t": time.monotonic() - start, "version": stats["placement_version"],
                "imbalance_per_layer": stats["imbalance_per_layer"],
                "devices": [d["observed_over_predicted"] for d in stats["devices"]]}
        seen = {(r["started_at"], r["reason"]) for r in record.recalibrations}
        new = [{k: v for k, v in r.items() if k != "moves"} for r in stats["recalibrations"]
               if (r["started_at"], r["reason"]) not in seen and r["started_at"] >= record.started_wall]
    except Exception:  # a slow or malformed answer under load costs one sample, not the run (as a request's error)
        return
    record.polls.append(poll)
    record.recalibrations += new
