import numpy as np
import pytest

from placement.drift import DeviceDriftDetector, WorkloadDriftDetector, cosine_distance

REFERENCE = np.array([[400.0, 200, 100, 50, 25, 25], [100, 100, 100, 100, 100, 100]])  # [L=2, E=6]
SHIFTED = np.array([[25.0, 25, 50, 100, 200, 400], [100, 100, 100, 100, 100, 100]])  # layer 0 reversed


def test_cosine_distance_basics():
    a = np.array([[1.0, 0.0], [2.0, 2.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 1.0], [1.0, 1.0], [3.0, 1.0], [1.0, -1.0]])
    np.testing.assert_allclose(cosine_distance(a, b), [1.0, 0.0, 0.0, 1.0], atol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        cosine_distance(a, b[:2])


def test_no_report_on_stationary_noise():
    rng = np.random.default_rng(0)
    detector = WorkloadDriftDetector(REFERENCE)
    reports = [detector.observe(rng.poisson(REFERENCE)) for _ in range(300)]
    assert reports.count(None) == 300
    assert detector.num_passes == 300


def test_reports_at_the_first_check_with_the_drifted_layer():
    detector = WorkloadDriftDetector(REFERENCE, check_every=10, window=20)
    reports = [detector.observe(SHIFTED) for _ in range(10)]
    assert reports[:9] == [None] * 9
    report = reports[9]
    assert report is not None and report.num_passes == 10
    assert report.worst_layer == 0 and report.worst_distance > 0.05
    assert report.distances.shape == (2,) and report.distances[1] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(report.window_mean, SHIFTED)


def test_window_slides():
    detector = WorkloadDriftDetector(REFERENCE, check_every=1, window=5, cooldown=0)
    assert detector.window_mean() is None
    for _ in range(7):
        detector.observe(REFERENCE)
    report = None
    for _ in range(5):
        report = detector.observe(SHIFTED) or report
    np.testing.assert_allclose(report.window_mean, SHIFTED)  # the reference passes left the window
    np.testing.assert_allclose(detector.window_mean(), SHIFTED)
    assert report.num_passes == 12


def test_window_activity_is_the_share_of_passes_with_tokens():
    detector = WorkloadDriftDetector(REFERENCE, check_every=1, window=4, cooldown=0)
    assert detector.window_activity() is None
    counts = np.zeros_like(REFERENCE)
    counts[0, 0] = 3.0
    detector.observe(counts)
    detector.observe(REFERENCE)
    expected = ((counts > 0).astype(float) + (REFERENCE > 0)) / 2
    np.testing.assert_allclose(detector.window_activity(), expected)
    for _ in range(4):  # the window slides past both
        detector.observe(SHIFTED)
    np.testing.assert_allclose(detector.window_activity(), (SHIFTED > 0).astype(float))


def test_partial_drift_needs_enough_of_the_window():
    # Window of 10: a few shifted passes dilute in the mean and are not yet drift.
    detector = WorkloadDriftDetector(REFERENCE, check_every=1, window=10)
    for _ in range(9):
        detector.observe(REFERENCE)
    first = [detector.observe(SHIFTED) for _ in range(10)]
    assert first[0] is None and first[-1] is not None


def test_reset_cools_down_then_checks_again():
    detector = WorkloadDriftDetector(REFERENCE, check_every=1, window=3, cooldown=5)
    assert detector.observe(SHIFTED) is not None
    detector.reset(REFERENCE)  # keeps the stale reference: drift persists
    quiet = [detector.observe(SHIFTED) for _ in range(4)]
    assert quiet == [None] * 4
    assert detector.observe(SHIFTED) is not None  # 5 passes after the reset


def test_cool_downs_in_a_row_back_off_up_to_the_window_until_a_reset():
    detector = WorkloadDriftDetector(REFERENCE, check_every=1, window=50, cooldown=10)
    quiet = []
    for _ in range(5):
        detector.cool_down()
        quiet.append(detector._quiet_until - detector.num_passes)
    assert quiet == [10, 20, 40, 50, 50]
    detector.reset(REFERENCE)
    detector.cool_down()
    assert detector._quiet_until - detector.num_passes == 10


def test_reset_to_the_new_loads_stops_reports():
    detector = WorkloadDriftDetector(REFERENCE, check_every=2, window=4, cooldown=0)
    report = next(r for r in (detector.observe(SHIFTED) for _ in range(10)) if r is not None)
    detector.reset(report.window_mean)
    assert all(detector.observe(SHIFTED) is None for _ in range(20))
    np.testing.assert_allclose(detector.reference, SHIFTED)


def _volume(counts: np.ndarray) -> float:
    return float(counts.sum() / counts.shape[0])  # router assignments per layer


def test_a_change_in_router_load_per_pass_is_drift_though_the_shares_stay():
    # the batch size grew 4x: the same shares, so the cosine distance is 0, but 4x the calls per pass
    detector = WorkloadDriftDetector(REFERENCE, check_every=5, window=5, cooldown=0)
    assert detector.volume() is None and detector.volume_ratio() is None
    assert all(detector.observe(4 * REFERENCE) is None for _ in range(10))  # no reference volume yet
    for _ in range(5):
        detector.observe(REFERENCE)
    detector.reset(REFERENCE)  # planned on the window: its volume is the reference
    assert detector.reference_volume == pytest.approx(_volume(REFERENCE))
    reports = [detector.observe(4 * REFERENCE) for _ in range(5)]
    report = reports[-1]
    assert reports[:4] == [None] * 4 and report is not None
    assert report.causes == ("volume",) and report.volume_ratio == pytest.approx(4.0)
    np.testing.assert_allclose(report.distances, 0.0, atol=1e-12)
    assert report.summary() == "median router load per pass 4.00x the reference's"
    detector.cool_down()  # not re-planned: the references stay, and so does the drift
    assert [detector.observe(4 * REFERENCE) is not None for _ in range(5)][-1]
    detector.reset(report.window_mean)  # re-planned for it: no more reports
    assert all(detector.observe(4 * REFERENCE) is None for _ in range(20))
    assert detector.volume_ratio() == pytest.approx(1.0)


def test_volume_is_the_median_pass_so_a_prefill_among_decodes_is_no_drift():
    detector = WorkloadDriftDetector(REFERENCE, check_every=1, window=10, cooldown=0)
    detector.reset(REFERENCE, volume=_volume(REFERENCE))
    reports = [detector.observe(50 * REFERENCE if i == 3 else REFERENCE) for i in range(10)]
    assert reports == [None] * 10  # the window mean grew 5.9x, its median pass not at all
    assert detector.volume() == pytest.approx(_volume(REFERENCE))
    for _ in range(5):  # half the window prefill-sized: the volume is one kind of pass, not their mean
        detector.observe(50 * REFERENCE)
    assert detector.volume() in (pytest.approx(_volume(REFERENCE)), pytest.approx(50 * _volume(REFERENCE)))


def test_volume_drift_either_way_and_only_beyond_the_factor():
    for scale, drifted in ((0.3, True), (0.4, False), (2.9, False), (3.1, True)):
        detector = WorkloadDriftDetector(REFERENCE, check_every=1, window=1, cooldown=0)
        detector.reset(REFERENCE, volume=_volume(REFERENCE))
        report = detector.observe(scale * REFERENCE)
        assert (report is not None) == drifted, scale
    detector = WorkloadDriftDetector(REFERENCE, check_every=1, window=1, volume_factor=np.inf)
    detector.reset(REFERENCE, volume=_volume(REFERENCE))
    assert detector.observe(100 * REFERENCE) is None  # off
    detector = WorkloadDriftDetector(REFERENCE, check_every=1, window=1, cooldown=0)
    detector.reset(REFERENCE, volume=_volume(REFERENCE))
    assert detector.observe(np.zeros_like(REFERENCE)) is None  # a window without load has nothing to plan on
    with pytest.raises(ValueError, match="volume"):
        detector.reset(REFERENCE, volume=0.0)


def test_routing_and_volume_drift_together_name_both():
    detector = WorkloadDriftDetector(REFERENCE, check_every=1, window=1, cooldown=0)
    detector.reset(REFERENCE, volume=_volume(REFERENCE))
    report = detector.observe(4 * SHIFTED)
    assert report.causes == ("routing", "volume")
    assert report.summary() == (f"layer 0 cosine distance {report.distances[0]:.3f}; "
                                "median router load per pass 4.00x the reference's")


@pytest.mark.parametrize(
    "kwargs", [{"check_every": 0}, {"window": 0}, {"threshold": 0.0}, {"threshold": 1.5}, {"cooldown": -1},
               {"volume_factor": 1.0}, {"volume_factor": 0.5}, {"volume_factor": float("nan")}]
)
def test_workload_config_is_validated(kwargs):
    with pytest.raises(ValueError):
        WorkloadDriftDetector(REFERENCE, **kwargs)


def test_workload_input_is_validated():
    with pytest.raises(ValueError, match="layer 1"):
        WorkloadDriftDetector(np.array([[1.0, 2.0], [0.0, 0.0]]))
    detector = WorkloadDriftDetector(REFERENCE)
    with pytest.raises(ValueError, match=r"\(2, 6\)"):
        detector.observe(np.ones((2, 5)))
    with pytest.raises(ValueError, match=">= 0"):
        detector.observe(-REFERENCE)
    with pytest.raises(ValueError, match=r"\(2, 6\)"):
        detector.reset(np.ones((3, 6)))


def _naive_ratio(samples, halflife):
    """Reference: weights 2^(-age / halflife) over one device's samples, newest age 0."""
    pred = np.array([p for p, _ in samples])
    obs = np.array([o for _, o in samples])
    weights = 0.5 ** (np.arange(len(samples))[::-1] / halflife)
    return (weights @ obs) / (weights @ pred)


def test_device_ratio_matches_a_naive_reference_and_batches_match_single_calls():
    rng = np.random.default_rng(3)
    device = rng.integers(0, 3, 200)
    predicted = rng.uniform(1e-4, 1e-3, 200)
    observed = predicted * rng.uniform(0.9, 1.4, 200)
    one_by_one = DeviceDriftDetector(3, halflife=20)
    for g, p, o in zip(device, predicted, observed):
        one_by_one.observe(int(g), p, o)
    batched = DeviceDriftDetector(3, halflife=20)
    batched.observe(device[:77], predicted[:77], observed[:77])
    batched.observe(device[77:], predicted[77:], observed[77:])
    expected = [_naive_ratio(list(zip(predicted[device == g], observed[device == g])), 20) for g in range(3)]
    np.testing.assert_allclose(one_by_one.ratios(), expected, rtol=1e-12)
    np.testing.assert_allclose(batched.ratios(), expected, rtol=1e-12)


def test_slow_device_is_reported_only_with_enough_samples():
    detector = DeviceDriftDetector(4, min_samples=20)
    for _ in range(19):
        detector.observe([0, 1, 2, 3], 1e-3, [1e-3, 1.25e-3, 1.05e-3, 0.85e-3])
    assert detector.drifted() == {}
    detector.observe([0, 1, 2, 3], 1e-3, [1e-3, 1.25e-3, 1.05e-3, 0.85e-3])
    drifted = detector.drifted()
    assert sorted(drifted) == [1, 3]
    assert drifted[1] == pytest.approx(1.25) and drifted[3] == pytest.approx(0.85)


def test_old_samples_fade_with_the_halflife():
    detector = DeviceDriftDetector(1, halflife=50, min_samples=1)
    detector.observe(np.zeros(200, dtype=int), 1e-3, 1e-3)
    detector.observe(np.zeros(50, dtype=int), 1e-3, 1.3e-3)
    # After one halflife the new samples weigh 0.5 / (0.5 + 0.5 * (1 - 2^-4)) of the total.
    new_weight = 0.5 / (0.5 + 0.5 * (1 - 2.0**-4))
    assert detector.ratios()[0] == pytest.approx(1.0 + 0.3 * new_weight, rel=1e-9)


def test_device_reset():
    detector = DeviceDriftDetector(2, min_samples=1)
    detector.observe([0, 1], 1.0, 2.0)
    detector.reset(0)
    assert np.isnan(detector.ratios()[0]) and detector.drifted() == {1: 2.0}
    detector.reset()
    assert np.all(np.isnan(detector.ratios())) and detector.drifted() == {}


def test_device_input_is_validated():
    detector = DeviceDriftDetector(2)
    with pytest.raises(ValueError, match="device"):
        detector.observe(2, 1.0, 1.0)
    with pytest.raises(ValueError, match="device"):
        detector.observe(0.5, 1.0, 1.0)
    with pytest.raises(ValueError, match="predicted_s"):
        detector.observe(0, 0.0, 1.0)
    with pytest.raises(ValueError, match="observed_s"):
        detector.observe(0, 1.0, float("nan"))
    with pytest.raises(ValueError, match="device"):
        detector.reset(5)
    for kwargs in ({"threshold": 0}, {"min_samples": 0}, {"halflife": -1}):
        with pytest.raises(ValueError):
            DeviceDriftDetector(2, **kwargs)
    with pytest.raises(ValueError, match="num_devices"):
        DeviceDriftDetector(0)
