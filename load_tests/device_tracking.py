"""How the coordinator follows a device's speed: `python -m load_tests.device_tracking --out bench`.

Owns a what-if of the device side of recalibration, `placement.DeviceDriftTracker` as the coordinator
runs it: one device's expert calls (10 per check, Poisson; a check is one pass of the coordinator's loop)
take `ratio(t)` x its profiled time with log-normal timing noise; at each check the tracker refits and
is asked whether a re-plan is due. Against the rule before it (vibe-serve up to commit 38c9ca3): refit
to the exponentially weighted observed / predicted ratio as soon as it passes the threshold, and re-plan
at every refit. Scenarios: steps (a device throttled or freed at once, as `make bench`'s device drift),
ramps (thermal throttling that builds up), a short spike, a device switching between two speeds, none.
Reports per scenario and noise level, over seeds: re-plans (each a migration), checks after the device's
last change until the model stays within 5% of the device for good (a run whose model is off by more at
its last check is censored: not within 5% by the end, counted apart), and the mean |log| error of the
model after the first change.
Writes `<out>/device_tracking.json`.

Ignores what a re-plan gains (the coordinator's judge weighs that against the migration) and the
timings' source: the emulator's jitter is 2%; timings of real kernels are noisier.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from placement import DeviceDriftTracker

THRESHOLD = 0.10  # the coordinator's device_drift_threshold
MIN_SAMPLES = 50  # its device_drift_min_samples
HALFLIFE = 50.0
CHANGE_AT = 100  # the check at which every scenario's device changes
CALLS_PER_CHECK = 10  # mean expert calls of the device between two checks (Poisson)

SCENARIOS: dict[str, Callable[[int], float]] = {
    "step to 1.4x": lambda t: 1.0 if t < CHANGE_AT else 1.4,
    "step to 1.25x": lambda t: 1.0 if t < CHANGE_AT else 1.25,
    "step to 1.12x": lambda t: 1.0 if t < CHANGE_AT else 1.12,
    "step to 0.8x": lambda t: 1.0 if t < CHANGE_AT else 0.8,
    "ramp to 1.25x over 50 checks": lambda t: 1.0 + 0.25 * min(max(t - CHANGE_AT, 0) / 50, 1.0),
    "ramp to 1.4x over 20 checks": lambda t: 1.0 + 0.4 * min(max(t - CHANGE_AT, 0) / 20, 1.0),
    "spike of 1.5x for 3 checks": lambda t: 1.5 if CHANGE_AT <= t < CHANGE_AT + 3 else 1.0,
    "1x <-> 1.2x every 100 checks": lambda t: 1.2 if (t // CHANGE_AT) % 2 else 1.0,
    "no drift": lambda t: 1.0,
}


class WeightedRatioRule:
    """The rule before the tracker: refit to the weighted ratio once it passes the threshold, and re-plan
    at each refit (its detector forgot the device's samples at each refit, as now)."""

    def __init__(self) -> None:
        self.decay = 0.5 ** (1.0 / HALFLIFE)
        self.scale, self.observed, self.predicted, self.samples = 1.0, 0.0, 0.0, 0

    def observe(self, predicted: np.ndarray, observed: np.ndarray) -> None:
        for p, o in zip(predicted, observed, strict=True):
            self.observed = self.decay * self.observed + o
            self.predicted = self.decay * self.predicted + p
            self.samples += 1

    def check(self) -> bool:
        ratio = self.observed / self.predicted if self.samples else 1.0
        if self.samples < MIN_SAMPLES or abs(ratio - 1.0) <= THRESHOLD:
            return False
        self.scale *= ratio
        self.observed, self.predicted, self.samples = 0.0, 0.0, 0
        return True


class TrackerRule:
    """`DeviceDriftTracker` as the coordinator's loop runs it."""

    def __init__(self) -> None:
        self.tracker = DeviceDriftTracker(1, threshold=THRESHOLD, min_samples=MIN_SAMPLES, halflife=HALFLIFE)

    @property
    def scale(self) -> float:
        return float(self.tracker.scales[0])

    def observe(self, predicted: np.ndarray, observed: np.ndarray) -> None:
        self.tracker.detector.observe(np.zeros(predicted.size, dtype=int), predicted, observed)

    def check(self) -> bool:
        self.tracker.refit()
        return bool(self.tracker.due())


RULES = {"tracker": TrackerRule, "weighted ratio (before)": WeightedRatioRule}


def follow(rule, ratio_at: Callable[[int], float], noise: float, *, checks: int = 600, seed: int = 0) -> tuple[int, np.ndarray]:
    """Run one rule on one device; its number of re-plans and |log(true ratio / model scale)| per check."""
    rng = np.random.default_rng(seed)
    replans, errors = 0, np.empty(checks)
    for t in range(checks):
        n = int(rng.poisson(CALLS_PER_CHECK))
        if n:
            predicted = np.full(n, 1e-3 * rule.scale)
            rule.observe(predicted, 1e-3 * ratio_at(t) * rng.lognormal(-noise**2 / 2, noise, n))
        replans += rule.check()
        errors[t] = abs(np.log(ratio_at(t) / rule.scale))
    return replans, errors


WITHIN = 0.05  # "within 5%": |log(true ratio / model scale)| at most this


def last_change(ratio_at: Callable[[int], float], checks: int) -> int:
    """The last check at which the device's speed changed (the end of a ramp; the last switch of a device that
    changes several times); 0 for one that never changes."""
    return max((t for t in range(1, checks) if ratio_at(t) != ratio_at(t - 1)), default=0)


def checks_to_settle(errors: np.ndarray, since: int) -> int | None:
    """Checks after check `since` until the model stays within WITHIN of the device for good (0: it never left it
    from `since` on); None when it is off by more at the last check (censored: not within 5% by the end, which
    is no count of checks)."""
    off = np.flatnonzero(errors[since:] > WITHIN)
    if not off.size:
        return 0
    if off[-1] == errors.size - since - 1:
        return None
    return int(off[-1] + 1)


def run(out: Path, *, noises=(0.02, 0.10, 0.25), seeds: int = 20, checks: int = 600) -> dict:
    """Every (noise, scenario, rule) over `seeds` seeds; writes `<out>/device_tracking.json`. Per row
    `checks_to_within_5pct_median`: the median over seeds of `checks_to_settle` from the scenario's `last_change`,
    a censored seed counted as longer than any (None when that median is censored: half the seeds or more were not
    within 5% by the end); `censored`: how many seeds were not."""
    rows = []
    for noise in noises:
        for name, ratio_at in SCENARIOS.items():
            since = last_change(ratio_at, checks)
            for rule_name, rule in RULES.items():
                replans, settle, error = [], [], []
                for seed in range(seeds):
                    count, errors = follow(rule(), ratio_at, noise, checks=checks, seed=seed)
                    replans.append(count)
                    settle.append(checks_to_settle(errors, since))
                    error.append(float(errors[CHANGE_AT:].mean()))
                median = float(np.median([np.inf if s is None else s for s in settle]))
                rows.append({"noise": noise, "scenario": name, "rule": rule_name,
                             "replans_mean": float(np.mean(replans)), "replans_max": int(max(replans)),
                             "last_change": since,
                             "checks_to_within_5pct_median": median if np.isfinite(median) else None,
                             "censored": sum(s is None for s in settle),
                             "mean_abs_log_error": float(np.mean(error))})
    result = {"config": {"threshold": THRESHOLD, "min_samples": MIN_SAMPLES, "halflife": HALFLIFE,
                         "calls_per_check": CALLS_PER_CHECK, "checks": checks, "change_at": CHANGE_AT, "seeds": seeds},
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_tracking.json").write_text(json.dumps(result, indent=1))
    return result


def settled(row: dict) -> str:
    """A row's checks to within 5%, as `main` prints it."""
    median = row["checks_to_within_5pct_median"]
    said = "not within 5% by the end" if median is None else f"within 5% after {median:5.0f}"
    return said + (f" ({row['censored']} of the seeds not within 5% by the end)" if row.get("censored") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.device_tracking", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args(argv)
    result = run(args.out, seeds=args.seeds)
    print("re-plans mean / max over seeds; checks after the last change until the model stays within 5% (median; "
          "seeds not within 5% by the end); mean |log error|")
    for row in result["rows"]:
        print(f"noise {row['noise']:.2f}  {row['scenario']:30s} {row['rule']:24s} re-plans {row['replans_mean']:4.1f} / "
              f"{row['replans_max']:2d}  {settled(row)}  error {row['mean_abs_log_error']:.3f}")
    print(f"wrote {args.out}/device_tracking.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
