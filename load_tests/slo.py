"""SLOs and the numbers a load test reports: percentiles, SLO attainment, goodput and the SLO frontier.

Owns the definitions (README, Design: "Definitions") as pure functions over `RequestResult`s: a request
meets the SLO when it completed, its TTFT is within the TTFT SLO and its TPOT within the TPOT SLO (a
one-token output has no TPOT and is judged on TTFT alone); failed and cut-off requests never meet it.
Ignores HTTP, plotting and how requests were sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from load_tests.generator import RequestResult

PERCENTILES = (50, 90, 99)
# A frontier below the sweep is extrapolated towards rate 0 only down to this share of the lowest swept rate
# (the lowest rate missed at most 1 / share times the requests the target lets miss); lower, it is 0 (Frontier).
BELOW_SWEEP_MIN_SHARE = 0.5


@dataclass(frozen=True)
class SLO:
    """Per-request latency objectives (seconds) and the attainment the frontier asks for.

    Attributes:
        ttft_s: time to first token at most this.
        tpot_s: time per output token after the first at most this.
        target: share of requests that must meet both, for a rate to be within the frontier (0, 1].
    """

    ttft_s: float
    tpot_s: float
    target: float = 0.9

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"SLO.{name} must be finite and > 0, got {value!r}")
        if not 0 < self.target <= 1:
            raise ValueError(f"SLO.target must be in (0, 1], got {self.target!r}")

    @classmethod
    def from_unloaded(cls, results: Sequence[RequestResult], ttft_factor: float, tpot_factor: float,
                      target: float = 0.9) -> SLO:
        """SLOs as multiples of the median TTFT and TPOT of requests sent one at a time to an idle service."""
        if ttft_factor <= 0 or tpot_factor <= 0:
            raise ValueError(f"SLO factors must be > 0, got {ttft_factor!r} and {tpot_factor!r}")
        ttft = [r.ttft_s for r in results if r.error is None and r.ttft_s is not None]
        tpot = [r.tpot_s for r in results if r.tpot_s is not None]
        if not ttft or not tpot:
            raise ValueError(f"need completed unloaded requests with >= 2 tokens, got {len(results)} results "
                             f"({len(ttft)} with TTFT, {len(tpot)} with TPOT)")
        return cls(ttft_factor * float(np.median(ttft)), tpot_factor * float(np.median(tpot)), target)


def meets(result: RequestResult, slo: SLO) -> bool:
    """Whether one request completed within both SLOs."""
    if result.error is not None or result.ttft_s is None or result.ttft_s > slo.ttft_s:
        return False
    tpot = result.tpot_s
    return tpot is None or tpot <= slo.tpot_s


def attainment(results: Sequence[RequestResult], slo: SLO) -> float:
    """Share of all requests (failures included) that meet the SLO; ValueError for no requests."""
    if not results:
        raise ValueError("attainment of an empty run is undefined")
    return sum(meets(r, slo) for r in results) / len(results)


def percentiles(values: Sequence[float], qs: Sequence[float] = PERCENTILES) -> dict[str, float | None]:
    """{"p50": ..., ...} of `values` (None for each when there are none)."""
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return {f"p{q:g}": float(np.percentile(array, q)) if array.size else None for q in qs}


def summarize(results: Sequence[RequestResult], slo: SLO, duration_s: float, window_s: float | None = None) -> dict:
    """A run's numbers: counts, attainment, goodput (SLO-meeting requests per second of the trace's arrival
    window `window_s`, None: of `duration_s`), throughput (output tokens per second of `duration_s`, the run's
    wall time) and TTFT / TPOT / E2E percentiles in ms (completed requests only).

    Goodput over the wall time (the arrivals plus the tail until the last stream ended) read 1.20 req/s for a
    run that met the SLO for every request of 1.30 req/s, and differed between policies with the same requests
    within SLO by when their last stream ended."""
    if duration_s <= 0 or (window_s is not None and window_s <= 0):
        raise ValueError(f"duration_s and window_s must be > 0, got {duration_s!r} and {window_s!r}")
    done = [r for r in results if r.error is None]
    met = sum(meets(r, slo) for r in results)
    summary = {
        "requests": len(results), "completed": len(done), "failed": len(results) - len(done),
        "attainment": attainment(results, slo), "goodput_rps": met / (window_s or duration_s),
        "output_tokens_per_s": sum(r.output_tokens for r in done) / duration_s,
    }
    for name, values in (("ttft", [r.ttft_s for r in done]), ("tpot", [r.tpot_s for r in done]),
                         ("e2e", [r.e2e_s for r in done])):
        for key, value in percentiles(values).items():
            summary[f"{name}_{key}_ms"] = None if value is None else 1e3 * value
    return summary


@dataclass(frozen=True)
class Frontier:
    """The highest request rate with at least `target` attainment.

    kind: "interpolated" (linear between the highest swept rate at or above the target and the next
    higher swept rate, which is below it), "at_least" (the highest swept rate met it: the value is that
    rate), or "below_sweep" (no swept rate met it: interpolated between rate 0, taken as full attainment,
    and the lowest rate, when the lowest rate missed at most twice the requests the target lets miss, so
    the value is at least half the lowest rate; else 0: a sweep whose lowest rate is that far below the
    target says nothing about where the frontier is, and the extrapolation would give a service failing
    every request (attainment 0) a tenth of the lowest rate at target 0.9). `monotonic` is False when a
    rate below the frontier missed the target (noise, or a disturbance during that run): the frontier then
    overstates what the lower rates showed.
    """

    rate_rps: float
    kind: str
    monotonic: bool = True


def frontier(rates: Sequence[float], attainments: Sequence[float], target: float = 0.9) -> Frontier:
    """SLO frontier of a rate sweep (any order), as README's Design section defines it: the highest rate that meets
    the target, refined by linear interpolation towards the next swept rate."""
    if len(rates) != len(attainments) or not rates:
        raise ValueError(f"need as many attainments as rates (>= 1), got {len(rates)} and {len(attainments)}")
    order = np.argsort(rates)
    r = np.asarray(rates, dtype=np.float64)[order]
    a = np.asarray(attainments, dtype=np.float64)[order]
    met = np.flatnonzero(a >= target)
    if met.size == 0:  # a[0] < target <= 1
        share = (1.0 - target) / (1.0 - a[0])
        return Frontier(float(share * r[0]) if share >= BELOW_SWEEP_MIN_SHARE else 0.0, "below_sweep")
    i = int(met[-1])
    monotonic = bool(np.all(a[:i] >= target))
    if i == r.size - 1:
        return Frontier(float(r[i]), "at_least", monotonic)
    share = (a[i] - target) / (a[i] - a[i + 1])
    return Frontier(float(r[i] + share * (r[i + 1] - r[i])), "interpolated", monotonic)


def single_stream_rate(unloaded: Sequence[RequestResult], mean_output_tokens: float) -> float:
    """Requests per second one client sending requests back to back would get: 1 / (median unloaded TTFT
    + (mean_output_tokens - 1) x median unloaded TPOT), TPOT being the time per token after the first. A
    machine-independent unit for a rate sweep."""
    if mean_output_tokens < 1:
        raise ValueError(f"mean_output_tokens must be >= 1, got {mean_output_tokens!r}")
    ttft = [r.ttft_s for r in unloaded if r.error is None and r.ttft_s is not None]
    tpot = [r.tpot_s for r in unloaded if r.tpot_s is not None]
    if not ttft or not tpot:
        raise ValueError("need completed unloaded requests with >= 2 tokens")
    return 1.0 / (float(np.median(ttft)) + (mean_output_tokens - 1) * float(np.median(tpot)))


def interpolate_at(rates: Sequence[float], values: Sequence[float | None], rate: float) -> float | None:
    """`values` (e.g. P90 TTFT per swept rate) linearly interpolated at `rate`; None outside the sweep or
    where a bracketing value is None."""
    points = sorted(((float(x), y) for x, y in zip(rates, values)), key=lambda point: point[0])  # y may be None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= rate <= x1 and y0 is not None and y1 is not None:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (rate - x0) / (x1 - x0)
    exact = [y for x, y in points if x == rate]
    return exact[0] if exact else None
