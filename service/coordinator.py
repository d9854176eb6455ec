"""The coordinator: versioned placement, statistics, device models, recalibration and live migration.

Owns the one authoritative placement of the app and every decision to change it: it aggregates router
statistics and device timings that engines report in batches, fits and refines device models, detects
workload and device drift, plans recalibrations with `placement/`, and runs two-phase migrations
worker to worker (copy, publish, drop after every engine acknowledged). Knows nothing of HTTP, Serve
or torch; the Serve deployment (`service/deployments.py`) is a thin shell over this class, and tests
drive it with a `LocalWorkerPool`.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

import placement as pl
from service.messages import EngineReport, SyncReply, WorkerInfo
from service.worker_pool import WorkerCallError, WorkerPool, WorkerStartError, keys_by_device

log = logging.getLogger(__name__)

_RESTART_BACKOFF_MAX_S = 30.0  # longest wait between tries to restart a lost worker
_ENGINE_FORGET_TIMEOUTS = 3  # an engine silent this many engine_timeout_s is gone from /admin/stats
HISTORY_MOVES = 100  # moves a history record keeps (its experts_moved counts them all; /admin/recalibrate lists all)

RECALIBRATION_MODES = ("auto", "incremental", "full")
DEFAULT_PROFILE_TOKENS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


class AdminBusy(RuntimeError):
    """Another admin recalibration or profiling is in the coordinator (a 409). Admin calls queued for the migration
    lock each held one of the coordinator replica's request slots (64), which the engines' reports need: a script
    retrying a slow call filled them."""


def _devices_named(devices: Iterable[int]) -> str:
    """"device 3" or "devices 1, 2" (what the history's reasons say, and `make chaos` reads)."""
    devices = sorted(devices)
    return f"device{'s' if len(devices) > 1 else ''} {', '.join(map(str, devices))}"


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything the coordinator decides with.

    Attributes:
        checkpoint: model folder the workers load their experts from.
        policy: "vibe" (default), "eplb" (token balance, full re-plan on recalibration) or
            "contiguous" (static, never recalibrated).
        num_redundant: extra expert slots for replicas (a multiple of the device count unless
            slot_budget is set).
        slot_budget: most expert slots a device may hold per layer; with vibe, devices may then hold
            different numbers of experts (fewer on slow devices). None: every device holds R / G.
        auto_recalibrate: recalibrate on workload or device drift without being asked.
        recalibration_mode: how those recalibrations re-plan vibe: "auto" (the incremental solver's
            candidate or a full re-plan, whichever saves more over the gain horizon net of its migration
            cost), "incremental" (the paper's Algorithm 2 only) or "full".
        eps: the incremental solver stops at max <= (1 + eps) * mean device time.
        drift_check_every, drift_window, drift_threshold, drift_cooldown: workload drift detector
            (forward passes; cosine distance). After a recalibration is skipped (not worth moving) or rolled
            back (or raised in the loop), the cooldown doubles with each one in a row, up to drift_window
            passes: a drift that does not pay, or whose re-plan failed, is judged again as the window moves on,
            not at every check. A re-plan for device drift and a failed startup calibration are tried again
            after the same cool-down (at least drift_check_every passes).
        drift_volume_factor: the window's median router load per pass more than this factor above or below
            that of the window the placement was made on is workload drift too (the batch size changed;
            > 1, inf: never; see `placement.drift.WorkloadDriftConfig`).
        device_drift_threshold: a device whose refined model predicts beyond 1 +- this times the
            time of the model the placement was planned with has drifted (a recalibration). Models are
            refined on their own, without a recalibration, once a device's observed / predicted time
            settles beyond 1 +- half of this (`placement.drift.DeviceDriftDetector`).
        device_drift_min_samples: expert calls per device before its ratio is trusted.
        profile_token_counts, profile_repeats: the device profiling grid.
        gain_horizon_passes: a migration must save more over this many forward passes than moving
            its bytes costs (unless forced).
        gain_confidence_z: the gain a migration is judged on is measured on passes of the window that
            the new placement was not planned on (`placement.held_out_gain`: the MoE critical path of
            each held-out pass under the placement in service and under the new one), and taken this
            many standard errors below its mean. A plan judged on the passes it was fitted to always
            looks faster, and on unchanged traffic re-plans on sampling noise. 0: the mean.
        device_drift_confidence_z: the same for a re-plan that device drift asks for. The device drift
            detector has already established that something changed, so its re-plans are judged at the
            held-out mean by default (the placement simulator, `load_tests.workload_tracking`: a device
            slowed to 0.8x at 4 sequences, 2 standard errors skipped its re-plan in some runs and left the
            MoE time 1% longer than judging at the mean).
        min_held_out_passes: passes with load the window needs for that; with fewer, a recalibration
            is skipped unless forced (the placement simulator: re-plans on the first 10 decode passes,
            judged in sample, left the served model's MoE time longer than the startup plan's). With
            loads given to `recalibrate`, the gain is predicted on those loads (in sample).
        bandwidth_bytes_per_s: initial estimate of worker-to-worker copy bandwidth, refined by every
            migration.
        ack_timeout_s: how long old copies wait for every live engine to acknowledge a new version.
        engine_timeout_s: an engine silent this long is forgotten (it no longer holds up drops); one silent
            _ENGINE_FORGET_TIMEOUTS times this long is dropped from /admin/stats too.
        health_interval_s: how often workers are checked for liveness.
        probe_timeout_s: a probe a worker does not answer within this is missed.
        probe_misses: consecutive missed probes after which a worker is lost (one that answers as a new
            process, restarted, is lost at once). More than 1 keeps a busy or CPU-starved worker from
            being killed and restarted: measured on 2 shared cores at load 30, 3 s probes were missed.
            A worker an engine reported it could not reach (its data plane: connection lost or refused, no
            reply within the channel's timeout) is probed at once and lost at its first missed probe, or if
            it answers that probe but not a one-token call on its data plane within probe_timeout_s.
    """

    checkpoint: str
    policy: str = "vibe"
    num_redundant: int = 0
    slot_budget: int | None = None
    auto_recalibrate: bool = True
    recalibration_mode: str = "auto"
    eps: float = 0.03
    drift_check_every: int = 10
    drift_window: int = 100
    drift_threshold: float = 0.05
    drift_cooldown: int = 10
    drift_volume_factor: float = 3.0
    device_drift_threshold: float = 0.10
    device_drift_min_samples: int = 50
    profile_token_counts: tuple[int, ...] = DEFAULT_PROFILE_TOKENS
    profile_repeats: int = 3
    gain_horizon_passes: int = 1000
    gain_confidence_z: float = 2.0
    device_drift_confidence_z: float = 0.0
    min_held_out_passes: int = 20
    bandwidth_bytes_per_s: float = 1e9
    ack_timeout_s: float = 10.0
    engine_timeout_s: float = 10.0
    health_interval_s: float = 1.0
    probe_timeout_s: float = 3.0
    probe_misses: int = 1

    def __post_init__(self) -> None:
        if self.policy not in pl.POLICIES:
            raise ValueError(f"policy must be one of {pl.POLICIES}, got {self.policy!r}")
        if self.num_redundant < 0:
            raise ValueError(f"num_redundant must be >= 0, got {self.num_redundant}")
        if self.policy == "contiguous" and self.num_redundant:
            raise ValueError("the contiguous policy has no redundant experts (num_redundant must be 0)")
        if self.recalibration_mode not in RECALIBRATION_MODES:
            raise ValueError(f"recalibration_mode must be one of {RECALIBRATION_MODES}, "
                             f"got {self.recalibration_mode!r}")
        if self.slot_budget is not None and self.slot_budget < 1:
            raise ValueError(f"slot_budget must be >= 1, got {self.slot_budget}")
        for name in ("eps", "drift_threshold", "device_drift_threshold", "bandwidth_bytes_per_s",
                     "ack_timeout_s", "engine_timeout_s", "health_interval_s", "probe_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if min(self.drift_check_every, self.drift_window, self.profile_repeats, self.gain_horizon_passes) < 1:
            raise ValueError("drift_check_every, drift_window, profile_repeats, gain_horizon_passes must be >= 1")
        if not self.drift_volume_factor > 1:
            raise ValueError(f"drift_volume_factor must be > 1 (inf: off), got {self.drift_volume_factor!r}")
        for name in ("gain_confidence_z", "device_drift_confidence_z"):
            if not (np.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)!r}")
        if self.min_held_out_passes < 2:
            raise ValueError(f"min_held_out_passes must be >= 2, got {self.min_held_out_passes!r}")
        if self.probe_misses < 1:
            raise ValueError(f"probe_misses must be >= 1, got {self.probe_misses!r}")
        if not self.profile_token_counts or min(self.profile_token_counts) < 1:
            raise ValueError(f"profile_token_counts must be positive, got {self.profile_token_counts}")


@dataclass(frozen=True)
class ModelShape:
    """What the coordinator needs to know of the model: MoE layers, experts, bytes per expert."""

    num_layers: int
    num_experts: int
    expert_bytes: int


@dataclass
class Recalibration:
    """One recalibration decision, applied or not (kept in the history, shown by /admin/stats)."""

    reason: str
    policy: str
    mode: str
    status: str  # applied | dry_run | skipped | no_change | rolled_back | failed
    from_version: int
    to_version: int
    started_at: float
    duration_s: float = 0.0
    experts_moved: int = 0
    bytes_moved: int = 0
    max_slot_fraction_moved: float = 0.0
    predicted_makespan_before_s: float = 0.0
    predicted_makespan_after_s: float = 0.0
    predicted_gain_s: float = 0.0
    predicted_gain_stderr_s: float | None = None
    gain_judged_on: str = ""
    gain_confidence_z: float = 0.0
    migration_cost_s: float = 0.0
    moves: list[dict[str, int]] = field(default_factory=list)
    detail: str = ""
    failed_devices: list[int] = field(default_factory=list)  # the workers a failed copy or load named


@dataclass
class _Engine:
    version: int
    workers_epoch: int
    last_seen: float


class Coordinator:
    """The app's placement authority. Thread-safe; `start()` before anything else."""

    def __init__(self, config: CoordinatorConfig, pool: WorkerPool, shape: ModelShape,
                 clock=time.monotonic):
        self.config = config
        self.pool = pool
        self.shape = shape
        self._clock = clock
        self._lock = threading.RLock()
        self._migration_lock = threading.Lock()
        self._placement: pl.Placement | None = None
        self._profiled: list[pl.DeviceModel] = []
        self._workers: list[WorkerInfo] = []
        # Engines outlive a coordinator and compare epochs for equality: a restarted coordinator must not
        # count from the same start as the one before, or an engine could keep stale worker addresses.
        self._workers_epoch = secrets.randbelow(1 << 31)
        self._engines: dict[str, _Engine] = {}
        # Holds the statistics window; its reference is the loads the placement was made for (uniform
        # until the first calibration, when drift reports are not acted on).
        self._workload_drift = pl.WorkloadDriftDetector(
            np.ones((shape.num_layers, shape.num_experts)), check_every=config.drift_check_every,
            window=config.drift_window, threshold=config.drift_threshold, cooldown=config.drift_cooldown,
            volume_factor=config.drift_volume_factor)
        self._devices = pl.DeviceDriftTracker(pool.num_devices, threshold=config.device_drift_threshold,
                                              min_samples=config.device_drift_min_samples)
        self._last_drift: dict[str, Any] = {}
        self._pending_trigger: str | None = None
        self._recorded_lost: set[int] | None = None  # the lost devices of the record recovered at start
        self._pending_drops: tuple[int, dict[int, list[tuple[int, int]]], float] | None = None
        # Versions only grow, across coordinator restarts too: the highest version recorded on the workers or
        # served by an engine. New placements are numbered above it (engines switch only to newer versions, and a
        # version of another lineage above the current one would count as acknowledging it).
        self._version_floor = 0
        # Before this clock time, every known engine acknowledging a version does not mean every engine did: after
        # a restart, engines of the app may not have reported to this coordinator yet.
        self._acks_trusted_at = 0.0
        # Workers may hold copies outside the placement (a restart, a failed rollback or drop): `_reconcile`
        # schedules them as drops; retried no sooner than _reconcile_after when the workers cannot say.
        self._unreconciled = False
        self._reconcile_after = 0.0
        self._bandwidth = config.bandwidth_bytes_per_s
        self._history: deque[Recalibration] = deque(maxlen=50)  # (each with at most HISTORY_MOVES of its moves)
        self._last_applied: Recalibration | None = None  # (kept apart: 50 dry runs pushed it out of the history)
        self._totals: dict[str, int] = {}  # decisions by status, experts and bytes moved, since start
        self._calibrated = False
        self._calibrating = False  # a calibration in progress (another is answered `in_progress`)
        self._admin_gate = threading.Lock()  # held by the one admin recalibration or profiling let in (`_admin_turn`)
        self._admin_doing = ""
        self._calibration_asked = False  # an engine asked for the startup calibration (retried until it applies)
        self._retry_at_pass = 0  # after a failed re-plan, none is asked for again before this many passes
        self._planned_by = config.policy  # the policy of the placement in service (an admin call may name another)
        self._lost: set[int] = set()  # devices out of the placement (dead, or restarted and not yet back)
        self._readmit_after = 0.0  # clock time of the next try after a failed readmission
        self._readmit_failures: dict[int, int] = {}  # device -> its readmissions failed in a row (restart backoff)
        self._rejoin: set[int] = set()  # restarted devices waiting for the next recalibration
        self._next_probe = 0.0
        self._misses = [0] * pool.num_devices  # consecutive unanswered probes per device
        self._suspects: set[int] = set()  # devices an engine could not reach: probed at once, lost at one miss
        self._hidden_size: int | None = None  # of the model's experts, read from the checkpoint when first needed
        self._telemetry: list = []  # latest Telemetry of every worker (refreshed with the health probe)
        self._unprofiled: set[int] = set()  # devices that never answered a profiling pass (down at startup)
        self._restart_after: dict[int, tuple[float, int]] = {}  # device: (next try, tries) after failed restarts
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- startup -----------------------------------------------------------------------------------

    def start(self, *, background: bool = True) -> None:
        """Create or adopt workers, profile them, then recover or compute and load the placement. Workers that do
        not come up (their node is gone, no node has the resources) are lost from the start while any other does:
        the app serves on the others and the loop keeps restarting them (a coordinator restarted after a node
        failure failed at every Serve retry, and the app with it)."""
        self._workers = self._start_workers()
        self._at_start(self._profile, "their profiling pass")
        recovered, newest = self._recover()
        if newest != 0:  # the app ran before (or its records could not be read): its engines may still serve
            with self._lock:
                self._version_floor = max(self._version_floor, newest or 0)
                self._acks_trusted_at = self._clock() + self.config.engine_timeout_s
                self._unreconciled = True  # old copies pending drop, copies of a migration never published
        if recovered is None:
            before: dict[int, set] = {}  # what the workers held before the first try (filled by it)
            self._publish(self._at_start(lambda: self._load_first(before), "loading their experts"))
        else:
            # Devices down since start that the recovered placement uses (a node lost with the coordinator): their
            # experts are copied from survivors or read from the checkpoint, as for any device lost while serving
            # (a fresh plan loaded every expert onto survivors still holding the recorded ones: twice the memory)
            orphaned = [d for d in sorted(self._lost) if recovered.experts_on(d)]
            if orphaned:
                result = self.handle_lost_devices(orphaned, restart=False)
                if result["status"] != "applied":
                    raise RuntimeError(f"re-placing the experts of devices {orphaned}, down at start, failed: "
                                       f"{result['detail']}")
            # A device without slots was lost and waits to rejoin (the coordinator before may have died before
            # readmitting it): a full re-plan gives it its share; incremental ones keep slot counts.
            # (those down since start are restarted first: they are lost, not idle)
            # (of the placement in service: re-placing those down since start may just have put experts on a device
            # idle in the recovered one, which was then counted lost while serving them)
            recorded = self._recorded_lost
            idle = self._readmit_idle(self.placement, [d for d in self._live_devices()
                                                       if recorded is None or d in recorded])
            if idle:
                log.info("devices %s hold no expert of the placement in service: readmitting them", idle)
        if background:
            self._thread = threading.Thread(target=self._loop, name="coordinator", daemon=True)
            self._thread.start()

    def _at_start(self, step: Callable[[], Any], what: str) -> Any:
        """`step()`, again without the devices it failed on (a GPU with a fault, or one another process filled,
        answers but fails its first real work: the app failed to start for one such device) while others are
        left: those are lost from the start, as devices that never came up, and restarted by the loop."""
        while True:
            try:
                return step()
            except WorkerCallError as exc:
                live = set(self._live_devices())
                failed = set(exc.devices) & live
                if not failed or failed == live:
                    raise
                log.warning("devices %s failed %s at start: serving on %s without them, restarted until they "
                            "come up: %s", sorted(failed), what, sorted(live - failed), exc)
                with self._lock:
                    self._lost |= failed
                    self._unprofiled |= failed

    def _load_first(self, before: dict[int, set]) -> pl.Placement:
        """The first placement, planned for uniform loads on the live devices, its experts loaded: only those a
        device lacks (after a failed try, the others keep what they loaded), then those it no longer needs
        dropped. Above every recorded version: engines may still serve one, and they only switch to newer ones.

        `before`: what the workers held before the first try, filled by it (adopted workers may serve an old
        version to engines still running: those copies are left to `_reconcile`, not dropped here)."""
        first = self._plan(self._uniform_loads(), self.config.policy).with_version(self._version_floor + 1)
        needed = self._keys_per_device(first)
        held = self.pool.held(self._live_devices())
        if not before:
            before.update((d, set(keys)) for d, keys in held.items())
        self.pool.load(self.config.checkpoint,
                       {d: [k for k in keys if k not in held.get(d, set())] for d, keys in needed.items()})
        # Copies an earlier try loaded that this plan does not use are dropped now; copies held before start (an
        # old version engines may still serve) are dropped by `_reconcile` once engines switched.
        extra = {d: sorted(keys - before.get(d, set()) - set(needed.get(d, ()))) for d, keys in held.items()}
        if any(extra.values()):
            self.pool.drop(extra)
        if any(keys - set(needed.get(d, ())) for d, keys in before.items() if d in held):  # (live devices)
            with self._lock:
                self._unreconciled = True
        return first

    def _start_workers(self) -> list[WorkerInfo]:
        try:
            return self.pool.start()
        except WorkerStartError as exc:
            up = [d for d, info in enumerate(exc.infos) if info is not None]
            if not up:
                raise
            down = [d for d, info in enumerate(exc.infos) if info is None]
            log.warning("serving on devices %s without devices %s, restarted until they come up: %s", up, down, exc)
            with self._lock:
                self._lost |= set(down)
                self._unprofiled |= set(down)
            # (no address: engines reach a device only for the experts placed on it, and none is while it is lost)
            return [info or WorkerInfo(d, "", "", None, "", "", False) for d, info in enumerate(exc.infos)]

    def _recover(self, attempts: int = 3) -> tuple[pl.Placement | None, int | None]:
        """Adopt the newest placement recorded on the workers if the workers really hold it.

        Returns it (None if there is none to adopt) and the newest version recorded (0 if none, None if the
        workers could not say: asked `attempts` times, health_interval_s apart; or if they hold experts but no
        record: the app ran, its records never saved)."""
        live = self._live_devices()
        for attempt in range(1, attempts + 1):
            try:
                records = self.pool.load_records(live)
                held = self.pool.held(live)
                break
            except WorkerCallError as exc:
                if attempt == attempts:
                    log.warning("placement recovery skipped after %d attempts: %s", attempts, exc)
                    return None, None
                self._stop.wait(self.config.health_interval_s)
        newest = max((int(r.get("version", 0)) for r in records), default=0)
        if not records and any(held.values()):
            return None, None
        for record in sorted(records, key=lambda r: r.get("version", 0), reverse=True):
            candidate = pl.Placement.from_dict(record)
            needed = self._keys_per_device(candidate)
            # (the experts of devices down since start are re-placed by start(), as for any lost device)
            if all(set(keys) <= held.get(d, set()) for d, keys in needed.items() if d in live):
                log.info("recovered placement version %d from the workers", candidate.version)
                with self._lock:
                    self._placement = candidate
                    self._calibrated = bool(record.get("calibrated", False))
                    # (a calibration asked for that did not apply is tried again by this coordinator's loop too)
                    self._calibration_asked = bool(record.get("calibration_asked", False))
                    self._planned_by = str(record.get("planned_by", self.config.policy))
                    # the devices lost when it was recorded (None: a record from before they were kept): only those
                    # wait to rejoin, not one a plan left empty (slow, under a slot_budget), re-planned at each restart
                    self._recorded_lost = set(record["lost"]) if "lost" in record else None
                return candidate, newest
        return None, newest

    def _profile(self, devices: list[int] | None = None) -> list[pl.DeviceModel]:
        """Profile ``devices`` (default: those not lost): their new models replace their refined ones (their scales
        back to 1; what the placement was planned with kept, re-expressed against the new model: see
        `DeviceDriftTracker.reprofiled`). The others keep theirs; one never profiled (down since startup) stands
        in as the slowest profiled one until it is profiled itself, when it rejoins (`_readmit`)."""
        devices = self._live_devices() if devices is None else devices
        samples = self.pool.profile(self.config.profile_token_counts, self.config.profile_repeats, devices)
        return self._install_profiles(devices, samples)

    def _install_profiles(self, devices: list[int], samples: list) -> list[pl.DeviceModel]:
        """`_profile`'s second half: the models fitted to ``devices``' samples replace theirs."""
        tokens = np.asarray(self.config.profile_token_counts, dtype=np.float64)
        with self._lock:
            models = dict(enumerate(self._profiled))
            for device, sample in zip(devices, samples):
                old, models[device] = models.get(device), pl.DeviceModel.fit(sample.tokens, sample.seconds)
                change = None if old is None or device in self._unprofiled else _time_ratio(old, models[device], tokens)
                if change is None:  # (a stand-in never was what a plan was made with)
                    self._devices.reset(device)
                else:
                    self._devices.reprofiled(device, change)
            self._unprofiled -= set(devices)
            known = [m for d, m in models.items() if d not in self._unprofiled]
            slowest = max(known, key=lambda m: float(m.latency(max(self.config.profile_token_counts))))
            self._profiled = [slowest if d in self._unprofiled else models[d] for d in range(self.pool.num_devices)]
            return list(self._profiled)

    # --- what engines call -------------------------------------------------------------------------

    def report(self, report: EngineReport) -> SyncReply:
        """Ingest an engine's batched statistics; answer with what it must switch to."""
        now = self._clock()
        counts = np.asarray(report.router_counts, dtype=np.float64)
        with self._lock:
            self._engines[report.engine_id] = _Engine(report.placement_version, report.workers_epoch, now)
            # an ingress replica gone (replaced, scaled down) is forgotten: every one that ever reported was listed
            forget = _ENGINE_FORGET_TIMEOUTS * self.config.engine_timeout_s
            self._engines = {k: e for k, e in self._engines.items() if now - e.last_seen <= forget}
            # (an engine on an older worker epoch may be calling a worker since replaced)
            suspects = set(report.unreachable) - self._lost - self._suspects
            if suspects and report.workers_epoch == self._workers_epoch:
                log.warning("engine %s cannot reach device(s) %s: probing now", report.engine_id, sorted(suspects))
                self._suspects |= suspects
                self._next_probe = 0.0  # the loop's next tick (within 0.1 s) probes every worker
            for step in counts.reshape(-1, self.shape.num_layers, self.shape.num_experts):
                self._observe_pass(step)
            for sample in report.device_samples:
                self._observe_device(sample.device, np.asarray(sample.tokens), np.asarray(sample.seconds))
            current = self._placement
            if current is not None and report.placement_version > current.version:
                # A version this coordinator did not publish (its records were lost): the loop republishes the
                # placement above it, or the engine would never switch and would count as acknowledging.
                self._version_floor = max(self._version_floor, report.placement_version)
            newer = current is not None and report.placement_version < current.version
            return SyncReply(
                placement=current.to_dict() if newer else None,
                workers=tuple(self._workers) if report.workers_epoch != self._workers_epoch else None,
                workers_epoch=self._workers_epoch,
            )

    def _observe_pass(self, counts: np.ndarray) -> None:
        if counts.sum() <= 0:
            return
        drift = self._workload_drift.observe(counts)
        if drift is not None and self._calibrated:
            self._last_drift = {"passes": drift.num_passes, "layer_distances": drift.distances.tolist(),
                                "worst_layer": int(drift.worst_layer), "volume_ratio": drift.volume_ratio,
                                "causes": list(drift.causes)}
            if self.config.auto_recalibrate and self.config.policy != "contiguous":
                self._pending_trigger = f"workload drift: {drift.summary()}"

    def _observe_device(self, device: int, tokens: np.ndarray, seconds: np.ndarray) -> None:
        if not self._profiled or tokens.size == 0:
            return
        predicted = self._profiled[device].latency(tokens) * self._devices.scales[device]
        # calls within the profiled range only: beyond it the curve is extrapolated (a flat one continued as compute
        # bound), and prefill's large calls against decode's small ones read as a device drifting back and forth
        keep = (predicted > 0) & (tokens <= max(self.config.profile_token_counts))
        self._devices.detector.observe(np.full(int(keep.sum()), device), predicted[keep], seconds[keep])

    def calibrate(self, counts: np.ndarray | None = None, reason: str = "startup profiling pass") -> dict[str, Any]:
        """First calibration, from an engine's profiling pass: router counts [L, E] per pass, or the
        statistics window when None. Runs once per app; later calls report that it is done. One that does not
        apply (a copy failed and rolled back, or it raised) is tried again by the loop on the window after a
        cool-down (`_back_off`), until it or another full re-plan on router statistics applies: an app left
        uncalibrated never re-plans on drift (one failed calibration turned automatic recalibration off for good).
        A call while another calibration runs answers `in_progress` (the other's answer waits for the placement)."""
        loads = None if counts is None else np.asarray(counts, dtype=np.float64)  # (a bad array raises here)
        with self._lock:
            if self._calibrated:
                return {"status": "already_calibrated", "to_version": self._placement.version}
            if self._calibrating:
                return {"status": "in_progress", "to_version": self._placement.version}
            self._calibration_asked = True
            self._calibrating = True
        try:
            # one that does not apply leaves `_calibrated` as it finds it: another full plan on statistics may have
            # calibrated the app meanwhile (set False here, a calibration that rolled back after an admin's applied
            # one un-calibrated the app)
            result = self.recalibrate(mode="full", force=True, reason=reason, loads=loads)
        except Exception:
            with self._lock:
                self._calibrating = False
                self._back_off()
            with contextlib.suppress(Exception):  # (best effort: the calibration's own error is the one raised)
                self._republish()  # recorded as asked for: a restarted coordinator tries it again too
            raise
        with self._lock:  # (both at once: no second calibration starts in between)
            self._calibrating = False
            if result["status"] in ("applied", "no_change"):  # no_change: the placement in service is the one
                self._calibrated = True
        if result["status"] != "applied" or loads is not None:
            # record that the current placement is the calibrated one (no_change, or applied for given counts, which
            # a plan publishes as no calibration: only one on router statistics is), or that a calibration was asked
            # for and did not apply (its engines, up already, never ask a restarted coordinator again)
            self._republish()
        return result

    def _republish(self) -> None:
        """Record the placement in service again (with what `calibrated` and `calibration_asked` now say), under the
        migration lock: a migration that publishes meanwhile is not undone by an older placement."""
        with self._migration_lock:
            self._publish(self.placement)

    # --- recalibration -----------------------------------------------------------------------------

    def recalibrate(self, *, policy: str | None = None, mode: str = "incremental", dry_run: bool = False,
                    force: bool = False, reason: str = "admin", loads: np.ndarray | None = None,
                    confidence_z: float | None = None, admin: bool = False) -> dict[str, Any]:
        """Plan a new placement for the current statistics and, unless dry_run or not worth it, apply it.

        mode: "incremental" (swaps from the live placement, a capped share of slots moved), "full" (a new
        plan) or "auto" (both candidates judged; the one whose predicted gain over the gain horizon, net
        of its migration cost, is larger; incremental on a tie). Policies other than the configured vibe
        always re-plan in full. confidence_z: standard errors below the held-out mean the gain is judged
        at (None: the config's `gain_confidence_z`). admin: an admin's call, refused while another admin
        recalibration or profiling is in the coordinator; a skip of it is recorded and leaves the drift the loop
        detected pending (an admin's incremental skip consumed a device drift that the loop's `auto` mode would
        re-plan). Another caller's skip (the loop's) counts as the drift judged: cool-down, device models marked
        planned with.
        Returns the Recalibration record as a dict (status, predicted gain, moves, duration...).
        Raises ValueError for a bad policy or mode, or when there are no statistics yet; AdminBusy (admin).
        """
        policy = policy or self.config.policy
        if policy not in pl.POLICIES:
            raise ValueError(f"policy must be one of {pl.POLICIES}, got {policy!r}")
        if mode not in RECALIBRATION_MODES:
            raise ValueError(f"mode must be one of {RECALIBRATION_MODES}, got {mode!r}")
        with self._admin_turn(admin, "recalibration"), self._migration_lock:
            return self._recalibrate(policy=policy, mode=mode, dry_run=dry_run, force=force, reason=reason,
                                     loads=loads, confidence_z=confidence_z, judges_drift=not admin)

    @contextlib.contextmanager
    def _admin_turn(self, admin: bool, what: str):
        """Let one admin call at a time in (`AdminBusy` for the others); other callers pass."""
        if not admin:
            yield
            return
        if not self._admin_gate.acquire(blocking=False):
            raise AdminBusy(f"an admin {self._admin_doing or 'call'} is in progress: retry once it has answered")
        self._admin_doing = what
        try:
            yield
        finally:
            self._admin_doing = ""
            self._admin_gate.release()

    def _recalibrate(self, *, policy: str, mode: str, dry_run: bool, force: bool, reason: str,
                     loads: np.ndarray | None, confidence_z: float | None, back_off: bool = True,
                     judges_drift: bool = True) -> dict[str, Any]:
        """`recalibrate` with its arguments checked, under the migration lock (``back_off`` False: a rollback leaves
        the workload detector's cool-down alone, as a readmission's, which backs off its own way; ``judges_drift``
        False: a skip leaves the drift pending, as an admin's)."""
        self._finish_drops(wait=True)
        started = self._clock()
        # A full plan on router statistics applied is the app's calibration, whoever asked for it (the startup one
        # may have failed; a plan for the uniform stand-in loads of a readmission before any traffic is not one)
        on_statistics = loads is None
        with self._lock:
            old = self._placement
            devices, scales = self.device_models(), self._devices.scales
            lost = sorted(self._lost)
            volume = self._workload_drift.volume()  # of the passes planned on (None: no load yet)
            passes = self._workload_drift.window_passes() if loads is None else None
            loads, activity = self._window() if loads is None else (loads, None)
        if loads is None:
            raise ValueError("no router statistics yet: serve some requests first")
        loaded = None if passes is None else int(np.count_nonzero(passes.sum(axis=(1, 2))))  # window passes with load
        too_few = loaded is not None and loaded < self.config.min_held_out_passes  # to judge a plan on held-out ones
        z = self.config.gain_confidence_z if confidence_z is None else float(confidence_z)
        note = None
        if lost and policy != "vibe":  # only vibe's budgeted packing leaves lost devices empty (`_plan`): said so, not
            # recorded and published as the policy asked for (a review)
            note = (f"{_devices_named(lost)} lost: planned by vibe with a slot budget that leaves "
                    f"{'it' if len(lost) == 1 else 'them'} empty, not by {policy}")
            policy = "vibe"
        if policy != self.config.policy or policy != "vibe":
            mode = "full"  # eplb re-plans from scratch as its peers do; contiguous is static
        judged = []
        for candidate_mode in ("incremental", "full") if mode == "auto" else (mode,):
            try:
                new = self._candidate(old, loads, activity, devices, policy, candidate_mode)
            except ValueError as exc:
                if policy != self.config.policy:  # the caller's choice cannot place this app: a 400
                    raise ValueError(f"policy {policy!r} cannot place this app: {exc}") from exc
                # the configured policy failing is the coordinator's failure, not the caller's (no 400)
                raise RuntimeError(f"planning a {policy} placement failed: {exc}") from exc
            plan = pl.migration_plan(old, new, self.shape.expert_bytes)
            judged.append((self._judge(old, new, plan, loads, activity, passes, loaded, too_few, devices, policy,
                                       candidate_mode, reason, dry_run, force, z), new, plan))
        record, new, plan = max(judged, key=lambda j: self._net_gain(j[0]))
        if note is not None:
            record.detail = "; ".join(filter(None, (note, record.detail)))
        if len(judged) > 1:
            nets = ", ".join(f"{r.mode} {1e3 * self._net_gain(r):.1f} ms" for r, _, _ in judged)
            record.detail = "; ".join(filter(None, (record.detail, f"auto: net predicted gain {nets}")))
        if record.status == "pending":
            calibrates = record.mode == "full" and on_statistics
            record.status, outcome, record.failed_devices = self._migrate(old, new, plan, policy, calibrates)
            record.detail = "; ".join(filter(None, (outcome, record.detail)))
        record.duration_s = self._clock() - started
        waits = record.status == "skipped" and too_few  # (not judged yet: not a judgement of these models)
        with self._lock:
            self._remember(record)
            if record.status in ("applied", "no_change"):
                self._reset_drift(loads, volume)
            elif record.status == "skipped" and judges_drift:  # not worth moving now: keep the reference, back off
                self._workload_drift.cool_down()
                # the drift reported again while it was judged is judged again after the cool-down, not at the next
                # tick with no new pass (one skip after another, the cool-downs bypassed: a review)
                self._pending_trigger = None
            elif record.status == "rolled_back" and back_off:  # keep the references too: acted on again, later
                self._back_off()
            if record.status in ("applied", "no_change") or (record.status == "skipped" and judges_drift and not waits):
                self._devices.planned_with(scales)  # judged on these models: drift starts from here
            elif waits and judges_drift:  # asked again once the window can hold a judgement out (marked planned
                # with, a device slowed 2x soon after startup was never re-planned: 571 ms gain against 0.5 ms kept
                # off, a review)
                self._devices.retry()
                needed = self.config.min_held_out_passes - loaded
                self._retry_at_pass = max(self._retry_at_pass, self._workload_drift.num_passes + needed)
        log.info("recalibration %s: %s (%d experts moved)", record.status, reason, record.experts_moved)
        return asdict(record)

    def _candidate(self, old, loads, activity, devices, policy, mode) -> pl.Placement:
        if policy == "contiguous":
            return self._plan(loads, "contiguous").with_version(self._next_version(old))
        if mode == "full":
            return self._plan(loads, policy, devices, activity).with_version(self._next_version(old))
        new, _moves = pl.rebalance(old, loads, devices, eps=self.config.eps, activity=activity)
        return new.with_version(self._next_version(old))

    def _next_version(self, old: pl.Placement) -> int:
        """The version of the placement that replaces `old`: above it and above any version seen (see
        `_version_floor`)."""
        with self._lock:
            return max(old.version, self._version_floor) + 1

    def _judge(self, old, new, plan, loads, activity, passes, loaded, too_few, devices, policy, mode, reason, dry_run,
               force, z) -> Recalibration:
        horizon = self.config.gain_horizon_passes
        before = float(pl.makespan(old, loads, devices, activity).sum())
        after = float(pl.makespan(new, loads, devices, activity).sum())
        cost = plan.transfer_seconds(self._bandwidth)
        unchanged = plan.num_moves == 0 and new.same_layout(old)
        if not unchanged and loaded is not None and not too_few:
            held_out = pl.held_out_gain(
                old, lambda half, half_activity: self._candidate(old, half, half_activity, devices, policy, mode),
                passes, devices)
            gain, stderr = held_out.per_pass_s * horizon, held_out.stderr_s * horizon
            judged_on = f"held out ({held_out.passes} passes)"
        else:
            gain, stderr = pl.predicted_gain(old, new, loads, devices, horizon, activity), None
            judged_on = f"in sample ({loaded} passes, too few to hold out)" if too_few else "in sample"
        record = Recalibration(
            reason=reason, policy=policy, mode=mode, status="pending", from_version=old.version,
            to_version=new.version, started_at=time.time(), experts_moved=plan.num_moves,
            bytes_moved=plan.bytes_moved,
            max_slot_fraction_moved=float(np.max(plan.moved_slot_fraction, initial=0.0)),
            predicted_makespan_before_s=before, predicted_makespan_after_s=after, predicted_gain_s=gain,
            predicted_gain_stderr_s=stderr, gain_judged_on=judged_on, gain_confidence_z=z, migration_cost_s=cost,
            moves=[{"layer": m.layer, "expert": m.expert, "src": m.src_device, "dst": m.dst_device}
                   for m in plan.moves],
        )
        if unchanged:
            record.status, record.to_version = "no_change", old.version
        elif dry_run:
            record.status = "dry_run"
        elif not force and too_few:  # a plan fitted to a few passes looks fast on them, whatever they are
            record.status = "skipped"
            record.detail = (f"{loaded} passes with load in the window: {self.config.min_held_out_passes} are needed "
                             f"to judge a re-plan on passes it was not planned on")
        elif not force and self._net_gain(record) <= 0:
            record.status = "skipped"
            spread = f" +- {stderr * 1e3:.1f}" if stderr is not None else ""
            record.detail = (f"predicted gain {gain * 1e3:.1f}{spread} ms over {horizon} passes ({judged_on}) "
                             f"does not exceed the migration cost {cost * 1e3:.1f} ms"
                             + (f" by {z:g} standard errors" if stderr is not None and z else ""))
        return record

    def _net_gain(self, record: Recalibration) -> float:
        """Seconds the record's migration saves over the gain horizon at least (its gain
        `gain_confidence_z` standard errors below the mean, when it has one), net of its cost."""
        stderr = record.predicted_gain_stderr_s or 0.0
        return record.predicted_gain_s - record.gain_confidence_z * stderr - record.migration_cost_s

    def _migrate(self, old: pl.Placement, new: pl.Placement, plan: pl.MigrationPlan, policy: str,
                 calibrates: bool = False) -> tuple[str, str, list[int]]:
        """Two-phase migration from `old` to `new` by `plan`. Phase 1 copies; phase 2 publishes (`calibrates`: the
        app is calibrated from then on); phase 3 (later) drops old copies. Returns the status, a detail and the
        devices a failed copy named."""
        transfers: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for move in plan.moves:
            transfers.setdefault((move.src_device, move.dst_device), []).append((move.layer, move.expert))
        before = self._held_before({dst for _, dst in transfers})
        copy_started = self._clock()
        try:
            self.pool.copy([(src, dst, keys) for (src, dst), keys in transfers.items()],
                           timeout_s=self._transfer_timeout(len(plan.moves)))
        except WorkerCallError as exc:
            self._roll_back(old, [(dst, keys) for (_, dst), keys in transfers.items()], before)
            log.warning("migration to version %d rolled back: %s", new.version, exc)
            return "rolled_back", f"copy phase failed, version {old.version} kept: {exc}", list(exc.devices)
        elapsed = self._clock() - copy_started
        if plan.bytes_moved and elapsed > 0:
            self._bandwidth = 0.5 * self._bandwidth + 0.5 * plan.bytes_moved / elapsed
        drops = keys_by_device((d.device, (d.layer, d.expert)) for d in plan.drops)
        self._publish(new, policy, calibrated=calibrates)
        with self._lock:
            self._pending_drops = (new.version, drops, self._clock())
        return "applied", "", []

    def _held_before(self, destinations: Iterable[int]) -> dict[int, set[tuple[int, int]]]:
        """What `destinations` hold before a copy or load to them (those that answer within probe_timeout_s): what
        a rollback must leave, for besides `old`'s experts a worker may hold copies of an older version that an
        engine still serves (drops pending, or left to `_reconcile` by a coordinator that died)."""
        return self.pool.held_of(sorted(destinations), self.config.probe_timeout_s)

    def _roll_back(self, old: pl.Placement, placed: list[tuple[int, list[tuple[int, int]]]],
                   before: Mapping[int, set[tuple[int, int]]]) -> None:
        """Drop the copies a failed migration or refill left behind; version `old` stays whole and served.

        `placed`: (destination, keys) of each copy or load tried; `before`: what the destinations held before it
        (`_held_before`), never dropped here: a copy of an older version pending drop, which engines that did not
        yet acknowledge a newer one still call, stays until the usual rule drops it (the rollback dropped it at once,
        and those engines' steps failed on it). They are dropped group by group, so a worker that does not answer
        keeps none of the others' copies; what could not be dropped (or was never placed, when a worker does not
        answer `held`; all of a destination's, when it did not say what it held before) is left to `_reconcile`."""
        with self._lock:  # (first: whatever this cleanup meets) a copy or load given up still runs in its worker,
            # holding nothing if it ends past its deadline's grace, which the pool waited out: what held() missed
            self._unreconciled = True
        try:  # (the destinations only: a lost worker would hold this for call_timeout_s)
            held = self.pool.held(sorted({dst for dst, _ in placed}))
        except WorkerCallError:  # a worker does not answer: try every group, the ones never placed fail
            held = None
        incomplete = []
        for dst, keys in placed:
            if dst not in before:
                continue
            leftovers = [key for key in keys if key not in old.experts_on(dst) and key not in before[dst]
                         and (held is None or key in held[dst])]
            if not leftovers:
                continue
            try:
                self.pool.drop({dst: leftovers})
            except WorkerCallError as exc:
                incomplete.append(f"{len(leftovers)} on device {dst} ({exc})")
        if incomplete:
            log.warning("rollback cleanup incomplete, left to reconciliation: %s", "; ".join(incomplete))

    def _publish(self, placement: pl.Placement, planned_by: str | None = None, *, calibrated: bool = False) -> None:
        """Serve `placement` (planned by the policy `planned_by`; None: the same as the one before; `calibrated`: it
        calibrates the app) and record it on the workers, for a restarted coordinator."""
        with self._lock:
            self._placement = placement
            self._planned_by = planned_by or self._planned_by
            self._calibrated = self._calibrated or calibrated
        with self._lock:
            lost = sorted(self._lost)
        record = placement.to_dict() | {"calibrated": self._calibrated, "calibration_asked": self._calibration_asked,
                                         "planned_by": self._planned_by, "lost": lost}
        try:  # on the devices not lost (a lost one that Ray is restarting would hold this for call_timeout_s)
            self.pool.save_record(record, self._live_devices())
        except WorkerCallError as exc:  # recovery is best effort; serving is not affected
            log.warning("could not record placement on workers: %s", exc)

    def _finish_drops(self, *, wait: bool) -> None:
        """Phase 3: drop old copies once every live engine acknowledged the new version (or timeout)."""
        while True:
            with self._lock:
                if self._pending_drops is None:
                    return
                version, drops, published = self._pending_drops
                now, current = self._clock(), self._placement.version
                live = [e for e in self._engines.values() if now - e.last_seen < self.config.engine_timeout_s]
                # (a version above the current one is of another lineage, no acknowledgement: see _version_floor)
                acked = now >= self._acks_trusted_at and all(version <= e.version <= current for e in live)
                timed_out = now - published > self.config.ack_timeout_s
                if acked or timed_out:
                    self._pending_drops = None
            if acked or timed_out:
                if timed_out and not acked:
                    log.warning("dropping old copies of version %d before every engine acknowledged", version)
                try:
                    self.pool.drop(drops)
                except WorkerCallError as exc:
                    log.warning("dropping old expert copies failed, left to reconciliation: %s", exc)
                    with self._lock:
                        self._unreconciled = True
                return
            if not wait:
                return
            time.sleep(0.02)

    def _catch_up_version(self) -> None:
        """Republish the placement above `_version_floor` when an engine reported a version above it (call under the
        migration lock). Drops pending wait for the new number: engines acknowledge it once they switch."""
        with self._lock:
            current = self._placement
            if self._version_floor <= current.version:
                return
            new = current.with_version(self._version_floor + 1)
        log.warning("an engine serves version %d, above version %d in service (records lost in a restart): "
                    "republished as version %d", self._version_floor, current.version, new.version)
        self._publish(new)
        with self._lock:
            if self._pending_drops is not None:
                self._pending_drops = (new.version, self._pending_drops[1], self._clock())

    def _reconcile(self) -> None:
        """Schedule as drops what workers hold outside the placement (call under the migration lock, with no drop
        pending): copies pending drop when a coordinator died, a migration's copies never published, copies a
        rollback or a drop could not remove. Dropped by the usual rule (every engine acknowledged the version in
        service, or ack_timeout_s): an engine may still serve an older version that uses them."""
        with self._lock:
            if not self._unreconciled or self._pending_drops is not None or self._clock() < self._reconcile_after:
                return
            current = self._placement
        # the devices not lost, each within probe_timeout_s (a lost or hung one held up the loop for call_timeout_s,
        # and postponed every device's reconciliation while it stayed lost); those that do not answer: next time
        live = self._live_devices()
        held = self.pool.held_of(live, self.config.probe_timeout_s)
        extras = {d: sorted(keys - current.experts_on(d)) for d, keys in held.items()
                  if keys - current.experts_on(d)}
        with self._lock:
            self._unreconciled = len(held) < len(live)
            if self._unreconciled:
                self._reconcile_after = self._clock() + self.config.health_interval_s
            if extras:
                log.info("%d expert copies held outside placement version %d: dropped once engines acknowledge it",
                         sum(map(len, extras.values())), current.version)
                self._pending_drops = (current.version, extras, self._clock())

    def _reset_drift(self, loads: np.ndarray, volume: float | None) -> None:
        # A layer without load (no tokens seen yet) has no direction: make it uniform, not invalid.
        reference = np.asarray(loads, dtype=np.float64)
        reference = np.where(reference.sum(axis=1, keepdims=True) > 0, reference, 1.0)
        self._workload_drift.reset(reference, volume)
        self._pending_trigger = None
        self._retry_at_pass = 0  # a placement made for the loads: no failed re-plan to back off from

    def _back_off(self) -> None:
        """A re-plan rolled back or raised: keep what it was for (the workload and device references) and ask for
        none until the workload detector's cool-down is over (doubling with each in a row, up to the window; at
        least drift_check_every passes). The workload drift is reported, the device drift asked for and a failed
        startup calibration tried again then (call under the lock). A re-plan that rolled back was retried at
        every drift check (a copy to a worker out of memory: 19 rollbacks in 200 passes, 86 expert copies thrown
        away, the history flooded)."""
        quiet = self._workload_drift.cool_down()
        self._retry_at_pass = self._workload_drift.num_passes + max(quiet, self.config.drift_check_every)
        self._pending_trigger = None  # (reported during the re-plan: reported again after the cool-down)
        self._devices.retry()

    # --- device models -----------------------------------------------------------------------------

    def device_models(self) -> list[pl.DeviceModel]:
        """Current models: profiled curves scaled by what serving observed since (online refinement)."""
        with self._lock:
            return [m.scaled(float(s)) for m, s in zip(self._profiled, self._devices.scales)]

    def profile_devices(self, *, admin: bool = False) -> dict[str, Any]:
        """Re-profile every device not lost (admin): new curves replace the refined ones; `profiled` names them, and
        `failed` the devices that did not answer (a lost device keeps its model until it rejoins, when it is
        profiled). The devices are measured outside the migration lock (held for the whole pass, a device lost
        meanwhile waited that long to be re-placed, as long as call_timeout_s behind a hung one; a review), and
        their models installed under it, after any recalibration in progress: one planned on the refined models
        would otherwise record them as the models it was planned with after profiling reset them, which reads as
        device drift and re-plans for nothing.

        admin: an admin's call, refused while another admin recalibration or profiling is in the coordinator.

        Raises:
            WorkerCallError: no device answered.
            AdminBusy: (admin) another admin call is in progress.
        """
        with self._admin_turn(admin, "profiling"):
            devices, failed = self._live_devices(), []
            while True:
                try:
                    samples = self.pool.profile(self.config.profile_token_counts, self.config.profile_repeats, devices)
                    break
                except WorkerCallError as exc:  # (a device lost meanwhile: the others' new models are kept)
                    named = [d for d in devices if d in exc.devices]
                    if not named or len(named) == len(devices):  # (an error naming none of them is not a device's)
                        raise
                    failed += named
                    devices = [d for d in devices if d not in named]
            with self._migration_lock:
                models = self._install_profiles(devices, samples)
            return {"devices": [asdict(m) for m in models], "profiled": devices, "failed": sorted(failed)}

    def _apply_device_drift(self) -> str | None:
        """Refit the model of each device whose observed / predicted time settled away from 1 (no
        migration); the reason for a recalibration when a model now predicts beyond 1 +-
        device_drift_threshold times the time of the one the placement was planned with, else None. A
        reason is given once per recalibration: the models it was planned with count as those of the placement
        once it is applied, or skipped (`recalibrate`); one that rolls back or raises leaves them, and the reason is
        given again after its cool-down (`_back_off`), not at every loop. Without automatic
        recalibration (or before the first placement for the routing) nothing is due, and the models the placement
        was planned with stay what they were (`model_over_planned` shows the drift not acted on)."""
        replans = self.config.auto_recalibrate and self.config.policy != "contiguous" and self._calibrated
        with self._lock:
            self._devices.refit()
            backing_off = self._workload_drift.num_passes < self._retry_at_pass
            drifted = self._devices.ask() if replans and not backing_off else {}
        if not drifted:
            return None
        worst = max(drifted, key=lambda d: abs(np.log(drifted[d])))
        return f"device drift: device {worst} at {drifted[worst]:.2f}x the time the placement was planned for"

    # --- faults ------------------------------------------------------------------------------------

    def check_workers(self) -> list[int]:
        """Probe every worker; re-place the experts of any that died or restarted. Returns those lost."""
        with self._lock:
            suspects, self._suspects = self._suspects, set()
        infos = self.pool.probe(self.config.probe_timeout_s)
        with self._lock:
            known = list(self._workers)
        self._misses = [misses + 1 if info is None else 0 for misses, info in zip(self._misses, infos)]
        misses = [1 if d in suspects else self.config.probe_misses for d in range(len(infos))]

        def gone(d: int) -> bool:  # missed its probes in a row, or answered as another process than the one known
            return self._misses[d] >= misses[d] if infos[d] is None else _identity(infos[d]) != _identity(known[d])

        lost = [d for d in range(len(infos)) if d not in self._lost and gone(d)]
        # A suspect that answers its control probe may still not compute (a hung GPU): call its data plane.
        lost += [d for d in sorted(suspects) if d not in lost and d not in self._lost and infos[d] is not None
                 and not self._computes(d, infos[d])]
        with self._lock:
            everything = len(self._lost | set(lost)) == self.pool.num_devices
            if everything:  # nothing survives to re-place experts on
                self._lost |= set(lost)
        if lost and not everything:
            self.handle_lost_devices(lost)
        if everything:
            self._reload_all()
            return lost
        with self._lock:  # restarted, waiting to rejoin, but dead (or replaced) again: restarted again, not readmitted
            # (readmission retried a re-plan onto it every health interval, each one rolled back, for good)
            again = sorted(d for d in self._rejoin - set(lost) if gone(d))
            self._rejoin -= set(again)
        if again:
            log.warning("restarted devices %s died before they rejoined: restarting them again", again)
        with self._lock:  # lost earlier, their experts re-placed, but their restart failed: try again
            unrestarted = sorted(self._lost - self._rejoin - set(lost))
        for device in unrestarted:
            self._restart(device)
        return lost

    def _readmit_idle(self, placement: pl.Placement, devices) -> list[int]:
        """Mark those of ``devices`` that hold no expert of ``placement`` lost and rejoining, so a full re-plan gives
        them their share (incremental ones keep slot counts: they would stay idle for good); returns them."""
        idle = sorted(d for d in devices if not placement.experts_on(d))
        with self._lock:
            self._lost |= set(idle)
            self._rejoin |= set(idle)
        return idle

    def _live_devices(self) -> list[int]:
        """The devices not lost."""
        with self._lock:
            return [d for d in range(self.pool.num_devices) if d not in self._lost]

    def _reload_all(self) -> None:
        """Every worker is lost (a one-device app whose worker crashed, all workers on one node that failed, the OOM
        killer): no survivor holds an expert to re-place. Restart each one (Ray may already have restarted its process,
        empty) and reload the placement in service onto those restarted from the checkpoint, as at startup; until then
        engines' steps fail on them and are retried (a 503 after step_retry_s). Those that cannot be restarted (their
        node gone) stay lost, restarted later by the loop as any lost device, and the experts the placement gave them
        are re-placed on the others (`handle_lost_devices`). Nothing restarted, or a load that failed, is tried again
        at the next probe (it was never tried: the loss raised before any device was marked lost). The first restart
        that failed ended the try, nothing loaded: one device whose node was gone, even one the placement left empty,
        kept the app down for good, its other workers restarted at every probe (a review)."""
        orphaned: list[int] = []
        with self._migration_lock:
            with self._lock:
                down = sorted(self._lost)
                placement = self._placement
            log.warning("every worker is lost (devices %s): restarting them and reloading the placement's experts "
                        "from the checkpoint", down)
            started = self._clock()
            restarted = []
            for device in down:
                try:
                    info = self.pool.restart(device)
                except Exception as exc:
                    log.warning("could not restart worker %d: %s", device, exc)
                    continue
                self._restarted(device, info)
                restarted.append(device)
            if not restarted:
                return
            keys = {device: held for device, held in self._keys_per_device(placement).items() if device in restarted}
            record = Recalibration(reason=f"every device lost ({', '.join(map(str, down))}): reloaded"
                                          + (f" onto {', '.join(map(str, restarted))}" if restarted != down else ""),
                                   policy=self._planned_by,
                                   mode="full", status="applied", from_version=placement.version,
                                   to_version=placement.version, started_at=time.time())
            try:
                self.pool.load(self.config.checkpoint, keys)
            except WorkerCallError as exc:
                log.warning("reloading the experts of every device failed: %s", exc)
                record.status, record.detail = "failed", str(exc)
            else:
                record.experts_moved = sum(map(len, keys.values()))
                record.bytes_moved = record.experts_moved * self.shape.expert_bytes
                with self._lock:
                    self._lost -= set(restarted)
                    self._rejoin -= set(down)
                    self._misses = [0] * len(self._misses)
                    self._pending_drops = None  # (the restarted workers hold only the placement's experts)
                self._publish(placement)  # (restarted workers hold no record: a coordinator restarted later found none)
                orphaned = [device for device in down if device not in restarted and placement.experts_on(device)]
            record.duration_s = self._clock() - started
            with self._lock:
                self._remember(record)
        if record.status != "applied":
            return
        if orphaned:  # (after the lock: it takes it) their experts, read from the checkpoint onto the restarted ones
            self.handle_lost_devices(orphaned, restart=False)
        # then a restarted device the placement leaves empty (lost earlier) is back, as after a coordinator restart
        # (marked lost before the orphans were re-placed, it left none alive to take them: the app stayed down)
        self._readmit_idle(self.placement, restarted)

    def _computes(self, device: int, info: WorkerInfo) -> bool:
        """Whether `device` answers one token for one of its experts on its data plane within probe_timeout_s.
        An error answer does not count: a worker whose GPU fails every call (a sticky CUDA error) is alive but
        serves nothing until it is restarted. A device holding no expert is not called by engines: True."""
        from service.checkpoint import load_layout
        from service.transport import WorkerClient, WorkerError, WorkerUnavailable

        held = sorted(self.placement.experts_on(device))
        if not held or not info.tcp_address:  # (a pool of in-process workers has no data plane to call)
            return True
        if self._hidden_size is None:
            self._hidden_size = load_layout(self.config.checkpoint).hidden_size
        layer, expert = held[0]
        try:
            with WorkerClient(info.tcp_address, timeout_s=self.config.probe_timeout_s) as client:
                client.send_forward(0, layer, np.array([expert], np.int32), np.array([1], np.int32),
                                    torch.zeros(1, self._hidden_size))
                client.recv_reply()
        except (WorkerError, WorkerUnavailable) as exc:
            log.warning("device %d answers its probe but does not compute on its data plane: %s", device, exc)
            return False
        return True

    def _transfer_timeout(self, num_experts: int) -> float:
        """How long a reload or a copy while serving waits: what `num_experts` experts take at 0.1 GB/s
        (the workers may read from one disk, or copy over one link), at least a minute (the migration lock is held
        meanwhile; a worker's whole first load may take load_timeout_s). A copy had the pool's call_timeout_s
        whatever it moved: a re-plan of a large model could never finish in it, and was rolled back each time."""
        return max(60.0, num_experts * self.shape.expert_bytes / 1e8)

    def handle_lost_devices(self, lost: list[int], *, restart: bool = True) -> dict[str, Any]:
        """Re-place the experts of `lost` devices on the survivors, publish, then restart the lost workers.

        Experts the survivors hold are copied worker to worker; experts only a lost device held are
        reloaded from the checkpoint. Restarted workers hold nothing and rejoin at the next recalibration.
        """
        reason = f"{_devices_named(lost)} lost"
        log.warning("%s: re-placing their experts on the survivors", reason)
        with self._migration_lock:
            started = self._clock()
            with self._lock:
                if len(self._lost | set(lost)) == self.pool.num_devices:  # left as it was: probes go on
                    raise RuntimeError("every worker is lost; nothing can serve")
                old = self._placement
                self._lost |= set(lost)
                loads, activity = self._window()
            loads = self._uniform_loads() if loads is None else loads
            try:
                new = self._evacuate(old, loads, activity).with_version(self._next_version(old))
            except Exception:  # not re-placed: the next probe finds them lost again and tries again
                with self._lock:
                    self._lost -= set(lost)
                raise
            record = Recalibration(reason=reason, policy=self.config.policy, mode="full", status="applied",
                                   from_version=old.version, to_version=new.version, started_at=time.time())
            copies, reloads = self._refill(old, new)
            before = self._held_before({dst for _, dst, _ in copies} | set(reloads))
            try:
                self.pool.copy(copies, timeout_s=self._transfer_timeout(sum(len(keys) for *_, keys in copies)))
                self.pool.load(self.config.checkpoint, reloads,
                               timeout_s=self._transfer_timeout(sum(map(len, reloads.values()))))
            except WorkerCallError as exc:
                self._roll_back(old, [(dst, keys) for _, dst, keys in copies] + list(reloads.items()), before)
                with self._lock:
                    self._lost -= set(lost)  # the next probe tries again
                record.status, record.detail, record.failed_devices = "failed", str(exc), list(exc.devices)
            else:
                record.experts_moved = sum(len(k) for *_, k in copies) + sum(map(len, reloads.values()))
                record.bytes_moved = record.experts_moved * self.shape.expert_bytes
                self._publish(new, self.config.policy)
                self._replace_pending_drops(old, new)
            record.duration_s = self._clock() - started
            with self._lock:
                self._remember(record)
        if restart and record.status == "applied":
            for device in lost:
                self._restart(device)
        return asdict(record)

    def _evacuate(self, old: pl.Placement, loads: np.ndarray, activity: np.ndarray | None) -> pl.Placement:
        """`old` with the lost devices' slots moved to the survivors, theirs kept (`placement.evacuate`): the copies
        while steps that touch a lost device fail are its experts only. A full budgeted re-plan where that cannot
        be (a replica with no survivor lacking its expert, or survivors without room); the next recalibration
        judges whether a re-plan of the rest is worth its moves."""
        devices = self.device_models()
        moved = pl.evacuate(old, loads, devices, sorted(self._lost), self._lost_budget(old.num_slots),
                            activity=activity)
        if moved is not None:
            return moved
        log.warning("the lost devices' experts do not fit on the survivors as placed: re-planning every expert")
        return self._plan(loads, self.config.policy, activity=activity)

    def _replace_pending_drops(self, old: pl.Placement, new: pl.Placement) -> None:
        """Drops after `new` is acknowledged: old copies it does not use, plus any still pending from an
        earlier migration that `new` does not use either (never a copy on a lost device: it is gone)."""
        drops = [(d.device, (d.layer, d.expert)) for d in pl.migration_plan(old, new, self.shape.expert_bytes).drops]
        with self._lock:
            if self._pending_drops is not None:
                drops += [(device, key) for device, keys in self._pending_drops[1].items() for key in keys
                          if key not in new.experts_on(device)]
            self._pending_drops = (new.version, keys_by_device(
                (device, key) for device, key in set(drops) if device not in self._lost), self._clock())

    def _refill(self, old: pl.Placement, new: pl.Placement):
        """Copies (src, dst, keys) from surviving holders, and checkpoint reloads {dst: keys}."""
        copies: dict[tuple[int, int], list[tuple[int, int]]] = {}
        reloads: dict[int, list[tuple[int, int]]] = {}
        for move in pl.migration_plan(old, new, self.shape.expert_bytes).moves:
            key = (move.layer, move.expert)
            sources = [d for d in old.devices_of(*key).tolist() if d not in self._lost]
            if sources:
                copies.setdefault((sources[0], move.dst_device), []).append(key)
            else:
                reloads.setdefault(move.dst_device, []).append(key)
        return [(src, dst, keys) for (src, dst), keys in copies.items()], reloads

    def _remember(self, record: Recalibration) -> None:
        """Keep a decision in the recent history (its first HISTORY_MOVES moves: a full re-plan of a DeepSeek-V3-sized
        model moves some 14,000 experts, and 50 such records took /admin/stats 3.6 s to convert under the lock every
        engine report waits on, for a 30 MB answer; the caller got them all) and in the running totals (call under
        the lock)."""
        kept = record if len(record.moves) <= HISTORY_MOVES else replace(record, moves=record.moves[:HISTORY_MOVES])
        self._history.append(kept)
        self._totals[record.status] = self._totals.get(record.status, 0) + 1
        if record.status == "applied":
            self._last_applied = kept
            self._totals["experts_moved"] = self._totals.get("experts_moved", 0) + record.experts_moved
            self._totals["bytes_moved"] = self._totals.get("bytes_moved", 0) + record.bytes_moved

    def _refresh_telemetry(self) -> None:
        """Each device's telemetry, asked of the devices not lost, kept for those that answer within
        probe_timeout_s: one worker lost or dying no longer freezes every GPU's readings (the coordinator kept its
        last list while any call failed, so VibeGPUHot could not see a survivor heat up), and a lost device's
        readings are dropped instead of shown as they last were."""
        readings = self.pool.telemetry_of(self._live_devices(), self.config.probe_timeout_s)
        with self._lock:
            self._telemetry = [readings[d] for d in sorted(readings)]

    def _restart(self, device: int) -> None:
        """Restart a lost device's worker; one that fails is tried again at the next probe, then backing off from
        2 x health_interval_s to _RESTART_BACKOFF_MAX_S (a worker no node can host, its node gone, stays lost: each
        try holds the loop while Ray says so)."""
        next_try, failures = self._restart_after.get(device, (0.0, 0))
        if self._clock() < next_try:
            return
        try:
            info = self.pool.restart(device)
        except Exception as exc:  # a later probe finds it still lost and tries again: the next one, then backing off
            failures += 1
            wait = 0.0 if failures == 1 else min(self.config.health_interval_s * 2.0 ** min(failures - 1, 30),
                                                  _RESTART_BACKOFF_MAX_S)
            self._restart_after[device] = (self._clock() + wait, failures)
            log.warning("could not restart worker %d (%d tries; next in %.0f s or more): %s", device, failures, wait,
                        exc)
            return
        self._restarted(device, info)
        with self._lock:
            self._rejoin.add(device)

    def _restarted(self, device: int, info: WorkerInfo) -> None:
        """Record a restarted worker's new address (engines reconnect: the epoch changes); its restart backoff ends."""
        self._restart_after.pop(device, None)
        with self._lock:
            self._workers[device] = info
            self._workers_epoch += 1
            self._misses[device] = 0  # (the dead process's misses: the new one was restarted again at its first)

    def _readmit(self) -> None:
        """Give restarted devices their share again with a full re-plan (forced: they are idle). Until that
        re-plan is applied they stay out of the placement and in `_rejoin`, retried at the next probe:
        readmitted without slots, later incremental re-plans (which keep slot counts) would never fill them.

        Under the migration lock from taking them out of `_lost` to putting them back: a recalibration that ran
        while they were profiled planned with them, published a placement using a device that this readmission
        then failed, marked lost again and restarted empty (never re-placed: it was lost already)."""
        with self._lock:
            if not self._rejoin or self._clock() < self._readmit_after:
                return
            if self._calibrated and self.window_loads() is None:  # (a restarted coordinator, its window empty:
                return  # readmitted on traffic, not re-planned for uniform loads, its calibration thrown away)
        with self._migration_lock:
            with self._lock:
                back = set(self._rejoin)
                self._lost -= back
            uniform = self._uniform_loads() if self.window_loads() is None else None  # no traffic yet: as at startup
            try:
                # profiled before a plan gives them a share: a stand-in model (never profiled) is a guess, and a
                # device lost while serving kept the model of the process that died (refined: its throttling, its
                # fault)
                self._profile(sorted(back))
                result = self._recalibrate(policy=self.config.policy, mode="full", dry_run=False, force=True,
                                           reason=f"{_devices_named(back)} rejoined",
                                           loads=uniform, confidence_z=None, back_off=False)
            except Exception as exc:
                log.warning("readmitting devices %s failed: %s", sorted(back), exc)
                result = {"status": "failed", "failed_devices": list(getattr(exc, "devices", ()))}
            # a rejoining device that failed its profiling or a copy to it (a hung worker: each try waited minutes
            # for it) is restarted again by the next probe instead of retried as it is
            readmitted = result["status"] in ("applied", "no_change")  # (no_change: the plan gives them no slots)
            failed = set() if readmitted else back & set(result.get("failed_devices", ()))
            with self._lock:
                if readmitted:
                    self._rejoin -= back
                    for device in back:
                        self._readmit_failures.pop(device, None)
                else:
                    self._lost |= back
                    self._rejoin -= failed
                    self._readmit_after = self._clock() + self.config.health_interval_s
                    # a device whose readmission keeps failing (it cannot take its share: its GPU's memory taken) is
                    # restarted again at the next probe, then after a wait doubling with each failure in a row, as a
                    # restart that fails (restarted, profiled and re-planned onto at every probe: 61 restarts and 240
                    # expert copies thrown away in a minute; a review)
                    for device in failed:
                        fails = self._readmit_failures[device] = self._readmit_failures.get(device, 0) + 1
                        wait = 0.0 if fails == 1 else min(self.config.health_interval_s * 2.0 ** min(fails - 1, 30),
                                                           _RESTART_BACKOFF_MAX_S)
                        self._restart_after[device] = (self._clock() + wait, 0)
        if failed:
            log.warning("rejoining devices %s failed: restarting them again", sorted(failed))

    # --- background loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self._tick()
            except Exception:  # the loop must survive anything; the history records what failed
                log.exception("coordinator loop iteration failed")

    def _tick(self) -> None:
        """One pass of the background loop: drops, liveness, readmission, a failed calibration tried again, device
        models, drift. A failed calibration is tried again whether or not auto_recalibrate is set: an engine asked
        for it."""
        if self._migration_lock.acquire(blocking=False):  # never drop while a migration copies
            try:
                self._catch_up_version()
                self._finish_drops(wait=False)
                self._reconcile()
            finally:
                self._migration_lock.release()
        if self._clock() >= self._next_probe:
            self._next_probe = self._clock() + self.config.health_interval_s
            if not self.check_workers():
                self._refresh_telemetry()
        if self._rejoin:
            self._readmit()
        with self._lock:
            # (on a drift check's worth of passes at least: a restarted coordinator's window starts empty)
            calibrate = (self._calibration_asked and not self._calibrated and self._workload_drift.num_passes
                         >= max(self._retry_at_pass, self.config.drift_check_every))
        if calibrate:
            self.calibrate(reason="startup calibration, tried again")  # (backs off itself when it fails again)
        device_reason = self._apply_device_drift()  # models are refined whether or not they re-plan
        if not self.config.auto_recalibrate or self.config.policy == "contiguous":
            return
        with self._lock:
            reason = device_reason or self._pending_trigger
            self._pending_trigger = None
        if reason and self._calibrated:
            z = self.config.device_drift_confidence_z if device_reason else self.config.gain_confidence_z
            try:
                self.recalibrate(reason=reason, mode=self.config.recalibration_mode, confidence_z=z)
            except Exception:  # (a rollback backed off already) not tried again at the next tick
                with self._lock:
                    self._back_off()
                raise
        elif device_reason:  # a calibration failed since it was asked for: asked again once one applies
            with self._lock:
                self._devices.retry()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def shutdown(self) -> None:
        """Stop the loop and the workers (the app is going away)."""
        self.stop()
        self.pool.shutdown()

    # --- views -------------------------------------------------------------------------------------

    @property
    def placement(self) -> pl.Placement:
        with self._lock:
            return self._placement

    @property
    def calibrated(self) -> bool:
        return self._calibrated

    @property
    def loop_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def workers(self) -> tuple[list[WorkerInfo], int]:
        with self._lock:
            return list(self._workers), self._workers_epoch

    def window_loads(self) -> np.ndarray | None:
        """float [L, E]: mean router counts per forward pass over the statistics window."""
        with self._lock:
            return self._workload_drift.window_mean()

    def _window(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The window's mean router counts per pass and each expert's share of passes with tokens (both
        [L, E], None before any pass): vibe plans and judges on the expected seconds per pass they give."""
        with self._lock:
            return self._workload_drift.window_mean(), self._workload_drift.window_activity()

    def placement_view(self) -> dict[str, Any]:
        with self._lock:
            current, (loads, activity), devices = self._placement, self._window(), self.device_models()
            lost = set(self._lost)
        if loads is None:
            loads = np.zeros((self.shape.num_layers, self.shape.num_experts))
        times = pl.device_times(current, loads, devices, activity)
        tokens = current.device_tokens(loads)
        layers = []
        for layer in range(current.num_layers):
            slots = [{"slot": s, "expert": int(current.phy2log[layer, s]),
                      "device": int(current.slot_device[layer, s]),
                      "share": float(current.replica_share[layer, s])} for s in range(current.num_slots)]
            layers.append({"layer": layer, "slots": slots,
                           "device_predicted_s": times[layer].tolist(),
                           "device_tokens": tokens[layer].tolist(),
                           "imbalance": float(self._imbalance(times[layer], lost))})
        return {"version": current.version, "policy": self.config.policy, "planned_by": self._planned_by,
                "num_devices": current.num_devices,
                "num_experts": current.num_experts, "layers": layers}

    def metrics_summary(self) -> dict[str, Any]:
        """Numbers for Prometheus gauges and counters (service/placement_metrics.py renders them)."""
        with self._lock:
            current, (loads, activity), devices = self._placement, self._window(), self.device_models()
            totals = dict(self._totals)
            last = self._last_applied
            ratios = self._devices.detector.ratios()
            over_planned = self._devices.since_planned()
            telemetry = list(self._telemetry)
            lost = sorted(self._lost)
        times = None if loads is None else pl.device_times(current, loads, devices, activity)
        moved = ("experts_moved", "bytes_moved")
        return {
            "at": time.time(),  # (each replica exposes its copy; the samples carry this time)
            "placement_version": current.version,
            "layer_imbalance": None if times is None else self._imbalance(times, set(lost)).tolist(),
            "device_predicted_s": None if times is None else times.sum(axis=0).tolist(),
            "device_observed_over_predicted": [None if np.isnan(r) else float(r) for r in ratios],
            "device_model_over_planned": over_planned.tolist(),
            "recalibrations": {k: v for k, v in totals.items() if k not in moved},
            "last_recalibration_s": None if last is None else last.duration_s,
            "experts_moved": totals.get("experts_moved", 0),
            "bytes_moved": totals.get("bytes_moved", 0),
            "lost_devices": lost,
            "telemetry": [asdict(t) for t in telemetry],
        }

    def stats_view(self) -> dict[str, Any]:
        with self._lock:
            current, (loads, activity), devices = self._placement, self._window(), self.device_models()
            records, last_applied = list(self._history), self._last_applied  # (converted after the lock)
            now = self._clock()  # (`last_seen` is this clock's, which means nothing elsewhere: `age_s` says it)
            engines = {k: asdict(v) | {"age_s": now - v.last_seen} for k, v in self._engines.items()}
            calibrated = self._calibrated
            drift = dict(self._last_drift)
            passes = self._workload_drift.num_passes
            volume = self._workload_drift.volume_ratio() if self._calibrated else None
            device_ratios = self._devices.detector.ratios().tolist()
            since_planned = self._devices.since_planned().tolist()
            lost = sorted(self._lost)
            telemetry = [asdict(t) for t in self._telemetry]
        imbalance = None
        if loads is not None:
            imbalance = self._imbalance(pl.device_times(current, loads, devices, activity), set(lost)).tolist()
        return {
            "placement_version": current.version,
            "policy": self.config.policy,
            "planned_by": self._planned_by,
            "calibrated": calibrated,
            "passes_observed": passes,
            "loads": None if loads is None else loads.tolist(),
            "activity": None if activity is None else activity.tolist(),
            "imbalance_per_layer": imbalance,
            "devices": [{"device": i, "model": asdict(m),
                         "observed_over_predicted": None if np.isnan(ratio) else ratio,
                         "model_over_planned": moved}
                        for i, (m, ratio, moved) in enumerate(zip(devices, device_ratios, since_planned))],
            "workload_drift": drift,
            "volume_ratio": volume,
            "migration_bandwidth_bytes_per_s": self._bandwidth,
            "recalibrations": [asdict(r) for r in records],
            "last_applied": None if last_applied is None else asdict(last_applied),
            "engines": engines,
            "lost_devices": lost,
            "telemetry": telemetry,
        }

    # --- helpers -----------------------------------------------------------------------------------

    def _plan(self, loads: np.ndarray, policy: str, devices: list[pl.DeviceModel] | None = None,
              activity: np.ndarray | None = None) -> pl.Placement:
        """`policy`'s placement for `loads` (vibe also weighs `activity`, see `placement.plan`); vibe with a
        slot budget that leaves lost devices empty while any are lost."""
        devices = devices or self.device_models()
        if self._lost:
            # Uneven slot counts, none on lost devices: only vibe's budgeted packing places that. Replicas of an
            # expert go to distinct devices, so the survivors hold at most (alive - 1) x E of them (with
            # num_redundant above that, a replicated app that lost all but one device was never re-placed).
            alive = self.pool.num_devices - len(self._lost)
            redundant = min(self.config.num_redundant, (alive - 1) * self.shape.num_experts)
            budget = self._lost_budget(self.shape.num_experts + redundant)
            return pl.plan(loads, devices, "vibe", num_redundant=redundant, slot_budget=budget, activity=activity)
        if policy == "contiguous":
            return pl.plan(loads, devices, policy)
        budget = self.config.slot_budget if policy == "vibe" else None
        return pl.plan(loads, devices, policy, num_redundant=self.config.num_redundant, slot_budget=budget,
                       activity=activity)

    def _lost_budget(self, num_slots: int) -> np.ndarray:
        """int [G]: the most slots per layer each device may hold while some are lost: none on those, an even
        split of `num_slots` over the others (at least the configured slot_budget)."""
        alive = self.pool.num_devices - len(self._lost)
        per_device = max(-(-num_slots // alive), self.config.slot_budget or 0)
        return np.array([0 if d in self._lost else per_device for d in range(self.pool.num_devices)])

    @staticmethod
    def _imbalance(times: np.ndarray, lost: set[int]) -> np.ndarray:
        """Imbalance over the devices not lost: survivors in perfect balance read as 1, not G / alive (the lost
        devices' zero times counted in the mean raised VibeLayerImbalance for a balanced app)."""
        live = [d for d in range(times.shape[-1]) if d not in lost]
        return pl.imbalance(times[..., live] if live else times)

    def _uniform_loads(self) -> np.ndarray:
        """float [L, E]: every expert equally loaded, what placements start from before any traffic."""
        return np.ones((self.shape.num_layers, self.shape.num_experts))

    @staticmethod
    def _keys_per_device(placement: pl.Placement) -> dict[int, list[tuple[int, int]]]:
        return {d: sorted(placement.experts_on(d)) for d in range(placement.num_devices)}


def _time_ratio(old: pl.DeviceModel, new: pl.DeviceModel, tokens: np.ndarray) -> float | None:
    """`new`'s time over `old`'s, their geometric mean over `tokens` where both take time (None where neither does)."""
    before, after = old.latency(tokens), new.latency(tokens)
    timed = (before > 0) & (after > 0)
    return float(np.exp(np.mean(np.log(after[timed] / before[timed])))) if timed.any() else None


def _identity(info: WorkerInfo) -> tuple:
    """What changes when a worker process is replaced (its data-plane addresses, its actor name)."""
    return info.actor_name, info.tcp_address, info.unix_address
