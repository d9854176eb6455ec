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


@pytest.mark.slow
@pytest.mark.parametrize("arch", [
    "deepseek_v3",  # latent attention: the latent and rotary key in blocks, values a view of them
    "gpt_oss",  # sliding layers and sinks
    "deepseek_v32",  # a DSA indexer's keys in blocks too
    "qwen3_next",  # linear attention: a preempted sequence's states are computed again from its tokens
    "gemma4",  # KV-shared layers reading their source layer's blocks
])
def test_preempted_sequences_resume_with_the_tokens_of_generate(arch):
    """A KV cache of 6 blocks (one max_model_len sequence of 96) for staggered requests that need 2 to 6 each, up
    to 4 running: the newest running ones are preempted and prefilled again (prompt and generated tokens), and every request still gets the
    greedy tokens of `generate`."""
    from service.engine import Engine, EngineConfig

    reference = build_tiny_model(arch)
    roomy = _engine(arch, max_num_seqs=4, prefix_state_memory=0)
    cache = roomy._cache
    pools = [*cache.keys, *([] if cache.values_in_keys else cache.values), *cache.index_keys]
    block = sum(pool[0].nbytes for pool in pools)
    linear = cache.linear
    states = sum(t[0].nbytes for t in (*linear.conv.values(), *linear.recurrent.values())) if linear else 0
    engine = Engine(build_tiny_model(arch), EngineConfig(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=24,
                                                         kv_cache_bytes=6 * block + 4 * states, prefix_state_memory=0))
    assert engine.num_kv_blocks == 6
    lengths = {0: [5, 17], 3: [40], 5: [3, 64], 9: [9, 2]}
    joins = {step: [(f"s{step}-{i}", _prompt(n, 10 * step + i), GREEDY) for i, n in enumerate(ns)]
             for step, ns in lengths.items()}
    tokens, _ = _run(engine, joins)
    assert engine.num_preemptions > 0
    for requests in joins.values():
        for request_id, prompt, _ in requests:
            assert tokens[request_id] == _generate(reference, prompt, 24), request_id


def test_glm5_caches_indexer_keys_only_on_the_layers_that_run_an_indexer():
    """GLM-5's "shared" layers attend the choice of the full layer before them: no indexer, no keys of one to cache
    (their attention applying that choice is what the staggered test checks)."""
    from service.engine import Engine, EngineConfig

    engine = Engine(build_tiny_model("glm_moe_dsa"), EngineConfig(max_model_len=64, max_num_seqs=2))
    blocks = engine.num_kv_blocks
    assert [tuple(keys.shape) for keys in engine._cache.index_keys] == [(blocks, 16, 1, 16), (blocks, 0, 1, 16)] * 2


@pytest.mark.parametrize("arch", ["qwen3_next", "nemotron_h", "granitemoehybrid", "kimi_linear", "minimax"])
def test_linear_attention_states_follow_forks_and_whole_cached_sequences_are_reused(arch):
    """Qwen3-Next's linear-attention states (and Nemotron-H's Mamba2 states) hold one position: a choice sharing its
    parent's prefill gets a copy of the parent's states with its keys and values; without a snapshot of the states
    within the shared tokens (prompts shorter than ``prefix_state_interval``, 256), a finished request's slot is
    reused only by a prompt that extends all it holds (the next turn of its conversation: resumed from its states),
    not for a shorter shared prefix (prefilled again, not resumed from states of a later position)."""
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


def _snapshot(engine, slot: int, position: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    snapshots = engine._cache.linear.snapshots
    buffer = {**snapshots._probation, **snapshots._protected}[(slot, position)]
    return {layer: (snapshots.conv[layer][buffer], snapshots.recurrent[layer][buffer]) for layer in snapshots.conv}


def _states_after(model, tokens: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """transformers' own linear-attention states after ``tokens`` (its cache of one forward over them; MiniMax's
    lightning attention keeps no convolution state: an empty one, as the engine's)."""
    with torch.no_grad():
        cache = model(torch.tensor([tokens]), use_cache=True).past_key_values
    if hasattr(cache, "linear_cache"):  # MiniMaxCache
        return {layer: (torch.empty(0, 0), state[0]) for layer, state in enumerate(cache.linear_cache)
                if isinstance(state, torch.Tensor)}
    return {layer: (cache.layers[layer].conv_states[0][0], cache.layers[layer].recurrent_states[0][0])
            for layer in range(len(cache.layers)) if type(cache.layers[layer]).__name__ == "LinearAttentionLayer"}


@pytest.mark.parametrize("arch", ["qwen3_next", "nemotron_h", "granitemoehybrid", "kimi_linear", "minimax"])  # DeltaNet,
# Mamba2 (two mixers), KDA, lightning attention
def test_prompts_sharing_a_system_prompt_resume_from_snapshots_of_the_linear_attention_states(arch):
    """Prefix caching with linear attention for a shared prefix shorter than a cached sequence (a common system
    prompt, then different user messages): a prefill copies its states at each multiple of
    ``prefix_state_interval`` it reaches (16 here; the prompt in chunks of 20, so some copies fall inside chunks) and
    at its prompt's end; a later prompt sharing 50 tokens resumes from the copy at 48 (keys and values copied, states
    restored) and copies its states at 50, where it left the first, so a third resumes from there. The copies are
    transformers' own states at their positions, the tokens `generate`'s: a copy taken elsewhere, or left
    unrestored (the cached slot's final states), fails both."""
    from service.engine import Engine, EngineConfig
    from service.sampling import SamplingParams

    reference = build_tiny_model(arch)
    engine = Engine(build_tiny_model(arch), EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=20,
                                                         prefix_state_interval=16))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    system = _prompt(50, 1)
    prompts = {"first": system + _prompt(7, 2), "second": system + _prompt(9, 3), "third": system + _prompt(5, 4)}
    assert len({p[50] for p in prompts.values()}) == 3  # they part at position 50
    cached = {}
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
        tokens = []
        while engine.has_work:
            for out in engine.step():
                tokens += out.new_token_ids
                cached[request_id] = out.num_cached_tokens
        assert tokens == _generate(reference, prompt, 8), request_id
        if request_id == "first":
            snapshots = engine._cache.linear.snapshots
            assert snapshots.positions(0) == {16, 32, 48, 57}  # the multiples of 16 and the prompt's end
            for position in (16, 48, 57):
                expected, got = _states_after(reference, prompt[:position]), _snapshot(engine, 0, position)
                assert list(got) == list(expected)
                for layer, (conv, recurrent) in expected.items():
                    torch.testing.assert_close(got[layer][0], conv, rtol=1e-4, atol=1e-5)
                    torch.testing.assert_close(got[layer][1], recurrent, rtol=1e-4, atol=1e-5)
    assert cached == {"first": 0, "second": 48, "third": 50}
    assert engine.prefix_cache_hits == 98
    snapshots = engine._cache.linear.snapshots  # the branch point, taken by the second prompt in its slot (1), then
    assert 50 not in snapshots.positions(1) and 50 in snapshots.positions(2)  # handed to the third's with its keys
    for slot, tokens in engine._slot_tokens.items():  # a slot's copies lie within the keys and values it holds
        assert max(engine._cache.linear.snapshots.positions(slot), default=0) <= len(tokens)


def test_state_snapshots_are_bounded_and_keep_the_shared_ones_over_a_long_prompts():
    """The pool of state snapshots: a full pool evicts the entries never restored first (least recently made
    first), so a long prompt's many copies do not push out a shared prefix's copy that another prompt restored;
    restored entries hold at most half the pool; a slot's entries past what it keeps are dropped with it; entries
    the step being planned writes are never evicted by it."""
    from service.linear_attention import LinearShape, LinearStates, StateSnapshots

    shape = LinearShape(conv_dim=2, kernel=2, recurrent=(1, 2, 2))
    states = LinearStates([0], 4, shape, torch.float32)
    pool = StateSnapshots(4, [0], shape, torch.float32)
    for position in (16, 32, 48):
        buffer = pool.reserve(0, position)
        pool.save(buffer, 0, torch.full((2, 2), position), torch.full((1, 2, 2), position))
    pool.release_pins()
    pool.restore(0, 32, states, target=3)  # a second prompt shares 32 tokens
    assert states.recurrent[0][3].eq(32).all() and states.conv[0][3].eq(32).all()
    for position in (64, 80, 96, 112):  # a long prompt's copies, one step each
        assert pool.reserve(1, position) is not None
        pool.release_pins()
    assert pool.positions(0) == {32} and pool.positions(1) == {80, 96, 112} and len(pool) == 4
    pool.restore(1, 80, states, target=2)
    pool.restore(1, 96, states, target=2)  # three restored: the least recently used goes back to probation
    assert list(pool._protected) == [(1, 80), (1, 96)]
    assert pool.reserve(2, 16) is not None and pool.positions(1) == {80, 96}  # (1, 112): oldest in probation
    pool.release_pins()
    pool.drop(1, keep=80)  # slot 1 overwritten past position 80
    assert pool.positions(0) == {32} and pool.positions(1) == {80} and len(pool) == 3
    pool.move(0, 32, target=2)  # a request resuming from it copied slot 0's first 32 keys and values to slot 2
    assert pool.positions(0) == set() and pool.positions(2) == {16, 32} and pool.latest(2, 40) == 32
    assert [pool.reserve(3, position) for position in (16, 32, 48, 64, 80)][-1] is None  # all pinned by then
    assert pool.positions(2) == set() and pool.positions(1) == set()  # (2, 32) and (2, 16), then protected (1, 80)
    assert pool.positions(3) == {16, 32, 48, 64} and pool.latest(3, 50) == 48 and pool.latest(3, 15) == 0


def test_mamba2_states_are_allocated_per_slot_and_counted_with_the_keys_and_values():
    """Nemotron-H: only its attention layer holds keys and values (its Mamba2, MoE and MLP layers none); each slot
    holds its Mamba2 layer's conv state [conv_dim, kernel] and SSM state [heads, head_dim, state] (float32), and
    kv_cache_bytes pays for both: max_num_seqs slots' states (or as many as fit beside one max_model_len sequence's
    blocks), the blocks get the rest; a mixer whose convolution differs from the states its config gives is
    refused."""
    from service.engine import Engine, EngineConfig

    model = build_tiny_model("nemotron_h")  # layers: mamba, moe, attention, mlp, moe; 2 kv heads of 16
    conv_dim = 4 * 16 + 2 * 2 * 16  # mamba heads x head_dim + 2 x groups x state
    states = conv_dim * 4 * 4 + 4 * 16 * 16 * 4  # conv state; SSM state: 6144 bytes
    per_slot = 64 * 2 * 2 * 16 * 4 + states  # 64 positions (4 blocks of 4096 bytes) and a slot's states
    engine = Engine(model, EngineConfig(max_model_len=64, max_num_seqs=4, kv_cache_bytes=3 * per_slot,
                                        prefix_state_memory=0))
    assert engine.num_kv_slots == 4 and engine._cache.linear.snapshots is None
    assert engine.num_kv_blocks == 10  # (3 x 22528 - 4 x 6144) // 4096
    assert [tuple(keys.shape) for keys in engine._cache.keys] == [(10, 16, 0, 16), (10, 16, 0, 16), (10, 16, 2, 16),
                                                                   (10, 16, 0, 16), (10, 16, 0, 16)]
    linear = engine._cache.linear
    assert tuple(linear.conv[0].shape) == (4, conv_dim, 4) and tuple(linear.recurrent[0].shape) == (4, 4, 16, 16)
    assert list(linear.conv) == [0] and linear.recurrent[0].dtype == torch.float32
    one = Engine(build_tiny_model("nemotron_h"), EngineConfig(max_model_len=64, max_num_seqs=4, prefix_state_memory=0,
                                                              kv_cache_bytes=per_slot))
    assert one.num_kv_slots == 1 and one.num_kv_blocks == 4  # one slot's states, one max_model_len sequence
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        Engine(build_tiny_model("nemotron_h"), EngineConfig(max_model_len=64, prefix_state_memory=0,
                                                            kv_cache_bytes=per_slot - 1))
    # the prefix cache's state snapshots (a slot's states each) take their share of the budget before the slots:
    # an eighth of 3 x 22528 is one snapshot (8448 >= 6144 bytes), leaving 9 blocks beside 4 slots
    engine = Engine(build_tiny_model("nemotron_h"), EngineConfig(max_model_len=64, max_num_seqs=4,
                                                                 kv_cache_bytes=3 * per_slot))
    assert engine._cache.linear.snapshots.capacity == 1 and (engine.num_kv_slots, engine.num_kv_blocks) == (4, 9)
    engine = Engine(build_tiny_model("nemotron_h"), EngineConfig(max_model_len=64, max_num_seqs=4,
                                                                 kv_cache_bytes=3 * per_slot, prefix_state_memory=0.5))
    assert engine._cache.linear.snapshots.capacity == 5  # 5 x 6144 <= 33792: 3 slots' states beside 4 blocks fit
    assert (engine.num_kv_slots, engine.num_kv_blocks) == (3, 4)
    with pytest.raises(ValueError, match="after 2 state snapshots"):  # (2 x 6144 + 22528 > 34000)
        Engine(build_tiny_model("nemotron_h"), EngineConfig(max_model_len=64, kv_cache_bytes=34000,
                                                            prefix_state_memory=0.4))
    assert states * 2 + per_slot > 34000 >= per_slot
    other = build_tiny_model("nemotron_h")
    other.config.ssm_state_size = 8
    with pytest.raises(ValueError, match="linear-attention layer 0: convolution"):
        Engine(other, EngineConfig(max_model_len=64))


def test_kimi_linear_kda_states_are_allocated_per_slot_and_only_its_latent_attention_holds_keys():
    """Kimi-Linear: its KDA layers (0 and 2) hold no keys and values, each slot holds their conv state over the
    concatenated q, k and v [3 x heads x head_dim, kernel] and recurrent state [heads, head_dim, head_dim] (float32);
    its MLA layer (1) holds the latent and rotary key of one "head"; kv_cache_bytes pays for exactly these (one
    slot's states and one max_model_len sequence's blocks at least)."""
    from service.engine import Engine, EngineConfig

    model = build_tiny_model("kimi_linear")  # KDA, MLA, KDA: 4 KDA heads of 16; latent 16 + rotary key 8
    conv_dim = 3 * 4 * 16
    per_slot = 64 * (16 + 8) * 4 + 2 * (conv_dim * 4 * 4 + 4 * 16 * 16 * 4)  # 64 positions of latent; 2 KDA layers
    engine = Engine(model, EngineConfig(max_model_len=64, max_num_seqs=4, kv_cache_bytes=3 * per_slot))
    assert engine.num_kv_slots == 3 and engine.num_kv_blocks == 12  # 3 slots' states (14336) beside one sequence
    assert [tuple(keys.shape) for keys in engine._cache.keys] == [(12, 16, 0, 24), (12, 16, 1, 24), (12, 16, 0, 24)]
    states = engine._cache.linear
    assert list(states.conv) == [0, 2] and tuple(states.conv[2].shape) == (3, conv_dim, 4)
    assert tuple(states.recurrent[2].shape) == (3, 4, 16, 16) and states.recurrent[2].dtype == torch.float32
    one = Engine(build_tiny_model("kimi_linear"), EngineConfig(max_model_len=64, max_num_seqs=4, kv_cache_bytes=per_slot))
    assert (one.num_kv_slots, one.num_kv_blocks) == (1, 4)
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        Engine(build_tiny_model("kimi_linear"), EngineConfig(max_model_len=64, kv_cache_bytes=per_slot - 1))


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
    assert [keys.shape[2] for keys in engine._cache.keys] == [2, 1, 0, 0]
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
    engine = Engine(build_tiny_model("minimax"), EngineConfig(max_model_len=64, max_num_seqs=4, prefix_state_memory=0,
                                                              kv_cache_bytes=3 * per_slot))  # (no state snapshots)
    assert (engine.num_kv_slots, engine.num_kv_blocks) == (4, 10)  # (3 x 24576 - 4 x 8192) // 4096
    assert [keys.shape[2] for keys in engine._cache.keys] == [0, 2, 0]
    one = Engine(build_tiny_model("minimax"), EngineConfig(max_model_len=64, max_num_seqs=4, prefix_state_memory=0,
                                                           kv_cache_bytes=per_slot))
    assert (one.num_kv_slots, one.num_kv_blocks) == (1, 4)
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        Engine(build_tiny_model("minimax"), EngineConfig(max_model_len=64, prefix_state_memory=0,
                                                         kv_cache_bytes=per_slot - 1))
