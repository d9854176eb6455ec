"""The device-tracking what-if: the tracker against the rule before it, on one simulated device."""

from __future__ import annotations

import json

import numpy as np

from load_tests.device_tracking import (
    SCENARIOS,
    TrackerRule,
    WeightedRatioRule,
    checks_to_settle,
    follow,
    last_change,
    run,
    settled,
)


def test_a_step_is_one_re_plan_for_the_tracker_and_two_for_the_weighted_ratio():
    step = SCENARIOS["step to 1.4x"]
    for seed in range(3):
        replans, errors = follow(TrackerRule(), step, 0.02, checks=300, seed=seed)
        assert replans == 1 and errors[-100:].max() < 0.05
        before, _ = follow(WeightedRatioRule(), step, 0.02, checks=300, seed=seed)
        assert before == 2  # refitted on the way up, then again


def test_noisy_timings_are_not_chased():
    for seed in range(3):
        assert follow(TrackerRule(), SCENARIOS["no drift"], 0.25, checks=400, seed=seed)[0] == 0
        replans, errors = follow(TrackerRule(), SCENARIOS["step to 1.25x"], 0.25, checks=400, seed=seed)
        assert replans == 1 and np.median(errors[-100:]) < 0.05
    assert follow(TrackerRule(), SCENARIOS["spike of 1.5x for 3 checks"], 0.02, checks=300)[0] == 0


def test_run_writes_a_row_per_noise_scenario_and_rule(tmp_path):
    result = run(tmp_path, noises=(0.02,), seeds=1, checks=200)
    written = json.loads((tmp_path / "device_tracking.json").read_text())
    assert written == result
    assert len(result["rows"]) == len(SCENARIOS) * 2
    row = next(r for r in result["rows"] if r["scenario"] == "no drift" and r["rule"] == "tracker")
    assert row["replans_mean"] == 0 and row["mean_abs_log_error"] == 0


def test_checks_to_within_5pct_count_from_the_last_change_and_a_run_that_never_settles_is_censored():
    """A review: a run never within 5% again was reported as all the checks left after the change (500), and a device
    that changed five times was counted from its first change."""
    assert last_change(SCENARIOS["step to 1.4x"], 600) == 100 and last_change(SCENARIOS["no drift"], 600) == 0
    assert last_change(SCENARIOS["1x <-> 1.2x every 100 checks"], 600) == 500
    assert last_change(SCENARIOS["ramp to 1.4x over 20 checks"], 600) == 120
    assert last_change(SCENARIOS["spike of 1.5x for 3 checks"], 600) == 103
    errors = np.zeros(600)
    errors[100:104] = 0.2
    assert checks_to_settle(errors, 100) == 4 and checks_to_settle(errors, 300) == 0
    errors[550:] = 0.2  # off again for good before the end: no count of checks
    assert checks_to_settle(errors, 100) is None
    assert checks_to_settle(np.zeros(10), 0) == 0


class _Lagging:
    """Follows the device exactly, 5 checks after it moved more than 5% (timings without noise)."""

    def __init__(self) -> None:
        self.scale, self.seen, self.waited = 1.0, 1.0, 0

    def observe(self, predicted: np.ndarray, observed: np.ndarray) -> None:
        self.seen = float(np.mean(observed / predicted)) * self.scale

    def check(self) -> bool:
        self.waited = self.waited + 1 if abs(np.log(self.seen / self.scale)) > 0.05 else 0
        if self.waited >= 5:
            self.scale, self.waited = self.seen, 0
            return True
        return False


class _Never(_Lagging):
    def check(self) -> bool:
        return False


def test_run_reports_censored_seeds_apart(monkeypatch, tmp_path):
    from load_tests import device_tracking

    monkeypatch.setattr(device_tracking, "SCENARIOS", {name: SCENARIOS[name] for name in (
        "step to 1.4x", "1x <-> 1.2x every 100 checks")})
    monkeypatch.setattr(device_tracking, "RULES", {"lagging": _Lagging, "never": _Never})
    rows = {(r["scenario"], r["rule"]): r for r in run(tmp_path, noises=(0.0,), seeds=2)["rows"]}
    for scenario in ("step to 1.4x", "1x <-> 1.2x every 100 checks"):  # (the switching one: 4 after its last change)
        assert rows[scenario, "never"]["checks_to_within_5pct_median"] is None  # (not the 500 checks left)
        assert rows[scenario, "lagging"]["checks_to_within_5pct_median"] == 4
        assert rows[scenario, "never"]["censored"] == 2 and rows[scenario, "lagging"]["censored"] == 0
    assert settled(rows["step to 1.4x", "never"]).startswith("not within 5% by the end")
    assert "within 5% after" in settled(rows["step to 1.4x", "lagging"])
