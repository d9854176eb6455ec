"""Placement: validation, EPLB-style mappings, token accounting and serialisation."""

import json

import numpy as np
import pytest

from placement.placement import Placement


def _replicated() -> Placement:
    """2 layers, 3 experts, 4 slots on 2 devices; layer 0 replicates expert 1, layer 1 expert 2."""
    phy2log = np.array([[0, 1, 1, 2], [2, 0, 1, 2]])
    share = np.array([[1.0, 0.25, 0.75, 1.0], [0.5, 1.0, 1.0, 0.5]])
    return Placement(phy2log, np.array([0, 0, 1, 1]), share, num_experts=3, num_devices=2, version=7)


def test_logcnt_counts_replicas_and_log2phy_lists_their_slots():
    placement = _replicated()
    np.testing.assert_array_equal(placement.logcnt, [[1, 2, 1], [1, 1, 2]])
    log2phy = placement.log2phy
    assert log2phy.shape == (2, 3, 2)
    np.testing.assert_array_equal(log2phy[0], [[0, -1], [1, 2], [3, -1]])
    np.testing.assert_array_equal(log2phy[1], [[1, -1], [2, -1], [0, 3]])
    for layer in range(2):
        for expert in range(3):
            slots = log2phy[layer, expert][log2phy[layer, expert] >= 0]
            assert np.all(placement.phy2log[layer, slots] == expert)


def test_slot_and_device_tokens_apply_the_shares():
    placement = _replicated()
    loads = np.array([[10.0, 40.0, 6.0], [8.0, 2.0, 30.0]])
    np.testing.assert_allclose(placement.slot_tokens(loads), [[10, 10, 30, 6], [15, 8, 2, 15]])
    np.testing.assert_allclose(placement.device_tokens(loads), [[20, 36], [23, 17]])
    np.testing.assert_allclose(placement.device_tokens(loads).sum(axis=1), loads.sum(axis=1))


def test_slot_tokens_and_per_device_sums_keep_leading_axes():
    placement = _replicated()
    passes = np.array([[[10.0, 40.0, 6.0], [8.0, 2.0, 30.0]], [[0.0, 4.0, 1.0], [2.0, 0.0, 0.0]]])  # [2, L, E]
    np.testing.assert_allclose(placement.slot_tokens(passes)[1], [[0, 1, 3, 1], [0, 2, 0, 0]])
    np.testing.assert_allclose(placement.per_device(placement.slot_tokens(passes)),
                               [[[20, 36], [23, 17]], [[1, 4], [2, 0]]])
    assert placement.per_device(np.zeros((0, 2, 4))).shape == (0, 2, 2)
    with pytest.raises(ValueError, match=r"\[\.\.\., L, R\]"):
        placement.per_device(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="loads must be"):
        placement.slot_tokens(np.zeros((2, 2, 4)))


def test_lookups_and_slot_counts():
    placement = _replicated()
    np.testing.assert_array_equal(placement.devices_of(0, 1), [0, 1])
    assert placement.experts_on(1) == {(0, 1), (0, 2), (1, 1), (1, 2)}
    np.testing.assert_array_equal(placement.device_slot_counts(), [[2, 2], [2, 2]])


def test_to_dict_round_trips_through_json():
    placement = _replicated()
    again = Placement.from_dict(json.loads(json.dumps(placement.to_dict())))
    assert again.same_layout(placement)
    assert again.version == 7
    assert (again.num_experts, again.num_devices) == (3, 2)
    # numbers that are not whole are refused, not cast (a review: phy2log 1.7 read as expert 1, version 3.7 as 3)
    record = placement.to_dict()
    assert Placement.from_dict({**record, "version": 7.0}).version == 7
    for key, value in (("version", 3.7), ("num_experts", 2.9), ("phy2log", np.add(record["phy2log"], 0.5).tolist()),
                       ("slot_device", [[True] * len(row) for row in record["slot_device"]])):
        with pytest.raises(ValueError, match=f"placement {key} must hold whole numbers"):
            Placement.from_dict({**record, key: value})


def test_from_expert_devices_lays_slots_out_device_major():
    placement = Placement.from_expert_devices(np.array([[1, 0, 1, 0]]), num_devices=2)
    np.testing.assert_array_equal(placement.phy2log, [[1, 3, 0, 2]])
    np.testing.assert_array_equal(placement.slot_device, [[0, 0, 1, 1]])
    np.testing.assert_array_equal(placement.replica_share, np.ones((1, 4)))


def test_arrays_are_read_only_and_with_version_keeps_the_layout():
    placement = _replicated()
    with pytest.raises(ValueError):
        placement.phy2log[0, 0] = 2
    newer = placement.with_version(8)
    assert newer.version == 8 and newer.same_layout(placement)


def _args(**changes):
    args = {"phy2log": np.array([[0, 1]]), "slot_device": np.array([0, 1]), "replica_share": np.ones((1, 2)),
            "num_experts": 2, "num_devices": 2}
    args.update(changes)
    return args


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"phy2log": np.array([0, 1])}, "phy2log must be"),
        ({"replica_share": np.ones((1, 3))}, "must all be"),
        ({"num_devices": 0}, "must be > 0"),
        ({"phy2log": np.array([[0, 2]])}, "phy2log entries"),
        ({"slot_device": np.array([0, 2])}, "slot_device entries"),
        ({"slot_device": np.array([1, 0])}, "device-major"),
        ({"replica_share": np.array([[1.0, 0.0]])}, "replica_share entries"),
        ({"phy2log": np.array([[0, 0]]), "replica_share": np.array([[0.5, 0.5]])}, "has no slot"),
        ({"phy2log": np.array([[0, 0, 1]]), "slot_device": np.array([0, 0, 1]),
          "replica_share": np.array([[0.5, 0.6, 1.0]])}, "sum to 1"),
    ],
)
def test_invalid_placements_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        Placement(**_args(**changes))


def test_loads_of_the_wrong_shape_raise():
    with pytest.raises(ValueError, match="loads must be"):
        _replicated().slot_tokens(np.ones((2, 4)))


@pytest.mark.parametrize("loads", [[[np.nan, 1.0, 1.0, 1.0]], [[-500.0, 1.0, 1.0, 1.0]], [[np.inf, 1.0, 1.0, 1.0]]])
def test_predicted_times_refuse_loads_that_are_not_token_counts(loads):
    """A NaN load cost nothing and a negative one less than none: the metrics took them silently (plan and
    lower_bound refused them)."""
    from placement.device_model import DeviceModel
    from placement.metrics import device_times, makespan, pass_critical_paths

    placement = Placement(np.array([[0, 1, 2, 3]]), np.array([0, 0, 1, 1]), np.ones((1, 4)), 4, 2)
    devices = [DeviceModel(2e-4, 128, 1e-6)] * 2
    for call in (lambda: makespan(placement, np.array(loads), devices),
                 lambda: pass_critical_paths(placement, np.array([loads]), devices)):
        with pytest.raises(ValueError, match="loads must be finite token counts >= 0"):
            call()
    with pytest.raises(ValueError, match="activity"):
        device_times(placement, np.array([[500.0, 1, 1, 1]]), devices, activity=np.array([[0.0, 1, 1, 1]]))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_imbalance_refuses_times_that_are_not_finite(bad):
    """A NaN row read as 1.0, perfectly balanced."""
    from placement.metrics import barrier_idle, imbalance

    assert imbalance(np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])).tolist() == [2.0, 1.0]
    for call in (imbalance, barrier_idle):
        with pytest.raises(ValueError, match="finite"):
            call(np.array([[1.0, bad, 1.0], [1.0, 1.0, 1.0]]))


@pytest.mark.parametrize("kwargs, match", [
    ({"phy2log": np.zeros((1, 0), dtype=int), "slot_device": np.zeros((1, 0), dtype=int),
      "replica_share": np.ones((1, 0))}, "at least one layer and one slot"),
    ({"phy2log": np.array([[0.0, 1.0]]), "slot_device": np.array([0, 1]), "replica_share": np.ones((1, 2))},
     "must hold integers"),
    ({"phy2log": np.array([[0, 1]]), "slot_device": np.array([0, 1, 1]), "replica_share": np.ones((1, 2))},
     "one entry per slot"),
])
def test_malformed_placements_are_refused_naming_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Placement(**kwargs, num_experts=2, num_devices=2)
