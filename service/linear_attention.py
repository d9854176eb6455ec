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

A state holds one position only: the one after the last token the slot ran. For the prefix cache, `StateSnapshots`
keeps copies of a slot's states at chosen positions of its prefills (the engine picks them, see
`service.engine.Engine._plan_snapshots`): a prefill chunk crossing such a position is run in two parts, the states
copied between them, so a later prompt sharing at least that many tokens with the slot resumes from the copy (a
chunk starting past 0 continues the slot's states, whichever way they got there); forks copy a whole prompt's
state.
"""

from __future__ import annotations

import math
import types
from collections import OrderedDict
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
        self.snapshots: StateSnapshots | None = None  # the prefix cache's copies at earlier positions, if any
        self.plan: dict[int, list[tuple[int, int]]] = {}  # this step: slot -> (position, snapshot buffer), ascending

    def copy_slot(self, source: int, target: int) -> None:
        """Give slot ``target`` the states of slot ``source`` (a fork: the whole prompt's)."""
        for layer in self.conv:
            self.conv[layer][target] = self.conv[layer][source]
            self.recurrent[layer][target] = self.recurrent[layer][source]


class StateSnapshots:
    """A bounded pool of copies of one slot's linear-attention states at one position each (``capacity`` buffers
    allocated once, like the slots' states), for the prefix cache.

    An entry ``(slot, position)`` holds the states after the first ``position`` tokens of the sequence whose keys
    and values slot ``slot`` holds: it is usable with those keys and values only, so the engine drops a slot's
    entries past what it keeps when the slot is overwritten (`drop`), and hands an entry to the slot a request
    resuming from it copied those keys and values to (`move`). When the pool is full, a new entry takes the buffer
    of a segmented LRU: entries never restored (probation) go first, least recently made first; entries restored at
    least once (protected: a prefix that another prompt shared; at most half the pool, the least recently used
    demoted to probation beyond that; a branch point, where two prompts were seen to part, starts there) only when
    probation is empty. So one long prompt's many snapshots, most of which no other prompt will share, evict each
    other rather than the shared system prompt's.
    """

    def __init__(self, capacity: int, layers: list[int], shape: LinearShape, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.capacity = capacity
        self.conv = {layer: torch.zeros(capacity, shape.conv_dim, shape.kernel, dtype=dtype, device=device)
                     for layer in layers}
        self.recurrent = {layer: torch.zeros(capacity, *shape.recurrent, dtype=shape.recurrent_dtype(dtype),
                                             device=device)
                          for layer in layers}
        self._free = list(range(capacity))
        self._probation: OrderedDict[tuple[int, int], int] = OrderedDict()  # (slot, position) -> buffer, LRU first
        self._protected: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._positions: dict[int, set[int]] = {}  # slot -> the positions it has entries at
        self._pinned: set[tuple[int, int]] = set()  # entries to be written by the step being planned

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def positions(self, slot: int) -> set[int]:
        """The positions slot ``slot`` has snapshots at."""
        return self._positions.get(slot, set())

    def latest(self, slot: int, limit: int) -> int:
        """The largest position <= ``limit`` that slot ``slot`` has a snapshot at (0: none)."""
        return max((p for p in self._positions.get(slot, ()) if p <= limit), default=0)

    def restore(self, slot: int, position: int, states: LinearStates, target: int) -> None:
        """Give slot ``target``'s states the snapshot of ``slot`` at ``position`` (which then counts as used)."""
        buffer = self._protect((slot, position))
        for layer in self.conv:
            states.conv[layer][target] = self.conv[layer][buffer]
            states.recurrent[layer][target] = self.recurrent[layer][buffer]

    def move(self, slot: int, position: int, target: int) -> None:
        """The snapshot of ``slot`` at ``position`` belongs to slot ``target`` now (which holds the same first
        ``position`` keys and values: it was copied them), as its most recently used entry (it was just restored)."""
        segment = self._probation if (slot, position) in self._probation else self._protected
        segment[(target, position)] = segment.pop((slot, position))
        positions = self._positions[slot]
        positions.discard(position)
        if not positions:
            del self._positions[slot]
        self._positions.setdefault(target, set()).add(position)

    def reserve(self, slot: int, position: int, protected: bool = False) -> int | None:
        """A buffer for a new snapshot of ``slot`` at ``position``, which the step being planned writes (its entry
        is made now, protected if so asked: a known branch point; `release_pins` after the step). Evicts an entry
        if the pool is full; None if every entry is one this step writes."""
        key = (slot, position)
        if key in self._probation or key in self._protected:  # (a slot holding it already: rewritten alike)
            self._drop(key)
        if self._free:
            buffer = self._free.pop()
        else:
            victim = next((k for segment in (self._probation, self._protected) for k in segment
                           if k not in self._pinned), None)
            if victim is None:
                return None
            self._drop(victim)
            buffer = self._free.pop()
        self._probation[key] = buffer
        self._positions.setdefault(slot, set()).add(position)
        self._pinned.add(key)
        if protected:
            self._protect(key)
        return buffer

    def release_pins(self) -> None:
        self._pinned.clear()

    def drop(self, slot: int, keep: int = 0) -> None:
        """Forget slot ``slot``'s snapshots past position ``keep`` (its keys and values past it are overwritten)."""
        for position in [p for p in self._positions.get(slot, ()) if p > keep]:
            self._drop((slot, position))

    def _protect(self, key: tuple[int, int]) -> int:
        """Make ``key`` the most recently used protected entry (demoting the least recently used beyond half the
        pool); its buffer."""
        buffer = self._probation.pop(key, None)
        if buffer is None:
            buffer = self._protected.pop(key)
        self._protected[key] = buffer
        if len(self._protected) > max(1, self.capacity // 2):
            old, old_buffer = self._protected.popitem(last=False)
            self._probation[old] = old_buffer
        return buffer

    def _drop(self, key: tuple[int, int]) -> None:
        buffer = self._probation.pop(key, None)
        if buffer is None:
            buffer = self._protected.pop(key)
        positions = self._positions[key[0]]
        positions.discard(key[1])
        if not positions:
            del self._positions[key[0]]
        self._free.append(buffer)

    def save(self, buffer: int, layer: int, conv: torch.Tensor | None, recurrent: torch.Tensor) -> None:
        """Copy one layer's states into snapshot ``buffer`` (``conv`` None: a layer without a convolution)."""
        if conv is not None:
            self.conv[layer][buffer] = conv
        self.recurrent[layer][buffer] = recurrent


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

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        """Intermediate recurrent states to keep (transformers >= 5.25 asks, for speculative decoding): none, the
        past is not recorded."""
        return 0

    def increase_count(self, layer_idx: int, state_idx: int = 0) -> None:
        """transformers (>= 5.25) counts a token its decode kernel put in the convolution state in place; the
        engine keeps its own counts."""

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
            fresh = chunk.start == 0
            held = _SlotCache(None if fresh else conv[chunk.slot:chunk.slot + 1],
                              None if fresh else recurrent[chunk.slot:chunk.slot + 1])
            done = 0  # run up to each snapshot's position, copy the states there, then on to the chunk's end
            for end, buffer in [(p - chunk.start, b) for p, b in states.plan.get(chunk.slot, ())] + [
                    (chunk.num_tokens, None)]:
                if end > done:
                    span = slice(chunk.offset + done, chunk.offset + end)
                    out[:, span] = run(self, hidden_states[:, span], held)
                    done = end
                if buffer is not None:
                    states.snapshots.save(buffer, self.layer_idx, None if lightning else held.conv[0],
                                          held.recurrent[0])
            if not lightning:
                conv[chunk.slot] = held.conv[0]
            recurrent[chunk.slot] = held.recurrent[0]
        return (out, None) if lightning else out

    return ragged_forward
