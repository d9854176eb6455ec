"""DispatchingExperts and DispatchContext against transformers' eager experts loop, without Ray."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from placement import Placement
from service.dispatch import (
    DispatchConfig,
    DispatchContext,
    DispatchError,
    DispatchingExperts,
    LocalChannel,
    SocketChannel,
)
from service.emulator import EmulationConfig
from service.experts import checksum
from service.messages import ExpertTensors, SyncReply
from service.placement_sync import PlacementSync
from service.transport import WorkerServer
from service.worker import ExpertWorker, WorkerConfig

HIDDEN, INTER, E, L, G = 16, 8, 8, 2, 4


@pytest.fixture(scope="module")
def reference() -> list[Qwen3MoeExperts]:
    """Per MoE layer, transformers' experts module with random weights, running its eager loop."""
    config = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=E, hidden_act="silu")
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    layers = []
    for _ in range(L):
        module = Qwen3MoeExperts(config)
        torch.nn.init.normal_(module.gate_up_proj, std=0.3)
        torch.nn.init.normal_(module.down_proj, std=0.3)
        layers.append(module.eval())
    return layers


def expert_items(reference, keys) -> list[ExpertTensors]:
    items = []
    for layer, expert in keys:
        tensors = {"gate_up": reference[layer].gate_up_proj[expert].detach().clone(),
                   "down": reference[layer].down_proj[expert].detach().clone()}
        items.append(ExpertTensors(layer, expert, tensors, checksum(tensors)))
    return items


def make_worker(reference, index: int, keys, emulation: EmulationConfig | None = None) -> ExpertWorker:
    # keep this process's torch thread count: the worker sets it for its own process
    worker = ExpertWorker(WorkerConfig(index=index, num_threads=torch.get_num_threads(), emulation=emulation))
    worker.import_experts(expert_items(reference, keys))
    return worker


class RecordingChannel:
    """A LocalChannel that records (layer, experts, counts) of every request."""

    def __init__(self, worker: ExpertWorker) -> None:
        self.inner = LocalChannel(worker)
        self.requests: list[tuple[int, list[int], list[int]]] = []
        self.closed = False

    def submit(self, seq, layer, experts, counts, tokens) -> None:
        self.requests.append((layer, experts.tolist(), counts.tolist()))
        self.inner.submit(seq, layer, experts, counts, tokens)

    def result(self):
        return self.inner.result()

    def close(self) -> None:
        self.closed = True


def all_keys() -> list[tuple[int, int]]:
    return [(layer, expert) for layer in range(L) for expert in range(E)]


def full_channels(reference, num_devices: int = G) -> dict[int, RecordingChannel]:
    """Every device holds every expert, so any placement can be served."""
    return {g: RecordingChannel(make_worker(reference, g, all_keys())) for g in range(num_devices)}


def contiguous(version: int = 0) -> Placement:
    return Placement.from_expert_devices(np.tile(np.arange(E) * G // E, (L, 1)), G, version)


def routing(num_tokens: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, H], top_k_index [T, k] (distinct per token), top_k_weights [T, k]."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=generator)
    logits = torch.randn(num_tokens, E, generator=generator)
    weights, index = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return hidden, index, weights / weights.sum(-1, keepdim=True)


def run(module: DispatchingExperts, reference, layer: int, num_tokens: int, top_k: int, seed: int = 1):
    hidden, index, weights = routing(num_tokens, top_k, seed)
    with torch.no_grad():
        return module(hidden, index, weights), reference[layer](hidden, index, weights)


@pytest.mark.parametrize("num_tokens,top_k", [(1, 1), (5, 2), (33, 4), (64, 8)])
@pytest.mark.parametrize("expert_device", ["contiguous", "shuffled", "one_device"])
def test_matches_eager_loop_bit_for_bit(reference, num_tokens, top_k, expert_device):
    rng = np.random.default_rng(num_tokens)
    devices = {"contiguous": np.tile(np.arange(E) * G // E, (L, 1)),
               "shuffled": rng.integers(0, G, size=(L, E)),
               "one_device": np.full((L, E), 2)}[expert_device]
    context = DispatchContext(Placement.from_expert_devices(devices, G), full_channels(reference))
    for layer in range(L):
        got, want = run(DispatchingExperts(layer, E, context), reference, layer, num_tokens, top_k, seed=layer)
        assert torch.equal(got, want)


def test_one_request_per_device_with_only_its_experts(reference):
    channels = full_channels(reference)
    context = DispatchContext(contiguous(), channels)
    hidden, index, weights = routing(40, 2, seed=3)
    DispatchingExperts(1, E, context)(hidden, index, weights)
    hits = np.bincount(index.reshape(-1).numpy(), minlength=E)
    for g, channel in channels.items():
        assert len(channel.requests) == (1 if hits[2 * g:2 * g + 2].sum() else 0)
        for layer, experts, counts in channel.requests:
            assert layer == 1
            assert all(e // 2 == g for e in experts)
            assert counts == [int(hits[e]) for e in experts] and min(counts) > 0


def replicated_placement(share_first: float) -> Placement:
    """Contiguous placement plus a replica of expert 1 (held by device 0) on device 3, in every layer."""
    base = contiguous()
    phy2log = np.concatenate([base.phy2log, np.full((L, 1), 1)], axis=1)
    slot_device = np.concatenate([base.slot_device, np.full((L, 1), G - 1)], axis=1)
    share = np.ones(phy2log.shape)
    share[:, 1] = share_first  # slot 1 holds expert 1 on device 0
    share[:, -1] = 1 - share_first
    return Placement(phy2log, slot_device, share, E, G, version=1)


@pytest.mark.parametrize("share_first", [0.25, 0.5, 0.8])
def test_replicated_expert_splits_tokens_by_share(reference, share_first):
    channels = full_channels(reference)
    context = DispatchContext(replicated_placement(share_first), channels)
    got, want = run(DispatchingExperts(0, E, context), reference, 0, 64, 4, seed=5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    hidden, index, _ = routing(64, 4, seed=5)
    num_pairs = int((index == 1).sum())
    first = dict(zip(*channels[0].requests[0][1:]))[1]
    second = dict(zip(*channels[G - 1].requests[0][1:]))[1]
    assert first == int(np.floor(num_pairs * share_first + 0.5))
    assert first + second == num_pairs


def test_placement_and_channels_change_only_at_step_boundary(reference):
    channels = full_channels(reference)
    context = DispatchContext(contiguous(version=0), channels)
    module = DispatchingExperts(0, E, context)
    everything_on_3 = Placement.from_expert_devices(np.full((L, E), 3), G, version=1)
    hidden, index, weights = routing(16, 2, seed=7)
    context.begin_step()
    context.set_placement(everything_on_3)
    module(hidden, index, weights)
    assert context.pinned_version == 0
    assert len(channels[0].requests) == 1  # still the old placement inside the step
    context.end_step()
    context.begin_step()
    assert context.pinned_version == 1
    module(hidden, index, weights)
    context.end_step()
    assert len(channels[0].requests) == 1 and len(channels[3].requests) == 2

    replacement = {g: RecordingChannel(make_worker(reference, g, all_keys())) for g in range(G)}
    replacement[0] = channels[0]  # kept across the change
    context.set_channels(replacement, workers_epoch=4)
    assert not any(channel.closed for channel in channels.values())
    module(hidden, index, weights)  # outside a step: pins the newest for this call
    assert len(replacement[3].requests) == 1 and len(channels[3].requests) == 2
    assert [channels[g].closed for g in range(G)] == [False, True, True, True]  # retired ones closed
    assert context.drain_report("engine").workers_epoch == 4


def test_report_acknowledges_what_the_engine_serves(reference):
    context = DispatchContext(contiguous(version=0), full_channels(reference))
    module = DispatchingExperts(0, E, context)
    hidden, index, weights = routing(4, 2, seed=3)
    context.begin_step()
    context.set_placement(contiguous(version=1))
    module(hidden, index, weights)
    assert context.drain_report("engine").placement_version == 0  # the open step still serves v0
    context.end_step()
    assert context.drain_report("engine").placement_version == 1  # idle: the next step can only use v1
    context.set_placement(contiguous(version=2))
    assert context.drain_report("engine").placement_version == 2


def test_rejects_placement_of_wrong_shape_or_without_channels(reference):
    context = DispatchContext(contiguous(), full_channels(reference))
    with pytest.raises(ValueError, match="layers"):
        context.set_placement(Placement.from_expert_devices(np.zeros((L + 1, E), dtype=int), G))
    with pytest.raises(ValueError, match=r"devices \[3\]"):
        context.set_channels({g: LocalChannel(make_worker(reference, g, [])) for g in range(3)})
    with pytest.raises(RuntimeError):
        context.end_step()


def test_report_holds_router_counts_and_device_samples(reference):
    context = DispatchContext(contiguous(version=3), full_channels(reference))
    modules = [DispatchingExperts(layer, E, context) for layer in range(L)]
    expected = []
    for step in range(3):
        context.begin_step()
        counts = np.zeros((L, E), dtype=np.int64)
        for layer, module in enumerate(modules):
            hidden, index, weights = routing(10 + step, 2, seed=10 * step + layer)
            module(hidden, index, weights)
            counts[layer] = np.bincount(index.reshape(-1).numpy(), minlength=E)
        context.end_step()
        expected.append(counts)
    report = context.drain_report("engine-a")
    assert report.engine_id == "engine-a" and report.placement_version == 3
    np.testing.assert_array_equal(report.router_counts, np.stack(expected))
    sampled = sum(int(samples.tokens.sum()) for samples in report.device_samples)
    assert sampled == int(np.stack(expected).sum())
    assert all(np.all(samples.seconds > 0) for samples in report.device_samples)
    empty = context.drain_report("engine-a")
    assert empty.router_counts.shape == (0, L, E) and empty.device_samples == ()


def test_buffers_keep_only_the_newest(reference):
    context = DispatchContext(contiguous(), full_channels(reference), config=DispatchConfig(max_steps=2, max_samples=3))
    module = DispatchingExperts(0, E, context)
    for seed in range(5):
        hidden, index, weights = routing(4 + seed, 1, seed=seed)
        context.begin_step()
        module(hidden, index, weights)
        context.end_step()
    report = context.drain_report("e")
    assert report.router_counts.shape == (2, L, E)
    assert report.router_counts[-1, 0].sum() == 8  # the last step had 8 tokens, top-1
    assert all(len(samples.tokens) <= 3 for samples in report.device_samples)
    with pytest.raises(ValueError, match="max_steps"):
        DispatchConfig(max_steps=0)


def _steps(context: DispatchContext, module: DispatchingExperts, seeds) -> None:
    for seed in seeds:
        hidden, index, weights = routing(4 + seed, 1, seed=seed)
        context.begin_step()
        module(hidden, index, weights)
        context.end_step()


def test_restore_puts_a_failed_reports_statistics_back_before_newer_ones(reference):
    context = DispatchContext(contiguous(), full_channels(reference), config=DispatchConfig(max_steps=3, max_samples=5))
    module = DispatchingExperts(0, E, context)
    _steps(context, module, [0, 1])
    context._unreachable.add(2)
    failed = context.drain_report("e")
    _steps(context, module, [2])
    context.restore(failed)
    report = context.drain_report("e")
    assert report.unreachable == (2,)
    # the two drained passes (4 and 5 tokens, top-1) before the newer one (6 tokens)
    assert report.router_counts[:, 0].sum(axis=1).tolist() == [4, 5, 6]
    assert sum(int(s.tokens.sum()) for s in report.device_samples) == 15
    # beyond the bounds the oldest go: 3 more passes keep the newest 3 rows, and at most 5 samples a device
    _steps(context, module, [3, 4, 5])
    context.restore(report)
    report = context.drain_report("e")
    assert report.router_counts[:, 0].sum(axis=1).tolist() == [7, 8, 9]
    assert all(len(s.tokens) <= 5 for s in report.device_samples)


def test_a_failed_report_is_sent_again_with_the_next_one(reference):
    context = DispatchContext(contiguous(), full_channels(reference))
    module = DispatchingExperts(0, E, context)
    sent, fail = [], [True]

    def report(r):
        if fail[0]:
            raise TimeoutError("coordinator restarting")
        sent.append(r)
        return SyncReply(placement=None, workers=None, workers_epoch=-1)

    sync = PlacementSync("e", context, report, node_id=None)
    _steps(context, module, [0])
    with pytest.raises(TimeoutError):
        sync.sync_once()
    _steps(context, module, [1])
    fail[0] = False
    sync.sync_once()
    assert sent[0].router_counts[:, 0].sum(axis=1).tolist() == [4, 5]
    assert sum(int(s.tokens.sum()) for s in sent[0].device_samples) == 9


def test_no_tokens_sends_nothing(reference):
    channels = full_channels(reference)
    context = DispatchContext(contiguous(), channels)
    out = DispatchingExperts(0, E, context)(torch.zeros(0, HIDDEN), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, HIDDEN)
    assert all(not channel.requests for channel in channels.values())


class FailingChannel(RecordingChannel):
    def __init__(self, worker, fail_at: str) -> None:
        super().__init__(worker)
        self.fail_at = fail_at

    def submit(self, seq, layer, experts, counts, tokens) -> None:
        if self.fail_at == "submit":
            raise ConnectionError("link down")
        super().submit(seq, layer, experts, counts, tokens)

    def result(self):
        reply = super().result()
        if self.fail_at == "result":
            raise ConnectionError("reply lost")
        if self.fail_at == "malformed":  # a row short: the later devices' replies were left unread (a review)
            return reply[0][1:], reply[1]
        return reply


@pytest.mark.parametrize("fail_at", ["submit", "result", "malformed"])
def test_device_failure_names_device_and_layer_and_keeps_others_in_step(reference, fail_at):
    channels = full_channels(reference)
    channels[2] = FailingChannel(make_worker(reference, 2, all_keys()), fail_at)
    context = DispatchContext(contiguous(), channels)
    module = DispatchingExperts(1, E, context)
    hidden, index, weights = routing(32, 4, seed=2)
    with pytest.raises(DispatchError, match="device 2 failed at MoE layer 1") as failure:
        module(hidden, index, weights)
    assert (failure.value.device, failure.value.layer) == (2, 1)
    if fail_at == "malformed":  # reported: the coordinator probes a device that answers out of protocol
        assert context.drain_report("e0").unreachable == (2,)
    channels[2].fail_at = "never"
    got, want = run(module, reference, 1, 32, 4, seed=2)  # every stream is still in step
    assert torch.equal(got, want)


def test_missing_expert_on_worker_is_a_dispatch_error(reference):
    channels = full_channels(reference)
    channels[1] = LocalChannel(make_worker(reference, 1, []))
    context = DispatchContext(contiguous(), channels)
    hidden = torch.randn(4, HIDDEN)
    index = torch.tensor([[2, 3]] * 4)
    with pytest.raises(DispatchError, match="device 1 failed at MoE layer 0"):
        DispatchingExperts(0, E, context)(hidden, index, torch.full((4, 2), 0.5))


@pytest.fixture
def servers(reference, tmp_path):
    started = [WorkerServer(make_worker(reference, g, all_keys()), unix_path=str(tmp_path / f"w{g}.sock"))
               for g in range(G)]
    yield started
    for server in started:
        server.close()


def test_socket_channels_match_local_and_fail_fast_when_a_worker_is_gone(reference, servers):
    channels = {g: SocketChannel(server.unix_address if g % 2 else server.tcp_address, timeout_s=5.0)
                for g, server in enumerate(servers)}
    context = DispatchContext(contiguous(), channels)
    module = DispatchingExperts(0, E, context)
    got, want = run(module, reference, 0, 48, 4, seed=9)
    assert torch.equal(got, want)
    servers[3].close()
    with pytest.raises(DispatchError, match="device 3 failed at MoE layer 0"):
        run(module, reference, 0, 48, 4, seed=9)
    for channel in channels.values():
        channel.close()


def test_a_socket_channel_connects_again_after_a_worker_was_too_slow_once(reference, servers):
    """A receive that timed out closes the connection; calls fail at once for reconnect_after_s, however often
    the step is retried meanwhile, then the channel connects again and, the worker having been only slow,
    serves (it used to stay closed: every later step failed until the worker was replaced)."""
    slow = make_worker(reference, 0, all_keys(), emulation=EmulationConfig(fixed_s=0.5, jitter=0.0))
    slow_server = WorkerServer(slow)
    channels = {g: SocketChannel(server.unix_address, timeout_s=5.0) for g, server in enumerate(servers)}
    channels[0] = SocketChannel(slow_server.tcp_address, timeout_s=0.2, reconnect_after_s=0.5)
    module = DispatchingExperts(0, E, DispatchContext(contiguous(), channels))
    try:
        with pytest.raises(DispatchError, match="device 0 failed at MoE layer 0.*timed out"):
            run(module, reference, 0, 8, 4, seed=3)
        failed = time.monotonic()
        slow.set_emulated_speed(100.0)  # 5 ms calls once the one that timed out is done (its reply goes nowhere)
        deadline, fast_failures = failed + 10, 0
        while True:  # retried every 50 ms, as the engine retries a step
            try:
                got, want = run(module, reference, 0, 8, 4, seed=3)
                break
            except DispatchError as exc:  # at once, or a call queued behind the slow one timing out again
                assert time.monotonic() < deadline, f"never connected again: {exc}"
                fast_failures += "connecting again 0.5 s after that" in str(exc)
                time.sleep(0.05)
        assert torch.equal(got, want) and fast_failures >= 5 and time.monotonic() - failed >= 0.5
    finally:
        for channel in channels.values():
            channel.close()
        slow_server.close()


def test_placement_set_from_another_thread_never_splits_a_step(reference):
    channels = full_channels(reference)
    context = DispatchContext(contiguous(), channels)
    modules = [DispatchingExperts(layer, E, context) for layer in range(L)]
    on_device = [Placement.from_expert_devices(np.full((L, E), g), G) for g in (0, 3)]
    stop = threading.Event()

    def publish() -> None:
        version = 1
        while not stop.is_set():
            context.set_placement(on_device[version % 2].with_version(version))
            version += 1

    context.set_placement(on_device[0])  # no step may see the initial, spread-out placement
    publisher = threading.Thread(target=publish)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # let the publisher run between any two layers
    publisher.start()
    try:
        hidden, index, weights = routing(6, 2, seed=4)
        for _ in range(30):
            before = {g: len(channels[g].requests) for g in (0, 3)}
            context.begin_step()
            for module in modules:
                module(hidden, index, weights)
            context.end_step()
            sent = {g: len(channels[g].requests) - before[g] for g in (0, 3)}
            assert sorted(sent.values()) == [0, L]  # every layer of the step on the same device
    finally:
        stop.set()
        publisher.join()
        sys.setswitchinterval(switch_interval)
