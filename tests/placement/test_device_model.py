"""DeviceModel: the flat-then-linear curve, its scaling and its robust fit."""

import numpy as np
import pytest

from placement.device_model import DeviceModel


def test_latency_is_flat_then_linear_and_zero_without_tokens():
    model = DeviceModel(fixed=2e-4, knee=128, slope=1e-6)
    tokens = np.array([0, 1, 64, 128, 129, 1128])
    expected = [0.0, 2e-4, 2e-4, 2e-4, 2e-4 + 1e-6, 2e-4 + 1000e-6]
    np.testing.assert_allclose(model.latency(tokens), expected, rtol=1e-12)
    assert model.latency(0) == 0.0


def test_throughput_is_tokens_per_second_and_zero_without_tokens():
    model = DeviceModel(fixed=1e-3, knee=10, slope=1e-4)
    np.testing.assert_allclose(model.throughput([0, 10, 20]), [0.0, 1e4, 20 / 2e-3])


def test_scaled_multiplies_times_and_keeps_the_knee():
    model = DeviceModel(fixed=2e-4, knee=128, slope=2e-4 / 128).scaled(1.25)
    assert model.knee == 128
    np.testing.assert_allclose(model.latency([50, 256]), [2.5e-4, 5e-4])


@pytest.mark.parametrize("field", ["fixed", "knee", "slope"])
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_parameters_raise_naming_the_field(field, bad):
    values = {"fixed": 1e-4, "knee": 10.0, "slope": 1e-6, field: bad}
    with pytest.raises(ValueError, match=field):
        DeviceModel(**values)


@pytest.mark.parametrize("factor", [0.0, -2.0, float("nan")])
def test_bad_scale_factor_raises(factor):
    with pytest.raises(ValueError, match="factor"):
        DeviceModel(1e-4, 10, 1e-6).scaled(factor)


@pytest.mark.parametrize("seed", range(5))
def test_fit_recovers_a_known_curve_under_noise_and_outliers(seed):
    rng = np.random.default_rng(seed)
    truth = DeviceModel(fixed=rng.uniform(1e-4, 5e-4), knee=rng.uniform(64, 256), slope=0.0)
    truth = DeviceModel(truth.fixed, truth.knee, truth.fixed / truth.knee * rng.uniform(0.7, 1.5))
    tokens = np.repeat(np.geomspace(8, 4096, 24), 3)
    seconds = truth.latency(tokens) * rng.normal(1.0, 0.01, tokens.size)  # 1% timing noise
    outliers = rng.choice(tokens.size, size=6, replace=False)
    seconds[outliers] *= rng.uniform(1.5, 3.0, outliers.size)  # preempted calls, clock dips
    fitted = DeviceModel.fit(tokens, seconds)
    assert fitted.fixed == pytest.approx(truth.fixed, rel=0.03)
    assert fitted.slope == pytest.approx(truth.slope, rel=0.05)
    assert fitted.knee == pytest.approx(truth.knee, rel=0.15)
    grid = np.geomspace(8, 4096, 50)
    np.testing.assert_allclose(fitted.latency(grid), truth.latency(grid), rtol=0.05)


def test_fit_without_samples_beyond_the_knee_continues_the_flat_part():
    tokens = np.array([1, 2, 4, 8, 16, 32])
    fitted = DeviceModel.fit(tokens, np.full(tokens.size, 3e-4))
    assert fitted.fixed == pytest.approx(3e-4, rel=1e-6)
    assert fitted.knee == pytest.approx(32)
    assert fitted.slope == pytest.approx(3e-4 / 32, rel=1e-6)


def test_fits_of_a_curve_flat_over_its_samples_agree_whatever_the_noise():
    """A curve flat past the largest sample (a GPU's launch-bound experts, flat to about 3072 tokens, profiled to
    1024) with 2% noise: a slope that came out at 0 took the compute-bound continuation (139 ns/token), one just above
    0 kept a near-flat line: fits of one device 10x apart beyond the samples by the noise alone (a review). Every fit
    now continues the flat part."""
    tokens = np.array([1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024] * 3, dtype=float)
    slopes = []
    for seed in range(12):
        noise = 1 + 0.02 * np.random.default_rng(seed).standard_normal(tokens.size)
        fitted = DeviceModel.fit(tokens, 1.4e-4 * noise)
        assert fitted.knee == 1024.0
        slopes.append(fitted.slope / (fitted.fixed / 1024.0))
    assert np.allclose(slopes, 1.0)


def test_fit_ignores_zero_token_samples():
    truth = DeviceModel(2e-4, 100, 2e-6)
    tokens = np.array([0, 0, 10, 50, 100, 200, 400, 800])
    seconds = np.where(tokens > 0, truth.latency(tokens), 99.0)
    fitted = DeviceModel.fit(tokens, seconds)
    np.testing.assert_allclose(fitted.latency(tokens[2:]), truth.latency(tokens[2:]), rtol=1e-3)


@pytest.mark.parametrize(
    ("tokens", "seconds", "match"),
    [
        ([1, 2], [1.0], "same length"),
        ([0, 5], [1.0, 1.0], "at least 2"),
        ([1, 2], [1.0, -1.0], "seconds"),
        ([1, 2], [1.0, float("nan")], "seconds"),
    ],
)
def test_fit_rejects_bad_samples(tokens, seconds, match):
    with pytest.raises(ValueError, match=match):
        DeviceModel.fit(np.array(tokens), np.array(seconds))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -4.0])
def test_fit_refuses_token_counts_that_are_not_counts(bad):
    """A NaN token count was dropped silently and an infinite one blamed `fixed`."""
    with pytest.raises(ValueError, match="tokens must be finite counts"):
        DeviceModel.fit(np.array([1.0, 8.0, bad]), np.array([1e-4, 1e-4, 2e-4]))
