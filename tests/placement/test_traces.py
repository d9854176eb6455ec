import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from placement.traces import (
    TRACES_ENV,
    load_trace,
    load_traces,
    resample_experts,
    scale_loads,
    select_layers,
    trace_dir,
)


def _write_trace(path, counts, meta=None):
    np.savez(path, counts=np.asarray(counts), meta=json.dumps(meta or {"model": "tiny"}))


def test_trace_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACES_ENV, str(tmp_path))
    assert trace_dir() == tmp_path


def test_missing_trace_dir_names_the_path_and_the_variable(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(TRACES_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=TRACES_ENV) as info:
        trace_dir()
    assert str(missing) in str(info.value)


def test_load_trace_reads_counts_and_meta(tmp_path):
    _write_trace(tmp_path / "tiny_a.npz", [[3, 0, 1], [2, 2, 2]], {"model": "tiny", "top_k": 2})
    trace = load_trace(tmp_path / "tiny_a.npz")
    assert trace.name == "tiny_a"
    assert trace.counts.dtype == np.int64 and trace.counts.tolist() == [[3, 0, 1], [2, 2, 2]]
    assert trace.meta == {"model": "tiny", "top_k": 2}
    assert not trace.counts.flags.writeable


@pytest.mark.parametrize("counts", [[1, 2, 3], [[1, -2], [3, 4]], np.zeros((0, 4))])
def test_load_trace_rejects_bad_counts(tmp_path, counts):
    _write_trace(tmp_path / "bad.npz", counts)
    with pytest.raises(ValueError, match="bad.npz"):
        load_trace(tmp_path / "bad.npz")


def test_load_trace_refuses_fractional_counts_rather_than_truncating_them(tmp_path):
    """A normalized trace (shares, not counts) would load as zeros: layer 0 here would lose all its load."""
    _write_trace(tmp_path / "normalized.npz", [[0.4, 0.3, 0.2, 0.1], [2.9, 1.9, 0.9, 0.5]])
    with pytest.raises(ValueError, match="normalized.npz.*whole"):
        load_trace(tmp_path / "normalized.npz")
    _write_trace(tmp_path / "whole.npz", [[4.0, 0.0], [2.0, 1.0]])  # whole numbers stored as floats load
    assert load_trace(tmp_path / "whole.npz").counts.tolist() == [[4, 0], [2, 1]]


def test_load_traces_is_sorted_by_name(tmp_path):
    for name in ("b", "a", "c"):
        _write_trace(tmp_path / f"{name}.npz", [[1, 2]])
    assert [t.name for t in load_traces(tmp_path)] == ["a", "b", "c"]


def test_real_traces_load_with_the_documented_expert_counts():
    try:
        traces = load_traces()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    assert len(traces) >= 20
    for trace in traces:
        assert trace.counts.sum() > 0, trace.name
        assert trace.meta.get("num_experts", trace.counts.shape[1]) == trace.counts.shape[1], trace.name


def test_resample_to_the_same_count_permutes_each_layer():
    counts = np.array([[9.0, 1, 4, 0, 7], [5, 5, 2, 8, 3]])
    out = resample_experts(counts, 5, np.random.default_rng(0))
    np.testing.assert_allclose(np.sort(out, axis=1), np.sort(counts, axis=1))


def test_resample_keeps_the_skew_of_a_smooth_shape():
    rng = np.random.default_rng(1)
    counts = 1000.0 * np.exp(-np.arange(64) / np.array([[6.0], [12.0], [30.0]]))  # [3, 64] decaying
    expected = counts.max(axis=1) / counts.mean(axis=1)
    for num_experts, rtol in ((32, 0.1), (64, 1e-12), (256, 0.06)):
        out = resample_experts(counts, num_experts, rng)
        np.testing.assert_allclose(out.max(axis=1) / out.mean(axis=1), expected, rtol=rtol)


def test_resample_is_seeded_and_random():
    counts = np.arange(32, dtype=float)[None, :].repeat(3, axis=0)
    a = resample_experts(counts, 48, np.random.default_rng(7))
    b = resample_experts(counts, 48, np.random.default_rng(7))
    c = resample_experts(counts, 48, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # layers are permuted independently


@settings(max_examples=50, deadline=None)
@given(
    counts=arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 40)),
                  elements=st.floats(0, 1e6, allow_subnormal=False)),
    num_experts=st.integers(1, 80),
)
def test_resample_keeps_layer_totals(counts, num_experts):
    out = resample_experts(counts, num_experts, np.random.default_rng(0))
    assert out.shape == (counts.shape[0], num_experts)
    assert np.all(out >= 0)
    np.testing.assert_allclose(out.sum(axis=1), counts.sum(axis=1), rtol=1e-9, atol=1e-6)


def test_scale_loads_sets_the_mean_per_layer_and_keeps_empty_layers():
    counts = np.array([[1.0, 3.0], [0.0, 0.0], [10.0, 30.0]])
    out = scale_loads(counts, 64.0)
    np.testing.assert_allclose(out.mean(axis=1), [64.0, 0.0, 64.0])
    np.testing.assert_allclose(out[0] / out[0].sum(), [0.25, 0.75])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_scale_loads_rejects_bad_levels(bad):
    with pytest.raises(ValueError, match="tokens_per_expert"):
        scale_loads(np.ones((1, 2)), bad)


def test_resample_rejects_bad_input():
    with pytest.raises(ValueError, match="num_experts"):
        resample_experts(np.ones((1, 4)), 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="loads"):
        resample_experts(np.array([[1.0, -1.0]]), 4, np.random.default_rng(0))


def test_select_layers_spans_first_to_last():
    counts = np.arange(58)[:, None] * np.ones((1, 3))
    assert select_layers(counts, 4)[:, 0].tolist() == [0, 19, 38, 57]
    np.testing.assert_array_equal(select_layers(counts, None), counts)
    assert select_layers(counts, 100).shape == (58, 3)
    with pytest.raises(ValueError, match="num_layers"):
        select_layers(counts, 0)
