"""Migration plans: which expert copies must travel, and whether a new placement is worth the trip.

Owns the diff between two placements in weight copies (what each destination device lacks and where
to fetch it; what each device may drop afterwards) and the migration-cost-aware decision of the
method (move only if the predicted gain over the next window exceeds the time to move the bytes). Knows
nothing of how weights are sent or of the two-phase protocol that sends them (the coordinator's job).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from placement.device_model import DeviceModel
from placement.metrics import makespan, pass_critical_paths
from placement.placement import Placement
from placement.rebalance import Move


@dataclass(frozen=True)
class Drop:
    """A copy of logical `expert` of `layer` that `device` no longer needs once the new version is live."""

    layer: int
    expert: int
    device: int


@dataclass(frozen=True, eq=False)
class MigrationPlan:
    """The weight copies that turn an old placement into a new one.

    Attributes:
        moves: one Move per (layer, expert, destination) copy the destination lacks; `src_device` holds
            the expert under the old placement. Ordered by layer, expert, destination.
        drops: copies held under the old placement and absent from the new one, same order.
        expert_bytes: bytes of one expert's weights (all its tensors).
        moved_slot_fraction: float [L]; moves in each layer / slots per layer of the new placement.
    """

    moves: tuple[Move, ...]
    drops: tuple[Drop, ...]
    expert_bytes: int
    moved_slot_fraction: np.ndarray

    @property
    def num_moves(self) -> int:
        return len(self.moves)

    @property
    def bytes_moved(self) -> int:
        return self.num_moves * self.expert_bytes

    def transfer_seconds(self, bandwidth_bytes_per_s: float) -> float:
        """Seconds to send every copy one after another at `bandwidth_bytes_per_s` (> 0).

        Serialised on purpose: a pessimistic estimate that holds on a shared or slow interconnect.
        """
        if not np.isfinite(bandwidth_bytes_per_s) or bandwidth_bytes_per_s <= 0:
            raise ValueError(f"bandwidth_bytes_per_s must be finite and > 0, got {bandwidth_bytes_per_s!r}")
        return self.bytes_moved / bandwidth_bytes_per_s


def migration_plan(old: Placement, new: Placement, expert_bytes: int) -> MigrationPlan:
    """Moves and drops that turn `old` into `new` (both with the same L, E and G).

    A device holding several replicas of one expert needs one copy of its weights. Each move's
    source is, among the devices holding the expert under `old`, the one with the least traffic so far
    (copies it already sends plus all copies it receives), lowest index on ties, so sends spread out.

    Args:
        expert_bytes: bytes of one expert's weights, >= 0.
    """
    _check_compatible(old, new)
    if not (np.isfinite(expert_bytes) and expert_bytes >= 0 and float(expert_bytes).is_integer()):
        raise ValueError(f"expert_bytes must be a whole number of bytes >= 0, got {expert_bytes}")
    old_held, new_held = _held(old), _held(new)  # bool [L, E, G]
    needed = np.argwhere(new_held & ~old_held)  # [M, 3] (layer, expert, device), lexicographic
    traffic = np.bincount(needed[:, 2], minlength=old.num_devices).tolist()  # receives, then + sends
    moves = []
    for layer, expert, dst in needed.tolist():
        sources = np.flatnonzero(old_held[layer, expert]).tolist()
        src = min(sources, key=lambda g: (traffic[g], g))
        traffic[src] += 1
        moves.append(Move(layer, expert, src, dst))
    drops = tuple(Drop(*row) for row in np.argwhere(old_held & ~new_held).tolist())
    per_layer = np.bincount(needed[:, 0], minlength=new.num_layers)
    return MigrationPlan(tuple(moves), drops, int(expert_bytes), per_layer / new.num_slots)


def predicted_gain(
    old: Placement, new: Placement, loads: np.ndarray, devices: Sequence[DeviceModel], passes: float,
    activity: np.ndarray | None = None,
) -> float:
    """Seconds saved by serving `passes` forward passes with `new` instead of `old`.

    sum_l (T_l(old) - T_l(new)) * passes, with T_l the predicted layer makespan; negative when `new` is
    slower.

    Args:
        loads: [L, E] tokens per expert in one pass (e.g. the window mean of router counts).
        passes: forward passes the placement is expected to serve, >= 0.
        activity: [L, E] share of passes with tokens per expert, for expected seconds per pass (see
            `metrics.device_times`), or None.
    """
    if not np.isfinite(passes) or passes < 0:
        raise ValueError(f"passes must be finite and >= 0, got {passes!r}")
    _check_compatible(old, new)
    return float(np.sum(makespan(old, loads, devices, activity) - makespan(new, loads, devices, activity)) * passes)


@dataclass(frozen=True)
class HeldOutGain:
    """What a re-plan saves per forward pass, measured on passes it was not planned on.

    Attributes:
        per_pass_s: mean seconds of MoE critical path saved per pass (negative: the re-plan is slower).
        stderr_s: its standard error over the passes.
        passes: the passes it was measured on.
    """

    per_pass_s: float
    stderr_s: float
    passes: int

    def lower(self, z: float) -> float:
        """Seconds per pass saved at least, at `z` standard errors below the mean."""
        return self.per_pass_s - z * self.stderr_s


def held_out_gain(
    old: Placement,
    replan: Callable[[np.ndarray, np.ndarray], Placement],
    passes: np.ndarray,
    devices: Sequence[DeviceModel],
) -> HeldOutGain:
    """What re-planning on a window of forward passes saves, judged on passes it was not planned on.

    A placement planned on a window and judged on that same window looks better than the one in service
    even when the workload has not changed: it was fitted to the window's sampling noise too, and a
    coordinator that believes it re-plans on noise (`load_tests.workload_tracking` measures how much).
    Here the window is split into two interleaved halves (every other
    pass, so both hold the same mix of prefill and decode passes); each half plans with `replan(mean
    loads, activity)` and that plan and `old` are timed on every pass of the other half (the MoE critical
    path of the pass, `metrics.pass_critical_paths`: the barrier the layer waits at, not an expectation).
    The per-pass savings of both folds give the mean and its standard error. A plan made on half the
    passes is noisier than one made on all of them, so the estimate leans low.

    Args:
        replan: mean router counts per pass [L, E], share of passes with tokens per expert [L, E] ->
            the candidate placement.
        passes: [N, L, E] router counts of the window's passes; passes without load are left out; at
            least two with load are needed.
    Raises:
        ValueError with fewer than two passes with load.
    """
    passes = np.asarray(passes, dtype=np.float64)
    if passes.ndim != 3:
        raise ValueError(f"passes must be [N, L, E], got shape {passes.shape}")
    passes = passes[passes.sum(axis=(1, 2)) > 0]
    if len(passes) < 2:
        raise ValueError(f"need at least two passes with load, got {len(passes)}")
    saved = []
    for train, test in ((passes[0::2], passes[1::2]), (passes[1::2], passes[0::2])):
        new = replan(train.mean(axis=0), (train > 0).mean(axis=0))
        _check_compatible(old, new)
        saved.append(pass_critical_paths(old, test, devices) - pass_critical_paths(new, test, devices))
    saved = np.concatenate(saved)
    stderr = float(saved.std(ddof=1) / np.sqrt(len(saved)))
    return HeldOutGain(float(saved.mean()), stderr, len(saved))


def worth_moving(
    old: Placement,
    new: Placement,
    loads: np.ndarray,
    devices: Sequence[DeviceModel],
    *,
    passes: float,
    bandwidth_bytes_per_s: float,
    expert_bytes: int,
    activity: np.ndarray | None = None,
) -> bool:
    """True when the predicted gain over the next `passes` exceeds the time to move the bytes.

    The transfer time is `MigrationPlan.transfer_seconds` (copies serialised). A new placement that
    moves nothing is worth adopting exactly when it is faster.
    """
    plan = migration_plan(old, new, expert_bytes)
    gain = predicted_gain(old, new, loads, devices, passes, activity)
    return gain > plan.transfer_seconds(bandwidth_bytes_per_s)


def _held(placement: Placement) -> np.ndarray:
    """bool [L, E, G]: whether each device holds at least one replica of each logical expert."""
    held = np.zeros((placement.num_layers, placement.num_experts, placement.num_devices), dtype=bool)
    layers = np.repeat(np.arange(placement.num_layers), placement.num_slots)
    held[layers, placement.phy2log.ravel(), placement.slot_device.ravel()] = True
    return held


def _check_compatible(old: Placement, new: Placement) -> None:
    shapes = [(p.num_layers, p.num_experts, p.num_devices) for p in (old, new)]
    if shapes[0] != shapes[1]:
        raise ValueError(f"placements differ in (layers, experts, devices): old {shapes[0]}, new {shapes[1]}")
