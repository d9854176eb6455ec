"""Engine side of the coordinator protocol.

A background thread that, every `interval_s`, hands the coordinator the statistics the dispatch
context collected (router counts, device timings: batched, never per token) and applies the answer:
a newer placement or new worker addresses, both taking effect at the engine's next step boundary.
Its report carries the version the engine serves, which is the acknowledgement the coordinator waits
for before dropping old expert copies. Knows nothing of Serve: it is given a `report` callable.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

from placement import Placement
from service.dispatch import DispatchContext, SocketChannel
from service.messages import EngineReport, SyncReply, WorkerInfo

log = logging.getLogger(__name__)

# How long an engine waits for a worker's reply to one MoE layer's call before the step fails (and is retried,
# the worker reported as unreachable, and the coordinator checks it): a GPU answers in milliseconds, so a long
# silence is a hung or lost worker; the margin is wide for emulated workers on a small, loaded CPU.
DATA_PLANE_TIMEOUT_S = 10.0


def worker_channels(workers: Sequence[WorkerInfo], node_id: str | None,
                    timeout_s: float = DATA_PLANE_TIMEOUT_S) -> dict[int, SocketChannel]:
    """One data-plane channel per worker: its Unix socket when on this node, else TCP; a call waits for its
    reply at most ``timeout_s``."""
    channels = {}
    for info in workers:
        local = info.unix_address is not None and info.node_id == node_id
        channels[info.index] = SocketChannel(info.unix_address if local else info.tcp_address, timeout_s)
    return channels


class PlacementSync:
    """Periodically report to the coordinator and apply its placement and worker updates."""

    def __init__(self, engine_id: str, context: DispatchContext, report: Callable[[EngineReport], SyncReply],
                 *, node_id: str | None, interval_s: float = 0.1, data_plane_timeout_s: float = DATA_PLANE_TIMEOUT_S,
                 workers_id: str = ""):
        """`workers_id`: the worker configuration the engine was built for, sent in every report
        (`EngineReport.workers_id`)."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.engine_id = engine_id
        self.workers_id = workers_id
        self.context = context
        self._report = report
        self._node_id = node_id
        self._interval = interval_s
        self._data_plane_timeout_s = data_plane_timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0  # consecutive failed reports (the coordinator may be restarting)
        self._last_success = time.monotonic()
        # One round trip at a time (the thread and the ingress's profiling pass both sync): a late answer
        # must never put back an older placement after a newer one was applied and acknowledged.
        self._sync_lock = threading.Lock()

    def sync_once(self) -> SyncReply:
        """One report/answer round trip; applies the answer. Raises what the report call raises."""
        with self._sync_lock:
            report = self.context.drain_report(self.engine_id)
            try:
                reply = self._report(dataclasses.replace(report, workers_id=self.workers_id) if self.workers_id
                                     else report)
            except BaseException:
                # kept for the next report: a coordinator that is restarting or busy past the call's timeout would
                # otherwise never see the passes served meanwhile (a report it ran but answered late, whose call
                # timed out, is counted again with each later report until one is answered)
                self.context.restore(report)
                raise
            if reply.workers is not None:
                self.context.set_channels(worker_channels(reply.workers, self._node_id, self._data_plane_timeout_s),
                                          reply.workers_epoch)
            if reply.placement is not None:
                self.context.set_placement(Placement.from_dict(reply.placement))
            return reply

    def start(self) -> None:
        """Sync once, then keep syncing in the background. Raises what the first report raises.

        The first round trip runs before this returns, so an engine starts serving on the coordinator's current
        placement: it bootstrapped on the version of that moment, and until its first report the coordinator does
        not know it, so a migration finishing while it loaded its model dropped that version's copies as soon as
        the engines it knew acknowledged the next one (found by an audit).
        """
        self.sync_once()
        self._last_success = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"placement-sync-{self.engine_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sync_once()
                self.failures = 0
                self._last_success = time.monotonic()
            except Exception as exc:  # keep serving on the current placement; retry next interval
                self.failures += 1
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    log.warning("coordinator report failed (%d in a row): %s", self.failures, exc)

    def problem(self, tolerance_s: float = 10.0) -> str | None:
        """A health problem when the coordinator has not answered for `tolerance_s` (None otherwise)."""
        silent = time.monotonic() - self._last_success
        if not self.alive:
            return "the placement sync thread stopped"
        if silent > tolerance_s:
            return (f"coordinator unreachable for {silent:.0f} s: serving placement version "
                    f"{self.context.pinned_version} without recalibration")
        return None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
