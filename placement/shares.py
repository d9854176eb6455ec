"""Replica token shares: the split of each replicated expert's tokens that minimises a layer's makespan.

Owns the smallest share a replica is given and `balanced_shares`, the linear program that re-splits the shares
of a placement whose slots stay where they are. `vibe`'s and `rebalance`'s searches alternate with it
(`rebalance.search_and_balance`): changing shares moves no weights, so an incremental recalibration can re-split
them for new loads at no migration cost. Shares by device speed (`vibe.speed_shares`, the search's start) ignore what else a device
holds: a replica on a fast device already loaded with hot experts is given the most tokens. Knows nothing of
how slots were placed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from placement.device_model import DeviceModel
from placement.metrics import curve_params, latency_on, makespan, slot_activity, slot_calls
from placement.placement import Placement

# The smallest share of an expert's tokens a replica is given (shares must be positive; a replica on a device
# far slower than its expert's other replicas would otherwise get 0, or underflow to it).
MIN_SHARE = 1e-6
# A layer takes new shares only where its makespan drops by more than this share of it.
_MIN_GAIN = 1e-9


def balanced_shares(placement: Placement, loads: np.ndarray, devices: Sequence[DeviceModel],
                    activity: np.ndarray | None = None, layers: np.ndarray | None = None) -> Placement:
    """`placement` with its replicas' token shares re-split to minimise each layer's makespan, slots kept.

    With every slot on its device, the shares that minimise a layer's slowest device are a linear program:
    a replica's seconds are convex in its tokens past zero (`fixed`, then `fixed + slope (n - knee)`), so
    min T over shares s >= MIN_SHARE summing to 1 per expert, replica seconds y >= fixed and
    y >= fixed + slope (W s - knee), and each device's singletons plus its replicas' y at most T. All
    layers go to HiGHS as one block-diagonal program, each layer's times in units of its own makespan (min
    sum_l T_l; a 1e-6 weight on the replicas' summed seconds breaks ties toward less work).

    With `activity` the program times a replica as called in its expert's share of passes (`fixed` and
    `knee` scaled by it: exact while a replica gets at least a token per call). A layer keeps the new shares
    only where its makespan, as `metrics.makespan` times it (with `activity`), is lower by more than
    `_MIN_GAIN` of it (the program has many optima: a gain of float noise must not make a new version). Layers
    without loaded replicas keep theirs; so do all layers if HiGHS does not solve the program. `layers`: bool [L],
    the only layers to re-split (None: all).
    """
    expert, device = placement.phy2log, placement.slot_device
    load = np.take_along_axis(loads, expert, axis=1)
    free = (np.take_along_axis(placement.logcnt, expert, axis=1) > 1) & (load > 0)
    before = makespan(placement, loads, devices, activity)  # [L]
    free &= ((before > 0) & np.isfinite(before) & (True if layers is None else np.asarray(layers)))[:, None]
    if not free.any():
        return placement
    from scipy.optimize import linprog
    from scipy.sparse import coo_array

    params = curve_params(devices)
    num_layers, num_devices = placement.num_layers, placement.num_devices
    slot_act = slot_activity(placement, activity)
    calls, per_call = slot_calls(placement.slot_tokens(loads), slot_act)
    fixed_seconds = np.where(free, 0.0, calls * latency_on(per_call, device, params))
    base = np.zeros((num_layers, num_devices))  # [L, G] seconds of the slots whose tokens are fixed
    np.add.at(base, (np.repeat(np.arange(num_layers), placement.num_slots), device.ravel()), fixed_seconds.ravel())
    layer, slot = np.nonzero(free)
    n = layer.size
    solved = np.unique(layer)  # the layers in the program
    unit = before[layer]  # each layer's times in units of its makespan
    dev = device[layer, slot]
    scale = np.ones(n) if slot_act is None else slot_act[layer, slot]
    fixed, knee, slope = scale * params[0][dev] / unit, scale * params[1][dev], params[2][dev] / unit
    pairs, pair_index = np.unique(layer * num_devices + dev, return_inverse=True)  # (layer, device) with replicas
    groups, group_index = np.unique(layer * placement.num_experts + expert[layer, slot], return_inverse=True)
    ones, slots = np.ones(n), np.arange(n)
    # variables: shares s [n], replica seconds y [n], layer makespans T [layers]; rows: y's linear piece, then
    # each (layer, device)'s time
    a_ub = coo_array((np.concatenate([slope * load[layer, slot], -ones, ones, -np.ones(pairs.size)]),
                      (np.concatenate([slots, slots, n + pair_index, n + np.arange(pairs.size)]),
                       np.concatenate([slots, n + slots, n + slots,
                                       2 * n + np.searchsorted(solved, pairs // num_devices)]))),
                     shape=(n + pairs.size, 2 * n + solved.size))
    b_ub = np.concatenate([slope * knee - fixed,
                           -base[pairs // num_devices, pairs % num_devices] / before[pairs // num_devices]])
    a_eq = coo_array((ones, (group_index, slots)), shape=(groups.size, 2 * n + solved.size))
    lower = np.concatenate([np.full(n, MIN_SHARE), fixed, base[solved].max(axis=1) / before[solved]])
    upper = np.concatenate([ones, np.full(n + solved.size, np.inf)])
    cost = np.concatenate([np.zeros(n), np.full(n, 1e-6), np.ones(solved.size)])
    result = linprog(cost, A_ub=a_ub.tocsr(), b_ub=b_ub, A_eq=a_eq.tocsr(), b_eq=np.ones(groups.size),
                     bounds=np.stack([lower, upper], axis=1), method="highs")
    if result.status != 0:
        return placement
    share = placement.replica_share.copy()
    solution = np.clip(result.x[:n], MIN_SHARE, 1.0)
    total = np.zeros(groups.size)
    np.add.at(total, group_index, solution)
    share[layer, slot] = solution / total[group_index]
    balanced = Placement(expert, device, share, placement.num_experts, num_devices, placement.version)
    better = makespan(balanced, loads, devices, activity) < before * (1.0 - _MIN_GAIN)
    if not better.any():
        return placement
    share = np.where(better[:, None], share, placement.replica_share)
    return Placement(expert, device, share, placement.num_experts, num_devices, placement.version)
