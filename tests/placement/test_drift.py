import numpy as np
import pytest

from placement.drift import DeviceDriftDetector, DeviceDriftTracker, WorkloadDriftDetector, cosine_distance

REFERENCE = np.array([[400.0, 200, 100, 50, 25, 25], [100, 100, 100, 100, 100, 100]])  # [L=2, E=6]
SHIFTED = np.array([[25.0, 25, 50, 100, 200, 400], [100, 100, 100, 100, 100, 100]])  # layer 0 reversed


def test_cosine_distance_basics():
    a = np.array([[1.0, 0.0], [2.0, 2.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 1.0], [1.0, 1.0], [3.0, 1.0], [1.0, -1.0]])
    np.testing.assert_allclose(cosine_distance(a, b), [1.0, 0.0, 0.0, 1.0], atol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        cosine_distance(a, b[:2])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_cosine_distance_refuses_loads_that_are_not_finite(bad):
    """A NaN row gave distance 0.0, "no drift"."""
    a = np.array([[1.0, bad], [1.0, 1.0]])
    for x, y in ((a, np.ones((2, 2))), (np.ones((2, 2)), a)):
        with pytest.raises(ValueError, match="finite"):
            cosine_distance(x, y)


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


def test_window_passes_are_the_last_passes_oldest_first():
    detector = WorkloadDriftDetector(REFERENCE, check_every=1, window=4, cooldown=0)
    assert detector.window_passes().shape == (0, *REFERENCE.shape)
    passes = [REFERENCE * (n + 1) for n in range(7)]
    for n, counts in enumerate(passes):
        detector.observe(counts)
        np.testing.assert_array_equal(detector.window_passes(), passes[max(0, n - 3):n + 1])
    detector.window_passes()[0] += 1.0  # a copy
    np.testing.assert_array_equal(detector.window_passes()[0], passes[3])


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


def test_a_cool_down_without_a_configured_cooldown_still_waits():
    """cooldown=0 made every cool_down 0 passes: a drift not worth acting on was reported again at every check."""
    detector = WorkloadDriftDetector(REFERENCE, check_every=5, window=50, cooldown=0)
    assert [detector.cool_down() for _ in range(6)] == [5, 10, 20, 40, 50, 50]


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
    detector = DeviceDriftDetector(4, min_samples=30, halflife=20)
    for _ in range(29):
        detector.observe([0, 1, 2, 3], 1e-3, [1e-3, 1.25e-3, 1.05e-3, 0.85e-3])
    assert detector.drifted() == {}  # beyond for more than a halflife, but too few samples
    detector.observe([0, 1, 2, 3], 1e-3, [1e-3, 1.25e-3, 1.05e-3, 0.85e-3])
    drifted = detector.drifted()
    assert sorted(drifted) == [1, 3]
    assert drifted[1] == pytest.approx(1.25) and drifted[3] == pytest.approx(0.85)


def _step(detector, before, after, *, rng, batch=10, jitter=0.02):
    """1000 samples of device 0 at ratio `before`, then batches at `after`; the first report after the
    step, with the number of samples after the step it took (None: no report within 1000 samples)."""
    def feed(ratio, n):
        detector.observe(np.zeros(n, dtype=int), 1e-3, 1e-3 * ratio * rng.lognormal(0, jitter, n))
    feed(before, 1000)
    assert detector.drifted() == {}
    for taken in range(batch, 1001, batch):
        feed(after, batch)
        if drifted := detector.drifted():
            return drifted, taken
    return None, None


def test_a_step_is_reported_once_settled_with_its_whole_size():
    # The weighted ratio passes 1.05 about 10 samples after a step to 1.4, when it is about 1.1: the old
    # detector reported that, and a model refitted to it had another 1.27x left to report.
    rng = np.random.default_rng(0)
    for after in (1.4, 1.25, 0.8):
        detector = DeviceDriftDetector(1, threshold=0.05, min_samples=50, halflife=50)
        drifted, taken = _step(detector, 1.0, after, rng=rng)
        assert set(drifted) == {0}
        assert drifted[0] == pytest.approx(after, rel=0.02)  # the level: the samples since the crossing
        assert 50 <= taken <= 80  # a halflife after the weighted ratio went beyond
        assert abs(detector.ratios()[0] - after) > 0.05 * after  # the weighted ratio still lagging


def test_a_short_spike_is_not_reported():
    detector = DeviceDriftDetector(1, threshold=0.05, min_samples=50, halflife=50)
    detector.observe(np.zeros(500, dtype=int), 1e-3, 1e-3)
    for ratio, n in ((1.5, 15), (1.0, 300)):
        for _ in range(n):
            detector.observe(0, 1e-3, 1e-3 * ratio)
            assert detector.drifted() == {}


def test_a_device_back_within_the_threshold_starts_its_count_again():
    detector = DeviceDriftDetector(1, threshold=0.1, min_samples=1, halflife=20)
    detector.observe(np.zeros(15, dtype=int), 1e-3, 1.5e-3)
    detector.observe(np.zeros(300, dtype=int), 1e-3, 1e-3)  # back to its model
    taken = 0
    while not detector.drifted() and taken < 40:
        detector.observe(0, 1e-3, 2e-3)
        taken += 1
    assert 20 < taken < 40  # a halflife of samples beyond, counted from the second run's crossing
    assert detector.drifted() == {0: pytest.approx(2.0)}  # the level of the second run only


def test_large_batches_match_one_sample_at_a_time():
    rng = np.random.default_rng(5)
    device = rng.integers(0, 2, 1500)
    predicted = rng.uniform(1e-4, 1e-3, 1500)
    observed = predicted * np.where(np.arange(1500) < 600, 1.0, 1.3) * rng.uniform(0.95, 1.05, 1500)
    one_by_one = DeviceDriftDetector(2, threshold=0.1, min_samples=10, halflife=40)
    for g, p, o in zip(device, predicted, observed):
        one_by_one.observe(int(g), p, o)
    batched = DeviceDriftDetector(2, threshold=0.1, min_samples=10, halflife=40)
    batched.observe(device, predicted, observed)  # 1500 samples in one call
    np.testing.assert_allclose(batched.ratios(), one_by_one.ratios(), rtol=1e-9)
    assert set(batched.drifted()) == set(one_by_one.drifted()) == {0, 1}
    for g, level in one_by_one.drifted().items():
        assert batched.drifted()[g] == pytest.approx(level, rel=1e-9)


def test_old_samples_fade_with_the_halflife():
    detector = DeviceDriftDetector(1, halflife=50, min_samples=1)
    detector.observe(np.zeros(200, dtype=int), 1e-3, 1e-3)
    detector.observe(np.zeros(50, dtype=int), 1e-3, 1.3e-3)
    # After one halflife the new samples weigh 0.5 / (0.5 + 0.5 * (1 - 2^-4)) of the total.
    new_weight = 0.5 / (0.5 + 0.5 * (1 - 2.0**-4))
    assert detector.ratios()[0] == pytest.approx(1.0 + 0.3 * new_weight, rel=1e-9)


def test_device_reset():
    detector = DeviceDriftDetector(2, min_samples=1, halflife=1)
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


def _follow(tracker, ratio_at, steps, *, per_step=10, seed=0):
    """Feed device 0's timings, `ratio_at(step)` x its profiled time, predicted by the tracker's current
    scale; refit and ask for a re-plan at each step, as the coordinator's loop does. The steps that
    asked for one."""
    rng = np.random.default_rng(seed)
    asked = []
    for step in range(steps):
        predicted = np.full(per_step, 1e-3 * tracker.scales[0])
        tracker.detector.observe(np.zeros(per_step, dtype=int), predicted, 1e-3 * ratio_at(step) * rng.lognormal(0, 0.02, per_step))
        tracker.refit()
        if tracker.due():
            asked.append(step)
    return asked


def test_tracker_re_plans_a_step_once_and_follows_a_ramp_in_refits():
    step = DeviceDriftTracker(2, threshold=0.1, min_samples=50, halflife=50)
    assert len(_follow(step, lambda t: 1.0 if t < 100 else 1.4, 400)) == 1
    assert step.scales[0] == pytest.approx(1.4, rel=0.02) and step.since_planned()[0] == pytest.approx(1.0, rel=0.05)
    ramp = DeviceDriftTracker(2, threshold=0.1, min_samples=50, halflife=50)
    asked = _follow(ramp, lambda t: 1.0 + 0.25 * min(max(t - 100, 0) / 50, 1), 500)  # 1 -> 1.25 over 500 calls
    assert len(asked) == 1
    assert ramp.scales[0] == pytest.approx(1.25, rel=0.05)  # refitted on past the re-plan, within 5%
    assert ramp.scales[1] == 1.0  # a device without samples keeps its model


def test_tracker_due_is_given_once_and_planned_with_moves_its_origin():
    tracker = DeviceDriftTracker(1, threshold=0.1, min_samples=1, halflife=1)
    tracker.detector.observe(np.zeros(3, dtype=int), 1e-3, 1.2e-3)
    assert tracker.refit() == {0: pytest.approx(1.2)}
    assert tracker.due() == {0: pytest.approx(1.2)}
    assert tracker.due() == {}  # given once
    tracker.planned_with(np.array([1.0]))  # e.g. a recalibration planned on older models
    assert tracker.since_planned()[0] == pytest.approx(1.2)
    tracker.reset()
    assert tracker.scales[0] == 1.0 and tracker.due() == {} and np.isnan(tracker.detector.ratios()[0])


def test_tracker_ask_keeps_the_planned_models_until_the_re_plan_is_made_and_asks_again_after_it_failed():
    """`due` counted the scales as planned with when it asked: a re-plan that then rolled back left `since_planned`
    at 1 while the device stayed 1.2x slower, and nothing asked for it again."""
    tracker = DeviceDriftTracker(1, threshold=0.1, min_samples=1, halflife=1)
    tracker.detector.observe(np.zeros(3, dtype=int), 1e-3, 1.2e-3)
    tracker.refit()
    assert tracker.ask() == {0: pytest.approx(1.2)}
    assert tracker.ask() == {}  # given once while the re-plan runs
    assert tracker.since_planned()[0] == pytest.approx(1.2)  # not planned with yet
    tracker.retry()  # it rolled back
    assert tracker.since_planned()[0] == pytest.approx(1.2) and tracker.ask() == {0: pytest.approx(1.2)}
    tracker.planned_with(tracker.scales)  # made (or judged not worth it)
    assert tracker.since_planned()[0] == pytest.approx(1.0) and tracker.ask() == {}


def test_a_cool_down_says_how_many_passes_it_keeps_quiet():
    detector = WorkloadDriftDetector(REFERENCE, check_every=1, window=50, cooldown=10)
    assert [detector.cool_down() for _ in range(5)] == [10, 20, 40, 50, 50]


def test_tracker_resets_one_device_and_keeps_the_others():
    """A device profiled again on its own (one that rejoined) starts from its new model; the others keep theirs."""
    tracker = DeviceDriftTracker(2, threshold=0.1, min_samples=1, halflife=1)
    tracker.detector.observe(np.array([0, 0, 1, 1]), 1e-3, np.array([1.3e-3, 1.3e-3, 1.2e-3, 1.2e-3]))
    tracker.refit()
    tracker.reset(1)
    assert tracker.scales.tolist() == [pytest.approx(1.3), 1.0]
    assert tracker.since_planned().tolist() == [pytest.approx(1.3), 1.0]
    with pytest.raises(ValueError, match="device indices"):
        tracker.reset(2)


def test_calls_timed_at_zero_seconds_never_scale_a_device_to_nothing():
    """Observed seconds of 0 are allowed; their level of 0 was applied, the scale became 0, and the coordinator's
    next `model.scaled(0.0)` and predictions at 0 s raised (an audit's repro)."""
    tracker = DeviceDriftTracker(2, threshold=0.1, min_samples=1, halflife=1)
    tracker.detector.observe(np.zeros(5, dtype=int), 1e-3, 0.0)
    assert tracker.refit() == {} and tracker.scales.tolist() == [1.0, 1.0] and tracker.due() == {}


@pytest.mark.parametrize("field", ["check_every", "window", "cooldown"])
def test_workload_drift_counts_of_passes_must_be_integers(field):
    from placement.drift import WorkloadDriftConfig

    with pytest.raises(ValueError, match="integers"):
        WorkloadDriftConfig(**{field: 10.0})
