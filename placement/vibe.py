"""The ViBE policy: place experts by predicted execution time on each device's own latency curve.

Owns the steps of one `vibe` plan, vectorised over layers: choosing replicas (`replica_counts`), a greedy
first placement (`greedy_devices`, LPT on each device's own curve), replica token shares by device speed
(`speed_shares`), the swap/move local search (from `rebalance.SwapSearch`), the guard that keeps every
layer at least as fast as EPLB's, and, with replicas, their shares re-split by a linear program over each layer
(`balanced_shares`). Knows nothing of when it is called or of weight movement.

Every time it compares is a slot's seconds on a device's curve at the slot's mean tokens per pass or, given
each expert's activity (the share of passes that route tokens to it), the expected seconds per pass
(`metrics.slot_calls`): below the knee, in decode, how often an expert is called is what it costs.

The paper's greedy (targets tau_g from speeds at N / E tokens, each expert to the device furthest below
its target) was tried against LPT on DeepSeek-V3 loads (58 x 256 at 256 tokens per expert, G = 32 without
replicas and G = 64 with 64, five variability profiles): after the local search LPT ended lower in 5 of
10 cases, equal in 4 and higher in 1 (0.44% vs 0.37% above the lower bound), at the same run time, so
LPT is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from placement.device_model import DeviceModel
from placement.eplb import eplb_placement
from placement.metrics import curve_params, latency_matrix, latency_on, makespan, slot_calls
from placement.placement import Placement
from placement.rebalance import search_and_balance
from placement.shares import MIN_SHARE


def vibe_placement(loads: np.ndarray, devices: Sequence[DeviceModel], num_redundant: int,
                   capacity: np.ndarray | None, activity: np.ndarray | None = None) -> Placement:
    """The ViBE placement of `loads` [L, E] (inputs assumed validated by `policies.plan`).

    `greedy_search`, then, so that no layer is worse than EPLB's: in the layers where EPLB's placement
    is still faster, the same local search from EPLB's placement, kept where it ends faster; likewise from the
    contiguous layout (without replicas, E a multiple of G) and, under a slot budget that allows equal counts, the
    plan with equal counts is kept in the layers where it is faster. (A swap/move search can stop above the
    optimum: with flat-then-linear curves the number of loaded experts a device holds matters, and no single
    move changes it; a review found vibe 10-14% above the contiguous layout in 8-20 of 12,000 random layers, and
    up to 21% above its own plan with equal counts under a budget in 128 of 6,000.) With replicas each
    search alternates with the shares that minimise each layer's makespan for its slots
    (`rebalance.search_and_balance`, `shares.balanced_shares`). (Searching
    from EPLB in every layer gained under 0.03% of the summed makespan on DeepSeek-V3 loads and would
    double the search time, so it is done only where it can matter for the guarantee.)

    Args:
        num_redundant: extra slots, filled with replicas of hot experts on distinct devices.
        capacity: int [G], most slots per device (uneven counts allowed), or None for exactly R / G each.
        activity: float [L, E], share of forward passes that route tokens to each expert; every time
            compared is then the expected seconds per pass (`metrics.slot_calls`), which at decode loads
            below the knee tells hot experts from cold ones where the curve at the mean load cannot.
            None: the seconds at the mean loads.
    """
    num_layers, num_experts = loads.shape
    num_devices = len(devices)
    num_slots = num_experts + num_redundant
    best = greedy_search(loads, devices, num_redundant, capacity, activity)
    if capacity is None or (num_slots % num_devices == 0 and np.all(capacity >= num_slots // num_devices)):
        starts = [eplb_placement(loads, num_devices, num_redundant)]
        if num_redundant == 0 and num_experts % num_devices == 0:  # (vLLM's default layout)
            starts.append(Placement.from_expert_devices(
                np.tile(np.arange(num_experts) // (num_experts // num_devices), (num_layers, 1)), num_devices))
        for start in starts:
            behind = np.flatnonzero(makespan(best, loads, devices, activity) > makespan(start, loads, devices, activity))
            if behind.size:
                rows = [getattr(start, name)[behind] for name in ("phy2log", "replica_share", "slot_device")]
                other, valid = _searched(loads[behind], *rows, devices, capacity, num_redundant > 0,
                                         None if activity is None else activity[behind])
                best = _better_layers(best, other, behind, valid, loads, devices, activity)
        if capacity is not None and np.any(capacity > num_slots // num_devices):
            # the plan with equal counts is one the budget allows: kept where it is faster (a budget of exactly
            # equal counts allows no other plan: `best` already is that one, and a second search doubled the time)
            even = greedy_search(loads, devices, num_redundant, None, activity)
            best = _better_layers(best, even, np.arange(num_layers), np.ones(num_layers, dtype=bool), loads,
                                  devices, activity)
    return best


def greedy_search(loads: np.ndarray, devices: Sequence[DeviceModel], num_redundant: int,
                  capacity: np.ndarray | None, activity: np.ndarray | None = None) -> Placement:
    """ViBE's own placement: replicas (`replica_counts`), LPT (`greedy_devices`), shares by speed
    (`speed_shares`), then the swap/move local search, with replicas alternating with their shares' balancing
    (`rebalance.search_and_balance`)."""
    num_devices = len(devices)
    num_slots = loads.shape[1] + num_redundant
    params = curve_params(devices)
    limit = np.full(num_devices, num_slots // num_devices) if capacity is None else capacity
    # the devices' median knee: with the smallest, one device whose fit has (almost) no flat part (DeviceModel.fit
    # gives 3.5 tokens on a line with an offset) made every split look worth a call, and spare slots split loaded
    # experts where an expert without load costs nothing (twice the optimal makespan on a 3-device case; a review).
    # Curves of one shape, scaled (a cluster of one GPU model, the simulations), have one knee: the same either way
    knee = float(np.median(params[1]))
    counts = replica_counts(loads, num_slots, limit, knee,
                            curve=DeviceModel(float(np.median(params[0])), knee, float(np.median(params[2]))))
    expert = np.repeat(np.tile(np.arange(loads.shape[1]), loads.shape[0]), counts.ravel())
    expert = expert.reshape(loads.shape[0], num_slots)  # [L, R], replicas of one expert adjacent
    share = 1.0 / np.take_along_axis(counts, expert, axis=1)
    slot_act = None if activity is None else np.take_along_axis(activity, expert, axis=1)  # per slot
    device = greedy_devices(expert, np.take_along_axis(loads, expert, axis=1) * share, params, limit, slot_act)
    share = speed_shares(loads, expert, device, counts, params, slot_act)
    placement, valid = _searched(loads, expert, share, device, devices, capacity, num_redundant > 0, activity)
    assert valid.all()  # the greedy keeps replicas apart, and the search never joins them
    return placement


def replica_counts(loads: np.ndarray, num_slots: int, capacity: np.ndarray, knee: float, *,
                   curve: DeviceModel | None = None) -> np.ndarray:
    """int [L, E]: replicas per expert, adding one at a time to the expert with the longest replica.

    Each extra slot goes to the expert with the highest predicted time per replica, i.e. the most tokens
    per replica (every curve is non-decreasing in tokens): EPLB's rule, as long as the split replicas
    keep at least `knee` tokens (the devices' median knee). At or below the knee a split only adds one more
    flat-cost call, so then the slot goes to an expert without load if there is one (its replica costs nothing), else
    by EPLB's rule. Between the two (replicas past the knee whose halves would not be) a split shortens the
    replica to the flat cost for one more flat-cost call elsewhere: it is made when it lowers the layer's
    makespan bound on the reference `curve` (`_split_lowers_bound`; None: never: one hot expert of 250 tokens
    past a knee of 128 split into two calls of 125 takes half the time; many experts just past the knee split
    would only add work). Only experts whose extra replica still fits are
    candidates: replicas of one expert sit on distinct devices with at most `capacity` [G] slots each
    (`_room_for_one_more`).
    """
    num_layers, num_experts = loads.shape
    counts = np.ones(loads.shape, dtype=np.int64)
    rows = np.arange(num_layers)
    capacity = np.asarray(capacity)
    num_devices = max(int(np.count_nonzero(capacity)), 1)
    # sum_g min(capacity_g, k) for k = 1..E: the most slots k experts' replicas can fill on distinct devices
    bound = np.minimum(capacity[None, :], np.arange(1, num_experts + 1)[:, None]).sum(axis=1)
    # equal budgets (those above 0): the condition is one replica per device at most, no sorting needed
    equal = np.unique(capacity[capacity > 0]).size <= 1
    for _ in range(num_slots - num_experts):
        room = counts < np.count_nonzero(capacity) if equal else _room_for_one_more(counts, bound)
        per_replica = np.where(room, loads / counts, -np.inf)
        splits = per_replica.argmax(axis=1)
        free = np.where((loads == 0) & room, np.inf, per_replica).argmax(axis=1)
        load, count = loads[rows, splits], counts[rows, splits]
        helps = load / (count + 1) >= knee
        window = ~helps & (load / count > knee)
        if curve is not None and window.any():
            helps |= window & _split_lowers_bound(loads, counts, splits, num_devices, curve)
        counts[rows, np.where(helps | (loads[rows, free] > 0), splits, free)] += 1
    return counts


def _split_lowers_bound(loads: np.ndarray, counts: np.ndarray, splits: np.ndarray, num_devices: int,
                        curve: DeviceModel) -> np.ndarray:
    """bool [L]: whether one more replica of each layer's `splits` expert lowers the layer's makespan bound: the
    largest of the work per device, the longest replica, and the k shortest loaded replicas together (k = loaded
    replicas over devices, rounded up: some device holds that many), every replica timed on `curve`. The last
    term keeps a split from stacking a second call on devices that each hold one already."""
    rows = np.arange(loads.shape[0])

    def bound(counts: np.ndarray) -> np.ndarray:
        times = curve.latency(loads / counts)  # [L, E] per replica
        loaded = np.where(times > 0, counts, 0)
        order = np.argsort(times, axis=1)
        ordered, copies = np.take_along_axis(times, order, axis=1), np.take_along_axis(loaded, order, axis=1)
        stacked = -(-loaded.sum(axis=1) // num_devices)  # ceil: loaded replicas on the busiest device, at least
        taken = np.clip(stacked[:, None] - (np.cumsum(copies, axis=1) - copies), 0, copies)
        return np.maximum.reduce([(counts * times).sum(axis=1) / num_devices, times.max(axis=1),
                                  (taken * ordered).sum(axis=1)])

    after = counts.copy()
    after[rows, splits] += 1
    return bound(after) < bound(counts)


def _room_for_one_more(counts: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """bool [L, E]: the experts that can take one more replica with the layer's counts [L, E] still
    placeable on distinct devices.

    Counts are placeable exactly when, for every k, the k largest sum to at most `bound`[k - 1] (the
    Gale-Ryser condition for a 0-1 expert x device matrix with these row sums and column bounds). One more
    replica for an expert with count c raises the sum of the k largest by one for every k beyond the
    experts counted above c, so it fits when the slack there is at least one everywhere. With even budgets
    that is a replica per device at most; uneven ones also bar, e.g., [4, 4, 3, 1] on budgets [2, 2, 4, 4].
    """
    ordered = -np.sort(-counts, axis=1)
    slack = bound[None, :] - np.cumsum(ordered, axis=1)  # [L, E], k = 1..E
    slack_from = np.minimum.accumulate(slack[:, ::-1], axis=1)[:, ::-1]  # min over k' >= k
    num_layers, num_experts = counts.shape
    width = int(counts.max()) + 1
    index = (np.arange(num_layers)[:, None] * width + counts).ravel()
    at_most = np.cumsum(np.bincount(index, minlength=num_layers * width).reshape(num_layers, width), axis=1)
    above = num_experts - np.take_along_axis(at_most, counts, axis=1)  # [L, E]: experts with more replicas
    return np.take_along_axis(slack_from, above, axis=1) >= 1


def greedy_devices(expert: np.ndarray, tokens: np.ndarray, params: np.ndarray, capacity: np.ndarray,
                   activity: np.ndarray | None = None) -> np.ndarray:
    """int [L, R]: a first device for every slot, LPT on unrelated machines.

    Slots are taken by expected seconds descending (mean over the devices; tokens break ties); each goes
    to the device with a free slot (and no replica of its expert yet) where it would finish earliest, on
    that device's own curve. Layers where this rule runs out of devices for a replica are redone by
    `_feasible_devices`.

    Args:
        expert: int [L, R]; tokens: float [L, R]; params: [3, G]; capacity: int [G] slots per device;
        activity: float [L, R], each slot's expert's share of passes with tokens (`metrics.slot_calls`),
        or None.
    """
    num_layers, num_slots = expert.shape
    rows = np.arange(num_layers)
    calls, per_call = slot_calls(tokens, activity)
    seconds = calls * latency_matrix(per_call, params).mean(axis=2)
    order = np.lexsort((-tokens, -seconds), axis=1)
    ordered, ordered_calls = (np.take_along_axis(x, order, axis=1) for x in (per_call, calls))
    times = np.zeros((num_layers, params.shape[1]))
    room = np.broadcast_to(capacity, times.shape).copy()
    held = None  # bool [L, E, G]: devices holding a replica of each expert, needed only with replicas
    if num_slots > int(expert.max()) + 1:
        held = np.zeros((num_layers, int(expert.max()) + 1, params.shape[1]), dtype=bool)
    device = np.empty(expert.shape, dtype=np.int64)
    stuck = np.zeros(num_layers, dtype=bool)
    for step in range(num_slots):
        slot, exp = order[:, step], expert[rows, order[:, step]]
        barred = room == 0 if held is None else (room == 0) | held[rows, exp]
        finish = times + ordered_calls[:, step, None] * latency_matrix(ordered[:, step], params)  # [L, G]
        dev = np.where(barred, np.inf, finish).argmin(axis=1)
        stuck |= barred[rows, dev]
        device[rows, slot] = dev
        times[rows, dev] = finish[rows, dev]
        room[rows, dev] -= 1
        if held is not None:
            held[rows, exp, dev] = True
    for layer in np.flatnonzero(stuck):
        device[layer] = _feasible_devices(expert[layer], per_call[layer], calls[layer], params, capacity)
    return device


def _feasible_devices(expert: np.ndarray, tokens: np.ndarray, calls: np.ndarray, params: np.ndarray,
                      capacity: np.ndarray) -> np.ndarray:
    """int [R]: devices for the slots of one layer with every expert's replicas on distinct devices.

    Experts with the most replicas go first, each replica to a device with the most free slots left
    (earliest finish among equals); this succeeds whenever any such assignment exists (Ryser's
    construction for 0-1 matrices with given row sums and column bounds). Single slots follow, LPT.
    `tokens` [R] are per call, `calls` [R] per pass (`metrics.slot_calls`).
    """
    times = np.zeros(params.shape[1])
    room = capacity.astype(np.int64).copy()
    device = np.full(expert.shape, -1, dtype=np.int64)
    replicas = np.bincount(expert)
    for exp in np.argsort(-replicas, kind="stable"):
        slots = np.flatnonzero(expert == exp)
        slots = slots[np.argsort(-tokens[slots] * calls[slots], kind="stable")]
        cost = calls[slots, None] * latency_matrix(tokens[slots], params)  # [c, G]
        if slots.size == 1:
            ranked = np.argsort(np.where(room > 0, times + cost[0], np.inf), kind="stable")
        else:
            ranked = np.lexsort((times + cost.max(axis=0), -room))
        chosen = ranked[: slots.size]
        if np.any(room[chosen] <= 0):
            raise ValueError(f"slot_budget {capacity.tolist()} cannot hold {replicas[exp]} replicas of an "
                             f"expert on distinct devices next to the others")
        device[slots] = chosen
        room[chosen] -= 1
        times[chosen] += cost[np.arange(slots.size), chosen]
    return device


def speed_shares(loads: np.ndarray, expert: np.ndarray, device: np.ndarray, counts: np.ndarray,
                 params: np.ndarray, activity: np.ndarray | None = None) -> np.ndarray:
    """float [L, R]: each slot's share of its expert's tokens, proportional to its device's throughput.

    Throughput is taken at an equal split (load / replicas tokens; per call, with `activity` [L, R] as in
    `greedy_devices`), so on identical devices the shares are equal; experts without load keep equal
    shares. A replica whose device predicts no time for its tokens (a curve with a zero cost, or a speed
    beyond float range) is infinitely fast: such replicas share the expert's tokens equally. Every share is
    at least MIN_SHARE (a placement's shares are positive), the others scaled down to make room.
    """
    equal = np.take_along_axis(loads / counts, expert, axis=1)  # [L, R] tokens per replica
    _, per_call = slot_calls(equal, activity)
    seconds = latency_on(per_call, device, params)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        speed = np.where(per_call > 0, np.divide(per_call, seconds, out=np.full_like(per_call, np.inf),
                                                 where=seconds > 0), 0.0)
    infinite = ~np.isfinite(speed)
    speed = np.where(infinite, 0.0, speed)
    total, fastest = _per_expert(speed, expert, loads.shape), _per_expert(infinite.astype(float), expert, loads.shape)
    replicas = np.take_along_axis(counts, expert, axis=1)
    share = np.where(fastest > 0, infinite / np.where(fastest > 0, fastest, 1.0),
                     np.where(total > 0, speed / np.where(total > 0, total, 1.0), 1.0 / replicas))
    floored = np.maximum(share, MIN_SHARE)
    return floored / _per_expert(floored, expert, loads.shape)


def _per_expert(values: np.ndarray, expert: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """float [L, R]: the sum of `values` [L, R] over the slots of each slot's expert."""
    total = np.zeros(shape)
    np.add.at(total, (np.repeat(np.arange(shape[0]), expert.shape[1]), expert.ravel()), values.ravel())
    return np.take_along_axis(total, expert, axis=1)


def _searched(loads: np.ndarray, expert: np.ndarray, share: np.ndarray, device: np.ndarray,
              devices: Sequence[DeviceModel], capacity: np.ndarray | None, distinct: bool,
              activity: np.ndarray | None = None) -> tuple[Placement, np.ndarray]:
    """The local search from the start `expert`, `share`, `device` (each [L, R]), with replicas alternating with
    their shares' balancing (`rebalance.search_and_balance`); `activity` [L, E] or None.

    Returns the placement and bool [L], the layers where it keeps replicas on distinct devices (a start
    from EPLB may co-locate two replicas; they are first swapped apart where some swap allows it).
    """
    return search_and_balance(expert, share, device, loads, devices, capacity, distinct, activity, 0.0, None, 0,
                              separate=distinct)


def _better_layers(best: Placement, other: Placement, layers: np.ndarray, valid: np.ndarray,
                   loads: np.ndarray, devices: Sequence[DeviceModel], activity: np.ndarray | None) -> Placement:
    """`best` with its `layers` replaced by `other`'s rows (one per layer) where those are valid and faster."""
    other_activity = None if activity is None else activity[layers]
    faster = valid & (makespan(other, loads[layers], devices, other_activity)
                      < makespan(best, loads, devices, activity)[layers])
    if not faster.any():
        return best
    arrays = [getattr(best, name).copy() for name in ("phy2log", "slot_device", "replica_share")]
    for array, name in zip(arrays, ("phy2log", "slot_device", "replica_share")):
        array[layers[faster]] = getattr(other, name)[faster]
    return Placement(*arrays, best.num_experts, best.num_devices)
