"""Attention over a flattened ragged batch, with a paged KV cache.

Owns the KV cache (`KVCache`: blocks of positions handed to sequences as they grow, a block table per slot,
blocks shared between sequences by reference count and copied on write, finished sequences' blocks kept as
a prefix cache until they are needed), the per-step metadata that says which sequence owns which token
range of the flat batch, and the attention function that the model's own attention modules call (registered
with transformers as ``"vibe_ragged"``). The modules still apply their projections, q/k norms and RoPE; this
file only appends keys/values to the cache and computes causal attention over it, with GPT-OSS's attention sinks (a learned logit per head that takes
its share of the softmax and adds nothing to the output) where the module passes them, sliding windows, and
Llama 4's chunked attention (a query attends the keys of its own ``attention_chunk_size`` chunk of positions
only, causally) and its attention temperature tuning on NoPE layers (applied here at each token's position:
the module would take positions 0.. of the flat batch, having no cache to count earlier tokens), kv heads whose
number and width differ per layer (Gemma 4's full-attention layers: fewer and wider), and Gemma 4's layers that
share an earlier layer's keys and values (they attend that layer's cache and hold none).

Single-token queries (decode steps) of all sequences are batched into one padded SDPA call per layer over
their blocks gathered in position order (PyTorch has no paged attention kernel on CPU), or a few calls where their
lengths differ so much that padding to the longest would read far more than they hold (groups of similar length,
`StepBatch.decode_groups`); multi-token chunks (prefill) get one SDPA call each over their gathered blocks (with
sinks, the same attention written out: SDPA has no sink). Ignores dropout and logit soft-capping (no supported
model uses them at inference).

Multi-head latent attention (DeepSeek-V2 and V3, GLM-4.7-Flash) is computed on its latent, as vLLM and SGLang
do: the cache holds each token's compressed key-value latent and rotary key (one "head" of
``kv_lora_rank + qk_rope_head_dim``, the values being its first ``kv_lora_rank`` dimensions), each query
head's non-rotary part is multiplied into the latent space by its slice of ``kv_b_proj`` before the
scores, and each head's output is multiplied out of it after. The scores and outputs are those of the
expanded keys and values (up to rounding), at about 1/70 of their cache for DeepSeek-V3.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

ATTN_IMPLEMENTATION = "vibe_ragged"
# layer types that never call the attention function, so hold no keys and values: linear attention (its states
# instead, `service.linear_attention`) and Nemotron-H's MoE and MLP layers (a layer is one mixer there)
NO_ATTENTION = frozenset({"linear_attention", "moe", "mlp"})


class KVCache:
    """Keys and values of every sequence, in fixed-size blocks that a per-slot block table maps positions to.

    Per layer, ``keys[layer]`` is ``[num_blocks, block_size, num_kv_heads, head_dim]`` (``num_kv_heads`` may be
    given per layer) and ``values[layer]`` the same with ``value_head_dim`` (None: as wide), allocated once on
    ``device`` and left unwritten: a block is zeroed the first time it is handed out (so masked-out positions
    never hold NaN), and freed blocks are handed out again before blocks never used, so a CPU cache's memory is
    committed as it fills, not all at start-up. A slot is one sequence's row of the block table
    ``tables [num_slots, ceil(max_len / block_size)]``: position ``p`` of the sequence in slot ``s`` lies in block
    ``tables[s, p // block_size]`` at offset ``p % block_size``. With ``values_in_keys`` the values are the keys'
    first ``value_head_dim`` dimensions (a view: the latent of multi-head latent attention is both), and take no
    memory of their own.

    Blocks are handed to slots on demand (`grow`) and back (`trim`, `release`), as vLLM's paged attention does,
    so a sequence holds memory for the tokens it has, not for ``max_len``. Slots share blocks by reference count:
    a sequence starting with another's tokens takes that sequence's blocks of them (`share_prefix`), and a block is
    copied only when a slot sharing it is about to write into it (`grow`'s ``write_from``: copy on write), so a
    system prompt that a hundred requests share is held once. A slot is *live* while a running sequence owns it
    (`set_live`); blocks no live slot holds are free or hold cached prefixes, which can be given up
    (`spare_blocks`). Without ``num_blocks`` every slot is
    given its whole ``max_len`` up front (a contiguous cache: for tests and single sequences). Attention reads a
    slot's blocks by gathering them in position order (`gather_decode`, `gather_prefill`): PyTorch has no paged
    attention kernel on CPU, so each layer's read copies the keys it attends once (positions before heads in a
    block, so the gathered blocks are the sequence's positions in order without a second copy).
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int | Sequence[int], max_len: int,
                 head_dim: int | Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu",
                 value_head_dim: int | None = None, values_in_keys: bool = False, block_size: int = 16,
                 num_blocks: int | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        heads, dims = _per_layer(num_kv_heads, num_layers), _per_layer(head_dim, num_layers, "head dims")
        self.block_size = block_size
        self.max_blocks = -(-max_len // block_size)  # blocks of one max_len sequence
        static = num_blocks is None
        self.num_blocks = num_slots * self.max_blocks if static else int(num_blocks)
        shapes = [(self.num_blocks, block_size, layer_heads, dim) for layer_heads, dim in zip(heads, dims)]
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
        self.values_in_keys = values_in_keys
        if values_in_keys:
            self.values = [keys[..., :value_head_dim or keys.shape[3]] for keys in self.keys]
        else:
            self.values = [torch.empty((*shape[:3], value_head_dim or shape[3]), dtype=dtype, device=device)
                           for shape in shapes]
        self.index_keys: list[torch.Tensor] = []  # a DSA indexer's keys per layer (`set_index_keys`)
        # bytes of keys and values a layer reads per position of a sequence, averaged over the layers that hold
        # keys (what a decode gather pads costs: `StepBatch.decode_groups`)
        held = [keys[0, 0].numel() + (0 if values_in_keys else values[0, 0].numel())
                for keys, values in zip(self.keys, self.values) if keys.shape[2]]
        self.position_bytes = sum(held) * self.keys[0].element_size() // max(len(held), 1)
        self.num_slots = num_slots
        self.max_len = max_len
        # (a table entry past a slot's blocks is 0 or a block it held once: block 0 is zeroed now, the others were
        # when first handed out, so a padded read of such an entry reads no NaN)
        self.tables = torch.zeros(num_slots, self.max_blocks, dtype=torch.int64, device=device)
        self.blocks: list[list[int]] = [[] for _ in range(num_slots)]  # each slot's blocks, in position order
        self._recycled: list[int] = []  # free blocks that were used, the last freed taken first
        self._fresh = 0  # blocks from here on were never handed out (unwritten): taken in order, after the recycled
        self._zero(0, 1)
        self.refs = [0] * self.num_blocks       # slots holding each block
        self.live_refs = [0] * self.num_blocks  # live slots holding each block
        self.live = [False] * num_slots
        self.num_live = 0                       # blocks some live slot holds
        self._dirty: list[int] = []  # slots whose table row changed since `sync_tables`
        if static:
            for slot in range(num_slots):
                self.grow(slot, max_len)
        self.linear = None  # the states of linear-attention layers (service.linear_attention), if any

    @property
    def num_free(self) -> int:
        """Blocks no slot holds."""
        return len(self._recycled) + self.num_blocks - self._fresh

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)

    def own_blocks(self, num_tokens: int, shared: int) -> int:
        """Blocks a sequence of ``num_tokens`` positions takes for itself when its first ``shared`` are another's
        (`share_prefix`: their full blocks are shared, the one they end inside is copied)."""
        return self.blocks_for(num_tokens) - shared // self.block_size

    def grow(self, slot: int, num_tokens: int, write_from: int | None = None) -> bool:
        """Give ``slot`` blocks for its first ``num_tokens`` positions, and with ``write_from`` make the blocks
        holding positions from there on its own (a block another slot shares is replaced by a copy: the slot is
        about to write there); False (and nothing changed) if too few blocks are free."""
        blocks = self.blocks[slot]
        missing, shared = self._growth(slot, num_tokens, write_from)
        if missing + len(shared) > self.num_free:
            return False
        first = len(blocks) if write_from is None else write_from // self.block_size
        if shared:
            fresh = self._take(slot, len(shared))
            if shared[0] == first and write_from % self.block_size:  # positions before write_from are kept
                self._copy_blocks([blocks[first]], fresh[:1])
            self._drop(slot, [blocks[index] for index in shared])
            for index, block in zip(shared, fresh):
                blocks[index] = block
        if missing:
            blocks += self._take(slot, missing)
        if missing or shared:
            self._dirty.append(slot)
        return True

    def shortfall(self, slot: int, num_tokens: int, write_from: int | None = None) -> int:
        """Blocks that must come free before `grow` with these arguments can succeed (0: it can)."""
        missing, shared = self._growth(slot, num_tokens, write_from)
        return max(0, missing + len(shared) - self.num_free)

    def _growth(self, slot: int, num_tokens: int, write_from: int | None) -> tuple[int, list[int]]:
        """`grow`'s needs: blocks missing past ``slot``'s, and the indexes of its shared blocks it must copy."""
        blocks = self.blocks[slot]
        missing = max(0, self.blocks_for(num_tokens) - len(blocks))
        first = len(blocks) if write_from is None else write_from // self.block_size
        return missing, [index for index in range(first, len(blocks)) if self.refs[blocks[index]] > 1]

    def trim(self, slot: int, num_tokens: int) -> None:
        """Drop ``slot``'s blocks past its first ``num_tokens`` positions (all of them for 0); a block no other
        slot holds is free again."""
        keep = self.blocks_for(num_tokens)
        if len(self.blocks[slot]) > keep:
            self._drop(slot, self.blocks[slot][keep:])
            del self.blocks[slot][keep:]

    def release(self, slot: int) -> None:
        """Drop all of ``slot``'s blocks."""
        self.trim(slot, 0)

    def share_prefix(self, source: int, target: int, length: int) -> None:
        """Give slot ``target`` (holding nothing) the blocks of slot ``source``'s first ``length`` positions, by
        reference: the last one, if ``length`` ends inside it, is copied when ``target`` grows to write there
        (``grow(target, ..., write_from=length)``)."""
        if self.blocks[target]:
            raise ValueError(f"slot {target} holds blocks: release it before it shares another's")
        shared = self.blocks[source][:self.blocks_for(length)]
        self._hold(target, shared)
        self.blocks[target] = list(shared)
        self._dirty.append(target)

    def copy_states(self, source: int, target: int) -> None:
        """Give slot ``target`` slot ``source``'s linear-attention states, if the model has any (a state holds
        one position: a fork takes its parent's after the whole prompt)."""
        if self.linear is not None:
            self.linear.copy_slot(source, target)

    def set_live(self, slot: int, live: bool) -> None:
        """Mark ``slot`` as owned by a running sequence (``live``) or not (free, or holding a cached prefix)."""
        if self.live[slot] == live:
            return
        step, edge = (1, 1) if live else (-1, 0)
        for block in self.blocks[slot]:
            self.live_refs[block] += step
            if self.live_refs[block] == edge:
                self.num_live += step
        self.live[slot] = live

    def spare_blocks(self, keep: int | None = None) -> int:
        """Blocks free, or free once the slots not live give theirs up (but slot ``keep``)."""
        spare = self.num_blocks - self.num_live
        if keep is not None and not self.live[keep]:
            spare -= sum(1 for block in self.blocks[keep] if not self.live_refs[block])
        return spare

    def live_blocks(self, slot: int, count: int) -> int:
        """How many of ``slot``'s first ``count`` blocks a live slot holds."""
        return sum(1 for block in self.blocks[slot][:count] if self.live_refs[block])

    def set_index_keys(self, pools: list[torch.Tensor]) -> None:
        """Give the cache a DSA indexer's key pools (service.sparse_attention: ``[num_blocks, block_size, 1, d]``
        per layer, unwritten like the keys), zeroing the blocks handed out so far."""
        self.index_keys = pools
        for pool in pools:
            pool[:max(self._fresh, 1)] = 0

    def _take(self, slot: int, count: int) -> list[int]:
        if not count:
            return []
        recycled = min(count, len(self._recycled))
        taken = self._recycled[len(self._recycled) - recycled:][::-1]
        del self._recycled[len(self._recycled) - recycled:]
        if count > recycled:
            fresh = self._fresh
            self._fresh += count - recycled
            self._zero(fresh, self._fresh)
            taken += range(fresh, self._fresh)
        self._hold(slot, taken)
        return taken

    def _zero(self, begin: int, end: int) -> None:
        """Zero blocks ``begin`` .. ``end - 1`` in every pool (their first use)."""
        for pool in (*self.keys, *([] if self.values_in_keys else self.values), *self.index_keys):
            pool[begin:end] = 0

    def _hold(self, slot: int, blocks: list[int]) -> None:
        live = self.live[slot]
        for block in blocks:
            self.refs[block] += 1
            if live:
                self.live_refs[block] += 1
                self.num_live += self.live_refs[block] == 1

    def _drop(self, slot: int, blocks: list[int]) -> None:
        live = self.live[slot]
        for block in blocks:
            self.refs[block] -= 1
            if live:
                self.live_refs[block] -= 1
                self.num_live -= self.live_refs[block] == 0
            if not self.refs[block]:
                self._recycled.append(block)

    def _copy_blocks(self, source: list[int], target: list[int]) -> None:
        src = torch.tensor(source, dtype=torch.int64, device=self.tables.device)
        dst = torch.tensor(target, dtype=torch.int64, device=self.tables.device)
        for keys, values in zip(self.keys, self.values):
            keys[dst] = keys[src]
            if not self.values_in_keys:  # (else the keys' copy was theirs)
                values[dst] = values[src]
        for keys in self.index_keys:
            keys[dst] = keys[src]

    def sync_tables(self) -> None:
        """Write the block lists of slots that changed into ``tables`` (one copy per slot, before a forward)."""
        for slot in dict.fromkeys(self._dirty):
            blocks = self.blocks[slot]
            if blocks:
                self.tables[slot, :len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
        self._dirty.clear()

    def gather_decode(self, pool: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """``pool``'s keys (or values) of the step's decode sequences, ``[B, H, decode_max_len, d]``."""
        blocks = self.blocks_for(batch.decode_max_len)
        gathered = pool.index_select(0, batch.read_index(self))  # [B * nb, size, H, d] (2.6x faster than pool[index])
        _, size, heads, dim = gathered.shape
        return gathered.view(batch.num_decodes, blocks * size, heads, dim)[:, :batch.decode_max_len].transpose(1, 2)

    def gather_prefill(self, pool: torch.Tensor, chunk: SeqChunk) -> torch.Tensor:
        """``pool``'s keys (or values) of ``chunk``'s sequence up to the chunk's end, ``[H, end, d]``."""
        end = chunk.start + chunk.num_tokens
        gathered = pool.index_select(0, self.tables[chunk.slot, :self.blocks_for(end)])  # [nb, B, H, d]
        blocks, size, heads, dim = gathered.shape
        return gathered.view(blocks * size, heads, dim)[:end].transpose(0, 1)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int | Sequence[int], head_dim: int | Sequence[int],
                        dtype: torch.dtype, value_head_dim: int | None = None, values_in_keys: bool = False) -> int:
        """Bytes of keys plus values that one token occupies over all layers."""
        heads, dims = _per_layer(num_kv_heads, num_layers), _per_layer(head_dim, num_layers, "head dims")
        widths = [dim + (0 if values_in_keys else value_head_dim or dim) for dim in dims]
        return sum(h * w for h, w in zip(heads, widths)) * torch.empty(0, dtype=dtype).element_size()

    @staticmethod
    def for_model(config) -> dict[str, int | bool | None]:
        """The cache's head layout for a transformers config (`KVCache` keyword arguments): its attention's
        heads, or the latent of multi-head latent attention (see the module's docstring)."""
        if getattr(config, "kv_lora_rank", None):  # (Kimi-Linear's linear-attention layers: none)
            return {"num_kv_heads": _without_attention(config, 1),
                    "head_dim": config.kv_lora_rank + config.qk_rope_head_dim,
                    "value_head_dim": config.kv_lora_rank, "values_in_keys": True}
        if getattr(config, "model_type", None) == "gemma4_text":  # its full-attention layers: wider heads, fewer;
            # layers sharing an earlier layer's keys and values (num_kv_shared_layers) read that layer's: none of theirs
            layers = [config.per_layer_config[layer] for layer in range(config.num_hidden_layers)]
            return {"num_kv_heads": [0 if mode == "reuse" else layer.num_key_value_heads
                                     for layer, mode in zip(layers, config.kv_sharing_modes)],
                    "head_dim": [layer.head_dim for layer in layers], "value_head_dim": None, "values_in_keys": False}
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if getattr(config, "model_type", None) == "mimo_v2_flash":  # its sliding layers have twice the kv heads
            heads = [heads * 2 if kind == "sliding_attention" else heads for kind in config.layer_types]
        else:
            heads = _without_attention(config, heads)
        return {"num_kv_heads": heads,
                "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                "value_head_dim": getattr(config, "v_head_dim", None), "values_in_keys": False}


def _without_attention(config, heads: int) -> int | list[int]:
    """``heads`` kv heads, or per layer where the config has layers without keys and values (`NO_ATTENTION`): none
    on those."""
    if set(getattr(config, "layer_types", None) or ()) & NO_ATTENTION:
        return [0 if kind in NO_ATTENTION else heads for kind in config.layer_types]
    return heads


def _per_layer(counts: int | Sequence[int], num_layers: int, what: str = "kv head counts") -> list[int]:
    """KV heads (or head dims) of each layer, from one count for all or one per layer."""
    if isinstance(counts, int):
        return [counts] * num_layers
    per_layer = [int(count) for count in counts]
    if len(per_layer) != num_layers:
        raise ValueError(f"{len(per_layer)} {what} for {num_layers} layers")
    return per_layer


@dataclass(frozen=True)
class SeqChunk:
    """The new tokens of one sequence in a step.

    Attributes:
        slot: KV cache slot of the sequence.
        start: position of the first new token (= tokens already in the cache).
        num_tokens: new tokens (>= 1), at flat-batch offsets ``offset .. offset + num_tokens - 1``.
        offset: where the chunk starts in the flat batch.
    """

    slot: int
    start: int
    num_tokens: int
    offset: int


@dataclass
class StepBatch:
    """Per-step metadata shared by every layer: which sequence owns which tokens of ``[1, T]``.

    Built once per step by ``StepBatch.build``; the decode tensors are precomputed so that each layer
    does no Python work per sequence for single-token chunks. Decode attention reads the decode tokens'
    sequences only, one row each in ``decode_select`` order (not the slots between them: a slot range would
    gather the blocks of idle and cached slots too). The selector is a slice when the decode tokens are
    contiguous in the flat batch (the scheduler puts them first). Decode attention runs per group of decodes of
    similar length (`decode_groups`, each a `StepBatch` of its decodes), each padded to its own longest only.
    """

    chunks: tuple[SeqChunk, ...]
    prefills: tuple[SeqChunk, ...]
    num_decodes: int             # B: single-token chunks
    decode_select: slice | torch.Tensor  # flat-batch offsets of the B single-token chunks
    decode_slots: torch.Tensor   # int64 [B]: their slots
    decode_len: torch.Tensor     # int64 [B]: keys each attends (its position + 1)
    decode_max_len: int          # decode_len.max(), known without a device sync
    _masks: dict[tuple[int | None, int | None], torch.Tensor] = field(default_factory=dict)
    _index: dict[str, torch.Tensor] = field(default_factory=dict)
    _groups: tuple[StepBatch, ...] | None = None

    @staticmethod
    def build(chunks: Sequence[SeqChunk], device: torch.device | str = "cpu") -> StepBatch:
        """Metadata for ``chunks`` (in flat-batch order, offsets contiguous from 0), tensors on ``device``."""
        decodes = [c for c in chunks if c.num_tokens == 1]
        prefills = tuple(c for c in chunks if c.num_tokens > 1)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
        offsets = [c.offset for c in decodes]
        first = offsets[0] if offsets else 0
        contiguous = offsets == list(range(first, first + len(offsets)))
        return StepBatch(
            chunks=tuple(chunks), prefills=prefills, num_decodes=len(decodes),
            decode_select=slice(first, first + len(offsets)) if contiguous else as_tensor(offsets),
            decode_slots=as_tensor([c.slot for c in decodes]), decode_len=as_tensor([c.start + 1 for c in decodes]),
            decode_max_len=max((c.start + 1 for c in decodes), default=0),
        )

    def decode_mask(self, sliding_window: int | None, chunk_size: int | None = None) -> torch.Tensor:
        """Bool ``[B, 1, 1, max_len]``: True where each decode query may attend (within its sliding window, and
        its chunk of ``chunk_size`` positions, where given)."""
        kind = (sliding_window, chunk_size)
        if kind not in self._masks:
            length = self.decode_len[:, None]
            keys = torch.arange(self.decode_max_len, device=length.device)[None, :]
            allowed = keys < length
            if sliding_window is not None:
                allowed &= keys > length - 1 - sliding_window
            if chunk_size is not None:  # the query is at position length - 1
                allowed &= keys >= (length - 1) // chunk_size * chunk_size
            self._masks[kind] = allowed[:, None, None, :]
        return self._masks[kind]

    def decode_groups(self, cache: KVCache) -> tuple[StepBatch, ...]:
        """The step's decodes in groups of similar length, each a `StepBatch` of its decodes (their flat-batch
        offsets kept), that decode attention reads and attends with one padded call each (once per step).

        One padded call reads every decode's keys up to the longest one's: a sequence of 128k positions among 31
        short ones made each read 128k (for Qwen3-30B-A3B, 8 GiB of keys and values per layer), where vLLM's
        paged attention reads each sequence's own blocks. Longest first, a decode starts a new group when the
        group's longest is at least `DECODE_GROUP_RATIO` times its length and the positions it and every shorter
        decode would then not read come to `DECODE_SPLIT_BYTES` of keys and values (per layer, as
        ``cache.position_bytes`` counts them) or more: no group pads a decode past that ratio unless splitting
        would save less than one more call costs, so short contexts keep one call (the step itself: ``(self,)``).
        At most `MAX_DECODE_GROUPS`; each group's decodes are in flat-batch order."""
        if self._groups is None:
            decodes = [c for c in self.chunks if c.num_tokens == 1]
            groups = _length_groups([c.start + 1 for c in decodes], cache.position_bytes,
                                    DECODE_SPLIT_BYTES.get(cache.tables.device.type, DECODE_SPLIT_BYTES[None]))
            self._groups = (self,) if len(groups) < 2 else tuple(
                StepBatch.build([decodes[index] for index in group], self.decode_len.device) for group in groups)
        return self._groups

    def write_index(self, cache: KVCache) -> torch.Tensor:
        """int64 ``[T]``: the row of each token of the flat batch in ``cache``'s pools seen as ``[blocks x
        block_size, H, d]`` (from its block tables; once per step)."""
        if "write" not in self._index:
            device = cache.tables.device
            counts = torch.tensor([c.num_tokens for c in self.chunks], device=device)
            # (output_size: on a GPU, repeat_interleave would read the counts back to size its output: a sync)
            slots = torch.tensor([c.slot for c in self.chunks], device=device).repeat_interleave(
                counts, output_size=sum(c.num_tokens for c in self.chunks))
            positions = self.positions(device)
            blocks = cache.tables[slots, positions // cache.block_size]
            self._index["write"] = blocks * cache.block_size + positions % cache.block_size
        return self._index["write"]

    def read_index(self, cache: KVCache) -> torch.Tensor:
        """int64 ``[B x nb]``: the blocks of the decode tokens' sequences, each one's first ``nb`` (as many as
        ``decode_max_len`` positions fill) in position order, sequence after sequence (once per step)."""
        if "read" not in self._index:
            blocks = cache.blocks_for(self.decode_max_len)
            self._index["read"] = cache.tables[self.decode_slots, :blocks].reshape(-1)
        return self._index["read"]

    def positions(self, device: torch.device | str) -> torch.Tensor:
        """int64 ``[T]``: the position of each token of the flat batch in its sequence."""
        return torch.cat([torch.arange(c.start, c.start + c.num_tokens, device=device) for c in self.chunks])


def _length_groups(lengths: list[int], position_bytes: int, split_bytes: int) -> list[list[int]]:
    """Indexes of ``lengths`` in groups (`StepBatch.decode_groups`' rule), longest group first."""
    count = len(lengths)
    if count < 2 or max(lengths) < DECODE_GROUP_RATIO * min(lengths) \
            or (count - 1) * max(lengths) * position_bytes < split_bytes:  # (more than any split could save)
        return [list(range(count))]
    order = sorted(range(count), key=lengths.__getitem__, reverse=True)
    groups, longest = [[order[0]]], lengths[order[0]]
    for rank in range(1, count):
        length = lengths[order[rank]]
        saved = (count - rank) * (longest - length) * position_bytes  # at least, were this and the rest a group
        if longest >= DECODE_GROUP_RATIO * length and saved >= split_bytes and len(groups) < MAX_DECODE_GROUPS:
            groups.append([])
            longest = length
        groups[-1].append(order[rank])
    return [sorted(group) for group in groups]


# When a step's decodes take more than one padded attention call (`StepBatch.decode_groups`): a group's longest
# decode at least DECODE_GROUP_RATIO times as long as the next, splitting there saving at least DECODE_SPLIT_BYTES of
# keys and values read per layer (by the device the cache is on; None: any but the CPU), at most MAX_DECODE_GROUPS.
# The bytes are about what one more call costs. On an H200 (bfloat16, 4 kv heads of 128, 32 decodes, index_select
# and masked SDPA as `ragged_attention` runs them, each call building its own mask): one sequence of 2k and 31 of
# 100 took 260 us in one call and 337 us in two (the split would save 118 MiB), at 8k 758 vs 747 us (490 MiB), at
# 32k 2.7 vs 1.8 ms and at 128k 10.3 vs 6.0 ms. On a CPU a call took 0.1 ms and each MiB read about 0.5 ms more.
DECODE_GROUP_RATIO = 2
DECODE_SPLIT_BYTES: dict[str | None, int] = {"cpu": 1 << 20, None: 256 << 20}
MAX_DECODE_GROUPS = 8


_CURRENT: contextvars.ContextVar[tuple[KVCache, StepBatch] | None] = contextvars.ContextVar(
    "vibe_ragged_step", default=None)


@contextlib.contextmanager
def bind_step(cache: KVCache, batch: StepBatch) -> Iterator[None]:
    """Make ``cache`` and ``batch`` the ones the attention function uses during one forward, whose
    scaled-dot-product attention takes any backend but cuDNN's (`SDPA_BACKENDS`)."""
    cache.sync_tables()
    token = _CURRENT.set((cache, batch))
    try:
        with sdpa_kernel(SDPA_BACKENDS):
            yield
    finally:
        _CURRENT.reset(token)


# PyTorch's scaled_dot_product_attention backends for the engine's steps: not cuDNN's, which torch picks first
# for half precision on Hopper and which builds an execution plan for every new shape; an engine step's shapes
# (the decoding sequences' lengths, the prefill chunks) are new at almost every step. Measured on an H200
# (scripts/profile_engine.py, bfloat16, Qwen3-30B-A3B's layer width): 12.4 ms of host time per attention call,
# 10 us of it on the GPU, so 4 layers took 54 ms a decode step; FlashAttention and the memory-efficient kernel
# need no plan. (On a CPU only FlashAttention's CPU kernel and the math path exist; nothing changes there.)
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def bound_step() -> tuple[KVCache, StepBatch]:
    """The cache and step metadata of the forward running now (`bind_step`)."""
    bound = _CURRENT.get()
    if bound is None:
        raise RuntimeError("vibe_ragged attention called outside an engine step (no StepBatch bound)")
    return bound


def ragged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls for each layer.

    Args:
        module: the model's attention module (``layer_idx``, optionally ``sliding_window``).
        query: [1, Hq, T, d] after norms and RoPE; key: [1, Hkv, T, d], value: [1, Hkv, T, dv] of the new
            tokens (dv = d but for DeepSeek-V3's attention).
        attention_mask: ignored (the model builds none); causality comes from the step metadata.
        scaling: softmax scale (None: 1/sqrt(d)).
        sliding_window: keys further back than this many positions are not attended (None: all).
            A layer's type decides instead where the config names layer types (see `install`), and a
            chunked-attention layer attends its query's chunk only.
        s_aux: GPT-OSS's attention sinks, one logit per query head [Hq] (None: no sink).

    Returns:
        ([1, T, Hq, dv], None).
    """
    cache, batch = bound_step()
    sinks = kwargs.get("s_aux")
    selection = kwargs.get("indices")  # a DSA indexer's choice of keys (service.sparse_attention)
    window = getattr(module, _WINDOW, _UNSET)  # the layer's type decides, as transformers' masks do
    if window is _UNSET:
        window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    chunk_size = getattr(module, _CHUNK, None)
    tuning = getattr(module, _TEMPERATURE, None)
    if tuning is not None:
        query = _tuned(query, batch.positions(query.device), *tuning)
    source = getattr(module, _KV_SOURCE, None)  # Gemma 4's KV-shared layers: the keys and values of an earlier layer
    layer = module.layer_idx if source is None else source
    layer_keys, layer_values = cache.keys[layer], cache.values[layer]
    latent = getattr(module, _LATENT, None)
    if latent is not None:  # key: [latent, rotary key] of one head; queries into the latent space
        rotary = query.shape[3] - latent.nope
        q_nope, q_rot = query.split([latent.nope, rotary], dim=-1)
        query = torch.cat((torch.einsum("bhtn,hnr->bhtr", q_nope, latent.up_keys), q_rot), dim=-1)
    if source is None:  # (a shared layer's key and value are its source's, which that layer appended this step)
        append_keys(cache, layer_keys, key[0], batch)
        if not cache.values_in_keys:  # (else appending the keys appended them)
            append_keys(cache, layer_values, value[0], batch)
    out = query.new_empty(query.shape[2], query.shape[1], layer_values.shape[3])  # [T, Hq, dv]
    for index, group in enumerate(batch.decode_groups(cache) if batch.num_decodes else ()):
        chosen = selection.decode[index] if selection is not None and selection.decode else None
        keys, values = _gathered(cache, layer_keys, layer_values, cache.gather_decode, group)
        out[group.decode_select] = _decode(query[0], keys, values, group, window, scaling, sinks, chosen, chunk_size)
    for chunk in batch.prefills:
        chosen = selection.prefill.get(chunk.offset) if selection is not None else None
        keys, values = _gathered(cache, layer_keys, layer_values, cache.gather_prefill, chunk)
        out[chunk.offset:chunk.offset + chunk.num_tokens] = _prefill(
            query[0], keys, values, chunk, window, scaling, sinks, chosen, chunk_size)
    if latent is not None:  # each head's output out of the latent space
        out = torch.einsum("thr,hvr->thv", out, latent.up_values)
    return out.unsqueeze(0), None


def _gathered(cache: KVCache, keys: torch.Tensor, values: torch.Tensor, gather, where) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """A layer's keys and values read by ``gather`` (`KVCache.gather_decode` or `gather_prefill`) for ``where``;
    values that are the keys' first dimensions (latent attention) are sliced from the keys read, not read again."""
    gathered = gather(keys, where)
    if cache.values_in_keys:
        return gathered, gathered[..., :values.shape[-1]]
    return gathered, gather(values, where)


def append_keys(cache: KVCache, pool: torch.Tensor, new: torch.Tensor, batch: StepBatch) -> None:
    """Write new keys (or values) ``new [Hkv, T, d]`` into their sequences' blocks of ``pool`` (a pool of
    ``cache``, whose block tables say where each position lies)."""
    pool.view(-1, *pool.shape[2:])[batch.write_index(cache)] = new.transpose(0, 1)


def _decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: StepBatch,
            window: int | None, scaling: float | None, sinks: torch.Tensor | None,
            chosen: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Attention of every single-token query at once, over its sequence's keys and values ``[B, Hkv, L, d]``
    (gathered from the cache's blocks, `KVCache.gather_decode`).

    ``query [Hq, T, d]``; returns ``[B, Hq, dv]`` for the decode tokens in ``batch.decode_select`` order.
    Query heads are grouped under their kv head (GQA without repeating keys): ``[B, Hkv, G, d]``.
    """
    num_kv_heads, head_dim = keys.shape[1], keys.shape[3]
    mask = batch.decode_mask(window, chunk_size)
    if chosen is not None:  # [B, L]: the keys an indexer chose
        mask = mask & chosen[:, None, None, :]
    q = query[:, batch.decode_select]                                  # [Hq, B, d]
    q = q.reshape(num_kv_heads, -1, batch.num_decodes, head_dim).permute(2, 0, 1, 3)  # [B, Hkv, G, d]
    if sinks is not None:
        sinks = sinks.reshape(num_kv_heads, -1, 1)                     # [Hkv, G, 1] against [B, Hkv, G, L]
    attn = _attend(q, keys, values, mask, scaling, sinks)
    return attn.reshape(batch.num_decodes, -1, values.shape[3])       # [B, Hq, dv]


def _prefill(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk: SeqChunk,
             window: int | None, scaling: float | None, sinks: torch.Tensor | None,
             chosen: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Causal attention of one multi-token chunk over its sequence's keys and values ``[Hkv, end, d]`` (gathered
    from the cache's blocks, `KVCache.gather_prefill`); returns ``[n, Hq, dv]``."""
    n = chunk.num_tokens
    q = query[:, chunk.offset:chunk.offset + n]                        # [Hq, n, d]
    k, v = keys, values
    if sinks is not None:  # query heads grouped under their kv head, as _decode has them
        num_kv_heads = k.shape[0]
        grouped = q.reshape(num_kv_heads, -1, n, q.shape[-1])           # [Hkv, G, n, d]
        mask = causal_mask(chunk, window, query.device, chunk_size)
        attn = _attend(grouped, k[:, None], v[:, None], mask if chosen is None else mask & chosen, scaling,
                       sinks.reshape(num_kv_heads, -1, 1, 1))          # against [Hkv, G, n, end]
        return attn.reshape(-1, n, v.shape[-1]).transpose(0, 1)
    if chunk.start == 0 and window is None and chosen is None and chunk_size is None:
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    else:
        mask = causal_mask(chunk, window, query.device, chunk_size)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if chosen is None else mask & chosen,
                                              scale=scaling, enable_gqa=True)
    return attn.transpose(0, 1)


def causal_mask(chunk: SeqChunk, window: int | None, device: torch.device,
                chunk_size: int | None = None) -> torch.Tensor:
    """Bool ``[n, start + n]``: True where a new token of ``chunk`` may attend a key of its sequence (within
    the sliding ``window``, and the token's chunk of ``chunk_size`` positions, where given)."""
    q_pos = torch.arange(chunk.start, chunk.start + chunk.num_tokens, device=device)[:, None]
    k_pos = torch.arange(chunk.start + chunk.num_tokens, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    if chunk_size is not None:
        mask &= k_pos >= q_pos // chunk_size * chunk_size
    return mask


def _tuned(query: torch.Tensor, positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Llama 4's attention temperature tuning of ``query [1, Hq, T, d]`` at each token's position ``[T]``: the
    expression of `Llama4TextAttention.forward` (its scales in float32, the product cast back)."""
    scales = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
    return (query * scales.view(1, 1, -1, 1)).to(query.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float | None,
            sinks: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention of ``q`` over ``k``, ``v`` (batched and broadcast as matmul does), allowed
    where the bool ``mask`` (broadcast to the scores) is True. ``sinks``, shaped by the caller to broadcast
    against the scores but for their key dimension (1), adds one logit per query head to each softmax and
    nothing to the output, as GPT-OSS's eager attention does. With sinks the scores are one tensor, scaled, masked
    and exponentiated in place, and each output is divided by its softmax's sum after multiplying the values (not
    the scores before): GPT-OSS's formula (scale, mask, the sink appended, the max subtracted, softmax) wrote about
    six tensors of the scores' size, three alive at once, and a prefill chunk's scores are the largest of a step."""
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).masked_fill_(~mask, float("-inf"))
    sink = sinks.to(scores.dtype)
    peak = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)  # (finite: the sink's)
    weights = scores.sub_(peak).exp_()
    total = weights.sum(dim=-1, keepdim=True, dtype=torch.float32) + (sink - peak).float().exp()
    out = torch.matmul(weights.to(v.dtype), v)
    return (out.float() / total).to(out.dtype)


def install(model: PreTrainedModel) -> None:
    """Register ``"vibe_ragged"`` with transformers and switch ``model`` to it (no mask is built).

    After this the model must be called inside ``bind_step`` with ``use_cache=False``.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, ragged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation to "
                         f"{ATTN_IMPLEMENTATION!r} (it does not use transformers' AttentionInterface)")
    latent = KVCache.for_model(model.config)["values_in_keys"]
    windows, types = _layer_windows(model.config), getattr(model.config, "layer_types", None)
    sources = _kv_sources(model.config)
    for module in model.modules():
        if windows is not None and isinstance(getattr(module, "layer_idx", None), int) and hasattr(module, "o_proj"):
            setattr(module, _WINDOW, windows[module.layer_idx])
            if types and types[module.layer_idx] == "chunked_attention":
                setattr(module, _CHUNK, model.config.attention_chunk_size)
        if getattr(module, "attn_temperature_tuning", False) and not module.use_rope:  # Llama 4's NoPE layers
            module.attn_temperature_tuning = False  # (it would read positions from a cache): applied here instead
            setattr(module, _TEMPERATURE, (module.floor_scale, module.attn_scale))
        if getattr(module, "is_kv_shared_layer", False):  # Gemma 4's
            setattr(module, _KV_SOURCE, sources[module.layer_idx])
        if hasattr(module, "kv_b_proj"):
            if not latent or module.kv_b_proj.bias is not None or not hasattr(module, "expand_kv"):
                raise ValueError(f"{type(module).__name__}: latent attention this engine cannot cache")
            _on_latent(module)


_LATENT = "_vibe_latent"
_WINDOW, _UNSET = "_vibe_window", object()
_CHUNK, _TEMPERATURE = "_vibe_chunk", "_vibe_temperature"
_KV_SOURCE = "_vibe_kv_source"


def _kv_sources(config) -> dict[int, int]:
    """Gemma 4's layers that share keys and values (its last ``num_kv_shared_layers``), each with the layer whose
    cache they read: the last earlier layer of its type that computes its own ("store", as transformers has them
    hand theirs to ``shared_kv_states``, which these layers read)."""
    modes = getattr(config, "kv_sharing_modes", None) if getattr(config, "num_kv_shared_layers", 0) else None
    if not modes:
        return {}
    stores = {config.layer_types[layer]: layer for layer, mode in enumerate(modes) if mode == "store"}
    return {layer: stores[config.layer_types[layer]] for layer, mode in enumerate(modes) if mode == "reuse"}


# Models whose mask applies config.sliding_window to every layer while their attention is given no window (Phi-3.5-MoE:
# PhimoeModel masks with it, PhimoeAttention passes none; it was ignored here)
_MODEL_MASK_WINDOW = ("phimoe",)


def _layer_windows(config) -> list[int | None] | None:
    """Each layer's sliding window from the config's ``layer_types`` (None: full attention), as transformers
    builds each layer's mask (a ``sliding_attention`` layer gets ``config.sliding_window``); None when the
    config names no layer types (the attention module's ``sliding_window`` argument or attribute decides).
    Layers without attention (`NO_ATTENTION`: linear attention, Nemotron-H's MoE and MLP layers) never call the
    attention function; indexed ones
    (`service.sparse_attention`) attend their indexer's choice of all earlier keys; chunked ones (Llama 4) have
    no window but attend their own chunk only (`install` marks them).
    The layer types decide even where an attention module holds the window but uses it only on sliding
    layers (EXAONE-MoE's full-attention layers keep ``sliding_window`` as an attribute)."""
    types = getattr(config, "layer_types", None)
    if not types:
        if getattr(config, "model_type", None) in _MODEL_MASK_WINDOW and config.sliding_window is not None:
            return [config.sliding_window] * config.num_hidden_layers
        return None
    unknown = sorted(set(types) - {"full_attention", "sliding_attention", "indexed_attention", "chunked_attention"}
                     - NO_ATTENTION)
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported by this engine's attention")
    return [config.sliding_window if kind == "sliding_attention" else None for kind in types]


@dataclass(frozen=True)
class _Latent:
    """One latent attention module's up-projection, split per head: ``up_keys [H, nope, r]`` (the
    non-rotary keys') and ``up_values [H, v, r]``."""

    nope: int
    up_keys: torch.Tensor
    up_values: torch.Tensor


def _on_latent(module: torch.nn.Module) -> None:
    """Make a multi-head latent attention module hand the attention function its latent: ``expand_kv``
    returns ([latent, rotary key], latent) for one head instead of every head's keys and values."""
    nope, v, rank = module.qk_nope_head_dim, module.v_head_dim, module.kv_lora_rank
    up = module.kv_b_proj.weight.detach().view(-1, nope + v, rank)  # [H, nope + v, r]
    setattr(module, _LATENT, _Latent(nope, up[:, :nope], up[:, nope:]))
    module.expand_kv = lambda kv_nope, k_rot: (torch.cat((kv_nope, k_rot), dim=-1), kv_nope)


def _no_mask(*args, config=None, **kwargs) -> torch.Tensor | None:
    """No mask (the step metadata gives causality), but for indexed (DSA) attention, whose modules slice the
    mask to hand it to their indexer: a one-element placeholder then, which `RaggedIndexer` ignores."""
    if config is not None and getattr(config, "index_topk", None) is not None:
        return _PLACEHOLDER_MASK
    return None


_PLACEHOLDER_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)
