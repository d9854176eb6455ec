"""Expert layouts, reading selected experts from safetensors checkpoints, and model-path checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, LlamaConfig

import service.checkpoint as checkpoint
from service.checkpoint import ExpertLayout, expert_layout, load_layout, read_experts, resolve_checkpoint
from service.experts import checksum
from service.model import ffn_block
from tests.tiny_models import (
    MXFP4_QUANTIZATION,
    TINY_ARCHITECTURES,
    as_int_packed,
    build_tiny_model,
    int_packed_quantization,
    save_tiny_fp8_model,
    save_tiny_model,
    save_tiny_mxfp4_model,
    tiny_config,
)

FORMATS = {"per_expert": {}, "per_expert_sharded": {"max_shard_size": "40KB"},
           "fused_sharded": {"fused": True, "max_shard_size": "40KB"}, "fused": {"fused": True}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {(arch, fmt): save_tiny_model(arch, root / f"{arch}-{fmt}", seed=3, **kwargs)
            for arch in TINY_ARCHITECTURES for fmt, kwargs in FORMATS.items()}


@pytest.mark.parametrize("architecture,moe_layers,num_experts,top_k,intermediate", [
    ("qwen3_moe", (0, 2), 8, 4, 32),  # layer 1 is in mlp_only_layers
    ("qwen2_moe", (1, 3), 8, 2, 32),  # decoder_sparse_step 2
    ("mixtral", (0, 1), 8, 2, 32),
    ("olmoe", (0, 1), 16, 4, 32),
    ("deepseek_v2", (1, 2), 8, 2, 32),  # first_k_dense_replace 1
    ("deepseek_v3", (1, 2), 8, 2, 32),
    ("deepseek_v32", (1, 2), 8, 2, 32),
    ("glm_moe_dsa", (1, 2, 3), 8, 2, 32),  # mlp_layer_types from first_k_dense_replace 1
    ("mistral4", (1, 2), 8, 2, 32),  # first_k_dense_replace 1
    ("hy_v3", (1, 2), 8, 2, 32),  # mlp_layer_types dense, sparse, sparse
    ("glm4v_moe", (1, 2), 8, 2, 32),  # the language model of a vision-language config, first_k_dense_replace 1
    ("qwen3_vl_moe", (1, 2), 8, 2, 24),  # the same, layer 0 in mlp_only_layers
    ("glm4_moe", (1, 2), 8, 2, 32),
    ("glm4_moe_lite", (1, 2), 8, 2, 32),  # mlp_layer_types dense, sparse, sparse
    ("minimax_m2", (0, 1), 8, 2, 32),
    ("ernie4_5_moe", (1, 3), 8, 2, 32),  # from layer 1, every other layer
    ("dots1", (1, 2), 8, 2, 32),
    ("gpt_oss", (0, 1), 8, 2, 32),
    ("hunyuan_v1_moe", (0, 1), 8, 2, 32),  # moe_topk given per layer
    ("phimoe", (0, 1), 8, 2, 32),
    ("solar_open", (0, 1), 8, 2, 32),
    ("afmoe", (1, 2), 8, 2, 32),  # num_dense_layers 1
    ("exaone_moe", (1, 2, 3), 8, 2, 32),  # first_k_dense_replace 1
    ("mimo_v2_flash", (1, 2), 8, 2, 32),
    ("qwen3_next", (0, 1, 2, 3), 8, 2, 32),  # decoder_sparse_step 1
    ("qwen3_5_moe", (0, 1, 2, 3), 8, 2, 32),  # the language model of a vision-language config  # mlp_layer_types dense, sparse, sparse
    ("laguna", (1, 2), 8, 2, 32),  # mlp_layer_types dense, sparse, sparse
    ("cohere2_moe", (1, 2), 8, 2, 32),  # first_k_dense_replace 1, as mlp_layer_types
    ("flex_olmo", (0, 1), 8, 2, 32),
    ("nemotron_h", (1, 4), 8, 2, 32),  # "ME*-E": mamba, moe, attention, mlp, moe; relu2 experts without a gate
    ("granitemoehybrid", (0, 1, 2), 8, 2, 32),  # every layer MoE, Mamba2 or attention
    ("granitemoe", (0, 1), 8, 2, 32),
    ("granitemoeshared", (0, 1), 8, 2, 32),
    ("gemma4", (0, 1, 2), 8, 2, 32),  # the language model of a vision-language config, every layer MoE
    ("kimi_linear", (1, 2), 8, 2, 32),  # mlp_layer_types from first_k_dense_replace 1 (KDA, MLA, KDA)
    ("minimax", (0, 1, 2), 8, 2, 32),  # every layer MoE (lightning, softmax, lightning)
])
def test_layout_of_each_architecture(architecture, moe_layers, num_experts, top_k, intermediate):

    layout = expert_layout(tiny_config(architecture))
    clamped = (1.702, 7.0) if architecture == "gpt_oss" else None  # GPT-OSS's clamped SwiGLU
    gated = architecture != "nemotron_h"
    act = {"gemma4": "gelu_pytorch_tanh", "nemotron_h": "relu2"}.get(architecture, "silu")  # (Gemma 4's: GeGLU)
    assert layout == ExpertLayout(architecture, moe_layers, num_experts, top_k, 64, intermediate, act, "float32",
                                  clamped, gated)
    assert layout.params_per_expert == (3 if gated else 2) * 64 * intermediate + (2 * intermediate + 64 if clamped else 0)
    model = build_tiny_model(architecture)
    with_experts = tuple(i for i, layer in enumerate(model.model.layers) if hasattr(ffn_block(layer), "experts"))
    assert with_experts == moe_layers


@pytest.mark.parametrize("architecture", ["mistral3", "mistral_large4"])
def test_layout_refuses_the_moe_architectures_it_cannot_serve_exactly_saying_why(architecture):
    with pytest.raises(ValueError, match=f"^{architecture}: not supported \\(.+\\)$"):
        expert_layout(AutoConfig.for_model(architecture))


def test_layout_of_gemma4_refuses_its_dense_releases_and_what_is_not_a_causal_lm():
    """Gemma 4: a folder of the language model alone reads as the vision-language release does (its experts' GeGLU
    activation, `top_k_experts`); a dense Gemma 4 (no MoE block) has nothing to place, a model whose every layer
    shares another's keys and values (an assistant) and text attending both ways are refused by name."""
    from transformers import Gemma4TextConfig

    from tests.tiny_models import gemma4_text_config

    text = expert_layout(tiny_config("gemma4_text"))
    assert text == ExpertLayout("gemma4_text", (0, 1, 2), 8, 2, 64, 32, "gelu_pytorch_tanh", "float32")
    with pytest.raises(ValueError, match="^gemma4: a dense Gemma 4 \\(enable_moe_block false: no routed experts\\) has "
                                         "nothing to place"):
        expert_layout(Gemma4TextConfig(**gemma4_text_config(enable_moe_block=False)))
    with pytest.raises(ValueError, match="^gemma4: num_kv_shared_layers 3 of 3 layers is not supported"):
        expert_layout(Gemma4TextConfig(**gemma4_text_config(num_kv_shared_layers=3)))
    with pytest.raises(ValueError, match="^gemma4: use_bidirectional_attention 'all' is not supported"):
        expert_layout(Gemma4TextConfig(**gemma4_text_config(use_bidirectional_attention="all")))


def test_layout_refuses_per_layer_top_k_that_differ_and_a_phimoe_window_its_attention_does_not_pass():
    hunyuan = tiny_config("hunyuan_v1_moe")
    hunyuan.moe_topk = [2, 4]  # HunYuanMoEV1Gate reads it per layer; the layout has one top_k
    with pytest.raises(ValueError, match="experts per token differ"):
        expert_layout(hunyuan)
    hunyuan.moe_topk = 3
    assert expert_layout(hunyuan).top_k == 3
    phimoe = tiny_config("phimoe")  # its window lives in the mask only, which the engine's attention ignores
    phimoe.sliding_window = 16
    with pytest.raises(ValueError, match="phimoe: a sliding window \\(16\\)"):
        expert_layout(phimoe)
    phimoe.sliding_window = phimoe.max_position_embeddings  # as Phi-3.5-MoE: a window that limits nothing
    assert expert_layout(phimoe).moe_layers == (0, 1)


def test_layout_rejects_other_architectures_and_bad_values():
    with pytest.raises(ValueError, match="'llama'"):
        expert_layout(LlamaConfig())
    with pytest.raises(ValueError, match="moe_layers"):
        ExpertLayout("mixtral", (1, 0), 8, 2, 64, 32, "silu", "float32")
    with pytest.raises(ValueError, match="top_k"):
        ExpertLayout("mixtral", (0,), 2, 3, 64, 32, "silu", "float32")
    with pytest.raises(ValueError, match="dtype"):
        ExpertLayout("mixtral", (0,), 8, 2, 64, 32, "silu", "float99")
    awq = tiny_config("deepseek_v3")  # quantizations the workers cannot read are refused, naming the method
    awq.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 128}
    with pytest.raises(ValueError, match="quantized checkpoints \\(awq\\) are not supported.*bf16"):
        expert_layout(awq)
    mxfp4 = tiny_config("mixtral")  # MXFP4 is read for GPT-OSS's experts only
    mxfp4.quantization_config = dict(MXFP4_QUANTIZATION)
    with pytest.raises(ValueError, match="quantized checkpoints \\(mxfp4\\) are not supported"):
        expert_layout(mxfp4)
    dense = tiny_config("granitemoehybrid")  # Granite 4.0's hybrid models without experts are dense ones
    dense.num_local_experts = 0
    with pytest.raises(ValueError, match="granitemoehybrid: num_local_experts 0 is a dense model"):
        expert_layout(dense)
    gpt_oss = tiny_config("gpt_oss")
    gpt_oss.quantization_config = {**MXFP4_QUANTIZATION, "quant_method": "bitsandbytes_4bit"}
    with pytest.raises(ValueError, match="quantized checkpoints \\(bitsandbytes_4bit\\) are not supported"):
        expert_layout(gpt_oss)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_read_experts_is_bit_identical_to_the_fused_tensors(checkpoints, architecture, fmt):

    folder = checkpoints[architecture, fmt]
    layout = load_layout(folder)
    model = build_tiny_model(architecture, seed=3)
    keys = [(1, 5), (0, 0), (1, layout.num_experts - 1), (0, 3)]
    items = read_experts(folder, keys)
    assert [(item.layer, item.expert) for item in items] == keys
    for item in items:
        experts = ffn_block(model.model.layers[layout.moe_layers[item.layer]]).experts
        if not layout.gated:  # Nemotron-H: up and down
            assert sorted(item.tensors) == ["down", "up"]
            assert torch.equal(item.tensors["up"], experts.up_proj[item.expert])
            assert torch.equal(item.tensors["down"], experts.down_proj[item.expert])
            continue
        assert torch.equal(item.tensors["gate_up"], experts.gate_up_proj[item.expert])
        assert torch.equal(item.tensors["down"], experts.down_proj[item.expert])
        assert item.tensors["gate_up"].is_contiguous() and item.tensors["down"].is_contiguous()
        assert item.checksum == checksum(item.tensors)
        if layout.clamped_swiglu is not None:  # GPT-OSS: and the biases
            assert sorted(item.tensors) == ["down", "down_bias", "gate_up", "gate_up_bias"]
            assert torch.equal(item.tensors["gate_up_bias"], experts.gate_up_proj_bias[item.expert])
            assert torch.equal(item.tensors["down_bias"], experts.down_proj_bias[item.expert])


def test_read_experts_reads_qwen3_vl_moe_experts_transposed_as_its_releases_store_them(tmp_path):
    """Qwen3-VL-MoE's releases store each layer's experts fused and transposed (`gate_up_proj` [E, H, 2I],
    `down_proj` [E, I, H]; transformers transposes them as it loads, save_pretrained writes them untransposed):
    read_experts transposes them back, bit-identical to the model's and to what transformers loads."""
    from safetensors.torch import load_file

    from service.model import load_reference_model

    folder = save_tiny_model("qwen3_vl_moe", tmp_path / "m", seed=3)
    tensors = load_file(folder / "model.safetensors")
    for name in [name for name in tensors if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[name] = tensors[name].transpose(1, 2).contiguous()  # as released
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    layout, model, loaded = load_layout(folder), build_tiny_model("qwen3_vl_moe", seed=3), load_reference_model(folder)
    for item in read_experts(folder, [(0, 1), (1, 7)]):
        for experts in (model.model.layers[layout.moe_layers[item.layer]].mlp.experts,
                        loaded.model.layers[layout.moe_layers[item.layer]].mlp.experts):
            assert torch.equal(item.tensors["gate_up"], experts.gate_up_proj[item.expert])
            assert torch.equal(item.tensors["down"], experts.down_proj[item.expert])


@pytest.mark.parametrize("architecture", ["deepseek_v3", "minimax_m2"])
def test_read_experts_dequantizes_fp8_as_transformers_does(tmp_path, architecture):
    """DeepSeek-V3's and MiniMax-M2's FP8 releases: per-expert FP8 weights with a float32 scale per block, read
    and dequantized per expert, equal the weights transformers dequantizes them to, bit for bit; an FP8 weight
    without its scale is named."""
    from service.model import load_reference_model

    folder = save_tiny_fp8_model(architecture, tmp_path / architecture, seed=5)
    layout = load_layout(folder)
    model = load_reference_model(folder)
    for item in read_experts(folder, [(0, 0), (1, 7), (0, 5)]):
        experts = model.model.layers[layout.moe_layers[item.layer]].mlp.experts
        assert torch.equal(item.tensors["gate_up"], experts.gate_up_proj[item.expert])
        assert torch.equal(item.tensors["down"], experts.down_proj[item.expert])
        assert not torch.equal(item.tensors["gate_up"], build_tiny_model(architecture, seed=5).model.layers[
            layout.moe_layers[item.layer]].mlp.experts.gate_up_proj[item.expert])  # (FP8 rounded them)
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    scale = next(name for name in tensors if name.endswith("_scale_inv") and ".experts.0." in name)
    del tensors[scale]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"FP8 weight {scale.removesuffix('_scale_inv')} has no"):
        read_experts(folder, [(layout.moe_layers.index(int(scale.split(".")[2])), 0)])


@pytest.mark.parametrize("block", [16, 24])
def test_fp8_partial_blocks_are_dequantized_with_the_configured_block(tmp_path, block):
    """DeepSeek's quantizer leaves the last blocks of a weight partial (its kv_a_proj_with_mqa is [576, 7168] with a
    [5, 56] grid of 128 x 128 blocks): the grid is ceil(rows / 128) x ceil(cols / 128) and the block is the config's
    weight_block_size. The tiny DeepSeek-V3's kv_a_proj_with_mqa is [24, 64]: in blocks of 16 a [2, 4] grid that
    "divides" it in blocks of 12, the block transformers would infer (audit: rows 12-15 took the next block's scale);
    in blocks of 24 every expert weight ends in partial blocks too. Dense part and experts dequantize to the float
    weights within FP8's rounding, the workers' experts bit for bit as the reference model's; experts held FP8 with
    partial blocks are refused, naming the weight."""
    from service.model import load_reference_model

    folder = save_tiny_fp8_model("deepseek_v3", tmp_path / "fp8", seed=5, block=block)
    float_model, model, layout = build_tiny_model("deepseek_v3", seed=5), load_reference_model(folder), load_layout(folder)

    def close_to_float(got: torch.Tensor, want: torch.Tensor) -> None:  # e4m3: 3 mantissa bits, relative 2^-4
        torch.testing.assert_close(got, want, rtol=2 ** -4 + 1e-6, atol=want.abs().max().item() / 448)

    floats = dict(float_model.named_parameters())
    kv = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert tuple(floats[kv].shape) == (24, 64)
    for name, parameter in model.named_parameters():
        if ".experts." not in name and parameter.dim() == 2 and "embed" not in name and "lm_head" not in name:
            close_to_float(parameter.detach(), floats[name].detach())
    for item in read_experts(folder, [(0, 0), (1, 7)]):
        decoder_layer = layout.moe_layers[item.layer]
        for experts, check in ((model.model.layers[decoder_layer].mlp.experts, torch.equal),
                               (float_model.model.layers[decoder_layer].mlp.experts, close_to_float)):
            assert check(item.tensors["gate_up"], experts.gate_up_proj[item.expert].detach()) is not False
            assert check(item.tensors["down"], experts.down_proj[item.expert].detach()) is not False
    if block == 24:
        with pytest.raises(ValueError, match=r"experts\.0\.gate_proj\.weight \(32, 64\) ends in partial blocks of 24"):
            read_experts(folder, [(0, 0)], quantized=True)
    else:
        assert read_experts(folder, [(0, 0)], quantized=True)[0].tensors["down_scale_inv"].shape == (4, 2)


def test_fp8_scale_grid_that_does_not_match_the_configured_block_is_named(tmp_path):
    """A scale grid that is not ceil(rows / bm) x ceil(cols / bn) of the config's block is refused naming the weight
    (not read with blocks inferred from the grid), as is a malformed weight_block_size or a 1-D scale of many values."""
    import json

    folder = save_tiny_fp8_model("deepseek_v3", tmp_path / "fp8", seed=5, block=16)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [8, 8]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"experts\.0\.gate_proj\.weight \(32, 64\) does not match its scale grid "
                                         r"\(2, 4\) for blocks of 8 x 8 .*expected \(4, 8\)"):
        read_experts(folder, [(0, 0)])
    config["quantization_config"]["weight_block_size"] = [16]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weight_block_size must be two positive integers"):
        read_experts(folder, [(0, 0)])
    from service.quantization import dequantize_fp8
    with pytest.raises(ValueError, match=r"FP8 weight weight \(4, 4\): its scale must be one value or a 2-D grid"):
        dequantize_fp8(torch.zeros(4, 4).to(torch.float8_e4m3fn), torch.ones(4), torch.float32)


@pytest.mark.parametrize("name", ["deepseek_v3-fp8", "minimax_m2-fp8", "gpt_oss-mxfp4"])
def test_read_experts_keeps_quantized_experts_as_stored(tmp_path, name):
    """With quantized=True an expert comes as the checkpoint stores it (FP8 with its block scales, MXFP4 blocks
    and scales), a quarter to a half of its dequantized bytes, and dequantizes, at any compute dtype, to the
    weights transformers loads at that dtype, bit for bit; other checkpoints read the same either way."""
    from service.experts import expert_weight
    from service.model import load_reference_model

    architecture, method = name.split("-")
    folder = (save_tiny_mxfp4_model(tmp_path / name, seed=5) if method == "mxfp4"
              else save_tiny_fp8_model(architecture, tmp_path / name, seed=5))
    layout = load_layout(folder)
    keys = [(0, 0), (1, 7), (0, 5)]
    held, plain = read_experts(folder, keys, quantized=True), read_experts(folder, keys)
    stored = {"gate_up", "gate_up_scale_inv", "down", "down_scale_inv"} if method == "fp8" else {
        "gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales", "gate_up_bias", "down_bias"}
    for dtype in ("float32", "bfloat16"):
        model = load_reference_model(folder, dtype=dtype)
        for item, whole in zip(held, plain, strict=True):
            assert set(item.tensors) == stored and item.checksum == checksum(item.tensors)
            if method == "fp8":
                assert item.tensors["gate_up"].dtype == torch.float8_e4m3fn
                assert item.tensors["gate_up_scale_inv"].shape == (2 * layout.intermediate_size // 8,
                                                                   layout.hidden_size // 8)
            nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors.values())  # noqa: E731
            assert nbytes(item.tensors) < 0.3 * nbytes(whole.tensors)  # float32 experts: FP8 a quarter and scales
            experts = model.model.layers[layout.moe_layers[item.layer]].mlp.experts
            for weight, param in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj)):
                dequantized = expert_weight(item.tensors, weight, getattr(torch, dtype))
                assert dequantized.dtype == param.dtype and torch.equal(dequantized, param[item.expert])
                if dtype == "float32":
                    assert torch.equal(dequantized, whole.tensors[weight])
    unquantized = save_tiny_model("qwen3_moe", tmp_path / "plain", seed=5)
    assert [item.checksum for item in read_experts(unquantized, keys, quantized=True)] == [
        item.checksum for item in read_experts(unquantized, keys)]


def test_quantized_experts_dequantize_to_the_compute_dtype_not_the_checkpoints(tmp_path):
    """A bf16 FP8 release (DeepSeek-V3's config says bfloat16) served in float32: its experts dequantize
    straight to float32, as transformers loads them at float32, not rounded to bf16 on the way."""
    from service.model import load_reference_model

    folder = save_tiny_fp8_model("deepseek_v3", tmp_path / "fp8", seed=5)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    layout = load_layout(folder)
    experts = load_reference_model(folder, dtype="float32").model.layers[layout.moe_layers[1]].mlp.experts
    (as_float32,), (as_bf16,) = read_experts(folder, [(1, 7)], dtype=torch.float32), read_experts(folder, [(1, 7)])
    assert torch.equal(as_float32.tensors["gate_up"], experts.gate_up_proj[7])
    assert as_bf16.tensors["gate_up"].dtype == torch.bfloat16
    assert not torch.equal(as_bf16.tensors["gate_up"].float(), experts.gate_up_proj[7])


def test_read_experts_dequantizes_mxfp4_as_transformers_does(tmp_path):
    """GPT-OSS as OpenAI released it: the experts' MXFP4 blocks and scales read per expert and dequantized
    equal the weights transformers dequantizes them to, bit for bit, in the checkpoint's dtype and in bf16."""
    from service.model import load_reference_model

    folder = save_tiny_mxfp4_model(tmp_path / "mxfp4", seed=4)
    layout = load_layout(folder)
    assert layout.architecture == "gpt_oss" and layout.clamped_swiglu == (1.702, 7.0)
    model = load_reference_model(folder)
    keys = [(0, 0), (1, 7), (0, 5)]
    for item in read_experts(folder, keys):
        experts = model.model.layers[layout.moe_layers[item.layer]].mlp.experts
        for name, param in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj),
                            ("gate_up_bias", experts.gate_up_proj_bias), ("down_bias", experts.down_proj_bias)):
            assert item.tensors[name].dtype == torch.float32 and torch.equal(item.tensors[name], param[item.expert])
        assert len(item.tensors["gate_up"].unique()) > 16  # FP4 values times several scales
    from service.quantization import dequantize_mxfp4
    blocks = torch.randint(0, 256, (6, 2, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scales = torch.full((6, 2), 127 - 3, dtype=torch.uint8)
    as_bf16 = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    assert as_bf16.shape == (64, 6) and torch.equal(as_bf16.float(), dequantize_mxfp4(blocks, scales, torch.float32))
    low = blocks[0, 0, 0] & 0x0F  # the first value of row 0 is its first byte's low nibble, scaled by 2**-3
    assert as_bf16[0, 0].item() == [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6][low] / 8


@pytest.mark.parametrize("bits, group_size", [(4, 16), (8, None)])
def test_read_experts_reads_pack_quantized_experts_as_compressed_tensors_does(tmp_path, bits, group_size):
    """Kimi-K2-Thinking's release format (compressed-tensors' pack-quantized INT4 experts, a scale per 32 columns;
    here also INT8 with a scale per row): experts read dequantized, and held as stored then dequantized at a call,
    equal the weights transformers loads through compressed-tensors, bit for bit, in an eighth (a quarter) of
    the float32 bytes plus the scales."""
    from service.experts import expert_weight
    from service.model import load_reference_model

    folder = as_int_packed(save_tiny_model("deepseek_v3", tmp_path / "int", seed=5), bits, group_size)
    layout = load_layout(folder)
    model = load_reference_model(folder)
    keys = [(0, 0), (1, 7), (0, 5)]
    for held, whole in zip(read_experts(folder, keys, quantized=True), read_experts(folder, keys), strict=True):
        assert set(held.tensors) == {f"{w}_{part}" for w in ("gate_up", "down") for part in ("packed", "scale", "shape")}
        assert held.tensors["gate_up_packed"].dtype == torch.int32 and held.checksum == checksum(held.tensors)
        assert held.tensors["gate_up_shape"].tolist() == [2 * layout.intermediate_size, layout.hidden_size]
        assert held.tensors["down_scale"].shape == (layout.hidden_size, layout.intermediate_size // group_size
                                                    if group_size else 1)
        nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors.values())  # noqa: E731
        assert nbytes(held.tensors) < (0.2 if bits == 4 else 0.3) * nbytes(whole.tensors)
        experts = model.model.layers[layout.moe_layers[held.layer]].mlp.experts
        for weight, param in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj)):
            assert torch.equal(whole.tensors[weight], param[held.expert])
            assert torch.equal(expert_weight(held.tensors, weight, torch.float32), param[held.expert])
        assert len(whole.tensors["down"].unique()) > 2 ** bits  # integers times several scales


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits, group_size, cols", [(4, 32, 64), (8, 16, 64), (4, None, 40), (8, None, 36)])
def test_pack_quantized_weights_dequantize_as_compressed_tensors_decompresses_them(scale_dtype, bits, group_size,
                                                                                     cols):
    """`dequantize_int_packed` against compressed-tensors' own decompression of weights its `pack_to_int32`
    packed, columns padded to a word or not, bf16 (Kimi-K2-Thinking's) or float32 scales: bit for bit in the
    scale's dtype, then cast to the compute dtype; a misfit scale is named."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from service.quantization import dequantize_int_packed

    gen, rows = torch.Generator().manual_seed(bits + cols), 24
    values = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (rows, cols), dtype=torch.int8, generator=gen)
    scale = (torch.rand(rows, cols // group_size if group_size else 1, generator=gen) / 7).to(scale_dtype)
    packed = pack_to_int32(values, bits)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group" if group_size else "channel",
                            group_size=group_size)
    expected = PackedQuantizationCompressor.decompress(
        {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor([rows, cols])},
        QuantizationScheme(targets=["Linear"], weights=args))["weight"]
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize_int_packed(packed, scale, (rows, cols), dtype), expected.to(dtype))
    with pytest.raises(ValueError, match="is not a pack-quantized"):
        dequantize_int_packed(packed, scale[:-1], (rows, cols), torch.float32)


def test_read_experts_reads_nvfp4_experts_as_compressed_tensors_decompresses_them(tmp_path):
    """compressed-tensors' NVFP4 experts (FP4 values, an FP8 scale per 16 columns, a float32 global scale per
    weight): read dequantized, and held as stored (a quarter of bf16's bytes and their scales) then dequantized at
    a call, they equal compressed-tensors' own decompression bit for bit (and are near the weights they came from;
    transformers 5.24's load of them is not, which is why the reference is the library's decompression)."""
    from safetensors.torch import load_file

    from service.experts import expert_weight
    from tests.tiny_models import as_nvfp4, nvfp4_decompressed

    folder = as_nvfp4(save_tiny_model("qwen3_moe", tmp_path / "nvfp4", seed=5))
    layout = load_layout(folder)
    reference = load_file(nvfp4_decompressed(folder, tmp_path / "reference") / "model.safetensors")
    original = build_tiny_model("qwen3_moe", seed=5)
    keys = [(0, 0), (1, 7), (0, 5)]
    for held, whole in zip(read_experts(folder, keys, quantized=True), read_experts(folder, keys), strict=True):
        assert set(held.tensors) == {f"{w}_{part}" for w in ("gate_up", "down") for part in ("packed", "scale",
                                                                                           "global_scale")}
        assert held.tensors["gate_up_packed"].dtype == torch.uint8 and held.tensors["down_scale"].dtype == torch.float8_e4m3fn
        nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors.values())  # noqa: E731
        assert nbytes(held.tensors) < 0.2 * nbytes(whole.tensors)  # float32 experts: FP4 an eighth, and scales
        prefix = f"model.layers.{layout.moe_layers[held.layer]}.mlp.experts.{held.expert}."
        gate_up = torch.cat([reference[prefix + "gate_proj.weight"], reference[prefix + "up_proj.weight"]]).float()
        for weight, expected in (("gate_up", gate_up), ("down", reference[prefix + "down_proj.weight"].float())):
            assert torch.equal(whole.tensors[weight], expected)
            assert torch.equal(expert_weight(held.tensors, weight, torch.float32), expected)
        experts = original.model.layers[layout.moe_layers[held.layer]].mlp.experts
        torch.testing.assert_close(whole.tensors["down"], experts.down_proj[held.expert], atol=0.1, rtol=0)


@pytest.mark.parametrize("global_scale", [torch.tensor([123.4]), torch.linspace(50.0, 900.0, 24)])
def test_nvfp4_weights_dequantize_as_compressed_tensors_decompresses_them(global_scale):
    """`dequantize_nvfp4` against `NVFP4PackedCompressor.decompress` of random packed values and FP8 scales: bit
    for bit at float32 and bf16, with one global scale or one per row (a stacked gate and up: each row as its
    own weight's); a misfit scale is named."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from service.quantization import dequantize_nvfp4

    gen, rows, cols = torch.Generator().manual_seed(0), 24, 64
    packed = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(rows, cols // 16, generator=gen) * 3 + 0.1).to(torch.float8_e4m3fn)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16))
    rows_of = [slice(r, r + 1) for r in range(rows)] if global_scale.numel() > 1 else [slice(0, rows)]
    expected = torch.cat([NVFP4PackedCompressor.decompress(
        {"weight_packed": packed[r], "weight_scale": scale[r], "weight_global_scale": global_scale[r][:1]
         if global_scale.numel() > 1 else global_scale}, scheme)["weight"] for r in rows_of])
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize_nvfp4(packed, scale, global_scale, dtype), expected.to(dtype))
    with pytest.raises(ValueError, match="NVFP4 weight"):
        dequantize_nvfp4(packed, scale[:, :-1], global_scale, torch.float32)


def test_compressed_tensors_checkpoints_other_than_weight_only_symmetric_int_experts_are_refused():
    """What the workers would not dequantize as compressed-tensors does is refused by name: asymmetric or
    3-bit weights, quantized activations (but NVFP4's), another format, NVFP4 in groups other than 16."""
    config = tiny_config("deepseek_v3")
    for change, message in ((dict(symmetric=False), "asymmetric"), (dict(num_bits=3), "3-bit int weights"),
                            (dict(strategy="tensor"), "strategy 'tensor'")):
        quantization = int_packed_quantization()
        quantization["config_groups"]["group_0"]["weights"].update(change)
        config.quantization_config = quantization
        with pytest.raises(ValueError, match=message):
            expert_layout(config)
    quantization = int_packed_quantization()
    quantization["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int"},
                                                    format="int-quantized")
    config.quantization_config = quantization
    with pytest.raises(ValueError, match="format 'int-quantized', not 'pack-quantized' or 'nvfp4-pack-quantized'; "
                                         "group_0: activations are"):
        expert_layout(config)
    quantization = int_packed_quantization()
    quantization["config_groups"]["group_0"].update(format="nvfp4-pack-quantized", weights={
        "num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 32})
    config.quantization_config = quantization
    with pytest.raises(ValueError, match="NVFP4 weights must be 4-bit floats in groups of 16"):
        expert_layout(config)


@pytest.mark.parametrize("actorder, refused", [(True, True), ("GROUP", True), ("dynamic", True), ("random", True),
                                               (None, False), (False, False), ("weight", False), ("Static", False)])
def test_activation_ordering_by_group_is_refused_however_it_is_written(actorder, refused):
    """Only actorder "group" was refused: true (older compressed-tensors' spelling of it), "GROUP" and "dynamic" (its
    alias) passed, and experts with per-column g_idx were read with each column's scale taken by position, silently
    wrong (a review). Ordering by weight (no g_idx stored) reads as it did."""
    config = tiny_config("deepseek_v3")
    quantization = int_packed_quantization()
    quantization["config_groups"]["group_0"]["weights"]["actorder"] = actorder
    config.quantization_config = quantization
    if refused:
        with pytest.raises(ValueError, match="activation ordering"):
            expert_layout(config)
    else:
        expert_layout(config)


def _rewrite(folder: Path, tensors=None, **config) -> Path:
    """`folder`'s checkpoint with ``tensors`` (name -> tensor, None: deleted) and config.json entries changed."""
    from safetensors.torch import load_file

    if tensors:
        stored = load_file(folder / "model.safetensors")
        for name, tensor in tensors.items():
            stored.pop(name) if tensor is None else stored.__setitem__(name, tensor)
        save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    settings = json.loads((folder / "config.json").read_text()) | config
    (folder / "config.json").write_text(json.dumps(settings))
    return folder


def test_packed_experts_are_checked_against_the_configs_sizes_when_the_app_is_built(tmp_path):
    """Packed INT4 and NVFP4 experts were only checked to be there: experts of another intermediate size than
    config.json's were served with their own (bf16 and FP8 ones were refused; a review). A g_idx is refused too."""
    from tests.tiny_models import as_nvfp4

    for folder in (as_int_packed(save_tiny_model("deepseek_v3", tmp_path / "int4"), 4, 16),
                   as_nvfp4(save_tiny_model("deepseek_v3", tmp_path / "nvfp4"))):
        checkpoint.check_checkpoint(folder)
        stored = load_layout(folder).intermediate_size
        _rewrite(folder, moe_intermediate_size=stored // 2)
        with pytest.raises(ValueError, match=rf"holds a \[{stored}, .*expected \[{stored // 2}, "):
            checkpoint.check_checkpoint(folder)
    folder = as_int_packed(save_tiny_model("deepseek_v3", tmp_path / "g_idx"), 4, 16)
    with safe_open(folder / "model.safetensors", "pt") as file:
        name = next(n for n in file.keys() if n.endswith("weight_shape"))  # noqa: SIM118 (a handle, not a dict)
    _rewrite(folder, {name.replace("_shape", "_g_idx"): torch.zeros(8, dtype=torch.int32)})
    with pytest.raises(ValueError, match="_g_idx .activation ordering by group"):
        checkpoint.check_checkpoint(folder)
    _rewrite(folder, {name.replace("_shape", "_g_idx"): None, name: None})
    with pytest.raises(ValueError, match="has no .*weight_shape"):
        checkpoint.check_checkpoint(folder)


def test_gpt_oss_fp8_experts_are_refused_when_the_app_is_built():
    """GPT-OSS under quant_method fp8 passed the checks and failed at its first expert call (its scales were never
    read; transformers' FP8 experts take no biases; a review)."""
    config = tiny_config("gpt_oss")
    config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(ValueError, match="gpt_oss: FP8 experts are not supported"):
        expert_layout(config)


def test_an_expert_is_priced_at_the_mean_over_layers_stored_differently(tmp_path):
    """A checkpoint that leaves a MoE layer's experts unquantized (an ignore list) had every migration priced as
    that first layer's experts (a review)."""
    from safetensors.torch import load_file

    from service.experts import ExpertStore
    from service.worker import WorkerConfig, held_expert_bytes, read_held

    plain = load_file(save_tiny_model("deepseek_v3", tmp_path / "plain") / "model.safetensors")
    folder = as_int_packed(save_tiny_model("deepseek_v3", tmp_path / "mixed"), 4, 16)
    layout = load_layout(folder)
    first = f"model.layers.{layout.moe_layers[0]}.mlp.experts."
    stored = load_file(folder / "model.safetensors")
    changes = {name: None for name in stored if name.startswith(first)}
    changes |= {name: tensor for name, tensor in plain.items() if name.startswith(first)}
    _rewrite(folder, changes)
    assert len(layout.moe_layers) >= 2 and checkpoint.storage_groups(folder) == [(0, 1), (1, len(layout.moe_layers) - 1)]
    config = WorkerConfig(0, dtype="bfloat16", keep_quantized=True)
    per_layer = []
    for layer in range(len(layout.moe_layers)):
        store = ExpertStore("cpu", torch.bfloat16)
        store.add(read_held(config, str(folder), [(layer, 0)]))
        per_layer.append(store.held_bytes())
    assert per_layer[0] > per_layer[1] and held_expert_bytes(config, str(folder)) == round(sum(per_layer) / len(per_layer))
    assert checkpoint.storage_groups(tmp_path / "plain") == [(0, len(layout.moe_layers))]


class RecordingFile:
    """A safe_open handle that records the tensor names read from it."""

    def __init__(self, handle, names: list[str]) -> None:
        self._handle, self._names = handle, names

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._handle.__exit__(*exc_info)

    def keys(self):
        return self._handle.keys()

    def get_tensor(self, name):
        self._names.append(name)
        return self._handle.get_tensor(name)

    def get_slice(self, name):
        self._names.append(name)
        return self._handle.get_slice(name)


@pytest.mark.parametrize("fmt", ["per_expert", "fused"])
def test_read_experts_reads_only_the_requested_experts(checkpoints, monkeypatch, fmt):
    names: list[str] = []
    monkeypatch.setattr(checkpoint, "safe_open", lambda path, framework: RecordingFile(safe_open(path, framework), names))
    read_experts(checkpoints["mixtral", fmt], [(1, 6)])
    if fmt == "per_expert":
        assert sorted(names) == [f"model.layers.1.block_sparse_moe.experts.6.{w}.weight" for w in ("w1", "w2", "w3")]
    else:
        assert sorted(names) == ["model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]


def test_read_experts_rejects_bad_keys_and_folders(checkpoints, tmp_path):
    folder = checkpoints["olmoe", "per_expert"]
    with pytest.raises(ValueError, match="layer 2, expert 0"):
        read_experts(folder, [(2, 0)])
    with pytest.raises(ValueError, match="expert 16"):
        read_experts(folder, [(0, 16)])
    with pytest.raises(ValueError, match="does not exist"):
        read_experts(tmp_path / "nowhere", [(0, 0)])


def test_read_experts_names_an_expert_missing_from_the_checkpoint(checkpoints, tmp_path):
    source = checkpoints["qwen3_moe", "per_expert"]
    with safe_open(source / "model.safetensors", framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys() if ".experts.4." not in name}  # noqa: SIM118
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    assert read_experts(tmp_path, [(0, 3)])[0].expert == 3
    with pytest.raises(ValueError, match="expert 4 of decoder layer 2"):
        read_experts(tmp_path, [(1, 4)])


def test_read_experts_refuses_shards_outside_the_folder(checkpoints, tmp_path):
    source = checkpoints["mixtral", "per_expert_sharded"]
    for file in source.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"] = {name: "../" + shard for name, shard in index["weight_map"].items()}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the folder"):
        read_experts(tmp_path, [(0, 0)])


def test_resolve_checkpoint_only_inside_allowed_roots(tmp_path):
    root, other = tmp_path / "models", tmp_path / "elsewhere"
    for folder in (root / "tiny", other / "secret"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (root / "escape").symlink_to(other / "secret")
    assert resolve_checkpoint("tiny", [other, root]) == (root / "tiny").resolve()
    assert resolve_checkpoint(root / "tiny", [root]) == (root / "tiny").resolve()
    for bad in ("Qwen/Qwen3-30B-A3B", "../elsewhere/secret", "escape", str(other / "secret"), root, "missing"):
        with pytest.raises(ValueError, match="not a checkpoint folder inside the allowed folders"):
            resolve_checkpoint(bad, [root])
    with pytest.raises(ValueError, match="no allowed model folders"):
        resolve_checkpoint("tiny", [])
    # and why (audit: one message for three causes)
    (root / "afile").write_text("x")
    (root / "empty").mkdir()
    for bad, reason in (("escape", f"it resolves to '{other / 'secret'}' \\(symlinks followed\\): add its folder"),
                        ("afile", "it is a file"), ("empty", "has no config.json"), ("missing", "no such folder")):
        with pytest.raises(ValueError, match=reason):
            resolve_checkpoint(bad, [root])


def test_layout_and_cache_of_a_config_shaped_as_gemma_4_26b_a4b():
    """Gemma 4's MoE release (gemma-4-26B-A4B, a vision-language config): 30 layers, each with 128 experts of 704
    (top-8) beside its dense MLP; five sliding layers (8 kv heads of 256) for each full one (2 kv heads of 512, keys
    as values): 220 KiB of keys and values a token in bf16."""
    from transformers import Gemma4Config

    from service.attention import KVCache

    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * 5
    config = Gemma4Config(text_config=dict(
        hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8,
        head_dim=256, global_head_dim=512, num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=1024,
        layer_types=layer_types, final_logit_softcapping=30.0, enable_moe_block=True, num_experts=128,
        top_k_experts=8, moe_intermediate_size=704, hidden_size_per_layer_input=0, vocab_size=262144,
        use_bidirectional_attention="vision", dtype="bfloat16"), vision_config={}, dtype="bfloat16")
    assert expert_layout(config) == ExpertLayout("gemma4", tuple(range(30)), 128, 8, 2816, 704, "gelu_pytorch_tanh",
                                                 "bfloat16")
    heads = KVCache.for_model(config.text_config)
    assert heads["num_kv_heads"] == [8, 8, 8, 8, 8, 2] * 5 and heads["head_dim"] == [256, 256, 256, 256, 256, 512] * 5
    assert KVCache.bytes_per_token(30, dtype=torch.bfloat16, **heads) == 220 * 1024


def test_layout_and_cache_of_a_config_shaped_as_kimi_linear_48b_a3b():
    """Kimi-Linear-48B-A3B, its config given as its release gives it (layers 1-indexed in `linear_attn_config`, dense
    first layer by first_k_dense_replace): 27 layers, of which 7 latent attention (every fourth and the last, latent
    512 + rotary key 64: 7.9 KiB a token in bf16) and 20 KDA (32 heads of 128: a conv state over q, k and v and a
    float32 recurrent state, 2.1 MiB a sequence each); 26 MoE layers of 256 experts of 1024 (top-8)."""
    from service.attention import KVCache
    from service.linear_attention import LinearShape, linear_layers

    full = [4, 8, 12, 16, 20, 24, 27]
    kda = dict(full_attn_layers=full, kda_layers=[n for n in range(1, 28) if n not in full], num_heads=32,
               head_dim=128, short_conv_kernel_size=4)
    config = AutoConfig.for_model("kimi_linear", linear_attn_config=kda, first_k_dense_replace=1, hidden_size=2304,
                                  num_hidden_layers=27, num_experts=256, num_experts_per_token=8,
                                  moe_intermediate_size=1024, kv_lora_rank=512, qk_rope_head_dim=64, q_lora_rank=None,
                                  dtype="bfloat16")
    assert expert_layout(config) == ExpertLayout("kimi_linear", tuple(range(1, 27)), 256, 8, 2304, 1024, "silu",
                                                 "bfloat16")
    heads = KVCache.for_model(config)
    assert heads["num_kv_heads"] == [int(n in full) for n in range(1, 28)] and heads["head_dim"] == 576
    assert KVCache.bytes_per_token(27, dtype=torch.bfloat16, **heads) == 7 * 576 * 2
    assert len(linear_layers(config)) == 20
    shape = LinearShape.of(config)
    assert shape == LinearShape(3 * 32 * 128, 4, (32, 128, 128))
    assert shape.bytes_per_slot(torch.bfloat16) == 3 * 32 * 128 * 4 * 2 + 32 * 128 * 128 * 4


def test_layout_and_cache_of_a_config_shaped_as_minimax_text_01_and_its_window_refused():
    """MiniMax-Text-01 (its transformers-format conversion): 80 layers, lightning attention in seven of eight (64
    heads of 128: a state of 2 MiB a sequence each in bf16, the model's dtype, no convolution), softmax attention in
    the others (8 kv heads of 128: 40 KiB of keys and values a token); 32 experts of 9216 (top-2) in every layer. A
    sliding window on its softmax layers (transformers slides them by it; their layer type says full) is refused."""
    from service.attention import KVCache
    from service.linear_attention import LinearShape, linear_layers

    kinds = (["linear_attention"] * 7 + ["full_attention"]) * 10
    config = AutoConfig.for_model("minimax", hidden_size=6144, num_attention_heads=64, head_dim=128,
                                  num_key_value_heads=8, num_hidden_layers=80, layer_types=kinds, num_local_experts=32,
                                  num_experts_per_tok=2, intermediate_size=9216, vocab_size=200064, dtype="bfloat16")
    assert expert_layout(config) == ExpertLayout("minimax", tuple(range(80)), 32, 2, 6144, 9216, "silu", "bfloat16")
    heads = KVCache.for_model(config)
    assert KVCache.bytes_per_token(80, dtype=torch.bfloat16, **heads) == 40 * 1024
    shape = LinearShape.of(config)
    assert len(linear_layers(config)) == 70 and shape == LinearShape(0, 0, (64, 128, 128), True)
    assert shape.bytes_per_slot(torch.bfloat16) == 2 * 1024 * 1024 and shape.recurrent_dtype(torch.bfloat16) == \
        torch.bfloat16
    windowed = tiny_config("minimax")
    windowed.sliding_window = 16
    with pytest.raises(ValueError, match="^minimax: a sliding window \\(16\\) on its full_attention layers is not"):
        expert_layout(windowed)


def _rescaled(folder: Path, convert) -> None:
    """Rewrite every FP8 block scale of the single-file checkpoint in `folder` with `convert`."""
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith("_scale_inv")]:
        tensors[name] = convert(tensors[name])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_fp8_scales_stored_as_u8_exponents_are_read_as_transformers_reads_them(tmp_path):
    """Block scales stored as U8 E8M0 exponents (2 ** (byte - 127), as transformers' Fp8Dequantize decodes them) were
    read as plain numbers: every expert off by a factor in the thousands, the checkpoint accepted (a review)."""
    from service.model import load_reference_model

    folder = save_tiny_fp8_model("qwen3_moe", tmp_path / "fp8", seed=1, block=8)
    _rescaled(folder, lambda s: (torch.log2(s.float()).round().clamp(-127, 127) + 127).to(torch.uint8))
    checkpoint.check_checkpoint(folder)
    want = load_reference_model(folder).model.layers[0].mlp.experts.gate_up_proj[0]
    torch.testing.assert_close(read_experts(folder, [(0, 0)], dtype=torch.float32)[0].tensors["gate_up"], want)
    _rescaled(folder, lambda s: s.to(torch.int16))  # not a scale format: refused, named
    with pytest.raises(ValueError, match=r"_scale_inv is I16: FP8 block scales must be stored as floats, or as U8"):
        checkpoint.check_checkpoint(folder)


def _edited(folder: Path, to: Path, edit) -> Path:
    """A copy of checkpoint ``folder`` at ``to`` with ``edit(tensors, to)`` applied to its one shard."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(folder, to)
    tensors = load_file(to / "model.safetensors")
    edit(tensors, to)
    save_file(tensors, to / "model.safetensors", metadata={"format": "pt"})
    return to


def test_gpt_oss_experts_are_checked_whole_when_the_app_is_built(tmp_path):
    """The check looked for down_proj twice (a generator's late-bound name) and compared no size: a GPT-OSS folder
    without gate_up_proj failed in a worker, one with 4 of 8 experts as an IndexError, one whose config.json names
    other sizes (which transformers refuses) was served (a review). Bf16 and MXFP4 folders pass."""
    base = save_tiny_model("gpt_oss", tmp_path / "base", seed=1)
    checkpoint.check_checkpoint(base)
    checkpoint.check_checkpoint(save_tiny_mxfp4_model(tmp_path / "mxfp4", seed=4))
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"

    def without(tensors, folder):
        del tensors[gate_up]

    def four_experts(tensors, folder):
        tensors[gate_up] = tensors[gate_up][:4].clone()

    def no_bias(tensors, folder):
        del tensors[gate_up + "_bias"]

    def other_sizes(tensors, folder):
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] //= 2
        (folder / "config.json").write_text(json.dumps(config))

    for edit, message in ((without, "has no model.layers.0.mlp.experts.gate_up_proj"), (four_experts, r"is \[4, "),
                          (no_bias, "gate_up_proj_bias"), (other_sizes, "gate_up_proj is")):
        with pytest.raises(ValueError, match=message):
            checkpoint.check_checkpoint(_edited(base, tmp_path / edit.__name__, edit))


def test_fused_experts_of_an_integer_dtype_are_refused_as_per_expert_ones_are(tmp_path):
    """Fused expert tensors had their shape checked, not their dtype: int8 experts without a quantization config
    passed, and the workers computed with the integers cast to floats (a review)."""
    def as_int8(tensors, folder):
        for name in [name for name in tensors if ".experts." in name]:
            tensors[name] = (tensors[name] * 100).to(torch.int8)

    for fused in (False, True):
        folder = save_tiny_model("qwen3_moe", tmp_path / f"fused{fused}", seed=1, fused=fused)
        with pytest.raises(ValueError, match=r"I8, expected .* (in a float or FP8 dtype|F32)"):
            checkpoint.check_checkpoint(_edited(folder, tmp_path / f"int{fused}", as_int8))


def test_deepseek_v32_moe_layers_follow_mlp_layer_types_as_transformers_does(tmp_path):
    """DeepseekV32DecoderLayer picks MoE or dense by config.mlp_layer_types (first_k_dense_replace's only when it is
    absent); the layers were read from first_k_dense_replace alone, and a checkpoint transformers saves and reloads was
    refused for a dense layer's missing experts (a review)."""
    from transformers import AutoModelForCausalLM, DeepseekV32Config

    config = tiny_config("deepseek_v32").to_dict()
    for key in ("model_type", "transformers_version"):
        config.pop(key, None)
    config["mlp_layer_types"] = ["sparse", "dense", "sparse"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(DeepseekV32Config(**config))
    model.save_pretrained(tmp_path / "dsv32")
    served = [d for d, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert load_layout(tmp_path / "dsv32").moe_layers == tuple(served) == (0, 2)
    checkpoint.check_checkpoint(tmp_path / "dsv32")
