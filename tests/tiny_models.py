"""Tiny random Mixture-of-Experts checkpoints for tests and benchmarks, saved with `save_pretrained`.

Owns the configs of the small models (Qwen3-MoE, Qwen2-MoE with a shared expert, Mixtral, OLMoE,
DeepSeek-V2 (as V2-Lite), DeepSeek-V3, GLM-4.5, GLM-4.7-Flash, MiniMax-M2, ERNIE-4.5, dots.llm1, GPT-OSS,
Hunyuan-A13B, Phi-3.5-MoE, Solar Open, AFMoE, Laguna, Cohere2-MoE, FlexOlmo, EXAONE-MoE, MiMo-V2-Flash) and writing them,
seeded, into a folder (GPT-OSS's also with MXFP4 experts, as OpenAI released it). Each config exercises a layout detail:
Qwen3-MoE has a dense `mlp_only_layers` layer and top-4 routing, Qwen2-MoE has `decoder_sparse_step=2`
(every other layer is MoE), Mixtral keeps its `block_sparse_moe` keys on disk, OLMoE has more experts than
the others, DeepSeek-V3 has a dense first layer, a shared expert, group-limited sigmoid routing and
multi-head latent attention (values narrower than keys), GLM-4.5 the same routing with partial rotary
GQA attention, GPT-OSS clamped SwiGLU experts with biases, attention sinks and alternating sliding-window
layers, Hunyuan a shared MLP and its top_k given per layer, Phi-3.5-MoE sparsemixer routing, biases and its
`block_sparse_moe` keys on disk, Solar Open group-limited routing in every layer, AFMoE a dense first layer,
muP input scaling and gated attention with a NoPE full-attention layer between sliding ones, Laguna a
different number of query heads per layer, Cohere2-MoE attention and MoE in parallel with sliding and NoPE
layers after a dense one, FlexOlmo q/k norms over all heads, EXAONE-MoE full-attention layers that keep the
sliding window as an attribute they do not use, MiMo-V2-Flash sliding layers with twice the kv heads and
sinks, values narrower than keys, GLM-5 (`glm_moe_dsa`) DeepSeek-V3.2's indexer with interleaved RoPE in two
layers and two "shared" layers attending the choice of the layer before, Mistral 4 DeepSeek-V3's latent attention
with its queries scaled by position (Llama 4's beta over 8-position spans), Hy3 (`hy_v3`) a dense first layer,
sigmoid routing with a score bias and a scale, a shared expert added in fp32, q/k norms, GLM-4.5V (`glm4v_moe`, saved
as the vision-language model its releases are) GLM-4.5's layers with multimodal RoPE on half of each head, Qwen3-VL-MoE
(`qwen3_vl_moe`, the same) Qwen3-MoE's layers with interleaved multimodal RoPE, its experts fused and transposed on
disk, Nemotron-H (`nemotron_h`, its layers given as its releases give them, by `hybrid_override_pattern`) a
Mamba2 layer, an attention layer without RoPE, a dense MLP layer and two MoE layers of experts without a gate
(relu2), group-limited sigmoid routing with a score bias and a scale and a shared expert, saved
under `backbone.` as its releases are, Granite 4.0's hybrid (`granitemoehybrid`) Mamba2 layers around a NoPE
attention layer, each with MoE and a shared MLP, its muP-style multipliers, and its experts fused on disk
(`block_sparse_moe.input_linear`) as its releases store them, Granite 3's MoE (`granitemoe`) and IBM's MoE with a
shared expert (`granitemoeshared`, a dense shared MLP) RoPE attention and MoE in every layer with the same
multipliers, Gemma 4 (`gemma4`, saved as the vision-language model its release is, and `gemma4_text`, its
language model alone, in GEMMA4_ARCHITECTURES) a dense MLP beside the MoE block in every layer, sliding layers and
a wider full-attention layer whose keys are its values, soft-capped final logits (`gemma4_text_config`), Kimi-Linear (`kimi_linear`, its layers and KDA heads given as its release's config gives
them) KDA linear-attention layers around a latent-attention layer without RoPE, a dense first layer, then MoE with
group-limited sigmoid routing, a score bias, a scale and a shared expert, MiniMax-Text-01 (`minimax`) lightning
attention layers (blocks of 8 positions) around a softmax-attention layer with RoPE, MoE in every layer and its
residual weights. Llama 4
(`llama4`, saved as the vision-language model its releases are, and `llama4_text`, its language model alone) has dense and MoE layers interleaved, top-1 sigmoid routing that scales
the expert's input, a shared expert, chunked attention with 8-position chunks on its RoPE layers (with q/k L2
norms) and a NoPE full-attention layer with attention temperature tuning that grows every 4 positions; it is
in LLAMA4_ARCHITECTURES, not TINY_ARCHITECTURES (whose checkpoint tests read `mlp.experts` untransposed).
Ignores tokenizers: the models read token ids only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AfmoeConfig,
    AutoModelForCausalLM,
    Cohere2MoeConfig,
    DeepseekV2Config,
    DeepseekV3Config,
    DeepseekV32Config,
    Dots1Config,
    Ernie4_5_MoeConfig,
    ExaoneMoeConfig,
    FlexOlmoConfig,
    Gemma4Config,
    Gemma4TextConfig,
    Glm4MoeConfig,
    Glm4MoeLiteConfig,
    Glm4vMoeConfig,
    GlmMoeDsaConfig,
    GptOssConfig,
    GraniteMoeConfig,
    GraniteMoeHybridConfig,
    GraniteMoeSharedConfig,
    HunYuanMoEV1Config,
    HYV3Config,
    KimiLinearConfig,
    LagunaConfig,
    Llama4Config,
    Llama4TextConfig,
    MiMoV2FlashConfig,
    MiniMaxConfig,
    MiniMaxM2Config,
    Mistral4Config,
    MixtralConfig,
    NemotronHConfig,
    OlmoeConfig,
    PhimoeConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3_5MoeConfig,
    Qwen3MoeConfig,
    Qwen3NextConfig,
    Qwen3VLMoeConfig,
    SolarOpenConfig,
)

import service.model  # noqa: F401  (maps mistral4 to Mistral4ForCausalLM for AutoModelForCausalLM)

VOCAB_SIZE = 256
# Larger than the default 0.02 so that random logits are well separated and greedy decoding does not
# hinge on rounding-level differences between equivalent computations.
INITIALIZER_RANGE = 0.1
_COMMON = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, initializer_range=INITIALIZER_RANGE, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, tie_word_embeddings=False,
)


def tiny_config(architecture: str) -> PretrainedConfig:
    """The tiny config of `architecture`: one of TINY_ARCHITECTURES."""
    if architecture == "qwen3_moe":
        return Qwen3MoeConfig(**_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=3, num_experts=8, num_experts_per_tok=4, mlp_only_layers=[1])
    if architecture == "qwen2_moe":
        return Qwen2MoeConfig(**_COMMON, intermediate_size=96, moe_intermediate_size=32,
                              shared_expert_intermediate_size=48, num_hidden_layers=4, num_experts=8,
                              num_experts_per_tok=2, decoder_sparse_step=2)
    if architecture == "mixtral":
        return MixtralConfig(**_COMMON, intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
                             num_experts_per_tok=2)
    if architecture == "olmoe":
        return OlmoeConfig(**{**_COMMON, "num_key_value_heads": 4}, intermediate_size=32, num_hidden_layers=2,
                           num_experts=16, num_experts_per_tok=4)
    if architecture == "minimax_m2":  # every layer MoE, sigmoid routing with a score bias, q/k norms
        return MiniMaxM2Config(**_COMMON, head_dim=16, intermediate_size=32, num_hidden_layers=2,
                               num_local_experts=8, num_experts_per_tok=2)
    if architecture == "ernie4_5_moe":  # MoE from layer 1 every other layer (start index and interval)
        return Ernie4_5_MoeConfig(**_COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                                  moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1,
                                  moe_layer_interval=2)
    routing = dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                   intermediate_size=96, first_k_dense_replace=1, num_hidden_layers=3, routed_scaling_factor=2.5)
    if architecture == "deepseek_v2":  # as DeepSeek-V2-Lite: no query compression, greedy top-k
        return DeepseekV2Config(**{**_COMMON, "num_key_value_heads": 4}, **routing, q_lora_rank=None,
                                kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                                topk_method="greedy")
    if architecture == "deepseek_v3":
        return DeepseekV3Config(**{**_COMMON, "num_key_value_heads": 4}, **routing, n_group=4, topk_group=2,
                                q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                v_head_dim=12)
    if architecture == "deepseek_v32":  # DeepSeek-V3's, with a DSA indexer keeping the 6 best keys per query
        return DeepseekV32Config(**{**_COMMON, "num_key_value_heads": 4}, **routing, n_group=4, topk_group=2,
                                 q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                 v_head_dim=12, index_n_heads=16, index_head_dim=16, index_topk=6)
    if architecture == "glm_moe_dsa":  # GLM-5: V3.2's indexer with interleaved RoPE; layers 1 and 3 reuse 0's and 2's
        return GlmMoeDsaConfig(**{**_COMMON, "num_key_value_heads": 4}, **{**routing, "num_hidden_layers": 4},
                               n_group=4, topk_group=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                               qk_rope_head_dim=8, v_head_dim=12, index_n_heads=16, index_head_dim=16, index_topk=6,
                               indexer_types=["full", "shared", "full", "shared"])
    if architecture == "mistral4":  # DeepSeek-V3's latent attention and routing; queries scaled every 8 positions
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 32.0, "original_max_position_embeddings": 8,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}
        return Mistral4Config(**{**_COMMON, "num_key_value_heads": 4}, **routing, n_group=4, topk_group=2,
                              q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                              rope_parameters=rope)
    if architecture == "hy_v3":  # a dense first layer, sigmoid routing scaled in fp32, a shared expert, q/k norms
        return HYV3Config(**_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                          num_experts=8, num_experts_per_tok=2, num_shared_experts=1, router_scaling_factor=2.5)
    if architecture == "glm4v_moe":  # GLM-4.5's layers (multimodal RoPE on half the head) in a vision-language model
        text = dict(**{k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"}, **routing, n_group=1,
                    topk_group=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]})
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        return Glm4vMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    if architecture == "qwen3_vl_moe":  # Qwen3-MoE's layers (a dense first one) with interleaved multimodal RoPE;
        # 2I != H: transformers tells its releases' transposed experts apart by shape (check_dims)
        text = dict(**{k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"}, head_dim=16,
                    intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3, num_experts=8,
                    num_experts_per_tok=2, mlp_only_layers=[0], tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                     "mrope_interleaved": True})
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      deepstack_visual_indexes=[0])
        return Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    if architecture == "glm4_moe_lite":  # GLM-4.7-Flash: latent attention, dense and sparse layers by type
        lite = {k: v for k, v in routing.items() if k != "first_k_dense_replace"}
        return Glm4MoeLiteConfig(**{**_COMMON, "num_key_value_heads": 4}, **lite, n_group=1, topk_group=1,
                                 q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                 v_head_dim=12, mlp_layer_types=["dense", "sparse", "sparse"])
    if architecture == "dots1":  # DeepSeek-V3's routing, standard attention with a sliding window on layer 2
        return Dots1Config(**_COMMON, **routing, head_dim=16, n_group=1, topk_group=1, sliding_window=4,
                           layer_types=["full_attention", "full_attention", "sliding_attention"])
    if architecture == "gpt_oss":  # clamped SwiGLU experts with biases, sinks, sliding window on layer 0
        return GptOssConfig(**_COMMON, head_dim=16, intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
                            num_experts_per_tok=2, sliding_window=4,
                            rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                             "truncate": False, "original_max_position_embeddings": 8,
                                             "rope_theta": 150000.0})
    if architecture == "glm4_moe":
        return Glm4MoeConfig(**_COMMON, **routing, head_dim=16, n_group=1, topk_group=1, use_qk_norm=True,
                             partial_rotary_factor=0.5)
    if architecture == "hunyuan_v1_moe":  # a shared MLP, q/k norms after RoPE, an fp32 router, top_k per layer
        return HunYuanMoEV1Config(**_COMMON, head_dim=16, intermediate_size=32, num_hidden_layers=2, num_experts=8,
                                  moe_topk=[2, 2])
    if architecture == "phimoe":  # sparsemixer routing, LayerNorms, biases; block_sparse_moe keys on disk
        return PhimoeConfig(**_COMMON, intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
                            num_experts_per_tok=2, attention_bias=True, lm_head_bias=True)
    if architecture == "solar_open":  # every layer MoE, group-limited sigmoid routing, a shared expert
        return SolarOpenConfig(**_COMMON, head_dim=16, moe_intermediate_size=32, num_hidden_layers=2,
                               n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
                               routed_scaling_factor=2.5)
    if architecture == "afmoe":  # a dense first layer, muP input scaling, gated attention, NoPE full layer 1
        return AfmoeConfig(**_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                           num_dense_layers=1, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                           route_scale=2.5, sliding_window=4, global_attn_every_n_layers=2, mup_enabled=True)
    if architecture == "exaone_moe":  # a dense first layer, a shared expert, sliding layers and a full one
        return ExaoneMoeConfig(**_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                               num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, sliding_window=4,
                               sliding_window_pattern=2, first_k_dense_replace=1)
    if architecture == "mimo_v2_flash":  # sliding layers with twice the kv heads and sinks, values narrower
        return MiMoV2FlashConfig(**{**_COMMON, "num_key_value_heads": 1}, head_dim=16, v_head_dim=12,
                                 intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                                 n_routed_experts=8, num_experts_per_tok=2, sliding_window=4)
    if architecture == "qwen3_next":  # gated DeltaNet linear attention in 3 of 4 layers, gated full attention
        return Qwen3NextConfig(**_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                               shared_expert_intermediate_size=48, num_hidden_layers=4, num_experts=8,
                               num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=4,
                               linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4)
    if architecture == "qwen3_5_moe":  # Qwen3-Next's layers (all MoE) inside a vision-language model
        text = dict(vocab_size=VOCAB_SIZE, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, initializer_range=INITIALIZER_RANGE, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0, head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                    num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, linear_num_key_heads=2,
                    linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                    linear_conv_kernel_dim=4)
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        return Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    if architecture == "laguna":  # per-layer query heads, per-head softplus gates, a sliding layer, dense first
        return LagunaConfig(**_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                            shared_expert_intermediate_size=48, num_hidden_layers=3, num_experts=8,
                            num_experts_per_tok=2, sliding_window=4, num_attention_heads_per_layer=[4, 8, 4],
                            layer_types=["full_attention", "sliding_attention", "full_attention"],
                            moe_routed_scaling_factor=2.5)
    if architecture == "cohere2_moe":  # parallel attention and MoE, a dense first layer, sliding and NoPE layers
        return Cohere2MoeConfig(**_COMMON, head_dim=16, intermediate_size=32, prefix_dense_intermediate_size=96,
                                num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                                sliding_window=4, sliding_window_pattern=2, first_k_dense_replace=1)
    if architecture == "flex_olmo":  # every layer MoE, q/k norms over all heads
        return FlexOlmoConfig(**_COMMON, intermediate_size=32, num_hidden_layers=2, num_experts=8,
                              num_experts_per_tok=2)
    if architecture == "nemotron_h":  # Mamba2, MoE (relu2 experts without a gate), attention without RoPE, a dense
        # MLP, MoE ("ME*-E"); sigmoid group-limited routing with a score bias and a scale, a shared expert; Mamba2
        # chunks of 8 positions
        return NemotronHConfig(**_COMMON, head_dim=16, hybrid_override_pattern="ME*-E",
                               mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4,
                               chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                               moe_shared_expert_intermediate_size=48, intermediate_size=96, n_group=4, topk_group=2,
                               routed_scaling_factor=2.5)
    if architecture == "kimi_linear":  # KDA linear attention, MLA without RoPE, KDA; a dense first layer, then MoE
        # with group-limited sigmoid routing, a score bias, a scale and a shared expert
        # (layer types and KDA heads given as its release's config gives them: 1-indexed layers)
        kda = dict(kda_layers=[1, 3], full_attn_layers=[2], num_heads=4, head_dim=16, short_conv_kernel_size=4)
        return KimiLinearConfig(**{**_COMMON, "num_key_value_heads": 4}, num_hidden_layers=3, linear_attn_config=kda,
                                first_k_dense_replace=1, num_local_experts=8,
                                num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                                intermediate_size=96, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                v_head_dim=12)
    if architecture == "minimax":  # lightning attention (blocks of 8 positions), softmax attention with RoPE, lightning;
        # MoE in every layer, MiniMax's residual weights (alpha, beta) after each attention and MoE
        return MiniMaxConfig(**_COMMON, head_dim=16, intermediate_size=32, num_hidden_layers=3, num_local_experts=8,
                             num_experts_per_tok=2, block_size=8,
                             layer_types=["linear_attention", "full_attention", "linear_attention"],
                             linear_attn_alpha_factor=1.5, linear_attn_beta_factor=0.8, full_attn_alpha_factor=1.2,
                             full_attn_beta_factor=0.9, mlp_alpha_factor=1.1, mlp_beta_factor=0.7)
    if architecture == "granitemoehybrid":  # Mamba2, NoPE attention, Mamba2, each with MoE and a shared MLP;
        # Granite's embedding, attention, residual and logits multipliers
        return GraniteMoeHybridConfig(**_COMMON, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
                                      mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_n_groups=2,
                                      mamba_d_conv=4, mamba_chunk_size=8, num_local_experts=8, num_experts_per_tok=2,
                                      intermediate_size=32, shared_intermediate_size=48, embedding_multiplier=12.0,
                                      attention_multiplier=0.0625, residual_multiplier=0.22, logits_scaling=4.0,
                                      position_embedding_type="nope")
    granite = dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
                   embedding_multiplier=12.0, attention_multiplier=0.0625, residual_multiplier=0.22, logits_scaling=4.0)
    if architecture == "granitemoe":  # attention with RoPE and MoE in every layer, Granite's multipliers
        return GraniteMoeConfig(**_COMMON, **granite)
    if architecture == "granitemoeshared":  # the same with a dense shared MLP beside the experts
        return GraniteMoeSharedConfig(**_COMMON, **granite, shared_intermediate_size=48)
    if architecture in GEMMA4_ARCHITECTURES:
        text = gemma4_text_config()
        if architecture == "gemma4_text":
            return Gemma4TextConfig(**text)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16)
        return Gemma4Config(text_config=text, vision_config=vision)
    if architecture in LLAMA4_ARCHITECTURES:  # MoE layers 1 and 3; RoPE layers chunked, layer 3 NoPE and full
        text = dict(**{k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"}, head_dim=16,
                    intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4, num_local_experts=8,
                    num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=8, floor_scale=4,
                    attn_scale=0.25)
        if architecture == "llama4_text":
            return Llama4TextConfig(**text)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56,
                      patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
        return Llama4Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    raise ValueError(f"no tiny config for architecture {architecture!r}; known: "
                     f"{TINY_ARCHITECTURES + LLAMA4_ARCHITECTURES + GEMMA4_ARCHITECTURES}")


def gemma4_text_config(**overrides) -> dict:
    """The tiny Gemma 4 language model's config (`Gemma4TextConfig` arguments), with ``overrides``: a dense MLP beside
    the MoE block in every layer; sliding layers 0 and 1 (4 positions) and a full layer 2 with wider heads (32) and
    one kv head whose keys are its values, partial proportional RoPE; embeddings scaled and tied, final logits
    soft-capped (the 26B-A4B's features, smaller)."""
    return {**{k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"}, "head_dim": 16, "global_head_dim": 32,
            "num_global_key_value_heads": 1, "attention_k_eq_v": True, "intermediate_size": 96,
            "moe_intermediate_size": 32, "num_hidden_layers": 3, "enable_moe_block": True, "num_experts": 8,
            "top_k_experts": 2, "sliding_window": 4, "final_logit_softcapping": 30.0, "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": VOCAB_SIZE, "use_bidirectional_attention": "vision",
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"], **overrides}


TINY_ARCHITECTURES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
                      "glm4_moe_lite", "minimax_m2", "ernie4_5_moe", "dots1", "gpt_oss", "hunyuan_v1_moe", "phimoe",
                      "solar_open", "afmoe", "laguna", "cohere2_moe", "flex_olmo",
                      "exaone_moe", "mimo_v2_flash", "qwen3_next",
                      "qwen3_5_moe", "deepseek_v32", "glm_moe_dsa", "mistral4", "hy_v3",
                      "glm4v_moe", "qwen3_vl_moe", "nemotron_h", "granitemoehybrid",
                      "granitemoe", "granitemoeshared", "gemma4", "kimi_linear", "minimax")
LLAMA4_ARCHITECTURES = ("llama4", "llama4_text")
GEMMA4_ARCHITECTURES = ("gemma4", "gemma4_text")  # (gemma4_text: the language model alone, tests of its own)


def build_tiny_model(architecture: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model (eval mode), the same for the same seed; of a vision-language model
    (Qwen3.5, Llama 4), its language model, which is what `AutoModelForCausalLM` loads from its checkpoint."""
    torch.manual_seed(seed)
    config = tiny_config(architecture)
    return AutoModelForCausalLM.from_config(getattr(config, "text_config", None) or config).eval()


def save_tiny_model(architecture: str, folder: str | Path, seed: int = 0, *, fused: bool = False,
                    max_shard_size: str | None = None) -> Path:
    """Build the tiny model of `architecture` and `save_pretrained` it into `folder`; returns the folder.

    Args:
        fused: write the in-memory fused expert tensors (`mlp.experts.gate_up_proj` [E, 2I, H],
            `mlp.experts.down_proj` [E, H, I]) instead of the default per-expert keys.
        max_shard_size: e.g. "100KB" for a sharded checkpoint with `model.safetensors.index.json`.
    """
    folder = Path(folder)
    kwargs = {"save_original_format": not fused}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model = build_tiny_model(architecture, seed)
    if architecture in ("qwen3_5_moe", "llama4", "glm4v_moe", "qwen3_vl_moe", "gemma4"):  # as their releases' VLMs
        model = as_vlm(model, tiny_config(architecture))
    model.save_pretrained(folder, **kwargs)
    return folder


def as_vlm(language_model: torch.nn.Module, config: PretrainedConfig) -> torch.nn.Module:
    """The Qwen3.5 or Llama 4 vision-language model of `config` (random vision tower) around `language_model` (a
    `Qwen3_5MoeForCausalLM` or `Llama4ForCausalLM` of `config.text_config`), as their checkpoints hold their
    language model (Llama 4's under `language_model.model`, Qwen3.5's under `model.language_model`)."""
    from transformers import (
        Gemma4ForConditionalGeneration,
        Glm4vMoeForConditionalGeneration,
        Llama4ForConditionalGeneration,
        Qwen3_5MoeForConditionalGeneration,
        Qwen3VLMoeForConditionalGeneration,
    )

    if config.model_type == "llama4":
        vlm = Llama4ForConditionalGeneration(config).eval()
        vlm.language_model.load_state_dict(language_model.state_dict())
        return vlm
    vlm_class = {"glm4v_moe": Glm4vMoeForConditionalGeneration, "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
                 "gemma4": Gemma4ForConditionalGeneration}.get(config.model_type, Qwen3_5MoeForConditionalGeneration)
    vlm = vlm_class(config).eval()
    vlm.model.language_model.load_state_dict(language_model.model.state_dict())
    vlm.lm_head.load_state_dict(language_model.lm_head.state_dict())
    return vlm


MXFP4_QUANTIZATION = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                 "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}


def save_tiny_mxfp4_model(folder: str | Path, seed: int = 0) -> Path:
    """The tiny GPT-OSS with its experts' weights in MXFP4, as OpenAI released gpt-oss (`as_mxfp4`)."""
    return as_mxfp4(save_tiny_model("gpt_oss", folder, seed), seed)


def as_mxfp4(folder: str | Path, seed: int = 0) -> Path:
    """Rewrite a saved GPT-OSS checkpoint's experts in MXFP4, as OpenAI released gpt-oss: blocks of 32 FP4
    values with a power-of-two scale each, and a `quantization_config` naming what is not quantized. The
    blocks and scales are random (the weights are what they dequantize to); every other tensor stays."""
    import json

    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    tensors = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name in [name for name in tensors if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, rows, columns = tensors.pop(name).shape  # [E, in, out]: 32-value blocks along `in`
        tensors[name + "_blocks"] = torch.randint(0, 256, (experts, columns, rows // 32, 16), dtype=torch.uint8,
                                                  generator=generator)
        tensors[name + "_scales"] = torch.randint(122, 127, (experts, columns, rows // 32), dtype=torch.uint8,
                                                  generator=generator)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": MXFP4_QUANTIZATION}, indent=2))
    return folder


def save_tiny_fp8_model(architecture: str, folder: str | Path, seed: int = 0, block: int = 8) -> Path:
    """The tiny model of `architecture` with its weights in FP8 with block scales (`as_fp8`)."""
    return as_fp8(save_tiny_model(architecture, folder, seed), build_tiny_model(architecture, seed), block)


def int_packed_quantization(bits: int = 4, group_size: int | None = 16) -> dict:
    """A compressed-tensors `quantization_config` as Kimi-K2-Thinking's: symmetric ``bits``-bit integer weights of
    every Linear packed into int32, a scale per ``group_size`` columns (None: per row), everything but the routed
    experts ignored."""
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False, "observer": "minmax",
               "strategy": "group" if group_size else "channel", "group_size": group_size}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*",
                       "re:.*mlp\\.gate$"], "kv_cache_scheme": None}


def as_int_packed(folder: str | Path, bits: int = 4, group_size: int | None = 16,
                  scale_dtype: torch.dtype = torch.float32, dense: torch.nn.Module | None = None) -> Path:
    """Rewrite the checkpoint saved in `folder` with its routed experts' weights quantized as Kimi-K2-Thinking
    stores them (compressed-tensors' pack-quantized format, written with its own `pack_to_int32`): per-expert
    `weight_packed` (int32), `weight_scale` (``scale_dtype``, one per ``group_size`` columns or per row) and
    `weight_shape`, and `int_packed_quantization`'s config. Everything else stays as it was. The scales are in the
    tiny models' dtype (float32), as a release's are in its own (bf16): transformers leaves the experts it
    decompresses in the scales' dtype. With ``dense``, the model saved in `folder`, its linear layers but the
    lm_head are quantized too, as W4A16 releases (RedHat's, llm-compressor's) quantize them."""
    import json

    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    tensors = load_file(folder / "model.safetensors")
    qmax = 2 ** (bits - 1) - 1
    linear = set() if dense is None else {f"{name}.weight" for name, module in dense.named_modules()
                                          if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    for name in [name for name in tensors if ".experts." in name and name.endswith(".weight") or name in linear]:
        weight = tensors.pop(name).to(torch.float32)
        rows, cols = weight.shape
        groups = weight.reshape(rows, cols // group_size if group_size else 1, -1)
        scale = (groups.abs().amax(dim=-1) / qmax).clamp(min=1e-8).to(scale_dtype)
        values = (groups / scale.to(torch.float32).unsqueeze(-1)).round().clamp(-qmax - 1, qmax)
        base = name.removesuffix("weight")
        tensors[base + "weight_packed"] = pack_to_int32(values.reshape(rows, cols).to(torch.int8), bits)
        tensors[base + "weight_scale"] = scale
        tensors[base + "weight_shape"] = torch.tensor([rows, cols])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    quantization = int_packed_quantization(bits, group_size)
    if dense is not None:
        quantization["ignore"] = ["lm_head"]
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}, indent=2))
    return folder


def as_nvfp4(folder: str | Path) -> Path:
    """Rewrite the checkpoint saved in `folder` with its routed experts' weights in NVFP4 as compressed-tensors
    stores them (`nvfp4-pack-quantized`, packed with its own `pack_fp4_to_uint8`): per-expert `weight_packed`
    (uint8, two FP4 values a byte), `weight_scale` (FP8, one per 16 columns) and `weight_global_scale` (float32
    [1]: 448 x 6 over the weight's largest magnitude), each value the FP4 nearest the weight over its scale;
    activations quantized to FP4 too in the config (RedHat's "NVFP4" scheme), everything but the experts ignored."""
    import json

    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    tensors = load_file(folder / "model.safetensors")
    fp4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    fp4 = torch.cat([-fp4.flip(0), fp4])
    for name in [name for name in tensors if ".experts." in name and name.endswith(".weight")]:
        weight = tensors.pop(name).to(torch.float32)
        rows, cols = weight.shape
        global_scale = 448.0 * 6.0 / weight.abs().amax().clamp(min=1e-8)
        groups = weight.reshape(rows, cols // 16, 16)
        scale = (groups.abs().amax(dim=-1) / 6.0 * global_scale).clamp(min=2**-9).to(torch.float8_e4m3fn)
        scaled = groups / (scale.to(torch.float32) / global_scale).unsqueeze(-1)
        values = fp4[(scaled.unsqueeze(-1) - fp4).abs().argmin(dim=-1)].reshape(rows, cols)
        tensors[name + "_packed"] = pack_fp4_to_uint8(values)
        tensors[name + "_scale"] = scale
        tensors[name + "_global_scale"] = global_scale.reshape(1)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    fp4_args = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
                "dynamic": False, "observer": "static_minmax"}
    quantization = {**int_packed_quantization(), "format": "nvfp4-pack-quantized"}
    quantization["config_groups"]["group_0"].update(
        weights=fp4_args, input_activations={**fp4_args, "dynamic": "local", "observer": "static_minmax"},
        format="nvfp4-pack-quantized")
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}, indent=2))
    return folder


def nvfp4_decompressed(folder: str | Path, target: str | Path) -> Path:
    """A copy of the NVFP4 checkpoint in `folder` at `target` with each packed weight replaced by what
    compressed-tensors' own `NVFP4PackedCompressor.decompress` gives (bf16) and no quantization: the reference
    model of an NVFP4 checkpoint (transformers 5.24 loads fused MoE experts of one wrongly)."""
    import json
    import shutil

    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file, save_file

    folder, target = Path(folder), Path(target)
    shutil.copytree(folder, target)
    tensors = load_file(folder / "model.safetensors")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16))
    for name in [name.removesuffix("_packed") for name in tensors if name.endswith(".weight_packed")]:
        parts = {suffix: tensors.pop(name + suffix) for suffix in ("_packed", "_scale", "_global_scale")}
        tensors[name] = NVFP4PackedCompressor.decompress({f"weight{k}": v for k, v in parts.items()}, scheme)["weight"]
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    del config["quantization_config"]
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def as_fp8(folder: str | Path, model: torch.nn.Module, block: int = 8) -> Path:
    """Rewrite the checkpoint of `model` saved in `folder` with its linear layers' and experts' weights in FP8
    with block scales, as DeepSeek-V3, MiniMax-M2 and Qwen3's FP8 releases store theirs (`weight` in
    float8_e4m3fn and `weight_scale_inv` in float32, one per `block` x `block` block, the last ones of a weight
    partial where `block` does not divide it, as DeepSeek's quantizer writes them; per-expert keys;
    `quantization_config` naming the method and the block size). What transformers would not convert
    (embeddings, norms, routers, lm_head) stays as it was; the weights are what they dequantize to."""
    import json

    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    linear = {f"{name}.weight" for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    tensors = load_file(folder / "model.safetensors")
    for name in list(tensors):
        expert = ".experts." in name and name.endswith(".weight")  # per-expert keys on disk
        if name in linear or expert:
            weight = tensors[name].to(torch.float32)
            rows, cols = weight.shape
            grid = (-(-rows // block), -(-cols // block))  # the last blocks partial where `block` does not divide
            padded = torch.nn.functional.pad(weight, (0, grid[1] * block - cols, 0, grid[0] * block - rows))
            blocks = padded.reshape(grid[0], block, grid[1], block)
            scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12) / 448.0
            tensors[name] = (blocks / scale).to(torch.float8_e4m3fn).reshape(padded.shape)[:rows, :cols].contiguous()
            tensors[name + "_scale_inv"] = scale.reshape(grid)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [block, block]}
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}, indent=2))
    return folder
