"""The engine's continuous batching on the architectures whose attention differs from the ones
`test_engine.test_staggered_concurrent_requests_equal_generate` covers: staggered requests (decodes of several
slots batched with prefills) give transformers' own greedy tokens."""

from __future__ import annotations

import pytest
import torch

from tests.service.test_engine import GREEDY, _engine, _generate, _prompt, _run
from tests.tiny_models import build_tiny_model


@pytest.mark.slow
@pytest.mark.parametrize("arch", [
    "laguna",  # a different number of query heads per layer, per-head gates, a sliding layer
    "afmoe",  # sliding layers with RoPE around a NoPE full-attention layer, gated attention
    "cohere2_moe",  # a dense full-attention first layer with RoPE, then sliding and NoPE layers, in parallel
    "hunyuan_v1_moe",  # q/k norms after RoPE
    "deepseek_v32",  # a DSA indexer choosing 6 keys per query: decodes of several lengths, chunked prefills
    "glm_moe_dsa",  # the same with interleaved RoPE in the indexer, and shared layers reusing the previous choice
    "mistral4",  # latent attention with queries scaled by position (Llama 4's beta, every 8 positions)
    "hy_v3",  # q/k norms before RoPE, a dense first layer
    "glm4v_moe",  # a vision-language model's language model: multimodal RoPE on text positions, partial rotary
    "qwen3_vl_moe",  # the same with interleaved multimodal RoPE
    "qwen3_next",  # linear attention: per-slot conv and recurrent states, decodes batched, prefills chunked
    "nemotron_h",  # Mamba2 mixers: per-slot conv and SSM states (chunked scans resumed), attention without RoPE
    "granitemoehybrid",  # Mamba2 around NoPE attention, each layer MoE with a shared MLP, Granite's multipliers
    "minimax",  # lightning attention: a per-slot decayed state, no convolution; prefills in blocks, resumed per token
    "kimi_linear",  # KDA: per-slot conv and recurrent states (per-channel decay) around latent attention without RoPE
    "granitemoeshared",  # RoPE attention scaled by Granite's attention multiplier, MoE and a shared MLP
    "qwen3_5_moe",  # the same layers in a vision-language model's language model, with multimodal RoPE
    "mimo_v2_flash",  # kv heads per layer (twice on sliding layers, with sinks), values narrower than keys
    "exaone_moe",  # full-attention layers holding a sliding window they do not use (the layer types decide)
    "gemma4",  # sliding (4 positions) and full layers of different head widths and kv heads, keys as values, no scale
    "llama4",  # chunked attention (8 positions), a NoPE layer with temperature tuning by position, q/k L2 norms
])
def test_staggered_concurrent_requests_equal_generate(arch):
    reference = build_tiny_model(arch)
    lengths = {0: [5, 17], 3: [40], 5: [3, 64], 9: [9, 2]}
    joins = {step: [(f"s{step}-{i}", _prompt(n, 10 * step + i), GREEDY) for i, n in enumerate(ns)]
             for step, ns in lengths.items()}
    tokens, _ = _run(_engine(arch, max_num_seqs=4, max_num_batched_tokens=24), joins)  # some wait; shared steps
    for requests in joins.values():
        for request_id, prompt, _ in requests:
            assert tokens[request_id] == _generate(reference, prompt, 24), request_id


def test_glm5_caches_indexer_keys_only_on_the_layers_that_run_an_indexer():
    """GLM-5's "shared" layers attend the choice of the full layer before them: no indexer, no keys of one to cache
    (their attention applying that choice is what the staggered test checks)."""
    from service.engine import Engine, EngineConfig

    engine = Engine(build_tiny_model("glm_moe_dsa"), EngineConfig(max_model_len=64, max_num_seqs=2))
    assert [tuple(keys.shape) for keys in engine._cache.index_keys] == [(2, 1, 64, 16), (2, 1, 0, 16)] * 2


@pytest.mark.parametrize("arch", ["qwen3_next", "nemotron_h", "granitemoehybrid", "kimi_linear", "minimax"])
def test_linear_attention_states_follow_forks_and_whole_cached_sequences_are_reused(arch):
    """Qwen3-Next's linear-attention states (and Nemotron-H's Mamba2 states) hold one position: a choice sharing its parent's prefill gets a copy
    of the parent's states with its keys and values; a finished request's slot is reused only by a prompt that
    extends all it holds (the next turn of its conversation: resumed from its states), never for a shorter
    shared prefix (prefilled again, not resumed from states of a later position)."""
    from service.engine import Engine, EngineConfig

    reference = build_tiny_model(arch)
    engine = Engine(build_tiny_model(arch), EngineConfig(max_model_len=256, max_num_seqs=4))
    assert engine.config.enable_prefix_caching and engine._cache.linear is not None
    prompt = _prompt(30, 7)
    expected = _generate(reference, prompt, 24)
    engine.add_request("parent", prompt, GREEDY)
    engine.add_request("child", prompt, GREEDY, share_prefill_with="parent")
    tokens, _ = _run(engine, {})
    assert tokens["parent"] == tokens["child"] == expected
    assert engine.prefix_cache_hits == 0
    again, _ = _run(engine, {0: [("again", prompt, GREEDY)]})  # a prefix of what the slots hold: prefilled again
    assert again["again"] == expected and engine.prefix_cache_hits == 0
    next_turn = prompt + expected + _prompt(9, 8)  # extends a slot's tokens: the prompt and all but the last output
    tokens, _ = _run(engine, {0: [("turn", next_turn, GREEDY)]})
    assert tokens["turn"] == _generate(reference, next_turn, 24)
    assert engine.prefix_cache_hits == len(prompt) + len(expected) - 1
    shared = next_turn[:40] + _prompt(6, 9)  # shares 40 tokens with a slot holding more: not reusable
    tokens, _ = _run(engine, {0: [("shared", shared, GREEDY)]})
    assert tokens["shared"] == _generate(reference, shared, 24)
    assert engine.prefix_cache_hits == len(prompt) + len(expected) - 1


def test_mamba2_states_are_allocated_per_slot_and_counted_with_the_keys_and_values():
    """Nemotron-H: only its attention layer holds keys and values (its Mamba2, MoE and MLP layers none); each slot
    holds its Mamba2 layer's conv state [conv_dim, kernel] and SSM state [heads, head_dim, state] (float32), and
    kv_cache_bytes pays for both; a mixer whose convolution differs from the states its config gives is refused."""
    from service.engine import Engine, EngineConfig

    model = build_tiny_model("nemotron_h")  # layers: mamba, moe, attention, mlp, moe; 2 kv heads of 16
    conv_dim = 4 * 16 + 2 * 2 * 16  # mamba heads x head_dim + 2 x groups x state
    per_slot = 64 * 2 * 2 * 16 * 4 + conv_dim * 4 * 4 + 4 * 16 * 16 * 4  # 64 positions; conv state; SSM state
    engine = Engine(model, EngineConfig(max_model_len=64, max_num_seqs=4, kv_cache_bytes=3 * per_slot))
    assert engine.num_kv_slots == 3
    assert [tuple(keys.shape) for keys in engine._cache.keys] == [(3, 0, 64, 16), (3, 0, 64, 16), (3, 2, 64, 16),
                                                                   (3, 0, 64, 16), (3, 0, 64, 16)]
    states = engine._cache.linear
    assert tuple(states.conv[0].shape) == (3, conv_dim, 4) and tuple(states.recurrent[0].shape) == (3, 4, 16, 16)
    assert list(states.conv) == [0] and states.recurrent[0].dtype == torch.float32
    assert Engine(build_tiny_model("nemotron_h"), EngineConfig(max_model_len=64, max_num_seqs=4,
                                                               kv_cache_bytes=3 * per_slot - 1)).num_kv_slots == 2
    other = build_tiny_model("nemotron_h")
    other.config.ssm_state_size = 8
    with pytest.raises(ValueError, match="linear-attention layer 0: convolution"):
        Engine(other, EngineConfig(max_model_len=64))


def test_kimi_linear_kda_states_are_allocated_per_slot_and_only_its_latent_attention_holds_keys():
    """Kimi-Linear: its KDA layers (0 and 2) hold no keys and values, each slot holds their conv state over the
    concatenated q, k and v [3 x heads x head_dim, kernel] and recurrent state [heads, head_dim, head_dim] (float32);
    its MLA layer (1) holds the latent and rotary key of one "head"; kv_cache_bytes pays for exactly these."""
    from service.engine import Engine, EngineConfig

    model = build_tiny_model("kimi_linear")  # KDA, MLA, KDA: 4 KDA heads of 16; latent 16 + rotary key 8
    conv_dim = 3 * 4 * 16
    per_slot = 64 * (16 + 8) * 4 + 2 * (conv_dim * 4 * 4 + 4 * 16 * 16 * 4)  # 64 positions of latent; 2 KDA layers
    engine = Engine(model, EngineConfig(max_model_len=64, max_num_seqs=4, kv_cache_bytes=3 * per_slot))
    assert engine.num_kv_slots == 3
    assert [tuple(keys.shape) for keys in engine._cache.keys] == [(3, 0, 64, 24), (3, 1, 64, 24), (3, 0, 64, 24)]
    states = engine._cache.linear
    assert list(states.conv) == [0, 2] and tuple(states.conv[2].shape) == (3, conv_dim, 4)
    assert tuple(states.recurrent[2].shape) == (3, 4, 16, 16) and states.recurrent[2].dtype == torch.float32
    assert Engine(build_tiny_model("kimi_linear"), EngineConfig(max_model_len=64, max_num_seqs=4,
                                                                kv_cache_bytes=3 * per_slot - 1)).num_kv_slots == 2


@pytest.mark.slow
def test_gemma4_layers_sharing_keys_and_values_attend_their_source_layers_cache():
    """Gemma 4's last ``num_kv_shared_layers`` layers attend the keys and values of the last earlier layer of their
    type (`shared_kv_states` in transformers): the engine's attention reads that layer's cache, the shared layers hold
    none. With per-layer embeddings and the double-wide MLPs of the shared layers (the E2B's and E4B's features, which
    are dense releases: here beside an MoE block): staggered requests, and a next turn resumed from the prefix cache,
    give transformers' greedy tokens."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, Gemma4TextConfig

    from service.engine import Engine, EngineConfig
    from tests.tiny_models import gemma4_text_config

    config = Gemma4TextConfig(**gemma4_text_config(
        num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
        hidden_size_per_layer_input=8, use_double_wide_mlp=True))

    def build():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()

    reference = build()
    engine = Engine(build(), EngineConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=24))
    assert [keys.shape[1] for keys in engine._cache.keys] == [2, 1, 0, 0]
    lengths = {0: [5, 17], 3: [40], 5: [3, 64]}
    joins = {step: [(f"s{step}-{i}", _prompt(n, 10 * step + i), GREEDY) for i, n in enumerate(ns)]
             for step, ns in lengths.items()}
    tokens, _ = _run(engine, joins)
    for requests in joins.values():
        for request_id, prompt, _ in requests:
            assert tokens[request_id] == _generate(reference, prompt, 24), request_id
    first = joins[3][0][1]
    next_turn = first + tokens["s3-0"] + _prompt(7, 99)
    again, _ = _run(engine, {0: [("turn", next_turn, GREEDY)]})
    assert again["turn"] == _generate(reference, next_turn, 24) and engine.prefix_cache_hits >= len(first)


def test_minimax_lightning_attention_keeps_its_state_per_slot_in_the_models_dtype():
    """MiniMax's lightning attention has no convolution and keeps its decayed sum of key-value products [heads, d, d]
    in the model's dtype (MiniMaxCache holds what its forward returns): driven on a slot's states, a layer in bfloat16
    gives its own forward's outputs bit for bit over a prefill in blocks and decodes (a float32 state would round its
    sums otherwise); kv_cache_bytes pays for the state and the softmax layer's keys and values only."""
    import copy

    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    from service import attention, linear_attention
    from service.engine import Engine, EngineConfig

    reference = build_tiny_model("minimax").to(torch.bfloat16)  # lightning, softmax, lightning: 4 heads of 16
    model = copy.deepcopy(reference)
    linear_attention.install(model)
    cache = attention.KVCache(3, 2, 0, 32, 16, torch.bfloat16)
    shape = linear_attention.LinearShape.of(model.config)
    cache.linear = linear_attention.LinearStates([0, 2], 2, shape, torch.bfloat16)
    assert cache.linear.conv[0].numel() == 0 and cache.linear.recurrent[2].dtype == torch.bfloat16
    hidden = torch.randn(1, 14, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    layer, own = model.model.layers[2].self_attn, reference.model.layers[2].self_attn
    held = MiniMaxCache()
    with torch.no_grad():
        expected = [own(hidden[:, :10], None, None, cache=held)[0]]  # two blocks of 8
        expected += [own(hidden[:, t:t + 1], None, None, cache=held)[0] for t in range(10, 14)]
        chunks = [attention.SeqChunk(1, 0, 10, 0)] + [attention.SeqChunk(1, t, 1, 0) for t in range(10, 14)]
        for chunk, want in zip(chunks, expected):
            with attention.bind_step(cache, attention.StepBatch.build([chunk])):
                span = hidden[:, chunk.start:chunk.start + chunk.num_tokens]
                assert torch.equal(layer(span, None, None)[0], want), chunk
    assert torch.equal(cache.linear.recurrent[2][1], held.get_linear_cache(2)[0])
    per_slot = 64 * 2 * 2 * 16 * 4 + 2 * 4 * 16 * 16 * 4  # the softmax layer's keys and values; 2 float32 states
    engine = Engine(build_tiny_model("minimax"), EngineConfig(max_model_len=64, max_num_seqs=4,
                                                              kv_cache_bytes=3 * per_slot))
    assert engine.num_kv_slots == 3 and [keys.shape[1] for keys in engine._cache.keys] == [0, 2, 0]
    assert Engine(build_tiny_model("minimax"), EngineConfig(max_model_len=64, max_num_seqs=4,
                                                            kv_cache_bytes=3 * per_slot - 1)).num_kv_slots == 2
