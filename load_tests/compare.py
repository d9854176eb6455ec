"""The side-by-side benchmark: `python -m load_tests.compare --out bench --drift` (`make bench`).

Owns the experiment: one app per policy (`contiguous`, `eplb`, `vibe`), all started in one local Ray
cluster on the emulated cluster of `deploy/config.yaml` (by default: `--config` and `--set` build them from
another serve config's args, `--address` puts them on a running Ray cluster, see `serve_apps`); the same
seeded request trace sent to every app,
rate by rate; the SLOs (multiples of the unloaded latency measured in the same run); the rate sweep; the
run at `eplb`'s SLO frontier; `<out>/compare.json`, the plots, `<out>/report.md` and the one line per
policy printed last. Also owns starting apps for a load test (`serve_apps`), which `drift` reuses.
Ignores how requests are sent (`generator`) and how numbers are defined (`slo`).

All apps loaded at the same time (the default): at each rate every app gets the same trace at once, so
every policy sees the same background load from the other tenants of this shared machine and shares the
host's cores symmetrically; their emulated devices are separate. The cost: three engines and 24 emulated
devices on two cores make the CPU side of a step several times longer, so the MoE layers, the only part a
placement changes, are a few percent of it. One app at a time (`together=False`, `--one-at-a-time`: the order
rotated from rate to rate) gives each policy the cores to itself, as a deployment would, but then each
policy runs in a different minute of the host's load, and on this machine that swamps the placement: in
one such run eplb's mean engine step at 1.42 req/s was 75 ms against contiguous's 41 ms, measured two
minutes apart, with the same predicted MoE time per pass (7.3 ms). Use it on a dedicated machine. Deployed apart
(`deploy_apart`, `--deploy-one-at-a-time`), each app is also deployed only for its own turns, so a cluster needs
room for one app's devices, not every app's (`_run_apart`).

Sequence: start the apps one after another (each calibrates with its profiling pass); a warm-up trace to
every app (lets the adaptive policies re-place for the workload); unloaded requests, one at a time per app
(the pooled medians set the SLOs and the rate unit); the sweep from low to high rate; then every app at
eplb's frontier rate. Together, every app stays in the sweep until all are below `stop_below` (so the
contention stays the same for all); one at a time, a policy leaves it after a rate below `stop_below`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import httpx
import numpy as np
import yaml

from load_tests.generator import (
    ClientConfig,
    RequestResult,
    RunRecord,
    TraceClock,
    TraceConfig,
    fetch_admin,
    make_trace,
    metric_total,
    offered_rate,
    run_trace,
    send_request,
    trace_requests,
    warm_up,
)
from load_tests.slo import SLO, Frontier, frontier, single_stream_rate, summarize
from load_tests.workloads import load_workloads

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY_CONFIG = REPO_ROOT / "deploy" / "config.yaml"
# The apps' admin token, new in every process: on a cluster of the user's (`--address`) the benchmark's apps
# must not be open to a token anyone can read here.
ADMIN_TOKEN = f"load-test-{secrets.token_hex(16)}"
POLICY_ORDER = ("eplb", "contiguous", "vibe")
IDLE_TIMEOUT_S = 120.0  # after a run: the engine's own cut-off requests are aborted well within it
_RESULT_FIELDS = tuple(f.name for f in fields(RequestResult))


@dataclass(frozen=True)
class CompareConfig:
    """Everything the side-by-side benchmark decides with (every knob is recorded in the JSON).

    Attributes:
        policies: the apps (the first is started first).
        rates: swept request rates (req/s), ascending; None: `rate_multipliers` x the single-stream rate
            (`slo.single_stream_rate` of the pooled unloaded latency), so the sweep fits the machine.
        rate_multipliers: ascending, > 0; used when `rates` is None.
        duration_s: arrivals per swept rate span this many seconds.
        workloads: prompt sets the traces draw from (uniformly over their union).
        max_tokens_cap: upper bound on every request's max_tokens (None: the workload's own).
        seed: seed of every trace (the same trace per rate for every policy).
        warmup_rate, warmup_s: the warm-up trace (another seed), sent to every app at once.
        unloaded_requests, unloaded_max_tokens: requests sent one at a time to each app (to every app at
            once when `together`).
        ttft_factor, tpot_factor: SLO = factor x the median unloaded TTFT / TPOT, pooled over the apps.
        target: attainment the frontier asks for.
        together: load every app at the same time (True) or one app at a time, in an order rotated per
            rate (False); see the module docstring for why the default is True on a shared machine.
        deploy_apart: deploy each app only for its own turns (needs `together` False), so the cluster holds one
            app's devices at a time instead of every app's: each app deployed alone twice, once for its warm-up
            and unloaded latency (the SLOs pool every app's, as together) and once for its warm-up, its whole
            sweep and its run at eplb's frontier rate (eplb's turn first: its frontier sets that rate). For a
            cluster without room for every app at once; each policy then runs in a different stretch of time.
        stop_below: a policy leaves the sweep after a rate at which its attainment is below this (when
            `together`: the sweep ends once every policy's is).
        extend_factor, max_rates: while some policy still meets the target at the highest swept rate (its
            frontier would only be a lower bound), the sweep goes on at that rate x `extend_factor`, up to
            `max_rates` rates in all.
        drain_s: requests still running this long after a trace's last arrival are cut off (misses).
        deploy_config: the `serve run` config whose first application's `args:` every app starts from
            (deploy/config.yaml: the emulated cluster; a GPU cluster's own, such as deploy/config.gpu.yaml).
        app_args: build_app arguments of every app (over deploy_config's).
        policy_args: per-policy build_app arguments (e.g. redundant slots, slot budget).
    """

    policies: tuple[str, ...] = POLICY_ORDER
    rates: tuple[float, ...] | None = None
    rate_multipliers: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0)
    extend_factor: float = 1.3
    max_rates: int = 10
    duration_s: float = 90.0
    workloads: tuple[str, ...] = ("sharegpt_like",)
    max_tokens_cap: int | None = 64
    seed: int = 0
    warmup_rate: float = 0.5
    warmup_s: float = 20.0
    unloaded_requests: int = 8
    unloaded_max_tokens: int = 32
    ttft_factor: float = 5.0
    tpot_factor: float = 3.0
    target: float = 0.9
    together: bool = True
    deploy_apart: bool = False
    stop_below: float = 0.5
    drain_s: float = 45.0
    deploy_config: str = str(DEPLOY_CONFIG.relative_to(REPO_ROOT))
    app_args: dict = field(default_factory=dict)
    policy_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.policies or len(set(self.policies)) != len(self.policies):
            raise ValueError(f"policies must be distinct and non-empty, got {self.policies}")
        for name in ("rates", "rate_multipliers"):
            values = getattr(self, name)
            if values is not None and (not values or list(values) != sorted(set(values)) or values[0] <= 0):
                raise ValueError(f"{name} must be positive and strictly ascending, got {values}")
        for name in ("duration_s", "warmup_rate", "warmup_s", "ttft_factor", "tpot_factor", "drain_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CompareConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.unloaded_requests < 1 or self.unloaded_max_tokens < 2:
            raise ValueError("unloaded_requests must be >= 1 and unloaded_max_tokens >= 2")
        if not self.extend_factor > 1 or self.max_rates < 1:
            raise ValueError(f"need extend_factor > 1 and max_rates >= 1, got {self.extend_factor}, {self.max_rates}")
        if self.deploy_apart and self.together:
            raise ValueError("deploy_apart loads one app at a time: it needs together=False")
        if not 0 <= self.stop_below <= self.target <= 1:
            raise ValueError(f"need 0 <= stop_below <= target <= 1, got {self.stop_below}, {self.target}")
        # A trace holds round(rate x duration) requests (generator.make_trace): a rate with none measures nothing,
        # and a sweep of only such rates failed in slo.frontier, after the apps had started and warmed up.
        if self.rates is not None and (empty := [r for r in self.rates if trace_requests(r, self.duration_s) < 1]):
            raise ValueError(f"rates {empty} send no request in duration_s={self.duration_s:g} s (a trace has "
                             "round(rate x duration) requests): raise them or the duration")
        for name, seconds in (("warmup_s", self.warmup_s), ("duration_s", self.duration_s)):  # warm-up; unloaded
            if trace_requests(self.warmup_rate, seconds) < 1:
                raise ValueError(f"warmup_rate={self.warmup_rate:g} sends no request in {name}={seconds:g} s")


# --- apps ------------------------------------------------------------------------------------------

def deploy_args(path: Path | str = DEPLOY_CONFIG) -> dict:
    """The `args:` of the first application in a `serve run` config (default: the emulated cluster). A relative
    path is taken from the working folder, else from the repository root. ValueError for a file that is not
    such a config."""
    path, config = _serve_config(path)
    args = config["applications"][0]["args"]
    if not isinstance(args, dict):
        raise ValueError(f"{path}: the first application's args must be a mapping, got {type(args).__name__}")
    return dict(args)


def _serve_config(path: Path | str) -> tuple[Path, dict]:
    """`deploy.check.read_serve_config`, whose first application has args (ValueError if not)."""
    from deploy.check import read_serve_config

    path, config = read_serve_config(path)
    try:
        config["applications"][0]["args"]  # noqa: B018 - what every caller reads
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"{path} is not a serve config with an application's args "
                         "(applications: [{args: {...}}])") from err
    return path, config


def serve_options(path: Path | str = DEPLOY_CONFIG) -> dict:
    """A serve config's `http_options` and `proxy_location` (what Serve starts with on a cluster without one)."""
    _, config = _serve_config(path)
    return {k: config[k] for k in ("http_options", "proxy_location") if k in config}


# build_app arguments the benchmark's apps take unless `--set` says otherwise (over the deploy config's). Prefix
# caching off: the traces draw their prompts from a few hundred, so a sweep's later runs mostly repeated prompts the
# app had cached (31% of the requests at the lowest rate, 86% at the highest, all of those at eplb's frontier rate in
# the run at e42e86e): their prefill skipped, the MoE layers included, and more so the higher the rate, which bent
# the attainment curves. A service's real traffic repeats a system prompt, not whole requests.
BENCH_APP_DEFAULTS = {"enable_prefix_caching": False}


def app_args_for(policy: str, config: CompareConfig, name: str) -> dict:
    """build_app arguments of one app: the deploy config's, the benchmark's defaults (BENCH_APP_DEFAULTS), the
    shared overrides, then the policy's own."""
    return {**deploy_args(config.deploy_config), **BENCH_APP_DEFAULTS, **config.app_args,
            **config.policy_args.get(policy, {}), "policy": policy, "admin_token": ADMIN_TOKEN, "app_name": name}


def resolved_args(args: dict) -> dict:
    """An app's build_app arguments with every default filled in (what it ran with), the admin token left out."""
    from deploy.app import AppArgs

    return AppArgs.model_validate(args).model_dump(mode="json", exclude={"admin_token"})


def emulated(args: dict) -> bool:
    """Whether an app's devices are emulated (build_app's `emulate`, default true)."""
    from deploy.app import AppArgs

    return AppArgs.model_validate(args).emulate


class LeftOnCluster(RuntimeError):
    """Apps, or their expert workers, still on the cluster after `serve_apps` deleted them."""


class _StopApart(Exception):
    """Ends a run deployed apart early (what it measured is kept; the notes say why)."""


@contextlib.contextmanager
def serve_apps(apps: dict[str, dict], *, at_root: bool = False, ready_timeout_s: float = 900.0,
               address: str | None = None, serve_options: dict | None = None,
               require_cleanup: bool = False) -> Iterator[tuple[dict[str, str], float]]:
    """Serve `build_app(args)` for each name -> args at `/<name>` (`at_root`: the only app at `/`); yields
    ({name: base URL}, startup seconds from `ray.init` until every /health answers). Apps start one after
    another (each calibrated before the next begins), each within what is left of `ready_timeout_s`
    (TimeoutError naming what Serve waits for, such as resources no node has); an app that asks for an admin
    token must also hold every device it was given by then (`_check_devices`: RuntimeError naming those its
    coordinator still counts lost).

    address None: a fresh local Ray cluster, Serve on a free port of 127.0.0.1; Ray's logical CPUs are set to
    what the apps reserve (at least 2): reservations only order placement, the cores are shared either way.
    The cluster, with every worker of every app, is shut down on exit.
    address given (`ray.init`'s: "auto" or the head's GCS address, from a node of that cluster; not a Ray
    Client "ray://" one): the apps go onto that running cluster beside whatever it serves, through its Serve
    instance (see `_cluster_root`; started with `serve_options`, a serve config's `http_options` and
    `proxy_location`, if none runs). An app whose name or route the cluster already serves is refused
    (ValueError) before anything is deployed. On exit, also on SIGTERM or SIGHUP, only the apps deployed here
    are deleted (their workers with them, waited for), and Serve too if it was started here and serves nothing
    else; the cluster is left running. What is still there then is said on stderr, and raised (LeftOnCluster; over
    the body's error, as its cause, when the body failed; never over a stop such as SIGTERM) with
    `require_cleanup`: for a caller that deploys next what would not fit beside it.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from deploy.app import AppArgs, build_app

    if at_root and len(apps) != 1:
        raise ValueError(f"at_root serves exactly one app, got {len(apps)}")
    if address is not None and address.startswith("ray://"):
        raise ValueError(f"a Ray Client address ({address}) cannot reach the apps' HTTP proxy from here: run this on "
                         "a node of the cluster with --address auto")
    built = {name: build_app(args) for name, args in apps.items()}  # validates every app before starting
    prefixes = {name: "/" if at_root else f"/{name}" for name in apps}
    started = time.monotonic()
    deadline = started + ready_timeout_s
    if address is None:
        ray.init(num_cpus=max(2, math.ceil(sum(_reserved_cpus(AppArgs.model_validate(a)) for a in apps.values()))),
                 include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    deployed: list[str] = []
    started_serve = False  # on a running cluster: whether Serve was started here
    left: list[str] = []  # on a running cluster: what deleting the apps left there
    failed: BaseException | None = None  # the body's error: what deleting the apps left is raised over it
    try:
        with _signals_raise(address is not None):
            if address is None:
                port = _free_port()
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                root = f"http://127.0.0.1:{port}"
            else:
                root, started_serve = _cluster_root(apps, prefixes, serve_options or {})
                _warn_if_short(apps)
            bases = {name: f"{root}{prefix.rstrip('/')}" for name, prefix in prefixes.items()}
            for name, app in built.items():  # one at a time: 16+ workers starting at once time out on 2 cores
                deployed.append(name)
                _deploy(app, name, prefixes[name], deadline)
                _wait_healthy(bases[name], deadline)
                _check_devices(bases[name], apps[name], deadline)
            yield bases, time.monotonic() - started
    except BaseException as exc:
        failed = exc
        raise
    finally:
        try:
            if address is None:
                with contextlib.suppress(Exception):
                    serve.shutdown()
            else:
                left = _delete_apps(deployed, started_serve)
        finally:
            ray.shutdown()
        # also when the body failed (a caller deploying next must know), not over a stop (SIGTERM, Ctrl-C)
        if left and require_cleanup and (failed is None or isinstance(failed, Exception)):
            raise LeftOnCluster(f"still on the cluster after deleting the apps: {left}") from failed


# --- apps on a running cluster ---------------------------------------------------------------------

def _cluster_root(apps: dict[str, dict], prefixes: dict[str, str], serve_options: dict) -> tuple[str, bool]:
    """On a running cluster: refuse apps whose name or route prefix is taken, start Serve with `serve_options`
    (`http_options`, `proxy_location`) if none runs, and return (the URL of its HTTP proxy on this node,
    whether Serve was started here). The URL: 127.0.0.1 (::1) for a proxy listening on every IPv4 (IPv6)
    interface; a proxy serving https only is refused (ValueError)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client(raise_if_no_controller_running=False)  # None: no Serve instance there yet
    running = {} if client is None else {
        name: app.route_prefix for name, app in ServeInstanceDetails(**client.get_serve_details()).applications.items()}
    if taken := sorted(set(apps) & set(running)):
        raise ValueError(f"the cluster already serves applications named {taken}: delete them or run the "
                         "benchmark elsewhere")
    if clash := sorted(set(prefixes.values()) & set(running.values())):
        raise ValueError(f"the cluster already serves applications at {clash}")
    if client is None:
        serve.start(**serve_options)
    config = _get_global_client().http_config
    if config.ssl_certfile:  # its certificate names a host, never 127.0.0.1: every client here would be refused
        raise ValueError("the cluster's Serve proxy serves https only; the benchmark's clients reach it at this "
                         "node's loopback address, which its certificate cannot name: run it on a cluster whose "
                         "proxy serves http")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(config.host, config.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.port}", client is None


def _warn_if_short(apps: dict[str, dict]) -> None:
    """Say on stderr when the cluster's free GPUs or CPUs cannot hold every app at once (the deploy and the
    device check then wait for them, up to the deadline: an autoscaling cluster may still bring them)."""
    import ray

    from deploy.app import AppArgs

    parsed = [AppArgs.model_validate(args) for args in apps.values()]
    need = {"CPU": sum(_reserved_cpus(a) for a in parsed), "GPU": sum(_reserved_gpus(a) for a in parsed)}
    free = ray.available_resources()
    for kind, amount in need.items():
        if amount > free.get(kind, 0.0) + 1e-9:
            print(f"serve_apps: the apps need {amount:g} {kind}s and the cluster has {free.get(kind, 0.0):g} free: "
                  "they start only if more come (fewer policies, or fractional worker_num_gpus / "
                  "ingress_num_gpus, need fewer)", file=sys.stderr)


def _reserved_gpus(args) -> float:
    workers = (args.worker_num_gpus or 1.0) * args.num_devices if args.device == "cuda" else 0.0
    return workers + args.ingress_num_gpus * args.num_replicas


POLL_S = 0.25  # how often Serve's status and the actors are asked while an app starts or goes (a call: ~10 ms)


def _deploy(app, name: str, route_prefix: str, deadline: float) -> None:
    """Deploy `app` and wait until Serve reports it RUNNING, at most until `deadline` (Serve's own `serve.run`
    waits forever for resources no node has)."""
    import ray
    from ray import serve
    from ray.serve.api import _run

    _run(app, _blocking=False, name=name, route_prefix=route_prefix)
    while True:
        status = serve.status().applications.get(name)
        state = str(getattr(status, "status", "")).rsplit(".", 1)[-1]
        if state == "RUNNING":
            return
        failed = state in ("DEPLOY_FAILED", "UNHEALTHY")
        if failed or time.monotonic() > deadline:
            detail = [getattr(status, "message", ""), *(
                f"{d}: {s.message}" for d, s in (getattr(status, "deployments", None) or {}).items() if s.message)]
            if not failed:  # what the replicas may be waiting for
                free = ray.available_resources()
                detail.append("free on the cluster: " + ", ".join(f"{free.get(k, 0.0):g} {k}" for k in ("CPU", "GPU")))
            raise (RuntimeError if failed else TimeoutError)(
                f"app {name!r} is {state or 'not deployed'}" + ("" if failed else " at the deadline")
                + f" ({'; '.join(filter(None, detail))})")
        time.sleep(POLL_S)


def _check_devices(base: str, args: dict, deadline: float) -> None:
    """An app with an admin token must hold every expert device it asked for before it is measured: a cluster
    short of GPUs starts the workers it can place and counts the rest lost (restarted as room comes: an
    autoscaler, a slow worker start), and a benchmark on fewer devices compares nothing. Waits until none is
    lost; RuntimeError naming them at `deadline`."""
    token = args.get("admin_token")
    if not token:
        return
    while True:
        response = httpx.get(f"{base}/admin/stats", headers={"Authorization": f"Bearer {token}"}, timeout=60)
        response.raise_for_status()
        if not (lost := response.json().get("lost_devices")):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base} is still without expert devices {lost} (not placed or lost) at the "
                               "deadline: the cluster lacks room for every app's workers")
        time.sleep(2.0)


def _delete_apps(names: list[str], started_serve: bool, timeout_s: float = 300.0) -> list[str]:
    """Delete the apps in `names` from the cluster at once and wait until Serve no longer lists them and their
    expert workers are gone (what holds their GPUs); then shut Serve down if it was started here and serves
    nothing else. Returns what is still there after `timeout_s` (app names, worker actor names), also said on
    stderr (apps with a command that deletes them)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    if not names:
        left = []
    else:
        deadline = time.monotonic() + timeout_s
        try:
            _get_global_client().delete_apps(names, blocking=False)
            while (left := sorted(set(names) & set(serve.status().applications))) and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except Exception as err:  # noqa: BLE001 - said below, with the command that finishes the job
            print(f"serve_apps: deleting {names}: {err}", file=sys.stderr)
            left = names
        if left:
            print(f"serve_apps: apps {left} are still on the cluster; delete them with: python -c \"import ray; "
                  f"from ray import serve; ray.init(address='auto'); [serve.delete(n) for n in {left!r}]\"",
                  file=sys.stderr)
            return left
        try:
            left = _wait_workers_gone(names, deadline)
        except Exception as err:  # noqa: BLE001 - the cluster cannot say (a GCS timeout): not known to be gone
            print(f"serve_apps: listing the expert workers of {names}: {err}", file=sys.stderr)
            left = [f"the expert workers of {name} (could not be listed)" for name in names]
        if left:
            print(f"serve_apps: expert workers {left} of the deleted apps are still alive", file=sys.stderr)
            return left
    if started_serve:
        with contextlib.suppress(Exception):
            if not serve.status().applications:
                serve.shutdown()
    return left


def _wait_workers_gone(names: list[str], deadline: float) -> list[str]:
    """Wait until no expert worker of the apps `names` is alive (the deleted app's coordinator and ingress kill
    them as they stop); the names of those still alive at `deadline`."""
    import ray

    from deploy.app import worker_family

    families = tuple(worker_family(name) for name in names)
    while True:
        alive = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["namespace"] == "vibe" and a["name"].startswith(families))
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(POLL_S)


@contextlib.contextmanager
def _signals_raise(active: bool) -> Iterator[None]:
    """While active (and in the main thread), SIGTERM and SIGHUP raise SystemExit, so that the caller's cleanup
    runs when the run is stopped or its terminal goes away; the former handlers are restored after."""
    import signal
    import threading

    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    former = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in former.items():
            signal.signal(sig, handler)


def _reserved_cpus(args) -> float:
    return args.ingress_num_cpus * args.num_replicas + args.coordinator_num_cpus + args.worker_num_cpus * args.num_devices


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(base: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{base}/health did not answer 200 before the deadline")


async def wait_idle(base: str, timeout_s: float = IDLE_TIMEOUT_S) -> bool:
    """Until the engine has no running or waiting request (cut-off requests are aborted server-side): True; False
    when it still had some, or /metrics never answered, after `timeout_s` (a /metrics that fails or is slow once
    is asked again: it used to lose the run just measured)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):  # ValueError: a page that is not the metrics
                response = await http.get("/metrics")
                text = response.raise_for_status().text
                if not any(metric_total(text, name) > 0
                           for name in ("vibe_num_requests_running", "vibe_num_requests_waiting")):
                    return True
            await asyncio.sleep(0.5)
    return False


def busy_note(after: str) -> str:
    """What a run's or report's notes say when `wait_idle` gave up after `after` (a run, a warm-up)."""
    return (f"the engine was still busy {IDLE_TIMEOUT_S:g} s after {after} (or its /metrics did not answer): what "
            "was measured next began on it")


async def client_for(base: str, **kwargs) -> ClientConfig:
    """A ClientConfig for the app at `base`, its served model name asked from /v1/models."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
    return ClientConfig(base_url=base, model=model, admin_token=ADMIN_TOKEN, **kwargs)


async def unloaded_latency(client: ClientConfig, trace, num: int, max_tokens: int) -> list[RequestResult]:
    """The first `num` requests of `trace`, one at a time, with max_tokens capped (idle-service latency)."""
    import openai

    aclient = openai.AsyncOpenAI(base_url=f"{client.base_url}/v1", api_key="unused", max_retries=0,
                                 timeout=client.request_timeout_s)
    try:
        await warm_up(aclient, client, trace[0])
        return [await send_request(aclient, client, replace(spec, max_tokens=min(spec.max_tokens, max_tokens)),
                                   time.monotonic()) for spec in trace[:num]]
    finally:
        await aclient.close()


async def placement_summary(client: ClientConfig, notes: list[str] | None = None) -> dict | None:
    """From /admin/placement: the version, slots per device per layer, predicted device times per layer on
    the window loads, the MoE layers' predicted critical path per forward pass (sum_l max_g) and what it
    would be with the same device work perfectly balanced (sum_l mean_g). None, said in `notes`, when the route
    cannot be read (an answer over 60 s or an error costs the placement columns, not the run just measured)."""
    try:
        async with httpx.AsyncClient(base_url=client.base_url, timeout=60) as http:
            view = await fetch_admin(http, client.admin_token, "/admin/placement")
        times = [layer["device_predicted_s"] for layer in view["layers"]]
        slots = [[sum(1 for s in layer["slots"] if s["device"] == d) for d in range(view["num_devices"])]
                 for layer in view["layers"]]
        return {"version": view["version"], "device_predicted_s": times, "slots_per_device": slots,
                "moe_critical_path_s": sum(max(row) for row in times),
                "moe_balanced_path_s": sum(sum(row) / len(row) for row in times)}
    except (httpx.HTTPError, ValueError, KeyError, TypeError, ZeroDivisionError) as exc:  # not the view
        if notes is None:
            raise
        notes.append(f"/admin/placement after the run: {type(exc).__name__}: {str(exc)[:160]} (no placement)")
        return None


# --- results as JSON -------------------------------------------------------------------------------

def record_json(record: RunRecord, **extra) -> dict:
    """A run as JSON: request results as columns (compact), polls, recalibrations, step-time counters."""
    columns = {name: [getattr(r, name) for r in record.results] for name in _RESULT_FIELDS}
    return {**extra, "started_wall": record.started_wall, "duration_s": record.duration_s, "results": columns,
            "polls": record.polls, "recalibrations": record.recalibrations, "step_seconds": record.step_seconds,
            "events": record.events, "notes": record.notes}


def results_from_json(run: dict) -> list[RequestResult]:
    """The RequestResults of a run written by `record_json`."""
    columns = run["results"]
    return [RequestResult(**dict(zip(_RESULT_FIELDS, row))) for row in zip(*(columns[name] for name in _RESULT_FIELDS))]


HASHED_WEIGHTS_BYTES = 1 << 30  # a larger checkpoint is told apart by its files' sizes and times, not read


def model_fingerprint(args: dict) -> dict:
    """The served checkpoint folder and the SHA-256 of its weights (which model produced the numbers): of a
    single model.safetensors up to HASHED_WEIGHTS_BYTES; else None, and `weights_files` (each safetensors file's
    name, size and modification time) says which weights they were."""
    from deploy.app import AppArgs, checkpoint_folder, weights_identity

    folder = Path(checkpoint_folder(AppArgs.model_validate(args)))
    weights = folder / "model.safetensors"
    small = weights.is_file() and weights.stat().st_size <= HASHED_WEIGHTS_BYTES
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if small else None
    resolved = folder.resolve()
    shown = resolved.relative_to(REPO_ROOT) if resolved.is_relative_to(REPO_ROOT) else resolved  # repo: clone-neutral
    return {"path": str(shown), "weights_sha256": digest,
            **({} if small else {"weights_files": weights_identity(str(folder))[1]})}


def machine_info() -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg()}


# --- the experiment --------------------------------------------------------------------------------

class Experiment:
    """One side-by-side run: config, prompts, the SLO once known, and the result written as it grows."""

    def __init__(self, config: CompareConfig, out: Path, *, progress: bool = True, address: str | None = None) -> None:
        self.config = config
        self.out = out
        self.address = address  # a running Ray cluster to deploy the apps onto (None: a local one of their own)
        self.progress = progress
        self.prompts = load_workloads(config.workloads)
        self.slo: SLO | None = None
        self.result: dict = {"config": asdict(config), "machine": machine_info(), "ray_address": address,
                             "policies": {}}
        self._turn = -1  # rates loaded so far, minus one: rotates the order of the apps

    def trace(self, rate: float, seed: int | None = None, duration_s: float | None = None):
        cfg = self.config
        return make_trace(TraceConfig(rate, duration_s or cfg.duration_s, ((0.0, cfg.workloads),),
                                      cfg.seed if seed is None else seed, cfg.max_tokens_cap), self.prompts)

    def run(self) -> dict:
        """Start the apps (all at once, or each alone in turn: `deploy_apart`), measure, write
        `<out>/compare.json`; returns the result."""
        # Serve apps named as their workers (bench-<policy>): on a user's cluster, names like "vibe" may be taken
        apps = {p: app_args_for(p, self.config, f"bench-{p}") for p in self.config.policies}
        self.result["model"] = model_fingerprint(next(iter(apps.values())))
        for policy, args in apps.items():
            self.result["policies"][policy] = {"app_args": resolved_args(args), "runs": []}
        if self.config.deploy_apart:
            try:
                self._run_apart(apps)
            except _StopApart as stop:  # said in the notes; what was measured is kept, once it has SLOs and a sweep
                if self.slo is None or not any("frontier" in e for e in self.result["policies"].values()):
                    raise RuntimeError(str(stop)) from stop.__cause__
        else:
            with self._serve(apps) as (bases, startup_s):
                self.result["startup_s"] = startup_s
                asyncio.run(self._measure(bases))
        self.result["machine"]["loadavg_end"] = os.getloadavg()
        self.save()
        return self.result

    @contextlib.contextmanager
    def _serve(self, apps: dict[str, dict], **kwargs) -> Iterator[tuple[dict[str, str], float]]:
        """`serve_apps` for {policy: args} (`kwargs`: its own): yields ({policy: base URL}, startup seconds)."""
        with serve_apps({args["app_name"]: args for args in apps.values()}, address=self.address,
                        serve_options=serve_options(self.config.deploy_config), **kwargs) as (named, startup_s):
            yield {policy: named[args["app_name"]] for policy, args in apps.items()}, startup_s

    async def _clients(self, bases: dict[str, str]) -> dict[str, ClientConfig]:
        """A client per app, after the warm-up trace (to every app at once) and once every app is idle again."""
        cfg = self.config
        clients = {p: await client_for(base, drain_s=cfg.drain_s) for p, base in bases.items()}
        warm = self.trace(cfg.warmup_rate, cfg.seed + 1000, cfg.warmup_s)
        await asyncio.gather(*(run_trace(c, warm, desc=f"{p} warm-up", progress=False) for p, c in clients.items()))
        for policy, client in clients.items():
            if not await wait_idle(client.base_url):  # what follows (maybe the SLOs) would be loaded
                self._note(f"{policy}: {busy_note('the warm-up')}")
        return clients

    async def _measure(self, bases: dict[str, str]) -> None:
        cfg = self.config
        clients = await self._clients(bases)
        self._set_slo(await self._unloaded(clients))
        self.result["rates"] = await self._sweep(clients, self.result["rates"])
        for policy in cfg.policies:
            self._entry(policy)["frontier"] = asdict(self._frontier(policy))
        if "eplb" in cfg.policies:
            await self._at_eplb_frontier(clients)
        self.save()

    def _run_apart(self, apps: dict[str, dict]) -> None:
        """`deploy_apart`: each app deployed alone for its unloaded latency, then (the SLOs and rates set from
        every app's) alone again for its sweep and its run at eplb's frontier rate, eplb first. The swept rates
        recorded: every rate some policy ran. A policy whose app fails to start or to run is moved to
        `result["failed_policies"]` with its error (what it measured kept there) and the others go on; what a
        deletion leaves on the cluster (which the next app may need room for) ends the run with what it has."""
        order = sorted(apps, key=lambda policy: policy != "eplb")  # stable: the others in the given order
        starts: dict[str, list[float]] = {policy: [] for policy in order}
        try:
            self._run_apart_turns(apps, order, starts)
        finally:
            every = [s for times in starts.values() for s in times]
            self.result["startup_s"] = sum(every) / len(every) if every else 0.0
            self.result["startup_s_per_app"] = starts

    def _run_apart_turns(self, apps: dict[str, dict], order: list[str], starts: dict[str, list[float]]) -> None:
        unloaded: dict[str, list[RequestResult]] = {}
        for policy in order:
            with (self._failures(policy, order),
                  self._serve({policy: apps[policy]}, require_cleanup=True) as (bases, startup_s)):
                starts[policy].append(startup_s)
                unloaded |= asyncio.run(self._alone_unloaded(bases))
        if not (unloaded := {p: r for p, r in unloaded.items() if p in self.result["policies"]}):
            raise RuntimeError(f"no app could be measured: {self.result['failed_policies']}")
        self._set_slo(unloaded)
        base_rates, swept = list(self.result["rates"]), set()
        for policy in [p for p in order if p in self.result["policies"]]:
            with (self._failures(policy, order),
                  self._serve({policy: apps[policy]}, require_cleanup=True) as (bases, startup_s)):
                starts[policy].append(startup_s)
                swept |= set(asyncio.run(self._alone_sweep(policy, bases, base_rates)))
                self.result["rates"] = sorted(swept)
        if not self.result["policies"]:
            raise RuntimeError(f"no app could be measured: {self.result['failed_policies']}")

    @contextlib.contextmanager
    def _failures(self, policy: str, order: list[str]) -> Iterator[None]:
        """Within: a failure of `policy`'s app moves it to `failed_policies` (with the error) instead of ending the
        run; one that left something on the cluster (LeftOnCluster: its measurements are whole unless its turn
        failed too, the error's cause) also moves every policy still to come there, as not run, and ends the run
        with what it has."""
        try:
            yield
        except LeftOnCluster as err:
            if err.__cause__ is not None:  # the app's turn failed too (then its deletion left this): not whole
                self._fail(policy, f"{type(err.__cause__).__name__}: {err.__cause__}")
            later = [p for p in order[order.index(policy) + 1:] if p in self.result["policies"]]
            why = f"deploying apart: {err}; the later apps ({', '.join(later) or 'none'}) were not deployed beside it"
            self._note(why)
            for other in later:
                self._fail(other, f"not run: {err}")
            self.save()  # (the run may end here, with an error: the saved file says why)
            raise _StopApart(why) from err
        except Exception as err:  # noqa: BLE001 - any failure of this app: recorded, the others still measured
            self._fail(policy, f"{type(err).__name__}: {err}")
        self.save()

    def _fail(self, policy: str, error: str) -> None:
        self.result.setdefault("failed_policies", {})[policy] = {"error": error, **self.result["policies"].pop(policy)}
        self._note(f"{policy} failed, left out of the tables: {error}")
        print(f"  {policy} failed: {error}", file=sys.stderr, flush=True)

    def _note(self, note: str) -> None:
        if note not in (notes := self.result.setdefault("notes", [])):
            notes.append(note)

    async def _alone_unloaded(self, bases: dict[str, str]) -> dict[str, list[RequestResult]]:
        return await self._unloaded(await self._clients(bases))

    async def _alone_sweep(self, policy: str, bases: dict[str, str], rates: list[float]) -> list[float]:
        clients = await self._clients(bases)
        swept = await self._sweep(clients, rates)
        self._entry(policy)["frontier"] = asdict(self._frontier(policy))
        if "frontier" in self.result["policies"].get("eplb", {}):  # eplb's turn came first (unless it failed)
            await self._at_eplb_frontier(clients)
        return swept

    async def _at_eplb_frontier(self, clients: dict[str, ClientConfig]) -> None:
        """Every app at eplb's frontier rate; none when that frontier is 0 (eplb missed the target far below the
        sweep: there is no such rate to load, and the report's latency columns stay empty), said in a note."""
        rate = self._frontier("eplb").rate_rps
        if rate > 0:
            await self._run_all(clients, rate, "eplb_frontier")
            return
        self._note("eplb's SLO frontier is 0 (it missed the target far below the lowest swept rate): no run at its "
                   "frontier rate, so the headline has no latency or balance numbers.")  # once, also apart

    async def _sweep(self, clients: dict[str, ClientConfig], rates: list[float]) -> list[float]:
        """The apps at every rate of `rates`, low to high, while some policy is still in the sweep; extended
        upwards while some policy still meets the target at the highest rate. Returns the rates swept."""
        cfg = self.config
        rates, swept, active = list(rates), [], dict(clients)
        for rate in rates:  # `rates` grows while a frontier is still above it
            runs = await self._run_all(active, rate, "sweep")
            if runs is None:  # no request arrived at this rate: nothing to judge by
                continue
            swept.append(rate)
            last = {policy: run["summary"]["attainment"] for policy, run in runs.items()}
            if all(a < cfg.stop_below for a in last.values()):
                break
            if not cfg.together:  # alone on the host, a policy past its capacity has nothing more to show
                active = {p: c for p, c in active.items() if last[p] >= cfg.stop_below}
            if rate == rates[-1] and len(rates) < cfg.max_rates and any(a >= cfg.target for a in last.values()):
                rates.append(round(rate * cfg.extend_factor, 3))
        if not swept:  # rates from rate_multipliers, known only now (CompareConfig rejects such given rates)
            raise RuntimeError(f"no swept rate ({rates} req/s) sent a request in duration_s={cfg.duration_s:g} s: "
                               "raise the rate multipliers or the duration")
        return swept

    async def _unloaded(self, clients: dict[str, ClientConfig]) -> dict[str, list[RequestResult]]:
        """Unloaded latency: one request at a time to each app, under the condition of the sweep (the apps
        one after another, or all at once when `together`); recorded per policy and returned."""
        cfg = self.config
        # as many requests as the unloaded medians are said to pool: a short duration_s held fewer (5 of 8 at 10 s)
        enough = trace_requests(cfg.warmup_rate, cfg.duration_s) >= cfg.unloaded_requests
        probe = self.trace(cfg.warmup_rate, duration_s=None if enough else (cfg.unloaded_requests + 0.5) / cfg.warmup_rate)

        def measure(client: ClientConfig):
            return unloaded_latency(client, probe, cfg.unloaded_requests, cfg.unloaded_max_tokens)

        if cfg.together:
            found = await asyncio.gather(*(measure(c) for c in clients.values()))
        else:
            found = [await measure(c) for c in clients.values()]
        for policy, results in zip(clients, found):
            self._entry(policy)["unloaded"] = record_json(RunRecord(time.time(), results=results))
        return dict(zip(clients, found))

    def _set_slo(self, unloaded: dict[str, list[RequestResult]]) -> None:
        """The SLOs from every app's unloaded latency, pooled, and, unless given, the rates."""
        cfg = self.config
        pooled = [result for results in unloaded.values() for result in results]
        self.slo = SLO.from_unloaded(pooled, cfg.ttft_factor, cfg.tpot_factor, cfg.target)
        self.result["slo"] = asdict(self.slo) | {
            "set_by": "every app (pooled)" + (", each deployed alone" if cfg.deploy_apart else "")}
        single = single_stream_rate(pooled, self.mean_output_tokens())
        self.result["single_stream_rps"] = single
        self.result["rates"] = list(cfg.rates or (round(m * single, 3) for m in cfg.rate_multipliers))

    def mean_output_tokens(self) -> float:
        """Mean output tokens of a request drawn from the workloads (max_tokens after the cap; ignore_eos)."""
        cap = self.config.max_tokens_cap
        tokens = [min(p.max_tokens, cap or p.max_tokens) for name in self.config.workloads for p in self.prompts[name]]
        return sum(tokens) / len(tokens)

    async def _run_all(self, clients: dict[str, ClientConfig], rate: float, kind: str) -> dict[str, dict] | None:
        """The trace at `rate` to every app in `clients` (all at once when `together`, else one after another
        in `run_order`); each app's run recorded under its policy and returned ({policy: run}); None when no
        request arrives at this rate (nothing run)."""
        trace = self.trace(rate)
        if not trace:  # a rate so low that no request arrives in duration_s: nothing to measure
            print(f"  {kind} rate={rate:.3f}: no request in {self.config.duration_s:g} s, skipped")
            return None

        clock = TraceClock(len(clients)) if self.config.together else None  # (side by side: one start)

        async def load(policy: str, client: ClientConfig) -> tuple[RunRecord, tuple[float, ...], tuple[float, ...]]:
            before = os.getloadavg()
            record = await run_trace(client, trace, desc=f"{policy} {rate:.2f} req/s", progress=self.progress,
                                     clock=clock)
            if not await wait_idle(client.base_url):
                record.notes.append(busy_note("this run"))
            return record, before, os.getloadavg()

        if self.config.together:
            loaded = dict(zip(clients, await asyncio.gather(*(load(p, c) for p, c in clients.items()))))
        else:
            self._turn += 1
            loaded = {}
            for policy in run_order(list(clients), self._turn):
                loaded[policy] = await load(policy, clients[policy])
        runs = {}
        for policy in clients:
            record, before, after = loaded[policy]
            summary = summarize(record.results, self.slo, record.duration_s, window_s=self.config.duration_s)
            placement = await placement_summary(clients[policy], record.notes)
            run = record_json(record, rate_rps=rate, kind=kind, summary=summary, placement=placement,
                              loadavg=[before, after], send_lag_ms=send_lag_ms(trace, record.results))
            runs[policy] = run
            if kind == "sweep":
                self._entry(policy)["runs"].append(run)
            else:
                self._entry(policy)["at_eplb_frontier"] = run
            print(f"  {policy:>10} {kind:>13} rate={rate:5.3f} attainment={summary['attainment']:.3f} "
                  f"p90_ttft_ms={_ms(summary['ttft_p90_ms'])} p90_tpot_ms={_ms(summary['tpot_p90_ms'])} "
                  f"failed={summary['failed']} load={before[0]:.1f}"
                  + "".join(f"\n    note: {note}" for note in record.notes), flush=True)
        self.save()
        return runs

    def _entry(self, policy: str) -> dict:
        return self.result["policies"][policy]

    def _frontier(self, policy: str) -> Frontier:
        """The frontier over the rates the sweep's traces offered: a trace of rate r holds round(r x duration)
        requests, so the labelled rate was up to half a request per duration off (0.392 req/s sent 0.389: 0.7%)."""
        runs, duration = self._entry(policy)["runs"], self.config.duration_s
        return frontier([offered_rate(r["rate_rps"], duration) for r in runs],
                        [r["summary"]["attainment"] for r in runs], self.config.target)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "compare.json").write_text(json.dumps(self.result, separators=(",", ":")))


def send_lag_ms(trace, results: list[RequestResult]) -> dict[str, float | None]:
    """How late the client sent the requests after their scheduled arrivals (this process's event loop; ms):
    median, P99 and max over the requests not cut off (a cut-off one records its arrival); a P99 that is a real
    share of the TTFT SLO means the offered load was lower than the rate says."""
    lags = [1e3 * max(0.0, r.sent_s - spec.arrival_s) for spec, r in zip(trace, results) if r.error != "cutoff"]
    if not lags:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": float(np.percentile(lags, 50)), "p99": float(np.percentile(lags, 99)), "max": max(lags)}


def run_order(policies: list[str], turn: int) -> list[str]:
    """`policies` rotated left by `turn`: over consecutive turns each policy takes each position."""
    shift = turn % len(policies)
    return policies[shift:] + policies[:shift]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# --- command line ----------------------------------------------------------------------------------

DEFAULT = CompareConfig()


def parse_args(argv: list[str] | None = None) -> tuple[CompareConfig, argparse.Namespace]:
    """The command line as the experiment's configuration (DEFAULT with what was given) and the rest."""
    parser = argparse.ArgumentParser(prog="python -m load_tests.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--rates", type=float, nargs="+", help="swept request rates, req/s")
    parser.add_argument("--duration", type=float, help="seconds of arrivals per swept rate")
    parser.add_argument("--policies", nargs="+", choices=POLICY_ORDER)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="load one app at a time (order rotated per rate) instead of all at once")
    parser.add_argument("--deploy-one-at-a-time", action="store_true",
                        help="also deploy one app at a time (each alone, twice: unloaded latency, then its sweep), "
                             "for a cluster without room for every app's devices at once; implies --one-at-a-time")
    parser.add_argument("--drift", action="store_true", help="also run the drift scenarios (about 10 minutes)")
    parser.add_argument("--no-scale", action="store_true", help="skip the scale study")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--config", metavar="PATH",
                        help="serve config whose first application's args every app starts from (default "
                             f"{DEFAULT.deploy_config}, the emulated cluster; e.g. deploy/config.gpu.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="override one of those args in every app (VALUE is YAML: 8, true, [1.0, 0.9], /models); "
                             "repeatable")
    parser.add_argument("--address", help="deploy the apps onto this running Ray cluster (ray.init's address: auto, "
                                          "or the head's host:port; not ray://) instead of starting a local one; "
                                          "run it on a node of that cluster with a Serve proxy")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("rates", tuple(args.rates or ())), ("duration_s", args.duration),
                                   ("policies", tuple(args.policies or ())), ("seed", args.seed),
                                   ("together", False if args.one_at_a_time or args.deploy_one_at_a_time else None),
                                   ("deploy_apart", True if args.deploy_one_at_a_time else None),
                                   ("deploy_config", args.config)) if v not in (None, ())}
    try:
        config = replace(DEFAULT, **overrides, app_args=parse_sets(args.sets))
        apps = [app_args_for(policy, config, f"bench-{policy}") for policy in config.policies]
        devices_emulated = [emulated(app) for app in apps]  # also validates every app's arguments
        path, serve_config = _serve_config(config.deploy_config)
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        parser.error(str(err))
    if serve_config["applications"][0].get("runtime_env"):
        print(f"{path}: the first application's runtime_env is not applied to the benchmark's apps (only its "
              "args are): set what it holds on the cluster itself", file=sys.stderr)
    if args.address is not None and args.address.startswith("ray://"):
        parser.error("--address: a Ray Client address (ray://) cannot reach the apps' HTTP proxy from here; run this "
                     "on a node of the cluster with --address auto")
    if args.drift and config.deploy_apart:
        parser.error("--drift deploys its static and adaptive apps together, where --deploy-one-at-a-time says the "
                     "cluster holds one app at a time: leave one of them out")
    if args.drift and not all(devices_emulated):
        parser.error("--drift needs emulated devices (the device drift throttles one through the emulator); "
                     "leave it out for this config")
    return config, args


SET_BY_THE_BENCHMARK = ("policy", "admin_token", "app_name")  # per app, whatever --set says


def parse_sets(items: list[str]) -> dict:
    """`--set KEY=VALUE` items as build_app arguments, each VALUE parsed as YAML (as in a serve config); keys the
    benchmark sets for each app itself are refused."""
    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set wants KEY=VALUE, got {item!r}")
        if key.strip() in SET_BY_THE_BENCHMARK:
            raise ValueError(f"--set {key.strip()}: the benchmark sets {', '.join(SET_BY_THE_BENCHMARK)} for each app "
                             "(--policies chooses the policies)")
        try:
            found[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"--set {key.strip()}: {value!r} is not a YAML value: {err}") from err
    return found


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    started = time.monotonic()
    experiment = Experiment(config, args.out, progress=not args.no_progress, address=args.address)
    experiment.result["argv"] = sys.argv[1:] if argv is None else list(argv)
    result = experiment.run()
    extras = _extras(args, config)
    result["runtime_s"] = time.monotonic() - started
    experiment.save()
    from load_tests import report

    for line in report.write(args.out, result, **extras):
        print(line)
    return 0


def _extras(args: argparse.Namespace, config: CompareConfig) -> dict:
    """The drift scenarios, the scale study and the placement headroom, as asked on the command line. The
    headroom simulates the emulated devices of the served config: left out (said on stderr) for real devices,
    whose curves only the running coordinator knows, or a model without the routing profile it draws from."""
    from deploy.app import AppArgs, checkpoint_folder
    from load_tests import drift, headroom, scale

    extras = {}
    served = app_args_for("vibe", config, "headroom")
    if not emulated(served):
        print("headroom: left out: the devices are not emulated (the coordinator's /admin/stats has their "
              "calibrated curves)", file=sys.stderr)
    elif not (Path(checkpoint_folder(AppArgs.model_validate(served))) / "routing_stats.json").is_file():
        print("headroom: left out: the model has no routing_stats.json (the router profile it draws steps from)",
              file=sys.stderr)
    else:
        extras["headroom"] = headroom.run(args.out, app_args=served)
    if args.drift:
        extras["drift"] = drift.run_all(args.out, progress=not args.no_progress, base=config, address=args.address)
    if not args.no_scale:
        extras["scale"] = scale.run(args.out)
    return extras


if __name__ == "__main__":
    sys.exit(main())
