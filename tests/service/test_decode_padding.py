"""A step's decodes of very different lengths are attended in groups of similar length, each padded to its own
longest only (service/attention.py, `StepBatch.decode_groups`): one long and several short decoding sequences no
longer make the short ones read (and attend) the long one's length; the results are those of one padded call."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from service import attention
from service.attention import KVCache, SeqChunk, StepBatch, bind_step, ragged_attention
from tests.service.test_engine import GREEDY, _engine, _generate, _prompt, _run
from tests.tiny_models import build_tiny_model

HQ, HKV, D, BLOCK = 4, 2, 64, 16  # 1 KiB of float32 keys and values per position per layer
LONG, SHORT, NUM_SHORT = 3000, 11, 7


def test_length_groups_split_only_where_padding_reads_far_more_than_the_sequences_hold():
    kib = 1024
    one_mib = attention.DECODE_SPLIT_BYTES["cpu"]
    groups = attention._length_groups
    assert groups([LONG] + [SHORT] * NUM_SHORT, kib, one_mib) == [[0], list(range(1, 8))]
    assert groups([SHORT, LONG, SHORT], kib, one_mib) == [[1], [0, 2]]  # (each group in flat-batch order)
    assert groups([100, 60, 40, 12], kib, 4 * kib) == [[0, 1], [2], [3]]  # 60 is over half of 100: padded to it
    assert groups([LONG] * 8, kib, one_mib) == [list(range(8))]  # same lengths: one call
    assert groups([100] + [SHORT] * 7, kib, one_mib) == [list(range(8))]  # padding saves < 1 MiB: one call
    assert groups([LONG] + [SHORT] * 7, 64, 64 << 20) == [list(range(8))]  # a GPU's threshold: one call
    assert len(groups([2 ** n for n in range(20, 0, -1)], kib, 1)) == attention.MAX_DECODE_GROUPS


def _mixed_step(values_in_keys: bool = False, dv: int = D, seed: int = 0):
    """A paged cache (block 0 an idle slot's: no decoding sequence's blocks start at 0) holding a decoding sequence of
    LONG - 1 positions and NUM_SHORT of SHORT - 1, and a step of their decode tokens with a 5-token prefill of
    a new sequence between them in the flat batch; the step's query, key and value."""
    gen = torch.Generator().manual_seed(seed)
    slots = NUM_SHORT + 2
    cache = KVCache(1, slots, HKV, LONG + BLOCK, D, torch.float32, value_head_dim=dv, values_in_keys=values_in_keys,
                    block_size=BLOCK, num_blocks=2 + (LONG + BLOCK) // BLOCK + (NUM_SHORT + 1) * 2)
    assert cache.position_bytes == HKV * (D + (0 if values_in_keys else dv)) * 4
    cache.grow(slots - 1, 1)  # (takes block 0)
    starts = [SHORT - 1] * 3 + [LONG - 1] + [SHORT - 1] * (NUM_SHORT - 3)
    chunks, offset = [], 0
    for slot, start in enumerate(starts):
        if slot == 4:
            chunks.append(SeqChunk(NUM_SHORT + 1, 0, 5, offset))
            assert cache.grow(NUM_SHORT + 1, 5)
            offset += 5
        assert cache.grow(slot, start + 1)
        cache.sync_tables()
        for pool in (cache.keys[0], *([] if values_in_keys else [cache.values[0]])):
            history = torch.randn(start, pool.shape[2], pool.shape[3], generator=gen)
            pool.view(-1, *pool.shape[2:])[StepBatch.build([SeqChunk(slot, 0, start, 0)]).write_index(cache)] = history
        chunks.append(SeqChunk(slot, start, 1, offset))
        offset += 1
    query, key, value = (torch.randn(1, h, offset, d, generator=gen) for h, d in ((HQ, D), (HKV, D), (HKV, dv)))
    return cache, chunks, query, key, value


def _attend(cache: KVCache, chunks, query, key, value, module, kwargs) -> tuple[torch.Tensor, list[int]]:
    """The step's attention output on a copy of ``cache``, and the positions each decode gather read."""
    cache = _copy(cache)
    read, gather = [], cache.gather_decode

    def counting(pool, group):
        read.append(group.read_index(cache).numel() * cache.block_size)
        return gather(pool, group)

    cache.gather_decode = counting
    with bind_step(cache, StepBatch.build(chunks)):
        out, _ = ragged_attention(module, query, key, value, None, scaling=D ** -0.5, **kwargs)
    return out, read


def _copy(cache: KVCache) -> KVCache:
    """``cache`` with pools of its own (a step writes its new keys and values into them)."""
    copy = KVCache.__new__(KVCache)
    copy.__dict__.update(cache.__dict__)
    copy.keys = [keys.clone() for keys in cache.keys]
    copy.values = ([keys[..., :values.shape[3]] for keys, values in zip(copy.keys, cache.values)]
                   if cache.values_in_keys else [values.clone() for values in cache.values])
    return copy


VARIANTS = {
    "full": ({}, {}),
    "sliding window": ({"sliding_window": 1500}, {}),
    "sinks": ({}, {"s_aux": torch.tensor([0.5, -1.0, 2.0, 0.0])}),
    "sliding window and sinks": ({"sliding_window": 7}, {"s_aux": torch.tensor([3.0, -1.0, 0.2, 1.0])}),
    "chunked": ({attention._CHUNK: 1024}, {}),
    "latent (values in keys)": ({}, {}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_long_and_seven_short_decodes_read_what_they_hold_with_the_results_of_one_call(variant, monkeypatch):
    """One decode of 3000 positions and seven of 11: one padded call read 8 x 3008 positions of each pool (7.8x the
    3077 held); in two groups each decode reads its own blocks (3008 + 7 x 16), and every output (the prefill's
    too) equals the single padded call's."""
    attributes, kwargs = VARIANTS[variant]
    latent = variant.startswith("latent")
    dv = 48 if latent else D
    cache, chunks, query, key, value = _mixed_step(values_in_keys=latent, dv=dv)
    module = SimpleNamespace(layer_idx=0, **attributes)
    sdpa_keys = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **options):
        if q.dim() == 4:  # a decode call's query, [b, Hkv, G, d] (a prefill's is [Hq, n, d])
            sdpa_keys.append(k.shape[0] * k.shape[2])
        return sdpa(q, k, v, **options)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    grouped, read = _attend(cache, chunks, query, key, value, module, kwargs)
    pools = 1 if latent else 2
    held = LONG + NUM_SHORT * SHORT
    blocks = -(-LONG // BLOCK) * BLOCK + NUM_SHORT * BLOCK
    assert sum(read) == pools * blocks  # was pools * 8 * 3008
    if "s_aux" not in kwargs:
        assert sdpa_keys == [LONG, NUM_SHORT * SHORT] and sum(sdpa_keys) == held  # was 8 x 3000 positions attended
    monkeypatch.setattr(attention, "MAX_DECODE_GROUPS", 1)
    single, read = _attend(cache, chunks, query, key, value, module, kwargs)
    assert sum(read) == pools * 8 * -(-LONG // BLOCK) * BLOCK
    torch.testing.assert_close(grouped, single, atol=1e-6, rtol=1e-6)
    assert grouped.shape == (1, query.shape[2], HQ, dv) and not grouped.isnan().any()



def _gpt_oss_sinks(q, k, v, mask, scale, sinks):
    """GPT-OSS's eager attention with sinks (transformers' `eager_attention_forward` of gpt_oss), as bool-masked."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    logits = torch.cat([scores, sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


def _allocated(run) -> int:
    """Bytes of the tensors ``run()`` allocates (the profiler's memory events, by op)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
        run()
    return sum(max(event.self_cpu_memory_usage, 0) for event in profile.key_averages())


def _prefill_with_sinks(dtype: torch.dtype):
    """A 256-token chunk at position 256 (query heads 2 per kv head) with some earlier keys masked out, sinks."""
    gen = torch.Generator().manual_seed(3)
    hkv, groups, n, length, d = 2, 2, 256, 512, 16
    q, k, v = (torch.randn(*shape, generator=gen).to(dtype) for shape in
               ((hkv, groups, n, d), (hkv, 1, length, d), (hkv, 1, length, d)))
    mask = torch.ones(n, length, dtype=torch.bool).tril(length - n)
    mask[:, :length - n - 7] &= torch.rand(n, length - n - 7, generator=gen) > 0.3  # (a window or a DSA choice)
    return q, k, v, mask, 0.25, torch.randn(hkv, groups, 1, 1, generator=gen) * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prefill_with_sinks_gets_gpt_osss_attention(dtype):
    inputs = _prefill_with_sinks(dtype)
    out = attention._attend(*inputs)
    assert out.dtype == dtype
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out, _gpt_oss_sinks(*inputs), **tolerance)


def test_a_prefill_with_sinks_writes_one_tensor_of_scores():
    """GPT-OSS's formula wrote about six tensors of the scores' size (scaled, masked, the sink appended, the max
    subtracted, the softmax, its slice made contiguous), three alive at once, and a prefill chunk's scores are the
    largest tensors of a step; now the scores are written once and worked on in place (besides them: the mask's
    bools, a quarter of their size, and the outputs, the values' size). (float32: on a CPU a bfloat16 matmul
    allocates float32 scratch of its own.)"""
    inputs = _prefill_with_sinks(torch.float32)
    q, k = inputs[:2]
    scores = q.new_empty(*q.shape[:-1], k.shape[-2]).nbytes
    assert _allocated(lambda: attention._attend(*inputs)) < 1.6 * scores
    assert _allocated(lambda: _gpt_oss_sinks(*inputs)) > 4 * scores  # (what it was)


def test_decodes_with_sinks_get_gpt_osss_attention():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*shape, generator=gen) for shape in ((3, 2, 2, 16), (3, 2, 40, 16), (3, 2, 40, 16)))
    mask = (torch.arange(40)[None, :] < torch.tensor([40, 7, 1])[:, None])[:, None, None, :]
    sinks = torch.randn(2, 2, 1, generator=gen)
    torch.testing.assert_close(attention._attend(q, k, v, mask, None, sinks),
                               _gpt_oss_sinks(q, k, v, mask, 16 ** -0.5, sinks), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [
    "qwen3_moe",  # full attention
    "gpt_oss",  # sliding layers and sinks
    "deepseek_v32",  # latent attention, a DSA indexer choosing 6 keys per query (its choice made per group)
    "glm_moe_dsa",  # the same, and shared layers attending the choice of the layer before
    "llama4",  # chunked attention, a NoPE layer with temperature tuning by position
    "gemma4",  # KV-shared layers reading their source layer's blocks, kv heads and widths per layer
    "mimo_v2_flash",  # kv heads per layer, sinks on sliding layers, values narrower than keys
])
def test_staggered_requests_decoded_in_groups_equal_generate(arch, monkeypatch):
    """`test_engine_more_architectures`' staggered requests (prompts of 2 to 64 tokens joining at different steps)
    with every split the length ratio allows made (a split saving a byte is worth it): steps whose decodes run
    in two or more groups, and every request gets transformers' greedy tokens."""
    monkeypatch.setattr(attention, "DECODE_SPLIT_BYTES", {"cpu": 1, None: 1})
    sizes = []
    decode_groups = StepBatch.decode_groups

    def recording(batch, cache):
        groups = decode_groups(batch, cache)
        sizes.append(len(groups))
        return groups

    monkeypatch.setattr(StepBatch, "decode_groups", recording)
    reference = build_tiny_model(arch)
    lengths = {0: [5, 17], 3: [40], 5: [3, 64], 9: [9, 2]}
    joins = {step: [(f"s{step}-{i}", _prompt(n, 10 * step + i), GREEDY) for i, n in enumerate(ns)]
             for step, ns in lengths.items()}
    tokens, _ = _run(_engine(arch, max_num_seqs=4, max_num_batched_tokens=24), joins)
    assert max(sizes) >= 2
    for requests in joins.values():
        for request_id, prompt, _ in requests:
            assert tokens[request_id] == _generate(reference, prompt, 24), request_id
