"""Where the routed experts of a transformers MoE checkpoint are, and reading just the ones a worker needs.

Owns the expert layout of the supported architectures (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2,
DeepSeek-V3, GLM-4.5, GLM-4.7-Flash, MiniMax-M2, ERNIE-4.5, dots.llm1, GPT-OSS, Hunyuan-A13B, Phi-3.5-MoE,
Solar Open, AFMoE (Trinity), Laguna, Cohere2-MoE, FlexOlmo, EXAONE-MoE,
MiMo-V2-Flash, Qwen3-Next, Qwen3.5-MoE's language model, DeepSeek-V3.2, Llama 4's language model, GLM-5,
Mistral 4, Hy3, GLM-4.5V's, Qwen3-VL-MoE's and Gemma 4's language models, Kimi-K2: DeepSeek-V3's under its
own `model_type`, `KimiK2Config`; Nemotron-H, Granite's MoE models: 4.0's hybrids, 3.x's, with a shared expert),
reading
selected experts from a local folder's safetensors (single file or sharded with an index) without loading
the rest, and the check that a model path lies in a configured folder. Ignores dense weights, shared
experts and routers (the engine loads those with `from_pretrained`) and the hub: paths are local only.

On disk `save_pretrained` writes per-expert keys by default, and fused 3-D tensors with
`save_original_format=False`; both are accepted, for every layer independently:

    per expert  model.layers.{d}.mlp.experts.{e}.{gate,up,down}_proj.weight   [I, H], [I, H], [H, I]
    Mixtral     model.layers.{d}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight   (and Phi-3.5-MoE)
    fused       model.layers.{d}.mlp.experts.{gate_up,down}_proj              [E, 2I, H], [E, H, I]

GPT-OSS stores its experts fused and transposed, with biases (`mlp.experts.gate_up_proj` [E, H, 2I],
`gate_up_proj_bias` [E, 2I], `down_proj` [E, I, H], `down_proj_bias` [E, H]), or, as OpenAI released it,
in MXFP4 (`gate_up_proj_blocks` [E, 2I, H/32, 16] and `gate_up_proj_scales` [E, 2I, H/32], the same for
`down_proj`). Quantized experts (those, FP8 ones with block scales, and compressed-tensors' pack-quantized
integers: `weight_packed` int32, `weight_scale`, `weight_shape` per expert weight, Kimi-K2-Thinking's) are
dequantized here, per expert, exactly as their library dequantizes them, or read as stored
(`read_experts(..., quantized=True)`) for workers that hold them quantized (service.quantization).

Qwen3-VL-MoE's `save_pretrained` writes its experts fused and transposed by default (`mlp.experts.gate_up_proj`
[E, H, 2I], `down_proj` [E, I, H], as its releases store them): a fused expert whose gate_up has as many rows as
its down has columns (H) is read transposed.

Nemotron-H's experts are not gated (``down(relu2(up x))``): per expert under `backbone.` as its releases store
them, `backbone.layers.{d}.mixer.experts.{e}.{up,down}_proj.weight` [I, H], [H, I], or fused
`model.layers.{d}.mixer.experts.{up,down}_proj` [E, I, H], [E, H, I]; read as "up" and "down".

Granite's MoE models (4.0's hybrids, 3.x's, those with a shared expert) store each layer's experts fused, `model.layers.{d}.block_sparse_moe.input_linear.weight`
[E, 2I, H] (gate rows first, then up) and `output_linear.weight` [E, H, I], as released and as `save_pretrained`
writes them by default (`block_sparse_moe.experts.{gate_up,down}_proj` with `save_original_format=False`).

Llama 4 stores its experts fused and transposed, without biases, always (`feed_forward.experts.gate_up_proj`
[E, H, 2I], gate columns then up, and `down_proj` [E, I, H]; its vision-language releases under
`language_model.model.layers`): read as Qwen3-VL-MoE's are.

Gemma 4 keeps its experts on the decoder layer, beside its dense `mlp`, fused and untransposed, always
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]; its vision-language release under
`model.language_model.layers`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from transformers import PretrainedConfig

from service.experts import checksum
from service.messages import ExpertTensors
from service.quantization import (
    FP8_DTYPES,
    INT_PACKED_BITS,
    check_mxfp4_blocks,
    check_nvfp4,
    dequantize_fp8,
    dequantize_int_packed,
    dequantize_mxfp4,
    dequantize_nvfp4,
    fp8_grid,
    int_packed_bits,
)

Key = tuple[int, int]  # (moe layer index, logical expert id)

SUPPORTED_ARCHITECTURES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
                           "glm4_moe_lite", "minimax_m2", "ernie4_5_moe", "dots1", "gpt_oss", "hunyuan_v1_moe",
                           "phimoe", "solar_open", "afmoe", "laguna", "cohere2_moe", "flex_olmo",
                           "exaone_moe", "mimo_v2_flash", "qwen3_next", "qwen3_5_moe",
                           "deepseek_v32", "llama4_text", "llama4", "glm_moe_dsa", "mistral4", "hy_v3",
                           "glm4v_moe", "qwen3_vl_moe", "kimi_k2", "nemotron_h", "granitemoehybrid", "granitemoe",
                           "granitemoeshared", "gemma4", "gemma4_text", "kimi_linear", "minimax")


# transformers is imported where a config is read, not with this module: an expert worker given its checkpoint's
# layout (`read_experts(..., layout=)`) reads experts without it (about a second of CPU at every worker start).
@functools.cache
def _kimi_k2_config() -> type:
    from transformers import AutoConfig, DeepseekV3Config

    class KimiK2Config(DeepseekV3Config):
        """Kimi-K2's config (K2, K2-Instruct, K2-Thinking): DeepSeek-V3's architecture, which its releases' remote
        code is, under the `model_type` its folders declare (``kimi_k2``); registered with `AutoConfig` so that
        its folders load without their remote code (`service.text_models` maps it to DeepSeek-V3's causal LM)."""

        model_type = "kimi_k2"

    KimiK2Config.__module__, KimiK2Config.__qualname__ = __name__, "KimiK2Config"  # pickled by reference
    AutoConfig.register(KimiK2Config.model_type, KimiK2Config, exist_ok=True)
    return KimiK2Config


def __getattr__(name: str):
    if name == "KimiK2Config":  # (built, and registered with AutoConfig, on first use)
        return _kimi_k2_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def auto_config():
    """transformers' AutoConfig, which then also knows `KimiK2Config`."""
    from transformers import AutoConfig

    _kimi_k2_config()
    return AutoConfig

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# (gate, up, down) per-expert key suffixes, tried in order
_PER_EXPERT_FORMATS = (
    ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight"),
    ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight",
     "block_sparse_moe.experts.{e}.w2.weight"),
)
# (gate_up, down) fused key suffixes, tried in order (Llama 4's under `feed_forward`; Granite's under
# `block_sparse_moe`, as released and as transformers names them; Gemma 4's on the decoder layer)
_FUSED_FORMATS = (("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
                  ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),
                  ("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"),
                  ("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"),
                  ("experts.gate_up_proj", "experts.down_proj"))
# experts without a gate (Nemotron-H's): (up, down) per expert, then fused
_UNGATED_PER_EXPERT = ("mixer.experts.{e}.up_proj.weight", "mixer.experts.{e}.down_proj.weight")
_UNGATED_FUSED = ("mixer.experts.up_proj", "mixer.experts.down_proj")
# where the decoder layers are, tried in order: a vision-language model's language model's (Qwen3.5 and the
# others' `model.language_model`, Llama 4's `language_model.model`), else a causal LM's
_LAYER_PREFIXES = ("model.language_model.layers.", "language_model.model.layers.", "backbone.layers.",
                   "model.layers.")  # (Nemotron-H's releases: `backbone.`)


@dataclass(frozen=True)
class ExpertLayout:
    """Shape of the routed experts of a model.

    Attributes:
        architecture: transformers `model_type`, one of SUPPORTED_ARCHITECTURES.
        moe_layers: decoder-layer index of each MoE layer, ascending; MoE layer i is `moe_layers[i]`.
        num_experts: E, routed experts per MoE layer.
        top_k: experts selected per token.
        hidden_size: H.
        hidden_size: H, the width of the experts' input and output (Nemotron-H's latent width where its MoE
            projects into one).
        intermediate_size: I of one routed expert ("gate_up" is [2I, H], "down" is [H, I]).
        hidden_act: activation name of the gate projection (a key of transformers' ACT2FN); of the up
            projection for experts without a gate.
        dtype: torch dtype name of the checkpoint's weights, e.g. "float32", "bfloat16".
        clamped_swiglu: GPT-OSS's (alpha, limit): its experts are a clamped SwiGLU with biases (see
            `service.experts.ExpertFFN`); None for the SwiGLU experts of the other architectures.
        gated: False for experts without a gate (Nemotron-H's ``down(act(up x))``: "up" [I, H] and "down").
    """

    architecture: str
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: str
    clamped_swiglu: tuple[float, float] | None = None
    gated: bool = True

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: {SUPPORTED_ARCHITECTURES}")
        layers = tuple(int(layer) for layer in self.moe_layers)
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(f"moe_layers must be distinct ascending decoder-layer indices, got {self.moe_layers}")
        object.__setattr__(self, "moe_layers", layers)
        for name in ("num_experts", "top_k", "hidden_size", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ExpertLayout.{name} must be > 0, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"ExpertLayout.dtype must name a torch dtype, got {self.dtype!r}")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def params_per_expert(self) -> int:
        """Weights of one routed expert: three H x I matrices (two without a gate), and GPT-OSS's biases (2I + H)."""
        biases = 2 * self.intermediate_size + self.hidden_size if self.clamped_swiglu is not None else 0
        return (3 if self.gated else 2) * self.hidden_size * self.intermediate_size + biases

    def check_keys(self, keys: Iterable[Key]) -> list[Key]:
        """The keys as int pairs; ValueError naming the first one outside [0, L) x [0, E)."""
        checked = [(int(layer), int(expert)) for layer, expert in keys]
        for layer, expert in checked:
            if not (0 <= layer < self.num_moe_layers and 0 <= expert < self.num_experts):
                raise ValueError(f"expert key (layer {layer}, expert {expert}) outside "
                                 f"{self.num_moe_layers} MoE layers x {self.num_experts} experts")
        return checked


def expert_layout(config: PretrainedConfig) -> ExpertLayout:
    """The expert layout of a transformers config; ValueError naming the architecture if unsupported, or
    the quantisation of a quantized checkpoint the workers cannot read (they compute experts in the
    checkpoint's dtype). Three are read: FP8 with block scales (DeepSeek-V3's, MiniMax-M2's, Qwen3's FP8
    releases: `read_experts` dequantizes each expert, the engine's dense part is dequantized by
    transformers), GPT-OSS's MXFP4 experts and compressed-tensors' pack-quantized INT4/INT8 experts
    (Kimi-K2-Thinking's; a dense part quantized too is dequantized by transformers in the ingress)."""
    architecture = getattr(config, "model_type", None)
    if architecture in _NOT_SERVED:
        raise ValueError(f"{architecture}: not supported ({_NOT_SERVED[architecture]})")
    method = quantization_method(config)
    if method == COMPRESSED_TENSORS:
        _check_pack_quantized(config.quantization_config)
    elif method == "fp8" and architecture == "gpt_oss":  # (its fused experts have biases and no block scales read)
        raise ValueError("gpt_oss: FP8 experts are not supported (transformers' FP8 experts take no biases); GPT-OSS "
                         "is read in bf16 or as released, MXFP4")
    elif method is not None and method != "fp8" and (method, architecture) != ("mxfp4", "gpt_oss"):
        raise ValueError(f"quantized checkpoints ({method}) are not supported: convert the weights to bf16 first; "
                         f"FP8 with block scales (fp8), GPT-OSS's MXFP4 and compressed-tensors' pack-quantized "
                         f"INT4/INT8 experts are read")
    dtype = _dtype_name(config)
    vlm = ("qwen3_5_moe", "llama4", "glm4v_moe", "qwen3_vl_moe", "gemma4")
    if architecture in vlm and getattr(config, "text_config", None) is not None:
        config = config.text_config  # a vision-language model: its language model is the one served
    num_layers = config.num_hidden_layers
    clamped_swiglu, gated = None, True
    hidden, act = config.hidden_size, getattr(config, "hidden_act", None)
    if architecture in ("qwen3_moe", "qwen2_moe", "qwen3_next", "qwen3_vl_moe"):
        # the rule of Qwen{2,3}MoeDecoderLayer.__init__ (and Qwen3NextDecoderLayer's, Qwen3VLMoeTextDecoderLayer's)
        step, dense = config.decoder_sparse_step, set(config.mlp_only_layers or ())
        moe_layers = [d for d in range(num_layers)
                      if d not in dense and config.num_experts > 0 and (d + 1) % step == 0]
        num_experts, intermediate = config.num_experts, config.moe_intermediate_size
    elif architecture == "qwen3_5_moe":  # the rule of Qwen3_5MoeDecoderLayer: every layer MoE
        moe_layers = list(range(num_layers))
        num_experts, intermediate = config.num_experts, config.moe_intermediate_size
    elif architecture in ("gemma4", "gemma4_text"):  # the rule of Gemma4TextDecoderLayer: all layers or none
        _check_gemma4(config)
        moe_layers = list(range(num_layers))
        num_experts, intermediate = config.num_experts, config.moe_intermediate_size
    elif architecture == "gpt_oss":
        moe_layers = list(range(num_layers))
        num_experts, intermediate = config.num_local_experts, config.intermediate_size
        clamped_swiglu = (float(config.swiglu_alpha), float(config.swiglu_limit))
    elif architecture in ("mixtral", "olmoe", "minimax_m2", "flex_olmo", "hunyuan_v1_moe", "phimoe", "minimax"):
        if architecture == "phimoe":
            _check_phimoe_window(config)
        if architecture == "minimax":
            _check_minimax_window(config)
        moe_layers = list(range(num_layers))
        num_experts, intermediate = config.num_local_experts, config.intermediate_size
    elif architecture == "solar_open":  # every layer MoE
        moe_layers = list(range(num_layers))
        num_experts, intermediate = config.n_routed_experts, config.moe_intermediate_size
    elif architecture == "afmoe":  # the rule of AfmoeDecoderLayer: dense layers first
        moe_layers = list(range(config.num_dense_layers, num_layers))
        num_experts, intermediate = config.num_experts, config.moe_intermediate_size
    elif architecture in ("laguna", "exaone_moe", "mimo_v2_flash", "hy_v3"):
        # the rule of LagunaDecoderLayer, ExaoneMoeDecoderLayer, MiMoV2FlashDecoderLayer and HYV3DecoderLayer
        moe_layers = [d for d, kind in enumerate(config.mlp_layer_types) if kind == "sparse"]
        num_experts = config.n_routed_experts if architecture == "mimo_v2_flash" else config.num_experts
        intermediate = config.moe_intermediate_size
    elif architecture == "cohere2_moe":  # the rule of Cohere2MoeDecoderLayer: anything but "dense" is sparse
        moe_layers = [d for d, kind in enumerate(config.mlp_layer_types) if kind != "dense"]
        num_experts, intermediate = config.num_experts, config.intermediate_size
    elif architecture == "ernie4_5_moe":  # the rule of Ernie4_5_MoeDecoderLayer
        moe_layers = [d for d in range(num_layers) if (d + 1) % config.moe_layer_interval == 0
                      and config.moe_layer_start_index <= d <= config.moe_layer_end_index]
        num_experts, intermediate = config.moe_num_experts, config.moe_intermediate_size
    elif architecture in ("llama4_text", "llama4"):  # the rule of Llama4TextDecoderLayer
        _check_llama4(config, method)
        moe_layers = list(config.moe_layers)
        num_experts, intermediate = config.num_local_experts, config.intermediate_size
    elif architecture in ("glm4_moe_lite", "glm_moe_dsa", "deepseek_v32"):  # the rule of Glm4MoeLite-, GlmMoeDsa- and
        # DeepseekV32DecoderLayer (a config without mlp_layer_types gets first_k_dense_replace's: dense layers first;
        # one that has them, as save_pretrained writes, was read by first_k_dense_replace alone)
        moe_layers = [d for d, kind in enumerate(config.mlp_layer_types) if kind == "sparse"]
        num_experts, intermediate = config.n_routed_experts, config.moe_intermediate_size
    elif architecture == "kimi_linear":  # the rule of KimiLinearDecoderLayer (mlp_layer_types from the release's
        # first_k_dense_replace)
        moe_layers = [d for d, kind in enumerate(config.mlp_layer_types) if kind == "sparse"]
        num_experts, intermediate = config.num_local_experts, config.moe_intermediate_size
    elif architecture in ("deepseek_v2", "deepseek_v3", "glm4_moe", "dots1", "mistral4", "glm4v_moe", "kimi_k2"):
        # the rule of DeepseekV{2,3}-, Glm4Moe-, Dots1-, Mistral4- and Glm4vMoeTextDecoderLayer: dense layers first
        moe_layers = list(range(config.first_k_dense_replace, num_layers))
        num_experts, intermediate = config.n_routed_experts, config.moe_intermediate_size
    elif architecture in ("granitemoehybrid", "granitemoe", "granitemoeshared"):
        # GraniteMoe{Hybrid,Shared,}DecoderLayer: every layer MoE if the model has experts
        if not config.num_local_experts:
            raise ValueError(f"{architecture}: num_local_experts 0 is a dense model, not served (no routed experts)")
        moe_layers = list(range(num_layers))
        num_experts, intermediate = config.num_local_experts, config.intermediate_size
    elif architecture == "nemotron_h":  # the rule of NemotronHBlock: one mixer per layer, "moe" ones are MoE
        moe_layers = [d for d, kind in enumerate(config.layer_types) if kind == "moe"]
        num_experts, intermediate = config.n_routed_experts, config.moe_intermediate_size
        # NemotronHExperts: down(relu2(up x)), on the latent projection of the hidden states where there is one
        hidden, act, gated = config.moe_latent_size or config.hidden_size, config.mlp_hidden_act, False
    else:
        raise ValueError(f"unsupported MoE architecture {architecture!r}; supported: {SUPPORTED_ARCHITECTURES}")
    if architecture in ("gemma4", "gemma4_text"):  # (its activation, its experts' too: GELU, tanh-approximated)
        act = config.hidden_activation
    return ExpertLayout(architecture, tuple(moe_layers), num_experts, _top_k(config, moe_layers),
                        hidden, intermediate, act, dtype, clamped_swiglu, gated)


# MoE architectures of transformers 5.24 that are not served, and why (a clearer refusal than "unsupported")
_NOT_SERVED = {
    "mistral_large4": "Mistral Large 4's language model needs a causal LM that transformers does not define, "
                      "NoPE layers with narrower latent keys, cross-layer KV sharing and its own DSA indexer "
                      "(queries from the hidden states, scaled by position, no RoPE on NoPE layers)",
    "mistral3": "Mistral 3's vision-language checkpoints (Mistral Small 4's among them): transformers loads no causal "
                "LM from them; a folder of Mistral Small 4's language model alone (model_type mistral4) is served",
}


def _top_k(config: PretrainedConfig, moe_layers: Sequence[int]) -> int:
    """Experts per token: `num_experts_per_tok` (or the field a config maps it to, e.g. Hunyuan's `moe_topk`,
    ERNIE's `moe_k`), which Hunyuan may give per layer; ValueError if its MoE layers differ."""
    top_k = config.top_k_experts if config.model_type == "gemma4_text" else config.num_experts_per_tok
    if isinstance(top_k, (list, tuple)):
        per_layer = {int(top_k[d]) for d in moe_layers}
        if len(per_layer) != 1:
            raise ValueError(f"{config.model_type}: experts per token differ between MoE layers ({top_k}); "
                             f"one top_k for all layers is supported")
        top_k = per_layer.pop()
    return int(top_k)


def _check_phimoe_window(config: PretrainedConfig) -> None:
    """Phi-MoE's attention gets its sliding window from the mask alone (its attention module passes none to the
    attention function), which the engine's attention does not read: refuse a window that limits anything."""
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise ValueError(f"phimoe: a sliding window ({window}) shorter than max_position_embeddings "
                         f"({config.max_position_embeddings}) is not supported (its attention module does not "
                         f"pass the window to the attention function)")


def _check_minimax_window(config: PretrainedConfig) -> None:
    """MiniMax's softmax-attention layers slide over ``sliding_window`` when it is set (transformers builds their mask
    with it), though their layer type says ``full_attention``, which the engine's attention reads as no window:
    refuse a window that limits anything (MiniMax-Text-01's and M1's configs set none)."""
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise ValueError(f"minimax: a sliding window ({window}) on its full_attention layers is not supported (their "
                         f"layer type says full attention; transformers slides them)")


def _check_gemma4(config: PretrainedConfig) -> None:
    """Gemma 4's dense releases (E2B, E4B, 31B: `enable_moe_block` false) have no routed experts to place; a language
    model whose every layer shares keys and values has none of its own (an assistant's, fed by another model); and
    one whose text attends both ways (`use_bidirectional_attention` "all") is no causal LM for the engine's causal
    attention ("vision", the releases' setting, changes nothing for text)."""
    if not config.enable_moe_block:
        raise ValueError("gemma4: a dense Gemma 4 (enable_moe_block false: no routed experts) has nothing to place on "
                         "expert workers; only its MoE releases (e.g. gemma-4-26B-A4B) are served")
    if config.num_kv_shared_layers >= config.num_hidden_layers:
        raise ValueError(f"gemma4: num_kv_shared_layers {config.num_kv_shared_layers} of {config.num_hidden_layers} "
                         f"layers is not supported (every layer reading another model's keys and values: an assistant "
                         f"model, not a causal LM of its own)")
    if config.use_bidirectional_attention == "all":
        raise ValueError("gemma4: use_bidirectional_attention 'all' is not supported (text attending both ways is "
                         "not causal; the engine's attention is)")


def _check_llama4(config: PretrainedConfig, method: str | None) -> None:
    """Llama 4 scales each token's expert input by its router score (see `service.model`), so top-k > 1 would
    need an input row per (token, expert) pair, which dispatch does not send: refuse it (both releases route
    top-1), and quantized checkpoints (its experts are read from the fused tensors as stored)."""
    if config.num_experts_per_tok != 1:
        raise ValueError(f"llama4: num_experts_per_tok {config.num_experts_per_tok} is not supported (only 1: Llama 4 "
                         f"scales each expert's input by its router score, one input per token)")
    if method is not None:
        raise ValueError(f"llama4: quantized checkpoints ({method}) are not supported: convert the weights to bf16 "
                         f"first")


COMPRESSED_TENSORS = "compressed-tensors"


def quantization_method(config: PretrainedConfig) -> str | None:
    """The `quant_method` of a quantized checkpoint's config ("mxfp4", "fp8", ...), or None."""
    quantization = getattr(config, "quantization_config", None)
    if not quantization:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(
        quantization, "quant_method", quantization)
    return str(getattr(method, "value", method))


def _dtype_name(config: PretrainedConfig) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")


def load_layout(checkpoint_dir: str | Path) -> ExpertLayout:
    """The expert layout of the checkpoint in a local folder (reads its config.json only)."""
    return expert_layout(auto_config().from_pretrained(_local_dir(checkpoint_dir), local_files_only=True))


def fp8_block_size(checkpoint_dir: str | Path) -> tuple[int, int] | None:
    """The [rows, cols] of the FP8 scale blocks an FP8 checkpoint's config gives (`weight_block_size`), or None."""
    config = json.loads((_local_dir(checkpoint_dir) / "config.json").read_text())
    quantization = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    block = (quantization or {}).get("weight_block_size") if isinstance(quantization, dict) else None
    if block is None:
        return None
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"quantization_config.weight_block_size must be two positive integers, got {block!r}")
    return block[0], block[1]


def packed_dense_weights(checkpoint_dir: str | Path) -> list[str]:
    """The weights outside the routed experts that a compressed-tensors checkpoint stores packed (W4A16 releases
    quantize attention and dense MLPs too; Kimi-K2-Thinking's only its experts), by their `weight_packed` names."""
    return sorted(name for name in _weight_map(_local_dir(checkpoint_dir))
                  if name.endswith(".weight_packed") and ".experts." not in name)


def _check_pack_quantized(quantization) -> None:
    """ValueError naming what is not read unless a compressed-tensors quantization is weight-only symmetric
    INT4 or INT8 in its `pack-quantized` format, a scale per group of columns or per row, without activation
    ordering by group (`g_idx`) (vLLM's W4A16 / W8A16), or NVFP4 (`nvfp4-pack-quantized`: FP4 weights in groups
    of 16, their activations, if quantized too, computed unquantized, as vLLM does on GPUs without FP4 matrix
    units); no transforms or quantized KV cache."""
    settings = quantization if isinstance(quantization, dict) else quantization.to_dict()
    problems = [f"{key} is set" for key in ("kv_cache_scheme", "transform_config") if settings.get(key)]
    for name, group in (settings.get("config_groups") or {}).items():
        weights, fmt = group.get("weights") or {}, group.get("format") or settings.get("format")
        if fmt == "nvfp4-pack-quantized":  # (activations quantized to FP4 too, "NVFP4", are computed unquantized)
            if (weights.get("type"), weights.get("num_bits"), weights.get("group_size")) != ("float", 4, 16):
                problems.append(f"{name}: NVFP4 weights must be 4-bit floats in groups of 16")
        else:
            if fmt != "pack-quantized":
                problems.append(f"{name}: format {fmt!r}, not 'pack-quantized' or 'nvfp4-pack-quantized'")
            if group.get("input_activations") or group.get("output_activations"):
                problems.append(f"{name}: activations are quantized (only weights may be)")
            if weights.get("type") != "int" or weights.get("num_bits") not in INT_PACKED_BITS:
                problems.append(f"{name}: {weights.get('num_bits')}-bit {weights.get('type')} weights, not INT4 or "
                                f"INT8")
            if weights.get("strategy") not in ("group", "channel"):
                problems.append(f"{name}: strategy {weights.get('strategy')!r}, not 'group' or 'channel'")
        if not weights.get("symmetric", True):
            problems.append(f"{name}: asymmetric weights (zero points)")
        order = weights.get("actorder")  # (True: group, as older compressed-tensors read it; dynamic: its alias)
        if order is True or (isinstance(order, str) and order.lower() in ("group", "dynamic")):
            problems.append(f"{name}: activation ordering by group (g_idx)")
        elif order not in (None, False) and not (isinstance(order, str) and order.lower() in ("weight", "static")):
            problems.append(f"{name}: activation ordering {order!r}")
    if problems:
        raise ValueError("compressed-tensors checkpoints are read when their weights are symmetric INT4 or INT8 in "
                         "the pack-quantized format or NVFP4; this one: " + "; ".join(problems))


def read_experts(checkpoint_dir: str | Path, keys: Iterable[Key], *, quantized: bool = False,
                 dtype: torch.dtype | None = None, layout: ExpertLayout | None = None) -> list[ExpertTensors]:
    """Read the given experts, and nothing else, from a local checkpoint folder.

    Args:
        checkpoint_dir: folder with config.json and `model.safetensors` or a sharded checkpoint
            (`model.safetensors.index.json`).
        keys: (moe layer index, expert) pairs; moe layer i is decoder layer `layout.moe_layers[i]`.
        quantized: keep quantized experts as stored (for workers that hold them quantized, see
            `service.experts.ExpertFFN`) instead of dequantizing them; no effect on other checkpoints.
        dtype: what quantized weights are dequantized to (a worker's compute dtype, as transformers
            dequantizes to the dtype it loads with); None: the checkpoint's dtype.
        layout: the folder's `load_layout`, when the caller has it (an expert worker, given it by the app: reading
            the config needs transformers, which the worker process then never imports); None: read here.

    Returns:
        One ExpertTensors per key, in order: "gate_up" [2I, H] = cat(gate, up) and "down" [H, I], in the
        checkpoint's dtype, bit-identical to `gate_up_proj[e]` / `down_proj[e]` of the loaded model,
        with their checksum. GPT-OSS's: `gate_up_proj[e]`, `gate_up_proj_bias[e]`, `down_proj[e]` and
        `down_proj_bias[e]` as "gate_up", "gate_up_bias", "down" and "down_bias". Quantized weights are
        dequantized to ``dtype`` as transformers dequantizes them; with ``quantized``, an FP8
        weight stays FP8 beside its float32 block scales ("gate_up_scale_inv": gate's and up's grids
        stacked as their rows are, "down_scale_inv"), and GPT-OSS's MXFP4 weights stay
        "gate_up_blocks", "gate_up_scales", "down_blocks" and "down_scales" (uint8, as stored).

    Raises:
        ValueError: a key is out of range, or the checkpoint lacks an expert's tensors.
    """
    folder = _local_dir(checkpoint_dir)
    layout = layout or load_layout(folder)
    keys = layout.check_keys(keys)
    dtype = dtype or getattr(torch, layout.dtype)
    with _Shards(folder) as shards:
        out = []
        for layer, expert in keys:
            read = _read_gpt_oss_expert if layout.architecture == "gpt_oss" else _read_expert
            tensors = read(shards, layout.moe_layers[layer], expert, dtype, quantized)
            out.append(ExpertTensors(layer, expert, tensors, checksum(tensors)))
    return out


# safetensors dtype names of the weights an expert may store unpacked (floats, FP8 with its scales)
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# FP8 block scales: floats, E8M0 (torch converts it), or U8 holding an E8M0 exponent, 2 ** (byte - 127)
_SCALE_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E8M0", "U8")


def check_checkpoint(checkpoint_dir: str | Path) -> None:
    """ValueError naming the file, tensor or expert unless a checkpoint folder's weights are whole, read from the
    safetensors headers only (no weight is read): every shard the index names is there and opens (a truncated or
    missing file, a partial download), holds the tensors the index says it does, and every routed expert of every MoE
    layer has its weights, of the layout's shapes ([I, H] and [H, I] per expert; fused ones [E, ...]) and a float or
    FP8 dtype (packed quantized formats: their packed tensors of those shapes). Run when the app is built: the workers read only their own experts,
    later, where a failure shows only in Serve's logs, and transformers would refuse a checkpoint whose shapes differ
    from its config while the workers would compute with them."""
    folder = _local_dir(checkpoint_dir)
    layout = load_layout(folder)
    with _Shards(folder) as shards:
        for shard in sorted(set(shards.weight_map.values())):
            stored = set(shards.open_shard(shard).keys())
            missing = sorted(name for name, file in shards.weight_map.items() if file == shard and name not in stored)
            if missing:
                raise ValueError(f"{folder / shard} lacks {len(missing)} tensor(s) the index puts there: {missing[:4]}")
        for decoder_layer in layout.moe_layers:
            _check_layer_experts(shards, layout, decoder_layer)


_OTHER_EXPERT = re.compile(r"(^|\.)experts\.[1-9][0-9]*\.")  # a per-expert tensor of an expert other than 0


def storage_groups(checkpoint_dir: str | Path) -> list[tuple[int, int]]:
    """(a MoE layer, how many MoE layers are stored as it is) for each way the MoE layers' tensors are stored: their
    names past the layer's prefix and their dtypes, from the safetensors headers (experts after the first left out).
    A checkpoint may leave some layers unquantized (an ignore list): one expert of each group tells what the experts
    of all take."""
    folder = _local_dir(checkpoint_dir)
    layout = load_layout(folder)
    with _Shards(folder) as shards:
        by_layer: dict[str, list[str]] = {}
        for name in shards.weight_map:
            if name.startswith(shards.layers):
                by_layer.setdefault(name[len(shards.layers):].split(".", 1)[0], []).append(name)
        groups: dict[tuple, list[int]] = {}
        for moe_layer, decoder_layer in enumerate(layout.moe_layers):
            prefix = f"{shards.layers}{decoder_layer}."
            signature = tuple(sorted((name[len(prefix):], shards.file(name).get_slice(name).get_dtype())
                                     for name in by_layer.get(str(decoder_layer), ())
                                     if not _OTHER_EXPERT.search(name[len(prefix):])))
            groups.setdefault(signature, []).append(moe_layer)
    return [(layers[0], len(layers)) for layers in groups.values()]


def _check_layer_experts(shards: _Shards, layout: ExpertLayout, decoder_layer: int) -> None:
    """ValueError naming what is wrong unless every expert of ``decoder_layer`` is stored whole (see
    `check_checkpoint`)."""
    prefix, num = f"{shards.layers}{decoder_layer}.", layout.num_experts
    h, i = layout.hidden_size, layout.intermediate_size
    where = f"decoder layer {decoder_layer}"
    if layout.architecture == "gpt_oss":  # fused: bf16 [E, H, 2I] and [E, I, H], or MXFP4 blocks of 32 values (16
        # bytes) with a scale each; and the biases. (Only down_proj was looked for, twice, and no shape checked: a
        # missing gate_up_proj failed in a worker, a short one as an IndexError, a config of other sizes was served.)
        checks = []
        for proj, dense, blocks in (("gate_up_proj", (2 * i, h), (2 * i, h // 32)), ("down_proj", (h, i), (h, i // 32))):
            name = prefix + f"mlp.experts.{proj}"
            if name in shards:
                checks.append((name, dense, _FLOAT_DTYPES))
            elif name + "_blocks" in shards and name + "_scales" in shards:
                checks += [(name + "_blocks", (*blocks, 16), ("U8",)), (name + "_scales", blocks, ("U8",))]
            else:
                raise ValueError(f"checkpoint has no {name} (nor its MXFP4 _blocks and _scales) for {where}")
            checks.append((name + "_bias", dense[:1], _FLOAT_DTYPES))
        for name, shape, dtypes in checks:
            _check_fused(shards, name, num, shape, dtypes, where)
        return
    gated = [(fmt, [(i, h), (i, h), (h, i)]) for fmt in _PER_EXPERT_FORMATS]
    for fmt, shapes in (*gated, (_UNGATED_PER_EXPERT, [(i, h), (h, i)])):
        if all(_stored(shards, prefix + suffix.format(e=0)) for suffix in fmt):
            for expert in range(num):
                for suffix, shape in zip(fmt, shapes):
                    name = prefix + suffix.format(e=expert)
                    if not _stored(shards, name):
                        raise ValueError(f"checkpoint has no {name} (expert {expert} of {where})")
                    if name in shards:
                        _check_header(shards, name, shape)
                    else:  # packed: compressed-tensors' INT4/INT8 or NVFP4, checked against the config's sizes too
                        _check_packed_header(shards, name, shape)
            return
    fmt = next((f for f in (*_FUSED_FORMATS, _UNGATED_FUSED) if all(prefix + n in shards for n in f)), None)
    if fmt is None:
        raise ValueError(f"checkpoint has no tensors for expert 0 of {where}")
    first = (i, h) if fmt == _UNGATED_FUSED else (2 * i, h)
    for name, shape in zip(fmt, (first, (h, i))):
        _check_fused(shards, prefix + name, num, shape, _FLOAT_DTYPES, where)


def _check_fused(shards: _Shards, name: str, num: int, shape: tuple[int, ...], dtypes: tuple[str, ...],
                 where: str) -> None:
    """ValueError unless fused tensor ``name`` is [num] + ``shape`` (its dimensions after the first in either order:
    fused experts may be stored transposed, [E, H, 2I] as Qwen3-VL-MoE's and Llama 4's) in one of ``dtypes`` (an
    integer fused tensor passed, and the workers computed with its values cast to floats)."""
    if name not in shards:
        raise ValueError(f"checkpoint has no {name} for {where}")
    view = shards.open_shard(shards.weight_map[name]).get_slice(name)
    stored, dtype = tuple(view.get_shape()), view.get_dtype()
    if stored[0] != num or sorted(stored[1:]) != sorted(shape) or dtype not in dtypes:
        raise ValueError(f"{name} is {list(stored)} {dtype}, expected [{num}] + {list(shape)} (either order) in "
                         f"{' or '.join(dtypes)} for {num} experts of {where}")


# safetensors dtype names of packed weights' tensors, as torch reads them
_PACKED_DTYPES = {"I32": torch.int32, "U8": torch.uint8, "F8_E4M3": torch.float8_e4m3fn, "F32": torch.float32,
                  "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64, "I64": torch.int64}


def _check_packed_header(shards: _Shards, name: str, shape: tuple[int, int]) -> None:
    """ValueError naming ``name`` unless its packed tensors (``_packed``, ``_scale``, and ``_shape`` for integers or
    ``_global_scale`` for NVFP4) are there and hold a weight of ``shape`` (config.json's sizes: a packed expert of
    other sizes was computed with its own), and no ``_g_idx`` (columns in another order than their groups)."""
    def meta(suffix: str) -> torch.Tensor:
        if name + suffix not in shards:
            raise ValueError(f"packed weight {name} has no {name + suffix}")
        view = shards.file(name + suffix).get_slice(name + suffix)
        return torch.empty(view.get_shape(), dtype=_PACKED_DTYPES.get(view.get_dtype(), torch.bool), device="meta")

    if name + "_g_idx" in shards:
        raise ValueError(f"packed weight {name} has a {name}_g_idx (activation ordering by group), which is not read")
    packed, scale = meta("_packed"), meta("_scale")
    if name + "_global_scale" in shards:
        check_nvfp4(packed, scale, meta("_global_scale"), name)
        stored = (packed.shape[0], packed.shape[1] * 2)
    else:
        meta("_shape")
        stored = tuple(shards.file(name + "_shape").get_tensor(name + "_shape").reshape(-1).tolist())
        if len(stored) == 2:
            int_packed_bits(packed, scale, stored, name)
    if stored != shape:
        raise ValueError(f"packed weight {name} holds a {list(stored)} weight, expected {list(shape)} (config.json's "
                         f"hidden and expert intermediate sizes)")


def _check_header(shards: _Shards, name: str, shape: tuple[int, int]) -> None:
    view = shards.open_shard(shards.weight_map[name]).get_slice(name)
    stored, dtype = tuple(view.get_shape()), view.get_dtype()
    if stored != shape or dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} is {list(stored)} {dtype}, expected {list(shape)} (config.json's hidden and expert "
                         f"intermediate sizes) in a float or FP8 dtype")
    if dtype.startswith("F8"):  # its block scales: the grid `fp8_grid` reads it with
        scale = name + "_scale_inv"
        if scale not in shards:
            raise ValueError(f"FP8 weight {name} has no {scale}")
        view = shards.open_shard(shards.weight_map[scale]).get_slice(scale)
        if view.get_dtype() not in _SCALE_DTYPES:
            raise ValueError(f"{scale} is {view.get_dtype()}: FP8 block scales must be stored as floats, or as U8 "
                             "power-of-two exponents (E8M0)")
        grid = tuple(view.get_shape())
        fp8_grid(torch.empty(shape, device="meta"), torch.empty(grid, device="meta"), name, shards.fp8_block)


class _Shards:
    """The safetensors files of a checkpoint folder, each opened on first use, closed on exit."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.weight_map = _weight_map(folder)
        self.layers = next((prefix for prefix in _LAYER_PREFIXES
                            if any(name.startswith(prefix) for name in self.weight_map)), _LAYER_PREFIXES[-1])
        self.fp8_block = fp8_block_size(folder)
        self._stack = ExitStack()
        self._open: dict[str, object] = {}

    def __enter__(self) -> _Shards:
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file(self, name: str):
        """The open file holding tensor `name`."""
        return self.open_shard(self.weight_map[name])

    def open_shard(self, shard: str):
        """The open safetensors file `shard`; ValueError naming it if it is missing or not one (truncated)."""
        if shard not in self._open:
            path = self.folder / shard
            if not path.is_file():
                raise ValueError(f"checkpoint shard {path} is missing (an incomplete download?)")
            try:
                self._open[shard] = self._stack.enter_context(safe_open(path, framework="pt"))
            except Exception as exc:  # safetensors' SafetensorError names neither the file nor the cause plainly
                raise ValueError(f"checkpoint shard {path} is not a whole safetensors file (truncated or "
                                 f"corrupt?): {exc}") from exc
        return self._open[shard]


def _read_expert(shards: _Shards, decoder_layer: int, expert: int, dtype: torch.dtype,
                 quantized: bool) -> dict[str, torch.Tensor]:
    """"gate_up" [2I, H] and "down" [H, I] of one expert ("up" [I, H] and "down" without a gate) from whichever
    key format the checkpoint uses; FP8 weights (with their block scales) dequantized to ``dtype``, or kept
    with their scales if ``quantized``."""
    prefix = f"{shards.layers}{decoder_layer}."
    for fmt in (*_PER_EXPERT_FORMATS, _UNGATED_PER_EXPERT):
        names = [prefix + suffix.format(e=expert) for suffix in fmt]
        if all(_stored(shards, name) for name in names):
            *inputs, down = (_weight(shards, name, dtype, quantized) for name in names)
            tensors = {"down" + k: t.contiguous() for k, t in down.items()}
            if len(inputs) == 1:  # no gate
                return {**{"up" + k: t for k, t in inputs[0].items()}, **tensors}
            gate, up = inputs
            if gate.keys() != up.keys() or any(gate[k].shape != up[k].shape for k in gate):
                raise ValueError(f"expert {expert} of decoder layer {decoder_layer}: its gate and up projections "
                                 f"must be quantized alike to be held quantized")
            # each of gate's and up's tensors (scales too) stacks as their rows do
            return {**{"gate_up" + k: (torch.cat([gate[k], up[k]], dim=0) if k != "_shape"  # [rows, cols]
                                       else torch.stack([gate[k][0] + up[k][0], gate[k][1]])) for k in gate},
                    **tensors}
    for fmt in (*_FUSED_FORMATS, _UNGATED_FUSED):
        names = [prefix + suffix for suffix in fmt]
        if not all(name in shards for name in names):
            continue
        # get_slice reads only this expert's rows of the fused tensors
        first, down = (shards.file(name).get_slice(name)[expert] for name in names)
        ungated = fmt == _UNGATED_FUSED  # (up [I, H] has as many rows as down [H, I] has columns: never transposed)
        if not ungated and first.shape[0] == down.shape[1]:  # [H, 2I], [I, H] (Qwen3-VL-MoE's, Llama 4's): transposed
            first, down = first.T, down.T
        first, down = first.contiguous(), down.contiguous()
        if first.dtype in FP8_DTYPES or down.dtype in FP8_DTYPES:
            raise ValueError(f"fused FP8 experts (decoder layer {decoder_layer}) are not supported: FP8 checkpoints "
                             f"are read with per-expert weights and their weight_scale_inv")
        return {"up" if ungated else "gate_up": first, "down": down}
    raise ValueError(f"checkpoint has no tensors for expert {expert} of decoder layer {decoder_layer}")


def _stored(shards: _Shards, name: str) -> bool:
    """Whether weight ``name`` is in the checkpoint, as itself or packed (compressed-tensors' ``weight_packed``)."""
    return name in shards or name + "_packed" in shards


def _weight(shards: _Shards, name: str, dtype: torch.dtype, quantized: bool) -> dict[str, torch.Tensor]:
    """Weight ``name`` as ``{"": tensor}``; a quantized one dequantized to ``dtype`` bit for bit as its library
    loads it, or with ``quantized`` held as stored: an FP8 one beside its per-block ``weight_scale_inv``
    (``"_scale_inv"``, float32, 2-D: a single scale is a 1 x 1 grid), a pack-quantized integer one as
    ``"_packed"`` (int32), ``"_scale"`` (its dtype) and ``"_shape"`` (the weight's [rows, cols]), an NVFP4 one as
    ``"_packed"`` (uint8), ``"_scale"`` (FP8) and ``"_global_scale"`` (float32, one per row)."""
    if name + "_global_scale" in shards:  # compressed-tensors' NVFP4: weight_packed, _scale, _global_scale
        packed, scale, global_scale = (shards.file(name + suffix).get_tensor(name + suffix)
                                       for suffix in ("_packed", "_scale", "_global_scale"))
        global_scale = global_scale.reshape(1) if global_scale.numel() == 1 else global_scale
        check_nvfp4(packed, scale, global_scale, name)
        if quantized:  # (a [rows] global scale: gate's and up's stack as their rows do)
            return {"_packed": packed, "_scale": scale, "_global_scale": global_scale.expand(packed.shape[0]).clone()}
        return {"": dequantize_nvfp4(packed, scale, global_scale, dtype)}
    if name + "_packed" in shards:  # name: "....weight"; compressed-tensors' weight_packed, _scale, _shape
        packed, scale, shape = (shards.file(name + suffix).get_tensor(name + suffix)
                                for suffix in ("_packed", "_scale", "_shape"))
        shape = shape.to(torch.int64).reshape(2)
        int_packed_bits(packed, scale, tuple(shape.tolist()), name)
        if quantized:
            return {"_packed": packed, "_scale": scale, "_shape": shape}
        return {"": dequantize_int_packed(packed, scale, tuple(shape.tolist()), dtype)}
    tensor = shards.file(name).get_tensor(name)
    if tensor.dtype not in FP8_DTYPES:
        return {"": tensor}
    scale_name = name + "_scale_inv"
    if scale_name not in shards:
        raise ValueError(f"FP8 weight {name} has no {scale_name}")
    scales = shards.file(scale_name).get_tensor(scale_name)
    # a U8 scale is an E8M0 exponent, as transformers' Fp8Dequantize reads it (read as a number, every weight was
    # off by a factor of 2 ** (byte - 127) / byte, the checkpoint accepted)
    scales = torch.exp2(scales.float() - 127.0) if scales.dtype == torch.uint8 else scales.to(torch.float32)
    bm, bn = fp8_grid(tensor, scales, name, shards.fp8_block)
    scales = scales if scales.dim() == 2 else scales.reshape(1, 1)
    if not quantized:
        return {"": dequantize_fp8(tensor, scales, dtype, shards.fp8_block)}
    if tensor.shape[0] % bm or tensor.shape[1] % bn:  # held, each call infers its blocks from the grid
        raise ValueError(f"FP8 weight {name} {tuple(tensor.shape)} ends in partial blocks of {bm} x {bn}: experts held "
                         f"quantized need whole blocks (serve it with keep_quantized_experts: false)")
    return {"": tensor, "_scale_inv": scales}


def _read_gpt_oss_expert(shards: _Shards, decoder_layer: int, expert: int, dtype: torch.dtype,
                         quantized: bool) -> dict[str, torch.Tensor]:
    """One GPT-OSS expert's tensors, in transformers' layout ([H, 2I] and [I, H]); MXFP4 weights dequantized,
    or kept as their blocks and scales if ``quantized``."""
    prefix = f"{shards.layers}{decoder_layer}.mlp.experts."
    tensors = {}
    for proj, name in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
        for key, suffix in ((name, ""), (f"{name}_bias", "_bias")):
            full = prefix + proj + suffix
            if full in shards:  # get_slice reads only this expert's rows of the fused tensor
                tensors[key] = shards.file(full).get_slice(full)[expert].contiguous()
        blocks, scales = prefix + proj + "_blocks", prefix + proj + "_scales"
        if name not in tensors and blocks in shards and scales in shards:
            blocks, scales = (shards.file(full).get_slice(full)[expert].contiguous() for full in (blocks, scales))
            if quantized:
                check_mxfp4_blocks(blocks, scales)  # now, not at the first call
                tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            else:
                tensors[name] = dequantize_mxfp4(blocks, scales, dtype)
        if not ({name, f"{name}_blocks"} & tensors.keys()) or f"{name}_bias" not in tensors:
            raise ValueError(f"checkpoint has no tensors for expert {expert} of decoder layer {decoder_layer}")
    return tensors


def _weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name (relative to `folder`)."""
    index = folder / _INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map of tensor name "
                             f"-> file name): {exc!r}") from exc
        for file in set(weight_map.values()):
            if Path(file).name != file:
                raise ValueError(f"{index} names a shard outside the folder: {file!r}")
        return weight_map
    single = folder / _SINGLE_FILE
    if not single.is_file():
        raise ValueError(f"{folder} has neither {_SINGLE_FILE} nor {_INDEX_FILE}")
    try:
        with safe_open(single, framework="pt") as file:
            return dict.fromkeys(file.keys(), _SINGLE_FILE)
    except Exception as exc:  # (SafetensorError: "incomplete metadata, file not fully covered")
        raise ValueError(f"checkpoint file {single} is not a whole safetensors file (truncated or corrupt?): "
                         f"{exc}") from exc


def _local_dir(checkpoint_dir: str | Path) -> Path:
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {str(checkpoint_dir)!r} does not exist (paths are local only)")
    return folder


def resolve_checkpoint(path: str | Path, allowed_roots: Sequence[str | Path]) -> Path:
    """The real path of a checkpoint folder that lies inside one of `allowed_roots`.

    A relative `path` is looked up under each root in order; an absolute one must resolve (symlinks
    followed) to a folder inside a root. Hub ids are never fetched: "org/model" is just a relative path.

    Raises:
        ValueError: naming `path` when it resolves outside every root, or is not a folder with config.json.
    """
    roots = [Path(root).resolve() for root in allowed_roots]
    if not roots:
        raise ValueError(f"no allowed model folders configured; cannot load {str(path)!r}")
    given = Path(path)
    candidates = [given.resolve()] if given.is_absolute() else [(root / given).resolve() for root in roots]
    for candidate in candidates:
        inside = any(candidate.is_relative_to(root) for root in roots)
        if inside and (candidate / "config.json").is_file():
            return candidate
    reason = "no such folder"
    for candidate in reversed(candidates):  # why the first that exists was refused
        if candidate.exists() and not any(candidate.is_relative_to(root) for root in roots):
            reason = f"it resolves to {str(candidate)!r} (symlinks followed): add its folder to the allowed folders"
        elif candidate.is_file():
            reason = "it is a file"
        elif candidate.is_dir():
            reason = f"{str(candidate)!r} has no config.json"
    raise ValueError(f"model path {str(path)!r} is not a checkpoint folder inside the allowed folders "
                     f"{[str(root) for root in roots]}: {reason}")
