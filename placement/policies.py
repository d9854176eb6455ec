"""The public entry to the placement policies: `plan(loads, devices, policy)`.

Owns input validation, the `contiguous` layout (vLLM's default) and dispatch to `eplb` and `vibe`. Knows
nothing of when plans are made or how a placement is put into effect.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from placement.device_model import DeviceModel
from placement.eplb import eplb_placement
from placement.metrics import checked_activity, slot_calls
from placement.placement import Placement
from placement.vibe import vibe_placement

POLICIES = ("contiguous", "eplb", "vibe")


def plan(loads: np.ndarray, devices: list[DeviceModel], policy: str = "vibe", *, num_redundant: int = 0,
         slot_budget: int | Sequence[int] | None = None, activity: np.ndarray | None = None) -> Placement:
    """Place the experts of every layer on `devices` (version 0).

    Args:
        loads: float [L, E], tokens routed to each logical expert (finite, >= 0).
        devices: G device curves, one per device.
        policy: one of POLICIES.
            - "contiguous": expert e on device e // (E / G), no replicas.
            - "eplb": DeepSeek EPLB's global policy (token counts only, see `eplb`).
            - "vibe": predicted-time placement with local search, never worse than "eplb" per layer
              when EPLB keeps replicas on distinct devices (see `vibe`).
        num_redundant: extra slots for replicas of hot experts; >= 0 and a multiple of G, except for
            "vibe" with a slot_budget (which may leave devices with uneven slot counts).
        slot_budget: most slots per device, one int for all or G ints. "vibe" may then hold uneven slot
            counts per device (total E + num_redundant); the other policies need every budget >= R / G
            and keep R / G slots per device. None: exactly R / G slots per device.
        activity: float [L, E] in [0, 1], the share of forward passes that route tokens to each expert
            (> 0 where loads are). "vibe" then compares expected seconds per pass (`metrics.slot_calls`)
            instead of seconds at the mean loads; the others count tokens and ignore it.
    Raises:
        ValueError naming the bad value for bad input.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    loads = checked_loads(loads)
    activity = checked_activity(activity, loads)
    num_devices = checked_devices(devices)
    num_experts = loads.shape[1]
    if not isinstance(num_redundant, int | np.integer) or num_redundant < 0:
        raise ValueError(f"num_redundant must be an int >= 0, got {num_redundant!r}")
    num_slots = num_experts + num_redundant
    capacity = checked_budget(slot_budget, num_devices, num_slots)
    uneven_allowed = policy == "vibe" and capacity is not None
    if not uneven_allowed and num_redundant % num_devices:
        raise ValueError(f"num_redundant={num_redundant} must be a multiple of G={num_devices} for policy "
                         f"{policy!r}" + ("" if policy != "vibe" else " without slot_budget"))
    if not uneven_allowed and num_experts % num_devices:
        raise ValueError(f"E={num_experts} experts must be divisible by G={num_devices} devices for policy "
                         f"{policy!r}" + ("" if policy != "vibe" else " without slot_budget"))
    if policy != "vibe" and capacity is not None and np.any(capacity < num_slots // num_devices):
        raise ValueError(f"slot_budget {slot_budget!r} is below the {num_slots // num_devices} slots per "
                         f"device that policy {policy!r} needs")
    room = np.full(num_devices, num_slots // num_devices) if capacity is None else capacity
    distinct_room = int(np.minimum(room, num_experts).sum())  # a device holds each expert at most once
    if policy == "vibe" and num_slots > distinct_room:
        raise ValueError(f"num_redundant={num_redundant} is too many: 'vibe' keeps replicas of an expert on "
                         f"distinct devices, so {num_experts} experts fill at most {distinct_room} of these slots")
    if policy == "contiguous":
        if num_redundant:
            raise ValueError(f"policy 'contiguous' has no redundant experts, got num_redundant={num_redundant}")
        return contiguous_placement(loads.shape[0], num_experts, num_devices)
    if policy == "eplb":
        return eplb_placement(loads, num_devices, num_redundant)
    fixed, slope = max(device.fixed for device in devices), max(device.slope for device in devices)
    with np.errstate(over="ignore"):
        # the times of all a layer's slots together are at most a fixed cost per slot and all the layer's tokens on
        # the steepest slope (`slot_calls`: calls <= 1 per slot, calls * tokens per call = the slot's tokens); a
        # slot's tokens per call are at most its whole expert's (load / activity: a curve is evaluated there first)
        total = loads.sum(axis=1).max()
        per_call = slot_calls(loads, activity)[1].max()
        finite = np.isfinite(total) and np.isfinite(per_call) and np.isfinite(num_slots * fixed + slope * total) \
            and all(np.isfinite(device.latency(np.array([per_call]))).all() for device in devices)
    if not finite:  # (past here the search compared infinities: misleading errors, or a plan timed at inf)
        least = "" if activity is None else f" (activity down to {activity[activity > 0].min(initial=1.0):.3g})"
        raise ValueError(f"loads up to {loads.max():.3g} tokens{least} make predicted times overflow on these devices' "
                         f"curves (fixed up to {fixed:.3g} s, slope up to {slope:.3g} s per token); scale them down")
    return vibe_placement(loads, devices, num_redundant, capacity, activity)


def contiguous_placement(num_layers: int, num_experts: int, num_devices: int) -> Placement:
    """vLLM's default layout: expert e of every layer on device e // (E / G), one slot each."""
    expert_device = np.arange(num_experts) // (num_experts // num_devices)
    return Placement.from_expert_devices(np.tile(expert_device, (num_layers, 1)), num_devices)


def checked_loads(loads) -> np.ndarray:
    array = np.asarray(loads, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"loads must be a non-empty 2-D array [L, E], got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("loads must be finite, got NaN or inf")
    if np.any(array < 0):
        raise ValueError(f"loads must be >= 0, got minimum {array.min()!r}")
    return array


def checked_devices(devices) -> int:
    if len(devices) == 0 or not all(isinstance(d, DeviceModel) for d in devices):
        raise ValueError(f"devices must be a non-empty list of DeviceModel, got {devices!r}")
    return len(devices)


def checked_budget(slot_budget, num_devices: int, num_slots: int) -> np.ndarray | None:
    """int [G] slots each device may hold (capped at R), or None without a budget."""
    if slot_budget is None:
        return None
    budget = np.broadcast_to(np.asarray(slot_budget), (num_devices,)) if np.ndim(slot_budget) == 0 \
        else np.asarray(slot_budget)
    if budget.shape != (num_devices,) or not np.issubdtype(budget.dtype, np.integer) or np.any(budget < 0):
        raise ValueError(f"slot_budget must be an int >= 0 or {num_devices} ints >= 0, got {slot_budget!r}")
    if budget.sum() < num_slots:
        raise ValueError(f"slot_budget {slot_budget!r} holds {int(budget.sum())} slots, fewer than "
                         f"E + num_redundant = {num_slots}")
    return np.minimum(budget, num_slots).astype(np.int64)
