"""Recurrent layers (Qwen3-Next's gated DeltaNet linear attention, Kimi-Linear's Kimi Delta Attention, MiniMax's
lightning attention, Nemotron-H's and Granite 4.0's Mamba2 mixers) over the engine's flat ragged batch.

Such a layer carries states per sequence instead of keys and values: the last ``conv_kernel_size`` inputs
of its causal convolution and its recurrent state (DeltaNet: ``[heads, key_dim, value_dim]``; KDA: ``[heads,
head_dim, head_dim]``, its short convolutions of q, k and v being one over their concatenation, as transformers
stacks the releases' three; Mamba2: ``[heads, head_dim, ssm_state_size]``; float32 all, as transformers' cache
holds them), or, for MiniMax's lightning attention, no convolution and a decayed sum of key-value products
``[heads, head_dim, head_dim]`` in the model's dtype (`MiniMaxCache` holds it so). transformers names all of them
``linear_attention`` in the config's ``layer_types`` and drives them through its linear-attention cache interface
(MiniMax through its own cache's). Owns
`LinearStates`, those states for every KV cache slot (allocated once, like the keys and values), and `install`,
which makes each such module of a model run its own forward once per sequence of the step: a prefill chunk
alone (from empty states when it starts the sequence), all single-token decodes together, each through
transformers' cache interface (`_SlotCache`) holding the states of the sequences of that call. So the module's
projections, convolution and recurrence (delta rule, selective scan, lightning attention's blocks and decayed
sums) are transformers' own, and a sequence's tokens give what ``generate`` gives them.

Ignores the prefix cache: a state holds one position only, so the engine reuses a slot for a prompt only
when the prompt extends all the slot holds (a chunk starting past 0 continues the slot's states); forks
copy a whole prompt's state.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from service import attention

LINEAR_ATTENTION = "linear_attention"


@dataclass(frozen=True)
class LinearShape:
    """One recurrent layer's states per slot: ``conv [conv_dim, kernel]`` (the model's dtype; none where
    ``conv_dim`` is 0: MiniMax's lightning attention has no convolution) and ``recurrent`` (float32, as transformers'
    delta rule and selective scan return it; in the model's dtype with ``recurrent_in_model_dtype``, as MiniMax's
    lightning attention keeps its decayed sum of key-value products)."""

    conv_dim: int
    kernel: int
    recurrent: tuple[int, ...]
    recurrent_in_model_dtype: bool = False

    @staticmethod
    def of(config) -> LinearShape:
        """The states of ``config``'s linear-attention layers (each its mixer's ``conv_dim``, ``conv_kernel_size``
        and recurrent state, as the mixer's ``__init__`` computes them); ValueError for a config of another kind."""
        if hasattr(config, "linear_num_key_heads"):  # Qwen3-Next's gated DeltaNet
            return LinearShape(
                conv_dim=2 * config.linear_num_key_heads * config.linear_key_head_dim
                + config.linear_num_value_heads * config.linear_value_head_dim,
                kernel=config.linear_conv_kernel_dim,
                recurrent=(config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim))
        if getattr(config, "model_type", None) == "kimi_linear":  # Kimi Delta Attention: one convolution over the
            # concatenated q, k and v (KimiLinearDeltaAttention stacks the releases' q_conv1d, k_conv1d, v_conv1d)
            heads, head_dim = config.linear_num_heads, config.linear_head_dim
            return LinearShape(3 * heads * head_dim, config.linear_conv_kernel_dim, (heads, head_dim, head_dim))
        if getattr(config, "model_type", None) == "minimax":  # lightning attention: no convolution, a [heads, d, d]
            # state in the model's dtype
            heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            return LinearShape(0, 0, (heads, head_dim, head_dim), recurrent_in_model_dtype=True)
        if hasattr(config, "mamba_num_heads"):  # Nemotron-H's Mamba2 mixer
            heads, head_dim, state, groups = (config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size,
                                              config.n_groups)
            return LinearShape(heads * head_dim + 2 * groups * state, config.conv_kernel, (heads, head_dim, state))
        if hasattr(config, "mamba_n_heads"):  # Granite 4.0's (Bamba's) Mamba2 mixer
            heads, head_dim, state, groups = (config.mamba_n_heads, config.mamba_d_head, config.mamba_d_state,
                                              config.mamba_n_groups)
            return LinearShape(int(config.mamba_expand * config.hidden_size) + 2 * groups * state, config.mamba_d_conv,
                               (heads, head_dim, state))
        raise ValueError(f"{getattr(config, 'model_type', config)}: linear-attention layers of an unknown kind")

    def recurrent_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The recurrent state's dtype in a model of ``dtype``."""
        return dtype if self.recurrent_in_model_dtype else torch.float32

    def bytes_per_slot(self, dtype: torch.dtype) -> int:
        element = torch.empty(0, dtype=dtype).element_size()
        recurrent = torch.empty(0, dtype=self.recurrent_dtype(dtype)).element_size()
        return self.conv_dim * self.kernel * element + math.prod(self.recurrent) * recurrent


def linear_layers(config) -> list[int]:
    """The decoder layers of ``config`` that are linear attention (DeltaNet, KDA or Mamba2)."""
    return [i for i, kind in enumerate(getattr(config, "layer_types", None) or ()) if kind == LINEAR_ATTENTION]


class LinearStates:
    """The states of every linear-attention layer for every slot, allocated once (zeros)."""

    def __init__(self, layers: list[int], num_slots: int, shape: LinearShape, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.shape = shape
        self.conv = {layer: torch.zeros(num_slots, shape.conv_dim, shape.kernel, dtype=dtype, device=device)
                     for layer in layers}
        self.recurrent = {layer: torch.zeros(num_slots, *shape.recurrent, dtype=shape.recurrent_dtype(dtype),
                                             device=device) for layer in layers}

    def copy_slot(self, source: int, target: int) -> None:
        """Give slot ``target`` the states of slot ``source`` (a fork: the whole prompt's)."""
        for layer in self.conv:
            self.conv[layer][target] = self.conv[layer][source]
            self.recurrent[layer][target] = self.recurrent[layer][source]


class _SlotCache:
    """transformers' linear-attention cache interface over the states of the sequences of one call (a batch
    of ``b``): ``conv [b, conv_dim, kernel]`` and ``recurrent [b, *LinearShape.recurrent]``, None for a
    sequence that starts here (a Mamba2 decode updates both in place, as its kernels update transformers' cache).
    Mirrors `transformers.cache_utils`' linear-attention layer: the convolution keeps the last ``kernel`` inputs, a
    first chunk shorter than that is padded with zeros; and `MiniMaxCache`'s linear cache (``get_linear_cache``,
    ``set_linear_cache``: the recurrent state alone)."""

    def __init__(self, conv: torch.Tensor | None, recurrent: torch.Tensor | None) -> None:
        self.conv, self.recurrent = conv, recurrent

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        return self.conv

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        return self.recurrent

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, conv_kernel_size: int | None = None,
                          **kwargs) -> torch.Tensor:
        if self.conv is None:
            full = conv_states
            if full.shape[-1] < conv_kernel_size:
                full = torch.nn.functional.pad(full, (conv_kernel_size - full.shape[-1], 0), value=0)
            self.conv = full[:, :, -conv_kernel_size:].clone()
        else:
            full = torch.cat([self.conv, conv_states], dim=-1)
            self.conv = full[:, :, -self.conv.shape[-1]:].clone()
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, **kwargs) -> torch.Tensor:
        self.recurrent = recurrent_states
        return recurrent_states

    def get_linear_cache(self, layer_idx: int) -> torch.Tensor | None:
        return self.recurrent

    def set_linear_cache(self, layer_idx: int, linear_cache: torch.Tensor) -> None:
        self.recurrent = linear_cache


def install(model: PreTrainedModel) -> None:
    """Make each linear-attention module of ``model`` (a DeltaNet, KDA or Mamba2 mixer: its ``conv1d`` and ``layer_idx``
    on a ``linear_attention`` layer; or MiniMax's lightning attention: its ``slope_rate`` decays and no convolution)
    compute over the bound step's sequences with their slots' states (`service.attention.bind_step` binds them);
    ValueError if the model has such layers of a kind this cannot drive, or whose convolution (or lightning
    attention's heads) is not the one `LinearShape.of` its config allocates states for."""
    layers = set(linear_layers(model.config))
    if not layers:
        return
    shape, found = LinearShape.of(model.config), set()
    for module in model.modules():
        if getattr(module, "layer_idx", None) not in layers:
            continue
        if isinstance(getattr(module, "conv1d", None), torch.nn.Conv1d) and shape.conv_dim:
            conv = tuple(module.conv1d.weight.shape)
            if conv != (shape.conv_dim, 1, shape.kernel):
                raise ValueError(f"linear-attention layer {module.layer_idx}: convolution {conv}, states allocated "
                                 f"for {(shape.conv_dim, 1, shape.kernel)}")
            module.forward = types.MethodType(_ragged(type(module).forward), module)
            found.add(module.layer_idx)
        elif hasattr(module, "slope_rate") and hasattr(module, "qkv_proj") and not shape.conv_dim:  # MiniMax's
            state = (module.num_attention_heads, module.head_dim, module.head_dim)
            if state != shape.recurrent:
                raise ValueError(f"linear-attention layer {module.layer_idx}: lightning attention's state {state}, "
                                 f"states allocated for {shape.recurrent}")
            module.forward = types.MethodType(_ragged(type(module).forward, lightning=True), module)
            found.add(module.layer_idx)
    if found != layers:
        raise ValueError(f"linear-attention layers {sorted(layers - found)} are of a kind this engine cannot run")


def _ragged(forward, lightning: bool = False):
    """The linear-attention ``forward`` run once per prefill chunk and once for all decodes of the step. MiniMax's
    lightning attention (``lightning``) takes rotary embeddings and a mask it does not use, returns its output with
    its state, and has no convolution state."""
    unused = {"position_embeddings": None, "attention_mask": None} if lightning else {}

    def run(self, hidden_states: torch.Tensor, held: _SlotCache) -> torch.Tensor:
        out = forward(self, hidden_states, cache=held, **unused)
        return out[0] if lightning else out

    def ragged_forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs):
        cache_, batch = attention.bound_step()
        states = cache_.linear
        conv, recurrent = states.conv[self.layer_idx], states.recurrent[self.layer_idx]
        out = torch.empty_like(hidden_states)
        decodes = [c for c in batch.chunks if c.num_tokens == 1 and c.start > 0]
        if decodes:
            rows = [c.offset for c in decodes]
            slots = torch.tensor([c.slot for c in decodes], device=hidden_states.device)
            held = _SlotCache(conv[slots], recurrent[slots])
            out[0, rows] = run(self, hidden_states[0, rows].unsqueeze(1), held)[:, 0]
            if not lightning:
                conv[slots] = held.conv
            recurrent[slots] = held.recurrent.to(recurrent.dtype)
        for chunk in batch.chunks:
            if chunk.num_tokens == 1 and chunk.start > 0:
                continue
            span = slice(chunk.offset, chunk.offset + chunk.num_tokens)
            fresh = chunk.start == 0
            held = _SlotCache(None if fresh else conv[chunk.slot:chunk.slot + 1],
                              None if fresh else recurrent[chunk.slot:chunk.slot + 1])
            out[:, span] = run(self, hidden_states[:, span], held)
            if not lightning:
                conv[chunk.slot] = held.conv[0]
            recurrent[chunk.slot] = held.recurrent[0]
        return (out, None) if lightning else out

    return ragged_forward
