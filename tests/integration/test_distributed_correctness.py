"""Greedy decoding through 4 Ray expert-worker actors gives exactly the single-process model's tokens,
before and after experts move between workers, and with a replicated expert splitting its tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from placement import Placement
from service.checkpoint import load_layout, read_experts
from service.dispatch import DispatchContext, SocketChannel
from service.model import load_engine_model, load_reference_model
from service.worker import WorkerConfig
from service.worker_actor import ExpertWorkerActor
from tests.tiny_models import (
    LLAMA4_ARCHITECTURES,
    TINY_ARCHITECTURES,
    as_int_packed,
    save_tiny_fp8_model,
    save_tiny_model,
    save_tiny_mxfp4_model,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

G = 4
NEW_TOKENS = 12
EMBEDDED_MODEL = Path(__file__).resolve().parents[2] / "deploy" / "models" / "vibe-tiny-moe"


@pytest.fixture(scope="module")
def workers():
    """G expert-worker actors for a model's expert layout, on a fresh 2-CPU cluster: the actors of one kind of
    expert (SwiGLU with SiLU: every model but GPT-OSS, Nemotron-H and Gemma 4) are shared by the models of this
    module."""
    ray.init(num_cpus=2, include_dashboard=False)
    started = {}

    def for_layout(layout, keep_quantized: bool = False):
        kind = (layout.hidden_act, layout.clamped_swiglu, keep_quantized)
        if kind not in started:
            # five kinds of G actors (SiLU, Gemma 4's GELU, GPT-OSS, Nemotron-H's relu2, held quantized) at 0.05 CPU
            # take 1.0 of the 2 CPUs: the actors of one more kind would wait forever if they did not fit
            actors = [ExpertWorkerActor.options(num_cpus=0.05, max_concurrency=4).remote(
                WorkerConfig(index=g, hidden_act=layout.hidden_act, clamped_swiglu=layout.clamped_swiglu,
                             keep_quantized=keep_quantized))
                for g in range(G)]
            started[kind] = actors, ray.get([actor.info.remote() for actor in actors])
        return started[kind]

    try:
        yield for_layout
        ray.get([actor.shutdown.remote() for actors, _ in started.values() for actor in actors])
    finally:
        ray.shutdown()


def checkpoint(name: str, tmp_path_factory) -> Path:
    if name == "gpt_oss-mxfp4":  # as OpenAI released gpt-oss: the workers dequantize the experts
        return save_tiny_mxfp4_model(tmp_path_factory.mktemp(name), seed=2)
    if name == "deepseek_v3-fp8":  # as DeepSeek released V3 and R1: FP8 with block scales
        return save_tiny_fp8_model("deepseek_v3", tmp_path_factory.mktemp(name), seed=2)
    if name == "deepseek_v3-int4":  # as Kimi-K2-Thinking's release: INT4 experts, compressed-tensors' format
        return as_int_packed(save_tiny_model("deepseek_v3", tmp_path_factory.mktemp(name), seed=2))
    if name != "vibe-tiny-moe":
        return save_tiny_model(name, tmp_path_factory.mktemp(name), seed=2)
    assert (EMBEDDED_MODEL / "config.json").is_file(), f"{EMBEDDED_MODEL} is committed; it must be there"
    return EMBEDDED_MODEL


def prompt_batches(vocab_size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab_size, shape, generator=generator) for shape in ((2, 6), (1, 11))]


def greedy(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, do_sample=False) for ids in batches]


def assert_same_tokens(engine, reference_tokens, batches) -> None:
    for got, want in zip(greedy(engine, batches), reference_tokens):
        assert torch.equal(got, want)


def move_experts(actors, old: Placement, new: Placement) -> list[set]:
    """Copy every expert `new` places on a device that does not hold it yet, from a device holding it
    under `old` (export -> ObjectRef -> import); returns per device the keys to drop afterwards."""
    imports = []
    for device in range(G):
        missing = new.experts_on(device) - old.experts_on(device)
        by_source: dict[int, list] = {}
        for layer, expert in sorted(missing):
            by_source.setdefault(int(old.devices_of(layer, expert)[0]), []).append((layer, expert))
        for source, keys in by_source.items():
            exported = actors[source].export_experts.remote(keys)
            imports.append(actors[device].import_experts.remote(exported))
    ray.get(imports)
    return [old.experts_on(device) - new.experts_on(device) for device in range(G)]


def migrated(placement: Placement) -> Placement:
    """Every expert of layer 0 moves to the next device; layer >= 1 swaps its first and last expert."""
    expert_device = placement.slot_device[np.arange(placement.num_layers)[:, None], np.argsort(placement.phy2log)]
    expert_device[0] = (expert_device[0] + 1) % G
    expert_device[1:, [0, -1]] = expert_device[1:, [-1, 0]]
    return Placement.from_expert_devices(expert_device, G, placement.version + 1)


def with_replica(placement: Placement, router_counts: np.ndarray) -> Placement:
    """`placement` plus a second replica, on the next device, of each layer's hottest expert (half of
    its tokens each)."""
    hottest = router_counts.sum(axis=0).argmax(axis=1)  # [L]
    layers = np.arange(placement.num_layers)
    holder = placement.slot_device[layers, np.argmax(placement.phy2log == hottest[:, None], axis=1)]
    device = np.concatenate([placement.slot_device, ((holder + 1) % G)[:, None]], axis=1)
    phy2log = np.concatenate([placement.phy2log, hottest[:, None]], axis=1)
    share = np.where(phy2log == hottest[:, None], 0.5, 1.0)
    order = np.argsort(device, axis=1, kind="stable")  # keep slots device-major
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return Placement(take(phy2log), take(device), take(share), placement.num_experts, G, placement.version + 1)


# "-held": the workers keep the FP8 or INT4 experts as stored, and the migrations move them so
@pytest.mark.parametrize("name", [*TINY_ARCHITECTURES, *LLAMA4_ARCHITECTURES, "gpt_oss-mxfp4", "deepseek_v3-fp8",
                                  "deepseek_v3-fp8-held", "deepseek_v3-int4-held", "vibe-tiny-moe"])
def test_greedy_tokens_match_through_migration_and_replicas(workers, tmp_path_factory, name):
    folder = checkpoint(name.removesuffix("-held"), tmp_path_factory)
    layout = load_layout(folder)
    actors, infos = workers(layout, keep_quantized=name.endswith("-held"))

    # the actors are shared by the models of this module, and keys do not name the model
    ray.get([actor.drop_experts.remote(ray.get(actor.held_experts.remote())) for actor in actors])
    placement = Placement.from_expert_devices(
        np.tile(np.arange(layout.num_experts) * G // layout.num_experts, (layout.num_moe_layers, 1)), G)
    ray.get([actor.load_experts.remote(str(folder), sorted(placement.experts_on(g)))
             for g, actor in enumerate(actors)])
    if name.endswith("-held"):  # the workers hold, and the migrations below move, quantized weights and their scales
        stored = read_experts(folder, [(layer, e) for layer in range(layout.num_moe_layers)
                                       for e in range(layout.num_experts)], quantized=True)
        assert sum(ray.get(actor.telemetry.remote()).expert_bytes for actor in actors) == sum(
            t.numel() * t.element_size() for item in stored for t in item.tensors.values())
    channels = {info.index: SocketChannel(info.unix_address, timeout_s=30) for info in infos}
    context = DispatchContext(placement, channels)
    engine = load_engine_model(folder, context=context).model
    reference = load_reference_model(folder)
    batches = prompt_batches(reference.config.vocab_size)
    reference_tokens = greedy(reference, batches)

    assert_same_tokens(engine, reference_tokens, batches)

    moved = migrated(placement)
    stale = move_experts(actors, placement, moved)
    context.set_placement(moved)
    assert_same_tokens(engine, reference_tokens, batches)
    ray.get([actors[g].drop_experts.remote(sorted(stale[g])) for g in range(G) if stale[g]])
    assert_same_tokens(engine, reference_tokens, batches)
    assert context.pinned_version == moved.version

    replicated = with_replica(moved, context.drain_report("engine").router_counts)
    move_experts(actors, moved, replicated)
    context.set_placement(replicated)
    assert_same_tokens(engine, reference_tokens, batches)
    assert context.pinned_version == replicated.version
    for channel in channels.values():
        channel.close()
