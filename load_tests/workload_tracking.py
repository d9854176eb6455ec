"""How the coordinator judges workload drift: `python -m load_tests.workload_tracking --out bench`.

Owns a what-if of the workload side of recalibration as the coordinator runs it, on the placement
simulator: the served model's routing (its router loads over the prefill of the shipped prompts), the
passes of a continuous-batching engine (Poisson arrivals; each request's prompt prefilled in the pass it
arrives in, then 64 one-token decode passes; the engine runs no pass when idle), every token routed to
top-k experts drawn from those loads (`headroom.draw_steps`), on the default emulated cluster's devices
at their sustained-load speed. `placement.WorkloadDriftDetector` with the coordinator's settings sees
every pass; at each report both candidates of the coordinator's "auto" mode (the incremental re-balance,
a full vibe re-plan) are judged and the better one applied if it pays, as `Coordinator.recalibrate` does.

Judges (the rule that decides whether a re-plan pays; migration cost as the coordinator computes it at
1 GB/s, the tiny model's experts cost microseconds):
- "in sample": the predicted gain on the window the candidate was planned on (vibe-serve up to commit
  c51c8a7);
- "held out": `placement.held_out_gain` (plan on one interleaved half of the window, time every pass
  of the other under both placements), its mean; a window with fewer than 20 passes is not judged;
- "held out, 2 SE": that mean less two standard errors;
- "held out, 2 SE; device drift at the mean": two standard errors on workload drift, the mean on a
  re-plan device drift asks for (the coordinator's defaults, `gain_confidence_z` and
  `device_drift_confidence_z`).

Scenarios (the change at pass `CHANGE_AT`): unchanged prose at 2, 4 and 16 sequences on average; prose
switching to code at 4 and 16 (the workload drift of `make bench`); the batch growing from 1 to 16
sequences (the batch-size trigger's case); device 7 (the slowest) slowed to 0.8x at 4 and 16 sequences.
Reported per judge, mean over seeds: re-plans applied after the startup plan, experts moved, the saving
per pass the judge credited the applied re-plans with (held out: after its standard errors), and the MoE
critical path per pass (sum over layers of the slowest device's time under the placement in service, on
the devices' true curves) over the whole run and over the passes after the change, next to "static" (the startup plan kept) and "re-planned once" (a plan made, at the
start and at the change, on 1000 passes of the true state: what a recalibration can reach). Writes
`<out>/workload_tracking.json`.

Ignores what a migration costs the engine while it runs (`make bench-migration`: about 0.1 s from the
trigger to the first step on the new placement, a few longer steps): every re-plan here is free apart
from its transfer time, which favours the judges that re-plan more.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import placement as pl
from load_tests.headroom import cluster_devices, draw_steps, workload_loads
from service.coordinator import CoordinatorConfig

CHANGE_AT = 1500  # passes with load before the change
PASSES = 3000
DECODE_TOKENS = 64
PROMPT_TOKENS = (50, 300)  # prefill tokens per request, uniform
PROFILE_TOKENS = 512  # the startup profiling pass the first placement is planned on
DEFAULTS = CoordinatorConfig(checkpoint="")  # the coordinator's settings this what-if runs with
BANDWIDTH = DEFAULTS.bandwidth_bytes_per_s
HORIZON = DEFAULTS.gain_horizon_passes


@dataclass(frozen=True)
class Scenario:
    """Mean sequences in flight and routing ("prose" or "code") before and after the change; `slowed`:
    (device, speed factor) from the change on, its model known at once (the device tracker's refit) and a
    re-plan asked for then (its `due`)."""

    before: float
    after: float
    routing_before: str = "prose"
    routing_after: str = "prose"
    slowed: tuple[int, float] | None = None


SCENARIOS: dict[str, Scenario] = {
    "prose, 2 sequences": Scenario(2, 2),
    "prose, 4 sequences": Scenario(4, 4),
    "prose, 16 sequences": Scenario(16, 16),
    "prose -> code, 4 sequences": Scenario(4, 4, routing_after="code"),
    "prose -> code, 16 sequences": Scenario(16, 16, routing_after="code"),
    "1 -> 16 sequences": Scenario(1, 16),
    "device 7 to 0.8x, 4 sequences": Scenario(4, 4, slowed=(7, 0.8)),
    "device 7 to 0.8x, 16 sequences": Scenario(16, 16, slowed=(7, 0.8)),
}
COORDINATOR = "held out, 2 SE; device drift at the mean"  # the coordinator's defaults now
# name: standard errors below the held-out mean a re-plan is judged at, on workload drift and on device drift
# (None: judged in sample)
JUDGES: dict[str, tuple[float | None, float | None]] = {
    "in sample": (None, None), "held out": (0.0, 0.0), "held out, 2 SE": (2.0, 2.0),
    COORDINATOR: (DEFAULTS.gain_confidence_z, DEFAULTS.device_drift_confidence_z)}


@dataclass(frozen=True)
class Setting:
    """What every run shares: the routing states (shares [L, E] per name), top-k and the devices."""

    shares: dict[str, np.ndarray]
    top_k: int
    devices: list[pl.DeviceModel]
    expert_bytes: int


def engine_passes(rng: np.random.Generator, setting: Setting, scenario: Scenario,
                  passes: int = PASSES, change_at: int = CHANGE_AT) -> np.ndarray:
    """float [passes, L, E]: router counts of the engine passes with load of one run of `scenario`."""
    out, remaining = [], []  # decode tokens left per running request
    while len(out) < passes:
        changed = len(out) >= change_at
        arrivals = rng.poisson((scenario.after if changed else scenario.before) / DECODE_TOKENS)
        prefill = int(rng.integers(*PROMPT_TOKENS, size=arrivals).sum())
        remaining = [r - 1 for r in remaining if r > 1] + [DECODE_TOKENS] * arrivals
        tokens = prefill + len(remaining) - arrivals  # a request's first pass is its prefill
        if tokens:
            shares = setting.shares[scenario.routing_after if changed else scenario.routing_before]
            out.append(draw_steps(shares, tokens, setting.top_k, 1, rng)[0])
    return np.stack(out)


def judge_gain(judge: str, old: pl.Placement, new: pl.Placement, replan: Callable, window: np.ndarray,
               devices: list[pl.DeviceModel], device_drift: bool) -> float:
    """Seconds over the horizon the judge credits `new` with (before the migration cost), on a workload
    drift or (`device_drift`) a device's."""
    z = JUDGES[judge][device_drift]
    if z is None:
        return pl.predicted_gain(old, new, window.mean(axis=0), devices, HORIZON, (window > 0).mean(axis=0))
    if len(window) < DEFAULTS.min_held_out_passes:
        return -np.inf  # too few passes to judge on: as the coordinator, skip
    return HORIZON * pl.held_out_gain(old, replan, window, devices).lower(z)


def devices_of(setting: Setting, scenario: Scenario) -> tuple[list[pl.DeviceModel], list[pl.DeviceModel]]:
    """The devices before and after the change."""
    after = list(setting.devices)
    if scenario.slowed is not None:
        device, factor = scenario.slowed
        after[device] = after[device].scaled(1.0 / factor)
    return setting.devices, after


def follow(judge: str, passes: np.ndarray, profile: np.ndarray, setting: Setting, scenario: Scenario,
           change_at: int = CHANGE_AT) -> dict:
    """Serve `passes` under `judge`: re-plans, experts moved, MoE critical path per pass (seconds)."""
    devices, slowed = devices_of(setting, scenario)
    placement = pl.plan(profile, devices, "vibe")
    detector = pl.WorkloadDriftDetector(  # as the coordinator builds it
        np.ones_like(profile), check_every=DEFAULTS.drift_check_every, window=DEFAULTS.drift_window,
        threshold=DEFAULTS.drift_threshold, cooldown=DEFAULTS.drift_cooldown, volume_factor=DEFAULTS.drift_volume_factor)
    detector.reset(profile, volume=float(profile.sum()) / profile.shape[0])
    applied = moved = 0
    credited = []  # seconds per pass the judge credited each applied re-plan with
    served = [(0, placement)]  # (first pass, placement in service from it)
    for t, counts in enumerate(passes):
        reported, device_drift = detector.observe(counts) is not None, False
        if t + 1 == change_at and scenario.slowed is not None:
            devices, reported, device_drift = slowed, True, True  # the model is refitted, a re-plan due
        if not reported:
            continue
        window = detector.window_passes()
        loads, activity = window.mean(axis=0), (window > 0).mean(axis=0)
        best = None
        def incremental(ld, act, old=placement, models=devices):
            return pl.rebalance(old, ld, models, eps=DEFAULTS.eps, activity=act)[0]

        def full(ld, act, models=devices):
            return pl.plan(ld, models, "vibe", activity=act)

        for replan in (incremental, full):
            new = replan(loads, activity)
            plan = pl.migration_plan(placement, new, setting.expert_bytes)
            gain = 0.0 if plan.num_moves == 0 else judge_gain(judge, placement, new, replan, window, devices,
                                                              device_drift)  # no change: nothing to judge
            net = gain - plan.transfer_seconds(BANDWIDTH)
            if best is None or net > best[0]:
                best = (net, new, plan, gain)
        net, new, plan, gain = best
        if plan.num_moves == 0:
            detector.reset(loads)
        elif net > 0:  # in service from the next pass
            applied, moved, placement = applied + 1, moved + plan.num_moves, new
            credited.append(gain / HORIZON)
            served.append((t + 1, placement))
            detector.reset(loads)
        else:
            detector.cool_down()
    return {"applied": applied, "moved": moved, "credited_s": credited,
            "critical_s": served_paths(served, passes, *devices_of(setting, scenario), change_at)}


def served_paths(served: list[tuple[int, pl.Placement]], passes: np.ndarray, before: list[pl.DeviceModel],
                 after: list[pl.DeviceModel], change_at: int) -> np.ndarray:
    """Seconds [N]: each pass's MoE critical path under the placement in service at that pass (`served`:
    (first pass, placement) in order), on the true devices (`before` up to the change, `after` from it)."""
    bounds = [start for start, _ in served[1:]] + [len(passes)]
    out = np.empty(len(passes))
    for (start, placement), end in zip(served, bounds, strict=True):
        for lo, hi, devices in ((start, min(end, change_at), before), (max(start, change_at), end, after)):
            if lo < hi:
                out[lo:hi] = pl.pass_critical_paths(placement, passes[lo:hi], devices)
    return out


def reference_paths(rng: np.random.Generator, passes: np.ndarray, profile: np.ndarray, setting: Setting,
                    scenario: Scenario, change_at: int = CHANGE_AT) -> dict[str, np.ndarray]:
    """Critical path per pass (seconds) of "static" (the startup plan) and "re-planned once" (plans made
    on 1000 passes of the state before and of the state after the change, with its devices)."""
    before, after = devices_of(setting, scenario)
    static = pl.plan(profile, before, "vibe")
    once = []
    for state, devices in ((Scenario(scenario.before, scenario.before, scenario.routing_before, scenario.routing_before),
                            before),
                           (Scenario(scenario.after, scenario.after, scenario.routing_after, scenario.routing_after),
                            after)):
        sample = engine_passes(rng, setting, state, passes=1000, change_at=1000)
        once.append((0 if devices is before else change_at,
                     pl.plan(sample.mean(axis=0), devices, "vibe", activity=(sample > 0).mean(axis=0))))
    return {"static": served_paths([(0, static)], passes, before, after, change_at),
            "re-planned once": served_paths(once, passes, before, after, change_at)}


def served_setting() -> Setting:
    """The served model's prose and code routing on the default emulated cluster."""
    from deploy.app import AppArgs
    from load_tests.compare import deploy_args

    app_args = deploy_args()
    model_dir = Path(AppArgs.model_validate(app_args).model)
    config = json.loads((model_dir / "config.json").read_text())
    shares = {name: loads / loads.sum(axis=1, keepdims=True) for name, loads in (
        ("prose", workload_loads(model_dir, ("sharegpt_like", "sonnet_like"))), ("code", workload_loads(model_dir, ("code",))))}
    expert_bytes = 3 * config["hidden_size"] * config["moe_intermediate_size"] * 4  # float32 weights
    return Setting(shares, int(config["num_experts_per_tok"]), cluster_devices(app_args), expert_bytes)


def run(out: Path | None, *, seeds: int = 6, scenarios: dict = SCENARIOS, setting: Setting | None = None,
        passes: int = PASSES, change_at: int = CHANGE_AT) -> dict:
    """Every scenario x judge over `seeds` seeds (the same passes for every judge of a seed); writes
    `<out>/workload_tracking.json` unless `out` is None; returns the result."""
    setting = setting or served_setting()
    started, rows = time.perf_counter(), []
    for name, scenario in scenarios.items():
        per_seed = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            drawn = engine_passes(rng, setting, scenario, passes, change_at)
            profile = draw_steps(setting.shares[scenario.routing_before], PROFILE_TOKENS, setting.top_k, 1, rng)[0]
            runs = {judge: follow(judge, drawn, profile, setting, scenario, change_at) for judge in JUDGES}
            runs |= {ref: {"critical_s": paths} for ref, paths in
                     reference_paths(rng, drawn, profile, setting, scenario, change_at).items()}
            per_seed.append(runs)
        for rule in (*JUDGES, "static", "re-planned once"):
            runs = [seed_runs[rule] for seed_runs in per_seed]
            rows.append({
                "scenario": name, "rule": rule,
                "applied": float(np.mean([r["applied"] for r in runs])) if rule in JUDGES else None,
                "moved": float(np.mean([r["moved"] for r in runs])) if rule in JUDGES else None,
                "credited_ms_per_pass": (1e3 * float(np.mean([g for r in runs for g in r["credited_s"]] or [0.0]))
                                         if rule in JUDGES else None),
                "moe_ms": 1e3 * float(np.mean([r["critical_s"].mean() for r in runs])),
                "moe_ms_after": 1e3 * float(np.mean([r["critical_s"][change_at:].mean() for r in runs])),
            })
    result = {"config": {"passes": passes, "change_at": change_at, "seeds": seeds, "decode_tokens": DECODE_TOKENS,
                         "prompt_tokens": list(PROMPT_TOKENS), "horizon_passes": HORIZON, "bandwidth_bytes_per_s": BANDWIDTH},
              "rows": rows, "runtime_s": time.perf_counter() - started}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "workload_tracking.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.workload_tracking", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--seeds", type=int, default=6)
    args = parser.parse_args(argv)
    result = run(args.out, seeds=args.seeds)
    for row in result["rows"]:
        counts = "" if row["applied"] is None else (f" re-plans={row['applied']:5.2f} moved={row['moved']:6.1f} "
                                                    f"credited={row['credited_ms_per_pass']:.3f}")
        print(f"{row['scenario']:>28} {row['rule']:>16}{counts:>30} moe_ms={row['moe_ms']:.3f} "
              f"after={row['moe_ms_after']:.3f}")
    print(f"wrote {args.out}/workload_tracking.json in {result['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
