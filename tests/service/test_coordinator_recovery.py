"""The coordinator after a recalibration that failed: calibration tried again, re-plans backed off, device drift kept;
engines that went away forgotten; readmission and recalibration one at a time. In-process emulated workers
(LocalWorkerPool), the tiny checkpoint of `test_coordinator`."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

from service.checkpoint import load_layout
from service.coordinator import Coordinator, CoordinatorConfig, ModelShape
from service.messages import EngineReport, LatencySamples
from service.worker_pool import WorkerCallError
from tests.service.test_coordinator import PROFILE_TOKENS, _coordinator, _pool, _report, _skewed
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_tiny_model("qwen3_moe", tmp_path_factory.mktemp("ckpt")))


def _fail_next_import(pool) -> None:
    """Every worker fails its next expert import once: the next migration rolls back, the one after goes through."""
    for device in range(pool.num_devices):
        pool.inject_fault(device, "import")


def _statuses(coordinator: Coordinator) -> list[str]:
    return [r["status"] for r in coordinator.stats_view()["recalibrations"]]


def test_an_applied_full_recalibration_calibrates_an_app_whose_calibration_rolled_back(checkpoint):
    """A startup calibration that rolled back left the app uncalibrated for good: an admin full recalibration that
    applied did not count, so workload drift was never recorded nor acted on (auto_recalibrate on), and /admin/stats
    did not say."""
    pool = _pool(checkpoint)
    coordinator = _coordinator(checkpoint, pool, drift_check_every=5, drift_window=20, min_held_out_passes=2)
    counts = _skewed(coordinator.shape, 1)
    _report(coordinator, counts, passes=30)
    _fail_next_import(pool)
    result = coordinator.calibrate()
    assert result["status"] == "rolled_back" and not coordinator.calibrated
    assert coordinator.stats_view()["calibrated"] is False
    applied = coordinator.recalibrate(mode="full", force=True)
    assert applied["status"] == "applied"
    assert coordinator.calibrated and coordinator.stats_view()["calibrated"] is True
    assert pool.load_records()[0]["calibrated"]  # recorded with the placement: a restarted coordinator keeps it
    before = len(coordinator.stats_view()["recalibrations"])
    shifted = np.roll(counts, 3, axis=1)
    for _ in range(10):
        _report(coordinator, shifted, passes=10)
        coordinator._tick()
    stats = coordinator.stats_view()
    assert stats["workload_drift"] != {}
    assert any(r["reason"].startswith("workload drift") for r in stats["recalibrations"][before:])


def test_an_incremental_recalibration_does_not_calibrate(checkpoint):
    """Only a full plan on router statistics is a calibration: an incremental one keeps the slot counts of the
    uniform startup plan."""
    pool = _pool(checkpoint)
    coordinator = _coordinator(checkpoint, pool, min_held_out_passes=2)
    _report(coordinator, _skewed(coordinator.shape, 1), passes=30)
    _fail_next_import(pool)
    assert coordinator.calibrate()["status"] == "rolled_back"
    assert coordinator.recalibrate(mode="incremental", force=True)["status"] in ("applied", "no_change")
    assert not coordinator.calibrated


def test_the_loop_tries_a_failed_calibration_again_after_a_cool_down(checkpoint):
    """Nothing tried a calibration that rolled back again: the app served on its uniform startup placement, and never
    re-planned on drift, until someone noticed."""
    pool = _pool(checkpoint)
    coordinator = _coordinator(checkpoint, pool, drift_check_every=5, drift_window=20, min_held_out_passes=2)
    counts = _skewed(coordinator.shape, 1)
    _report(coordinator, counts, passes=30)
    _fail_next_import(pool)
    assert coordinator.calibrate()["status"] == "rolled_back"
    coordinator._tick()
    _report(coordinator, counts, passes=4)
    coordinator._tick()
    assert _statuses(coordinator) == ["rolled_back"] and not coordinator.calibrated  # cooling down: not yet
    _report(coordinator, counts, passes=10)  # the cool-down (drift_cooldown passes) is over
    coordinator._tick()
    records = coordinator.stats_view()["recalibrations"]
    assert [r["status"] for r in records] == ["rolled_back", "applied"]
    assert records[-1]["reason"] == "startup calibration, tried again" and records[-1]["mode"] == "full"
    assert coordinator.calibrated and coordinator.stats_view()["calibrated"] is True
    for _ in range(3):
        _report(coordinator, counts, passes=10)
        coordinator._tick()
    assert _statuses(coordinator) == ["rolled_back", "applied"]  # calibrated once: not again


def test_a_calibration_that_raises_is_tried_again_too(checkpoint, monkeypatch):
    """A calibration that raised (a placement that could not be planned) left the app uncalibrated for good."""
    coordinator = _coordinator(checkpoint, drift_check_every=5, min_held_out_passes=2)
    counts = _skewed(coordinator.shape, 1)
    _report(coordinator, counts, passes=30)
    candidate = coordinator._candidate

    def fails(*args):
        raise RuntimeError("planning failed")

    monkeypatch.setattr(coordinator, "_candidate", fails)
    with pytest.raises(RuntimeError):
        coordinator.calibrate()
    assert not coordinator.calibrated
    monkeypatch.setattr(coordinator, "_candidate", candidate)
    _report(coordinator, counts, passes=10)
    coordinator._tick()
    assert coordinator.calibrated and _statuses(coordinator) == ["applied"]


def _rolling_back_replans(checkpoint):
    """A calibrated coordinator whose worker 3 fails every import (out of memory, still serving), and the skewed
    loads of a drift away from its calibration."""
    pool = _pool(checkpoint)
    coordinator = _coordinator(checkpoint, pool, drift_check_every=10, drift_window=40, min_held_out_passes=2,
                               gain_horizon_passes=1_000_000, gain_confidence_z=0.0)
    counts = _skewed(coordinator.shape, 1)
    _report(coordinator, counts, passes=40)
    assert coordinator.calibrate()["status"] == "applied"
    _report(coordinator, counts)
    coordinator._finish_drops(wait=True)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    pool.workers[3].import_experts = out_of_memory
    return coordinator, pool, _skewed(coordinator.shape, 7)


def test_a_rolled_back_replan_backs_off_instead_of_retrying_at_every_check(checkpoint):
    """A workload drift re-plan that rolled back was tried again at every drift check: 19 rollbacks in 200 passes,
    86 expert copies thrown away, the history of 50 flooded. It backs off now (the cool-down of a skip, doubling up to
    the window) and keeps the drift, so it is still tried again, and applies once the worker can take the copies."""
    coordinator, pool, shifted = _rolling_back_replans(checkpoint)
    reference = coordinator._workload_drift.reference.copy()
    for _ in range(20):  # 200 passes, a drift check every 10
        _report(coordinator, shifted, passes=10)
        coordinator._tick()
    rolled = [s for s in _statuses(coordinator) if s == "rolled_back"]
    assert 2 <= len(rolled) <= 6  # tried again, backing off: 10, 20, 40, 40... passes
    assert np.array_equal(coordinator._workload_drift.reference, reference)  # the drift is kept
    del pool.workers[3].import_experts  # the worker has room again
    for _ in range(6):
        _report(coordinator, shifted, passes=10)
        coordinator._tick()
    assert _statuses(coordinator)[-1] == "applied"


def test_a_replan_that_raises_in_the_loop_backs_off_too(checkpoint, monkeypatch):
    """A drift re-plan that raised was asked again at the next drift check (every 10 passes), for good."""
    coordinator, _, shifted = _rolling_back_replans(checkpoint)
    tries = []

    def fails(*args):
        tries.append(1)
        raise RuntimeError("planning failed")

    monkeypatch.setattr(coordinator, "_candidate", fails)
    for _ in range(20):
        _report(coordinator, shifted, passes=10)
        with contextlib.suppress(RuntimeError):  # (the loop logs it)
            coordinator._tick()
    assert 2 <= len(tries) <= 6


def test_a_rolled_back_device_drift_replan_keeps_the_drift_and_is_asked_again(checkpoint):
    """A device drift re-plan counted its models as planned with when it was asked for: one that rolled back left
    `model_over_planned` at 1 while the device stayed 3x slower (the gauge and its alert quiet) and was never asked
    for again."""
    pool = _pool(checkpoint)
    coordinator = _coordinator(checkpoint, pool, device_drift_min_samples=20, gain_horizon_passes=1_000_000,
                               min_held_out_passes=2)
    counts = _skewed(coordinator.shape, 4)
    _report(coordinator, counts, passes=30)
    assert coordinator.calibrate()["status"] == "applied"
    _report(coordinator, counts)
    coordinator._finish_drops(wait=True)
    _fail_next_import(pool)
    device, tokens = 0, np.full(60, 8.0)
    slow = coordinator.device_models()[device].latency(tokens) * 3.0  # the device runs 3x slower from now on

    def serve() -> None:
        _report(coordinator, counts, samples=[LatencySamples(device, tokens, slow)])
        coordinator._tick()

    for _ in range(30):
        serve()
        if _statuses(coordinator)[-1] == "rolled_back":
            break
    assert _statuses(coordinator) == ["applied", "rolled_back"]
    assert coordinator.stats_view()["recalibrations"][-1]["reason"].startswith(f"device drift: device {device}")
    assert coordinator.stats_view()["devices"][device]["model_over_planned"] == pytest.approx(3.0, rel=0.1)
    assert coordinator.metrics_summary()["device_model_over_planned"][device] == pytest.approx(3.0, rel=0.1)
    for _ in range(5):  # cooling down: not asked for at every loop
        serve()
    assert _statuses(coordinator) == ["applied", "rolled_back"]
    for _ in range(30):  # asked for again once the cool-down is over; the imports go through now
        serve()
    records = coordinator.stats_view()["recalibrations"]
    assert records[-1]["status"] == "applied" and records[-1]["reason"].startswith(f"device drift: device {device}")
    assert coordinator.stats_view()["devices"][device]["model_over_planned"] == pytest.approx(1.0, rel=0.1)


def test_engines_silent_for_a_few_timeouts_are_forgotten_and_shown_with_their_age(checkpoint):
    """Every ingress replica that ever reported stayed in /admin/stats "engines" (replaced replicas piled up), and
    `last_seen` was a monotonic clock reading that says nothing to a reader."""
    layout = load_layout(checkpoint)
    shape = ModelShape(len(layout.moe_layers), layout.num_experts, 1)
    now = [0.0]
    coordinator = Coordinator(CoordinatorConfig(checkpoint=checkpoint, profile_token_counts=PROFILE_TOKENS,
                                                profile_repeats=2, engine_timeout_s=10.0),
                              _pool(checkpoint), shape, clock=lambda: now[0])
    coordinator.start(background=False)

    def report(engine: str) -> None:
        coordinator.report(EngineReport(engine, coordinator.placement.version,
                                        np.zeros((0, shape.num_layers, shape.num_experts))))

    for i in range(200):  # replicas replaced one after another (autoscaling, redeploys, health restarts)
        report(f"ingress-{i:08x}")
        now[0] += 60.0
    assert list(coordinator.stats_view()["engines"]) == ["ingress-000000c7"]
    report("a")
    report("b")
    now[0] += 20.0
    report("a")
    engines = coordinator.stats_view()["engines"]
    assert set(engines) == {"a", "b"}  # silent 20 s: still listed (it no longer holds up drops)
    assert engines["a"]["age_s"] == 0.0 and engines["b"]["age_s"] == 20.0
    assert engines["b"]["version"] == coordinator.placement.version and "workers_epoch" in engines["b"]
    now[0] += 15.0
    report("a")
    assert set(coordinator.stats_view()["engines"]) == {"a"}  # silent 35 s, over 3 x engine_timeout_s: forgotten


def test_a_recalibration_waits_for_a_readmission_and_never_places_experts_on_a_device_it_fails(checkpoint):
    """Readmission took the rejoining device out of the lost ones outside the migration lock: a recalibration that
    ran while it was profiled placed experts on it, the profiling then failed, the device was marked lost again and
    restarted empty, and the placement in service kept calling it (never re-placed: it was lost already)."""
    pool = _pool(checkpoint)
    coordinator = _coordinator(checkpoint, pool)
    counts = _skewed(coordinator.shape, 9)
    _report(coordinator, counts, passes=30)
    coordinator.calibrate()
    _report(coordinator, counts)
    coordinator._finish_drops(wait=True)
    dead = 2
    pool.kill(dead)
    assert coordinator.check_workers() == [dead] and coordinator._rejoin == {dead}

    profiling, go = threading.Event(), threading.Event()
    profile = pool.profile

    def slow_failing_profile(tokens, repeats, devices=None):
        if devices == [dead]:  # the rejoining worker's profiling pass takes a while, then fails (a hung GPU)
            profiling.set()
            go.wait(10)
            raise WorkerCallError(f"profile failed on device {dead}: timed out", [dead])
        return profile(tokens, repeats, devices)

    pool.profile = slow_failing_profile
    readmission = threading.Thread(target=coordinator._readmit)
    readmission.start()
    assert profiling.wait(10)
    admin: list[dict] = []
    recalibration = threading.Thread(target=lambda: admin.append(coordinator.recalibrate(mode="full", force=True)))
    recalibration.start()
    recalibration.join(0.5)
    assert recalibration.is_alive()  # waits for the readmission
    go.set()
    readmission.join(10)
    recalibration.join(30)
    pool.profile = profile
    assert admin[0]["status"] in ("applied", "no_change")
    assert dead in coordinator.stats_view()["lost_devices"]
    assert not coordinator.placement.experts_on(dead)
    coordinator.check_workers()  # the next probe restarts it (empty): nothing served needs it
    assert not coordinator.placement.experts_on(dead)
    assert all(pool.held()[d] >= coordinator.placement.experts_on(d) for d in range(pool.num_devices))


def test_a_coordinator_restarted_after_a_calibration_failed_tries_it_again(checkpoint):
    """The engines ask for the startup calibration once, when they start: a coordinator restarted after it rolled
    back recovered an uncalibrated placement and never tried again (the app left on its uniform startup placement,
    drift never acted on). The record says it was asked for."""
    pool = _pool(checkpoint)
    first = _coordinator(checkpoint, pool, drift_check_every=5, min_held_out_passes=2)
    counts = _skewed(first.shape, 1)
    _report(first, counts, passes=30)
    _fail_next_import(pool)
    assert first.calibrate()["status"] == "rolled_back"
    first.stop()
    assert pool.load_records()[0]["calibration_asked"] and not pool.load_records()[0]["calibrated"]
    second = _coordinator(checkpoint, pool, drift_check_every=5, min_held_out_passes=2)  # same workers
    assert not second.calibrated
    second._tick()  # its window is empty: nothing to calibrate on yet
    _report(second, counts, passes=4)
    second._tick()  # (less than a drift check's worth of passes)
    assert second.stats_view()["recalibrations"] == []
    _report(second, counts, passes=30)
    second._tick()
    records = second.stats_view()["recalibrations"]
    assert [(r["status"], r["reason"]) for r in records] == [("applied", "startup calibration, tried again")]
    assert second.calibrated and pool.load_records()[0]["calibrated"]


def test_a_coordinator_restarted_before_any_calibration_was_asked_for_waits_for_it(checkpoint):
    """An app whose engines never asked (no profiling prompts) is calibrated by an admin full re-plan only: a
    restarted coordinator does not calibrate it on its own."""
    pool = _pool(checkpoint)
    first = _coordinator(checkpoint, pool, drift_check_every=5, min_held_out_passes=2)
    first.stop()
    second = _coordinator(checkpoint, pool, drift_check_every=5, min_held_out_passes=2)
    _report(second, _skewed(second.shape, 1), passes=30)
    second._tick()
    assert not second.calibrated and second.stats_view()["recalibrations"] == []
