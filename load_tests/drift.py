"""Drift scenarios: `python -m load_tests.drift --out bench` (also run by `make bench`).

Owns two scenarios, each served twice with the same trace, once static (`auto_recalibrate: false`) and
once adaptive (`true`), on the emulated cluster of `deploy/config.yaml` with the `vibe` policy:

- workload drift: the prompts switch mid-run from prose (sharegpt_like, sonnet_like) to code;
- device drift: one emulated device throttles to 0.8x mid-run (`emulation.drift`, scheduled in seconds
  after the device started; the trace is started so that the step falls `switch_s` into it, within the
  uncertainty of when the workers started, which the JSON records).

Writes `<out>/drift.json` and `<out>/drift.png` (TTFT over time with the switch and the recalibration
events marked, from /admin/stats `recalibrations` and their `started_at`). Ignores the side-by-side
comparison (see `compare`), whose app start and SLOs it reuses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from load_tests.compare import (
    ADMIN_TOKEN,
    DEFAULT,
    app_args_for,
    model_name,
    record_json,
    serve_app,
    unloaded_latency,
    wait_idle,
)
from load_tests.generator import ClientConfig, TraceConfig, make_trace, run_trace
from load_tests.slo import SLO, summarize
from load_tests.workloads import CODE, PROSE, load_workloads

SCENARIOS = ("workload", "device")
MODES = ("static", "adaptive")


@dataclass(frozen=True)
class DriftConfig:
    """The drift scenarios.

    Attributes:
        policy: placement policy of every app.
        rate_rps: request rate of every trace.
        duration_s: arrivals span this many seconds; the drift happens `switch_s` into them.
        switch_s: seconds into the trace when the prompts switch (workload) or the device throttles.
        throttled_device, throttle_to: the device drift: device index and its speed multiplier.
        device_drift_at_s: when the device throttles, in seconds after its worker started (the trace
            starts so that this falls `switch_s` into it; must exceed the app's startup plus warm-up).
        warmup_s: a warm-up trace of the first phase's prompts before the measured trace.
        seed: trace seed (the same trace for static and adaptive).
        slo_factors: (TTFT, TPOT) multiples of the unloaded medians when no SLO is passed in.
    """

    policy: str = "vibe"
    rate_rps: float = 2.0
    duration_s: float = 90.0
    switch_s: float = 40.0
    throttled_device: int = 0
    throttle_to: float = 0.8
    device_drift_at_s: float = 150.0
    warmup_s: float = 20.0
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


class DriftRun:
    """Runs the scenarios; keeps the SLO (passed in, or set by the first app's unloaded latency)."""

    def __init__(self, config: DriftConfig, out: Path, slo: SLO | None, progress: bool) -> None:
        self.config = config
        self.out = out
        self.slo = slo
        self.progress = progress
        self.prompts = load_workloads((*PROSE, *CODE))
        self.result: dict = {"config": asdict(config), "scenarios": {}}

    def trace_config(self, scenario: str, warmup: bool = False) -> TraceConfig:
        cfg = self.config
        if warmup:
            return TraceConfig(cfg.rate_rps, cfg.warmup_s, ((0.0, PROSE),), cfg.seed + 1000)
        switch = ((0.0, PROSE),) if scenario == "device" else ((0.0, PROSE), (cfg.switch_s, CODE))
        return TraceConfig(cfg.rate_rps, cfg.duration_s, switch, cfg.seed)

    def run(self, scenario: str, mode: str) -> dict:
        args = scenario_args(scenario, mode, self.config)
        before_run = time.monotonic()
        with serve_app(args) as (base, startup_s):
            entry = asyncio.run(self._measure(base, scenario, mode, before_run))
        entry["startup_s"] = startup_s
        self.result["scenarios"].setdefault(scenario, {})[mode] = entry
        self.save()
        return entry

    async def _measure(self, base: str, scenario: str, mode: str, before_run: float) -> dict:
        client = ClientConfig(base_url=base, model=await model_name(base), admin_token=ADMIN_TOKEN)
        warm = make_trace(self.trace_config(scenario, warmup=True), self.prompts)
        if self.slo is None:
            unloaded = await unloaded_latency(client, warm, DEFAULT.unloaded_requests, DEFAULT.unloaded_max_tokens)
            self.slo = SLO.from_unloaded(unloaded, *self.config.slo_factors, DEFAULT.target)
            self.result["slo"] = asdict(self.slo) | {"set_by": f"{scenario} {mode} unloaded"}
        await run_trace(client, warm, desc=f"{scenario} {mode} warm-up", progress=self.progress)
        await wait_idle(base)
        entry = {}
        if scenario == "device":  # start so that the scheduled throttle falls switch_s into the trace
            lead = before_run + self.config.device_drift_at_s - self.config.switch_s - time.monotonic()
            await asyncio.sleep(max(0.0, lead))
            entry["trace_start_after_app_start_s"] = time.monotonic() - before_run
        trace = make_trace(self.trace_config(scenario), self.prompts)
        record = await run_trace(client, trace, desc=f"{scenario} {mode}", progress=self.progress)
        entry.update(record_json(record, summary=summarize(record.results, self.slo, record.duration_s)))
        entry["segments"] = self.segments(record.results)
        print(f"  {scenario:>8} {mode:>8} " + " ".join(
            f"{name}: attainment={s['attainment']:.3f} p90_ttft_ms={s['ttft_p90_ms']:.1f}"
            for name, s in entry["segments"].items() if s), flush=True)
        return entry

    def segments(self, results) -> dict:
        """Summaries before and after the switch (by send time); None for an empty segment."""
        cfg = self.config
        parts = {"before": [r for r in results if r.sent_s < cfg.switch_s],
                 "after": [r for r in results if r.sent_s >= cfg.switch_s]}
        span = {"before": cfg.switch_s, "after": cfg.duration_s - cfg.switch_s}
        return {name: summarize(rs, self.slo, span[name]) if rs else None for name, rs in parts.items()}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "drift.json").write_text(json.dumps(self.result, separators=(",", ":")))


def run_all(out: Path, config: DriftConfig = DriftConfig(), *, slo: SLO | None = None,
            progress: bool = True) -> dict:
    """Both scenarios, static then adaptive; writes drift.json and drift.png; returns the result."""
    from load_tests import plots

    runner = DriftRun(config, out, slo, progress)
    if slo is not None:
        runner.result["slo"] = asdict(slo) | {"set_by": "the side-by-side run"}
    for scenario in SCENARIOS:
        print(f"== drift: {scenario}", flush=True)
        for mode in MODES:
            runner.run(scenario, mode)
    plots.drift_timeline(runner.result, out / "drift.png")
    return runner.result


def verdicts(result: dict) -> dict[str, dict]:
    """Per scenario: post-switch attainment and P90 TTFT, static vs adaptive, and whether adaptive won
    (higher attainment, or equal attainment and lower P90 TTFT, after the switch)."""
    out = {}
    for scenario, modes in result["scenarios"].items():
        if set(modes) != set(MODES):
            continue
        after = {mode: modes[mode]["segments"]["after"] for mode in MODES}
        key = {m: (round(a["attainment"], 3), -(a["ttft_p90_ms"] or float("inf"))) for m, a in after.items()}
        out[scenario] = {**{f"{m}_{k}": after[m][k] for m in MODES for k in ("attainment", "ttft_p90_ms",
                                                                             "tpot_p90_ms")},
                         "adaptive_wins": key["adaptive"] > key["static"],
                         "recalibrations_adaptive": len(modes["adaptive"]["recalibrations"])}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.drift", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--rate", type=float, help="request rate, req/s")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = DriftConfig() if args.rate is None else replace(DriftConfig(), rate_rps=args.rate)
    slo = _slo_from(args.out / "compare.json")
    result = run_all(args.out, config, slo=slo, progress=not args.no_progress)
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
