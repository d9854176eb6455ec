import json

import numpy as np
import pytest

from placement import bench
from placement.simulate import (
    BASE_DEVICE,
    PROFILES,
    CaseResult,
    PolicyResult,
    ScaleStudyConfig,
    device_speeds,
    evaluate,
    sample_devices,
    scale_study,
)
from placement.traces import TRACES_ENV, trace_dir


def test_profiles_give_the_documented_speeds():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(device_speeds(8, "identical", rng), np.ones(8))
    for profile, half_width in (("spread7", 0.035), ("spread22", 0.11)):
        speeds = device_speeds(64, profile, rng)
        assert np.all(np.abs(speeds - 1.0) <= half_width) and np.ptp(speeds) > half_width
    for profile, slow, count in (("one_slow13", 0.87, 1), ("two_throttled", 0.8, 2)):
        speeds = device_speeds(16, profile, rng)
        assert np.sum(speeds == slow) == count and np.sum(speeds == 1.0) == 16 - count


def test_profiles_reject_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown variability profile 'fast'"):
        device_speeds(4, "fast", rng)
    with pytest.raises(ValueError, match="two_throttled"):
        device_speeds(1, "two_throttled", rng)
    with pytest.raises(ValueError, match="num_devices"):
        device_speeds(0, "identical", rng)


def test_sample_devices_divides_times_by_speed():
    speeds = device_speeds(8, "spread22", np.random.default_rng(5))
    devices = sample_devices(8, "spread22", np.random.default_rng(5))
    for device, speed in zip(devices, speeds):
        assert device.latency(1000.0) == pytest.approx(BASE_DEVICE.latency(1000.0) / speed)
        assert device.knee == BASE_DEVICE.knee


def test_case_result_gains():
    def result(total):
        return PolicyResult(total, total / 8.0, 1.0, 1.0)

    case = CaseResult(8.0, {"eplb": result(10.0), "vibe": result(9.0)})
    assert case.gain() == pytest.approx(0.1)
    assert case.captured_gain() == pytest.approx(0.5)
    at_bound = CaseResult(10.0, {"eplb": result(10.0), "vibe": result(10.0)})
    assert np.isnan(at_bound.captured_gain())


@pytest.fixture(scope="module")
def small_case():
    rng = np.random.default_rng(2)
    loads = rng.gamma(0.7, 600.0, size=(3, 16))  # skewed, mostly above the knee
    return loads, sample_devices(4, "two_throttled", rng)


def test_evaluate_scores_every_policy_against_the_bound(small_case):
    loads, devices = small_case
    case = evaluate(loads, devices)
    assert set(case.policies) == {"contiguous", "eplb", "vibe"}
    for result in case.policies.values():
        assert result.bound_ratio >= 1.0 - 1e-9
        assert result.makespan_s == pytest.approx(result.bound_ratio * case.bound_s)
        assert result.imbalance >= 1.0 and 0.0 < result.balancedness <= 1.0
    assert case.policies["vibe"].makespan_s <= case.policies["eplb"].makespan_s * (1 + 1e-12)


def test_scale_study_rows(small_case):
    loads, _ = small_case
    config = ScaleStudyConfig(device_counts=(4, 8), num_experts=32, num_layers=2, profile="one_slow13")
    rows = scale_study(loads, config)
    assert len(rows) == 2 * 6  # per G: eplb and vibe even and redundant, vibe alone uneven
    for row in rows:
        g = row["num_devices"]
        assert row["num_redundant"] == (g if "redundant" in row["variant"] else 0)
        if "uneven" in row["variant"]:
            assert row["policy"] == "vibe" and row["slot_budget"] == (32 + row["num_redundant"]) // g + 1
        assert row["bound_ratio"] >= 1.0 - 1e-9
        if row["policy"] == "eplb":
            assert row["gain_vs_eplb"] == 0.0
        else:
            assert row["gain_vs_eplb"] >= -1e-9  # vibe is never worse than eplb on the same slots


@pytest.mark.parametrize(
    "kwargs",
    [{"device_counts": (3,)}, {"device_counts": ()}, {"num_layers": 0}, {"profile": "fast"},
     {"redundant_per_device": 0}, {"policies": ("contiguous", "vibe")}],
)
def test_scale_study_config_is_validated(kwargs):
    with pytest.raises(ValueError):
        ScaleStudyConfig(**kwargs)


def test_bench_skips_cleanly_without_traces(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(TRACES_ENV, str(tmp_path / "nowhere"))
    assert bench.main(["--quick", "--out", str(tmp_path / "out")]) == 0
    assert "skipped" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bench_quick_writes_json_and_plot(tmp_path):
    try:
        trace_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "placement.json").read_text())
    assert (tmp_path / "placement.png").stat().st_size > 10_000
    for section in ("quality", "exact", "speed", "moves", "scale"):
        assert result[section], section
    assert {r["profile"] for r in result["quality"]} == set(PROFILES)
    for row in result["quality"]:
        assert min(row["contiguous"], row["eplb"], row["vibe"]) >= 1.0 - 1e-9
    for row in result["exact"]:
        assert row["bound"] <= 1.0 + 1e-9 <= min(row["eplb"], row["vibe"]) + 2e-9
    assert {r["what"] for r in result["speed"]} >= {"plan vibe", "plan eplb", "rebalance", "lower_bound"}
    for row in result["moves"]:
        assert row["rebalanced"] <= row["stale"] + 1e-9


def test_gains_over_no_load_are_nan_not_a_division_by_zero():
    device = BASE_DEVICE
    assert np.isnan(evaluate(np.zeros((1, 4)), [device, device]).gain())
    rows = scale_study(np.zeros((2, 8)), ScaleStudyConfig(device_counts=(2,), num_experts=8, num_layers=None))
    assert rows and all(row["gain_vs_eplb"] is None or np.isnan(row["gain_vs_eplb"]) for row in rows)
    with pytest.raises(ValueError, match="device_counts"):
        ScaleStudyConfig(device_counts=(2, 1), num_experts=8)
