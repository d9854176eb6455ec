"""plan(): input validation, the three policies' invariants, EPLB against a reference, ViBE's guarantees."""


import importlib
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from placement.bounds import exact_makespan, lower_bound
from placement.device_model import DeviceModel
from placement.metrics import makespan
from placement.placement import Placement
from placement.policies import POLICIES, plan
from placement.traces import trace_dir
from placement.vibe import greedy_devices, greedy_search, replica_counts

rebalance_module = importlib.import_module("placement.rebalance")  # (the package exports a function of that name)

TRACES = sorted(trace_dir().glob("*.npz"))
assert TRACES, f"no .npz traces in {trace_dir()}"
BASE = DeviceModel(fixed=2e-4, knee=128, slope=2e-4 / 128)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def devices_of(speeds) -> list[DeviceModel]:
    return [BASE.scaled(1.0 / s) for s in speeds]


@st.composite
def cases(draw, max_devices=6, max_per_device=5, redundant=True):
    """(loads [L, E], devices, num_redundant) with E divisible by G."""
    num_devices = draw(st.integers(1, max_devices))
    num_experts = num_devices * draw(st.integers(1, max_per_device))
    num_layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1.0, 30.0, 400.0]))
    loads = np.round(rng.lognormal(0.0, 1.2, (num_layers, num_experts)) * scale)
    loads[rng.random(loads.shape) < 0.1] = 0.0  # some experts get nothing
    speeds = rng.uniform(0.75, 1.0, num_devices)
    most = min(2, num_experts * (num_devices - 1) // num_devices)  # vibe keeps replicas on distinct devices
    num_redundant = num_devices * draw(st.integers(0, most)) if redundant else 0
    return loads, devices_of(speeds), num_redundant


def check_invariants(placement: Placement, loads, num_devices, num_redundant, capacity=None):
    num_layers, num_experts = loads.shape
    num_slots = num_experts + num_redundant
    assert placement.version == 0
    assert placement.phy2log.shape == (num_layers, num_slots)
    assert np.all(placement.logcnt >= 1)  # every logical expert placed
    share_sum = np.zeros(loads.shape)
    np.add.at(share_sum, (np.repeat(np.arange(num_layers), num_slots), placement.phy2log.ravel()),
              placement.replica_share.ravel())
    np.testing.assert_allclose(share_sum, 1.0, atol=1e-9)
    counts = placement.device_slot_counts()
    if capacity is None:
        assert np.all(counts == num_slots // num_devices)
    else:
        assert np.all(counts <= capacity)
    np.testing.assert_allclose(placement.device_tokens(loads).sum(axis=1), loads.sum(axis=1), rtol=1e-9)


def replicas_distinct(placement: Placement) -> bool:
    for layer in range(placement.num_layers):
        pairs = placement.phy2log[layer] * placement.num_devices + placement.slot_device[layer]
        if np.unique(pairs).size != pairs.size:
            return False
    return True


# --- reference EPLB, line by line after DeepSeek's eplb.py (global policy), in plain Python -----------

def reference_eplb(weight: np.ndarray, num_replicas: int, num_gpus: int) -> np.ndarray:
    out = []
    per_gpu = num_replicas // num_gpus
    for row in weight.tolist():
        num_log = len(row)
        logcnt = [1] * num_log
        phy2log = list(range(num_log))
        for _ in range(num_log, num_replicas):
            best = max(range(num_log), key=lambda e: row[e] / logcnt[e])
            phy2log.append(best)
            logcnt[best] += 1
        tokens = [row[e] / logcnt[e] for e in phy2log]
        slot_of = list(range(num_replicas))
        if per_gpu > 1:
            pack_weights, pack_items = [0.0] * num_gpus, [0] * num_gpus
            for phy in sorted(range(num_replicas), key=lambda p: -tokens[p]):
                pack = min((g for g in range(num_gpus) if pack_items[g] < per_gpu), key=pack_weights.__getitem__)
                slot_of[phy] = pack * per_gpu + pack_items[pack]
                pack_weights[pack] += tokens[phy]
                pack_items[pack] += 1
        layout = [0] * num_replicas
        for phy, slot in enumerate(slot_of):
            layout[slot] = phy2log[phy]
        out.append(layout)
    return np.array(out)


@SETTINGS
@given(cases())
def test_eplb_matches_the_reference(case):
    loads, devices, num_redundant = case
    placement = plan(loads, devices, "eplb", num_redundant=num_redundant)
    expected = reference_eplb(loads, loads.shape[1] + num_redundant, len(devices))
    np.testing.assert_array_equal(placement.phy2log, expected)
    np.testing.assert_allclose(placement.replica_share, 1.0 / np.take_along_axis(placement.logcnt, expected, 1))


@SETTINGS
@given(cases())
def test_every_policy_keeps_the_invariants(case):
    loads, devices, num_redundant = case
    for policy in POLICIES:
        redundant = 0 if policy == "contiguous" else num_redundant
        placement = plan(loads, devices, policy, num_redundant=redundant)
        check_invariants(placement, loads, len(devices), redundant)
    assert replicas_distinct(plan(loads, devices, "vibe", num_redundant=num_redundant))


@SETTINGS
@given(cases())
def test_vibe_is_never_worse_than_eplb(case):
    loads, devices, num_redundant = case
    eplb = plan(loads, devices, "eplb", num_redundant=num_redundant)
    vibe = makespan(plan(loads, devices, "vibe", num_redundant=num_redundant), loads, devices)
    # vibe keeps replicas apart; the guarantee is over EPLB layouts that do too (EPLB may co-locate)
    distinct = np.array([replicas_distinct(Placement(eplb.phy2log[[layer]], eplb.slot_device[[layer]],
                                                     eplb.replica_share[[layer]], eplb.num_experts,
                                                     eplb.num_devices)) for layer in range(len(loads))])
    reference = makespan(eplb, loads, devices)
    assert np.all(vibe[distinct] <= reference[distinct] * (1 + 1e-12))


@pytest.mark.parametrize("case", ["contiguous", "contiguous with activity", "even under a budget"])
def test_vibe_is_no_worse_than_the_contiguous_layout_or_its_own_plan_with_equal_counts(case):
    """Layers where vibe's swap/move search stopped above a trivial layout (a review's cases: 10% above the
    contiguous layout, which is optimal there; 11% with activity; 21% above its own plan with equal counts when a
    slot budget allowed uneven ones): the search also starts from those and keeps the faster."""
    activity, budget = None, None
    if case == "contiguous":
        devices = [DeviceModel(0.9050825130914611, 16.0, 0.014658467311677997),
                   DeviceModel(1.2191134301972144, 0.0, 0.00341952842466754),
                   DeviceModel(0.8227625071645437, 16.0, 0.015724740283827247)]
        loads = np.tile([4.0, 0.0, 53.0, 2.0, 2.0, 0.0, 0.0, 97.0, 1.0, 2.0, 3.0, 1.0], (8, 1))
    elif case == "contiguous with activity":
        devices = [DeviceModel(1.4517172394317968, 0.0, 0.0014), DeviceModel(1.5147586027562663, 0.0, 0.01),
                   DeviceModel(1.8583483847771176, 160.0, 0.0165)]
        loads = np.tile([384.77156406792835, 128.39520422540815, 24.0268062327304, 40.00780648673842,
                         12.099943526025694, 6.946365835815977], (4, 1))
        activity = np.tile([0.96, 0.257, 0.924, 0.28, 0.543, 0.697], (4, 1))
    else:
        devices = [DeviceModel(0.9959020759835814, 16.0, 0.002471308997072147),
                   DeviceModel(1.097984104177756, 0.0, 0.008288605633692603),
                   DeviceModel(1.1164793753465239, 16.0, 0.01684870263034881)]
        loads, budget = np.tile([22.0, 40.0, 12.0, 54.0, 141.0, 177.0], (4, 1)), 3
    vibe = makespan(plan(loads, devices, "vibe", slot_budget=budget, activity=activity), loads, devices, activity)
    other = plan(loads, devices, "vibe" if budget else "contiguous", activity=activity)
    assert np.all(vibe <= makespan(other, loads, devices, activity) * (1 + 1e-12))
    if activity is None:  # (here that layout is the optimum)
        assert vibe.sum() == pytest.approx(exact_makespan(loads, devices).sum())


def test_contiguous_is_vllm_default_layout():
    loads = np.arange(24.0).reshape(2, 12)
    placement = plan(loads, devices_of(np.ones(4)), "contiguous")
    np.testing.assert_array_equal(placement.phy2log, np.tile(np.arange(12), (2, 1)))
    np.testing.assert_array_equal(placement.slot_device[0], np.arange(12) // 3)


def small_case(seed: int):
    """One layer, E <= 16, G <= 4 (MILP size), replicas on odd seeds where they fit."""
    rng = np.random.default_rng(seed)
    num_devices = int(rng.integers(2, 5))
    num_experts = num_devices * int(rng.integers(1, 5))
    loads = np.round(rng.lognormal(0, 1.2, (1, num_experts)) * rng.choice([1.0, 30.0, 400.0]))
    loads[rng.random(loads.shape) < 0.1] = 0
    devices = devices_of(rng.uniform(0.75, 1.0, num_devices))
    num_redundant = num_devices if num_experts + num_devices <= 16 and seed % 2 else 0
    return loads, devices, num_redundant


@pytest.mark.slow
def test_vibe_is_within_the_stated_factor_of_the_milp_optimum():
    """Stated factors: 1.2 without replicas, 1.3 with (worst seen over 3,200 random small cases without
    replicas: 1.15, 99th percentile 1.045; over 1,459 with replicas, since their shares are balanced by a linear
    program: 1.243, 99th percentile 1.038, where shares by device speed saw 1.35 and 1.17). Small cases are
    where the flat part of the curve bites: a one-for-one swap cannot pair the hot expert with the unloaded
    ones. On these 120 cases the means are 1.003 and 1.0003 (1.012 with shares by device speed)."""
    ratios = {False: [], True: []}
    for seed in range(120):
        loads, devices, num_redundant = small_case(seed)
        optimum = exact_makespan(loads, devices, num_redundant=num_redundant)
        if optimum[0] > 0:
            vibe = makespan(plan(loads, devices, "vibe", num_redundant=num_redundant), loads, devices)
            ratios[num_redundant > 0].append(vibe[0] / optimum[0])
    assert max(ratios[False]) <= 1.2 and np.mean(ratios[False]) <= 1.01
    assert max(ratios[True]) <= 1.3 and np.mean(ratios[True]) <= 1.005
    assert min(min(r) for r in ratios.values()) >= 1 - 1e-9  # never below the optimum


def real_traces():
    for path in TRACES:
        with np.load(path) as data:
            yield path.stem, data["counts"].astype(np.float64)


@pytest.mark.parametrize(("name", "loads"), list(real_traces()), ids=[p.stem for p in TRACES])
def test_policies_on_every_real_trace(name, loads):
    num_experts = loads.shape[1]
    num_devices = 8 if num_experts % 8 == 0 else 4
    devices = devices_of(np.linspace(0.8, 1.0, num_devices))
    scaled = loads * (64.0 * 128 / loads.sum(axis=1, keepdims=True).clip(min=1))  # prefill-like volume
    for num_redundant in (0, num_devices):
        eplb = makespan(plan(scaled, devices, "eplb", num_redundant=num_redundant), scaled, devices)
        placement = plan(scaled, devices, "vibe", num_redundant=num_redundant)
        check_invariants(placement, scaled, num_devices, num_redundant)
        assert replicas_distinct(placement)
        vibe = makespan(placement, scaled, devices)
        assert np.all(vibe <= eplb * (1 + 1e-12)), name
        assert np.all(lower_bound(scaled, devices, num_redundant=num_redundant) <= vibe * (1 + 1e-12))
    check_invariants(plan(scaled, devices, "contiguous"), scaled, num_devices, 0)


def test_vibe_search_alone_is_within_half_a_percent_of_eplb_on_identical_devices():
    """Without the EPLB guard and without speeds to exploit, ViBE's own search still matches EPLB per layer."""
    devices = devices_of(np.ones(8))
    checked = 0
    for name, loads in real_traces():
        if loads.shape[1] % 8:
            continue
        checked += 1
        scaled = loads * (64.0 * 128 / loads.sum(axis=1, keepdims=True).clip(min=1))
        eplb = makespan(plan(scaled, devices, "eplb"), scaled, devices)
        own = makespan(greedy_search(scaled, devices, 0, None), scaled, devices)
        assert np.all(own <= eplb * 1.005), name
    assert checked >= 10


def test_vibe_puts_more_work_on_faster_devices():
    rng = np.random.default_rng(3)
    loads = rng.uniform(200, 2000, (4, 64))
    devices = devices_of([1.0] * 4 + [0.7] * 4)
    tokens = plan(loads, devices, "vibe").device_tokens(loads)
    assert np.all(tokens[:, :4].sum(axis=1) > tokens[:, 4:].sum(axis=1) * 1.2)
    eplb = makespan(plan(loads, devices, "eplb"), loads, devices)
    assert makespan(plan(loads, devices, "vibe"), loads, devices).sum() < 0.95 * eplb.sum()


def test_vibe_replicas_first_take_shares_by_device_speed(monkeypatch):
    """The search's starting shares (`speed_shares`), seen with the balancing left out; `balanced_shares` then
    re-splits them (test_shares.py)."""
    monkeypatch.setattr(rebalance_module, "balanced_shares", lambda placement, *args: placement)
    loads = np.array([[5000.0, 100, 100, 100, 100, 100, 100, 100]])
    devices = devices_of([1.0, 0.5, 1.0, 0.5])
    placement = plan(loads, devices, "vibe", num_redundant=4)
    hot = placement.phy2log[0] == 0
    speeds = np.array([1.0, 0.5, 1.0, 0.5])[placement.slot_device[0, hot]]
    np.testing.assert_allclose(placement.replica_share[0, hot], speeds / speeds.sum(), rtol=1e-9)


@SETTINGS
@given(cases(redundant=False), st.integers(0, 3), st.data())
def test_vibe_respects_uneven_slot_budgets(case, spare, data):
    loads, devices, _ = case
    num_devices, num_experts = len(devices), loads.shape[1]
    budget = [num_experts // num_devices + spare + data.draw(st.integers(0, 2)) for _ in range(num_devices)]
    fits = int(np.minimum(budget, num_experts).sum())  # replicas of one expert on distinct devices
    num_redundant = data.draw(st.integers(0, fits - num_experts))
    placement = plan(loads, devices, "vibe", num_redundant=num_redundant, slot_budget=budget)
    check_invariants(placement, loads, num_devices, num_redundant, capacity=np.array(budget))
    assert replicas_distinct(placement)


def test_uneven_budgets_get_replica_counts_that_fit_on_distinct_devices():
    """Found by the property test above: 12 slots over 4 experts on budgets [2, 2, 4, 4]. By load the
    replicas would be [4, 4, 3, 1]: the two 4s fill both small devices, and the 3 has only two devices left."""
    loads = np.array([[2.0, 3.0, 1.0, 0.0]])
    placement = plan(loads, devices_of([1.0, 0.85, 1.05, 1.0]), "vibe", num_redundant=8, slot_budget=[2, 2, 4, 4])
    check_invariants(placement, loads, 4, 8, capacity=np.array([2, 2, 4, 4]))
    assert replicas_distinct(placement)
    for budget in ([2, 2, 4, 4], [3, 3, 3, 3], [0, 4, 4, 4]):
        counts = replica_counts(loads, 12, np.array(budget), knee=0.0)[0]
        largest = np.cumsum(np.sort(counts)[::-1])  # Gale-Ryser: the k largest fit on distinct devices
        assert counts.sum() == 12 and np.all(largest <= [np.minimum(budget, k).sum() for k in range(1, 5)])
    # even budgets: the cap is one replica per device, as EPLB's rule alone would give: [4, 4, 3, 1]
    np.testing.assert_array_equal(replica_counts(loads, 12, np.array([3, 3, 3, 3]), knee=0.0), [[4, 4, 3, 1]])


def test_slot_budget_lets_vibe_empty_a_slow_device_and_fill_the_fast_ones():
    loads = np.full((2, 12), 300.0)
    devices = devices_of([1.0, 1.0, 1.0, 0.2])
    placement = plan(loads, devices, "vibe", slot_budget=[5, 5, 5, 3])
    counts = placement.device_slot_counts()
    assert np.all(counts[:, 3] < 3) and np.all(counts <= [5, 5, 5, 3])
    even = plan(loads, devices, "vibe")
    assert np.all(makespan(placement, loads, devices) < makespan(even, loads, devices))


def test_a_device_with_budget_zero_gets_nothing():
    loads = np.random.default_rng(0).uniform(0, 500, (3, 10))
    placement = plan(loads, devices_of(np.ones(4)), "vibe", num_redundant=2, slot_budget=[4, 0, 4, 4])
    assert np.all(placement.device_slot_counts()[:, 1] == 0)
    assert replicas_distinct(placement)


def test_greedy_falls_back_when_replicas_run_out_of_devices():
    """Three experts with two replicas each on 3 devices of 2 slots: plain LPT puts the first two experts
    on the two fast devices and is left with one device for the third; the fallback keeps them apart."""
    expert = np.array([[0, 0, 1, 1, 2, 2]])
    tokens = np.array([[300.0, 300.0, 200.0, 200.0, 100.0, 100.0]])
    params = np.array([[2e-4, 2e-4, 2e-3], [128, 128, 128], [2e-6, 2e-6, 2e-5]])
    device = greedy_devices(expert, tokens, params, np.array([2, 2, 2]))
    assert np.all(np.bincount(device[0], minlength=3) == 2)
    for exp in range(3):
        assert np.unique(device[0, expert[0] == exp]).size == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "random"}, "unknown policy"),
        ({"loads": np.ones(8)}, "2-D"),
        ({"loads": -np.ones((1, 8))}, ">= 0"),
        ({"loads": np.full((1, 8), np.nan)}, "finite"),
        ({"loads": np.ones((1, 6))}, "divisible"),
        ({"num_redundant": -4}, "num_redundant"),
        ({"num_redundant": 2}, "multiple of G"),
        ({"num_redundant": 2, "policy": "eplb", "slot_budget": 4}, "multiple of G"),
        ({"policy": "contiguous", "num_redundant": 4}, "contiguous"),
        ({"slot_budget": 1}, "slot_budget"),
        ({"slot_budget": [3, 3, 3]}, "slot_budget"),
        ({"slot_budget": [3, 3, -1, 3]}, "slot_budget"),
        ({"policy": "eplb", "slot_budget": [4, 4, 1, 4]}, "slot_budget"),
        ({"devices": []}, "devices"),
        ({"loads": np.ones((2, 2)), "devices": devices_of(np.ones(2)), "num_redundant": 4}, "too many"),
        ({"loads": np.ones((2, 3)), "devices": devices_of(np.ones(3)), "num_redundant": 5,
          "slot_budget": [2, 2, 4]}, "too many"),
        # times that overflow: a misleading slot_budget error with replicas, a plan timed at inf without (a review)
        ({"loads": np.full((2, 8), 1e308)}, "overflow"), ({"loads": np.full((2, 8), 1e308), "num_redundant": 4}, "overflow"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    args = {"loads": np.ones((2, 8)), "devices": devices_of(np.ones(4)), "policy": "vibe"}
    args.update(kwargs)
    options = {key: args.pop(key) for key in ("num_redundant", "slot_budget") if key in args}
    with pytest.raises(ValueError, match=match):
        plan(args["loads"], args["devices"], args["policy"], **options)


# --- activity: expected seconds per pass ------------------------------------------------------------

def activity_for(loads: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A share of passes in (0, 1] for every loaded expert (0 where it has no load), at most its load."""
    return np.where(loads > 0, np.minimum(rng.uniform(0.05, 1.0, loads.shape), np.maximum(loads, 0.05)), 0.0)


@SETTINGS
@given(cases(), st.integers(0, 2**32 - 1), st.sampled_from([1e-2, 1.0]))
def test_vibe_with_activity_is_never_worse_than_eplb_in_expected_seconds(case, seed, scale):
    loads, devices, num_redundant = case
    loads = loads * scale  # 1e-2: decode-like loads, far below the knee
    activity = activity_for(loads, np.random.default_rng(seed))
    eplb = plan(loads, devices, "eplb", num_redundant=num_redundant, activity=activity)
    vibe = plan(loads, devices, "vibe", num_redundant=num_redundant, activity=activity)
    check_invariants(vibe, loads, len(devices), num_redundant)
    assert replicas_distinct(vibe)
    distinct = np.array([replicas_distinct(Placement(eplb.phy2log[[layer]], eplb.slot_device[[layer]],
                                                     eplb.replica_share[[layer]], eplb.num_experts,
                                                     eplb.num_devices)) for layer in range(len(loads))])
    ours, reference = makespan(vibe, loads, devices, activity), makespan(eplb, loads, devices, activity)
    assert np.all(ours[distinct] <= reference[distinct] * (1 + 1e-12))


def test_activity_weighs_how_often_an_expert_is_called_below_the_knee():
    # Every expert on the flat part of the curve, where a call costs the same for 1 or 20 tokens. Expert 0
    # has the most tokens but in a tenth of the passes (a burst); experts 1-3 are called in 0.3 of them.
    # At the mean loads every layout costs two flat calls per device, and LPT puts expert 0 first, on the
    # device twice as fast. Per pass the fast device should take two of the steady experts (0.6 calls)
    # and the slow one expert 0 and the third (0.4 calls at twice the cost: 0.8).
    fast, slow = BASE, BASE.scaled(2.0)
    loads = np.array([[2.0, 0.3, 0.3, 0.3]])
    activity = np.array([[0.1, 0.3, 0.3, 0.3]])
    placement = plan(loads, [fast, slow], "vibe", activity=activity)
    assert 0 in placement.phy2log[0][placement.slot_device[0] == 1]
    assert makespan(placement, loads, [fast, slow], activity)[0] == pytest.approx(0.8 * BASE.fixed)
    for blind in (plan(loads, [fast, slow], "vibe"), plan(loads, [fast, slow], "eplb")):
        assert makespan(blind, loads, [fast, slow], activity)[0] == pytest.approx(1.2 * BASE.fixed)


def test_activity_one_where_loaded_plans_as_without_activity_before_the_shares_are_balanced(monkeypatch):
    """Activity 1 where loaded is every pass's cost at the mean load: the same plan as without activity. The shares'
    balancing is left out: with activity it may leave a replica below the knee a sliver (under a token a pass, not
    called in most passes, as the engine dispatches whole tokens), which only the pass-aware cost counts as a gain."""
    monkeypatch.setattr(rebalance_module, "balanced_shares", lambda placement, *args: placement)
    rng = np.random.default_rng(3)
    loads = np.round(rng.lognormal(3.0, 1.0, (3, 12)))
    loads[0, :2] = 0.0
    devices = devices_of(rng.uniform(0.75, 1.0, 4))
    with_activity = plan(loads, devices, "vibe", num_redundant=4, activity=(loads > 0).astype(float))
    without = plan(loads, devices, "vibe", num_redundant=4)
    np.testing.assert_array_equal(with_activity.phy2log, without.phy2log)
    np.testing.assert_array_equal(with_activity.slot_device, without.slot_device)
    np.testing.assert_allclose(with_activity.replica_share, without.replica_share)


@pytest.mark.parametrize(
    ("activity", "match"),
    [
        (np.ones((2, 7)), "shape"),
        (np.full((2, 8), 1.5), r"\[0, 1\]"),
        (np.full((2, 8), np.nan), r"\[0, 1\]"),
        (np.zeros((2, 8)), "> 0 wherever loads"),
    ],
)
def test_bad_activity_raises_value_error(activity, match):
    with pytest.raises(ValueError, match=match):
        plan(np.ones((2, 8)), devices_of(np.ones(4)), "vibe", activity=activity)


def test_a_hot_expert_just_below_twice_the_knee_is_split():
    """250 tokens past a knee of 128 cost the flat part plus 122 tokens of slope; split in two, each replica
    costs the flat part only. The split rule asked whether the replicas after the split stay past the knee
    (125 < 128: no), so both spare slots went to idle experts and 250 tokens took twice as long as 258 (an audit's
    property check)."""
    device = DeviceModel(2e-4, 128, 2e-4 / 128)
    times = {n: makespan(plan(np.array([[n, 0, 0, 0]], dtype=float), [device, device], "vibe", num_redundant=2),
                         np.array([[n, 0, 0, 0]], dtype=float), [device, device])[0] for n in (250.0, 258.0)}
    assert times[250.0] == pytest.approx(2e-4) and times[250.0] <= times[258.0]
    curve = {"curve": device}
    assert replica_counts(np.array([[250.0, 0, 0, 0]]), 6, np.array([3, 3]), 128.0, **curve).tolist() == [[2, 2, 1, 1]]
    assert replica_counts(np.array([[120.0, 0, 0, 0]]), 6, np.array([3, 3]), 128.0, **curve)[0, 0] == 1  # flat
    # two devices each busy with a hot expert past the knee: a split would stack a second call on one of them
    assert replica_counts(np.array([[150.0, 150.0, 0, 0]]), 6, np.array([3, 3]), 128.0, **curve).tolist() == [
        [1, 1, 2, 2]]


@pytest.mark.parametrize("knee", [16.0, 3.5, 0.0])
def test_one_device_without_a_flat_part_does_not_make_every_split_look_worth_a_call(knee):
    """The split rule judged against the smallest knee of all devices: one device whose fit has (almost) no flat
    part (DeviceModel.fit gives 3.5 tokens on a line with an offset) made every split of a loaded expert look worth a
    flat-cost call, where a replica of the expert without load costs nothing: twice the optimal makespan, EPLB's (a
    review). With the devices' median knee vibe finds the optimum, as with one knee for all."""
    devices = [DeviceModel(1e-4, knee, 1e-6), DeviceModel(2e-4, 128.0, 1.5625e-6), DeviceModel(2e-4, 128.0, 1.5625e-6)]
    loads = np.array([[0.0, 86.0, 16.0]])
    placed = plan(loads, devices, "vibe", num_redundant=3)
    assert makespan(placed, loads, devices)[0] == pytest.approx(exact_makespan(loads, devices, num_redundant=3)[0])
    assert placed.logcnt.tolist() == [[3, 2, 1]]


@pytest.mark.parametrize("devices", [
    [DeviceModel(0.0, 100, 1e-6), DeviceModel(1e-4, 100, 1e-6)],  # a device that predicts no time
    [DeviceModel(1e-300, 1, 1e-300), DeviceModel(1e300, 1, 1e300)],  # speeds beyond float range apart
])
def test_replica_shares_stay_positive_whatever_the_devices(devices):
    """A replica whose device predicts 0 s got a share of 0 (ValueError: replica_share entries must lie in (0, 1]);
    it is infinitely fast, so it takes the tokens, the other replica keeping a sliver."""
    loads = np.array([[100.0, 10, 10, 10]])
    placement = plan(loads, devices, "vibe", num_redundant=2)
    shares = placement.replica_share[placement.phy2log == 0]
    assert shares.size == 2 and shares.min() > 0 and shares.sum() == pytest.approx(1.0)
    assert np.isfinite(makespan(placement, loads, devices)).all()


@pytest.mark.parametrize("exponent", [-140, -60, 60, 140])
def test_vibe_places_the_same_whatever_the_unit_of_time(exponent):
    """Devices whose times are all scaled by a power of two (exact in binary) get the same placement. The exchange
    search compares candidates in float32: times past its range (about 3e38) overflowed to inf, inf - inf gave NaN
    and argmin took the NaN; times below it (about 1e-38) rounded to 0 and tied. Either way the search missed swaps it
    found at the unit scale: the first layer's slowest device took 1.69x as long at 2**140, 1.55x at 2**-140 (this
    case came from a random search over scales; NumPy warned of the overflow only)."""
    speeds = [9.897926462487415e-05, 1.006849277261373e-05, 1.735875905694568e-05]
    loads = np.array([[83.5, 51.3, 45.5, 39.9, 14.2, 14.4, 38.8, 68.3, 352.3],
                      [11.9, 281.2, 147.3, 37.6, 200.6, 1.2, 21.7, 7.8, 8.1]])

    def placed(scale):
        devices = [DeviceModel(s * scale, 8, s * scale / 8) for s in speeds]
        placement = plan(loads, devices, "vibe", num_redundant=3)
        return placement.phy2log.tolist(), makespan(placement, loads, devices) / scale

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        scaled = placed(2.0 ** exponent)
    unit = placed(1.0)
    assert scaled[0] == unit[0]
    np.testing.assert_allclose(scaled[1], unit[1], rtol=1e-12)
