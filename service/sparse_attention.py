"""DeepSeek Sparse Attention (DeepSeek-V3.2's and GLM-5's lightning indexer) over the engine's flat ragged batch.

Each attention layer of DeepSeek-V3.2 has an indexer: small projections that score every earlier token of
the sequence for each query (``relu(q . k)`` per indexer head, weighted and summed), and the query then
attends only the ``index_topk`` best (2048 in the release; all of them while the sequence is shorter).
Owns `install`, which replaces each layer's indexer by `RaggedIndexer`: it appends the new tokens' indexer
keys to the KV cache (``KVCache.index_keys``, one ``[blocks, block_size, 1, index_head_dim]`` pool per layer)
and returns a `Selection` (which keys each query of the step may attend), which the module hands to the
attention function (``indices``) and `service.attention` applies on top of causality. The indexer's
arithmetic is transformers' (`DeepseekV32Indexer.forward`), per sequence.

GLM-5 (`glm_moe_dsa`) differs in two ways, both followed: its indexer rotates with interleaved RoPE
(`GlmMoeDsaIndexer`), and only the layers its config's ``indexer_types`` calls "full" have one; a "shared"
layer attends the choice of the full layer before it (transformers hands the module's returned choice, here
the `Selection`, to the next layer). Only full layers cache indexer keys (`indexed_layers`).

Ignores the reference implementation's Hadamard rotation and FP8 scoring, as transformers does (the
rotation preserves dot products; FP8 is a precision shortcut).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from service import attention

# transformers' attention modules that call an indexer (or, on GLM-5's shared layers, take the previous layer's
# choice) and pass the result as ``indices``
_INDEXED_ATTENTION = ("DeepseekV32Attention", "GlmMoeDsaAttention")
# each indexer class the engine can run, and the RoPE function (in its modeling module) it rotates with
_INDEXER_ROTARY = {"DeepseekV32Indexer": "apply_rotary_pos_emb", "GlmMoeDsaIndexer": "apply_rotary_pos_emb_interleave"}


def is_indexed(config) -> bool:
    """Whether ``config``'s attention layers select their keys with a DSA indexer."""
    return getattr(config, "index_topk", None) is not None and getattr(config, "index_head_dim", None) is not None


def indexed_layers(config) -> list[int]:
    """The layers of ``config`` that run a DSA indexer (and cache its keys): none if its attention is not indexed,
    else all but GLM-5's "shared" ``indexer_types``, which reuse the previous full layer's choice."""
    if not is_indexed(config):
        return []
    kinds = getattr(config, "indexer_types", None) or ["full"] * config.num_hidden_layers
    return [layer for layer, kind in enumerate(kinds) if kind == "full"]


@dataclass
class Selection:
    """The keys each query of one step may attend, beyond causality (None: all of them).

    Attributes:
        decode: per group of the step's single-token queries (`StepBatch.decode_groups`, which decode attention
            runs one call each), bool ``[b, L]`` for the group's queries in its ``decode_select`` order (``L`` = the
            longest of their sequences), or None when none is longer than ``index_topk``; empty: none anywhere.
        prefill: by chunk offset, bool ``[n, start + n]`` for the chunk's queries (absent: all keys).
    """

    decode: tuple[torch.Tensor | None, ...] = ()
    prefill: dict[int, torch.Tensor] = field(default_factory=dict)


class RaggedIndexer(torch.nn.Module):
    """A layer's DSA indexer over the bound step's sequences (its weights are the original indexer's)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        name = type(inner).__name__
        if name not in _INDEXER_ROTARY:
            raise ValueError(f"{name}: a DSA indexer this engine cannot run; known: {sorted(_INDEXER_ROTARY)}")
        self.rotate = getattr(sys.modules[type(inner).__module__], _INDEXER_ROTARY[name])

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, q_resid: torch.Tensor, position_embeddings, attention_mask=None,
                position_ids=None, cache=None) -> Selection:
        ix = self.inner
        cache_, batch = attention.bound_step()
        pool = cache_.index_keys[ix.layer_idx]                                 # [blocks, block_size, 1, D]
        _, tokens, _ = hidden_states.shape
        cos, sin = position_embeddings
        q = ix.wq_b(q_resid).view(1, tokens, ix.n_heads, ix.head_dim)
        q_rot, q_pass = torch.split(q, [ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], dim=-1)
        k = ix.k_norm(ix.wk(hidden_states)).unsqueeze(2)
        k_rot, k_pass = torch.split(k, [ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], dim=-1)
        q_rot, k_rot = self.rotate(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q_pass], dim=-1)[0]                              # [T, H, D]
        k = torch.cat([k_rot, k_pass], dim=-1)[0, :, 0]                        # [T, D]
        attention.append_keys(cache_, pool, k.unsqueeze(0), batch)           # as one "head" [1, T, D]
        weights = ix.weights_proj(hidden_states.to(ix.weights_proj.weight.dtype)).float()[0] * (ix.n_heads**-0.5)
        topk = ix.index_topk
        selection = Selection()
        if batch.num_decodes and batch.decode_max_len > topk:  # (each group padded to its own longest only)
            selection.decode = tuple(self._choose(group, cache_, pool, q, weights) if group.decode_max_len > topk
                                     else None for group in batch.decode_groups(cache_))
        for chunk in batch.prefills:
            end = chunk.start + chunk.num_tokens
            if end <= topk:
                continue
            span = slice(chunk.offset, chunk.offset + chunk.num_tokens)
            keys = cache_.gather_prefill(pool, chunk)[0]                       # [end, D]
            scores = F.relu(torch.matmul(q[span].float(), keys.float().T.unsqueeze(0)) * ix.softmax_scale)
            index = torch.matmul(weights[span].unsqueeze(-2), scores).squeeze(-2)  # [n, end]
            causal = attention.causal_mask(chunk, None, index.device)
            selection.prefill[chunk.offset] = _top(index.masked_fill(~causal, float("-inf")), topk) & causal
        return selection

    def _choose(self, group: attention.StepBatch, cache: attention.KVCache, pool: torch.Tensor, q: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """Bool ``[b, L]``: the keys each single-token query of ``group`` attends."""
        ix = self.inner
        keys = cache.gather_decode(pool, group)[:, 0]                          # [b, L, D]
        rows = group.decode_select
        scores = F.relu(torch.matmul(q[rows].float(), keys.float().transpose(-1, -2)) * ix.softmax_scale)
        index = torch.matmul(weights[rows].unsqueeze(-2), scores).squeeze(-2)  # [b, L]
        valid = group.decode_mask(None)[:, 0, 0]                               # [b, L]: causal (shared per step)
        return _top(index.masked_fill(~valid, float("-inf")), topk=ix.index_topk) & valid


def _top(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Bool, True at each row's ``topk`` highest scores (transformers' ``topk(min(topk, L))``)."""
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    return chosen.scatter(-1, scores.topk(min(topk, scores.shape[-1]), dim=-1).indices, True)


def install(model: PreTrainedModel) -> None:
    """Replace the indexer of each DSA attention module of ``model`` by a `RaggedIndexer` (GLM-5's shared layers
    have none); ValueError if the model's config says its attention is indexed but no module could be."""
    found = 0
    for module in model.modules():
        if type(module).__name__ in _INDEXED_ATTENTION and module.indexer is not None:
            if not isinstance(module.indexer, RaggedIndexer):
                module.indexer = RaggedIndexer(module.indexer)
            found += 1
    if is_indexed(model.config) and not found:
        raise ValueError(f"{type(model).__name__}: indexed (DSA) attention this engine cannot run")
