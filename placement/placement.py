"""The placement: which logical expert each physical slot holds, on which device, with what token share.

Owns the representation and its invariants, in DeepSeek EPLB's vocabulary (`phy2log`, `log2phy`,
`logcnt`). Knows nothing of how a placement was chosen (see `policies`) or how weights move.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _frozen(array: np.ndarray, dtype) -> np.ndarray:
    out = np.array(array, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class Placement:
    """A versioned expert placement for every MoE layer.

    Attributes:
        phy2log: int [L, R]; slot -> logical expert. R = E + number of redundant slots.
        slot_device: int [L, R]; slot -> device index in [0, num_devices). Slots are laid out
            device-major: within a layer, `slot_device` is non-decreasing.
        replica_share: float [L, R]; share of its logical expert's tokens that the slot takes. The shares
            of each logical expert's replicas sum to 1 (1.0 for an expert without replicas).
        num_experts: E, logical experts per layer; every one is held by at least one slot in every layer.
        num_devices: G.
        version: monotonically increasing placement version.
    """

    phy2log: np.ndarray
    slot_device: np.ndarray
    replica_share: np.ndarray
    num_experts: int
    num_devices: int
    version: int = 0
    _logcnt: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        phy2log = np.asarray(self.phy2log)
        if phy2log.ndim != 2:
            raise ValueError(f"phy2log must be [L, R], got shape {phy2log.shape}")
        num_layers, num_slots = phy2log.shape
        if num_layers == 0 or num_slots == 0:
            raise ValueError(f"phy2log must have at least one layer and one slot, got shape {phy2log.shape}")
        slot_device = np.asarray(self.slot_device)
        if not (np.issubdtype(phy2log.dtype, np.integer) and np.issubdtype(slot_device.dtype, np.integer)):
            raise ValueError(f"phy2log and slot_device must hold integers, got {phy2log.dtype} and {slot_device.dtype}")
        if slot_device.ndim == 1:
            if slot_device.shape != (num_slots,):
                raise ValueError(f"a 1-D slot_device must have one entry per slot ({num_slots}), got {slot_device.shape}")
            slot_device = np.broadcast_to(slot_device, (num_layers, num_slots))
        share = np.asarray(self.replica_share, dtype=np.float64)
        if slot_device.shape != phy2log.shape or share.shape != phy2log.shape:
            raise ValueError(
                f"phy2log {phy2log.shape}, slot_device {slot_device.shape} and replica_share "
                f"{share.shape} must all be [L, R]"
            )
        if self.num_experts <= 0 or self.num_devices <= 0:
            raise ValueError(f"num_experts and num_devices must be > 0, got {self.num_experts}, {self.num_devices}")
        if phy2log.min() < 0 or phy2log.max() >= self.num_experts:
            raise ValueError(f"phy2log entries must lie in [0, {self.num_experts})")
        if slot_device.min() < 0 or slot_device.max() >= self.num_devices:
            raise ValueError(f"slot_device entries must lie in [0, {self.num_devices})")
        if np.any(np.diff(slot_device, axis=1) < 0):
            raise ValueError("slots must be laid out device-major (slot_device non-decreasing per layer)")
        if np.any(share <= 0) or np.any(share > 1 + 1e-9):
            raise ValueError("replica_share entries must lie in (0, 1]")
        rows = np.repeat(np.arange(num_layers), num_slots)
        logcnt = np.zeros((num_layers, self.num_experts), dtype=np.int64)
        np.add.at(logcnt, (rows, phy2log.ravel()), 1)
        if np.any(logcnt == 0):
            layer, expert = np.argwhere(logcnt == 0)[0]
            raise ValueError(f"logical expert {expert} of layer {layer} has no slot")
        share_sum = np.zeros((num_layers, self.num_experts))
        np.add.at(share_sum, (rows, phy2log.ravel()), share.ravel())
        if not np.allclose(share_sum, 1.0, atol=1e-6):
            raise ValueError("the replica shares of each logical expert must sum to 1")
        object.__setattr__(self, "phy2log", _frozen(phy2log, np.int64))
        object.__setattr__(self, "slot_device", _frozen(slot_device, np.int64))
        object.__setattr__(self, "replica_share", _frozen(share, np.float64))
        object.__setattr__(self, "_logcnt", _frozen(logcnt, np.int64))

    # --- shape -------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def logcnt(self) -> np.ndarray:
        """int [L, E]: number of replicas of each logical expert."""
        return self._logcnt

    @property
    def log2phy(self) -> np.ndarray:
        """int [L, E, max_replicas]: slots holding each logical expert, padded with -1."""
        width = int(self.logcnt.max())
        out = np.full((self.num_layers, self.num_experts, width), -1, dtype=np.int64)
        order = np.argsort(self.phy2log, axis=1, kind="stable")  # slots grouped by logical expert
        for layer in range(self.num_layers):
            experts = self.phy2log[layer, order[layer]]
            starts = np.searchsorted(experts, np.arange(self.num_experts))
            rank = np.arange(self.num_slots) - starts[experts]
            out[layer, experts, rank] = order[layer]
        return out

    def device_slot_counts(self) -> np.ndarray:
        """int [L, G]: slots on each device in each layer."""
        return self.per_device(np.ones(self.slot_device.shape)).astype(np.int64)

    def per_device(self, slot_values: np.ndarray) -> np.ndarray:
        """float [..., L, G]: per layer, the sum of `slot_values` [..., L, R] over each device's slots
        (leading axes, e.g. forward passes, are kept)."""
        values = np.asarray(slot_values, dtype=np.float64)
        shape = (self.num_layers, self.num_slots)
        if values.shape[-2:] != shape:
            raise ValueError(f"slot values must be [..., L, R] with (L, R) = {shape}, got {values.shape}")
        lead = values.shape[:-2]
        cells = self.num_layers * self.num_devices
        column = (np.arange(self.num_layers)[:, None] * self.num_devices + self.slot_device).ravel()
        index = (np.arange(int(np.prod(lead)))[:, None] * cells + column).ravel()
        summed = np.bincount(index, weights=values.ravel(), minlength=int(np.prod(lead)) * cells)
        return summed.reshape(*lead, self.num_layers, self.num_devices)

    # --- loads -------------------------------------------------------------------------------------

    def slot_tokens(self, loads: np.ndarray) -> np.ndarray:
        """float [..., L, R]: tokens each slot processes, given logical loads [..., L, E] (leading axes,
        e.g. forward passes, are kept)."""
        loads = self._check_loads(loads)
        index = np.broadcast_to(self.phy2log, (*loads.shape[:-2], *self.phy2log.shape))
        return np.take_along_axis(loads, index, axis=-1) * self.replica_share

    def device_tokens(self, loads: np.ndarray) -> np.ndarray:
        """float [L, G]: tokens each device processes in each layer, given logical loads [L, E]."""
        return self.per_device(self.slot_tokens(loads))

    def _check_loads(self, loads: np.ndarray) -> np.ndarray:
        loads = np.asarray(loads, dtype=np.float64)
        if loads.ndim < 2 or loads.shape[-2:] != (self.num_layers, self.num_experts):
            raise ValueError(f"loads must be [L, E] = {(self.num_layers, self.num_experts)}, got {loads.shape}")
        if loads.size and not (np.isfinite(loads).all() and loads.min() >= 0):  # (a NaN would cost nothing)
            raise ValueError("loads must be finite token counts >= 0")
        return loads

    # --- lookup ------------------------------------------------------------------------------------

    def devices_of(self, layer: int, expert: int) -> np.ndarray:
        """Device indices holding logical `expert` of `layer` (one per replica)."""
        return self.slot_device[layer, self.phy2log[layer] == expert]

    def experts_on(self, device: int) -> set[tuple[int, int]]:
        """The (layer, expert) pairs held by `device`."""
        layers, slots = np.nonzero(self.slot_device == device)
        return {(int(layer), int(self.phy2log[layer, slot])) for layer, slot in zip(layers, slots)}

    # --- versions and serialisation ----------------------------------------------------------------

    def with_version(self, version: int) -> Placement:
        return Placement(self.phy2log, self.slot_device, self.replica_share, self.num_experts,
                         self.num_devices, version)

    def same_layout(self, other: Placement) -> bool:
        """True when both placements put the same experts, shares and devices in the same slots."""
        return (
            self.phy2log.shape == other.phy2log.shape
            and np.array_equal(self.phy2log, other.phy2log)
            and np.array_equal(self.slot_device, other.slot_device)
            and np.allclose(self.replica_share, other.replica_share)
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible form (lists and ints)."""
        return {
            "version": self.version,
            "num_experts": self.num_experts,
            "num_devices": self.num_devices,
            "phy2log": self.phy2log.tolist(),
            "slot_device": self.slot_device.tolist(),
            "replica_share": self.replica_share.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Placement:
        """The placement `to_dict` wrote; ValueError for a field whose numbers are not whole (a record read back
        from workers was cast: phy2log 1.7 became expert 1, a version 3.7 version 3)."""
        return cls(
            _whole(data["phy2log"], "phy2log"),
            _whole(data["slot_device"], "slot_device"),
            np.asarray(data["replica_share"], dtype=np.float64),
            int(_whole(data["num_experts"], "num_experts")),
            int(_whole(data["num_devices"], "num_devices")),
            int(_whole(data.get("version", 0), "version")),
        )

    @classmethod
    def from_expert_devices(cls, expert_device: np.ndarray, num_devices: int, version: int = 0) -> Placement:
        """Placement without replicas from a per-layer expert -> device map.

        Args:
            expert_device: int [L, E]; device of each logical expert.
        """
        expert_device = np.asarray(expert_device, dtype=np.int64)
        num_layers, num_experts = expert_device.shape
        # device-major slots; within a device, experts in increasing order (stable sort)
        phy2log = np.argsort(expert_device, axis=1, kind="stable")
        slot_device = np.take_along_axis(expert_device, phy2log, axis=1)
        return cls(phy2log, slot_device, np.ones((num_layers, num_experts)), num_experts, num_devices, version)


def _whole(value: Any, name: str) -> np.ndarray:
    """``value`` as int64, if every number in it is a whole one that int64 holds (booleans are not numbers here; a
    version 2**63 or 1e20 was cast to -2**63)."""
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"placement {name} must hold whole numbers, got {str(value)[:80]}")
    with np.errstate(invalid="ignore"):  # (NaN, inf and numbers past int64 cast to garbage, which the check refuses)
        whole = array.astype(np.int64)
    if not np.all(whole == array):
        raise ValueError(f"placement {name} must hold whole numbers within int64, got {str(value)[:80]}")
    return whole
