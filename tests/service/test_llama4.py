"""Llama 4 (Scout 17B-16E, Maverick 17B-128E): its expert layout, its fused and transposed experts read for the
workers, and refusals. The engine model and the engine's continuous batching join the architecture-parametrised
tests (tests/service/test_model.py, test_engine.py, test_engine_more_architectures.py)."""

from __future__ import annotations

import pytest
import torch

from service.checkpoint import ExpertLayout, expert_layout, load_layout, read_experts
from service.experts import checksum
from tests.tiny_models import LLAMA4_ARCHITECTURES, build_tiny_model, save_tiny_model, tiny_config

FORMATS = {"single": {}, "sharded": {"max_shard_size": "40KB"}}


@pytest.mark.parametrize("architecture", LLAMA4_ARCHITECTURES)
def test_layout_of_the_language_model(architecture):
    """MoE layers from `moe_layers` (interleaved with dense ones, as Maverick's), top-1; of a vision-language
    config (as both releases are), its text config's."""
    assert expert_layout(tiny_config(architecture)) == ExpertLayout(architecture, (1, 3), 8, 1, 64, 32, "silu",
                                                                    "float32")
    model = build_tiny_model(architecture)
    assert tuple(i for i, layer in enumerate(model.model.layers) if layer.is_moe_layer) == (1, 3)


def test_layout_refuses_top_k_above_one_and_quantized_checkpoints():
    config = tiny_config("llama4")
    config.text_config.num_experts_per_tok = 2  # would need a scaled input per (token, expert) pair
    with pytest.raises(ValueError, match="llama4: num_experts_per_tok 2 is not supported"):
        expert_layout(config)
    config = tiny_config("llama4_text")
    config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(ValueError, match=r"llama4: quantized checkpoints \(fp8\)"):
        expert_layout(config)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("architecture", LLAMA4_ARCHITECTURES)
def test_read_experts_is_bit_identical_to_the_transposed_fused_tensors(tmp_path, architecture, fmt):
    """On disk `feed_forward.experts.gate_up_proj` [E, H, 2I] and `down_proj` [E, I, H] (under
    `language_model.model.layers` in a vision-language checkpoint); read as the workers' [2I, H] and [H, I]."""
    folder = save_tiny_model(architecture, tmp_path / architecture, seed=3, **FORMATS[fmt])
    layout = load_layout(folder)
    model = build_tiny_model(architecture, seed=3)
    keys = [(1, 5), (0, 0), (1, layout.num_experts - 1), (0, 3)]
    items = read_experts(folder, keys)
    assert [(item.layer, item.expert) for item in items] == keys
    for item in items:
        experts = model.model.layers[layout.moe_layers[item.layer]].feed_forward.experts
        assert sorted(item.tensors) == ["down", "gate_up"]
        assert torch.equal(item.tensors["gate_up"], experts.gate_up_proj[item.expert].T)
        assert torch.equal(item.tensors["down"], experts.down_proj[item.expert].T)
        assert item.tensors["gate_up"].is_contiguous() and item.tensors["down"].is_contiguous()
        assert item.checksum == checksum(item.tensors)
