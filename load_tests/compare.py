"""The side-by-side benchmark: `python -m load_tests.compare --out bench` (`make bench`).

Owns the experiment: one local Ray cluster and one app start per policy (`contiguous`, `eplb`, `vibe`),
the emulated cluster of `deploy/config.yaml`, the same seeded request traces against each, the SLOs
(multiples of the unloaded latency measured at the start of the run), the rate sweep, the run at
`eplb`'s SLO frontier, `<out>/compare.json`, the plots, `<out>/report.md` and the one-line-per-policy
summary printed last. Also owns starting an app for a load test (`serve_app`), which `drift` reuses.
Ignores how requests are sent (`generator`) and how numbers are defined (`slo`).

Order: eplb first (its unloaded latency sets the SLOs; its frontier sets the extra rate), then
contiguous, then vibe. Each app: start and calibrate, a warm-up trace, unloaded requests one at a time,
the sweep from low to high rate (a policy stops sweeping once a rate's attainment falls below
`stop_below`), then the trace at eplb's frontier rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
import yaml

from load_tests.generator import (
    ClientConfig,
    RequestResult,
    RunRecord,
    TraceConfig,
    make_trace,
    run_trace,
    send_request,
    warm_up,
)
from load_tests.slo import SLO, Frontier, frontier, summarize
from load_tests.workloads import load_workloads

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY_CONFIG = REPO_ROOT / "deploy" / "config.yaml"
ADMIN_TOKEN = "load-test-admin-token-0123456789"  # a local, per-run cluster: the token guards nothing else
POLICY_ORDER = ("eplb", "contiguous", "vibe")


@dataclass(frozen=True)
class CompareConfig:
    """Everything the side-by-side benchmark decides with (every knob is recorded in the JSON).

    Attributes:
        policies: run in this order; the first sets the SLOs and, if it is eplb, the extra rate.
        rates: swept request rates (req/s), ascending.
        duration_s: arrivals per swept rate span this many seconds.
        workloads: prompt sets the traces draw from (uniformly over their union).
        seed: seed of every trace (the same trace per rate for every policy).
        warmup_rate, warmup_s: a warm-up trace (another seed) before measuring; lets the adaptive
            policies re-place for the workload after the startup profiling pass.
        unloaded_requests, unloaded_max_tokens: requests sent one at a time to the idle app.
        ttft_factor, tpot_factor: SLO = factor x unloaded median (TTFT, TPOT) of the first app.
        target: attainment the frontier asks for.
        stop_below: a policy stops its sweep after a rate whose attainment is below this.
        drain_s: requests still running this long after a trace's last arrival are cut off (misses).
        app_args: build_app arguments shared by every policy (over deploy/config.yaml's).
        policy_args: per-policy build_app arguments (redundant slots, slot budget).
    """

    policies: tuple[str, ...] = POLICY_ORDER
    rates: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0)
    duration_s: float = 40.0
    workloads: tuple[str, ...] = ("sharegpt_like",)
    seed: int = 0
    warmup_rate: float = 1.0
    warmup_s: float = 20.0
    unloaded_requests: int = 12
    unloaded_max_tokens: int = 32
    ttft_factor: float = 5.0
    tpot_factor: float = 3.0
    target: float = 0.9
    stop_below: float = 0.5
    drain_s: float = 60.0
    app_args: dict = field(default_factory=dict)
    policy_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.policies or len(set(self.policies)) != len(self.policies):
            raise ValueError(f"policies must be distinct and non-empty, got {self.policies}")
        if not self.rates or list(self.rates) != sorted(set(self.rates)) or self.rates[0] <= 0:
            raise ValueError(f"rates must be positive and strictly ascending, got {self.rates}")
        for name in ("duration_s", "warmup_rate", "warmup_s", "ttft_factor", "tpot_factor", "drain_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CompareConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.unloaded_requests < 1 or self.unloaded_max_tokens < 2:
            raise ValueError("unloaded_requests must be >= 1 and unloaded_max_tokens >= 2")
        if not 0 <= self.stop_below <= self.target <= 1:
            raise ValueError(f"need 0 <= stop_below <= target <= 1, got {self.stop_below}, {self.target}")


# --- apps ------------------------------------------------------------------------------------------

def deploy_args(path: Path = DEPLOY_CONFIG) -> dict:
    """The `args:` of the first application in a `serve run` config (the default emulated cluster)."""
    config = yaml.safe_load(path.read_text())
    return dict(config["applications"][0]["args"])


def app_args_for(policy: str, config: CompareConfig, name: str) -> dict:
    """build_app arguments of one app: deploy/config.yaml, the shared overrides, then the policy's own."""
    return {**deploy_args(), **config.app_args, **config.policy_args.get(policy, {}), "policy": policy,
            "admin_token": ADMIN_TOKEN, "app_name": name}


@contextlib.contextmanager
def serve_app(args: dict, *, ready_timeout_s: float = 600.0) -> Iterator[tuple[str, float]]:
    """A fresh local Ray cluster serving `build_app(args)` on a free port; yields (base URL, startup s).

    Startup counts from `ray.init` until /health answers (profiling pass and calibration included). The
    cluster (and every worker of the app) is shut down on exit.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from deploy.app import build_app

    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=args.get("app_name", "vibe"), route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, started + ready_timeout_s)
        yield base, time.monotonic() - started
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


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


async def wait_idle(base: str, timeout_s: float = 120.0) -> None:
    """Until the engine has no running or waiting request (cut-off requests are aborted server-side)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        while time.monotonic() < deadline:
            text = (await http.get("/metrics")).text
            busy = [line for line in text.splitlines()
                    if line.startswith(("vibe_num_requests_running ", "vibe_num_requests_waiting "))
                    and float(line.split()[-1]) > 0]
            if not busy:
                return
            await asyncio.sleep(0.5)


async def model_name(base: str) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        return (await http.get("/v1/models")).json()["data"][0]["id"]


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


# --- the experiment --------------------------------------------------------------------------------

def record_json(record: RunRecord, **extra) -> dict:
    """A run as JSON: request results as columns (compact), polls, recalibrations, step-time counters."""
    columns = {name: [getattr(r, name) for r in record.results]
               for name in ("index", "workload", "sent_s", "ttft_s", "e2e_s", "prompt_tokens", "output_tokens",
                            "error")}
    return {**extra, "started_wall": record.started_wall, "duration_s": record.duration_s, "results": columns,
            "polls": record.polls, "recalibrations": record.recalibrations, "step_seconds": record.step_seconds}


def results_from_json(run: dict) -> list[RequestResult]:
    """The RequestResults of a run written by `record_json`."""
    columns = run["results"]
    return [RequestResult(*row) for row in zip(*(columns[name] for name in (
        "index", "workload", "sent_s", "ttft_s", "e2e_s", "prompt_tokens", "output_tokens", "error")))]


class Experiment:
    """The state of one side-by-side run: config, prompts, the SLO once known, results so far."""

    def __init__(self, config: CompareConfig, out: Path, *, progress: bool = True) -> None:
        self.config = config
        self.out = out
        self.progress = progress
        self.prompts = load_workloads(config.workloads)
        self.slo: SLO | None = None
        self.extra_rate: Frontier | None = None
        self.result: dict = {"config": asdict(config), "machine": machine_info(), "policies": {}}

    def trace(self, rate: float, seed: int | None = None, duration_s: float | None = None):
        phases = ((0.0, self.config.workloads),)
        return make_trace(TraceConfig(rate, duration_s or self.config.duration_s, phases,
                                      self.config.seed if seed is None else seed), self.prompts)

    def run_policy(self, policy: str) -> dict:
        """Start the policy's app, measure it, write the JSON so far; returns the policy's record."""
        args = app_args_for(policy, self.config, f"bench-{policy}")
        with serve_app(args) as (base, startup_s):
            entry = asyncio.run(self._measure(base, policy))
        entry = {"app_args": {k: v for k, v in args.items() if k != "admin_token"}, "startup_s": startup_s,
                 **entry}
        self.result["policies"][policy] = entry
        self.save()
        return entry

    async def _measure(self, base: str, policy: str) -> dict:
        cfg = self.config
        client = ClientConfig(base_url=base, model=await model_name(base), drain_s=cfg.drain_s,
                              admin_token=ADMIN_TOKEN)
        warm = await run_trace(client, self.trace(cfg.warmup_rate, cfg.seed + 1000, cfg.warmup_s),
                               desc=f"{policy} warm-up", progress=self.progress)
        await wait_idle(base)
        unloaded = await unloaded_latency(client, self.trace(cfg.rates[0]), cfg.unloaded_requests,
                                          cfg.unloaded_max_tokens)
        if self.slo is None:
            self.slo = SLO.from_unloaded(unloaded, cfg.ttft_factor, cfg.tpot_factor, cfg.target)
            self.result["slo"] = asdict(self.slo) | {"set_by": policy}
        runs = []
        for rate in cfg.rates:
            runs.append(await self._run_rate(client, policy, rate, "sweep"))
            if runs[-1]["summary"]["attainment"] < cfg.stop_below:
                break
        entry = {"warmup": record_json(warm), "unloaded": record_json(_unloaded_record(unloaded)),
                 "runs": runs}
        entry["frontier"] = asdict(self._frontier(runs))
        if policy == "eplb" and self.extra_rate is None:
            self.extra_rate = self._frontier(runs)
        if self.extra_rate is not None:
            entry["at_eplb_frontier"] = await self._run_rate(client, policy, self.extra_rate.rate_rps, "eplb_frontier")
        return entry

    async def _run_rate(self, client: ClientConfig, policy: str, rate: float, kind: str) -> dict:
        record = await run_trace(client, self.trace(rate), desc=f"{policy} {rate:.2f} req/s",
                                 progress=self.progress)
        await wait_idle(client.base_url)
        placement = await _placement_summary(client)
        summary = summarize(record.results, self.slo, record.duration_s)
        print(f"  {policy:>10} {kind:>13} rate={rate:5.2f} attainment={summary['attainment']:.3f} "
              f"p90_ttft_ms={_ms(summary['ttft_p90_ms'])} p90_tpot_ms={_ms(summary['tpot_p90_ms'])} "
              f"failed={summary['failed']}", flush=True)
        return record_json(record, rate_rps=rate, kind=kind, summary=summary, placement=placement)

    def _frontier(self, runs: list[dict]) -> Frontier:
        return frontier([r["rate_rps"] for r in runs], [r["summary"]["attainment"] for r in runs],
                        self.config.target)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "compare.json").write_text(json.dumps(self.result, indent=None, separators=(",", ":")))


def _unloaded_record(results: list[RequestResult]) -> RunRecord:
    return RunRecord(started_wall=time.time(), duration_s=sum(r.e2e_s or 0.0 for r in results), results=results)


async def _placement_summary(client: ClientConfig) -> dict:
    """Predicted per-layer device times of the current placement on the window loads (from /admin/placement):
    the MoE layers' predicted critical path per forward pass, sum_l max_g, and the version."""
    from load_tests.generator import fetch_admin

    async with httpx.AsyncClient(base_url=client.base_url, timeout=60) as http:
        view = await fetch_admin(http, client.admin_token, "/admin/placement")
    times = [layer["device_predicted_s"] for layer in view["layers"]]
    slots = [[sum(1 for s in layer["slots"] if s["device"] == d) for d in range(view["num_devices"])]
             for layer in view["layers"]]
    return {"version": view["version"], "device_predicted_s": times, "slots_per_device": slots,
            "moe_critical_path_s": sum(max(row) for row in times)}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def machine_info() -> dict:
    import platform

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--rates", type=float, nargs="+", help="swept request rates, req/s")
    parser.add_argument("--duration", type=float, help="seconds of arrivals per swept rate")
    parser.add_argument("--policies", nargs="+", choices=POLICY_ORDER)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-drift", action="store_true", help="skip the drift scenarios")
    parser.add_argument("--no-scale", action="store_true", help="skip the scale study")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("rates", tuple(args.rates or ())), ("duration_s", args.duration),
                                   ("policies", tuple(args.policies or ())), ("seed", args.seed)) if v}
    config = replace(DEFAULT, **overrides)
    started = time.monotonic()
    experiment = Experiment(config, args.out, progress=not args.no_progress)
    for policy in config.policies:
        print(f"== {policy}", flush=True)
        experiment.run_policy(policy)
    experiment.result["runtime_s"] = time.monotonic() - started
    experiment.result["machine"]["loadavg_end"] = os.getloadavg()
    experiment.save()
    return finish(args, experiment.result)


def finish(args: argparse.Namespace, result: dict) -> int:
    """Drift scenarios and scale study (unless skipped), plots, report, and the summary lines."""
    from load_tests import drift, report, scale

    extras = {}
    if not args.no_drift:
        extras["drift"] = drift.run_all(args.out, progress=not args.no_progress)
    if not args.no_scale:
        extras["scale"] = scale.run(args.out)
    lines = report.write(args.out, result, **extras)
    for line in lines:
        print(line)
    return 0


# Service knobs of the comparison (see the report): deploy/config.yaml, at equal expert memory per device.
DEFAULT = CompareConfig()


if __name__ == "__main__":
    sys.exit(main())
