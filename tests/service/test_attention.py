"""Ragged-batch attention against a naive per-token reference (service/attention.py)."""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service import attention
from service.attention import KVCache, SeqChunk, StepBatch, bind_step, ragged_attention

HQ, HKV, D, MAX_LEN, SLOTS, BLOCK = 4, 2, 8, 32, 6, 4
# (slot, start, new tokens) in flat-batch order. Padded: decodes in slots 0, 2 and 4 among prefills in the flat
# batch (slot 1 idle, slot 3 a prefill between them), a first prefill, a continued prefill chunk, a one-token prompt.
PADDED = [(0, 5, 1), (3, 0, 7), (2, 9, 1), (5, 4, 3), (4, 0, 1)]
# Dense: decodes lead the batch and fill slots 1..3 in order, as the engine schedules them.
DENSE = [(1, 5, 1), (2, 9, 1), (3, 0, 1), (0, 0, 7)]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, window: int | None) -> torch.Tensor:
    """Attention of one query ``q [Hq, d]`` at position ``pos`` over ``k, v [Hkv, L, d]``, one key at a time."""
    out = torch.zeros(HQ, v.shape[-1], dtype=torch.float64)
    for h in range(HQ):
        kv = h // (HQ // HKV)
        keys = [j for j in range(pos + 1) if window is None or j > pos - window]
        scores = torch.tensor([float(q[h] @ k[kv, j]) / math.sqrt(D) for j in keys], dtype=torch.float64)
        weights = torch.softmax(scores, 0)
        out[h] = sum(w * v[kv, j].double() for w, j in zip(weights, keys))
    return out


def _paged_cache(dv: int = D) -> KVCache:
    """A cache of blocks of 4 positions whose slots got theirs one at a time in turn, from blocks freed in a
    shuffled order (taken last freed first): no slot's blocks are contiguous or in order. Unwritten blocks hold
    NaN (`_poison`) until first handed out."""
    cache = KVCache(1, SLOTS, HKV, MAX_LEN, D, torch.float32, value_head_dim=dv, block_size=BLOCK,
                    num_blocks=SLOTS * MAX_LEN // BLOCK + 3)
    _poison(cache)
    for slot in range(SLOTS):
        assert cache.grow(slot, MAX_LEN)
    rng = random.Random(7)
    while held := [slot for slot in range(SLOTS) if cache.blocks[slot]]:
        slot = rng.choice(held)
        cache.trim(slot, (len(cache.blocks[slot]) - 1) * BLOCK)  # its last block
    for length in range(BLOCK, MAX_LEN + 1, BLOCK):
        assert all(cache.grow(slot, length) for slot in range(SLOTS))
    assert cache.blocks[0][:3] != sorted(cache.blocks[0][:3]) or cache.blocks[0][1] != cache.blocks[0][0] + 1
    return cache


def _poison(cache: KVCache) -> None:
    """NaN in every block not handed out yet but block 0 (the pools are allocated unwritten and may hold anything;
    a block is zeroed when first handed out, block 0 at once): a masked-out position read from a block that was
    not zeroed would turn the output NaN."""
    for pool in (*cache.keys, *cache.values):
        pool[1:] = float("nan")


def _put(cache: KVCache, pool: torch.Tensor, slot: int, history: torch.Tensor) -> None:
    """Write ``history [H, n, d]`` at positions 0 .. n - 1 of ``slot``."""
    for pos in range(history.shape[1]):
        pool[cache.blocks[slot][pos // BLOCK], pos % BLOCK] = history[:, pos]


def _held(cache: KVCache, pool: torch.Tensor, slot: int, length: int) -> torch.Tensor:
    """Positions 0 .. length - 1 of ``slot``, ``[H, length, d]``."""
    return cache.gather_prefill(pool, SeqChunk(slot, 0, length, 0))


def _scenario(layout, seed: int = 0, dv: int = D):
    """A filled cache, the step's q/k/v and batch, and each sequence's full keys/values (values ``dv`` wide)."""
    gen = torch.Generator().manual_seed(seed)
    cache = _paged_cache(dv)
    total = sum(n for _, _, n in layout)
    query, key, value = (torch.randn(1, h, total, d, generator=gen) for h, d in ((HQ, D), (HKV, D), (HKV, dv)))
    chunks, full, offset = [], {}, 0
    for slot, start, n in layout:
        history_k, history_v = torch.randn(HKV, start, D, generator=gen), torch.randn(HKV, start, dv, generator=gen)
        _put(cache, cache.keys[0], slot, history_k)
        _put(cache, cache.values[0], slot, history_v)
        new = slice(offset, offset + n)
        full[slot] = (torch.cat([history_k, key[0, :, new]], 1), torch.cat([history_v, value[0, :, new]], 1))
        chunks.append(SeqChunk(slot, start, n, offset))
        offset += n
    return cache, StepBatch.build(chunks), query, key, value, full


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("via_module", [True, False])
@pytest.mark.parametrize("layout", [PADDED, DENSE], ids=["padded", "dense"])
@pytest.mark.parametrize("dv", [D, 6], ids=["dv=d", "narrower values"])  # 6: DeepSeek-V3's latent attention
def test_matches_naive_reference(window, via_module, layout, dv):
    cache, batch, query, key, value, full = _scenario(layout, dv=dv)
    assert isinstance(batch.decode_select, slice) == (layout is DENSE)
    module = SimpleNamespace(layer_idx=0, sliding_window=window if via_module else None)
    with bind_step(cache, batch):
        out, weights = ragged_attention(module, query, key, value, None, scaling=D ** -0.5,
                                        sliding_window=None if via_module else window)
    assert weights is None and out.shape == (1, query.shape[2], HQ, dv)
    for chunk in batch.chunks:
        k, v = full[chunk.slot]
        for i in range(chunk.num_tokens):
            expected = _reference(query[0, :, chunk.offset + i], k, v, chunk.start + i, window)
            torch.testing.assert_close(out[0, chunk.offset + i].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", [PADDED, DENSE], ids=["padded", "dense"])
def test_chunked_attention_matches_naive_reference(layout):
    """Llama 4's chunked layers: a query attends its own chunk of positions only, causally (for chunks of 4, the
    query at position 9 attends keys 8 and 9), in decodes and in prefills that start mid-chunk."""
    cache, batch, query, key, value, full = _scenario(layout, seed=2)
    module = SimpleNamespace(layer_idx=0, **{attention._CHUNK: 4})
    with bind_step(cache, batch):
        out, _ = ragged_attention(module, query, key, value, None, scaling=D ** -0.5)
    for chunk in batch.chunks:
        k, v = full[chunk.slot]
        for i in range(chunk.num_tokens):
            pos = chunk.start + i  # its chunk's keys are the last pos % 4 + 1 positions
            expected = _reference(query[0, :, chunk.offset + i], k, v, pos, window=pos % 4 + 1)
            torch.testing.assert_close(out[0, chunk.offset + i].double(), expected, atol=1e-5, rtol=1e-5)


def test_decode_and_prefill_masks_keep_a_query_in_its_chunk():
    batch = StepBatch.build([SeqChunk(0, 9, 1, 0), SeqChunk(1, 3, 1, 1), SeqChunk(2, 6, 4, 2)])
    assert batch.decode_mask(None, 4)[:, 0, 0].tolist() == [[False] * 8 + [True, True],
                                                            [True] * 4 + [False] * 6]
    assert attention.causal_mask(batch.chunks[2], None, "cpu", 4).int().tolist() == [
        [0, 0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]]
    assert batch.positions("cpu").tolist() == [9, 3, 6, 7, 8, 9]


@pytest.mark.parametrize("layout", [PADDED, DENSE], ids=["padded", "dense"])
def test_new_keys_and_values_land_in_their_slots(layout):
    cache, batch, query, key, value, full = _scenario(layout, seed=1)
    with bind_step(cache, batch):
        ragged_attention(SimpleNamespace(layer_idx=0), query, key, value, None)
    for slot, start, n in layout:
        torch.testing.assert_close(_held(cache, cache.keys[0], slot, start + n), full[slot][0])
        torch.testing.assert_close(_held(cache, cache.values[0], slot, start + n), full[slot][1])


def test_decode_reads_the_decoding_sequences_only():
    """Decode attention gathers the blocks of the decode tokens' slots, in their order, none of the slots
    between them (idle, or holding cached prefixes)."""
    cache = _paged_cache(D)
    batch = StepBatch.build([SeqChunk(5, 5, 1, 0), SeqChunk(0, 2, 1, 1)])
    assert batch.decode_slots.tolist() == [5, 0] and batch.decode_len.tolist() == [6, 3]
    assert batch.decode_mask(None)[:, 0, 0].sum(1).tolist() == [6, 3]
    assert batch.decode_mask(2)[:, 0, 0].sum(1).tolist() == [2, 2]
    cache.sync_tables()
    blocks = cache.blocks_for(6)
    assert batch.read_index(cache).tolist() == cache.blocks[5][:blocks] + cache.blocks[0][:blocks]


def test_called_outside_a_step_raises():
    q = torch.zeros(1, HQ, 1, D)
    with pytest.raises(RuntimeError, match="outside an engine step"):
        ragged_attention(SimpleNamespace(layer_idx=0), q, q[:, :HKV], q[:, :HKV], None)


def test_a_step_runs_sdpa_with_every_backend_but_cudnns_and_restores_them_after():
    """cuDNN's attention plans each new shape (12 ms of host time per call on an H200), and step shapes are new at
    almost every step: the engine's steps leave it out (`attention.SDPA_BACKENDS`)."""
    cuda = torch.backends.cuda
    flags = lambda: (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),  # noqa: E731
                     cuda.math_sdp_enabled())
    before = flags()
    cache = KVCache(1, 1, HKV, MAX_LEN, D, torch.float32, block_size=BLOCK)
    with bind_step(cache, StepBatch.build([SeqChunk(0, 0, 1, 0)])):
        assert flags() == (False, True, True, True)
    assert flags() == before


def test_blocks_are_given_on_demand_and_taken_back():
    """A slot holds blocks for the positions it was grown to, never more; `grow` takes nothing when too few are
    free; trimmed and released blocks are free again once no slot holds them; a shared prefix is the source's
    own blocks, and the block it ends inside is copied when the sharer is about to write there."""
    cache = KVCache(1, 3, HKV, MAX_LEN, D, torch.float32, block_size=BLOCK, num_blocks=10)
    assert cache.max_blocks == 8 and cache.tables.shape == (3, 8) and cache.blocks == [[], [], []]
    assert cache.grow(0, 5) and cache.blocks[0] == [0, 1]  # (8 positions)
    assert cache.grow(0, 8) and cache.blocks[0] == [0, 1]  # (already held)
    assert cache.grow(1, 32) and cache.num_free == 0
    assert not cache.grow(2, 1) and cache.blocks[2] == []
    cache.trim(1, 9)
    assert cache.blocks[1] == [2, 3, 4] and cache.num_free == 5 and cache.refs[5:] == [0] * 5
    history = torch.randn(HKV, 7, D)
    _put(cache, cache.keys[0], 0, history)
    cache.share_prefix(0, 2, 7)
    assert cache.blocks[2] == [0, 1] and cache.refs[:2] == [2, 2] and cache.num_free == 5
    with pytest.raises(ValueError, match="holds blocks"):
        cache.share_prefix(1, 2, 4)
    assert cache.grow(2, 9, write_from=7)  # block 1 (positions 4..7) is copied before position 7 is written
    assert cache.blocks[2][0] == 0 and not set(cache.blocks[2][1:]) & set(cache.blocks[0] + cache.blocks[1])
    assert cache.refs[:2] == [2, 1] and cache.num_free == 3
    cache.sync_tables()
    torch.testing.assert_close(_held(cache, cache.keys[0], 2, 7), history)
    assert cache.grow(0, 8, write_from=4) and cache.blocks[0] == [0, 1]  # (block 1 is its own now)
    cache.release(0)
    assert cache.blocks[0] == [] and cache.refs[:2] == [1, 0] and cache.num_free == 4
    contiguous = KVCache(1, 2, HKV, MAX_LEN, D, torch.float32, block_size=BLOCK)  # no num_blocks: all up front
    assert contiguous.blocks == [list(range(8)), list(range(8, 16))] and not contiguous.num_free


def test_blocks_are_zeroed_when_first_handed_out_and_freed_ones_are_taken_first():
    """Unwritten pools (anything in them, NaN here) read as zeros in every block a slot gets; blocks freed are
    handed out again before blocks never used, so the blocks touched (on CPU: the memory committed) are as
    many as were ever held at once."""
    cache = KVCache(2, 3, HKV, MAX_LEN, D, torch.float32, block_size=BLOCK, num_blocks=20)
    _poison(cache)
    assert cache.grow(0, 12) and cache.blocks[0] == [0, 1, 2]
    assert cache.grow(1, 8) and cache.blocks[1] == [3, 4]
    for pool in (*cache.keys, *cache.values):
        assert not pool[:5].any() and pool[5:].isnan().all()
    cache.keys[0][:5] = 1.0
    cache.release(0)
    assert cache.grow(2, 16) and sorted(cache.blocks[2]) == [0, 1, 2, 5]  # the freed three, then one never used
    assert not cache.keys[0][5].any() and cache.keys[0][6:].isnan().all()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident memory from /proc")
def test_a_large_cache_commits_memory_as_blocks_are_used():
    """A 512 MiB cache takes a few MiB of resident memory until its blocks are used (a CPU replica's default
    ``kv_cache_bytes``, with the prefix cache given all of it)."""
    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident()
    cache = KVCache(4, 40, 2, 1024, 32, torch.float32, block_size=16, num_blocks=16384)  # 32 KiB a block
    assert sum(pool.nbytes for pool in (*cache.keys, *cache.values)) == 512 * 2**20
    assert resident() - before < 32 * 2**20
    for slot in range(8):
        cache.grow(slot, 1024)  # 512 blocks: 16 MiB
    assert 8 * 2**20 < resident() - before < 64 * 2**20


def test_live_slots_count_shared_blocks_once():
    """`num_live` counts the blocks live slots hold, a shared one once; `spare_blocks` is what giving up every
    slot not live frees (but ``keep``'s)."""
    cache = KVCache(1, 3, HKV, MAX_LEN, D, torch.float32, block_size=BLOCK, num_blocks=10)
    cache.grow(0, 12)  # blocks 0-2, a cached prefix (not live)
    assert cache.num_live == 0 and cache.spare_blocks() == 10 and cache.spare_blocks(keep=0) == 7
    cache.set_live(1, True)
    cache.share_prefix(0, 1, 8)
    assert cache.grow(1, 10, write_from=8)  # a third block of its own
    assert cache.num_live == 3 and cache.spare_blocks() == 7 and cache.spare_blocks(keep=0) == 6
    assert cache.live_blocks(0, 3) == 2
    cache.set_live(2, True)
    cache.share_prefix(1, 2, 10)  # two running sequences share three blocks
    assert cache.num_live == 3 and cache.live_blocks(1, 3) == 3
    assert cache.grow(2, 11, write_from=10)  # (the third is copied)
    assert cache.num_live == 4
    cache.set_live(1, False)
    assert cache.num_live == 3  # blocks 0, 1 (slot 2 holds them) and slot 2's copy
    cache.release(1)
    cache.release(2)
    assert cache.num_live == 0 and cache.spare_blocks() == 10 and cache.refs == [1] * 3 + [0] * 7 and cache.num_free == 7


def assert_block_counts(cache: KVCache) -> None:
    """``cache``'s reference counts are the slots holding each block, its live counts those of live slots, its
    free blocks those no slot holds, and its spare blocks those no live slot holds."""
    held = Counter(block for blocks in cache.blocks for block in blocks)
    live = Counter(block for slot, blocks in enumerate(cache.blocks) if cache.live[slot] for block in blocks)
    assert cache.refs == [held[block] for block in range(cache.num_blocks)]
    assert cache.live_refs == [live[block] for block in range(cache.num_blocks)] and cache.num_live == len(live)
    assert cache.num_free == sum(1 for block in range(cache.num_blocks) if not held[block])
    assert cache.spare_blocks() == cache.num_blocks - len(live)


_OPS = st.lists(st.tuples(st.sampled_from(["write", "trim", "share", "live", "release"]), st.integers(0, 3),
                          st.integers(0, 3), st.integers(0, MAX_LEN), st.integers(0, MAX_LEN)), min_size=30, max_size=80)


@settings(max_examples=100, deadline=None)
@given(ops=_OPS)
def test_shared_blocks_keep_every_slots_tokens_under_any_sequence_of_operations(ops):
    """Random grows with writes, trims, shares, live marks and releases over 4 slots and 12 blocks: every slot
    reads back the tokens written to it (or shared into it), whatever other slots write (copy on write), and the
    reference counts, live counts and free list always say which slots hold which blocks."""
    cache = KVCache(1, 4, 1, MAX_LEN, 1, torch.float32, block_size=BLOCK, num_blocks=12)
    written: list[list[float]] = [[] for _ in range(4)]  # what each slot's positions hold
    stamp = 0.0
    for op, slot, other, a, b in ops:
        if op == "write":  # positions start .. end - 1 (from near its end), after a grow making their blocks its own
            start = max(0, len(written[slot]) - a % (2 * BLOCK))
            end = min(MAX_LEN, start + 1 + b % (3 * BLOCK))
            if cache.grow(slot, end, write_from=start):
                values = [stamp + i for i in range(end - start)]
                stamp += MAX_LEN
                for position, value in zip(range(start, end), values):
                    block = cache.blocks[slot][position // BLOCK]
                    cache.keys[0][block, position % BLOCK] = value
                written[slot][start:] = values
        elif op == "trim":
            cache.trim(slot, a)
            del written[slot][a:]
        elif op == "share" and slot != other:  # (into a slot emptied first)
            cache.release(other)
            length = min(a, len(written[slot]))
            cache.share_prefix(slot, other, length)
            written[other] = written[slot][:length]
        elif op == "live":
            cache.set_live(slot, bool(a % 2))
        elif op == "release":
            cache.release(slot)
            written[slot] = []
        assert_block_counts(cache)
        for s in range(4):
            assert len(cache.blocks[s]) >= cache.blocks_for(len(written[s]))
            got = [cache.keys[0][cache.blocks[s][p // BLOCK], p % BLOCK, 0, 0].item() for p in range(len(written[s]))]
            assert got == written[s]


def test_bytes_per_token_counts_keys_and_values_of_every_layer():
    assert KVCache.bytes_per_token(3, 2, 16, torch.float32) == 2 * 3 * 2 * 16 * 4
    assert KVCache.bytes_per_token(3, 2, 16, torch.bfloat16) == 2 * 3 * 2 * 16 * 2
    assert KVCache.bytes_per_token(3, 2, 16, torch.float32, value_head_dim=8) == 3 * 2 * (16 + 8) * 4


def test_latent_attention_caches_its_latent_once_for_every_head():
    """Multi-head latent attention (DeepSeek-V2/V3): one head of latent + rotary key per token, the values
    a view of the keys; DeepSeek-V3's cache is then 1/71 of every head's expanded keys and values."""
    from transformers import DeepseekV3Config

    from service.engine import Engine, EngineConfig
    from tests.tiny_models import build_tiny_model, tiny_config

    engine = Engine(build_tiny_model("deepseek_v3"), EngineConfig(max_model_len=64))
    config = tiny_config("deepseek_v3")
    keys, values = engine._cache.keys[0], engine._cache.values[0]
    assert keys.shape[1:] == (16, 1, config.kv_lora_rank + config.qk_rope_head_dim)  # (blocks of 16 positions)
    assert values.shape[3] == config.kv_lora_rank and values.data_ptr() == keys.data_ptr()
    real = DeepseekV3Config()  # DeepSeek-V3's own sizes: 61 layers, 128 heads, latent 512 + 64
    latent = KVCache.bytes_per_token(real.num_hidden_layers, dtype=torch.bfloat16, **KVCache.for_model(real))
    expanded = KVCache.bytes_per_token(real.num_hidden_layers, real.num_attention_heads,
                                       real.qk_nope_head_dim + real.qk_rope_head_dim, torch.bfloat16, real.v_head_dim)
    assert latent == 61 * (512 + 64) * 2 and expanded / latent > 70


def test_layer_types_decide_each_layers_window_and_other_types_are_refused():
    """As transformers builds each layer's mask: a sliding layer gets the config's window, a full one none, even
    where the full layer's module holds the window (EXAONE-MoE), a linear-attention one none (it never calls
    the attention function), a chunked one (Llama 4) none (`install` gives it its chunk size); layer types this
    attention cannot compute are refused when the model is installed."""
    from service.attention import _layer_windows
    from tests.tiny_models import build_tiny_model, tiny_config

    assert _layer_windows(tiny_config("exaone_moe")) == [4, None, 4, None]
    model = build_tiny_model("exaone_moe")
    assert model.model.layers[1].self_attn.sliding_window == 4  # held, unused by a full-attention layer
    assert _layer_windows(tiny_config("qwen3_moe")) is None  # no layer types: the module's own window decides
    config = tiny_config("gpt_oss")
    assert _layer_windows(tiny_config("qwen3_next")) == [None] * 4
    assert _layer_windows(tiny_config("llama4_text")) == [None] * 4
    config.layer_types = ["sliding_attention", "hybrid_attention"]
    with pytest.raises(ValueError, match="hybrid_attention"):
        _layer_windows(config)


def test_install_marks_llama4s_chunked_layers_and_moves_temperature_tuning_here():
    """Llama 4's RoPE layers are chunked; its NoPE layer's temperature tuning is applied by the attention
    function at each token's position (the module would count positions from 0 in the flat batch)."""
    from service.engine import Engine, EngineConfig
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model("llama4_text")
    Engine(model, EngineConfig(max_model_len=64))
    modules = [layer.self_attn for layer in model.model.layers]
    assert [getattr(m, attention._CHUNK, None) for m in modules] == [8, 8, 8, None]
    assert [getattr(m, attention._TEMPERATURE, None) for m in modules] == [None, None, None, (4, 0.25)]
    assert not modules[3].attn_temperature_tuning  # (the RoPE layers never tune)


def test_kv_heads_may_differ_between_layers():
    """MiMo-V2-Flash's sliding layers have twice the kv heads of its full ones, and values narrower than keys:
    the cache gives each layer its own heads, and counts them."""
    from tests.tiny_models import tiny_config

    heads = KVCache.for_model(tiny_config("mimo_v2_flash"))
    assert heads == {"num_kv_heads": [1, 2, 2], "head_dim": 16, "value_head_dim": 12, "values_in_keys": False}
    cache = KVCache(3, 2, max_len=8, dtype=torch.float32, block_size=8, **heads)
    assert [k.shape[2] for k in cache.keys] == [1, 2, 2] and [v.shape[3] for v in cache.values] == [12] * 3
    assert KVCache.bytes_per_token(3, dtype=torch.float32, **heads) == (1 + 2 + 2) * (16 + 12) * 4
    with pytest.raises(ValueError, match="2 kv head counts for 3 layers"):
        KVCache(3, 2, [1, 2], 8, 16, torch.float32)


def test_head_widths_may_differ_between_layers_and_shared_layers_hold_no_keys():
    """Gemma 4's full-attention layers have wider heads (``global_head_dim``) and fewer kv heads than its sliding
    ones: the cache gives each layer its own width, and counts it. Its last ``num_kv_shared_layers`` layers attend
    the keys and values of the last earlier layer of their type: they hold none of their own."""
    from transformers import Gemma4TextConfig

    from tests.tiny_models import gemma4_text_config, tiny_config

    heads = KVCache.for_model(tiny_config("gemma4_text"))
    assert heads == {"num_kv_heads": [2, 2, 1], "head_dim": [16, 16, 32], "value_head_dim": None,
                     "values_in_keys": False}
    cache = KVCache(3, 2, max_len=8, dtype=torch.float32, **heads)
    assert [tuple(k.shape) for k in cache.keys] == [tuple(v.shape) for v in cache.values] == [
        (2, 16, 2, 16), (2, 16, 2, 16), (2, 16, 1, 32)]  # (one block of 16 positions per slot)
    assert KVCache.bytes_per_token(3, dtype=torch.float32, **heads) == (2 * 16 + 2 * 16 + 1 * 32) * 2 * 4
    with pytest.raises(ValueError, match="2 head dims for 3 layers"):
        KVCache(3, 2, 1, 8, [16, 32], torch.float32)
    shared = Gemma4TextConfig(**gemma4_text_config(num_hidden_layers=5, num_kv_shared_layers=2, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]))
    assert KVCache.for_model(shared)["num_kv_heads"] == [2, 1, 2, 0, 0]
    assert attention._kv_sources(shared) == {3: 2, 4: 1}  # the last sliding and full layers before the shared ones
    assert attention._kv_sources(tiny_config("gemma4_text")) == {}
