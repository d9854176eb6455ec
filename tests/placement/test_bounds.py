"""lower_bound and exact_makespan: the bound holds for every placement, the MILP is the optimum."""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from placement.bounds import exact_makespan, lower_bound, split_cost
from placement.device_model import DeviceModel
from placement.metrics import curve_params, makespan
from placement.placement import Placement
from placement.policies import plan

BASE = DeviceModel(fixed=2e-4, knee=128, slope=2e-4 / 128)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
curves = st.builds(DeviceModel, fixed=st.floats(0, 1e-3), knee=st.floats(0, 512), slope=st.floats(0, 1e-5))


@SETTINGS
@given(st.lists(curves, min_size=1, max_size=4), st.one_of(st.just(0.0), st.floats(1e-3, 5000)),
       st.floats(1e-6, 1.0))
def test_split_cost_never_exceeds_the_cost_of_a_share(devices, tokens, share):
    """f_g(x W) >= x h_g(W): splitting an expert can never beat the bound's cost of it."""
    params = curve_params(devices)
    h = split_cost(np.array([tokens]), params)[0]
    f = np.array([d.latency(share * tokens) for d in devices])
    assert np.all(f >= share * h * (1 - 1e-12) - 1e-18)
    np.testing.assert_allclose(split_cost(np.array([0.0]), params)[0], 0.0)


@st.composite
def random_placements(draw):
    """(placement, loads, devices, num_redundant, slot_budget) with random devices, replicas and shares."""
    num_devices = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    num_experts = int(rng.integers(1, 13))
    budget = rng.integers(1, 6, num_devices) if draw(st.booleans()) else None
    per_device = int(rng.integers(1, 4))
    capacity = budget if budget is not None else np.full(num_devices, per_device)
    num_experts = min(num_experts, int(capacity.sum()))
    num_slots = int(capacity.sum()) if budget is None else int(rng.integers(num_experts, capacity.sum() + 1))
    # any slot layout within the capacities, every expert at least once, then random shares
    free = np.repeat(np.arange(num_devices), capacity)
    slot_device = np.sort(rng.choice(free, size=num_slots, replace=False))
    phy2log = rng.permutation(np.concatenate([np.arange(num_experts),
                                              rng.integers(0, num_experts, num_slots - num_experts)]))
    share = rng.uniform(0.05, 1.0, num_slots)
    share /= np.bincount(phy2log, weights=share)[phy2log]
    placement = Placement(phy2log[None], slot_device[None], share[None], num_experts, num_devices)
    loads = np.round(rng.lognormal(3, 1.5, (1, num_experts)) * rng.choice([0.1, 1, 20]))
    loads[rng.random(loads.shape) < 0.15] = 0
    devices = [BASE.scaled(f) for f in rng.uniform(1, 1.4, num_devices)]
    if draw(st.booleans()):  # a fitted curve need not continue its flat part: slope above fixed / knee
        devices = [DeviceModel(d.fixed, d.knee, d.slope * rng.uniform(0.5, 3)) for d in devices]
    return placement, loads, devices, num_slots - num_experts, None if budget is None else budget.tolist()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_placements())
def test_lower_bound_holds_for_any_placement(case):
    placement, loads, devices, num_redundant, budget = case
    bound = lower_bound(loads, devices, num_redundant=num_redundant, slot_budget=budget)
    assert np.all(bound <= makespan(placement, loads, devices) * (1 + 1e-9))


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**32 - 1), st.booleans())
def test_bound_below_milp_below_vibe(num_devices, per_device, seed, replicate):
    rng = np.random.default_rng(seed)
    num_experts = num_devices * per_device
    loads = np.round(rng.lognormal(4, 1.3, (2, num_experts)) * rng.choice([0.1, 1, 10]))
    devices = [BASE.scaled(f) for f in rng.uniform(1, 1.3, num_devices)]
    num_redundant = num_devices if replicate and num_devices > 1 else 0
    bound = lower_bound(loads, devices, num_redundant=num_redundant)
    optimum = exact_makespan(loads, devices, num_redundant=num_redundant)
    vibe = makespan(plan(loads, devices, "vibe", num_redundant=num_redundant), loads, devices)
    assert np.all(bound <= optimum * (1 + 1e-9))
    assert np.all(optimum <= vibe * (1 + 1e-9))


@pytest.mark.parametrize("seed", range(6))
def test_milp_matches_brute_force_without_replicas(seed):
    rng = np.random.default_rng(seed)
    num_devices, per_device = int(rng.integers(2, 4)), 2
    num_experts = num_devices * per_device
    loads = np.round(rng.lognormal(4, 1.2, (1, num_experts)))
    devices = [BASE.scaled(f) for f in rng.uniform(1, 1.5, num_devices)]
    best = np.inf
    for assignment in itertools.product(range(num_devices), repeat=num_experts):
        if np.all(np.bincount(assignment, minlength=num_devices) == per_device):
            placement = Placement.from_expert_devices(np.array([assignment]), num_devices)
            best = min(best, float(makespan(placement, loads, devices)[0]))
    assert exact_makespan(loads, devices)[0] == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("num_devices, num_redundant", [(1, 1), (2, 4)])
def test_exact_makespan_refuses_more_slots_per_device_than_experts_with_replicas(num_devices, num_redundant):
    """Replicas sit on distinct devices, so a device cannot fill more slots than there are experts: the MILP was
    infeasible, a bare AssertionError (a TypeError under python -O) where vibe names the problem (a review)."""
    with pytest.raises(ValueError, match="exceed E=2"):
        exact_makespan(np.array([[10.0, 5.0]]), [BASE] * num_devices, num_redundant=num_redundant)


def test_exact_makespan_holds_when_one_pair_costs_a_billion_times_the_optimum():
    """The MILP ran in units of the costliest (expert, device) pair: 6e10 s here, a billion times the optimum, left
    HiGHS's tolerances wider than the differences that decide it, and 'the optimum' was 4.3x what vibe achieves (a
    review). In units of a greedy placement's makespan it is the optimum again."""
    loads = np.array([[1943472058.0, 810975742188.0, 0.0, 50957.0, 4604740646.0, 116883.0, 101263377.0, 1965.0,
                       835009985.0, 140109.0, 1262.0, 782241055818.0]])
    devices = [DeviceModel(4.465893960543574e-07, 1e6, 1.5892591040609782e-11),
               DeviceModel(5.854113816831217e-05, 1e6, 0.07697964971835128),
               DeviceModel(0.0005793091962071897, 128.0, 4.9048456457944075e-11),
               DeviceModel(0.009244194183578525, 1e6, 5.769328238968814e-12)]
    achieved = makespan(plan(loads, devices, "vibe"), loads, devices)[0]
    assert lower_bound(loads, devices)[0] <= exact_makespan(loads, devices)[0] <= achieved * (1 + 1e-9)


def test_replicas_can_only_lower_the_optimum():
    loads = np.array([[3000.0, 200, 100, 50]])
    devices = [BASE, BASE.scaled(1.2)]
    without = exact_makespan(loads, devices)[0]
    with_replicas = exact_makespan(loads, devices, num_redundant=2)[0]
    assert with_replicas < without
    assert lower_bound(loads, devices, num_redundant=2)[0] <= with_replicas


@pytest.mark.filterwarnings("error")  # the MILPs scaled by the costliest expert, 0 here: NaN rows, a warning
@pytest.mark.parametrize("num_redundant", [0, 2])
def test_exact_makespan_of_devices_that_cost_nothing_is_zero(num_redundant):
    free = [DeviceModel(0.0, 0.0, 0.0)] * 2
    loads = np.array([[5.0, 3.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert exact_makespan(loads, free, num_redundant=num_redundant).tolist() == [0.0, 0.0]


def test_bound_is_the_fluid_split_for_linear_identical_devices():
    linear = DeviceModel(fixed=0.0, knee=0.0, slope=1e-6)
    loads = np.full((3, 16), 1000.0)
    np.testing.assert_allclose(lower_bound(loads, [linear] * 4), 16 * 1000 * 1e-6 / 4, rtol=1e-9)


def test_heaviest_expert_bounds_the_layer_without_replicas():
    loads = np.array([[10000.0] + [10.0] * 7])
    devices = [BASE, BASE.scaled(1.3)]
    bound = lower_bound(loads, devices)[0]
    # the hot expert sits somewhere, at best on the fast device next to three light ones
    assert bound >= (BASE.latency(10000.0) + 3 * BASE.latency(10.0)) * (1 - 1e-9)
    assert bound <= makespan(plan(loads, devices, "vibe"), loads, devices)[0]


def test_bound_does_not_depend_on_device_order():
    rng = np.random.default_rng(5)
    loads = rng.lognormal(5, 1, (2, 24))
    devices = [BASE.scaled(f) for f in (1.0, 1.0, 1.1, 1.3, 1.3, 1.0)]
    order = [4, 0, 2, 5, 1, 3]
    np.testing.assert_allclose(lower_bound(loads, devices), lower_bound(loads, [devices[i] for i in order]),
                               rtol=1e-7)


def test_lower_bound_with_budget_and_replicas_stays_below_vibe():
    rng = np.random.default_rng(7)
    loads = rng.lognormal(5, 1.2, (3, 20))
    devices = [BASE.scaled(f) for f in np.linspace(1, 1.3, 4)]
    for redundant, budget in [(0, 7), (3, [8, 7, 6, 6]), (4, None)]:
        vibe = makespan(plan(loads, devices, "vibe", num_redundant=redundant, slot_budget=budget), loads, devices)
        assert np.all(lower_bound(loads, devices, num_redundant=redundant, slot_budget=budget) <= vibe)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: exact_makespan(np.ones((1, 20)), [BASE] * 4), "E <= 16"),
        (lambda: exact_makespan(np.ones((1, 10)), [BASE] * 5), "G <= 4"),
        (lambda: lower_bound(np.ones((1, 6)), [BASE] * 4), "divisible"),
        (lambda: lower_bound(np.ones((1, 8)), [BASE] * 4, num_redundant=-1), "num_redundant"),
        (lambda: lower_bound(np.ones((1, 8)), [BASE] * 4, slot_budget=1), "slot_budget"),
        (lambda: lower_bound(-np.ones((1, 8)), [BASE] * 4), ">= 0"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
