"""The headline numbers, targets, summary lines and report files, from a hand-made side-by-side result."""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from load_tests import plots, report
from load_tests.compare import record_json, results_from_json
from load_tests.generator import RequestResult, RunRecord
from load_tests.slo import SLO, frontier, summarize

SLO_1 = SLO(ttft_s=0.1, tpot_s=0.01)


def _run(rate: float, ttft: float, kind: str = "sweep", imbalance: float = 1.2) -> dict:
    """Ten requests at `rate`: TTFT `ttft`, TPOT 5 ms, one timeout; polls with a constant imbalance."""
    results = [RequestResult(i, "w", i / rate, ttft, ttft + 0.045, 12, 10) for i in range(9)]
    results.append(RequestResult(9, "w", 9 / rate, None, None, 0, 0, "timeout"))
    record = RunRecord(started_wall=1000.0, duration_s=10.0, results=results,
                       polls=[{"t": 1.0, "version": 2, "imbalance_per_layer": [imbalance, imbalance]},
                              {"t": 2.0, "version": 2, "imbalance_per_layer": None}],
                       step_seconds={"sum": 2.0, "count": 100.0})
    placement = {"version": 2, "moe_critical_path_s": 0.008, "moe_balanced_path_s": 0.006,
                 "device_predicted_s": [[0.004, 0.002]] * 2,
                 "slots_per_device": [[1, 1]] * 2}
    return record_json(record, rate_rps=rate, kind=kind, summary=summarize(results, SLO_1, 10.0),
                       placement=placement)


def _policy(ttfts: dict[float, float], extra_ttft: float, imbalance: float) -> dict:
    runs = [_run(rate, ttft, imbalance=imbalance) for rate, ttft in ttfts.items()]
    found = frontier([r["rate_rps"] for r in runs], [r["summary"]["attainment"] for r in runs])
    return {"app_args": {"policy": "x", "num_devices": 2, "speeds": [1.0, 0.9], "emulation": {}},
            "runs": runs, "frontier": asdict(found),
            "at_eplb_frontier": _run(1.5, extra_ttft, "eplb_frontier", imbalance)}


@pytest.fixture
def result() -> dict:
    # attainment is 0.9 when TTFT is within the SLO (one timeout in ten) and 0 otherwise
    return {
        "config": {"workloads": ["w"], "seed": 0, "duration_s": 10.0, "rates": None, "rate_multipliers": [1, 2, 3],
                   "max_tokens_cap": 64, "warmup_s": 5.0,
                   "warmup_rate": 1.0, "ttft_factor": 5.0, "tpot_factor": 3.0, "unloaded_requests": 4,
                   "unloaded_max_tokens": 8, "stop_below": 0.5},
        "machine": {"cpus": 2, "platform": "test", "loadavg_start": [1.0, 1.0, 1.0]},
        "model": {"path": "deploy/models/vibe-tiny-moe", "weights_sha256": "ab" * 32},
        "slo": asdict(SLO_1) | {"set_by": "eplb"}, "rates": [1.0, 2.0, 3.0], "single_stream_rps": 1.0,
        "policies": {
            "eplb": _policy({1.0: 0.05, 2.0: 0.5}, 0.08, 1.3),
            "contiguous": _policy({1.0: 0.5, 2.0: 0.5}, 0.2, 1.5),
            "vibe": _policy({1.0: 0.05, 2.0: 0.05, 3.0: 0.5}, 0.04, 1.1),
        },
    }


def test_headline_takes_latency_and_balance_at_eplbs_frontier_rate(result):
    rows = report.headline(result)
    assert rows["eplb"]["frontier_rps"] == 1.0 and rows["vibe"]["frontier_rps"] == 2.0
    assert rows["contiguous"]["frontier_kind"] == "below_sweep"
    assert rows["vibe"]["ttft_p90_ms"] == pytest.approx(40.0) and rows["vibe"]["tpot_p50_ms"] == pytest.approx(5.0)
    assert rows["eplb"]["mean_imbalance"] == pytest.approx(1.3)
    assert rows["eplb"]["barrier_idle"] == pytest.approx(1 - 1 / 1.3)
    assert rows["vibe"]["step_ms"] == pytest.approx(20.0) and rows["vibe"]["moe_predicted_ms"] == pytest.approx(8.0)
    assert rows["vibe"]["rest_ms"] == pytest.approx(12.0) and rows["vibe"]["failed"] == 1
    assert rows["vibe"]["balance_headroom_ms"] == pytest.approx(2.0) and rows["vibe"]["headroom_share"] == 0.1


def test_targets_compare_vibe_with_both_baselines(result):
    checks = {c["what"]: c for c in report.targets(report.headline(result))}
    assert checks["vibe frontier / eplb frontier"]["value"] == pytest.approx(2.0)
    assert checks["vibe frontier / eplb frontier"]["met"]
    assert checks["vibe P90 TTFT / eplb P90 TTFT at eplb's frontier rate"]["value"] == pytest.approx(0.5)
    # contiguous missed the SLO at every rate, its lowest by far: its frontier is 0, no ratio, vibe's is higher
    assert checks["vibe frontier / contiguous frontier"]["value"] is None
    assert checks["vibe frontier / contiguous frontier"]["met"]
    result["policies"]["vibe"]["at_eplb_frontier"] = _run(1.5, 0.07, "eplb_frontier")
    slower = {c["what"]: c for c in report.targets(report.headline(result))}
    assert not slower["vibe P90 TTFT / eplb P90 TTFT at eplb's frontier rate"]["met"]


def test_summary_lines_have_the_documented_form(result):
    lines = report.summary_lines(report.headline(result))
    pattern = r"policy=(\w+) slo_frontier_rps=[\d.]+ p90_ttft_ms=[\d.]+ p90_tpot_ms=[\d.]+ mean_imbalance=[\d.]+"
    assert [re.fullmatch(pattern, line).group(1) for line in lines] == ["eplb", "contiguous", "vibe"]


def test_a_policy_failing_every_request_prints_a_zero_frontier(result):
    """A policy whose app failed every request printed `slo_frontier_rps=0.100` (a tenth of its lowest rate,
    extrapolated from an assumed full attainment at rate 0), a line like any measured frontier's (an audit)."""
    lines = {line.split()[0]: line for line in report.summary_lines(report.headline(result))}
    assert lines["policy=contiguous"].startswith("policy=contiguous slo_frontier_rps=0.000 ")
    assert lines["policy=vibe"].startswith("policy=vibe slo_frontier_rps=2.000 ")


def test_the_header_says_when_and_how_the_unloaded_requests_ran_and_the_below_sweep_rule(tmp_path, result):
    """The header said the unloaded requests ran 'before any load': compare sends them after the warm-up trace, to
    every app at once unless one at a time (an audit); a frontier below the sweep was not explained."""
    report.write(tmp_path, result)
    text = (tmp_path / "report.md").read_text()
    assert "before any load" not in text and "after the warm-up trace and before the sweep" in text
    assert "to each app, to every app at the same time," in text
    assert "'below_sweep': no swept rate met it" in text and "else 0)" in text
    result["config"]["together"] = False
    report.write(tmp_path, result)
    text = (tmp_path / "report.md").read_text()
    assert "to each app, one app after another," in text and "order rotated from rate to rate" in text
    result["config"]["deploy_apart"] = True
    report.write(tmp_path, result)
    text = (tmp_path / "report.md").read_text()
    assert "Each app was deployed alone, twice" in text and "rotated" not in text
    ran_at_eplb = any("at_eplb_frontier" in entry for entry in result["policies"].values())
    assert ("its run at eplb's frontier rate (eplb first)" in text) == ran_at_eplb
    # eplb failed: no policy ran at its frontier, and the paragraph does not say they did (a review)
    result["failed_policies"] = {"eplb": {"error": "TimeoutError: not RUNNING"}}
    for entry in result["policies"].values():
        entry.pop("at_eplb_frontier", None)
    report.write(tmp_path, result)
    text = (tmp_path / "report.md").read_text()
    assert "its sweep (no run at eplb's frontier rate: its frontier was 0)" in text and "eplb first" not in text
    result["failed_policies"] = {"eplb": {"error": "TimeoutError: not RUNNING", **result["policies"].pop("eplb")}}
    report.write(tmp_path, result)
    assert "its sweep (no run at eplb's frontier rate: it failed)" in (tmp_path / "report.md").read_text()


def test_balance_without_polls_is_unknown():
    assert report.balance([]) == {"mean_imbalance": None, "barrier_idle": None}


def test_write_makes_the_report_and_plots(tmp_path, result):
    lines = report.write(tmp_path, result)
    text = (tmp_path / "report.md").read_text()
    assert "make bench" in text and "| vibe | 2.000 (interpolated)" in text
    assert "TTFT <= 100.0 ms" in text and len(lines) == 3
    # each swept run's mean step (2 s / 100 steps) and predicted MoE critical path (8 ms) in the sweep table
    assert "| 2 | 20.0 | 8.00 | - |" in text
    assert "| 10 | 0.900 (0.60-0.98) |" in text  # 9 of 10 within SLO, with its Wilson 95% interval
    assert "loaded at the same time" in text  # a run from before the option was added: together
    assert all((tmp_path / name).stat().st_size > 10_000 for name in ("slo_frontier.png", "latency.png",
                                                                        "balance.png"))


def test_run_json_round_trip():
    run = _run(2.0, 0.05)
    results = results_from_json(run)
    assert len(results) == 10 and results[0] == RequestResult(0, "w", 0.0, 0.05, 0.095, 12, 10)
    assert results[-1].error == "timeout"


def test_write_adds_drift_and_scale_sections(tmp_path, result):
    from load_tests.drift import DriftConfig

    def mode(ttft: float) -> dict:
        run = _run(1.0, ttft)
        run["segments"] = {"before": run["summary"], "after": run["summary"]}
        return run

    drift = {"config": asdict(DriftConfig()), "slo": asdict(SLO_1), "rate_rps": 0.4,
             "scenarios": {"workload": {"startup_s": 1.0, "static": mode(0.5), "adaptive": mode(0.05)}}}
    rows = [{"profile": "spread7", "tokens_per_expert": 1024.0, "num_devices": g, "policy": p, "variant": v,
             "bound_ratio": 1.0 + 0.01 * g / 8 + (p == "eplb") * 0.02, "gain_vs_eplb": 0.01, "gain_vs_eplb_even": 0.02}
            for g in (8, 16) for p, v in (("eplb", "even"), ("vibe", "even"), ("vibe", "redundant_uneven"))]
    report.write(tmp_path, result, drift=drift, scale={"rows": rows})
    text = (tmp_path / "report.md").read_text()
    assert "| workload | 0.000 | 0.900 |" in text and "| yes |" in text
    assert "| spread7 | 1024 | 16 | 1.040 | 1.020 | - | - | - | 1.020 | 2.0% |" in text
    plots.drift_timeline(drift, tmp_path / "drift.png")
    assert (tmp_path / "drift.png").stat().st_size > 10_000


def test_targets_say_when_a_ratio_cannot_be_the_placements_doing(result):
    checks = {c["what"]: c for c in report.targets(report.headline(result))}
    # headroom is 10% of a step in the fixture; vibe / eplb = 2.0 exceeds it, and contiguous never met the SLO
    assert "balance headroom (10.0% of a step)" in checks["vibe frontier / eplb frontier"]["caveat"]
    assert "contiguous frontier below_sweep" in checks["vibe frontier / contiguous frontier"]["caveat"]
    vibe = result["policies"]["vibe"]
    vibe["runs"] = [_run(1.0, 0.05), _run(2.0, 0.5), _run(3.0, 0.05), _run(4.0, 0.5)]  # misses, then meets
    vibe["frontier"] = asdict(frontier([1.0, 2.0, 3.0, 4.0], [r["summary"]["attainment"] for r in vibe["runs"]]))
    checks = {c["what"]: c for c in report.targets(report.headline(result))}
    assert "vibe frontier interpolated, non-monotonic" in checks["vibe frontier / eplb frontier"]["caveat"]
    result["policies"]["vibe"]["at_eplb_frontier"] = _run(1.5, 0.081, "eplb_frontier")
    close = {c["what"]: c for c in report.targets(report.headline(result))}
    assert close["vibe P90 TTFT / eplb P90 TTFT at eplb's frontier rate"]["caveat"] == ""


def test_a_targets_caveats_use_the_compared_policies_and_eplbs_own_run_at_its_frontier():
    """The headroom test took the largest headroom of all three policies (contiguous's, for vibe / eplb), and eplb's
    run at its interpolated frontier rate missing the target was not said (an audit of the committed report)."""
    def row(frontier: float, ttft: float, attainment: float, headroom: float) -> dict:
        return {"frontier_rps": frontier, "frontier_kind": "interpolated", "ttft_p90_ms": ttft,
                "attainment": attainment, "headroom_share": headroom}

    rows = {"eplb": row(1.0, 100.0, 0.95, 0.005), "vibe": row(1.02, 99.0, 0.95, 0.002),
            "contiguous": row(1.0, 120.0, 0.9, 0.5)}
    checks = {c["what"]: c for c in report.targets(rows)}
    assert "balance headroom (0.5% of a step)" in checks["vibe frontier / eplb frontier"]["caveat"]
    assert checks["vibe frontier / contiguous frontier"]["caveat"] == ""  # 2% is within contiguous's 50%
    rows["eplb"]["attainment"] = 0.855
    checks = {c["what"]: c for c in report.targets(rows, target=0.9)}
    for what in ("vibe frontier / eplb frontier", "vibe P90 TTFT / eplb P90 TTFT at eplb's frontier rate"):
        assert "eplb's own run at its frontier rate reached attainment 0.855, below 0.9" in checks[what]["caveat"]
    assert "eplb's own run" not in checks["vibe frontier / contiguous frontier"]["caveat"]


def test_a_p90_ratio_says_when_the_policies_left_out_different_numbers_of_failed_requests():
    """P90 TTFT is over completed requests: a policy whose slowest requests failed or were cut off looked faster,
    and the summary line does not show failures (an audit)."""
    rows = {p: {"frontier_rps": 1.0, "frontier_kind": "interpolated", "ttft_p90_ms": t, "attainment": 0.95,
                "headroom_share": 0.5, "failed": f} for p, t, f in (("eplb", 100.0, 0), ("vibe", 50.0, 4))}
    what = "vibe P90 TTFT / eplb P90 TTFT at eplb's frontier rate"
    caveat = {c["what"]: c for c in report.targets(rows)}[what]["caveat"]
    assert caveat == "P90 over completed requests only; failed or cut off: vibe 4, eplb 0"
    rows["eplb"]["failed"] = 4
    assert {c["what"]: c for c in report.targets(rows)}[what]["caveat"] == ""
    rows["eplb"]["failed"] = None  # not known: no note
    assert {c["what"]: c for c in report.targets(rows)}[what]["caveat"] == ""


def test_the_title_names_the_policies_that_ran(tmp_path, result):
    report.write(tmp_path, result)
    assert (tmp_path / "report.md").read_text().startswith(
        "# vibe-serve: side-by-side benchmark (contiguous vs eplb vs vibe)\n")
    del result["policies"]["contiguous"]
    report.write(tmp_path, result)
    assert (tmp_path / "report.md").read_text().startswith("# vibe-serve: side-by-side benchmark (eplb vs vibe)\n")


def test_runs_without_a_placement_or_with_notes_and_the_clients_send_lag_are_reported(tmp_path, result):
    """A run whose /admin/placement or /metrics could not be read is kept (an audit): the report shows '-' for its
    placement and lists what was not observed; the client's send lag bounds how far the offered load fell short."""
    run = result["policies"]["vibe"]["runs"][0]
    run["placement"] = None
    run["notes"] = ["/admin/placement after the run: ReadTimeout: timed out (no placement)"]
    run["send_lag_ms"] = {"p50": 0.4, "p99": 7.5, "max": 9.0}
    result["policies"]["eplb"]["runs"][0]["send_lag_ms"] = {"p50": 0.2, "p99": 1.5, "max": 2.0}
    report.write(tmp_path, result)
    text = (tmp_path / "report.md").read_text()
    assert "| vibe | 1.000, 1.0000 | 10 | 0.900 (0.60-0.98) |" in text
    row = next(line for line in text.splitlines() if line.startswith("| vibe | 1.000, 1.0000 | 10 |"))
    assert row.split(" | ")[10] == "-"  # placement version
    assert ("- vibe at 1.000 req/s (sweep): /admin/placement after the run: ReadTimeout: timed out (no placement)"
            in text)
    assert "P99 at most 7.5 ms over the runs (median of the runs' P99s 4.5 ms)" in text


def test_the_sweep_shows_the_rate_each_trace_offered_the_frontiers_scale(tmp_path, result):
    """The frontier and goodput are on the rate the trace offered (round(rate x duration) requests); the table and the
    plot showed the set rate, so a row's goodput could exceed its rate (a review)."""
    result["policies"]["vibe"]["runs"][0] = _run(0.25, 0.05)  # 2.5 requests in 10 s: 2 sent, 0.2 req/s
    report.write(tmp_path, result)
    assert "| vibe | 0.250, 0.2000 | 10 |" in (tmp_path / "report.md").read_text()


def test_a_percentile_no_request_had_is_no_bar_not_a_0_ms_one():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    rows = {"eplb": {"ttft_p50_ms": 540.0, "ttft_p90_ms": 950.0, "ttft_p99_ms": 1330.0},
            "vibe": {"ttft_p50_ms": None, "ttft_p90_ms": None, "ttft_p99_ms": None}}
    plots._percentile_bars(ax, rows, "ttft")
    heights = [bar.get_height() for bar in ax.patches]
    plt.close(fig)
    assert heights[:3] == [540.0, 950.0, 1330.0] and all(h != h for h in heights[3:])  # NaN: not drawn


def test_the_latency_plot_says_when_no_policy_ran_at_eplbs_frontier(tmp_path, result):
    """Without a run at eplb's frontier rate (eplb found no frontier or failed) the latency plot's four panels called
    legend() on nothing: matplotlib warned 'No artists with labels found' and the panels said nothing of why."""
    for entry in result["policies"].values():
        entry.pop("at_eplb_frontier", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.write(tmp_path, result)
    assert (tmp_path / "latency.png").stat().st_size > 0


def _drift_app(factor_before: float, factor_after: float, failed: frozenset[int] = frozenset(), **extra) -> dict:
    """A drift app's entry: 100 requests, one a second, each sent at its scheduled arrival, the switch at 40 s (so
    first_after_switch 40); TTFTs a spread of prompt lengths times the factor of their side of the switch; `failed`
    timed out."""
    from load_tests.drift import segments

    base = np.random.default_rng(3).lognormal(np.log(0.05), 0.3, 100)
    ttft = [float(b * (factor_before if i < 40 else factor_after)) for i, b in enumerate(base)]
    results = [RequestResult(i, "w", float(i), None, None, 0, 0, "timeout") if i in failed else
               RequestResult(i, "w", float(i), ttft[i], ttft[i] + 0.045, 12, 10) for i in range(100)]
    return record_json(RunRecord(started_wall=1000.0, duration_s=100.0, results=results),
                       segments=segments(results, SLO_1, 40.0, 100.0)) | {"recalibrations": []} | extra


def test_the_drift_section_reports_the_before_window_invalid_runs_unexercised_causes_and_missing_scenarios():
    """A review of the drift verdicts: the section gave no before-switch tests, a failed throttle could still read as
    a loss, an applied re-plan of another cause counted as the scenario's own, and a scenario without an after-switch
    segment left no row."""
    from load_tests.drift import DriftConfig

    skipped = [{"status": "skipped", "started_at": 1041.4, "reason": "device drift: device 0 at 1.26x the time"},
               {"status": "applied", "started_at": 1099.1, "reason": "workload drift: layer 3 cosine distance 0.1"}]
    failed = [{"name": "device 0 speed -> 0.800", "t": 40.1, "error": "HTTPStatusError: 503"}]
    drift = {"config": asdict(DriftConfig()), "slo": asdict(SLO_1), "rate_rps": 1.0, "scenarios": {
        "workload": {"first_after_switch": 40, "static": _drift_app(1.0, 1.0), "adaptive": _drift_app(0.9, 0.9)},
        "device": {"first_after_switch": 40, "static": _drift_app(1.0, 1.0, events=failed),
                   "adaptive": _drift_app(1.0, 1.2, recalibrations=skipped)},
        "partial": {"first_after_switch": 40, "static": _drift_app(1.0, 1.0)}}}
    text = report._drift(drift)
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    workload, device = rows["workload"], rows["device"]
    assert "| no (within noise); 60 pairs in blocks of 4" in workload
    assert "before the switch: 40 pairs in blocks of 4, attainment p=1.00, TTFT p=0.002" in workload
    assert "difference in differences TTFT p=" in workload and "the difference predates the switch" in workload
    assert "| invalid (neither win nor loss);" in device and "HTTPStatusError: 503" in device
    assert "| 1 / 2 (workload drift 1 / 1, device drift 0 / 1); 1 / 2 |" in device
    assert "not exercised: no device-drift re-plan applied after the switch" in device
    assert rows["partial"] == "| partial | - | - | - | - | - | - | - | not judged: no adaptive run |"
    assert "Numbers for the requests scheduled to arrive from the switch on" in text
    drift["scenarios"]["workload"].pop("first_after_switch")  # (a drift.json from before: split by send time)
    assert "Numbers for the requests sent from the switch on" in report._drift(drift)


def test_the_drift_timeline_marks_the_requests_without_a_ttft(monkeypatch):
    """Requests without a TTFT were left out of the scatter: a stretch of timeouts looked like good latency."""
    from load_tests.drift import DriftConfig

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    drift = {"config": asdict(DriftConfig()), "slo": asdict(SLO_1), "scenarios": {
        "workload": {"static": _drift_app(1.0, 1.0, failed=frozenset({50, 51, 52})), "adaptive": _drift_app(1.0, 1.0)}}}
    plots.drift_timeline(drift, Path("unused.png"))
    ax = figures[0].axes[0]
    marked = [c for c in ax.collections if "failed" in str(c.get_label())]
    assert [c.get_label() for c in marked] == ["static: failed or timed out (3)"]
    assert marked[0].get_offsets()[:, 0].tolist() == [50.0, 51.0, 52.0]
    assert marked[0].get_offsets()[:, 1].tolist() == [0.97] * 3  # (at the top of the axis, whatever its scale)
    assert 1.0 < ax.get_ylim()[0] < ax.get_ylim()[1] < 1e3  # (the marks leave the TTFT axis's limits alone)
    drift["scenarios"]["partial"] = {"static": _drift_app(1.0, 1.0)}  # (one app's run only: drawn, not a KeyError)
    plots.drift_timeline(drift, Path("unused.png"))
    assert len(figures) == 2 and len(figures[1].axes) == 2
