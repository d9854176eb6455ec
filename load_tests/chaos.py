"""Fault scenarios against the real Serve app: what breaks, how fast it is noticed, how fast service is back.

Starts the app in this process's own Ray cluster (`build_app`, emulated devices, an ephemeral HTTP port,
a random admin token), drives it with streaming clients over HTTP, and runs, in order:

- **fuzz**: the hostile corpus of `load_tests.fuzz_cases` while good streams run;
- **overload**: a burst of more clients than the engine admits: 429 with Retry-After, nothing hangs,
  and a request too long for the per-request timeout is aborted with a 504;
- **worker_death**: `ray.kill` of an expert worker actor while streams run: the coordinator's detection
  and re-placement, the requests that fail (the engines retry steps that failed on the dead device for
  `step_retry_s`, so none should: their streams stall), the longest stall, and when service is whole again
  (the restarted worker readmitted);
- **worker_hang**: the admin fault "hang" on an expert worker while streams run (its expert calls block,
  its process answers probes: a hung GPU): the engines' data-plane timeout, their report, the coordinator's
  one-token call that finds it hung, the re-placement, the stall clients see and the restarted worker's
  return;
- **worker_error**: the admin fault "error" on an expert worker while streams run (every expert call answers
  with an error, its process answers probes: a GPU after a sticky CUDA error): the engines' report of the
  failing device, the coordinator's one-token call that finds it broken, the re-placement and the restart;
- **coordinator_restart**: `ray.kill` of the coordinator's Serve replica; Serve restarts it, it recovers
  the placement from the workers, and the engines serve throughout.

Prints one row per scenario and ends with ``chaos scenarios=<n> hung=<n> failed_5xx=<n> unrecovered=<n>
max_recovery_s=<x>`` (unrecovered: a fault whose loss and return the coordinator's records never showed, or a scenario
that raised; the others run on, each after the app is whole again); writes ``<out>/chaos.json`` and
``<out>/chaos.png``, and exits 1 when a request hung or failed with a 5xx or a fault went unrecovered. A request is
hung after HUNG_AFTER_S without a byte (or 3x that without an end); an answer with fewer tokens than it asked for
(`ignore_eos`) failed. Serves the embedded model (``--model``: another
local checkpoint folder).

    python -m load_tests.chaos --out bench        # `make chaos`
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deploy.app import DEFAULT_MODEL, DEFAULT_PROFILE_PROMPTS
from load_tests.compare import serve_apps
from load_tests.fuzz_cases import cases, send
from load_tests.slo import percentiles

log = logging.getLogger(__name__)

HUNG_AFTER_S = 90.0  # a request without an answer for this long is hung (the server's own limit is lower)
REQUEST_TIMEOUT_S = 30.0  # the app's per-request limit here: above every scenario request but the probe


# --- the app ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class App:
    """A running Serve app: its URL, admin token, served model name and app arguments."""

    url: str
    token: str
    model: str
    args: dict[str, Any]
    model_note: str

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextlib.contextmanager
def running_app(num_devices: int, *, model: Path | None = None, **overrides: Any) -> Iterator[App]:
    """The app on a fresh local Ray cluster (Serve app "vibe" at `/`, ephemeral port), once /health answers
    200; Serve and Ray are shut down on exit, also when the start fails. `model`: a checkpoint folder
    (default: the embedded model, calibrated with its profile prompts)."""
    model = Path(model) if model is not None else DEFAULT_MODEL
    note = "embedded vibe-tiny-moe" if model == DEFAULT_MODEL else str(model)
    token = secrets.token_urlsafe(24)
    args = {"model": str(model), "model_roots": [str(model.parent)], "num_devices": num_devices,
            "speeds": [1.0 - 0.04 * i for i in range(num_devices)], "app_name": "chaos", "admin_token": token,
            "emulation": {"fixed_s": 4e-4, "knee_tokens": 128, "jitter": 0.02, "throttle_floor": 1.0},
            "max_num_seqs": 16, "max_queue": 32, "request_timeout_s": REQUEST_TIMEOUT_S,
            "profile_prompts": str(DEFAULT_PROFILE_PROMPTS) if model == DEFAULT_MODEL else None,
            **overrides}
    with serve_apps({"vibe": args}, at_root=True, ready_timeout_s=300) as (bases, _):
        public = {k: v for k, v in args.items() if k != "admin_token"}
        yield App(bases["vibe"], token, model.name, public, note)


def wait_recovered(app: App, timeout_s: float) -> None:
    """Until the app is healthy ("ok", not degraded) and the coordinator has no lost device, so a scenario does not
    start on the last one's damage (at most `timeout_s`; a warning after)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{app.url}/health", timeout=5)
            stats = admin(app, "GET", "/admin/stats", timeout_s=10)
            if (health.status_code == 200 and health.json().get("status") == "ok" and stats.status_code == 200
                    and not stats.json().get("lost_devices")):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    log.warning("the app did not recover within %.0f s: the next scenario starts on it as it is", timeout_s)


def wait_healthy(url: str, timeout_s: float) -> float:
    """Seconds until /health answers 200 (TimeoutError after `timeout_s`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def admin(app: App, method: str, path: str, timeout_s: float = 30, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{app.url}{path}", headers=app.admin_headers, timeout=timeout_s, **kwargs)


# --- traffic ---------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request: monotonic start and end, outcome ('ok', 'http_<status>', 'stream_<code>', 'hung',
    'transport_<error>'), whether it failed with a server-side (5xx-class) error, tokens received, and the
    longest wait for the next data event (the first one's from the start: a stall a client saw)."""

    started: float
    ended: float
    outcome: str
    server_error: bool = False
    tokens: int = 0
    retry_after: str | None = None
    longest_wait_s: float = 0.0
    expected_tokens: int = 0  # fewer in an answer that ended is a failure ("short")

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


_STREAM_5XX_TYPES = ("server_error", "service_unavailable_error", "timeout_error")
_STREAM_LIMIT_S = 3 * HUNG_AFTER_S  # a stream sending bytes for this long without ending is hung


def stream_request(url: str, body: dict) -> RequestRecord:
    """One streaming chat completion; never raises."""
    started = time.monotonic()
    record = RequestRecord(started, started, "ok", expected_tokens=body.get("max_tokens", 0) if body.get("ignore_eos")
                           else 0)
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                          timeout=httpx.Timeout(HUNG_AFTER_S, connect=10)) as response:
            if response.status_code != 200:
                response.read()
                record.outcome, record.server_error = f"http_{response.status_code}", response.status_code >= 500
                record.retry_after = response.headers.get("retry-after")
            else:
                _read_stream(response, record)
    except httpx.ConnectTimeout:
        record.outcome, record.server_error = "transport_ConnectTimeout", True
    except httpx.TimeoutException:  # no byte for HUNG_AFTER_S
        record.outcome, record.server_error = "hung", False
    except httpx.HTTPError as exc:
        record.outcome, record.server_error = f"transport_{type(exc).__name__}", True
    except Exception as exc:  # noqa: BLE001 - a chunk of a shape no check foresaw: the server's failure, recorded
        record.outcome, record.server_error = f"stream_malformed_{type(exc).__name__}", True
    record.ended = time.monotonic()
    return record


def _read_stream(response: httpx.Response, record: RequestRecord) -> None:
    """Reads the SSE stream into `record`: an error event, a malformed chunk, or an end without
    `data: [DONE]` is a failure (server-side), never "ok"."""
    last = record.started
    for line in response.iter_lines():
        now = time.monotonic()
        if now - record.started > _STREAM_LIMIT_S:  # bytes, but no end (keep-alive lines only, say): hung all the same
            record.outcome, record.server_error = "hung", False
            return
        record.longest_wait_s, last = max(record.longest_wait_s, now - last), now
        if line == "data: [DONE]":
            if record.tokens < record.expected_tokens:  # (ignore_eos: every request asks for this many)
                record.outcome = f"short_{record.tokens}_of_{record.expected_tokens}"
            return
        if not line.startswith("data: {"):
            continue
        try:
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                error = chunk["error"]
                record.outcome = f"stream_{error.get('code') or error.get('type')}"
                record.server_error = error.get("type") in _STREAM_5XX_TYPES
                return
            record.tokens += sum(bool(c.get("delta", {}).get("content")) for c in chunk.get("choices", []))
            if chunk.get("usage"):  # (stream_options include_usage: the tokens, where chunks may hold several)
                record.tokens = max(record.tokens, chunk["usage"].get("completion_tokens", 0))
        except (ValueError, TypeError, AttributeError):  # not JSON, or not a chunk's shape ({"choices": null})
            record.outcome, record.server_error = "stream_malformed", True
            return
    record.outcome, record.server_error = "stream_truncated", True


def chat_body(model: str, i: int, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": f"Tell me about topic number {i}."}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


class HealthWatch:
    """Polls /health every `interval_s` while open; counts answers ("ok", "degraded", "http_<status>", ...)."""

    def __init__(self, url: str, interval_s: float = 0.5) -> None:
        self.url, self.interval_s = url, interval_s
        self.answers: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(30)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                response = httpx.get(f"{self.url}/health", timeout=10)
                answer = response.json().get("status", "?") if response.status_code == 200 else \
                    f"http_{response.status_code}"
            except (httpx.HTTPError, ValueError) as exc:
                answer = type(exc).__name__
            self.answers.append(answer)


class Traffic:
    """`concurrency` closed-loop clients, each sending the next request when its last one ends."""

    def __init__(self, url: str, model: str, concurrency: int, max_tokens: int,
                 send: Callable[[str, dict], RequestRecord] = stream_request) -> None:
        self.url, self.model, self.max_tokens, self._send = url, model, max_tokens, send
        self.records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(concurrency)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(HUNG_AFTER_S + 30)
        now = time.monotonic()
        with self._lock:  # a client still waiting then is on a request that never ended: recorded as hung
            self.records += [RequestRecord(now, now, "hung") for thread in self._threads if thread.is_alive()]

    def _client(self, index: int) -> None:
        i = index
        while not self._stop.is_set():
            record = self._send(self.url, chat_body(self.model, i, self.max_tokens))
            with self._lock:
                self.records.append(record)
            i += len(self._threads)
            if record.retry_after is not None:  # as the OpenAI client does after a 429
                self._stop.wait(float(record.retry_after))


# --- scenarios -------------------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    """One fault: detection and recovery seconds after it (None where it does not apply), the requests
    sent meanwhile, those that failed (of which with a 5xx-class error) and those that hung."""

    fault: str
    detection_s: float | None
    recovery_s: float | None
    requests: int
    failed: int
    failed_5xx: int
    hung: int
    detail: dict[str, Any] = field(default_factory=dict)
    timeline: list[tuple[float, float, str]] = field(default_factory=list)
    unrecovered: bool = False  # the fault was not seen to take effect and be recovered from (or the scenario failed)


def _summary(fault: str, records: list[RequestRecord], t0: float, detection_s, recovery_s, **detail) -> ScenarioResult:
    failed = [r for r in records if not r.ok]
    return ScenarioResult(fault, detection_s, recovery_s, len(records), len(failed),
                          sum(r.server_error for r in failed), sum(r.outcome == "hung" for r in records),
                          {"outcomes": _count(r.outcome for r in records), **detail},
                          [(round(r.started - t0, 3), round(r.ended - t0, 3), r.outcome) for r in records])


def _count(items) -> dict[str, int]:
    return dict(collections.Counter(items))


def run_fuzz(app: App) -> ScenarioResult:
    """The hostile corpus, sequentially, while three good streams run."""
    corpus = cases(app.model)
    t0 = time.monotonic()
    with Traffic(app.url, app.model, 3, 24) as good:
        outcomes = [send(app.url, case, timeout_s=HUNG_AFTER_S) for case in corpus]
    healthy = httpx.get(f"{app.url}/health", timeout=10).status_code == 200
    result = _summary("fuzz", good.records, t0, None, None, cases=len(corpus), healthy_after=healthy,
                      case_problems={o.case: o.problem for o in outcomes if not o.ok},
                      case_statuses=_count(str(o.status) for o in outcomes))
    result.failed += sum(not o.ok for o in outcomes)
    result.failed_5xx += sum(o.server_error for o in outcomes)
    result.hung += sum(o.hung for o in outcomes)
    return result


def run_overload(app: App, clients: int = 96, seconds: float = 45.0) -> ScenarioResult:
    """More closed-loop clients (honouring Retry-After) than max_num_seqs + max_queue admit, and one
    request, admitted just before the burst, too long to finish within the timeout under it: it must
    end in a 504, not run on."""
    long_body = {**chat_body(app.model, 0, 900), "stream": False}
    del long_body["stream_options"]  # (a 400 without a stream: the long request was never sent as meant)
    too_long: dict = {}
    probe = threading.Thread(target=lambda: too_long.update(_timed_post(app.url, long_body)))
    t0 = time.monotonic()
    probe.start()
    time.sleep(1)
    with HealthWatch(app.url) as health, Traffic(app.url, app.model, clients, 32) as burst:
        time.sleep(seconds)
    probe.join(HUNG_AFTER_S)
    records = burst.records
    rejected = [r for r in records if r.outcome == "http_429"]
    latencies = sorted(r.ended - r.started for r in records if r.ok)
    result = _summary("overload", records, t0, None, None, clients=clients,
                      rejected_429=len(rejected),
                      rejected_with_retry_after=sum(r.retry_after is not None for r in rejected),
                      accepted=len(latencies), **_seconds(percentiles(latencies, (50, 99)), "accepted_latency"),
                      slowest_429_s=max((r.ended - r.started for r in rejected), default=None),
                      long_request=too_long, health=_count(health.answers))
    # A 429 is the bounded admission working, not a failure.
    result.failed -= len(rejected)
    # the long request must end in a 504 (it was only recorded: one that ran on, or never answered, passed)
    if too_long.get("status") != 504 or too_long.get("code") != "request_timeout":
        result.failed += 1
        result.hung += too_long.get("status") is None
    return result


def _seconds(quantiles: dict[str, float | None], prefix: str) -> dict[str, float | None]:
    """{"p50": x} from `slo.percentiles` -> {"<prefix>_p50_s": x rounded to ms}."""
    return {f"{prefix}_{q}_s": None if v is None else round(v, 3) for q, v in quantiles.items()}


def _timed_post(url: str, body: dict) -> dict:
    started = time.monotonic()
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=HUNG_AFTER_S)
        error = response.json().get("error", {}) if response.status_code != 200 else {}
        return {"status": response.status_code, "code": error.get("code"), "message": error.get("message"),
                "retry_after": response.headers.get("retry-after"), "seconds": round(time.monotonic() - started, 2)}
    except httpx.HTTPError as exc:
        return {"status": None, "error": repr(exc), "seconds": round(time.monotonic() - started, 2)}


def run_worker_death(app: App, device: int = 1, concurrency: int = 8) -> ScenarioResult:
    """Kill an expert worker actor under load; follow the coordinator until the restarted one rejoins."""
    import ray

    actor = _worker_actor(device)
    return _worker_fault(app, "worker_death", device, concurrency, lambda: ray.kill(actor), 90)


def run_worker_hang(app: App, device: int = 2, concurrency: int = 8) -> ScenarioResult:
    """Hang an expert worker under load (admin fault "hang": its expert calls block while its process answers
    probes, as a hung GPU); follow the coordinator until the restarted one rejoins."""
    fault = {"device": device, "operation": "hang"}
    return _worker_fault(app, "worker_hang", device, concurrency,
                         lambda: admin(app, "POST", "/admin/emulation/fault", json=fault).raise_for_status(), 120)


def run_worker_error(app: App, device: int = 3, concurrency: int = 8) -> ScenarioResult:
    """Make every expert call of a worker fail under load (admin fault "error", as a GPU after a sticky CUDA error:
    its process answers probes); follow the coordinator until the restarted one rejoins."""
    fault = {"device": device, "operation": "error"}
    return _worker_fault(app, "worker_error", device, concurrency,
                         lambda: admin(app, "POST", "/admin/emulation/fault", json=fault).raise_for_status(), 120)


def _worker_fault(app: App, name: str, device: int, concurrency: int, inject: Callable[[], object],
                  timeout_s: float) -> ScenarioResult:
    """``inject()`` a fault into ``device`` while streams run; follow the coordinator's records of the device
    lost and rejoined (at most ``timeout_s``)."""
    before = admin(app, "GET", "/admin/placement").json()["version"]
    with HealthWatch(app.url) as health, Traffic(app.url, app.model, concurrency, 64) as traffic:
        time.sleep(5)
        t0, wall0 = time.monotonic(), time.time()
        inject()
        lost, rejoined = _wait_history(app, device, wall0, timeout_s)
        time.sleep(5)
    records = [r for r in traffic.records if r.ended >= t0]
    detection = None if lost is None else lost["started_at"] - wall0
    rejoin = None if rejoined is None else rejoined["started_at"] + rejoined["duration_s"] - wall0
    failed = [r for r in records if not r.ok]
    result = _summary(name, records, t0, detection, rejoin,
                    device=device, placement_version_before=before, health=_count(health.answers),
                    replaced_s=None if lost is None else lost["started_at"] + lost["duration_s"] - wall0,
                    replace_status=None if lost is None else lost["status"],
                    rejoin_status=None if rejoined is None else rejoined["status"],
                    restarted_worker_ready_s=None if rejoined is None else rejoined["started_at"] - wall0,
                    rejoin_migration_s=None if rejoined is None else rejoined["duration_s"],
                    answering_again_s=_answering_again(records, t0),
                    last_failure_s=max((r.ended - t0 for r in failed), default=None),
                    slowest_failure_s=max((r.ended - r.started for r in failed), default=None),
                    longest_stall_s=round(max((r.longest_wait_s for r in records), default=0.0), 3))
    result.unrecovered = lost is None or rejoined is None  # (a fault never seen reported nothing wrong)
    return result


def _worker_actor(device: int):
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "vibe" and a["name"].startswith("vibe-worker-chaos-")
             and a["name"].endswith(f"-{device}")]
    if len(names) != 1:
        raise RuntimeError(f"expected one worker actor for device {device}, found {names}")
    return ray.get_actor(names[0]["name"], namespace="vibe")


def _wait_history(app: App, device: int, since: float, timeout_s: float) -> tuple[dict | None, dict | None]:
    """The coordinator's first records, begun at wall-clock `since` or later, of `device` lost (re-placed: not failed)
    and then rejoined (applied, or no change: a rejoin rolled back is not one), within `timeout_s` (None if absent).
    Reasons name one device or several ("devices 1, 2 lost")."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and "rejoined" not in found:
        try:
            history = admin(app, "GET", "/admin/stats", timeout_s=10).json()["recalibrations"]
        except (httpx.HTTPError, KeyError, ValueError):
            history = []
        for record in history:
            event = _device_event(record["reason"], device)
            good = ("applied", "no_change") if event == "rejoined" else ("applied",)
            begun = record["started_at"] >= since - 1.0  # (1 s: clock steps)
            if event and begun and record["status"] in good and (event == "lost" or "lost" in found):
                found.setdefault(event, record)
        time.sleep(0.25)
    return found.get("lost"), found.get("rejoined")


def _device_event(reason: str, device: int) -> str | None:
    """"lost" or "rejoined" when a record's reason says so of `device` (one of the devices it names), else None."""
    match = re.fullmatch(r"devices? ([\d, ]+) (lost|rejoined)", reason)
    return match[2] if match and device in {int(d) for d in match[1].split(",")} else None


def _answering_again(records: list[RequestRecord], t0: float) -> float | None:
    """Seconds after t0 from which every request started succeeded (None if the last one failed); requests started
    before t0 left out (one of them failing after it made this negative)."""
    records = [r for r in records if r.started >= t0]
    last_failed = max((r.started for r in records if not r.ok), default=None)
    if last_failed is None:
        return 0.0
    later = [r.started for r in records if r.started > last_failed]
    return round(min(later) - t0, 3) if later else None


def run_coordinator_restart(app: App, concurrency: int = 8) -> ScenarioResult:
    """Kill the coordinator's replica actor; Serve restarts it; engines must serve throughout."""
    import ray

    with HealthWatch(app.url) as health, Traffic(app.url, app.model, concurrency, 64) as traffic:
        time.sleep(5)
        # (the version in force at the kill: a drift re-plan during the 5 s of traffic moves it, and was read as a
        # placement not recovered)
        before = admin(app, "GET", "/admin/placement").json()["version"]
        old = _coordinator_replica()
        t0 = time.monotonic()
        ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)
        replaced = _wait_for(lambda: (_coordinator_replica() or old) != old, 120)
        recovered, version = _wait_admin_answers(app, 180)
        time.sleep(5)
    records = [r for r in traffic.records if r.ended >= t0]
    result = _summary("coordinator_restart", records, t0, None if replaced is None else replaced - t0,
                      None if recovered is None else recovered - t0, placement_version_before=before,
                      placement_version_after=version, recovered_from_workers=version == before,
                      health=_count(health.answers))
    result.unrecovered = replaced is None or recovered is None
    return result


def _coordinator_replica() -> str | None:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "#Coordinator#" in a["name"]]
    return names[0] if len(names) == 1 else None


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> float | None:
    """Monotonic time at which `condition()` first held (polled every 0.2 s), None after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.2)
    return None


def _wait_admin_answers(app: App, timeout_s: float) -> tuple[float | None, int | None]:
    """When the coordinator answers /admin/placement again, and the version it serves."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = admin(app, "GET", "/admin/placement", timeout_s=5)
            if response.status_code == 200:
                return time.monotonic(), response.json()["version"]
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return None, None


SCENARIOS: dict[str, Callable[[App], ScenarioResult]] = {
    "fuzz": run_fuzz, "overload": run_overload, "worker_death": run_worker_death, "worker_hang": run_worker_hang,
    "worker_error": run_worker_error, "coordinator_restart": run_coordinator_restart,
}


# --- report ----------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(results: list[ScenarioResult]) -> str:
    header = f"{'fault':<22}{'detection_s':>12}{'recovery_s':>12}{'requests':>10}{'failed':>8}{'of_5xx':>8}{'hung':>6}"
    rows = [header] + [f"{r.fault:<22}{_fmt(r.detection_s):>12}{_fmt(r.recovery_s):>12}{r.requests:>10}"
                       f"{r.failed:>8}{r.failed_5xx:>8}{r.hung:>6}" for r in results]
    recoveries = [r.recovery_s for r in results if r.recovery_s is not None]
    rows.append(f"chaos scenarios={len(results)} hung={sum(r.hung for r in results)} "
                f"failed_5xx={sum(r.failed_5xx for r in results)} "
                f"unrecovered={sum(r.unrecovered for r in results)} "
                f"max_recovery_s={max(recoveries) if recoveries else 0.0:.2f}")
    text = "\n".join(rows)
    print(text)
    return text


def plot(results: list[ScenarioResult], path: Path) -> None:
    """Request latency against start time (seconds after the fault) per scenario, coloured by outcome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
    for ax, result in zip(axes[0], results):
        for outcome in sorted({o for *_, o in result.timeline}):
            points = [(s, e - s) for s, e, o in result.timeline if o == outcome]
            ax.scatter(*zip(*points), s=6, label=outcome)
        ax.set_title(result.fault)
        ax.set_xlabel("request start (s after the fault)")
        ax.set_ylabel("latency (s)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: embedded model)")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = []
    with running_app(args.devices, model=args.model) as app:
        startup_s = time.monotonic() - started
        print(f"app up in {startup_s:.1f} s at {app.url} ({app.model_note})", flush=True)
        for name in args.scenarios:
            try:
                results.append(SCENARIOS[name](app))
            except Exception as exc:  # the others still run, and the report is written (one error lost them all)
                log.exception("scenario %s failed", name)
                results.append(ScenarioResult(name, None, None, 0, 0, 0, 0, {"error": repr(exc)}, unrecovered=True))
            print(f"{name}: {results[-1].detail}", flush=True)
            wait_recovered(app, 180)
    table = print_table(results)
    report = {"app": app.args, "model": app.model_note, "startup_s": round(startup_s, 1), "table": table,
              "scenarios": [asdict(r) for r in results]}
    (args.out / "chaos.json").write_text(json.dumps(report, indent=1, default=str))
    plot(results, args.out / "chaos.png")
    if any(r.unrecovered or r.hung or r.failed_5xx for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
