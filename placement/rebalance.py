"""Swap local search over device times, and the incremental solver built on it (the paper's Algorithm 2).

Owns a mutable working layout of slots over devices for all layers at once (`SwapSearch`), the search
that repeatedly relieves each layer's slowest device by the best one-for-one swap (or, where devices
have spare slots, the best move), and `rebalance`, which applies that search to a live placement under
new loads and reports the expert moves. Knows nothing of how the first placement was made (see `vibe`,
`eplb`) or of how weights move (see `migration`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from placement.device_model import DeviceModel
from placement.metrics import (
    checked_activity,
    curve_params,
    latency_matrix,
    latency_on,
    slot_calls,
)
from placement.placement import Placement
from placement.shares import balanced_shares

# A swap must lower the slowest device's time by more than this share of it to count: far above float
# rounding of the incremental time updates, so the search cannot cycle on rounding noise.
_MIN_GAIN = 1e-12


@dataclass(frozen=True)
class Move:
    """One replica of logical `expert` of `layer` moves from device `src_device` to `dst_device`."""

    layer: int
    expert: int
    src_device: int
    dst_device: int


class SwapSearch:
    """Slots of every layer over G devices, with device times kept up to date under swaps and moves.

    Kept as [L, M, G] grids, position-major (M: most slots a device may need; empty positions hold
    slot -1, 0 tokens and 0 seconds), so that every swap partner of a slot is a broadcast, not a gather,
    along a contiguous device axis. Moving a slot to an empty position of a device with room is a swap
    with that empty position.

    Args:
        expert: int [L, R], logical expert of each slot.
        tokens: float [L, R], tokens each slot processes (its expert's load times its replica share).
        device: int [L, R], device of each slot.
        params: float [3, G], device curves (see `metrics.curve_params`).
        capacity: int [G], most slots a device may hold, or None to keep every device's slot count (swaps
            only, no moves).
        distinct: forbid swaps and moves that would put two replicas of one expert on one device.
        activity: float [L, R], share of passes that route tokens to each slot's expert, for expected
            seconds per pass (`metrics.slot_calls`), or None for the seconds at the mean loads.
    """

    def __init__(self, expert: np.ndarray, tokens: np.ndarray, device: np.ndarray, params: np.ndarray,
                 capacity: np.ndarray | None, distinct: bool, activity: np.ndarray | None = None) -> None:
        num_layers, num_slots = expert.shape
        num_devices = params.shape[1]
        self.params, self.capacity = params, capacity
        rows = np.arange(num_layers)[:, None]
        self.counts = np.zeros((num_layers, num_devices), dtype=np.int64)
        np.add.at(self.counts, (rows, device), 1)
        width = int(self.counts.max())
        if capacity is not None:  # one spare position where a device has room, for moves
            width = max(width, min(int(capacity.max()), width + 1))
        order = np.argsort(device, axis=1, kind="stable")
        by_device = np.take_along_axis(device, order, axis=1)
        start = np.cumsum(self.counts, axis=1) - self.counts
        position = np.arange(num_slots) - np.take_along_axis(start, by_device, axis=1)
        self.slot = np.full((num_layers, width, num_devices), -1, dtype=np.int64)  # [L, M, G]
        self.slot[rows, position, by_device] = order
        self.num_experts = int(expert.max()) + 1  # also the expert id of an empty position
        self.expert = self._gathered(expert, self.num_experts)
        calls, per_call = slot_calls(tokens, activity)
        self.calls = self._gathered(calls, 0.0)  # expected calls per pass
        self.tokens = self._gathered(per_call, 0.0)  # tokens per call
        self.own = self._seconds(self.tokens, self.calls, np.arange(num_devices))  # [L, M, G] where it is
        self.times = self.own.sum(axis=1)  # [L, G]
        self.presence = None  # int [L, E + 1, G]: replicas of each expert on each device (last: empty, 0)
        if distinct:
            self.presence = np.zeros((num_layers, self.num_experts + 1, num_devices), dtype=np.int32)
            np.add.at(self.presence, (rows[:, :, None], self.expert, np.arange(num_devices)), 1)
            self.presence[:, -1] = 0
        self._buffers()

    def _gathered(self, per_slot: np.ndarray, empty) -> np.ndarray:
        """[L, M, G] grid of a per-slot array [L, R], `empty` at empty positions."""
        at = np.maximum(self.slot, 0).reshape(self.slot.shape[0], -1)
        return np.where(self.slot >= 0, np.take_along_axis(per_slot, at, axis=1).reshape(self.slot.shape), empty)

    def _seconds(self, tokens: np.ndarray, calls: np.ndarray, device) -> np.ndarray:
        """Expected seconds per pass of slots with `tokens` per call and `calls` per pass on `device`."""
        return calls * latency_on(tokens, device, self.params)

    def _buffers(self, rows: int = 0) -> None:
        """Scratch space for `best_swaps`, kept between calls: fresh 4-D temporaries cost page faults."""
        _, width, num_devices = self.slot.shape
        rows = max(rows, self.slot.shape[0])
        self._dst = np.empty((rows, width, width, num_devices), dtype=np.float32)
        self._src = np.empty_like(self._dst)

    def slot_devices(self) -> np.ndarray:
        """int [L, R]: the current device of every slot."""
        layers, positions, devices = np.nonzero(self.slot >= 0)
        out = np.empty((self.slot.shape[0], layers.size // self.slot.shape[0]), dtype=np.int64)
        out[layers, self.slot[layers, positions, devices]] = devices
        return out

    def best_swaps(self, layers: np.ndarray, src: np.ndarray, movable: np.ndarray):
        """Best exchange of a movable position on device `src` with a position on another device, per layer.

        Args:
            layers: int [N] layer indices; src: int [N] source device per layer;
            movable: bool [N, M], positions on src that may leave (filled ones only).
        Returns:
            worst: float [N], the larger of the two devices' new times (inf when nothing is allowed);
            pos_a: int [N] position on src; dst: int [N] other device; pos_b: int [N] position on dst
            (an empty one for a move).
        """
        num, rows = layers.size, np.arange(layers.size)
        if num > self._dst.shape[0]:
            self._buffers(num)
        tokens, calls, own, expert = self.tokens[layers], self.calls[layers], self.own[layers], self.expert[layers]
        times = self.times[layers]  # [N, G]
        # a leaves src for device g: g's time plus a's seconds there; barred on src, on a device holding
        # a's expert, and for positions that may not leave
        into = calls[rows, :, src][:, :, None] * latency_matrix(tokens[rows, :, src], self.params)  # [N, M, G]
        barred = ~movable[:, :, None] | (np.arange(times.shape[1]) == src[:, None])[:, None, :]
        if self.presence is not None:
            barred |= self.presence[layers[:, None], expert[rows, :, src]] > 0
        np.copyto(into, np.inf, where=barred)
        into += times[:, None, :]
        # b comes to src: b's seconds on src; barred on src, where b's expert is on src, or empty w/o room
        come = self._seconds(tokens, calls, src[:, None, None])  # [N, M, G]
        empty = self.slot[layers] < 0
        barred = empty if self.capacity is None else empty & (self.counts[layers] >= self.capacity)[:, None, :]
        barred[rows, :, src] = True
        if self.presence is not None:
            on_src = self.presence[layers, :, src]  # [N, E + 1]
            barred |= np.take(on_src, expert + (rows * on_src.shape[1])[:, None, None]) > 0
        np.copyto(come, np.inf, where=barred)
        leave = times[rows, src][:, None] - own[rows, :, src]  # [N, M]: src without a
        # all pairs [N, Ma, Mb, G] in float32 (half the memory traffic) to pick one; exact value below. Each
        # layer's values are first scaled by a power of two that brings its largest finite one near 1: argmin
        # is unchanged (exact in binary), and times beyond float32's range no longer overflow to inf, whose
        # difference (inf - inf = NaN) argmin picked first
        # (own and leave are at most the devices' times)
        largest = np.maximum(times.max(axis=1), np.maximum(
            np.max(into, axis=(1, 2), initial=0.0, where=np.isfinite(into)),
            np.max(come, axis=(1, 2), initial=0.0, where=np.isfinite(come))))
        scale = np.ldexp(1.0, -np.frexp(largest)[1])  # [N]; 1 where all are 0
        into32, own32, leave32, come32 = (
            np.multiply(x, scale.reshape((num,) + (1,) * (x.ndim - 1)), out=np.empty(x.shape, np.float32),
                        casting="same_kind") for x in (into, own, leave, come))
        worst = np.subtract(into32[:, :, None, :], own32[:, None, :, :], out=self._dst[:num])
        np.maximum(worst, np.add(leave32[:, :, None, None], come32[:, None, :, :], out=self._src[:num]), out=worst)
        pos_a, pos_b, dst = np.unravel_index(worst.reshape(num, -1).argmin(axis=1), worst.shape[1:])
        exact = np.maximum(into[rows, pos_a, dst] - own[rows, pos_b, dst], leave[rows, pos_a] + come[rows, pos_b, dst])
        return exact, pos_a, dst, pos_b

    def exchange(self, layers: np.ndarray, src: np.ndarray, pos_a: np.ndarray, dst: np.ndarray,
                 pos_b: np.ndarray) -> None:
        """Exchange position pos_a of device src with position pos_b of device dst, one pair per layer."""
        a, b = (layers, pos_a, src), (layers, pos_b, dst)
        moved_a, moved_b = self.expert[a], self.expert[b]
        for grid in (self.slot, self.expert, self.tokens, self.calls):
            grid[a], grid[b] = grid[b], grid[a].copy()
        old_a, old_b = self.own[a], self.own[b]
        self.own[a] = self._seconds(self.tokens[a], self.calls[a], src)
        self.own[b] = self._seconds(self.tokens[b], self.calls[b], dst)
        self.times[layers, src] += self.own[a] - old_a
        self.times[layers, dst] += self.own[b] - old_b
        into_empty = self.slot[a] < 0
        self.counts[layers, src] -= into_empty
        self.counts[layers, dst] += into_empty
        if self.presence is not None:
            self.presence[layers, moved_a, src] -= 1
            self.presence[layers, moved_a, dst] += 1
            self.presence[layers, moved_b, dst] -= 1
            self.presence[layers, moved_b, src] += 1
            self.presence[layers, -1] = 0
        if self.capacity is not None:
            self._keep_spare_position()

    def _keep_spare_position(self) -> None:
        """Widen the grids by one empty position when a device with room has none left."""
        if np.any((self.counts == self.slot.shape[1]) & (self.counts < self.capacity)):
            pad = ((0, 0), (0, 1), (0, 0))
            self.slot = np.pad(self.slot, pad, constant_values=-1)
            self.expert = np.pad(self.expert, pad, constant_values=self.num_experts)
            self.tokens = np.pad(self.tokens, pad)
            self.calls = np.pad(self.calls, pad)
            self.own = np.pad(self.own, pad)
            self._buffers(self._dst.shape[0])

    def separate_replicas(self) -> np.ndarray:
        """Swap co-located replicas apart (one per layer per round, each by its best allowed exchange).

        Returns bool [L]: the layers left with every expert's replicas on distinct devices.
        """
        valid = np.ones(self.slot.shape[0], dtype=bool)
        while True:
            dup = np.argwhere(self.presence > 1)  # (layer, expert, device), layer-major
            dup = dup[valid[dup[:, 0]]]
            if not dup.size:
                return valid
            layers, first = np.unique(dup[:, 0], return_index=True)
            exp, src = dup[first, 1], dup[first, 2]
            here = self.expert[layers, :, src] == exp[:, None]  # [N, M]
            movable = np.arange(here.shape[1]) == here.argmax(axis=1)[:, None]
            worst, pos_a, dst, pos_b = self.best_swaps(layers, src, movable)
            done = np.isfinite(worst)
            valid[layers[~done]] = False
            self.exchange(layers[done], src[done], pos_a[done], dst[done], pos_b[done])

    def relieve_slowest(self, eps: float, max_steps: np.ndarray | None = None) -> np.ndarray:
        """Repeatedly apply the best swap (or move) that lowers the slowest device's time, per layer.

        Among all exchanges of a slot on the slowest device with a slot (or, where a device has room, an
        empty position) on any other device, take the one that minimises the larger of the two new device
        times; apply it when that is below the slowest device's time. A layer stops when
        max_g T_g <= (1 + eps) * mean_g T_g (the mean over the devices that hold slots or have room), when no
        exchange helps, or after max_steps[l] steps.
        Every step strictly lowers the sorted vector of device times (lexicographically), so the search
        ends; the default step cap only guards against a float surprise.

        Returns:
            int [L], steps applied in each layer.
        """
        num_layers = self.slot.shape[0]
        steps = np.zeros(num_layers, dtype=np.int64)
        limit = np.full(num_layers, 4 * self.slot.size) if max_steps is None else max_steps
        active = np.arange(num_layers)
        while active.size:
            times = self.times[active]
            # the mean over devices that hold slots or may: one without either (lost, a budget of 0) is no device
            # to balance onto, and its 0 s counted in the mean kept a balanced layer swapping up to its cap
            usable = self.counts[active] > 0 if self.capacity is None else (
                (self.counts[active] > 0) | (self.capacity > 0))
            mean = (times * usable).sum(axis=1) / np.maximum(usable.sum(axis=1), 1)
            unbalanced = times.max(axis=1) > (1.0 + eps) * mean
            active = active[unbalanced & (steps[active] < limit[active])]
            if not active.size:
                break
            src = self.times[active].argmax(axis=1)
            worst, pos_a, dst, pos_b = self.best_swaps(active, src, self.slot[active, :, src] >= 0)
            gain = worst < self.times[active, src] * (1.0 - _MIN_GAIN)
            active, src = active[gain], src[gain]
            self.exchange(active, src, pos_a[gain], dst[gain], pos_b[gain])
            steps[active] += 1
        return steps


DEFAULT_MAX_MOVED_FRACTION = 0.10

# Rounds of search and share balancing in `search_and_balance`. On 300 random drift cases one search then one
# balancing left an improving swap in 22 (up to 8.2% of a layer); the rounds stop early once a search finds none.
_BALANCE_ROUNDS = 4


def rebalance(placement: Placement, loads: np.ndarray, devices: Sequence[DeviceModel], eps: float = 0.03,
              *, max_swaps_per_layer: int | None = None,
              max_moved_fraction: float | None = DEFAULT_MAX_MOVED_FRACTION,
              activity: np.ndarray | None = None) -> tuple[Placement, list[Move]]:
    """Incrementally re-balance `placement` for new `loads` by one-for-one swaps (the paper's Algorithm 2).

    Per layer, while the slowest device's predicted time exceeds (1 + eps) times the mean, apply the swap
    between the slowest device and ANY other device (the paper uses the fastest) that most lowers the
    larger of the two devices' new times; stop when no swap lowers it below the slowest device's time.
    Swaps keep every device's slot count and replicas of one expert on distinct devices (a swap that would
    co-locate two replicas is not considered). Where experts have replicas, their token shares are then re-split
    for the new loads and the search goes on from them (`search_and_balance`): shares move no weights, so a
    recalibration may change only them.

    Args:
        placement: the live placement (L layers, R slots, G devices).
        loads: float [L, E], tokens per logical expert in the new window.
        devices: G device curves.
        eps: tolerated imbalance, >= 0.
        max_swaps_per_layer: cap on swaps per layer (None: no cap), >= 0.
        max_moved_fraction: cap on the slots a layer may move, as a fraction of its slots (each swap
            moves two), but at least one swap when the fraction is > 0 (layers of few experts could
            never be re-balanced otherwise); the default 0.10 keeps an incremental recalibration cheap
            (on the real drift pairs it recovers about 80% of a full re-plan's gain, against 95% for
            about 20% moved). None: no cap. Both caps apply; the tighter wins.
        activity: float [L, E], share of passes that route tokens to each expert: device times are then
            the expected seconds per pass (`metrics.slot_calls`); None: the seconds at the mean loads.
    Returns:
        The new placement (version + 1) and its moves, one per weight copy (`migration.migration_plan`'s, which
        the service copies by: net of swaps that undo each other, and of replicas that trade places; [] when
        only shares changed); the same placement object and [] when neither slots nor shares changed.
    """
    loads = _check_inputs(placement, loads, devices, eps, max_swaps_per_layer)
    activity = checked_activity(activity, loads)
    num_layers = placement.num_layers
    if max_moved_fraction is not None and not 0 <= max_moved_fraction <= 1:
        raise ValueError(f"max_moved_fraction must lie in [0, 1], got {max_moved_fraction!r}")
    fraction_cap = None
    if max_moved_fraction is not None:  # at least one swap, or small layers could never be re-balanced
        fraction_cap = max(1, int(max_moved_fraction * placement.num_slots // 2)) if max_moved_fraction else 0
    caps = [c for c in (max_swaps_per_layer, fraction_cap) if c is not None]
    cap = np.full(num_layers, min(caps)) if caps else None
    new, _ = search_and_balance(placement.phy2log, placement.replica_share, placement.slot_device, loads, devices,
                                None, bool(placement.logcnt.max() > 1), activity, eps, cap, placement.version + 1)
    if new.same_layout(placement):
        return placement, []
    from placement.migration import migration_plan  # (it imports Move from here)

    return new, list(migration_plan(placement, new, 0).moves)


def evacuate(placement: Placement, loads: np.ndarray, devices: Sequence[DeviceModel], lost: Sequence[int],
             capacity: np.ndarray, *, activity: np.ndarray | None = None, eps: float = 0.03) -> Placement | None:
    """`placement` with every slot of the `lost` devices moved to a survivor, the survivors' own slots kept where
    they are: re-placing a dead device moves its experts, not everyone's (a full re-plan re-shuffled 7x as many
    experts on real traces, all copied while steps touching the dead device fail and are retried).

    Per layer, the lost devices' slots go heaviest first (tokens per pass; replicas of experts a survivor holds
    before the rest, as fewer devices are open to them) each to the survivor that then finishes earliest
    (predicted seconds per pass, as vibe's greedy binning), among those with fewer than `capacity` slots that do
    not hold the slot's expert already. A replica every open survivor already holds (a hot expert replicated on
    every device) becomes a replica of the expert with the most tokens per replica that one of them lacks, its
    own tokens going to its expert's other replicas. Then the incremental search (`search_and_balance`, replicas'
    shares re-split) evens the survivors out with at most as many swaps or moves per layer as it evacuated: one
    more expert on some survivors than on others costs heavy layers up to 13% of a full re-plan's makespan on real
    traces, a few swaps less than 2% (against 7x the copies for the full re-plan). The version is kept: the caller
    numbers it.

    Args:
        lost: devices that must end with no slot; capacity: int [G], most slots a device may hold per layer (a lost
            device's is taken as 0, whatever it says: an emptied device is the search's best place to move to).
        activity: float [L, E] or None, as in `rebalance`; eps: the search's tolerated imbalance.
    Returns:
        The placement, or None where the survivors have no room left for some slot (a full re-plan must then
        re-place them).
    Raises:
        ValueError: a lost device out of range (-1 was the last device), or a capacity of another shape.
    """
    loads = _check_inputs(placement, loads, devices, eps, None)
    activity = checked_activity(activity, loads)
    num_devices = placement.num_devices
    lost = np.asarray(list(lost), dtype=np.int64)
    if lost.size and (lost.min() < 0 or lost.max() >= num_devices):
        raise ValueError(f"lost devices must be in 0..{num_devices - 1}, got {sorted(lost.tolist())}")
    gone = np.zeros(num_devices, dtype=bool)
    gone[lost] = True
    capacity = np.asarray(capacity, dtype=np.int64)
    if capacity.shape != (num_devices,):
        raise ValueError(f"capacity must have one entry per device ({num_devices}), got shape {capacity.shape}")
    capacity = np.where(gone, 0, capacity)
    params = curve_params(devices)
    expert, device, share = (a.copy() for a in (placement.phy2log, placement.slot_device, placement.replica_share))
    evacuated = gone[device].sum(axis=1)  # [L]
    for layer in np.flatnonzero(evacuated):
        if not _evacuate_layer(expert[layer], device[layer], share[layer], loads[layer],
                               None if activity is None else activity[layer], gone, capacity, params):
            return None
    placed, _ = search_and_balance(expert, share, device, loads, devices, capacity, bool(placement.logcnt.max() > 1),
                                   activity, eps, evacuated, placement.version)
    return placed


def _evacuate_layer(expert: np.ndarray, device: np.ndarray, share: np.ndarray, loads: np.ndarray,
                    activity: np.ndarray | None, gone: np.ndarray, capacity: np.ndarray, params: np.ndarray) -> bool:
    """`evacuate` for one layer's slots [R], changed in place; False where the survivors have no room left."""
    num_experts, num_devices = loads.shape[0], gone.size

    def per_pass():  # (calls per pass, tokens per call) of every slot, from its expert and share as they are now
        return slot_calls(loads[expert] * share, None if activity is None else activity[expert])

    calls, per_call = per_pass()
    moving = gone[device]
    slots = np.flatnonzero(moving)
    holds = np.zeros((num_experts, num_devices), dtype=bool)
    holds[expert[~moving], device[~moving]] = True
    # replicas whose expert a survivor holds first (the devices open to them are fewer), then heaviest first
    order = np.lexsort((-(calls * per_call)[slots], ~holds[expert[slots]].any(axis=1)))
    placed = ~moving
    for slot in slots[order]:
        room = ~gone & (np.bincount(device[placed], minlength=num_devices) < capacity)
        if not room.any():
            return False
        if not (room & ~holds[expert[slot]]).any():  # every survivor with room holds this replica's expert
            lacking = (room & ~holds).any(axis=1)  # [E]: experts some survivor with room lacks
            if not lacking.any():
                return False
            counts = np.bincount(expert, minlength=num_experts)
            old, new = expert[slot], int(np.flatnonzero(lacking)[np.argmax((loads / counts)[lacking])])
            others = np.flatnonzero(expert == old)
            others = others[others != slot]
            share[others] /= share[others].sum()  # its tokens go to the expert's other replicas
            share[expert == new] *= counts[new] / (counts[new] + 1.0)
            expert[slot], share[slot] = new, 1.0 / (counts[new] + 1.0)
            calls, per_call = per_pass()
        open_ = room & ~holds[expert[slot]]
        times = np.bincount(device[placed], weights=(calls * latency_on(per_call, device, params))[placed],
                            minlength=num_devices)
        cost = calls[slot] * latency_matrix(per_call[slot], params)  # [G]: its seconds on each device
        dst = int(np.flatnonzero(open_)[np.argmin((times + cost)[open_])])
        device[slot], placed[slot] = dst, True
        holds[expert[slot], dst] = True
    return True


def search_and_balance(expert: np.ndarray, share: np.ndarray, device: np.ndarray, loads: np.ndarray,
                       devices: Sequence[DeviceModel], capacity: np.ndarray | None, distinct: bool, activity: np.ndarray | None, eps: float, max_steps: np.ndarray | None,
                       version: int, separate: bool = False) -> tuple[Placement, np.ndarray]:
    """The swap/move search (`SwapSearch.relieve_slowest`) from slots `expert`, `share`, `device` [L, R], then,
    with `distinct` (replicas), the replicas' shares re-split (`shares.balanced_shares`) and the search again
    from them, until a search applies no step or the shares stay (at most `_BALANCE_ROUNDS` rounds): new shares
    can open a swap the search had not, so a placement this returns is one the search (and so `rebalance` on the
    same loads) leaves as it is, but for the last round's.

    Args:
        activity: float [L, E] or None, as in `rebalance`; max_steps: int [L], swaps allowed over all rounds,
            or None; separate: first swap co-located replicas apart (`SwapSearch.separate_replicas`).
    Returns:
        The placement (device-major, `version`) and bool [L], the layers that keep replicas on distinct devices.
    """
    params = curve_params(devices)
    valid = np.ones(loads.shape[0], dtype=bool)
    done = np.zeros(loads.shape[0], dtype=np.int64)
    for round_ in range(_BALANCE_ROUNDS):
        tokens = np.take_along_axis(loads, expert, axis=1) * share
        slot_act = None if activity is None else np.take_along_axis(activity, expert, axis=1)
        search = SwapSearch(expert, tokens, device, params, capacity, distinct, slot_act)
        if separate and round_ == 0:
            valid = search.separate_replicas()
        steps = search.relieve_slowest(eps, None if max_steps is None else np.maximum(max_steps - done, 0))
        done += steps
        placement = device_major(expert, search.slot_devices(), share, loads.shape[1], params.shape[1], version)
        if not distinct or (round_ and not steps.any()):
            break
        # after the first round only the layers the search changed can gain
        balanced = balanced_shares(placement, loads, devices, activity, steps > 0 if round_ else None)
        if balanced is placement:
            break
        placement = balanced
        expert, device, share = placement.phy2log, placement.slot_device, placement.replica_share
    return placement, valid


def device_major(expert: np.ndarray, device: np.ndarray, share: np.ndarray, num_experts: int,
                 num_devices: int, version: int) -> Placement:
    """The placement with slots [L, R] of `expert`, `device` and `share`, re-laid device-major (stable)."""
    order = np.argsort(device, axis=1, kind="stable")
    phy2log, slot_device, share = (np.take_along_axis(array, order, axis=1) for array in (expert, device, share))
    return Placement(phy2log, slot_device, share, num_experts, num_devices, version)


def _check_inputs(placement: Placement, loads, devices, eps, max_swaps_per_layer) -> np.ndarray:
    loads = np.asarray(loads, dtype=np.float64)
    if loads.shape != (placement.num_layers, placement.num_experts):
        raise ValueError(f"loads must be [L, E] = {(placement.num_layers, placement.num_experts)}, "
                         f"got {loads.shape}")
    if not np.all(np.isfinite(loads)) or np.any(loads < 0):
        raise ValueError("loads must be finite and >= 0")
    if len(devices) != placement.num_devices:
        raise ValueError(f"placement has {placement.num_devices} devices, got {len(devices)} device models")
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    if max_swaps_per_layer is not None and max_swaps_per_layer < 0:
        raise ValueError(f"max_swaps_per_layer must be >= 0, got {max_swaps_per_layer!r}")
    return loads
