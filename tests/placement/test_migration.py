import numpy as np
import pytest

from load_tests.headroom import draw_steps
from placement.device_model import DeviceModel
from placement.metrics import device_times, makespan, pass_critical_paths
from placement.migration import Drop, held_out_gain, migration_plan, predicted_gain, worth_moving
from placement.placement import Placement
from placement.policies import plan
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


def _routed(rng, shares, tokens, passes):
    """[passes, L, E] router counts: `tokens` tokens per pass, each to 2 distinct experts per layer drawn
    by `shares` [L, E] (the benchmarks' routing simulator)."""
    return draw_steps(shares, tokens, 2, passes, rng)


def _statistics(passes):
    """(mean router counts per pass, share of passes with tokens), as the coordinator's window gives them."""
    return passes.mean(axis=0), (passes > 0).mean(axis=0)


CURVED = [DeviceModel(2e-4, 4.0, 2e-5 * (1 + 0.1 * g)) for g in range(4)]  # flat up to 4 tokens, then linear


def test_pass_critical_paths_match_device_times_pass_by_pass():
    rng = np.random.default_rng(0)
    placement = _random_placement(rng, 3, 8, 4, 0)
    passes = rng.poisson(rng.gamma(0.5, 4.0, size=(7, 3, 8))).astype(float)
    expected = [device_times(placement, counts, CURVED).max(axis=1).sum() for counts in passes]
    np.testing.assert_allclose(pass_critical_paths(placement, passes, CURVED), expected, rtol=1e-12)
    assert pass_critical_paths(placement, passes[:0], CURVED).shape == (0,)
    with pytest.raises(ValueError, match=r"\[N, L, E\]"):
        pass_critical_paths(placement, passes[0], CURVED)
    with pytest.raises(ValueError, match="whole numbers"):
        pass_critical_paths(placement, passes + 0.5, CURVED)


@pytest.mark.parametrize("replicas", [1, 2])
def test_pass_critical_paths_split_replicas_as_the_engine_dispatches(replicas):
    """Each replica is timed at the whole tokens the engine's dispatch gives it (service.dispatch), not at
    its fractional share: the held-out judge charged every replica of an expert with a token a call."""
    from placement.metrics import curve_params, latency_on
    from service.dispatch import _Routes

    rng = np.random.default_rng(replicas)
    even = _random_placement(rng, 3, 8, 4, replicas)
    share = rng.uniform(0.2, 1.0, even.phy2log.shape)  # uneven shares, so rounding matters
    share /= np.take_along_axis(np.stack([np.bincount(row, weights=w, minlength=8)
                                          for row, w in zip(even.phy2log, share)]), even.phy2log, axis=1)
    placement = Placement(even.phy2log, even.slot_device, share, 8, 4)
    passes = rng.poisson(rng.gamma(0.5, 4.0, size=(20, 3, 8))).astype(float)
    routes = _Routes(placement, dict.fromkeys(range(4)), workers_epoch=0).layers  # the engine's lookups
    params = curve_params(CURVED)
    expected = []
    for counts in passes:
        tokens = np.stack([np.bincount(routes[layer].slots(np.repeat(np.arange(8), counts[layer].astype(int))),
                                       minlength=placement.num_slots) for layer in range(3)])
        times = placement.per_device(latency_on(tokens.astype(float), placement.slot_device, params))
        expected.append(times.max(axis=1).sum())
    np.testing.assert_allclose(pass_critical_paths(placement, passes, CURVED), expected, rtol=1e-12)


def test_one_token_calls_one_replica():
    """The audit's decode pass: expert 0 on both devices, one token to each expert. The engine calls one
    replica of expert 0: one call per device, 1 ms; shares of 0.5 charged both, 2 ms on device 1."""
    devices = [DeviceModel(fixed=1e-3, knee=128, slope=1e-5)] * 2
    replicated = Placement(np.array([[0, 0, 1]]), np.array([0, 1, 1]), np.array([[0.5, 0.5, 1.0]]), 2, 2)
    np.testing.assert_allclose(pass_critical_paths(replicated, np.array([[[1.0, 1.0]]]), devices), [1e-3])
    np.testing.assert_allclose(pass_critical_paths(replicated, np.array([[[3.0, 0.0]]]), devices), [1e-3])


def _vibe(loads, activity):
    return plan(loads, CURVED, "vibe", activity=activity)


def test_held_out_gain_sees_no_gain_in_resampled_traffic_that_in_sample_judging_sees():
    """The window is drawn from the routing the placement in service was planned for: a plan fitted to the
    window looks faster on it every time, measured on passes it did not see it is not."""
    rng = np.random.default_rng(0)
    shares = rng.dirichlet(np.full(16, 2.0), size=3)
    old = _vibe(*_statistics(_routed(rng, shares, 4, 2000)))
    in_sample, held_out = [], []
    for _ in range(10):
        window = _routed(rng, shares, 4, 100)
        loads, activity = _statistics(window)
        in_sample.append(predicted_gain(old, _vibe(loads, activity), loads, CURVED, 1, activity))
        held_out.append(held_out_gain(old, _vibe, window, CURVED))
    assert min(in_sample) > 0
    assert sum(g.lower(2.0) > 0 for g in held_out) <= 1
    assert np.mean([g.per_pass_s for g in held_out]) < 0.2 * np.mean(in_sample)
    assert all(g.passes == 100 and g.stderr_s > 0 for g in held_out)


def test_held_out_gain_finds_a_real_change_of_routing():
    rng = np.random.default_rng(1)
    before, after = rng.dirichlet(np.full(16, 0.5), size=(2, 3))
    old = _vibe(*_statistics(_routed(rng, before, 4, 500)))
    for _ in range(3):
        gain = held_out_gain(old, _vibe, _routed(rng, after, 4, 100), CURVED)
        assert gain.lower(2.0) > 0
        assert gain.per_pass_s > 0.05 * pass_critical_paths(old, _routed(rng, after, 4, 100), CURVED).mean()


def test_held_out_gain_plans_on_each_half_and_times_the_other():
    rng = np.random.default_rng(2)
    window = _routed(rng, rng.dirichlet(np.ones(16), size=3), 4, 11)
    window = np.insert(window, 3, 0.0, axis=0)  # a pass without load is left out
    old = _vibe(window.mean(axis=0), (window > 0).mean(axis=0))
    planned_on = []

    def replan(loads, activity):
        planned_on.append(loads)
        return old

    gain = held_out_gain(old, replan, window, CURVED)
    loaded = np.delete(window, 3, axis=0)
    np.testing.assert_allclose(planned_on, [loaded[0::2].mean(axis=0), loaded[1::2].mean(axis=0)])
    assert (gain.per_pass_s, gain.stderr_s, gain.passes) == (0.0, 0.0, 11)
    with pytest.raises(ValueError, match="two passes with load"):
        held_out_gain(old, replan, window[:1], CURVED)
    with pytest.raises(ValueError, match=r"\[N, L, E\]"):
        held_out_gain(old, replan, window[0], CURVED)


@pytest.mark.parametrize("expert_bytes", [float("nan"), 1.5, -1])
def test_migration_plans_take_whole_bytes(expert_bytes):
    placement = plan(np.ones((1, 4)), [DeviceModel(2e-4, 128, 1e-6)] * 2, "eplb")
    with pytest.raises(ValueError, match="expert_bytes"):
        migration_plan(placement, placement, expert_bytes)
