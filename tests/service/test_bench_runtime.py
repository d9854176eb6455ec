"""`make bench-runtime`'s table rows from per-call times (the actors' part runs in `make bench-runtime` itself)."""

from __future__ import annotations

import numpy as np
import pytest

from service.bench_runtime import overhead_row


def test_wall_minus_all_workers_compute_is_the_median_of_per_call_differences():
    """The README's lower bound of transport and engine cost was the wall time's median less all workers'
    compute's median, which may exceed every call's own difference (a review: 5.1 ms where each call's was 0.1)."""
    total = np.array([1.0, 2.0, 3.0, 20.9, 21.9]) / 1e3
    wall = np.array([1.1, 2.1, 20.0, 21.0, 22.0]) / 1e3  # the third call waited 17 ms for something else
    row = overhead_row(4, 16, wall, total / 2, total, np.full(5, 0.5e-3))
    assert row["wall_minus_all_compute_median_ms"] == pytest.approx(0.1)
    assert row["wall_median_ms"] - row["compute_all_workers_median_ms"] == pytest.approx(17.0)  # what was quoted
    assert row["overhead_median_ms"] == pytest.approx(10.55) and row["engine_median_ms"] == pytest.approx(0.5)


def test_the_decode_ratio_is_the_median_of_runs_made_side_by_side():
    """One distributed and one single-process decode, in turn, gave a ratio that moved 0.32-0.42x between benchmark
    runs with the host's load; the ratio is now the median of pairs run side by side, with its range."""
    from service.bench_runtime import throughput_row

    row = throughput_row(4, 16, [100.0, 40.0, 110.0], [300.0, 300.0, 100.0])  # a pair slowed by the host, one fast
    assert row["ratio"] == pytest.approx(1 / 3) and row["ratio_min"] == pytest.approx(40 / 300)
    assert row["ratio_max"] == pytest.approx(1.1) and len(row["ratios"]) == 3
    assert row["distributed_tokens_per_s"] == 100.0 and row["single_process_tokens_per_s"] == 300.0
    with pytest.raises(ValueError):
        throughput_row(4, 16, [1.0], [1.0, 2.0])
