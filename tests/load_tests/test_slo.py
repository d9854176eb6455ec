"""SLO checks, attainment, percentiles and the SLO frontier on hand-made request results."""

from __future__ import annotations

import pytest

from load_tests.generator import RequestResult
from load_tests.slo import (
    SLO,
    Frontier,
    attainment,
    frontier,
    interpolate_at,
    meets,
    percentiles,
    single_stream_rate,
    summarize,
)


def _result(ttft: float | None, e2e: float | None, tokens: int, error: str | None = None) -> RequestResult:
    return RequestResult(0, "w", 0.0, ttft, e2e, 10, tokens, error)


SLO_1 = SLO(ttft_s=0.1, tpot_s=0.01)


def test_tpot_is_the_mean_gap_after_the_first_token():
    assert _result(0.05, 0.15, 11).tpot_s == pytest.approx(0.01)
    assert _result(0.05, 0.05, 1).tpot_s is None
    assert _result(None, None, 0, "timeout").tpot_s is None


@pytest.mark.parametrize(("result", "ok"), [
    (_result(0.1, 0.2, 11), True),            # both exactly at the SLO
    (_result(0.11, 0.2, 11), False),          # TTFT over
    (_result(0.05, 0.2, 11), False),          # TPOT 0.015 over
    (_result(0.05, 0.05, 1), True),           # one token: judged on TTFT alone
    (_result(0.01, 0.02, 5, "cutoff"), False),  # failures never meet it
])
def test_meets_requires_completion_and_both_slos(result, ok):
    assert meets(result, SLO_1) is ok


def test_attainment_counts_failures_as_misses():
    results = [_result(0.05, 0.1, 6), _result(0.05, 0.1, 6), _result(None, None, 0, "timeout"),
               _result(0.5, 0.6, 6)]
    assert attainment(results, SLO_1) == 0.5
    with pytest.raises(ValueError, match="empty"):
        attainment([], SLO_1)


def test_slo_from_unloaded_medians():
    results = [_result(0.02, 0.12, 11), _result(0.04, 0.24, 11), _result(0.03, 0.33, 11),
               _result(None, None, 0, "timeout")]
    slo = SLO.from_unloaded(results, ttft_factor=5, tpot_factor=2, target=0.8)
    assert (slo.ttft_s, slo.tpot_s, slo.target) == (pytest.approx(0.15), pytest.approx(0.04), 0.8)
    with pytest.raises(ValueError, match="need completed unloaded requests"):
        SLO.from_unloaded([_result(None, None, 0, "x")], 5, 2)


@pytest.mark.parametrize("bad", [{"ttft_s": 0, "tpot_s": 1}, {"ttft_s": 1, "tpot_s": float("nan")},
                                 {"ttft_s": 1, "tpot_s": 1, "target": 1.5}])
def test_slo_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="SLO"):
        SLO(**bad)


def test_percentiles_and_summary():
    assert percentiles([1.0, 2.0, 3.0, None], (50,)) == {"p50": 2.0}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    results = [_result(0.05, 0.1, 6), _result(None, None, 0, "timeout")]
    summary = summarize(results, SLO_1, duration_s=2.0)
    assert summary["requests"] == 2 and summary["failed"] == 1 and summary["completed"] == 1
    assert summary["goodput_rps"] == 0.5 and summary["output_tokens_per_s"] == 3.0
    assert summary["ttft_p50_ms"] == pytest.approx(50.0) and summary["tpot_p90_ms"] == pytest.approx(10.0)


def test_frontier_interpolates_above_the_highest_rate_that_meets_the_target():
    found = frontier([1, 2, 3, 4], [1.0, 0.95, 0.85, 0.5])
    assert found == Frontier(pytest.approx(2.5), "interpolated", True)  # 0.95 -> 0.85 crosses 0.9 halfway
    noisy = frontier([1, 2, 3, 4], [1.0, 0.85, 0.95, 0.5])
    assert noisy.rate_rps == pytest.approx(3 + 1 / 9) and not noisy.monotonic  # 0.95 -> 0.5


def test_frontier_at_the_edges_of_the_sweep():
    assert frontier([3, 1, 2], [0.91, 1.0, 0.99]) == frontier([1, 2, 3], [1.0, 0.99, 0.91])
    assert frontier([1, 2, 3], [1.0, 0.99, 0.91]) == Frontier(3.0, "at_least", True)
    below = frontier([2, 4], [0.8, 0.1])
    assert below.kind == "below_sweep" and below.rate_rps == pytest.approx(1.0)  # (0, 100%) to (2, 80%)
    with pytest.raises(ValueError, match="as many"):
        frontier([1, 2], [0.5])


def test_a_frontier_far_below_the_sweep_is_zero():
    """An app failing every request (attainment 0 at every rate) was given a frontier of a tenth of the lowest rate
    (0.2 req/s for a sweep from 2), printed as `slo_frontier_rps=0.200` like any measured frontier (an audit)."""
    assert frontier([2, 4], [0.0, 0.0]) == Frontier(0.0, "below_sweep")
    assert frontier([2, 4], [0.79, 0.1]) == Frontier(0.0, "below_sweep")  # missed more than twice the 10% allowed
    assert frontier([2, 4], [0.85, 0.1]).rate_rps == pytest.approx(2 * 0.1 / 0.15)  # near the target: extrapolated
    assert frontier([2, 4], [0.5, 0.1], target=0.6).rate_rps == pytest.approx(1.6)  # missed 0.5, 0.4 allowed
    assert frontier([2, 4], [0.1, 0.0], target=0.6).rate_rps == 0.0
    assert frontier([2, 4], [0.99, 0.1], target=1.0).rate_rps == 0.0  # nothing may miss: no room to extrapolate


def test_single_stream_rate():
    unloaded = [_result(0.1, 0.5, 11), _result(0.3, 0.7, 11), _result(None, None, 0, "timeout")]
    # TPOT is per token after the first: a 50-token answer takes TTFT + 49 TPOT (it counted 50)
    assert single_stream_rate(unloaded, mean_output_tokens=50) == pytest.approx(1 / (0.2 + 49 * 0.04))
    with pytest.raises(ValueError, match="mean_output_tokens"):
        single_stream_rate(unloaded, 0)


def test_interpolate_at_swept_and_between_rates():
    # a rate swept twice, once without a value, sorted without comparing None with a float (an audit)
    assert interpolate_at([1, 1, 2], [None, 5.0, 6.0], 1.5) == pytest.approx(5.5)
    assert interpolate_at([1, 2, 4], [10.0, 20.0, 60.0], 3) == pytest.approx(40.0)
    assert interpolate_at([1, 2], [10.0, 20.0], 2) == 20.0
    assert interpolate_at([1, 2], [10.0, None], 1.5) is None
    assert interpolate_at([1, 2], [10.0, 20.0], 5) is None
