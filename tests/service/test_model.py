"""The engine model: experts cut out and dispatched to in-process workers, outputs unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from placement import Placement
from service.checkpoint import load_layout
from service.dispatch import DispatchContext, DispatchingExperts, LocalChannel
from service.model import ffn_block, load_engine_model, load_reference_model
from service.worker import ExpertWorker, WorkerConfig
from tests.tiny_models import (
    LLAMA4_ARCHITECTURES,
    TINY_ARCHITECTURES,
    as_int_packed,
    build_tiny_model,
    save_tiny_fp8_model,
    save_tiny_model,
    save_tiny_mxfp4_model,
)

G = 4
FP8 = ("deepseek_v3", "minimax_m2", "qwen3_moe")  # as their FP8 releases: DeepSeek-V3/R1, MiniMax-M2, Qwen3-FP8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {**{arch: save_tiny_model(arch, root / arch, seed=1)
               for arch in (*TINY_ARCHITECTURES, *LLAMA4_ARCHITECTURES, "gemma4_text")},
            "gpt_oss-mxfp4": save_tiny_mxfp4_model(root / "gpt_oss-mxfp4", seed=1),
            **{f"{arch}-fp8": save_tiny_fp8_model(arch, root / f"{arch}-fp8", seed=1) for arch in FP8},
            # blocks of 24 leave partial ones in every weight (DeepSeek-V3's kv_a_proj_with_mqa: [576, 7168] in 128s)
            "deepseek_v3-fp8-partial": save_tiny_fp8_model("deepseek_v3", root / "deepseek_v3-fp8-partial", seed=1,
                                                           block=24),
            # as Kimi-K2-Thinking's release: INT4 experts in compressed-tensors' pack-quantized format
            "deepseek_v3-int4": as_int_packed(save_tiny_model("deepseek_v3", root / "deepseek_v3-int4", seed=1)),
            # as W4A16 releases: the attention and dense MLPs INT4 too (the ingress has transformers dequantize them)
            "qwen3_moe-w4a16": as_int_packed(save_tiny_model("qwen3_moe", root / "qwen3_moe-w4a16", seed=1),
                                             dense=build_tiny_model("qwen3_moe", seed=1))}


def contiguous_placement(folder) -> Placement:
    layout = load_layout(folder)
    expert_device = np.arange(layout.num_experts) * G // layout.num_experts
    return Placement.from_expert_devices(np.tile(expert_device, (layout.num_moe_layers, 1)), G)


def local_context(folder, placement: Placement, keep_quantized: bool = False) -> DispatchContext:
    channels, layout = {}, load_layout(folder)
    for g in range(G):
        worker = ExpertWorker(WorkerConfig(index=g, num_threads=torch.get_num_threads(), hidden_act=layout.hidden_act,
                                           clamped_swiglu=layout.clamped_swiglu, keep_quantized=keep_quantized))
        worker.load_experts(str(folder), sorted(placement.experts_on(g)))
        channels[g] = LocalChannel(worker)
    return DispatchContext(placement, channels)


def prompts(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(batch * length))


# quantized checkpoints: transformers dequantizes the reference model's weights, the workers their experts (as
# they read them, or "held" quantized and dequantized at each call)
@pytest.mark.parametrize("architecture", [*TINY_ARCHITECTURES, "gpt_oss-mxfp4", *(f"{arch}-fp8" for arch in FP8),
                                          "deepseek_v3-fp8-partial", "deepseek_v3-int4", "qwen3_moe-w4a16", "gpt_oss-mxfp4-held", "deepseek_v3-fp8-held",
                                          "deepseek_v3-int4-held", *LLAMA4_ARCHITECTURES, "gemma4_text"])
def test_engine_model_computes_what_the_model_computes(checkpoints, architecture, monkeypatch):
    folder = checkpoints[architecture.removesuffix("-held")]
    context = local_context(folder, contiguous_placement(folder), keep_quantized=architecture.endswith("-held"))
    engine = load_engine_model(folder, context=context)
    reference = load_reference_model(folder)
    layout = engine.layout
    for decoder_layer, layer in enumerate(engine.model.model.layers):
        experts = getattr(ffn_block(layer), "experts", None)
        if decoder_layer in layout.moe_layers:
            assert isinstance(experts, DispatchingExperts)
            assert experts.layer == layout.moe_layers.index(decoder_layer)
        else:
            assert experts is None and type(ffn_block(layer)) is type(ffn_block(reference.model.layers[decoder_layer]))
    assert not any(".experts." in name for name, _ in engine.model.named_parameters())
    routed = layout.num_moe_layers * layout.num_experts * layout.params_per_expert
    assert sum(p.numel() for p in reference.parameters()) - sum(p.numel() for p in engine.model.parameters()) == routed

    ids = prompts()
    if architecture in LLAMA4_ARCHITECTURES:  # transformers runs its experts on every token, the unchosen on zeros
        _check_llama4_logits(engine.model, reference, ids, monkeypatch)
    else:
        with torch.no_grad():
            logits = engine.model(ids).logits
            reference.config._experts_implementation = "eager"
            assert torch.equal(logits, reference(ids).logits)  # the eager loop's order, bit for bit
            reference.config._experts_implementation = "grouped_mm"  # the default
            torch.testing.assert_close(logits, reference(ids).logits, rtol=0, atol=1e-5)
    context.drain_report("e")
    tokens = engine.model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, reference.generate(ids, max_new_tokens=6, do_sample=False))

    # generate ran one forward per new token, each an implicit step covering every MoE layer
    counts = context.drain_report("e").router_counts
    assert counts.shape == (6, layout.num_moe_layers, layout.num_experts)
    assert counts[0].sum(axis=1).tolist() == [ids.numel() * layout.top_k] * layout.num_moe_layers
    assert counts[1:].sum(axis=2).tolist() == [[ids.shape[0] * layout.top_k] * layout.num_moe_layers] * 5


def test_gemma4_engine_model_reads_no_expert_of_its_vision_language_checkpoint(checkpoints, caplog, monkeypatch):
    """Gemma 4's release is a vision-language checkpoint, loaded by a causal LM of its own (a subclass of
    transformers' Gemma4ForCausalLM, `service.text_models`): it is that class that must expect no expert keys, so
    that transformers skips the experts' tensors without reading or reporting them (as unexpected)."""
    from transformers.utils import logging as transformers_logging

    folder = checkpoints["gemma4"]
    monkeypatch.setattr(transformers_logging.get_logger(), "propagate", True)  # (to caplog)
    with caplog.at_level("WARNING"):
        engine = load_engine_model(folder, context=local_context(folder, contiguous_placement(folder)))
    assert type(engine.model).__name__ == "Gemma4TextOnlyForCausalLM"
    assert "experts" not in caplog.text


@pytest.mark.parametrize("held", [False, True])
def test_nvfp4_experts_compute_what_compressed_tensors_decompresses(tmp_path, held):
    """NVFP4 experts (compressed-tensors'), read dequantized or held as stored: the engine model's logits equal,
    bit for bit, and its greedy tokens, those of the model whose experts are compressed-tensors' own decompression
    of them (transformers 5.24 loads such fused experts wrongly, so it is not the reference here)."""
    from tests.tiny_models import as_nvfp4, nvfp4_decompressed

    folder = as_nvfp4(save_tiny_model("qwen3_moe", tmp_path / "nvfp4", seed=1))
    reference = load_reference_model(nvfp4_decompressed(folder, tmp_path / "reference"))
    engine = load_engine_model(folder, context=local_context(folder, contiguous_placement(folder), keep_quantized=held))
    ids = prompts()
    with torch.no_grad():
        reference.config._experts_implementation = "eager"
        assert torch.equal(engine.model(ids).logits, reference(ids).logits)
    tokens = engine.model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, reference.generate(ids, max_new_tokens=6, do_sample=False))


def _check_llama4_logits(engine, reference, ids: torch.Tensor, monkeypatch) -> None:
    """Llama 4's logits equal transformers' up to rounding (a matmul's rounding depends on its number of rows),
    and bit for bit when its experts run on their own tokens only (nonzero rows), as the workers run them."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    def on_their_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.view(self.num_experts, -1, self.hidden_size)  # [E, T, H]
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            rows = x[e].abs().sum(dim=-1).nonzero()[:, 0]
            gate, up = F.linear(x[e, rows], self.gate_up_proj[e].T.contiguous()).chunk(2, dim=-1)
            out[e, rows] = F.linear(F.silu(gate) * up, self.down_proj[e].T.contiguous())
        return out.view(-1, self.hidden_size)

    with torch.no_grad():
        logits = engine(ids).logits
        torch.testing.assert_close(logits, reference(ids).logits, rtol=0, atol=1e-5)
        with monkeypatch.context() as patch:
            patch.setattr(Llama4TextExperts, "forward", on_their_tokens)
            assert torch.equal(logits, reference(ids).logits)


def test_explicit_step_spans_forwards_and_pins_the_placement(checkpoints):
    folder = checkpoints["mixtral"]
    placement = contiguous_placement(folder)
    context = local_context(folder, placement)
    model = load_engine_model(folder, context=context).model
    context.begin_step()
    context.set_placement(placement.with_version(1))
    with torch.no_grad():
        model(prompts(1, 3))
        model(prompts(1, 4))
    assert context.pinned_version == 0
    context.end_step()
    counts = context.drain_report("e").router_counts
    assert counts.shape == (1, 2, 8) and counts.sum() == (3 + 4) * 2 * 2
    with torch.no_grad():
        model(prompts(1, 3))
    assert context.pinned_version == 1 and not context.in_step


class _LosingChannel(LocalChannel):
    """A device whose calls to MoE layer 1 fail while `lost`."""

    lost = True

    def submit(self, seq, layer, experts, counts, tokens) -> None:
        if self.lost and layer == 1:
            raise ConnectionError("device lost")
        super().submit(seq, layer, experts, counts, tokens)


@pytest.mark.parametrize("explicit", [True, False])
def test_a_forward_that_failed_leaves_no_router_counts_for_its_retry_to_count_again(checkpoints, explicit):
    """Router counts are the load the placement is planned on: a forward that failed at its second MoE layer routed
    its tokens through the first, and its retry routes them again. Its partial counts were kept, so each failed
    step counted its tokens twice at the layers before the failure (from reading, confirmed here)."""
    folder = checkpoints["mixtral"]
    placement = contiguous_placement(folder)
    context = local_context(folder, placement)
    model = load_engine_model(folder, context=context).model
    lost = _LosingChannel(context.channels[0]._worker)
    context.set_channels({**context.channels, 0: lost})
    ids = prompts(1, 64)  # 128 choices of 8 experts: device 0's are chosen at layer 1
    with torch.no_grad():
        if explicit:
            context.begin_step()
        with pytest.raises(Exception, match="device lost"):
            model(ids)
        if explicit:
            context.end_step(completed=False)
        lost.lost = False
        model(ids)
    counts = context.drain_report("e").router_counts
    assert counts.shape == (1, 2, 8) and counts.sum() == 64 * 2 * 2  # the retry's alone


def test_load_rejects_bad_inputs(checkpoints, tmp_path):
    folder = checkpoints["olmoe"]
    context = local_context(folder, contiguous_placement(folder))
    with pytest.raises(ValueError, match="dtype"):
        load_engine_model(folder, dtype="float8", context=context)
    with pytest.raises(ValueError, match="does not exist"):
        load_engine_model(tmp_path / "absent", context=context)
    with pytest.raises(ValueError, match="4 experts"):
        bad = Placement.from_expert_devices(np.zeros((2, 4), dtype=int), G)
        load_engine_model(folder, context=DispatchContext(bad, context.channels))
    lacking = tmp_path / "lacking"  # a dense weight missing: refused, not initialised at random
    shutil.copytree(folder, lacking)
    tensors = load_file(lacking / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, lacking / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights.*layers.1.self_attn.o_proj.weight"):
        load_engine_model(lacking, context=context)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="'llama'"):
        load_reference_model(tmp_path / "llama")


_PEAK = """
import re, sys
sys.path.insert(0, {root!r})
from service.model import load_engine_model, load_reference_model
from tests.service.test_model import contiguous_placement
from service.dispatch import DispatchContext
if sys.argv[1] == "engine":
    channels = dict.fromkeys(range(4))  # the model is loaded, not run: no worker is needed
    load_engine_model({folder!r}, context=DispatchContext(contiguous_placement({folder!r}), channels))
else:
    load_reference_model({folder!r})
# the peak resident memory of this program (ru_maxrss would include its parent's at the fork)
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024)
"""


def test_the_engine_model_never_reads_the_routed_experts(tmp_path):
    """Loading the engine's model reads no expert tensor: the whole model's load (per-expert keys, as hub
    checkpoints store them) peaks higher by more than the experts' size, in processes that differ in
    nothing else."""
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=256, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            intermediate_size=256, moe_intermediate_size=512, num_hidden_layers=2, num_experts=64,
                            num_experts_per_tok=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    expert_bytes = 2 * 64 * 3 * 256 * 512 * 4  # 201 MB of the checkpoint's 205
    script = _PEAK.format(root=str(Path(__file__).resolve().parents[2]), folder=str(tmp_path / "m"))
    # (the two processes side by side: each peak is its own process's)
    runs = {kind: subprocess.Popen([sys.executable, "-c", script, kind], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for kind in ("engine", "reference")}
    try:
        outputs = {kind: run.communicate(timeout=300) for kind, run in runs.items()}
    finally:
        for run in runs.values():
            run.kill()  # (none left running after a timeout; a no-op on one that ended)
    assert all(run.returncode == 0 for run in runs.values()), {k: out[1][-2000:] for k, out in outputs.items()}
    peak = {kind: int(out.split()[-1]) for kind, (out, _) in outputs.items()}
    assert peak["reference"] - peak["engine"] > expert_bytes, peak


def test_nemotron_h_sums_its_experts_in_float32_as_transformers_does(checkpoints):
    """NemotronHExperts adds each token's weighted expert outputs in the routing weights' dtype (float32: its router
    runs in float32) and casts the sum to the model's dtype once, where the other architectures' experts cast each
    weighted output before adding it: in bfloat16 the engine's logits equal transformers' bit for bit only so."""
    folder = checkpoints["nemotron_h"]
    placement = contiguous_placement(folder)
    channels = {}
    for g in range(G):
        worker = ExpertWorker(WorkerConfig(index=g, dtype="bfloat16", hidden_act="relu2"))
        worker.load_experts(str(folder), sorted(placement.experts_on(g)))
        channels[g] = LocalChannel(worker)
    engine = load_engine_model(folder, dtype="bfloat16", context=DispatchContext(placement, channels))
    reference = load_reference_model(folder, dtype="bfloat16")
    reference.config._experts_implementation = "eager"
    with torch.no_grad():
        assert torch.equal(engine.model(prompts()).logits, reference(prompts()).logits)


def test_nemotron_h_latent_moe_sends_its_experts_the_latent_projection(tmp_path):
    """Nemotron-H with a latent MoE (moe_latent_size, as Nemotron 3 Super): the engine projects the hidden states
    into the latent width before the experts and back after (fc1/fc2_latent_proj stay in the engine), so the
    experts' width, the layout's hidden_size, is the latent one; the logits equal transformers' bit for bit."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_config

    config = tiny_config("nemotron_h")
    config.moe_latent_size = 24
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    layout = load_layout(tmp_path)
    assert (layout.hidden_size, layout.params_per_expert) == (24, 2 * 24 * 32)
    engine = load_engine_model(tmp_path, context=local_context(tmp_path, contiguous_placement(tmp_path)))
    reference = load_reference_model(tmp_path)
    routed = layout.num_moe_layers * layout.num_experts * layout.params_per_expert
    assert sum(p.numel() for p in reference.parameters()) - sum(p.numel() for p in engine.model.parameters()) == routed
    reference.config._experts_implementation = "eager"
    with torch.no_grad():
        assert torch.equal(engine.model(prompts()).logits, reference(prompts()).logits)


def test_every_checkpoint_layout_passes_the_build_time_check(checkpoints):
    """`check_checkpoint` (run by build_app, headers only) accepts every layout the workers read: per-expert and fused
    experts, transposed fused ones, experts without a gate, FP8 with whole or partial blocks, MXFP4, packed INT4."""
    from service.checkpoint import check_checkpoint

    for folder in checkpoints.values():
        check_checkpoint(folder)  # raises naming what it refuses
    check_checkpoint(Path(__file__).resolve().parents[2] / "deploy" / "models" / "vibe-tiny-moe")


def test_the_build_time_check_names_a_missing_fp8_scale(tmp_path):
    from safetensors.torch import load_file, save_file

    from service.checkpoint import check_checkpoint

    folder = save_tiny_fp8_model("deepseek_v3", tmp_path / "fp8", seed=1)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.7.down_proj.weight_scale_inv"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"FP8 weight model\.layers\.2\.mlp\.experts\.7\.down_proj\.weight has no"):
        check_checkpoint(folder)
