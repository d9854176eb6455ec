"""Migrations across failures: engines that cannot reach a worker, engines the coordinator has not heard from, a
restarted coordinator, migrations and refills that fail half way. The real Coordinator over in-process emulated
workers (LocalWorkerPool), some serving their data plane on sockets, and the engine side (DispatchContext,
PlacementSync) driven by hand. Found by an audit of the migration paths."""

from __future__ import annotations

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
from service.worker_pool import LocalWorkerPool
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
    settings = dict(checkpoint=checkpoint, profile_token_counts=PROFILE_TOKENS, profile_repeats=1, ack_timeout_s=5.0,
                    auto_recalibrate=False) | overrides
    coordinator = Coordinator(CoordinatorConfig(**settings), pool, shape, **({} if clock is None else {"clock": clock}))
    coordinator.start(background=False)
    return coordinator


def _skewed(shape: ModelShape, seed: int, tokens: int = 400) -> np.ndarray:
    weights = np.random.default_rng(seed).pareto(1.5, (shape.num_layers, shape.num_experts)) + 0.05
    return np.round(weights / weights.sum(1, keepdims=True) * tokens)


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
