"""Serving with redundant expert slots (`num_redundant` > 0) through the real pieces: the embedded tiny MoE model's
experts on emulated expert-worker Ray actors of different speeds (`RayWorkerPool`, wired from `AppArgs` as
`deploy/app.py` wires them), the coordinator over that pool, and an in-process engine that dispatches to the
workers' data plane and reports to the coordinator through `PlacementSync`, calibrated by the ingress's startup
profiling pass (the profile prompts, then `Coordinator.calibrate`).

Checked: the placement the coordinator applies holds replicas with unequal token shares, and is the `vibe` plan
for the loads and device curves it was made from; greedy generation with it gives transformers' `generate`'s
tokens; and every replica of a replicated expert is sent (and its worker computes) exactly the tokens the dispatch
rule (`placement.metrics.replica_tokens`) gives it. The workers count tokens per worker only (`WorkerStats`), not
per expert: the per-expert split is recorded on the engine's channels, and the workers' own token counts confirm
its totals per device.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import placement as pl
from deploy.app import DEFAULT_MODEL, AppArgs, _worker_configs
from placement.metrics import replica_tokens
from service.checkpoint import load_layout
from service.coordinator import Coordinator, CoordinatorConfig, ModelShape
from service.deployments import read_prompts
from service.dispatch import DispatchContext, SocketChannel, device_failed
from service.engine import Engine, EngineConfig
from service.model import load_engine_model, load_reference_model
from service.placement_sync import PlacementSync
from service.sampling import SamplingParams
from service.text import apply_chat_template
from service.tokenizer import load_tokenizer
from service.worker import held_expert_bytes
from service.worker_pool import RayPoolConfig, RayWorkerPool

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NAMESPACE = "test-replica-serving"
SPEEDS = [1.0, 0.85, 0.7, 0.5]  # four emulated devices, each slower than the one before
NUM_REDUNDANT = len(SPEEDS)  # one replica slot per device
PROFILE_PROMPTS = 24  # of the app's profile prompt set, run by the profiling pass as the ingress runs it
PROFILE_MAX_TOKENS = 8  # IngressSettings.profile_max_tokens
MAX_TOKENS = 16
PROMPTS = ["Explain what a dictionary is in Python.", "Write a short note about the weather.",
           "What does the yield keyword do?", "Describe slicing with an example.",
           "How do I sort a list of tuples by their second item?", "What is a context manager?"]


class RecordingChannel(SocketChannel):
    """The engine's data-plane channel to one worker, counting the tokens it sends each (layer, expert) there."""

    def __init__(self, device: int, address: str, sent: Counter, timeout_s: float = 30.0) -> None:
        super().__init__(address, timeout_s)
        self.device, self.sent = device, sent

    def submit(self, seq, layer, experts, counts, tokens) -> None:
        super().submit(seq, layer, experts, counts, tokens)
        for expert, count in zip(experts.tolist(), counts.tolist()):
            self.sent[layer, expert, self.device] += count


def run_engine(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Every prompt's completion tokens, all queued at once and stepped together (continuous batching)."""
    tokens: dict[str, list[int]] = {}
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params)
        tokens[f"r{i}"] = []
    while engine.has_work:
        for output in engine.step():
            assert output.finish_reason in (None, "stop", "length"), output
            tokens[output.request_id] += output.new_token_ids
    return [tokens[f"r{i}"] for i in range(len(prompts))]


def worker_tokens(actors) -> np.ndarray:
    """int [G]: tokens each worker computed since it started (its own `WorkerStats`)."""
    return np.array([stats.tokens for stats in ray.get([actor.stats.remote() for actor in actors])])


@pytest.fixture(scope="module")
def stack():
    """Workers, coordinator and engine as the app wires them, calibrated by the startup profiling pass."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE)
    pool = None
    try:
        args = AppArgs.model_validate({
            "num_devices": len(SPEEDS), "speeds": SPEEDS, "num_redundant": NUM_REDUNDANT, "policy": "vibe",
            # (knee 16: the profiling pass's prefill loads an expert past it, where its replicas' shares matter)
            "emulation": {"fixed_s": 2e-4, "knee_tokens": 16, "jitter": 0.0, "throttle_floor": 1.0},
            "auto_recalibrate": False})  # one placement throughout: the profiling pass's
        checkpoint = str(DEFAULT_MODEL)
        layout = load_layout(checkpoint)
        worker_configs = _worker_configs(args, layout, checkpoint)
        pool = RayWorkerPool(worker_configs, RayPoolConfig(name_prefix="replica-serving", namespace=NAMESPACE,
                                                           detached=False))
        shape = ModelShape(len(layout.moe_layers), layout.num_experts, held_expert_bytes(worker_configs[0], checkpoint))
        coordinator = Coordinator(CoordinatorConfig(checkpoint=checkpoint, policy=args.policy,
                                                    num_redundant=args.num_redundant,
                                                    auto_recalibrate=args.auto_recalibrate), pool, shape)
        coordinator.start(background=False)  # (no loop: the device models stay those the placement was planned on)

        workers, epoch = coordinator.workers()
        sent: Counter = Counter()
        channels = {info.index: RecordingChannel(info.index, info.unix_address or info.tcp_address, sent) for info in workers}
        context = DispatchContext(coordinator.placement, channels, workers_epoch=epoch)
        tokenizer = load_tokenizer(checkpoint)
        engine = Engine(load_engine_model(checkpoint, context=context).model,
                        EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                     max_model_len=1024),
                        tokenizer, hooks=context, retryable=device_failed)
        reports = []

        def report(engine_report):
            reports.append(engine_report)
            return coordinator.report(engine_report)

        sync = PlacementSync("replica-test-engine", context, report, node_id=ray.get_runtime_context().get_node_id())
        sync.sync_once()
        # The ingress's profiling pass (IngressDeployment._profiling_pass): the profile prompts, greedy, then the
        # router counts handed over and the coordinator's first calibration.
        prompts = read_prompts(Path(args.profile_prompts), tokenizer)[:PROFILE_PROMPTS]
        run_engine(engine, prompts, SamplingParams(max_tokens=PROFILE_MAX_TOKENS, temperature=0.0))
        sync.sync_once()
        window = coordinator.stats_view()  # what calibrate plans on: the window's loads and activity
        devices = coordinator.device_models()
        calibration = coordinator.calibrate()
        sync.sync_once()  # the engine switches to the calibrated placement at its next step
        yield SimpleNamespace(coordinator=coordinator, pool=pool, context=context, engine=engine, sync=sync,
                              tokenizer=tokenizer, sent=sent, reports=reports, window=window, devices=devices,
                              calibration=calibration, checkpoint=checkpoint,
                              actors=[ray.get_actor(info.actor_name, namespace=NAMESPACE) for info in workers])
        for channel in channels.values():
            channel.close()
    finally:
        if pool is not None:
            pool.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def served(stack):
    """Greedy completions of PROMPTS on the calibrated placement, with what the engine sent each worker, the router
    counts of each step, and the tokens each worker computed meanwhile."""
    assert stack.context.placement.version == stack.coordinator.placement.version
    stack.sync.sync_once()
    stack.reports.clear()
    stack.sent.clear()
    before = worker_tokens(stack.actors)
    prompts = [apply_chat_template(stack.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    completions = run_engine(stack.engine, prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    computed = worker_tokens(stack.actors) - before
    stack.sync.sync_once()
    assert {r.placement_version for r in stack.reports} == {stack.coordinator.placement.version}
    counts = np.concatenate([r.router_counts for r in stack.reports])  # [S, L, E]
    return SimpleNamespace(prompts=prompts, completions=completions, sent=dict(stack.sent), counts=counts,
                           computed=computed)


def test_the_calibrated_placement_holds_replicas_with_unequal_shares_as_vibe_plans_them(stack):
    placement = stack.coordinator.placement
    assert stack.calibration["status"] == "applied", stack.calibration
    assert placement.version == stack.calibration["to_version"] and placement.num_slots == (
        placement.num_experts + NUM_REDUNDANT)
    replicated = np.argwhere(placement.logcnt > 1)  # [(layer, expert)]
    assert len(replicated), "no expert has a replica"
    # every layer holds NUM_REDUNDANT replicas beyond one slot per expert, on distinct devices
    assert (placement.logcnt.sum(axis=1) == placement.num_slots).all()
    for layer, expert in replicated:
        assert len(set(placement.devices_of(layer, expert).tolist())) == placement.logcnt[layer, expert]
    shares = [np.sort(placement.replica_share[layer][placement.phy2log[layer] == expert])
              for layer, expert in replicated]
    assert all(share.sum() == pytest.approx(1.0) for share in shares)
    # the devices differ in speed: some expert's replicas are given clearly unequal shares of its tokens
    assert max(share[-1] - share[0] for share in shares) > 0.05, shares

    # and they are the vibe plan (replicas, slots, shares) for the loads, activity and device curves it was made from
    window = stack.window
    assert window["loads"] is not None and window["passes_observed"] > 0
    expected = pl.plan(np.array(window["loads"]), stack.devices, "vibe", num_redundant=NUM_REDUNDANT,
                       activity=np.array(window["activity"]))
    np.testing.assert_array_equal(placement.phy2log, expected.phy2log)
    np.testing.assert_array_equal(placement.slot_device, expected.slot_device)
    np.testing.assert_allclose(placement.replica_share, expected.replica_share, rtol=0, atol=1e-12)
    # the device curves differ as the emulated speeds do (the fastest device's flat cost the lowest)
    fixed = [device.fixed for device in stack.devices]
    assert fixed[0] < fixed[-1]


def test_greedy_tokens_with_replicas_equal_transformers_generate(stack, served):
    reference = load_reference_model(stack.checkpoint)
    for ids, got in zip(served.prompts, served.completions):
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=MAX_TOKENS, do_sample=False)
        assert got == out[0, len(ids):].tolist()
    assert sum(map(len, served.completions)) > len(PROMPTS)  # not all ended at their first token
    # (and the run split some replicated expert's tokens among its replicas' workers)
    devices = Counter((layer, expert) for layer, expert, _ in served.sent)
    placement = stack.coordinator.placement
    assert any(placement.logcnt[key] > 1 and n > 1 for key, n in devices.items())


def test_each_replica_of_an_expert_gets_its_share_of_the_tokens_on_its_own_worker(stack, served):
    placement = stack.coordinator.placement
    # what the engine sent each slot, against the dispatch rule applied to each step's router counts
    got = np.zeros((placement.num_layers, placement.num_slots), dtype=np.int64)
    for (layer, expert, device), tokens in served.sent.items():
        slot = np.flatnonzero((placement.phy2log[layer] == expert) & (placement.slot_device[layer] == device))
        assert slot.size == 1, f"layer {layer} expert {expert} sent to device {device}, which does not hold it"
        got[layer, slot[0]] += tokens
    want = replica_tokens(placement, served.counts).sum(axis=0)
    np.testing.assert_array_equal(got, want)
    # every replica of some replicated expert got tokens, each on its own worker
    whole = [(layer, expert) for layer, expert in np.argwhere(placement.logcnt > 1)
             if np.all(got[layer, placement.phy2log[layer] == expert] > 0)]
    assert whole, "no replicated expert had tokens on every one of its replicas"
    # the workers computed what was sent them (their own counters; they count per worker, not per expert) ...
    per_device = placement.per_device(got).sum(axis=0)
    np.testing.assert_array_equal(served.computed, per_device)
    # ... which differs from what they would have computed had every expert's tokens gone to its first replica
    layers = np.arange(placement.num_layers)[:, None]
    first_device = placement.slot_device[layers, placement.log2phy[:, :, 0]]
    first_only = np.bincount(first_device.ravel(), weights=served.counts.sum(axis=0).ravel(),
                             minlength=placement.num_devices)
    assert not np.array_equal(first_only, per_device)
