"""Drift scenarios: `python -m load_tests.drift --out bench` (or `python -m load_tests.compare --drift`).

Owns two scenarios on the emulated cluster of `deploy/config.yaml` with the `vibe` policy. Each starts
two apps together, static (`auto_recalibrate: false`) and adaptive (`true`), and sends both the same
trace at the same time, so both see the same machine:

- workload drift: the prompts switch from prose (sharegpt_like, sonnet_like) to code `switch_s` into the
  trace;
- device drift: one emulated device throttles to 0.8x (`emulation.drift`). Its step is scheduled in
  seconds after the device's worker started, which a client cannot see, so the trace starts
  `device_drift_at_s - switch_s` after the cluster was asked to start (the step falls at `switch_s` plus
  the workers' start-up delay) and the onset is then read from the static app's polls: the first poll
  where the device's observed/predicted time ratio, relative to the other devices', has risen halfway to
  the throttle.

"After" numbers count requests sent from the onset on (workload: `switch_s`). Writes `<out>/drift.json`
and `<out>/drift.png` (TTFT over time with the onset and the recalibrations marked, from /admin/stats
`recalibrations` and their `started_at`). Ignores the side-by-side comparison (see `compare`), whose app
start and SLO it reuses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from load_tests.compare import (
    DEFAULT,
    app_args_for,
    client_for,
    record_json,
    serve_apps,
    unloaded_latency,
    wait_idle,
)
from load_tests.generator import RequestResult, TraceConfig, make_trace, run_trace
from load_tests.slo import SLO, summarize
from load_tests.workloads import CODE, PROSE, load_workloads

SCENARIOS = ("workload", "device")
MODES = ("static", "adaptive")


@dataclass(frozen=True)
class DriftConfig:
    """The drift scenarios.

    Attributes:
        policy: placement policy of every app.
        rate_rps: request rate of each app's trace (both apps of a scenario are loaded at once).
        duration_s: arrivals span this many seconds.
        switch_s: seconds into the trace when the prompts switch (workload) or the throttle is due (device).
        throttled_device, throttle_to: the device drift: device index and its speed multiplier.
        device_drift_at_s: when the device throttles, in seconds after its worker started; must leave
            room for the apps' start-up and warm-up before `switch_s` into the trace.
        warmup_s: a warm-up trace of prose prompts before the measured trace.
        max_tokens_cap: as in the side-by-side run.
        seed: trace seed (the same trace for static and adaptive).
        slo_factors: (TTFT, TPOT) multiples of the unloaded medians when no SLO is passed in.
    """

    policy: str = "vibe"
    rate_rps: float = 0.5
    duration_s: float = 100.0
    switch_s: float = 40.0
    throttled_device: int = 0
    throttle_to: float = 0.8
    device_drift_at_s: float = 240.0
    warmup_s: float = 20.0
    max_tokens_cap: int | None = DEFAULT.max_tokens_cap
    seed: int = 7
    slo_factors: tuple[float, float] = (DEFAULT.ttft_factor, DEFAULT.tpot_factor)

    def __post_init__(self) -> None:
        if not 0 < self.switch_s < self.duration_s:
            raise ValueError(f"switch_s must lie in (0, duration_s={self.duration_s}), got {self.switch_s}")
        for name in ("rate_rps", "throttle_to", "warmup_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DriftConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.device_drift_at_s <= self.switch_s:
            raise ValueError(f"device_drift_at_s must exceed switch_s, got {self.device_drift_at_s}")


def scenario_args(scenario: str, mode: str, config: DriftConfig) -> dict:
    """build_app arguments of one (scenario, mode) app."""
    args = app_args_for(config.policy, DEFAULT, f"drift-{scenario}-{mode}")
    args["auto_recalibrate"] = mode == "adaptive"
    if scenario == "device":
        emulation = dict(args.get("emulation", {}))
        emulation["drift"] = {config.throttled_device: [[config.device_drift_at_s, config.throttle_to]]}
        args["emulation"] = emulation
    return args


def throttle_onset(polls: list[dict], device: int, planned_s: float, throttle_to: float) -> float | None:
    """Seconds into the run when `device` was first seen throttled, from /admin/stats polls.

    The signal is the device's observed/predicted time ratio over the median of the other devices' (the
    shared load-dependent throttling cancels). Its baseline is the median before `planned_s`; the onset is
    the first poll from `planned_s` on where it exceeds the baseline by half the throttle's slowdown.
    None when there is no baseline or no such poll.
    """
    signal = []
    for poll in polls:
        ratios = np.array([np.nan if r is None else r for r in poll["devices"]], dtype=np.float64)
        others = np.delete(ratios, device)
        if np.isfinite(ratios[device]) and np.any(np.isfinite(others)):
            signal.append((poll["t"], ratios[device] / np.nanmedian(others)))
    baseline = [value for t, value in signal if t < planned_s]
    if not baseline:
        return None
    threshold = float(np.median(baseline)) * (1.0 + 0.5 * (1.0 / throttle_to - 1.0))
    return next((t for t, value in signal if t >= planned_s and value >= threshold), None)


def segments(results: list[RequestResult], slo: SLO, split_s: float, onset_s: float, duration_s: float) -> dict:
    """Summaries of requests sent before `split_s` and from `onset_s` on (None for an empty segment)."""
    parts = {"before": ([r for r in results if r.sent_s < split_s], split_s),
             "after": ([r for r in results if r.sent_s >= onset_s], max(duration_s - onset_s, 1e-9))}
    return {name: summarize(rs, slo, span) if rs else None for name, (rs, span) in parts.items()}


class DriftRun:
    """Runs the scenarios; keeps the SLO (passed in, or set by the first apps' unloaded latency)."""

    def __init__(self, config: DriftConfig, out: Path, slo: SLO | None, progress: bool) -> None:
        self.config = config
        self.out = out
        self.slo = slo
        self.progress = progress
        self.result: dict = {"config": asdict(config), "scenarios": {}}

    @cached_property
    def prompts(self) -> dict:
        return load_workloads((*PROSE, *CODE))

    def trace_config(self, scenario: str, warmup: bool = False) -> TraceConfig:
        cfg = self.config
        if warmup:
            return TraceConfig(cfg.rate_rps, cfg.warmup_s, ((0.0, PROSE),), cfg.seed + 1000, cfg.max_tokens_cap)
        phases = ((0.0, PROSE),) if scenario == "device" else ((0.0, PROSE), (cfg.switch_s, CODE))
        return TraceConfig(cfg.rate_rps, cfg.duration_s, phases, cfg.seed, cfg.max_tokens_cap)

    def run(self, scenario: str) -> dict:
        """Both modes of one scenario, loaded at the same time; returns {mode: run}."""
        apps = {f"drift-{scenario}-{mode}": scenario_args(scenario, mode, self.config) for mode in MODES}
        asked = time.monotonic()
        with serve_apps(apps) as (bases, startup_s):
            modes = asyncio.run(self._measure(scenario, dict(zip(MODES, bases.values())), asked))
        self.result["scenarios"][scenario] = {"startup_s": startup_s, **modes}
        self.save()
        return modes

    async def _measure(self, scenario: str, bases: dict[str, str], asked: float) -> dict:
        cfg = self.config
        clients = {mode: await client_for(base) for mode, base in bases.items()}
        warm = make_trace(self.trace_config(scenario, warmup=True), self.prompts)
        if self.slo is None:
            unloaded = [r for c in clients.values() for r in await unloaded_latency(
                c, warm, DEFAULT.unloaded_requests, DEFAULT.unloaded_max_tokens)]
            self.slo = SLO.from_unloaded(unloaded, *cfg.slo_factors, DEFAULT.target)
            self.result["slo"] = asdict(self.slo) | {"set_by": f"{scenario} apps, unloaded, pooled"}
        await asyncio.gather(*(run_trace(c, warm, progress=False) for c in clients.values()))
        for client in clients.values():
            await wait_idle(client.base_url)
        lead_s = None
        if scenario == "device":  # start so that the scheduled throttle falls switch_s (plus start-up) in
            await asyncio.sleep(max(0.0, asked + cfg.device_drift_at_s - cfg.switch_s - time.monotonic()))
            lead_s = time.monotonic() - asked
        trace = make_trace(self.trace_config(scenario), self.prompts)
        records = await asyncio.gather(*(run_trace(c, trace, desc=f"{scenario} {m}", progress=self.progress)
                                         for m, c in clients.items()))
        return self._entries(scenario, dict(zip(clients, records)), lead_s)

    def _entries(self, scenario: str, records: dict, lead_s: float | None) -> dict:
        cfg = self.config
        onset = cfg.switch_s
        if scenario == "device":
            onset = throttle_onset(records["static"].polls, cfg.throttled_device, cfg.switch_s, cfg.throttle_to)
        entries = {"trace_start_after_asked_s": lead_s, "onset_s": onset}
        for mode, record in records.items():
            split = cfg.switch_s if onset is None else onset
            entries[mode] = record_json(record, summary=summarize(record.results, self.slo, record.duration_s),
                                        segments=segments(record.results, self.slo, cfg.switch_s, split,
                                                          cfg.duration_s))
            after = entries[mode]["segments"]["after"] or {}
            print(f"  {scenario:>8} {mode:>8} onset={onset} after: attainment={after.get('attainment')} "
                  f"p90_ttft_ms={after.get('ttft_p90_ms')} recalibrations={len(record.recalibrations)}", flush=True)
        return entries

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "drift.json").write_text(json.dumps(self.result, separators=(",", ":")))


def run_all(out: Path, config: DriftConfig = DriftConfig(), *, slo: SLO | None = None,
            progress: bool = True) -> dict:
    """Both scenarios; writes drift.json and drift.png; returns the result."""
    from load_tests import plots

    runner = DriftRun(config, out, slo, progress)
    if slo is not None:
        runner.result["slo"] = asdict(slo) | {"set_by": "the side-by-side run"}
    for scenario in SCENARIOS:
        print(f"== drift: {scenario}", flush=True)
        runner.run(scenario)
    plots.drift_timeline(runner.result, out / "drift.png")
    return runner.result


def verdicts(result: dict) -> dict[str, dict]:
    """Per scenario: after-onset attainment and P90 TTFT / TPOT, static vs adaptive, and whether adaptive
    won (higher attainment, or the same attainment to 0.001 and a lower P90 TTFT)."""
    out = {}
    for scenario, entry in result["scenarios"].items():
        if not all(entry.get(mode, {}).get("segments", {}).get("after") for mode in MODES):
            continue
        after = {mode: entry[mode]["segments"]["after"] for mode in MODES}
        key = {m: (round(a["attainment"], 3), -(a["ttft_p90_ms"] or float("inf"))) for m, a in after.items()}
        out[scenario] = {**{f"{m}_{k}": after[m][k] for m in MODES for k in ("attainment", "ttft_p90_ms",
                                                                             "tpot_p90_ms")},
                         "adaptive_wins": key["adaptive"] > key["static"], "onset_s": entry.get("onset_s"),
                         "recalibrations_adaptive": len(entry["adaptive"]["recalibrations"])}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.drift", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--rate", type=float, help="request rate per app, req/s")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = DriftConfig() if args.rate is None else replace(DriftConfig(), rate_rps=args.rate)
    result = run_all(args.out, config, slo=_slo_from(args.out / "compare.json"), progress=not args.no_progress)
    for scenario, verdict in verdicts(result).items():
        print(f"drift={scenario} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in verdict.items()))
    return 0


def _slo_from(path: Path) -> SLO | None:
    """The SLO of an earlier side-by-side run in the same folder, so drift numbers use the same bar."""
    if not path.is_file():
        return None
    slo = json.loads(path.read_text()).get("slo")
    return None if slo is None else SLO(slo["ttft_s"], slo["tpot_s"], slo["target"])

if __name__ == "__main__":
    sys.exit(main())
