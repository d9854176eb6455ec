"""Drift scenarios: the apps' arguments, the traces, the before/after split and the verdicts."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from unittest import mock

import httpx
import numpy as np
import pytest

from deploy.app import DEFAULT_SPEEDS, AppArgs
from load_tests.compare import record_json
from load_tests.drift import (
    DriftConfig,
    DriftRun,
    block_length,
    block_permutation_p,
    block_sign_flip_p,
    cause,
    scenario_args,
    segments,
    throttle_event,
    verdicts,
)
from load_tests.generator import ClientConfig, RequestResult, RunRecord
from load_tests.slo import SLO, summarize


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


SLO_S = {"ttft_s": 1.0, "tpot_s": 1.0}  # the SLO of the results `_mode` makes: every completed request within it


def _mode(met: int, requests: int, ttft_s: float = 0.1, tpot_p90: float = 9.0, spread_s: float = 1e-3,
          **extra) -> dict:
    """An app's drift entry: `requests` sent after the switch (at 40 s), `met` of them within the SLO (the others
    timed out), request i's TTFT `ttft_s` plus i x `spread_s` (a spread for the rank tests)."""
    results = [RequestResult(i, "a", 40.0 + i, ttft_s + spread_s * i, ttft_s + 1.0, 5, 6,
                             None if i < met else "timeout") for i in range(requests)]
    ttfts = sorted(r.ttft_s for r in results[:met])
    after = {"requests": requests, "attainment": met / requests,
             "ttft_p90_ms": 1e3 * ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else None, "tpot_p90_ms": tpot_p90}
    return record_json(RunRecord(started_wall=1000.0, results=results), segments={"after": after}) | {
        "recalibrations": [{"status": "applied"}, {"status": "skipped"}]} | extra


def test_a_verdict_needs_a_significant_difference():
    """One request of some 40 after the switch decided the verdict: 41/41 against 40/41 read as a loss, the mirror case
    as a win (a measurement review). Attainment decides where it differs significantly, else the TTFTs."""
    result = {"config": {"switch_s": 40.0}, "slo": SLO_S, "scenarios": {
        "workload": {"static": _mode(30, 60), "adaptive": _mode(55, 60)},
        "device": {"static": _mode(40, 41), "adaptive": _mode(41, 41)},
        "mirror": {"static": _mode(41, 41), "adaptive": _mode(40, 41)},
        "worse": {"static": _mode(55, 60), "adaptive": _mode(30, 60)},
        "partial": {"static": _mode(30, 60)},
    }}
    found = verdicts(result)
    assert found["workload"]["verdict"] == "win" and found["workload"]["adaptive_wins"]
    assert found["workload"]["attainment_p"] < 0.05 and found["workload"]["ttft_p"] is None
    for scenario in ("device", "mirror"):
        assert found[scenario]["verdict"] == "within noise" and not found[scenario]["adaptive_wins"]
        assert found[scenario]["attainment_p"] == pytest.approx(1.0)
    assert found["worse"]["verdict"] == "loss" and "partial" not in found
    assert found["device"]["recalibrations_adaptive"] == 2 and found["device"]["recalibrations_applied_adaptive"] == 1


def test_with_attainment_tied_a_significantly_shorter_ttft_wins_unless_bought_with_a_longer_tpot():
    """A shorter TTFT bought with a longer TPOT is no win (an audit: the committed device scenario, P90 TTFT 6% shorter
    and P90 TPOT 6% longer, was called one); nor is a TTFT difference within noise. Recalibrations count from the
    switch."""
    calls = {"started_wall": 1000.0, "recalibrations": [
        {"status": "applied", "started_at": 990.0}, {"status": "skipped", "started_at": 1010.0},
        {"status": "applied", "started_at": 1045.0}, {"status": "skipped", "started_at": 1050.0}]}
    result = {"config": {"switch_s": 40.0}, "slo": SLO_S, "scenarios": {
        "faster": {"static": _mode(40, 40, 0.3), "adaptive": _mode(40, 40, 0.1, **calls)},
        "bought": {"static": _mode(40, 40, 0.3, 67.9), "adaptive": _mode(40, 40, 0.1, 72.2, **calls)},
        # the same TTFTs, on other requests: adaptive faster on half the pairs, slower on the others
        "noise": {"static": _mode(40, 40, 0.1), "adaptive": _mode(40, 40, 0.139, spread_s=-1e-3, **calls)},
        "slower": {"static": _mode(40, 40, 0.1), "adaptive": _mode(40, 40, 0.3, **calls)},
    }}
    found = verdicts(result)
    assert found["faster"]["verdict"] == "win" and found["faster"]["ttft_p"] < 0.05
    assert found["bought"]["verdict"] == "within noise" and found["noise"]["verdict"] == "within noise"
    assert found["slower"]["verdict"] == "loss"
    # the direction is the rank test's, failures counted (the P90s leave them out), and fewer requests within the
    # SLO is never a win (a review: 35/40 with faster completed requests against 40/40 read as a win). 64 requests:
    # the tests flip blocks of 4, so 40 would be 10 independent blocks, too few to tell the tail's case from noise
    fewer = {"static": _mode(40, 40, 0.2), "adaptive": _mode(35, 40, 0.1)}
    tail = {"static": _mode(64, 64, 0.2), "adaptive": _mode(64, 64, 0.1)}
    tail["adaptive"]["results"]["ttft_s"][-7:] = [0.5] * 7  # its slowest tenth above static's
    tail["adaptive"]["segments"]["after"]["ttft_p90_ms"] = 500.0
    direction = verdicts({"config": {"switch_s": 40.0}, "slo": SLO_S, "scenarios": {"fewer": fewer, "tail": tail}})
    assert direction["fewer"]["verdict"] != "win" and direction["tail"]["verdict"] == "win"
    assert (found["faster"]["recalibrations_applied_adaptive"], found["faster"]["recalibrations_adaptive"]) == (1, 2)
    assert found["faster"]["recalibrations_adaptive_whole_run"] == 4


def test_the_tests_pair_the_requests_both_apps_served():
    """Both apps serve the same trace at the same time, so request i is the same prompt in both: a difference on
    nearly every request is a difference, however much the prompts' lengths spread the TTFTs. Tests for independent
    samples hid it (a review: the committed workload scenario, adaptive slower on two requests in three by a median
    14.6 ms, read as within noise at Mann-Whitney p=0.30; the paired test gives p=0.003)."""
    rng = np.random.default_rng(1)
    spread = rng.lognormal(np.log(0.2), 0.4, 44)  # prompts of many lengths

    def app(slower_s: float, met: int = 44, missed: set[int] = frozenset()) -> dict:
        results = [RequestResult(i, "code", 40.0 + i, t + slower_s, t + slower_s + 1.0, 100, 11,
                                 None if i < met and i not in missed else "timeout") for i, t in enumerate(spread)]
        after = summarize(results, SLO(1.5, 0.2), 60.0)
        return record_json(RunRecord(started_wall=1000.0, results=results), segments={"after": after}) | {
            "recalibrations": []}

    found = verdicts({"config": {"switch_s": 40.0}, "slo": {"ttft_s": 1.5, "tpot_s": 0.2}, "scenarios": {
        "slower": {"static": app(0.0), "adaptive": app(0.015)}, "faster": {"static": app(0.015), "adaptive": app(0.0)},
        "same": {"static": app(0.0), "adaptive": app(0.0)}}})
    assert found["slower"]["verdict"] == "loss" and found["slower"]["ttft_p"] < 1e-3
    assert found["slower"]["median_ttft_difference_ms"] == pytest.approx(15.0)
    assert found["faster"]["verdict"] == "win" and found["slower"]["pairs"] == 44
    assert found["same"]["verdict"] == "within noise" and found["same"]["ttft_p"] is None
    # attainment: only the requests one app served within the SLO and the other did not count (McNemar), 8 misses
    # over the trace (one in each of 8 blocks of 4 requests); the same 8 misses in a row are one stretch of the
    # machine's load (two blocks), no loss (a review: tests treating each pair as independent called it one)
    found = verdicts({"config": {"switch_s": 40.0}, "slo": {"ttft_s": 1.5, "tpot_s": 0.2}, "scenarios": {
        "lost": {"static": app(0.0), "adaptive": app(0.0, missed=set(range(0, 40, 5)))},
        "stretch": {"static": app(0.0), "adaptive": app(0.0, met=36)}}})
    lost, stretch = found["lost"], found["stretch"]
    assert (lost["within_slo_only_static"], lost["within_slo_only_adaptive"]) == (8, 0) and lost["block"] == 4
    assert lost["verdict"] == "loss" and lost["attainment_p"] == pytest.approx(2 / 2 ** 8)
    assert (stretch["within_slo_only_static"], stretch["within_slo_only_adaptive"]) == (8, 0)
    assert stretch["verdict"] == "within noise" and stretch["attainment_p"] == pytest.approx(2 / 2 ** 2)


def test_the_block_sign_flip_test_is_wilcoxons_and_mcnemars_one_pair_a_block_and_counts_a_stretch_once():
    """One pair a block: the exact signed-rank and McNemar tests (scipy's), enumerated up to 16 non-zero blocks and
    drawn beyond. Blocks: differences that one stretch of the machine's load made (a run of pairs all one way, the
    rest balanced) weigh as that stretch, not as its pairs one by one."""
    from scipy.stats import binomtest, rankdata, wilcoxon

    rng = np.random.default_rng(0)
    for n in (6, 12, 16, 40):
        d = rng.normal(0.4, 1.0, n)
        ranks = np.sign(d) * rankdata(np.abs(d))
        exact = wilcoxon(d, method="exact").pvalue
        assert block_sign_flip_p(ranks, 1) == pytest.approx(exact, abs=0 if n <= 16 else 0.01)
    discordant = np.array([1] * 9 + [-1] * 2 + [0] * 30)
    assert block_sign_flip_p(rng.permutation(discordant), 1) == pytest.approx(binomtest(9, 11).pvalue)
    assert block_sign_flip_p(np.zeros(8), 2) == 1.0 and block_sign_flip_p(np.array([]), 3) == 1.0
    run = np.array([1.0] * 10 + [0.0] * 30)  # 10 slower in a row, then level: 3 blocks of 4 one way
    assert block_sign_flip_p(run, 1) == pytest.approx(2 / 2 ** 10) and block_sign_flip_p(run, 4) == 2 / 2 ** 3
    assert [block_length(n) for n in (1, 2, 8, 9, 27, 28, 64, 65)] == [1, 2, 2, 3, 3, 4, 4, 5]
    with pytest.raises(ValueError, match="block"):
        block_sign_flip_p(run, 0)


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
    throttled = _mode(30, 60, events=[{"name": "throttle device 7", "t": 40.0}])
    failed = _mode(55, 60, events=[{"name": "throttle device 7", "t": 40.0, "error": "HTTPStatusError: 503"}])
    found = verdicts({"slo": SLO_S, "scenarios": {"device": {"static": throttled, "adaptive": failed}}})
    assert not found["device"]["adaptive_wins"]
    assert found["device"]["failed_events"] == ["adaptive: throttle device 7: HTTPStatusError: 503"]
    failed["events"][0].pop("error")
    assert verdicts({"slo": SLO_S, "scenarios": {"device": {"static": throttled, "adaptive": failed}}})["device"][
        "adaptive_wins"]


# --- before the switch, failed events, causes, the split (a review of the drift verdicts) -------------------------

def _trace_app(before: float, after: float, *, sends: list[float] | None = None, first_after: int | None = None,
               requests: int = 100, switch_s: float = 40.0, **extra) -> dict:
    """An app's drift entry over a whole trace: request i sent at i s (or `sends[i]`), its TTFT a spread of prompt
    lengths times `before` (requests before the switch) or `after` (from it on), the same TPOT; every request within
    the SLO."""
    rng = np.random.default_rng(3)
    base = rng.lognormal(np.log(0.2), 0.3, requests)
    at = sends or [float(i) for i in range(requests)]
    ttft = [float(base[i] * (before if at[i] < switch_s else after)) for i in range(requests)]
    results = [RequestResult(i, "x", at[i], ttft[i], ttft[i] + 1.0, 100, 21) for i in range(requests)]
    segs = (segments(results, SLO(**SLO_S), switch_s, 100.0) if first_after is None else
            segments(results, SLO(**SLO_S), switch_s, 100.0, first_after))
    return record_json(RunRecord(started_wall=1000.0, results=results), segments=segs) | {
        "recalibrations": []} | extra


def test_a_difference_that_predates_the_switch_is_no_drift_win():
    """The after-switch tests alone credited a difference that was there before the switch (a review: the committed
    workload scenario's adaptive app re-planned on prose 16 s before it) as a drift win. A win stands when the before
    window shows no significant difference its way, or when the difference grew significantly across the switch."""
    result = {"config": {"switch_s": 40.0}, "slo": SLO_S, "scenarios": {
        # adaptive 10% faster on every request, before and after the switch alike
        "preexisting": {"static": _trace_app(1.0, 1.0), "adaptive": _trace_app(0.9, 0.9)},
        # 10% slower before, 10% faster after: the before window's difference is the other way
        "turned": {"static": _trace_app(1.0, 1.0), "adaptive": _trace_app(1.1, 0.9)},
        # 5% faster before, 40% faster after: the difference grew across the switch
        "grew": {"static": _trace_app(1.0, 1.0), "adaptive": _trace_app(0.95, 0.6)},
        # 10% slower before and after: no loss either
        "slower": {"static": _trace_app(1.0, 1.0), "adaptive": _trace_app(1.1, 1.1)},
    }}
    found = verdicts(result)
    pre = found["preexisting"]
    assert pre["verdict"] == "within noise" and not pre["adaptive_wins"] and "predates the switch" in pre["reason"]
    assert pre["ttft_p"] < 0.05 and pre["before_ttft_p"] < 0.05  # both windows: adaptive significantly faster
    assert pre["did_ttft_p"] >= 0.05 and pre["before_pairs"] == 40 and pre["pairs"] == 60
    assert pre["before_median_ttft_difference_ms"] < 0 and pre["before_attainment_p"] == 1.0
    assert found["turned"]["verdict"] == "win" and found["turned"]["reason"] is None
    assert found["grew"]["verdict"] == "win" and found["grew"]["did_ttft_p"] < 0.05
    assert "more so after it" in found["grew"]["reason"]
    assert found["slower"]["verdict"] == "within noise" and "predates" in found["slower"]["reason"]


def test_the_difference_in_differences_test_is_mann_whitneys_one_pair_a_block_and_counts_a_stretch_once():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(5)
    for n_before, n_after in ((5, 7), (8, 8), (30, 40)):  # (the last beyond the exact enumeration: drawn)
        before, after = rng.normal(0.0, 1.0, n_before), rng.normal(0.5, 1.0, n_after)
        p, shift = block_permutation_p(before, after, 1)
        exact = mannwhitneyu(after, before, method="exact").pvalue
        assert 0.001 < exact < 0.5 and shift > 0
        assert p == (pytest.approx(exact, rel=1e-9) if n_before + n_after <= 16 else pytest.approx(exact, abs=0.01))
    assert block_permutation_p(np.array([]), np.ones(3), 2) == (1.0, 0.0)
    assert block_permutation_p(np.zeros(8), np.zeros(8), 2)[0] == 1.0
    # 12 pairs higher in a row after the switch, the rest as before: one stretch of 3 blocks of 4, not 12 pairs
    before, after = np.zeros(40), np.concatenate([np.ones(12), np.zeros(28)])
    assert block_permutation_p(before, after, 1)[0] < 1e-3 and block_permutation_p(before, after, 4)[0] > 0.05
    with pytest.raises(ValueError, match="block"):
        block_permutation_p(before, after, 0)


def test_a_failed_scheduled_event_makes_the_scenario_invalid_not_a_loss():
    """A failed event only cancelled a win (a review: the static app's throttle failed, adaptive's applied, and the
    adaptive app, slowed by its throttle alone, was reported as a loss)."""
    ok = [{"name": "device 0 speed -> 0.8", "t": 40.1}]
    bad = [{"name": "device 0 speed -> 0.8", "t": 40.1, "error": "HTTPStatusError: 503"}]
    found = verdicts({"config": {"switch_s": 40.0}, "slo": SLO_S, "scenarios": {"device": {
        "static": _trace_app(1.0, 1.0, events=bad), "adaptive": _trace_app(1.0, 1.15, events=ok)}}})["device"]
    assert found["verdict"] == "invalid" and not found["adaptive_wins"]
    assert found["failed_events"] == ["static: device 0 speed -> 0.8: HTTPStatusError: 503"]
    assert "HTTPStatusError: 503" in found["reason"] and found["ttft_p"] < 0.05  # (the tests still reported)


def test_recalibrations_from_the_switch_are_counted_by_cause_and_the_scenarios_own_cause_exercised():
    """The applied recalibrations were counted whatever their cause (a review: in the committed device scenario the
    device-drift re-plan was skipped; the one applied was a workload-drift re-plan 0.6 s before the last request)."""
    recalibrations = [
        {"status": "applied", "started_at": 1023.5, "reason": "workload drift: median router load per pass 3.2x"},
        {"status": "skipped", "started_at": 1041.4, "reason": "device drift: device 0 at 1.26x the time"},
        {"status": "applied", "started_at": 1099.1, "reason": "workload drift: layer 3 cosine distance 0.108"},
        {"status": "applied", "started_at": 1060.0, "reason": "admin"}]
    def scenario(records):
        return {"static": _trace_app(1.0, 1.0), "adaptive": _trace_app(1.0, 1.0, recalibrations=records)}
    found = verdicts({"config": {"switch_s": 40.0}, "slo": SLO_S, "scenarios": {
        "device": scenario(recalibrations), "workload": scenario(recalibrations),
        "other": scenario(recalibrations)}})
    device = found["device"]
    assert device["exercised"] is False and device["cause"] == "device drift"
    assert device["recalibrations_applied_adaptive"] == 2 and device["recalibrations_adaptive"] == 3
    assert device["recalibrations_adaptive_by_cause"] == {"workload drift": 1, "device drift": 1, "other": 1}
    assert device["recalibrations_applied_adaptive_by_cause"] == {"workload drift": 1, "device drift": 0, "other": 1}
    assert found["workload"]["exercised"] is True and found["other"]["exercised"] is None
    applied_device = [dict(recalibrations[1], status="applied")]
    assert verdicts({"config": {"switch_s": 40.0}, "slo": SLO_S, "scenarios": {"device": scenario(applied_device)}})[
        "device"]["exercised"] is True
    assert cause({"reason": "device drift: x"}) == "device drift" and cause({}) == "other"


def test_before_and_after_split_on_the_scheduled_arrival_in_the_table_and_the_tests():
    """The table's segments split each app on its own send time, the tests on the later of the two apps' sends, and
    the scheduled arrival decides prose or code (a review: request 39 sent at 39.99 by static and 40.02 by adaptive
    was after the switch for the tests and for adaptive's table row, before it for static's)."""
    from load_tests.drift import first_after_switch, paired
    from load_tests.generator import RequestSpec, TraceConfig, make_trace
    from load_tests.workloads import Prompt

    prompts = {name: [Prompt(name, 0, ({"role": "user", "content": name},), 8)] for name in ("prose", "code")}
    trace = make_trace(TraceConfig(1.0, 100.0, ((0.0, ("prose",)), (40.0, ("code",))), 7), prompts)
    first = first_after_switch(trace, 40.0)
    assert [s.prompt.workload for s in trace] == ["prose"] * first + ["code"] * (len(trace) - first)
    assert trace[first].arrival_s >= 40.0 > trace[first - 1].arrival_s
    assert first_after_switch(trace[:first], 40.0) == first and first_after_switch([], 40.0) == 0
    assert first_after_switch([RequestSpec(0, 40.0, prompts["code"][0], 8)], 40.0) == 0

    static_sends = [float(i) for i in range(100)]
    adaptive_sends = list(static_sends)
    static_sends[39], adaptive_sends[39] = 39.99, 40.02  # request 39 scheduled at 39.0, sent late by both
    entry = {"first_after_switch": 40,
             "static": _trace_app(1.0, 1.0, sends=static_sends, first_after=40),
             "adaptive": _trace_app(1.0, 1.0, sends=adaptive_sends, first_after=40)}
    assert entry["static"]["segments"]["after"]["requests"] == entry["adaptive"]["segments"]["after"]["requests"] == 60
    assert entry["adaptive"]["segments"]["before"]["requests"] == 40
    found = verdicts({"config": {"switch_s": 40.0}, "slo": SLO_S, "scenarios": {"workload": entry}})["workload"]
    assert (found["pairs"], found["before_pairs"], found["split_by"]) == (60, 40, "scheduled arrival")
    s, a = paired(entry["static"], entry["adaptive"], 40.0, 40, "before")
    assert [r.index for r in s] == [r.index for r in a] == list(range(40))
    # a drift.json written before the split was recorded: read as before, by send time
    entry.pop("first_after_switch")
    old = verdicts({"config": {"switch_s": 40.0}, "slo": SLO_S, "scenarios": {"workload": entry}})["workload"]
    assert (old["pairs"], old["before_pairs"], old["split_by"]) == (61, 39, "send time")
    with pytest.raises(ValueError, match="window"):
        paired(entry["static"], entry["adaptive"], 40.0, window="during")


def test_a_run_records_where_its_trace_switches(monkeypatch, tmp_path):
    """Each scenario's entry holds the index of the first request scheduled from the switch on (`_measure` finds it)."""
    from contextlib import contextmanager

    import load_tests.drift as drift

    @contextmanager
    def serve_apps(apps, **_):
        yield {name: f"http://{name}" for name in apps}, 1.5

    async def measure(self, scenario, apps, bases):
        return {mode: {"mode": mode} for mode in bases}, 42

    monkeypatch.setattr(drift, "serve_apps", serve_apps)
    monkeypatch.setattr(drift, "serve_options", lambda config: {})
    monkeypatch.setattr(drift.DriftRun, "_measure", measure)
    runner = DriftRun(DriftConfig(), tmp_path, progress=False)
    modes = runner.run("workload")
    assert modes == {"static": {"mode": "static"}, "adaptive": {"mode": "adaptive"}}
    saved = json.loads((tmp_path / "drift.json").read_text())["scenarios"]["workload"]
    assert saved == {"startup_s": 1.5, "first_after_switch": 42, **modes}
