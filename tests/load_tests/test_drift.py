"""Drift scenarios: the apps' arguments, the traces, the before/after split and the verdicts."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from unittest import mock

import httpx
import pytest

from deploy.app import DEFAULT_SPEEDS, AppArgs
from load_tests.drift import DriftConfig, DriftRun, scenario_args, segments, throttle_event, verdicts
from load_tests.generator import ClientConfig, RequestResult
from load_tests.slo import SLO


def test_scenario_args_differ_only_in_recalibration():
    config = DriftConfig()
    static, adaptive = (scenario_args("device", mode, config) for mode in ("static", "adaptive"))
    for args in (static, adaptive):
        AppArgs.model_validate(args)
    assert static["auto_recalibrate"] is False and adaptive["auto_recalibrate"] is True
    assert {k: v for k, v in static.items() if k not in ("auto_recalibrate", "app_name")} == \
        {k: v for k, v in adaptive.items() if k not in ("auto_recalibrate", "app_name")}
    assert static["app_name"] != adaptive["app_name"] != scenario_args("workload", "adaptive", config)["app_name"]


def test_throttle_event_slows_the_device_relative_to_its_own_speed():
    requests = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append((request.url.path, request.headers["authorization"], json.loads(request.content)))
        return httpx.Response(200, json={})

    client = ClientConfig(base_url="http://app", model="m", admin_token="t" * 16)
    event = throttle_event(client, {"num_devices": 2, "speeds": [0.9, 1.0]}, DriftConfig(throttled_device=0,
                                                                                          throttle_to=0.8))
    assert event.at_s == DriftConfig().switch_s
    # a config that leaves the speeds out runs at the defaults: the throttle starts from those
    default = throttle_event(client, {"num_devices": 8}, DriftConfig(throttled_device=7, throttle_to=0.5))
    real = httpx.AsyncClient
    with mock.patch.object(httpx, "AsyncClient", lambda **kw: real(transport=httpx.MockTransport(handler), **kw)):
        asyncio.run(event.action())
        asyncio.run(default.action())
    assert requests == [("/admin/emulation/speed", "Bearer " + "t" * 16, {"device": 0, "speed": pytest.approx(0.72)}),
                        ("/admin/emulation/speed", "Bearer " + "t" * 16,
                         {"device": 7, "speed": pytest.approx(0.5 * DEFAULT_SPEEDS[7])})]


def test_workload_trace_switches_from_prose_to_code(tmp_path):
    runner = DriftRun(replace(DriftConfig(), rate_rps=0.5), tmp_path, progress=False)
    assert runner.rate == 0.5 and runner.slo is None
    workload = runner.trace_config("workload", runner.rate)
    assert workload.phases[0][1] == ("sharegpt_like", "sonnet_like") and workload.phases[1] == (40.0, ("code",))
    device = runner.trace_config("device", runner.rate)
    assert device.phases == ((0.0, ("sharegpt_like", "sonnet_like")),) and device.rate_rps == 0.5
    assert device.seed == workload.seed and runner.trace_config("device", 0.5, warmup=True).seed != device.seed


def test_segments_split_at_the_switch():
    slo = SLO(0.1, 0.01)
    results = [RequestResult(0, "a", 5.0, 0.05, 0.1, 5, 6), RequestResult(1, "b", 12.0, 0.5, 0.6, 5, 6),
               RequestResult(2, "b", 16.0, 0.05, 0.1, 5, 6)]
    found = segments(results, slo, switch_s=10.0, duration_s=20.0)
    assert found["before"]["requests"] == 1 and found["before"]["attainment"] == 1.0
    assert found["after"]["requests"] == 2 and found["after"]["goodput_rps"] == pytest.approx(0.1)
    assert segments(results[:1], slo, 10.0, 20.0)["after"] is None


def _mode(attainment: float, p90: float) -> dict:
    return {"segments": {"after": {"attainment": attainment, "ttft_p90_ms": p90, "tpot_p90_ms": 9.0}},
            "recalibrations": [{"status": "applied"}, {"status": "skipped"}]}


def test_verdicts_prefer_attainment_then_ttft():
    result = {"scenarios": {
        "workload": {"static": _mode(0.8, 100.0), "adaptive": _mode(0.9, 300.0)},
        "device": {"static": _mode(0.95, 100.0), "adaptive": _mode(0.95, 120.0)},
        "partial": {"static": _mode(0.9, 1.0)},
    }}
    found = verdicts(result)
    assert found["workload"]["adaptive_wins"] and not found["device"]["adaptive_wins"]
    assert "partial" not in found and found["device"]["recalibrations_adaptive"] == 2
    assert found["device"]["recalibrations_applied_adaptive"] == 1


def test_a_shorter_ttft_bought_with_a_longer_tpot_is_no_win_and_recalibrations_count_from_the_switch():
    """The committed device scenario: attainment tied, adaptive's P90 TTFT 6% shorter and its P90 TPOT 6% longer was
    called a win; its recalibration counts took in startup and warm-up (an audit)."""
    def mode(ttft: float, tpot: float) -> dict:
        return {"segments": {"after": {"attainment": 1.0, "ttft_p90_ms": ttft, "tpot_p90_ms": tpot}},
                "started_wall": 1000.0,
                "recalibrations": [{"status": "applied", "started_at": 990.0}, {"status": "skipped", "started_at": 1010.0},
                                   {"status": "applied", "started_at": 1045.0}, {"status": "skipped", "started_at": 1050.0}]}

    result = {"config": {"switch_s": 40.0}, "scenarios": {"device": {"static": mode(267.0, 67.9),
                                                                     "adaptive": mode(251.0, 72.2)},
                                                          "workload": {"static": mode(267.0, 67.9),
                                                                       "adaptive": mode(251.0, 67.9)}}}
    found = verdicts(result)
    assert not found["device"]["adaptive_wins"] and found["workload"]["adaptive_wins"]
    assert (found["device"]["recalibrations_applied_adaptive"], found["device"]["recalibrations_adaptive"]) == (1, 2)
    assert found["device"]["recalibrations_adaptive_whole_run"] == 4


@pytest.mark.parametrize(("change", "message"), [
    ({"switch_s": 0.0}, "switch_s"), ({"switch_s": 200.0}, "switch_s"), ({"rate_rps": -1.0}, "rate_rps"),
    ({"throttle_to": 1.5}, "throttle_to"),
])
def test_drift_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        replace(DriftConfig(), **change)


def test_a_scenario_whose_throttle_failed_is_no_win_and_says_so():
    """The device scenario's throttle is an admin call during the trace; when it failed, the run was judged as if the
    device had slowed down (a measurement audit)."""
    throttled = _mode(0.8, 100.0) | {"events": [{"name": "throttle device 7", "t": 40.0}]}
    failed = _mode(0.9, 90.0) | {"events": [{"name": "throttle device 7", "t": 40.0, "error": "HTTPStatusError: 503"}]}
    found = verdicts({"scenarios": {"device": {"static": throttled, "adaptive": failed}}})
    assert not found["device"]["adaptive_wins"]
    assert found["device"]["failed_events"] == ["adaptive: throttle device 7: HTTPStatusError: 503"]
    failed["events"][0].pop("error")
    assert verdicts({"scenarios": {"device": {"static": throttled, "adaptive": failed}}})["device"]["adaptive_wins"]
