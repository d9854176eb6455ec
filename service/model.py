"""The engine's model: a local transformers MoE checkpoint with its routed experts cut out.

Owns loading (local folders only) without ever reading the routed experts' weights (transformers builds
their modules without parameters, so the checkpoint's expert tensors are skipped as unexpected: the
ingress holds the dense part only, not the whole model at its peak), replacing every MoE layer's
`mlp.experts` (Llama 4's `feed_forward.experts`, Granite's `block_sparse_moe.experts`, Nemotron-H's
`mixer.experts`, Gemma 4's decoder layer's `experts`) with a DispatchingExperts bound to its MoE layer index (and
Llama 4's MoE forward with one that scales each token's expert input by its router score, as Llama 4 does, and
dispatches it with weight 1, where the other architectures weight the experts' outputs), and making a forward
that runs outside an explicit step (e.g. inside `model.generate`) one step of its own. Embeddings, attention, norms,
routers, shared experts and lm_head stay as transformers built them. Ignores where experts live and
how they get there (the workers read them with `service.checkpoint.read_experts`).
"""

from __future__ import annotations

import contextlib
import gc
import threading
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.auto_factory import _get_model_class

from service import text_models  # noqa: F401  (registers the causal LMs transformers lacks)
from service.checkpoint import (
    COMPRESSED_TENSORS,
    ExpertLayout,
    fp8_block_size,
    load_layout,
    packed_dense_weights,
    quantization_method,
)
from service.dispatch import DispatchContext, DispatchingExperts
from service.experts import aligned
from service.quantization import FP8_DTYPES, dequantize_fp8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


@dataclass(frozen=True)
class EngineModel:
    """A causal LM whose MoE layers dispatch to expert workers, and where its experts are."""

    model: PreTrainedModel
    layout: ExpertLayout


def load_engine_model(checkpoint_dir: str | Path, *, dtype: str = "float32", device: str = "cpu",
                      context: DispatchContext) -> EngineModel:
    """Load the dense part of a local checkpoint; its MoE layers dispatch through `context`.

    Args:
        checkpoint_dir: local folder of a supported MoE checkpoint (see service.checkpoint).
        dtype: compute dtype name of the dense part, a key of DTYPES.
        device: torch device of the dense part.
        context: placement and channels shared by all MoE layers; its placement must be [L, E] of the
            checkpoint's MoE layers and experts.

    Raises:
        ValueError: unknown dtype, missing folder, unsupported architecture, or a placement of the
            wrong shape.
    """
    layout = load_layout(checkpoint_dir)
    placement = context.placement
    if (placement.num_layers, placement.num_experts) != (layout.num_moe_layers, layout.num_experts):
        raise ValueError(f"placement is {placement.num_layers} layers x {placement.num_experts} experts, the "
                         f"checkpoint has {layout.num_moe_layers} MoE layers x {layout.num_experts} experts")
    with _without_routed_experts(checkpoint_dir, layout) as config:
        model, info = AutoModelForCausalLM.from_pretrained(
            Path(checkpoint_dir), config=config, dtype=_dtype(dtype), local_files_only=True,
            output_loading_info=True)
    if info["missing_keys"]:  # transformers would have initialised them at random
        raise ValueError(f"checkpoint {str(checkpoint_dir)!r} lacks weights of the model's dense part: "
                         f"{sorted(info['missing_keys'])[:8]}")
    model = _aligned_weights(model.to(torch.device(device))).eval()
    _split_experts(model, layout, context)
    _one_step_per_forward(model, context)
    return EngineModel(model, layout)


def load_reference_model(checkpoint_dir: str | Path, *, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    """The unmodified model of a local checkpoint (eval mode), for tests and benchmarks."""
    load_layout(checkpoint_dir)  # same checks as the engine model: local folder, supported architecture
    return _from_pretrained(checkpoint_dir, dtype, device)


def _from_pretrained(checkpoint_dir: str | Path, dtype: str, device: str) -> PreTrainedModel:
    config = _dequantizing(AutoConfig.from_pretrained(Path(checkpoint_dir), local_files_only=True))
    with _PATCHING, _fp8_partial_blocks(checkpoint_dir):
        model = AutoModelForCausalLM.from_pretrained(Path(checkpoint_dir), config=config, dtype=_dtype(dtype),
                                                     local_files_only=True)
    return _aligned_weights(model.to(torch.device(device))).eval()


def _aligned_weights(model: PreTrainedModel) -> PreTrainedModel:
    """``model``, each of its CPU parameters and buffers that transformers left as a view into the checkpoint file at an
    unaligned offset copied into memory of its own (`experts.aligned`: the engine's dense part and the reference model
    then compute alike, bit for bit, as the workers, which hold their experts aligned)."""
    for tensor in (*model.parameters(), *model.buffers()):  # (each once: tied weights stay tied)
        tensor.data = aligned(tensor.data)
    return model


def _dequantizing(config: PretrainedConfig) -> PretrainedConfig:
    """``config``, telling transformers to dequantize a quantized checkpoint's weights as it loads them (FP8,
    MXFP4: the dense part computes in the model's dtype, as the workers compute the experts)."""
    quantization = getattr(config, "quantization_config", None)
    if quantization_method(config) is not None:
        settings = quantization if isinstance(quantization, dict) else quantization.to_dict()
        config.quantization_config = {**settings, "dequantize": True}
    return config


@contextlib.contextmanager
def _fp8_partial_blocks(checkpoint_dir: str | Path) -> Iterator[None]:
    """While inside (holding ``_PATCHING``), transformers dequantizes an FP8 checkpoint's weights with the blocks of its
    config's `weight_block_size`, the last ones partial (`service.quantization.dequantize_fp8`): its `Fp8Dequantize`
    infers the blocks from the scale grid and refuses a grid that does not divide the weight, as DeepSeek-V3's
    `kv_a_proj_with_mqa` ([576, 7168], a [5, 56] grid of 128 x 128 blocks) and Kimi-K2's do not."""
    block = fp8_block_size(checkpoint_dir)
    if block is None:
        yield
        return
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    original = Fp8Dequantize.__dict__["_dequantize_one"]

    def dequantize_one(self, quantized: torch.Tensor, scales: torch.Tensor, output_dtype=None) -> torch.Tensor:
        if quantized.dtype not in FP8_DTYPES or not scales.is_floating_point() or quantized.dim() != 2:
            return original(self, quantized, scales, output_dtype=output_dtype)
        if output_dtype is None:  # transformers' default
            output_dtype = scales.dtype if scales.element_size() >= 2 else torch.bfloat16
        return dequantize_fp8(quantized, scales, output_dtype, block)

    Fp8Dequantize._dequantize_one = dequantize_one
    try:
        yield
    finally:
        Fp8Dequantize._dequantize_one = original


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


_PATCHING = threading.Lock()  # class patches are process-wide: one load at a time patches


@contextlib.contextmanager
def _without_routed_experts(checkpoint_dir: str | Path, layout: ExpertLayout) -> Iterator[PretrainedConfig]:
    """While inside, the routed experts' modules of this checkpoint's architecture have no parameters (their
    fused weights are meta-device placeholders that weight initialisation may touch), and the model class
    expects no expert keys, so `from_pretrained` reads none of the experts' tensors and says nothing of them.
    Yields the config to load with: the checkpoint's, without the quantization of GPT-OSS's MXFP4 experts
    or of pack-quantized integer experts when nothing else is quantized (they are skipped), the dense part
    of an FP8 or a W4A16 checkpoint dequantized (the latter by compressed-tensors, a dependency)."""
    config = AutoConfig.from_pretrained(Path(checkpoint_dir), local_files_only=True)
    method = quantization_method(config)
    if method == "mxfp4" or (method == COMPRESSED_TENSORS and not packed_dense_weights(checkpoint_dir)):
        # GPT-OSS, Kimi-K2-Thinking: only the experts are quantized, and they are skipped
        del config.quantization_config
    else:
        config = _dequantizing(config)  # FP8, W4A16 releases (through compressed-tensors): the dense part too
    with torch.device("meta"):  # (a vision-language model's causal LM is its language model)
        probe = AutoModelForCausalLM.from_config(getattr(config, "text_config", None) or config)
    classes = {type(ffn_block(probe.model.layers[d]).experts) for d in layout.moe_layers}
    # the class that loads the checkpoint: the probe's, or a subclass for the vision-language config (Gemma 4's)
    model_class = _get_model_class(config, AutoModelForCausalLM._model_mapping)

    def empty(self, *args, **kwargs) -> None:
        torch.nn.Module.__init__(self)
        for name in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):  # (biases:
            # GPT-OSS; up_proj: Nemotron-H's experts without a gate)
            setattr(self, name, torch.empty(0, device="meta"))

    with _PATCHING, _fp8_partial_blocks(checkpoint_dir):
        saved = {cls: cls.__dict__.get("__init__") for cls in classes}  # None: inherited
        own = model_class.__dict__.get("_keys_to_ignore_on_load_unexpected")
        inherited = getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or ()
        try:
            for cls in classes:
                cls.__init__ = empty
            model_class._keys_to_ignore_on_load_unexpected = [*inherited, r"\.experts\."]
            yield config
        finally:
            for cls, init in saved.items():
                if init is None:
                    del cls.__init__
                else:
                    cls.__init__ = init
            if own is None:
                del model_class._keys_to_ignore_on_load_unexpected
            else:
                model_class._keys_to_ignore_on_load_unexpected = own


def _split_experts(model: PreTrainedModel, layout: ExpertLayout, context: DispatchContext) -> None:
    """Replace each MoE layer's experts (modules without weights) by a DispatchingExperts."""
    removed = []
    for moe_layer, decoder_layer in enumerate(layout.moe_layers):
        block = ffn_block(model.model.layers[decoder_layer])
        removed.append(weakref.ref(block.experts))
        block.experts = DispatchingExperts(moe_layer, layout.num_experts, context,
                                           sum_in_weights_dtype=layout.architecture == "nemotron_h")
        if layout.architecture in ("llama4", "llama4_text"):
            block.forward = types.MethodType(_llama4_moe_forward, block)
    gc.collect()
    assert all(ref() is None for ref in removed), "routed expert weights are still referenced"
    assert not any(".experts." in name for name, _ in model.named_parameters()), "routed expert weights remain"


def ffn_block(decoder_layer: torch.nn.Module) -> torch.nn.Module:
    """The module holding a decoder layer's routed experts (or its dense feed-forward block): its `mlp`, Llama 4's
    `feed_forward`, Granite's `block_sparse_moe` (beside its dense `shared_mlp`), Nemotron-H's `mixer` (its layers
    hold one mixer each: Mamba2, attention, MLP or MoE), or Gemma 4's decoder layer itself (its `experts` and
    `router` beside its dense `mlp`)."""
    for name in ("feed_forward", "block_sparse_moe", "mixer"):
        if hasattr(decoder_layer, name):
            return getattr(decoder_layer, name)
    if hasattr(decoder_layer, "enable_moe_block"):  # Gemma 4
        return decoder_layer
    return decoder_layer.mlp


def _llama4_moe_forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Llama4TextMoe.forward` with its experts dispatched: the router's top-1 expert of each token gets the
    token scaled by its sigmoid score and its output is added unweighted to the shared expert's, as there.
    (Transformers runs every expert on every token, the unchosen ones on zeros, which add nothing; top-k > 1
    would need a scaled input per (token, expert) pair, and `expert_layout` refuses it.) Returns the layer's
    output [T, H] and router logits [T, E]."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)  # [T, H]
    scores, logits = self.router(hidden_states)  # [T, E]: sigmoid of the top-k logits, 0 elsewhere
    assert self.top_k == 1, "expert_layout refuses Llama 4 with top_k > 1"
    chosen = torch.topk(logits, self.top_k, dim=1).indices  # [T, 1]: the router's own choice
    routed_in = hidden_states * scores.gather(1, chosen)
    out = self.shared_expert(hidden_states)
    out.add_(self.experts(routed_in, chosen, torch.ones_like(chosen, dtype=hidden_states.dtype)))
    return out, logits


def _one_step_per_forward(model: PreTrainedModel, context: DispatchContext) -> None:
    """A forward outside begin_step/end_step pins one placement for all its MoE layers."""
    opened: list[bool] = []

    def begin(module, args) -> None:
        if not context.in_step:
            context.begin_step()
            opened.append(True)

    def end(module, args, output) -> None:
        if opened:
            opened.pop()
            context.end_step(completed=output is not None)  # (None: the forward raised; torch still calls the hook)

    model.register_forward_pre_hook(begin)
    model.register_forward_hook(end, always_call=True)
