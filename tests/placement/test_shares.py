"""`shares.balanced_shares`: replica token shares that minimise each layer's makespan, slots kept."""

import importlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from placement.bounds import exact_makespan
from placement.device_model import DeviceModel
from placement.metrics import device_times, makespan
from placement.placement import Placement
from placement.policies import plan
from placement.rebalance import rebalance
from placement.shares import MIN_SHARE, balanced_shares
from tests.placement.test_policies import SETTINGS, activity_for, cases, check_invariants, devices_of

rebalance_module = importlib.import_module("placement.rebalance")  # (the package exports a function of that name)

BASE = DeviceModel(fixed=2e-4, knee=128, slope=2e-4 / 128)
SLOPE = BASE.slope


def without_balancing(monkeypatch) -> None:
    monkeypatch.setattr(rebalance_module, "balanced_shares", lambda placement, *args: placement)


def test_a_replica_beside_a_hot_expert_gives_its_tokens_to_the_other_device(monkeypatch):
    """Expert 0 (1000 tokens) on both of two equal devices, expert 1 (600) beside one replica, expert 2 (no load)
    beside the other. Shares by speed split expert 0 in halves: 500 + 600 tokens on one device, 1100 slope-tokens
    (f = 128 slope-tokens each call past the knee). Balanced, the device beside expert 1 keeps x with
    2 f + slope (x - 128 + 600 - 128) = f + slope (1000 - x - 128): x = 200, both devices at 800."""
    loads = np.array([[1000.0, 600.0, 0.0]])
    devices = [BASE, BASE]
    placement = plan(loads, devices, "vibe", num_redundant=1, slot_budget=2)
    hot = placement.phy2log[0] == 0
    beside_one = placement.slot_device[0, hot] == placement.slot_device[0, placement.phy2log[0] == 1][0]
    assert placement.slot_tokens(loads)[0, hot][beside_one][0] == pytest.approx(200.0)
    np.testing.assert_allclose(device_times(placement, loads, devices)[0], 800 * SLOPE, rtol=1e-6)
    assert makespan(placement, loads, devices)[0] == pytest.approx(exact_makespan(loads, devices, num_redundant=1)[0],
                                                                   rel=1e-6)
    without_balancing(monkeypatch)
    by_speed = plan(loads, devices, "vibe", num_redundant=1, slot_budget=2)  # shares by device speed: halves
    assert makespan(by_speed, loads, devices)[0] == pytest.approx(1100 * SLOPE)


def test_a_hot_expert_on_every_device_ends_them_together(monkeypatch):
    """Expert 0 on all four devices (two at half speed) with seven flat-cost experts around it: its shares make
    every device finish at once, which shares by device speed alone did not (they ignore the singletons)."""
    loads = np.array([[5000.0, 100, 100, 100, 100, 100, 100, 100]])
    devices = devices_of([1.0, 0.5, 1.0, 0.5])
    placement = plan(loads, devices, "vibe", num_redundant=4)
    assert np.unique(placement.slot_device[0, placement.phy2log[0] == 0]).size == 4
    times = device_times(placement, loads, devices)[0]
    np.testing.assert_allclose(times, times.max(), rtol=1e-6)
    without_balancing(monkeypatch)
    by_speed = plan(loads, devices, "vibe", num_redundant=4)
    assert makespan(placement, loads, devices)[0] < makespan(by_speed, loads, devices)[0] * (1 - 1e-3)


@SETTINGS
@given(cases(), st.integers(0, 2**32 - 1), st.sampled_from([None, 1e-2, 1.0]))
def test_balancing_never_slows_a_layer_and_keeps_the_slots(case, seed, activity_scale):
    loads, devices, num_redundant = case
    activity = None
    if activity_scale is not None:
        loads = loads * activity_scale
        activity = activity_for(loads, np.random.default_rng(seed))
    # from EPLB's equal shares: vibe's own plans come balanced already (none of 200 such cases changed)
    start = plan(loads, devices, "eplb", num_redundant=num_redundant, activity=activity)
    balanced = balanced_shares(start, loads, devices, activity)
    np.testing.assert_array_equal(balanced.phy2log, start.phy2log)
    np.testing.assert_array_equal(balanced.slot_device, start.slot_device)
    check_invariants(balanced, loads, len(devices), num_redundant)
    assert balanced.replica_share.min() >= MIN_SHARE * (1 - 1e-9)
    before, after = makespan(start, loads, devices, activity), makespan(balanced, loads, devices, activity)
    assert np.all(after <= before)
    changed = np.any(balanced.replica_share != start.replica_share, axis=1)
    assert np.all(after[changed] < before[changed])  # a layer's shares change only where it gets faster


def test_without_replicas_or_loads_the_placement_is_returned_as_is():
    devices = devices_of([1.0, 0.8])
    loads = np.array([[10.0, 20.0, 30.0, 40.0]])
    alone = plan(loads, devices, "eplb")
    assert balanced_shares(alone, loads, devices) is alone
    idle = Placement(np.array([[0, 1, 0, 1]]), np.array([[0, 0, 1, 1]]), np.full((1, 4), 0.5), 2, 2)
    assert balanced_shares(idle, np.zeros((1, 2)), devices) is idle


def test_rebalance_re_splits_shares_for_new_loads_without_moving_weights():
    """The incremental solver kept every replica's share: with swaps capped at 0 it could do nothing for a layer
    whose hot expert sits beside a replica; now it re-splits the shares (no weight moves) to the LP optimum."""
    placement = Placement(np.array([[0, 1, 0, 2]]), np.array([[0, 0, 1, 1]]), np.array([[0.5, 1.0, 0.5, 1.0]]), 3, 2)
    loads = np.array([[1000.0, 600.0, 0.0]])
    new, moves = rebalance(placement, loads, [BASE, BASE], eps=0.0, max_swaps_per_layer=0)
    assert moves == [] and new.version == placement.version + 1
    np.testing.assert_array_equal(new.phy2log, placement.phy2log)
    np.testing.assert_array_equal(new.slot_device, placement.slot_device)
    np.testing.assert_allclose(new.replica_share, [[0.2, 1.0, 0.8, 1.0]], rtol=1e-6)
    assert makespan(new, loads, [BASE, BASE])[0] == pytest.approx(800 * SLOPE)
    assert makespan(placement, loads, [BASE, BASE])[0] == pytest.approx(1100 * SLOPE)


def test_a_fresh_plan_is_left_as_it_is_by_the_incremental_solver():
    """The review's case: the LP has many optima, and a layer took other shares for a gain of 2.2e-19 s, so
    `rebalance` on the loads the plan was made for returned a new version (a share moved by 0.30) with no moves."""
    loads = np.array([[321, 526, 577, 956, 321, 1023, 1463, 72, 117, 675],
                      [94, 1400, 188, 181, 454, 6280, 99, 363, 156, 759],
                      [322, 355, 664, 288, 397, 711, 365, 281, 133, 632.0]])
    devices = devices_of([0.87607053, 0.91330977, 0.89422189, 0.76042252, 0.93082779])
    fresh = plan(loads, devices, "vibe", num_redundant=5)
    assert rebalance(fresh, loads, devices, max_swaps_per_layer=0)[0] is fresh
    assert rebalance(fresh, loads, devices, eps=0.0, max_moved_fraction=None)[0] is fresh


@pytest.mark.parametrize("activity", [0.3, 0.6, 1.0])
def test_with_activity_the_split_is_the_best_of_a_grid(activity):
    """Two devices whose flat cost is not the slope's continuation (fixed != slope x knee, where scaling fixed
    and knee by the activity matters), expert 0 on both, a singleton beside one replica: the LP's split is
    at least as good as the best of 2001 splits, timed as `metrics.makespan` times them."""
    fast, slow = DeviceModel(3e-4, 64, 1e-6), DeviceModel(2e-4, 32, 3e-6)
    loads = np.array([[900.0, 300.0, 0.0]])
    act = np.array([[activity, min(activity, 0.9), 0.0]])
    start = Placement(np.array([[0, 1, 0, 2]]), np.array([[0, 0, 1, 1]]), np.array([[0.5, 1.0, 0.5, 1.0]]), 3, 2)
    balanced = balanced_shares(start, loads, [fast, slow], act)
    grid = [makespan(Placement(start.phy2log, start.slot_device, np.array([[x, 1.0, 1 - x, 1.0]]), 3, 2), loads,
                     [fast, slow], act)[0] for x in np.linspace(MIN_SHARE, 1 - MIN_SHARE, 2001)]
    assert makespan(balanced, loads, [fast, slow], act)[0] <= min(grid) * (1 + 1e-6)
    assert makespan(balanced, loads, [fast, slow], act)[0] < makespan(start, loads, [fast, slow], act)[0]
