"""The placement what-if behind the benchmark's targets: drawn steps, the cluster's devices, the report rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from load_tests.headroom import (
    HeadroomConfig,
    best_gain,
    cluster_devices,
    critical_paths,
    draw_steps,
    drift_rows,
    edge_devices,
    run,
    workload_loads,
)
from load_tests.report import _headroom
from placement import DeviceModel


def test_every_token_picks_top_k_distinct_experts_weighted_by_the_shares():
    rng = np.random.default_rng(0)
    shares = np.array([[0.7, 0.1, 0.1, 0.1, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    steps = draw_steps(shares, tokens=50, top_k=2, steps=20, rng=rng)
    assert steps.shape == (20, 2, 5)
    assert np.all(steps.sum(axis=2) == 100)  # 50 tokens x 2 experts per layer
    assert np.all(steps <= 50)  # distinct experts: at most one pick per token
    assert steps[:, 0, 0].mean() > 42  # the dominant expert is in nearly every token's top 2
    assert steps[:, 0, 4].sum() == 0  # a zero share is never picked while others remain
    assert abs(steps[:, 1].mean() - 20) < 2  # uniform shares: 100 picks over 5 experts
    with pytest.raises(ValueError, match="top_k"):
        draw_steps(shares, 4, 6, 1, rng)


def test_cluster_devices_run_at_speed_times_throttle_floor():
    devices = cluster_devices({"num_devices": 2, "speeds": [1.0, 0.5],
                               "emulation": {"fixed_s": 1e-3, "knee_tokens": 10, "throttle_floor": 0.8}})
    assert devices[0] == pytest.approx(DeviceModel(1e-3 / 0.8, 10, 1e-4 / 0.8))
    assert devices[1].fixed == pytest.approx(1e-3 / 0.4) and devices[1].slope == pytest.approx(1e-4 / 0.4)
    explicit = cluster_devices({"num_devices": 1, "speeds": [1.0], "emulation": {
        "fixed_s": 1e-3, "knee_tokens": 10, "slope_s": 0.0, "throttle_floor": 1.0}})
    assert explicit[0].slope == 0.0 and explicit[0].fixed == pytest.approx(1e-3)


def test_edge_devices_throttle_only_the_slowest_device_further():
    args = {"num_devices": 3, "speeds": [1.0, 0.5, 0.9],
            "emulation": {"fixed_s": 1e-3, "knee_tokens": 10, "throttle_floor": 0.8}}
    base, edge = cluster_devices(args), edge_devices(args, 0.7)
    assert edge[0] == base[0] and edge[2] == base[2]
    assert edge[1].fixed == pytest.approx(1e-3 / (0.5 * 0.7))


def test_critical_paths_charge_contiguous_for_hot_neighbours_and_eplb_for_a_slow_device():
    # 2 devices x 2 experts, linear curves (knee 0): time = tokens x slope.
    same = [DeviceModel(0.0, 0.0, 1.0), DeviceModel(0.0, 0.0, 1.0)]
    hot_neighbours = np.array([[10.0, 10.0, 1.0, 1.0]])
    paths = critical_paths(hot_neighbours, hot_neighbours[None], same, num_redundant=0)
    assert paths == pytest.approx({"contiguous": 20.0, "eplb": 11.0, "vibe": 11.0})
    # The second device half as fast: token balance (hot + cold on each) puts 11 tokens x 2 on it; the
    # predicted-time optimum is both hot experts on the fast device (20) and both cold ones on the slow (4).
    slow = [DeviceModel(0.0, 0.0, 1.0), DeviceModel(0.0, 0.0, 2.0)]
    spread = np.array([[10.0, 1.0, 10.0, 1.0]])
    paths = critical_paths(spread, spread[None], slow, num_redundant=2)
    assert paths["contiguous"] == pytest.approx(22.0) and paths["eplb"] == pytest.approx(22.0)
    assert paths["vibe"] == pytest.approx(20.0)
    assert set(paths) == {"contiguous", "eplb", "vibe", "eplb+redundant", "vibe+redundant"}


def test_critical_paths_with_activity_keep_a_rarely_called_expert_off_the_fast_device():
    # Flat curves (every count below the knee), the second device twice as slow. Expert 0 gets a burst of 20
    # tokens in one step of ten; experts 1-3 a token each in three steps of ten, never together.
    fast, slow = DeviceModel(1.0, 100.0, 0.0), DeviceModel(2.0, 100.0, 0.0)
    steps = np.zeros((10, 1, 4))
    steps[0, 0, 0] = 20.0
    for expert, first in ((1, 1), (2, 4), (3, 7)):
        steps[first:first + 3, 0, expert] = 1.0
    paths = critical_paths(steps.mean(axis=0), steps, [fast, slow], num_redundant=0,
                           activity=(steps > 0).mean(axis=0))
    # at the mean loads every layout costs two calls per device and LPT puts the burst on the fast device
    # next to a steady expert: 1 s in 4 steps, 2 s in the 6 steps of the two on the slow device (1.6 s per
    # step); weighing the calls puts the burst on the slow device next to one steady expert (1.4 s)
    assert paths["vibe/mean"] == pytest.approx(1.6) and paths["vibe"] == pytest.approx(1.4)
    assert paths["eplb"] == pytest.approx(1.6)


def test_re_planning_for_a_throttled_device_beats_the_old_placement():
    devices = [DeviceModel(0.0, 0.0, 1.0)] * 4  # linear curves: time = tokens
    loads = np.array([[8.0, 4.0, 2.0, 1.0, 1.0, 2.0, 4.0, 8.0]])
    rows = drift_rows(loads, loads, 2, (16,), devices, throttled=0, throttle_to=0.25, steps=20,
                      rng=np.random.default_rng(0))
    assert [(r["scenario"], r["step"], r["planned_for"]) for r in rows] == [
        ("workload", "decode 16", "decode 16"), ("device", "decode 16", "decode 16"), ("load", "decode 16", "decode 1")]
    workload, device, _load = rows
    assert workload["static_over_adaptive"] == pytest.approx(1.0)  # same loads: the same plan
    assert device["static_over_adaptive"] > 1.5  # the old plan keeps a hot expert on the 4x slower device


def test_a_plan_for_one_sequence_per_step_is_slower_at_thirty_two():
    # the served model's routing on this cluster: planned on steps of one sequence (4 of 32 experts called
    # per layer), vibe puts the most often called experts on the fastest devices; at 32 sequences every
    # device is busy and the plan made for that batch size is faster
    from deploy.app import DEFAULT_MODEL
    from load_tests.compare import deploy_args

    loads = np.asarray(json.loads((DEFAULT_MODEL / "routing_stats.json").read_text())["loads"], dtype=np.float64)
    rows = drift_rows(loads, loads, 4, (1, 32), cluster_devices(deploy_args()), throttled=0, throttle_to=0.8,
                      steps=100, rng=np.random.default_rng(0))
    load = [r for r in rows if r["scenario"] == "load"]
    assert [(r["step"], r["planned_for"]) for r in load] == [("decode 32", "decode 1")]  # not at its own size
    assert load[0]["static_over_adaptive"] > 1.02
    assert all(r["static_over_adaptive"] == 1.0 for r in rows if r["scenario"] == "workload")  # one routing


def test_workload_loads_count_top_k_assignments_of_every_prompt_token():
    from deploy.app import DEFAULT_MODEL

    loads = workload_loads(DEFAULT_MODEL, ("code",), limit=2)
    assert loads.shape == (4, 32) and np.all(loads >= 0)
    assert len(set(loads.sum(axis=1))) == 1 and loads.sum() % 4 == 0  # every layer: tokens x top-4


def test_run_writes_rows_for_the_served_model_and_the_report_section(tmp_path, monkeypatch):
    from load_tests import headroom

    profile = np.arange(1.0, 129.0).reshape(4, 32)
    monkeypatch.setattr(headroom, "workload_loads", lambda _dir, names, limit=None: profile[:, ::-1].copy()
                        if names == ("code",) else profile)
    result = run(tmp_path, HeadroomConfig(decode_batches=(4,), steps=3, deepseek_layers=2,
                                          deepseek_prefill_tokens=64))
    saved = json.loads((tmp_path / "headroom.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    served = [r for r in result["rows"] if r["model"] == "vibe-tiny-moe" and r["cluster"] == "deploy"]
    edge = [r for r in result["rows"] if r["model"] == "vibe-tiny-moe" and r["cluster"] == "edge"]
    assert [r["step"] for r in served] == [r["step"] for r in edge] == ["decode 4", "prefill"]
    # the edge cluster's slowest device is slower still: eplb (blind to speed) pays for it
    assert edge[0]["moe_ms"]["eplb"] > served[0]["moe_ms"]["eplb"]
    assert served[1]["mean_tokens_per_expert"] == pytest.approx(512 * 4 / 32)
    for row in result["rows"]:
        assert all(v > 0 and np.isfinite(v) for v in row["moe_ms"].values())
        assert row["eplb_over_vibe"] == pytest.approx(row["moe_ms"]["eplb"] / row["moe_ms"]["vibe"])
        assert row["eplb_over_vibe_mean"] == pytest.approx(row["moe_ms"]["eplb"] / row["moe_ms"]["vibe/mean"])
    for r in served:
        ms = r["moe_ms"]
        best_vibe = min(ms["vibe"], ms["vibe+redundant"], ms["vibe+budget"])
        assert r["best_eplb_over_best_vibe"] == pytest.approx(min(ms["eplb"], ms["eplb+redundant"]) / best_vibe)
    assert best_gain(result) == max(r["best_eplb_over_best_vibe"] for r in served)
    for r in served + edge:
        ms = r["moe_ms"]
        assert r["eplb_over_vibe_budget"] == pytest.approx(min(ms["eplb"], ms["eplb+redundant"]) / ms["vibe+budget"])
    section = _headroom(result)
    assert "| vibe-tiny-moe | deploy | prefill | 64.0 |" in section and f"at most {best_gain(result):.3f}x" in section
    assert f"{best_gain(result, cluster='edge'):.3f}x on the edge cluster" in section
    assert [(r["scenario"], r["step"]) for r in result["drift"]] == [("workload", "decode 4"), ("device", "decode 4"),
                                                                     ("load", "decode 4")]
    assert "| device | decode 4 | decode 4 |" in section and "| load | decode 4 | decode 1 |" in section
