"""Drift scenarios: the apps' arguments, the traces, the before/after split and the verdicts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deploy.app import AppArgs
from load_tests.drift import DriftConfig, DriftRun, scenario_args, segments, throttle_onset, verdicts
from load_tests.generator import RequestResult
from load_tests.slo import SLO


def test_scenario_args_set_recalibration_and_the_scheduled_throttle():
    config = DriftConfig(throttled_device=3, throttle_to=0.8, device_drift_at_s=150.0)
    static = scenario_args("device", "static", config)
    adaptive = scenario_args("workload", "adaptive", config)
    for args in (static, adaptive):
        AppArgs.model_validate(args)
    assert static["auto_recalibrate"] is False and adaptive["auto_recalibrate"] is True
    assert static["emulation"]["drift"] == {3: [[150.0, 0.8]]}
    assert "drift" not in adaptive["emulation"] and static["policy"] == adaptive["policy"] == "vibe"
    assert static["app_name"] != scenario_args("device", "adaptive", config)["app_name"]


def test_workload_trace_switches_from_prose_to_code(tmp_path):
    runner = DriftRun(DriftConfig(), tmp_path, SLO(1.0, 1.0), progress=False)
    workload = runner.trace_config("workload")
    assert workload.phases[0][1] == ("sharegpt_like", "sonnet_like") and workload.phases[1] == (40.0, ("code",))
    assert runner.trace_config("device").phases == ((0.0, ("sharegpt_like", "sonnet_like")),)
    assert runner.trace_config("device").seed == workload.seed  # the same arrivals in every app


def test_segments_split_at_the_switch_and_the_onset():
    slo = SLO(0.1, 0.01)
    results = [RequestResult(0, "a", 5.0, 0.05, 0.1, 5, 6), RequestResult(1, "b", 12.0, 0.5, 0.6, 5, 6),
               RequestResult(2, "b", 16.0, 0.05, 0.1, 5, 6)]
    found = segments(results, slo, split_s=10.0, onset_s=14.0, duration_s=20.0)
    assert found["before"]["requests"] == 1 and found["before"]["attainment"] == 1.0
    assert found["after"]["requests"] == 1 and found["after"]["goodput_rps"] == pytest.approx(1 / 6)
    assert segments(results[:1], slo, 10.0, 10.0, 20.0)["after"] is None


def _poll(t: float, throttled: float) -> dict:
    return {"t": t, "devices": [throttled, 1.1, 1.0, None, 1.2]}


def test_throttle_onset_is_read_relative_to_the_other_devices():
    polls = [_poll(t, 1.1) for t in (0, 2, 4)] + [_poll(6, 1.15), _poll(8, 1.3), _poll(10, 1.4)]
    assert throttle_onset(polls, device=0, planned_s=5.0, throttle_to=0.8) == 8  # 1.1 * 1.125 = 1.2375
    assert throttle_onset(polls, device=0, planned_s=0.0, throttle_to=0.8) is None  # no baseline
    assert throttle_onset(polls[:4], device=0, planned_s=5.0, throttle_to=0.8) is None


def _mode(attainment: float, p90: float) -> dict:
    return {"segments": {"after": {"attainment": attainment, "ttft_p90_ms": p90, "tpot_p90_ms": 9.0}},
            "recalibrations": [{"status": "applied"}]}


def test_verdicts_prefer_attainment_then_ttft():
    result = {"scenarios": {
        "workload": {"onset_s": 40.0, "static": _mode(0.8, 100.0), "adaptive": _mode(0.9, 300.0)},
        "device": {"onset_s": 47.0, "static": _mode(0.95, 100.0), "adaptive": _mode(0.95, 120.0)},
        "partial": {"static": _mode(0.9, 1.0)},
    }}
    found = verdicts(result)
    assert found["workload"]["adaptive_wins"] and not found["device"]["adaptive_wins"]
    assert "partial" not in found and found["device"]["recalibrations_adaptive"] == 1
    assert found["device"]["onset_s"] == 47.0


@pytest.mark.parametrize(("change", "message"), [
    ({"switch_s": 0.0}, "switch_s"), ({"switch_s": 200.0}, "switch_s"), ({"rate_rps": 0}, "rate_rps"),
    ({"device_drift_at_s": 10.0}, "device_drift_at_s"),
])
def test_drift_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        replace(DriftConfig(), **change)
