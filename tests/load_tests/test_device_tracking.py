"""The device-tracking what-if: the tracker against the rule before it, on one simulated device."""

from __future__ import annotations

import json

import numpy as np

from load_tests.device_tracking import SCENARIOS, TrackerRule, WeightedRatioRule, follow, run


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
