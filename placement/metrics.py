"""Predicted device times and the balance metrics (README, Design: "Definitions").

Owns the vectorised evaluation of many device curves at once and the per-layer metrics built on it.
Knows nothing of how placements are chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from placement.device_model import DeviceModel
from placement.placement import Placement


def curve_params(devices: Sequence[DeviceModel]) -> np.ndarray:
    """float [3, G]: the (fixed, knee, slope) of every device, stacked for vectorised evaluation."""
    if len(devices) == 0:
        raise ValueError("need at least one device")
    return np.array([[d.fixed, d.knee, d.slope] for d in devices], dtype=np.float64).T


def latency_on(tokens: np.ndarray, device: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Seconds for one expert with `tokens` tokens on `device`, elementwise.

    Args:
        tokens: float [...]; device: int [...] (broadcastable to tokens); params: [3, G] from curve_params.
    """
    fixed, knee, slope = params[0][device], params[1][device], params[2][device]
    t = fixed + slope * np.maximum(tokens - knee, 0.0)
    return np.where(tokens > 0, t, 0.0)


def latency_matrix(tokens: np.ndarray, params: np.ndarray) -> np.ndarray:
    """float [..., G]: seconds for one expert with `tokens` tokens on each of the G devices."""
    tokens = np.asarray(tokens, dtype=np.float64)[..., None]
    t = params[0] + params[2] * np.maximum(tokens - params[1], 0.0)
    return np.where(tokens > 0, t, 0.0)


def slot_calls(tokens: np.ndarray, activity: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(calls, tokens per call), each float like `tokens`: the pass-aware form of slots' mean loads.

    A slot with `tokens` mean tokens per forward pass, whose expert is routed tokens in a share
    `activity` of the passes, is called in `calls = min(activity, tokens)` of them (a call has at least
    one token) with `tokens / calls` tokens each, so its expected seconds per pass are
    `calls * latency(tokens / calls)`. Below a device's knee that is `calls * fixed`: an expert that few
    passes route to costs little, where its curve at the mean load would charge the full flat cost.
    `activity` None: every slot is called in every pass it has load (calls = 1 where tokens > 0), the
    mean-load cost `latency(tokens)`.
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    if activity is None:
        return (tokens > 0).astype(np.float64), tokens
    calls = np.minimum(np.asarray(activity, dtype=np.float64), tokens)
    return calls, np.divide(tokens, calls, out=np.zeros_like(tokens), where=calls > 0)


def device_times(placement: Placement, loads: np.ndarray, devices: Sequence[DeviceModel],
                 activity: np.ndarray | None = None) -> np.ndarray:
    """float [L, G]: predicted seconds of each device in each layer (sum of its slots' expert latencies).

    Args:
        loads: [L, E] tokens routed to each logical expert (mean per forward pass).
        activity: [L, E] share of passes that route tokens to each expert, for the expected seconds per
            pass (`slot_calls`); None: the seconds at the mean loads.
    """
    if len(devices) != placement.num_devices:
        raise ValueError(f"placement has {placement.num_devices} devices, got {len(devices)} device models")
    params = curve_params(devices)
    tokens = placement.slot_tokens(loads)
    activity = checked_activity(activity, np.asarray(loads, dtype=np.float64))
    calls, per_call = slot_calls(tokens, slot_activity(placement, activity))
    return placement.per_device(calls * latency_on(per_call, placement.slot_device, params))


def pass_critical_paths(placement: Placement, passes: np.ndarray, devices: Sequence[DeviceModel]) -> np.ndarray:
    """float [N]: the MoE critical path of each of N forward passes, seconds: the sum over layers of the
    slowest device's time (each slot's expert latency at the tokens it got in that pass).

    A replicated expert's tokens are split among its replicas in whole tokens as the engine dispatches
    them (`replica_tokens`), not in fractional shares: with 1 token only one replica is called and pays
    its fixed cost, where shares would charge every replica a call and so judge replicated placements
    slower in decode than they run.

    Args:
        passes: [N, L, E] tokens routed to each logical expert in each pass (router counts, whole numbers).
    """
    passes = np.asarray(passes, dtype=np.float64)
    if passes.ndim != 3:
        raise ValueError(f"passes must be [N, L, E], got shape {passes.shape}")
    if len(devices) != placement.num_devices:
        raise ValueError(f"placement has {placement.num_devices} devices, got {len(devices)} device models")
    per_slot = latency_on(replica_tokens(placement, passes), placement.slot_device, curve_params(devices))
    return placement.per_device(per_slot).max(axis=2).sum(axis=1)


def replica_bounds(placement: Placement) -> np.ndarray:
    """float [L, E, W-1]: the cumulative token shares of each expert's replicas but the last, in the order
    of `placement.log2phy` [L, E, W] (slot order), padded with 1.0 (W = most replicas of an expert).

    With `split_bounds` they are the dispatch rule (`replica_tokens`): replica j of an expert routed n
    tokens takes those ranked [round(n c_{j-1}), round(n c_j)), c_{-1} = 0 and the last replica's bound n.
    """
    log2phy = placement.log2phy
    width = log2phy.shape[2]
    layers = np.arange(placement.num_layers)[:, None, None]
    share = np.where(log2phy >= 0, placement.replica_share[layers, np.maximum(log2phy, 0)], 0.0)
    bounds = np.cumsum(share, axis=2)[:, :, :-1]
    return np.where(np.arange(1, width) < placement.logcnt[:, :, None], bounds, 1.0)


def split_bounds(bounds: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """int-valued [..., W-1]: the ranks at which `counts` tokens [...] change replica, given cumulative
    shares `bounds` [..., W-1] (`replica_bounds`): floor(n c + 0.5), round half up, so a replica's tokens
    are whole and the replicas' tokens sum to n."""
    return np.floor(bounds * counts[..., None] + 0.5)


def replica_tokens(placement: Placement, counts: np.ndarray) -> np.ndarray:
    """float [..., L, R]: whole tokens each slot gets of router counts [..., L, E] (leading axes, e.g.
    forward passes, are kept), split among an expert's replicas as the engine dispatches them:
    contiguously in slot order at the rounded cumulative shares (`replica_bounds`, `split_bounds`).

    Raises ValueError unless the counts are whole numbers >= 0 (a fractional count has no such split).
    """
    tokens = placement.slot_tokens(counts)  # checks the counts; the answer without replicas
    counts = np.asarray(counts, dtype=np.float64)
    if np.any(counts != np.floor(counts)):
        raise ValueError("router counts must be whole numbers of tokens")
    if placement.logcnt.max() == 1:
        return tokens
    log2phy = placement.log2phy  # [L, E, W]
    edges = split_bounds(replica_bounds(placement), counts)  # [..., L, E, W-1]
    zero = np.zeros((*edges.shape[:-1], 1))
    per_replica = np.diff(np.concatenate([zero, edges, counts[..., None]], axis=-1), axis=-1)  # [..., L, E, W]
    layer, expert, replica = np.nonzero(log2phy >= 0)
    out = np.zeros_like(tokens)
    out[..., layer, log2phy[layer, expert, replica]] = per_replica[..., layer, expert, replica]
    return out


def checked_activity(activity, loads: np.ndarray) -> np.ndarray | None:
    """`activity` as float [L, E] after checking it against `loads` [L, E] (None stays None).

    Raises ValueError unless it has the loads' shape, lies in [0, 1], and is > 0 wherever loads are (an
    expert with tokens is routed some of them in some pass).
    """
    if activity is None:
        return None
    array = np.asarray(activity, dtype=np.float64)
    if array.shape != np.shape(loads):
        raise ValueError(f"activity must have the shape of loads {np.shape(loads)}, got {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0) or np.any(array > 1):
        raise ValueError("activity must be a share of passes in [0, 1]")
    if np.any((array == 0) & (np.asarray(loads) > 0)):
        raise ValueError("activity must be > 0 wherever loads are > 0")
    return array


def slot_activity(placement: Placement, activity: np.ndarray | None) -> np.ndarray | None:
    """float [L, R]: each slot's expert's activity [L, E] (None stays None)."""
    if activity is None:
        return None
    activity = np.asarray(activity, dtype=np.float64)
    if activity.shape != (placement.num_layers, placement.num_experts):
        raise ValueError(f"activity must be [L, E] = {(placement.num_layers, placement.num_experts)}, "
                         f"got {activity.shape}")
    return np.take_along_axis(activity, placement.phy2log, axis=1)


def makespan(placement: Placement, loads: np.ndarray, devices: Sequence[DeviceModel],
             activity: np.ndarray | None = None) -> np.ndarray:
    """float [L]: predicted layer time, the slowest device's time (the MoE barrier); `activity` as in
    `device_times`."""
    return device_times(placement, loads, devices, activity).max(axis=1)


def imbalance(times: np.ndarray) -> np.ndarray:
    """float [...]: max / mean over the last axis (1.0 is perfect balance; all-zero rows give 1.0).

    ValueError on a NaN or infinite time (a NaN row would read as 1.0, perfectly balanced).
    """
    times = np.asarray(times, dtype=np.float64)
    if not np.isfinite(times).all():
        raise ValueError("imbalance needs finite times")
    mean = times.mean(axis=-1)
    return np.divide(times.max(axis=-1), mean, out=np.ones_like(mean), where=mean > 0)


def balancedness(placement: Placement, loads: np.ndarray) -> np.ndarray:
    """float [L]: mean / max device tokens per layer, as vLLM's EPLB logs it (1.0 is perfect)."""
    tokens = placement.device_tokens(loads)
    peak = tokens.max(axis=1)
    return np.divide(tokens.mean(axis=1), peak, out=np.ones_like(peak), where=peak > 0)


def barrier_idle(times: np.ndarray) -> np.ndarray:
    """float [...]: share of device time spent waiting at the layer barrier, 1 - mean / max."""
    return 1.0 - 1.0 / imbalance(times)


def straggler_penalty(makespans: np.ndarray, bounds: np.ndarray) -> float:
    """sum_l T_l / sum_l LB_l - 1: how far the placement is above a proven lower bound."""
    total_bound = float(np.sum(bounds))
    if total_bound <= 0:
        return 0.0
    return float(np.sum(makespans)) / total_bound - 1.0
