"""Migrations across failures: engines that cannot reach a worker, engines the coordinator has not heard from, a
restarted coordinator, migrations and refills that fail half way. The real Coordinator over in-process emulated
workers (LocalWorkerPool), some serving their data plane on sockets, and the engine side (DispatchContext,
PlacementSync) driven by hand. Found by an audit of the migration paths."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from service.checkpoint import load_layout
from service.coordinator import Coordinator, CoordinatorConfig, ModelShape
from service.dispatch import DispatchContext, DispatchingExperts, LocalChannel
from service.emulator import EmulationConfig
from service.messages import EngineReport
from service.placement_sync import PlacementSync, worker_channels
from service.transport import WorkerServer
from service.worker import ExpertWorker, WorkerConfig
from service.worker_pool import LocalWorkerPool, WorkerCallError, WorkerStartError
from tests.service.test_coordinator import _calibrate, _lose_for_good, _skewed
from tests.tiny_models import save_tiny_model

SPEEDS = (1.0, 1.0, 1.0, 0.7)
PROFILE_TOKENS = (1, 4, 16, 64, 128)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_tiny_model("qwen3_moe", tmp_path_factory.mktemp("ckpt")))


def _workers(checkpoint: str) -> list[ExpertWorker]:
    layout = load_layout(checkpoint)
    return [ExpertWorker(WorkerConfig(index=i, hidden_act=layout.hidden_act,
                                      profile_shape=(layout.hidden_size, layout.intermediate_size),
                                      emulation=EmulationConfig(speed=s, fixed_s=2e-5, knee_tokens=16, jitter=0.0)))
            for i, s in enumerate(SPEEDS)]


def _coordinator(checkpoint: str, pool: LocalWorkerPool, clock=None, **overrides) -> Coordinator:
    layout = load_layout(checkpoint)
    shape = ModelShape(len(layout.moe_layers), layout.num_experts, 3 * layout.hidden_size * layout.intermediate_size * 4)
    # (engines report from the test's own thread: none acknowledges while a recalibration waits for them, this long)
    settings = dict(checkpoint=checkpoint, profile_token_counts=PROFILE_TOKENS, profile_repeats=1, ack_timeout_s=0.2,
                    auto_recalibrate=False) | overrides
    coordinator = Coordinator(CoordinatorConfig(**settings), pool, shape, **({} if clock is None else {"clock": clock}))
    coordinator.start(background=False)
    return coordinator


def _report(coordinator: Coordinator, counts: np.ndarray, *, engine: str = "e0", version: int | None = None,
            passes: int = 1, epoch: int = -1):
    version = coordinator.placement.version if version is None else version
    return coordinator.report(EngineReport(engine, version, np.repeat(counts[None], passes, 0), (), epoch))


def _every_expert_step(context: DispatchContext, shape: ModelShape, hidden_size: int) -> None:
    """One engine step sending a token to every expert of every MoE layer (raises DispatchError if one fails)."""
    context.begin_step()
    try:
        for layer in range(shape.num_layers):
            DispatchingExperts(layer, shape.num_experts, context)(
                torch.randn(shape.num_experts, hidden_size), torch.arange(shape.num_experts)[:, None],
                torch.ones(shape.num_experts, 1))
    finally:
        context.end_step()


class ServedPool(LocalWorkerPool):
    """In-process workers serving their data plane on sockets, their addresses in the WorkerInfo; a worker in
    `unrestartable` cannot be restarted (its node is gone)."""

    def __init__(self, workers):
        super().__init__(workers)
        self.servers = [WorkerServer(w) for w in self.workers]
        self.unrestartable: set[int] = set()

    def infos(self):
        return [replace(info, tcp_address=self.servers[d].tcp_address) for d, info in enumerate(super().infos())]

    def kill(self, device):
        super().kill(device)
        self.servers[device].close()

    def restart(self, device):
        if device in self.unrestartable:
            raise RuntimeError("no node can host the new actor")
        super().restart(device)
        self.servers[device] = WorkerServer(self.workers[device])
        return self.infos()[device]

    def close(self):
        for server in self.servers:
            server.close()


def test_an_engine_follows_placements_and_new_replicas_start_while_a_worker_is_dead_for_good(checkpoint):
    """A worker lost for good (not restartable, in no placement) is still in the worker list the coordinator sends
    at every later change of workers. Channels connected when built, so the engine could apply no later worker list
    nor the placement that came with it: it stayed on the old placement, whose copies were dropped after
    ack_timeout_s, and a new ingress replica failed to build its channels."""
    pool = ServedPool(_workers(checkpoint))
    coordinator = _coordinator(checkpoint, pool, ack_timeout_s=0.01)
    hidden_size = load_layout(checkpoint).hidden_size
    workers, epoch = coordinator.workers()
    context = DispatchContext(coordinator.placement, worker_channels(workers, None, 5.0), workers_epoch=epoch)
    sync = PlacementSync("engine", context, coordinator.report, node_id=None)
    try:
        _report(coordinator, _skewed(coordinator.shape, 9), engine="warmup", passes=30)
        pool.unrestartable.add(2)
        pool.kill(2)
        assert coordinator.check_workers() == [2]
        sync.sync_once()
        pool.kill(1)  # restarted: a new worker list (with device 2's dead address) comes with the next placement
        assert coordinator.check_workers() == [1]
        reply = sync.sync_once()
        assert reply.workers is not None and reply.placement is not None
        assert context.placement.version == coordinator.placement.version
        coordinator._finish_drops(wait=False)  # the old copies go
        _every_expert_step(context, coordinator.shape, hidden_size)  # served on the new placement
        channels = worker_channels(coordinator.workers()[0], None, 5.0)  # a new replica's bootstrap
        assert sorted(channels) == [0, 1, 2, 3]
    finally:
        sync.stop()
        pool.close()


def test_a_replica_syncs_before_it_serves(checkpoint):
    """An ingress replica bootstraps on the current version, then loads its model; the coordinator does not know it
    until its first report. A migration that finished meanwhile dropped the version's copies as soon as the known
    engines acknowledged the next one, and the replica's first steps failed. Its PlacementSync now syncs once in
    start(), before the replica serves."""
    pool = LocalWorkerPool(_workers(checkpoint))
    coordinator = _coordinator(checkpoint, pool)
    hidden_size = load_layout(checkpoint).hidden_size
    epoch = coordinator.workers()[1]
    counts = _skewed(coordinator.shape, 4)
    _report(coordinator, counts, engine="replica-1", passes=30, epoch=epoch)
    context = DispatchContext(coordinator.placement, {d: LocalChannel(w) for d, w in enumerate(pool.workers)},
                              workers_epoch=epoch)  # replica-2's bootstrap; it now loads its model...
    assert coordinator.recalibrate(mode="full", force=True)["status"] == "applied"  # ...while a migration runs
    _report(coordinator, counts, engine="replica-1", epoch=epoch)
    coordinator._finish_drops(wait=False)
    sync = PlacementSync("replica-2", context, coordinator.report, node_id=None, interval_s=3600.0)
    sync.start()
    try:
        assert context.placement.version == coordinator.placement.version
        _every_expert_step(context, coordinator.shape, hidden_size)
    finally:
        sync.stop()


def _extras(coordinator: Coordinator, skip: tuple[int, ...] = ()) -> dict[int, set]:
    """{device: experts it holds outside the coordinator's placement}, devices in `skip` left out."""
    held = {d: {tuple(k) for k in w.held_experts()} for d, w in enumerate(coordinator.pool.workers)}
    placement = coordinator.placement
    return {d: held[d] - placement.experts_on(d) for d in held
            if d not in skip and held[d] - placement.experts_on(d)}


def _holds(pool: LocalWorkerPool, placement) -> bool:
    """Whether the workers hold every expert of `placement` where it places it."""
    return all(placement.experts_on(d) <= {tuple(k) for k in w.held_experts()} for d, w in enumerate(pool.workers))


class _Clock:
    """time.monotonic() moved forward by hand."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        import time

        return time.monotonic() + self.offset


class RecordsFailPool(LocalWorkerPool):
    """load_records fails its next `failures` calls (a worker that does not answer in time)."""

    failures = 0

    def load_records(self, devices=None):
        if self.failures:
            self.failures -= 1
            raise WorkerCallError("get_record failed on device 2: GetTimeoutError", [2])
        return super().load_records(devices)


def _migrated_to_version_4(checkpoint: str) -> tuple[RecordsFailPool, object]:
    """A pool whose coordinator migrated three times, every drop acknowledged, then stopped (it died); the
    placement engine-A serves."""
    pool = RecordsFailPool(_workers(checkpoint))
    first = _coordinator(checkpoint, pool)
    counts = _skewed(first.shape, 7)
    for seed in range(3):
        _report(first, _skewed(first.shape, seed), engine="engine-A", passes=30)
        first.recalibrate(mode="full", force=True)
        _report(first, counts, engine="engine-A")
        first._finish_drops(wait=True)
    assert first.placement.version == 4
    first.stop()
    return pool, first.placement


def test_a_restarted_coordinator_retries_reading_the_placement_records(checkpoint):
    pool, served = _migrated_to_version_4(checkpoint)
    pool.failures = 1
    second = _coordinator(checkpoint, pool, health_interval_s=0.01)
    assert second.placement.version == 4 and second.placement.same_layout(served)


def test_versions_only_grow_when_a_restarted_coordinator_cannot_read_the_records(checkpoint):
    """The records unreadable, a restarted coordinator started again at version 1, below the version engines serve:
    they never switched to its placements (they take only newer ones) yet counted as acknowledging them, so the next
    migration dropped copies they still used. Versions now stay above any an engine reports: the next migration's,
    and the placement in service is republished above it by the loop."""
    pool, served = _migrated_to_version_4(checkpoint)
    pool.failures = 99
    clock = _Clock()
    second = _coordinator(checkpoint, pool, clock=clock, health_interval_s=0.01, ack_timeout_s=60.0)
    counts = _skewed(second.shape, 9)
    _report(second, counts, engine="engine-A", version=served.version, passes=30)
    result = second.recalibrate(mode="full", force=True)
    assert result["status"] == "applied" and result["to_version"] > served.version
    clock.offset += second.config.engine_timeout_s  # every engine has reported since the restart
    reply = _report(second, counts, engine="engine-A", version=served.version)
    assert reply.placement is not None and reply.placement["version"] == result["to_version"]
    second._finish_drops(wait=False)
    assert _holds(pool, served)  # engine-A has not acknowledged: what it serves is still held
    _report(second, counts, engine="engine-A", version=result["to_version"])
    second._tick()  # the migration's drops; what the workers still hold of version 4 is scheduled...
    second._tick()  # ...and dropped
    assert not _extras(second)


def test_the_placement_is_republished_above_a_version_an_engine_serves(checkpoint):
    pool, served = _migrated_to_version_4(checkpoint)
    pool.failures = 99
    second = _coordinator(checkpoint, pool, health_interval_s=0.01)
    assert second.placement.version < served.version  # the records could not be read
    layout = second.placement
    assert _report(second, _skewed(second.shape, 9), engine="engine-A", version=served.version).placement is None
    second._tick()
    assert second.placement.version == served.version + 1 and second.placement.same_layout(layout)
    reply = _report(second, _skewed(second.shape, 9), engine="engine-A", version=served.version)
    assert reply.placement is not None and reply.placement["version"] == served.version + 1


def test_copies_left_by_a_coordinator_that_died_are_dropped_once_engines_acknowledge(checkpoint):
    """A coordinator that died while a migration's old copies waited for acknowledgement left them on the workers
    for good. The restarted one drops what the workers hold outside its placement by the usual rule: not while an
    engine may serve an older version that uses them (nor before every engine has had time to report)."""
    pool = LocalWorkerPool(_workers(checkpoint))
    first = _coordinator(checkpoint, pool)
    counts = _skewed(first.shape, 7)
    _report(first, counts, engine="old-engine", passes=30)
    old = first.placement
    assert first.recalibrate(mode="full", force=True)["status"] == "applied"
    assert _extras(first)  # old copies pending drop
    first.stop()
    clock = _Clock()
    second = _coordinator(checkpoint, pool, clock=clock, ack_timeout_s=60.0)
    assert second.placement.version == old.version + 1
    _report(second, counts, engine="new-engine")  # acknowledges, but old-engine has not reported yet
    second._tick()
    second._tick()
    assert _holds(pool, old)
    _report(second, counts, engine="old-engine", version=old.version)  # still on the old version
    second._tick()
    assert _holds(pool, old)
    clock.offset += second.config.engine_timeout_s
    _report(second, counts, engine="old-engine")  # switched
    _report(second, counts, engine="new-engine")
    second._tick()
    assert not _extras(second)


def test_a_drop_a_worker_cannot_make_still_drops_the_other_workers_copies(checkpoint):
    """A worker that no longer holds one of the old copies pending drop (another process dropped it) failed the
    drop of the in-process pool with a KeyError that escaped the loop's pass: the other workers' old copies stayed,
    and nothing was left to reconciliation. Every worker is tried; the failed one is reconciled."""
    pool = LocalWorkerPool(_workers(checkpoint))
    coordinator = _coordinator(checkpoint, pool)
    counts = _skewed(coordinator.shape, 7)
    _report(coordinator, counts, passes=30)
    assert coordinator.recalibrate(mode="full", force=True)["status"] == "applied"
    extras = _extras(coordinator)
    assert len(extras) >= 2  # old copies pending drop on several workers
    gone = min(extras)
    pool.workers[gone].drop_experts([sorted(extras[gone])[0]])
    _report(coordinator, counts)  # every engine acknowledged: the drop runs
    coordinator._tick()
    assert set(_extras(coordinator)) <= {gone}
    coordinator._reconcile_after = 0.0  # (what is left is scheduled as drops, dropped once engines acknowledge)
    coordinator._tick()
    _report(coordinator, counts)
    coordinator._tick()
    assert not _extras(coordinator)


class FlakyPool(LocalWorkerPool):
    """A copy's destination does not answer for a while: during the copy and the rollback's held()."""

    flaky: int | None = None

    def copy(self, transfers, timeout_s=None):
        if self.flaky is not None:
            self.kill(self.flaky)
        return super().copy(transfers, timeout_s)

    def held(self, devices=None):
        try:
            return super().held(devices)
        finally:
            if self.flaky is not None:  # ... then answers again (it was only stalled)
                self._dead.discard(self.flaky)
                self.flaky = None


def test_a_rollback_drops_the_copies_of_the_workers_that_answer(checkpoint):
    """A rollback dropped nothing on any worker when one did not answer its held() call: the copies made on the
    healthy workers stayed for good. They are dropped worker by worker, what is left reconciled later."""
    pool = FlakyPool(_workers(checkpoint))
    coordinator = _coordinator(checkpoint, pool)
    counts = _skewed(coordinator.shape, 3)
    _report(coordinator, counts, passes=30)
    moves = coordinator.recalibrate(mode="full", dry_run=True)["moves"]
    pool.flaky = max(m["dst"] for m in moves)
    assert {m["dst"] for m in moves} - {pool.flaky}  # copies to other workers too
    assert coordinator.recalibrate(mode="full", force=True)["status"] == "rolled_back"
    assert not _extras(coordinator, skip=(max(m["dst"] for m in moves),))
    coordinator._tick()
    _report(coordinator, counts)
    coordinator._tick()
    assert not _extras(coordinator)


class FlakyLoadPool(LocalWorkerPool):
    """The next checkpoint load fails (a stale file handle)."""

    fail_load = False

    def load(self, checkpoint, keys, timeout_s=None):
        if self.fail_load:
            self.fail_load = False
            raise WorkerCallError("load_experts failed on device 3: OSError: stale file handle", [3])
        return super().load(checkpoint, keys, timeout_s)


def test_a_failed_refill_after_a_lost_device_is_rolled_back(checkpoint):
    """Re-placing a lost device's experts copies some from survivors and reloads the others; when a reload failed,
    the copies made stayed on the survivors, and the retry, planned on later traffic, did not always use them."""
    pool = FlakyLoadPool(_workers(checkpoint))
    coordinator = _coordinator(checkpoint, pool)
    _calibrate(coordinator, 9)
    version, dead = coordinator.placement.version, 2
    pool.kill(dead)
    pool.fail_load = True
    assert coordinator.check_workers() == [dead]
    assert coordinator.stats_view()["recalibrations"][-1]["status"] == "failed"
    assert coordinator.placement.version == version
    assert not _extras(coordinator, skip=(dead,))


def _served_copies_kept(v1, before: dict[int, set], after: dict[int, set]) -> dict[int, list]:
    """The copies of version `v1` each device held before and no longer holds (empty: every one kept)."""
    gone = {d: sorted((v1.experts_on(d) & before[d]) - keys) for d, keys in after.items()}
    return {d: keys for d, keys in gone.items() if keys}


def test_a_rolled_back_refill_leaves_the_copies_an_engine_on_the_previous_version_still_calls(checkpoint):
    """A lost device's refill that failed rolled back by dropping, on each destination, every key it had tried to
    place there outside the placement in service: a copy of the previous version still pending drop among them,
    which an engine that had not yet acknowledged the newer version called (KeyError), and whose drop later failed
    the whole device's (a review). What the destinations held before the refill stays."""
    for dead in range(4):
        pool = FlakyLoadPool(_workers(checkpoint))
        coordinator = _coordinator(checkpoint, pool, ack_timeout_s=60.0)
        counts = _skewed(coordinator.shape, 7)
        _report(coordinator, counts, engine="old", passes=30)
        v1 = coordinator.placement
        assert coordinator.recalibrate(mode="full", force=True)["status"] == "applied"
        _report(coordinator, counts, engine="old", version=v1.version)  # serves v1 still: its copies pending drop
        before = pool.held()
        pool.kill(dead)
        pool.fail_load = True
        assert coordinator.check_workers() == [dead]
        assert coordinator.stats_view()["recalibrations"][-1]["status"] == "failed"
        survivors = [d for d in range(4) if d != dead]
        assert not _served_copies_kept(v1, before, pool.held(survivors)), dead


def test_a_rolled_back_migration_leaves_the_copies_a_dead_coordinator_left_for_an_engine_still_on_them(checkpoint):
    """A restarted coordinator finds copies of the version an engine still serves (the dead one's drops, left to
    reconciliation); a re-plan whose copy failed on one destination dropped them with its own copies (a review)."""
    for seed in range(10, 14):
        pool = LocalWorkerPool(_workers(checkpoint))
        first = _coordinator(checkpoint, pool, ack_timeout_s=60.0)
        _report(first, _skewed(first.shape, 7), engine="old", passes=30)
        v1 = first.placement
        assert first.recalibrate(mode="full", force=True)["status"] == "applied"
        first.stop()  # dies with v1's copies pending drop
        second = _coordinator(checkpoint, pool, ack_timeout_s=60.0)
        _report(second, _skewed(second.shape, seed), engine="old", version=v1.version, passes=30)
        before = pool.held()
        destinations = sorted({move["dst"] for move in second.recalibrate(mode="full", dry_run=True)["moves"]})
        pool.workers[destinations[-1]].inject_fault("import")
        assert second.recalibrate(mode="full", force=True)["status"] == "rolled_back"
        assert not _served_copies_kept(v1, before, pool.held()), seed


class TimedLoadPool(LocalWorkerPool):
    """Records the timeout and the number of experts of each checkpoint load."""

    def __init__(self, workers):
        super().__init__(workers)
        self.timeouts, self.loaded = [], []

    def load(self, checkpoint, keys, timeout_s=None):
        self.timeouts.append(timeout_s)
        self.loaded.append(sum(map(len, keys.values())))
        return super().load(checkpoint, keys, timeout_s)


def test_a_reload_while_serving_waits_for_what_it_reads_not_a_whole_first_load(checkpoint):
    """Reloading a lost device's experts holds the migration lock: with the first load's 30-minute timeout, one
    stuck worker stalled every recalibration and loss for half an hour (a review)."""
    pool = TimedLoadPool(_workers(checkpoint))
    coordinator = _coordinator(checkpoint, pool)
    assert pool.timeouts == [None]  # the first load: the pool's own load timeout
    _calibrate(coordinator, 9)
    pool.kill(1)
    assert coordinator.check_workers() == [1]
    assert pool.timeouts[1:] == [60.0] and pool.loaded[1] > 0  # a tiny model: the floor of a minute
    # large shares: all that is read, at 0.1 GB/s (the workers may read from one disk)
    n, size = 10**6, coordinator.shape.expert_bytes
    assert coordinator._transfer_timeout(2 * n) == 2 * n * size / 1e8


class TimedCopyPool(LocalWorkerPool):
    """Records the timeout and the number of experts of each copy."""

    def __init__(self, workers):
        super().__init__(workers)
        self.copies = []

    def copy(self, transfers, timeout_s=None):
        self.copies.append((timeout_s, sum(len(keys) for *_, keys in transfers)))
        return super().copy(transfers, timeout_s)


def test_copies_wait_for_what_they_move(checkpoint):
    """A re-plan's and a refill's copies are given what they move at 0.1 GB/s, as reloads (they had one control
    call's timeout, a minute, whatever they moved)."""
    pool = TimedCopyPool(_workers(checkpoint))
    coordinator = _coordinator(checkpoint, pool)
    coordinator.shape = replace(coordinator.shape, expert_bytes=10**9)  # (planned as experts of 1 GB)
    _calibrate(coordinator, 9)
    pool.kill(2)
    assert coordinator.check_workers() == [2]
    assert coordinator.stats_view()["recalibrations"][-1]["status"] == "applied"
    assert len(pool.copies) == 2 and pool.copies[0][1] > 6  # the calibration's re-plan, then the refill's
    assert [timeout for timeout, _ in pool.copies] == [max(60.0, moved * 10.0) for _, moved in pool.copies]


def test_a_first_load_retried_without_a_device_keeps_what_workers_held_before_start(checkpoint):
    """Adopted workers hold copies of a version engines may still serve; the first load, retried without a device
    that failed it, drops what its first try added and the plan no longer uses, never those older copies (they go
    through reconciliation once engines switched: the retry dropped them at once)."""
    pool = LocalWorkerPool(_workers(checkpoint))
    old = (1, 7)  # an expert a dead coordinator placed on device 0, outside any plan below
    pool.workers[0].load_experts(checkpoint, [old])
    bad, tries = 3, []
    original = pool.workers[bad].load_experts

    def fails_once_loaded(*args, **kwargs):
        tries.append(original(*args, **kwargs))
        raise RuntimeError("CUDA error: uncorrectable ECC error encountered")

    pool.workers[bad].load_experts = fails_once_loaded
    second = _coordinator(checkpoint, pool)
    assert second.stats_view()["lost_devices"] == [bad] and tries
    held = pool.held()
    for device in (0, 1, 2):  # what the first try added for the four-device plan and the new one lacks: dropped
        assert held[device] - second.placement.experts_on(device) <= {old}
    assert old not in second.placement.experts_on(0)  # (else the plan itself keeps it)
    assert old in held[0] and second._unreconciled  # kept, left to reconciliation


def test_experts_held_without_any_record_are_treated_as_an_earlier_run(checkpoint):
    """Workers holding experts but no record (every save failed): the coordinator took them for fresh ones and
    trusted acknowledgements at once, so engines serving the old version 1 counted as acknowledging its new one."""
    pool = LocalWorkerPool(_workers(checkpoint))
    pool.workers[0].load_experts(checkpoint, [(0, 0)])
    second = _coordinator(checkpoint, pool)
    assert second._acks_trusted_at > time.monotonic() and second._unreconciled  # engines reported, first
    fresh = _coordinator(checkpoint, LocalWorkerPool(_workers(checkpoint)))
    assert fresh._acks_trusted_at == 0.0 and not fresh._unreconciled


def _copies_fail_once(pool: LocalWorkerPool) -> None:
    """The pool's next copy fails on device 0, a source of a readmission's copies (a failure on the rejoining device
    would have it restarted again); the ones after succeed."""
    copy = pool.copy

    def failing_once(transfers, timeout_s=None):
        pool.copy = copy
        raise WorkerCallError("copy failed on devices [0]: timed out", [0])

    pool.copy = failing_once


def test_a_restarted_coordinator_readmits_a_device_left_without_experts(checkpoint):
    """A coordinator that died while a restarted device waited to rejoin: the next adopted the placement without it
    and forgot it, and incremental recalibrations (which keep slot counts) left it idle for good."""
    pool = LocalWorkerPool(_workers(checkpoint))
    first = _coordinator(checkpoint, pool, recalibration_mode="incremental")
    _calibrate(first, 9)
    dead = 2
    pool.kill(dead)
    assert first.check_workers() == [dead]
    _copies_fail_once(pool)  # its readmission fails once: it waits to rejoin
    first._readmit()
    assert first.stats_view()["recalibrations"][-1]["failed_devices"] == [0]
    assert not first.placement.experts_on(dead) and first._rejoin == {dead}
    first.stop()
    second = _coordinator(checkpoint, pool, recalibration_mode="incremental")
    assert not second.placement.experts_on(dead)
    second._readmit()  # its window empty: waits for traffic, its calibrated placement not re-planned for uniform loads
    assert not second.placement.experts_on(dead) and second._rejoin == {dead}
    _report(second, _skewed(second.shape, 9), passes=3)
    second._readmit()
    assert second.placement.experts_on(dead) and second.stats_view()["lost_devices"] == []


class DownAtStartPool(ServedPool):
    """Workers of which those in `down` never come up (their node is gone: no node can host them) until
    `unrestartable` is emptied; counts restarts and the devices each profiling pass asks."""

    def __init__(self, workers, down):
        super().__init__(workers)
        self.down = set(down)
        self.unrestartable |= self.down
        self.restarts, self.profiled, self.loaded = 0, [], 0

    def start(self):
        if not self.down:
            return super().start()
        for device in self.down:
            self.kill(device)
        infos = [None if d in self.down else info for d, info in enumerate(self.infos())]
        raise WorkerStartError(f"{len(self.down)} of {self.num_devices} workers did not start: device "
                               f"{min(self.down)}: cannot be placed", sorted(self.down), infos)

    def restart(self, device):
        self.restarts += 1
        info = super().restart(device)
        self.down.discard(device)
        return info

    def profile(self, token_counts, repeats, devices=None):
        self.profiled.append(None if devices is None else list(devices))
        return super().profile(token_counts, repeats, devices)

    def load(self, checkpoint, keys, timeout_s=None):
        self.loaded += sum(map(len, keys.values()))
        return super().load(checkpoint, keys, timeout_s)


def test_a_restarted_coordinator_counts_as_lost_no_device_the_placement_in_service_uses(checkpoint):
    """A coordinator restarted with a device down that its recovered placement uses and another alive but idle in it
    (restarted, waiting to rejoin when the one before died): re-placing the down device's experts put some on the idle
    one, which was then counted lost and rejoining from the recovered placement. Its death went unnoticed, and its
    readmission restarted it empty while engines routed experts to it (a review)."""
    pool = DownAtStartPool(_workers(checkpoint), down=[])
    hidden_size = load_layout(checkpoint).hidden_size
    try:
        first = _coordinator(checkpoint, pool)
        _calibrate(first, 9)
        idle = 2
        pool.kill(idle)
        assert first.check_workers() == [idle]
        _copies_fail_once(pool)
        first._readmit()  # fails once: the coordinator dies while the device waits to rejoin, idle
        assert not first.placement.experts_on(idle) and first._rejoin == {idle}
        first.stop()
        pool.down, pool.unrestartable = {0}, {0}  # ...and device 0's node went with it
        second = _coordinator(checkpoint, pool)
        in_service = second.placement
        assert not in_service.experts_on(0) and in_service.experts_on(idle)  # (device 0's went there too)
        assert second.stats_view()["lost_devices"] == [0] and second._rejoin == set()
        workers, epoch = second.workers()
        context = DispatchContext(in_service, worker_channels(workers, None, 5.0), workers_epoch=epoch)
        _every_expert_step(context, second.shape, hidden_size)
        pool.kill(idle)  # its death is seen, its experts re-placed
        for _ in range(second.config.probe_misses):
            second.check_workers()
        assert not second.placement.experts_on(idle) and idle in second.stats_view()["lost_devices"]
    finally:
        pool.close()


def test_a_coordinator_serves_without_a_worker_that_cannot_be_placed_until_it_comes_up(checkpoint):
    """A coordinator restarted after a node failure, its workers there waiting for a node that fits: its start
    raised at every Serve retry, and the app with it. It now serves on the workers that came up (their records and
    holdings read, the others not asked), backs off its tries to restart the missing one, and gives it its share,
    profiled, once it comes up."""
    clock = _Clock()
    down = 2
    pool = DownAtStartPool(_workers(checkpoint), down=[down])
    hidden_size = load_layout(checkpoint).hidden_size
    try:
        first = _coordinator(checkpoint, pool, clock=clock)
        assert first.stats_view()["lost_devices"] == [down] and not first.placement.experts_on(down)
        assert pool.profiled == [[0, 1, 3]]
        counts = _skewed(first.shape, 5)
        _report(first, counts, passes=30)
        assert first.recalibrate(mode="full", force=True)["status"] == "applied"
        _report(first, counts)
        first._finish_drops(wait=True)
        placement = first.placement
        assert placement.version == 2 and not placement.experts_on(down) and _holds(pool, placement)
        assert all(set(placement.phy2log[layer].tolist()) == set(range(first.shape.num_experts))
                   for layer in range(placement.num_layers))
        first.stop()
        # a restarted coordinator, the device still down: the placement recorded on the others is adopted
        coordinator = _coordinator(checkpoint, pool, clock=clock)
        assert coordinator.placement.version == 2 and coordinator.stats_view()["lost_devices"] == [down]
        workers, epoch = coordinator.workers()
        context = DispatchContext(coordinator.placement, worker_channels(workers, None, 5.0), workers_epoch=epoch)
        _every_expert_step(context, coordinator.shape, hidden_size)  # served on the other three
        # restarts: at the next probe, then backing off
        assert coordinator.check_workers() == [] and pool.restarts == 1
        assert coordinator.check_workers() == [] and pool.restarts == 2
        assert coordinator.check_workers() == [] and pool.restarts == 2
        clock.offset += 60.0
        pool.unrestartable.clear()  # a node that fits joined
        assert coordinator.check_workers() == [] and pool.restarts == 3 and coordinator._rejoin == {down}
        _report(coordinator, counts, passes=3)  # (a restarted coordinator readmits on traffic)
        coordinator._readmit()
        assert coordinator.placement.experts_on(down) and coordinator.stats_view()["lost_devices"] == []
        assert pool.profiled[-1] == [down]  # profiled before its share was planned: its stand-in model was a guess
        models = coordinator.device_models()
        at = max(PROFILE_TOKENS)
        assert abs(models[down].latency(at) / models[0].latency(at) - 1) < 0.1  # as fast as device 0 (speed 1.0)
        assert models[3].latency(at) > 1.2 * models[down].latency(at)  # the stand-in was the slowest (0.7)
    finally:
        pool.close()


def test_a_coordinator_restarted_without_a_device_its_placement_uses_re_places_only_that_devices_experts(checkpoint):
    """A node lost with the coordinator: the recorded placement uses a device now down, so it was refused and a fresh
    plan was loaded from the checkpoint onto survivors still holding the recorded experts (every expert read again,
    twice the memory until reconciliation: an out-of-memory risk on GPUs sized for the model). The record is
    adopted and only the down device's experts are copied from survivors or read (a review finding)."""
    pool = DownAtStartPool(_workers(checkpoint), down=[])
    try:
        first = _coordinator(checkpoint, pool)
        counts = _calibrate(first, 7)
        recorded, down = first.placement, 2
        assert recorded.experts_on(down)
        first.stop()
        pool.down, pool.unrestartable, pool.loaded = {down}, {down}, 0
        second = _coordinator(checkpoint, pool)
        assert second.calibrated and second.placement.version > recorded.version  # adopted, then re-placed
        assert not second.placement.experts_on(down) and second.stats_view()["lost_devices"] == [down]
        assert pool.loaded <= len(recorded.experts_on(down))  # at most its experts read again, not every one
        _report(second, counts)
        second._finish_drops(wait=True)
        assert _holds(pool, second.placement) and not _extras(second, skip=(down,))
    finally:
        pool.close()


def test_the_migration_benchmark_prices_experts_at_the_bytes_its_workers_move(tmp_path):
    """bench_migration took an expert's bytes from the checkpoint's dtype while its workers hold float32: on a
    bfloat16 checkpoint it reported bytes moved and priced migrations at half the bytes really moved."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from service.bench_migration import DEFAULT_MODEL, BenchConfig, Stack

    model = tmp_path / "bf16"
    shutil.copytree(DEFAULT_MODEL, model)
    for weights in model.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(weights).items()},
                  weights, metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"dtype": "bfloat16"}))
    assert load_layout(str(model)).dtype == "bfloat16"
    stack = Stack(BenchConfig(model=model, speeds=(1.0, 1.0)))
    try:
        worker = stack.pool.workers[0]
        key = sorted(worker.held_experts())[0]
        moved = sum(t.numel() * t.element_size() for t in worker.export_experts([key])[0].tensors.values())
        assert stack.coordinator.shape.expert_bytes == moved
    finally:
        stack.close()


def test_the_app_serves_again_when_the_only_worker_that_comes_back_held_no_expert(checkpoint):
    """Device 0 lost for good (evacuated), then the other three too, only device 0 restartable: reloading every worker
    marked device 0 lost again (it held none of the placement's experts) before re-placing the others' experts, so
    none was left alive to take them, and the app stayed down, device 0 restarted at every probe (a review)."""
    pool = LocalWorkerPool(_workers(checkpoint))
    coordinator = _coordinator(checkpoint, pool)
    _calibrate(coordinator, 9)
    restart, cannot = _lose_for_good(coordinator, pool, 0), pool.restart
    pool.restart = lambda device: restart(device) if device == 0 else cannot(device)
    for device in (1, 2, 3):
        pool.kill(device)
    for _ in range(coordinator.config.probe_misses + 1):
        coordinator.check_workers()
    placement = coordinator.placement
    held = {tuple(key) for key in pool.workers[0].held_experts()}
    assert coordinator.stats_view()["lost_devices"] == [1, 2, 3] and placement.experts_on(0) <= held
    assert len(placement.experts_on(0)) == placement.num_layers * placement.num_experts


def test_a_coordinator_restarted_after_every_worker_was_reloaded_recovers_the_calibrated_placement(checkpoint):
    """Reloading every worker wrote no record on them (a restart clears a worker's): the next coordinator found experts
    but no record, planned afresh for uniform loads and was never calibrated again (a review)."""
    pool = LocalWorkerPool(_workers(checkpoint))
    first = _coordinator(checkpoint, pool)
    _calibrate(first, 9)
    served = first.placement
    for device in range(4):
        pool.kill(device)
    for _ in range(first.config.probe_misses):
        first.check_workers()
    assert first.stats_view()["recalibrations"][-1]["reason"].startswith("every device lost")
    first.stop()
    second = _coordinator(checkpoint, pool)
    assert second.calibrated and second.placement.same_layout(served) and second.placement.version == served.version


def test_a_device_a_plan_left_empty_is_not_readmitted_at_each_coordinator_restart(checkpoint):
    """vibe under a slot_budget may leave a very slow device without experts: a restarted coordinator (every
    redeploy) took it for a device waiting to rejoin and re-planned every expert for uniform loads at its first tick
    (11 experts moved, 11% slower on the real loads; a review). The record says which devices were lost."""
    layout = load_layout(checkpoint)
    speeds = (1.0, 1.0, 1.0, 0.01)

    def workers():
        return [ExpertWorker(WorkerConfig(index=i, hidden_act=layout.hidden_act,
                                          profile_shape=(layout.hidden_size, layout.intermediate_size),
                                          emulation=EmulationConfig(speed=s, fixed_s=2e-5, knee_tokens=16, jitter=0.0)))
                for i, s in enumerate(speeds)]

    pool = LocalWorkerPool(workers())
    settings = dict(slot_budget=8, profile_token_counts=(1, 4, 16, 64, 128, 256, 512), profile_repeats=2)
    first = _coordinator(checkpoint, pool, **settings)
    counts = _skewed(first.shape, 9, tokens=4000)
    _report(first, counts, passes=30)
    first.calibrate()
    _report(first, counts)
    first._finish_drops(wait=True)
    assert not first.placement.experts_on(3)
    first.stop()
    second = _coordinator(checkpoint, pool, **settings)
    assert second.stats_view()["lost_devices"] == [] and not second._rejoin
    second._tick()
    assert second.placement.same_layout(first.placement) and not second.stats_view()["recalibrations"]
