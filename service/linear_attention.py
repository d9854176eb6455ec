"""Linear attention (Qwen3-Next's gated DeltaNet layers) over the engine's flat ragged batch.

A linear-attention layer carries two states per sequence instead of keys and values: the last
``conv_kernel_size`` inputs of its causal convolution and its recurrent state (``[heads, key_dim,
value_dim]``, float32). Owns `LinearStates`, those states for every KV cache slot (allocated once, like the
keys and values), and `install`, which makes each linear-attention module of a model run its own forward
once per sequence of the step: a prefill chunk alone (from empty states when it starts the sequence), all
single-token decodes together, each through transformers' cache interface (`_SlotCache`) holding the
states of the sequences of that call. So the module's projections, convolution and delta rule are
transformers' own, and a sequence's tokens give what ``generate`` gives them.

Ignores the prefix cache: a state holds one position only, so the engine reuses a slot for a prompt only
when the prompt extends all the slot holds (a chunk starting past 0 continues the slot's states); forks
copy a whole prompt's state.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from service import attention

LINEAR_ATTENTION = "linear_attention"


@dataclass(frozen=True)
class LinearShape:
    """One linear-attention layer's states: ``conv [slots, conv_dim, kernel]`` (the model's dtype) and
    ``recurrent [slots, heads, key_dim, value_dim]`` (float32, as transformers' delta rule returns it)."""

    conv_dim: int
    kernel: int
    heads: int
    key_dim: int
    value_dim: int

    @staticmethod
    def of(config) -> LinearShape:
        return LinearShape(
            conv_dim=2 * config.linear_num_key_heads * config.linear_key_head_dim
            + config.linear_num_value_heads * config.linear_value_head_dim,
            kernel=config.linear_conv_kernel_dim, heads=config.linear_num_value_heads,
            key_dim=config.linear_key_head_dim, value_dim=config.linear_value_head_dim)

    def bytes_per_slot(self, dtype: torch.dtype) -> int:
        element = torch.empty(0, dtype=dtype).element_size()
        return self.conv_dim * self.kernel * element + self.heads * self.key_dim * self.value_dim * 4


def linear_layers(config) -> list[int]:
    """The decoder layers of ``config`` that are linear attention."""
    return [i for i, kind in enumerate(getattr(config, "layer_types", None) or ()) if kind == LINEAR_ATTENTION]


class LinearStates:
    """The states of every linear-attention layer for every slot, allocated once (zeros)."""

    def __init__(self, layers: list[int], num_slots: int, shape: LinearShape, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.shape = shape
        self.conv = {layer: torch.zeros(num_slots, shape.conv_dim, shape.kernel, dtype=dtype, device=device)
                     for layer in layers}
        self.recurrent = {layer: torch.zeros(num_slots, shape.heads, shape.key_dim, shape.value_dim,
                                             dtype=torch.float32, device=device) for layer in layers}

    def copy_slot(self, source: int, target: int) -> None:
        """Give slot ``target`` the states of slot ``source`` (a fork: the whole prompt's)."""
        for layer in self.conv:
            self.conv[layer][target] = self.conv[layer][source]
            self.recurrent[layer][target] = self.recurrent[layer][source]


class _SlotCache:
    """transformers' linear-attention cache interface over the states of the sequences of one call (a batch
    of ``b``): ``conv [b, conv_dim, kernel]`` and ``recurrent [b, heads, key_dim, value_dim]``, None for a
    sequence that starts here. Mirrors `transformers.cache_utils`' linear-attention layer: the convolution
    keeps the last ``kernel`` inputs, a first chunk shorter than that is padded with zeros."""

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


def install(model: PreTrainedModel) -> None:
    """Make each linear-attention module of ``model`` compute over the bound step's sequences with their
    slots' states (`service.attention.bind_step` binds them); ValueError if the model has such layers of a
    kind this cannot drive."""
    layers = set(linear_layers(model.config))
    found = set()
    for module in model.modules():
        if getattr(module, "layer_type", None) == LINEAR_ATTENTION and hasattr(module, "conv1d"):
            module.forward = types.MethodType(_ragged(type(module).forward), module)
            found.add(module.layer_idx)
    if found != layers:
        raise ValueError(f"linear-attention layers {sorted(layers - found)} are of a kind this engine cannot run")


def _ragged(forward):
    """The linear-attention ``forward`` run once per prefill chunk and once for all decodes of the step."""

    def ragged_forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs) -> torch.Tensor:
        cache_, batch = attention.bound_step()
        states = cache_.linear
        conv, recurrent = states.conv[self.layer_idx], states.recurrent[self.layer_idx]
        out = torch.empty_like(hidden_states)
        decodes = [c for c in batch.chunks if c.num_tokens == 1 and c.start > 0]
        if decodes:
            rows = [c.offset for c in decodes]
            slots = torch.tensor([c.slot for c in decodes], device=hidden_states.device)
            held = _SlotCache(conv[slots], recurrent[slots])
            out[0, rows] = forward(self, hidden_states[0, rows].unsqueeze(1), cache=held)[:, 0]
            conv[slots], recurrent[slots] = held.conv, held.recurrent.to(recurrent.dtype)
        for chunk in batch.chunks:
            if chunk.num_tokens == 1 and chunk.start > 0:
                continue
            span = slice(chunk.offset, chunk.offset + chunk.num_tokens)
            fresh = chunk.start == 0
            held = _SlotCache(None if fresh else conv[chunk.slot:chunk.slot + 1],
                              None if fresh else recurrent[chunk.slot:chunk.slot + 1])
            out[:, span] = forward(self, hidden_states[:, span], cache=held)
            conv[chunk.slot], recurrent[chunk.slot] = held.conv[0], held.recurrent[0]
        return out

    return ragged_forward
