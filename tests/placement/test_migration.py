import numpy as np
import pytest

from placement.device_model import DeviceModel
from placement.metrics import makespan
from placement.migration import Drop, migration_plan, predicted_gain, worth_moving
from placement.placement import Placement
from placement.rebalance import Move

DEVICES = [DeviceModel(1e-3, 0.0, 1e-5), DeviceModel(1e-3, 0.0, 2e-5)]  # device 1 twice as slow per token


def _held(placement):
    return {(layer, expert, int(g)) for layer in range(placement.num_layers)
            for expert in range(placement.num_experts) for g in placement.devices_of(layer, expert)}


def _random_placement(rng, num_layers, num_experts, num_devices, replicas):
    """Random device-major placement with `replicas` extra slots per device, replicas on any device."""
    slots = num_experts // num_devices + replicas
    phy2log = np.empty((num_layers, slots * num_devices), dtype=np.int64)
    for layer in range(num_layers):
        extra = rng.integers(0, num_experts, replicas * num_devices)
        phy2log[layer] = rng.permutation(np.concatenate([np.arange(num_experts), extra]))
    counts = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
    share = 1.0 / np.take_along_axis(counts, phy2log, axis=1)
    slot_device = np.repeat(np.arange(num_devices), slots)
    return Placement(phy2log, slot_device, share, num_experts, num_devices)


def test_same_placement_moves_nothing():
    p = Placement.from_expert_devices(np.array([[0, 0, 1, 1], [1, 0, 1, 0]]), 2)
    plan = migration_plan(p, p, 1000)
    assert plan.moves == () and plan.drops == () and plan.num_moves == 0 and plan.bytes_moved == 0
    np.testing.assert_array_equal(plan.moved_slot_fraction, [0.0, 0.0])


def test_a_swap_is_two_moves_and_two_drops():
    old = Placement.from_expert_devices(np.array([[0, 0, 1, 1]]), 2)
    new = Placement.from_expert_devices(np.array([[0, 1, 0, 1]]), 2)
    plan = migration_plan(old, new, 1000)
    assert plan.moves == (Move(0, 1, 0, 1), Move(0, 2, 1, 0))
    assert plan.drops == (Drop(0, 1, 0), Drop(0, 2, 1))
    assert plan.bytes_moved == 2000
    np.testing.assert_allclose(plan.moved_slot_fraction, [0.5])


def test_sources_spread_over_the_holders():
    # Experts 0 and 1 are held by devices 0 and 1; device 2 needs both: one is fetched from each.
    old = Placement(np.array([[0, 1, 0, 1, 2, 3]]), np.array([0, 0, 1, 1, 2, 2]),
                    np.array([[0.5, 0.5, 0.5, 0.5, 1, 1]]), 4, 3)
    new = Placement(np.array([[2, 3, 2, 3, 0, 1]]), np.array([0, 0, 1, 1, 2, 2]),
                    np.array([[0.5, 0.5, 0.5, 0.5, 1, 1]]), 4, 3)
    plan = migration_plan(old, new, 1)
    to_two = [m for m in plan.moves if m.dst_device == 2]
    assert sorted(m.src_device for m in to_two) == [0, 1]
    for move in plan.moves:  # devices 0 and 1 fetch 2 and 3 from device 2, the only holder
        if move.dst_device != 2:
            assert move.src_device == 2


@pytest.mark.parametrize("seed", range(5))
def test_moves_and_drops_turn_old_into_new(seed):
    rng = np.random.default_rng(seed)
    old = _random_placement(rng, 3, 16, 4, replicas=1)
    new = _random_placement(rng, 3, 16, 4, replicas=1)
    plan = migration_plan(old, new, 7)
    held, old_held = _held(old), _held(old)
    for move in plan.moves:
        assert (move.layer, move.expert, move.src_device) in old_held
        assert (move.layer, move.expert, move.dst_device) not in old_held
        held.add((move.layer, move.expert, move.dst_device))
    for drop in plan.drops:
        held.remove((drop.layer, drop.expert, drop.device))
    assert held == _held(new)
    assert len(set(plan.moves)) == plan.num_moves  # each copy once
    per_layer = np.bincount([m.layer for m in plan.moves], minlength=3) / new.num_slots
    np.testing.assert_allclose(plan.moved_slot_fraction, per_layer)


def test_predicted_gain_and_worth_moving():
    loads = np.array([[100.0, 10.0, 10.0, 10.0]])
    slow_hot = Placement.from_expert_devices(np.array([[1, 0, 0, 1]]), 2)  # hot expert on the slow device
    fast_hot = Placement.from_expert_devices(np.array([[0, 1, 1, 0]]), 2)
    per_pass = float(makespan(slow_hot, loads, DEVICES)[0] - makespan(fast_hot, loads, DEVICES)[0])
    assert per_pass > 0
    assert predicted_gain(slow_hot, fast_hot, loads, DEVICES, 10) == pytest.approx(10 * per_pass)
    assert predicted_gain(fast_hot, slow_hot, loads, DEVICES, 10) == pytest.approx(-10 * per_pass)
    assert predicted_gain(slow_hot, slow_hot, loads, DEVICES, 10) == 0.0
    # All four experts move: 4 copies of 1000 bytes. Gain over 100 passes vs 4000 B at a bandwidth
    # where the transfer takes half, or twice, that gain.
    gain = 100 * per_pass
    kwargs = {"passes": 100, "expert_bytes": 1000}
    fast, slow = 4000 / (gain / 2), 4000 / (gain * 2)
    assert worth_moving(slow_hot, fast_hot, loads, DEVICES, bandwidth_bytes_per_s=fast, **kwargs)
    assert not worth_moving(slow_hot, fast_hot, loads, DEVICES, bandwidth_bytes_per_s=slow, **kwargs)
    assert not worth_moving(fast_hot, slow_hot, loads, DEVICES, bandwidth_bytes_per_s=1e18, **kwargs)


def test_bad_input():
    two = Placement.from_expert_devices(np.array([[0, 1]]), 2)
    three = Placement.from_expert_devices(np.array([[0, 1]]), 3)
    with pytest.raises(ValueError, match="differ"):
        migration_plan(two, three, 1)
    with pytest.raises(ValueError, match="expert_bytes"):
        migration_plan(two, two, -1)
    with pytest.raises(ValueError, match="passes"):
        predicted_gain(two, two, np.ones((1, 2)), DEVICES, -1)
    with pytest.raises(ValueError, match="bandwidth"):
        worth_moving(two, two, np.ones((1, 2)), DEVICES, passes=1, bandwidth_bytes_per_s=0, expert_bytes=1)
