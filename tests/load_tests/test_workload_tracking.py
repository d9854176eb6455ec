"""The workload-tracking what-if: the coordinator's judges of a re-plan on simulated engine passes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import placement as pl
from load_tests.headroom import draw_steps
from load_tests.workload_tracking import (
    COORDINATOR,
    JUDGES,
    PROFILE_TOKENS,
    Scenario,
    Setting,
    engine_passes,
    follow,
    reference_paths,
    run,
)


@pytest.fixture(scope="module")
def setting():
    rng = np.random.default_rng(0)
    shares = {name: rng.dirichlet(np.full(16, 0.7), size=2) for name in ("prose", "code")}
    devices = [pl.DeviceModel(4e-4 / speed, 8.0, 4e-6 / speed) for speed in (1.0, 0.97, 0.93, 0.8)]
    return Setting(shares, 2, devices, 1000)


def test_engine_passes_have_load_and_follow_the_change(setting):
    passes = engine_passes(np.random.default_rng(1), setting, Scenario(1, 16, "prose", "code"), passes=600,
                           change_at=300)
    assert passes.shape == (600, 2, 16)
    tokens = passes.sum(axis=(1, 2)) / (2 * setting.top_k)  # tokens per pass
    assert tokens.min() >= 1 and np.all(tokens == np.round(tokens))
    assert np.median(tokens[400:]) > 4 * np.median(tokens[:300])
    code = setting.shares["code"] / setting.shares["code"].sum(axis=1, keepdims=True)
    after = passes[400:].sum(axis=0)
    assert pl.cosine_distance(after, code).max() < pl.cosine_distance(after, setting.shares["prose"]).max()


def _runs(setting, scenario, seeds=3):
    out = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        passes = engine_passes(rng, setting, scenario, passes=1000, change_at=500)
        profile = draw_steps(setting.shares["prose"], PROFILE_TOKENS, setting.top_k, 1, rng)[0]
        runs = {judge: follow(judge, passes, profile, setting, scenario, change_at=500) for judge in JUDGES}
        out.append(runs | {name: {"critical_s": paths} for name, paths in
                           reference_paths(rng, passes, profile, setting, scenario, change_at=500).items()})
    return out


def test_judging_on_held_out_passes_moves_fewer_experts(setting):
    for scenario in (Scenario(4, 4), Scenario(4, 4, routing_after="code")):
        runs = _runs(setting, scenario)
        in_sample = sum(r["in sample"]["moved"] for r in runs)
        held_out = sum(r[COORDINATOR]["moved"] for r in runs)
        assert in_sample > 1.3 * held_out > 0
        credited = [g for r in runs for judge in JUDGES for g in r[judge]["credited_s"]]
        assert credited and min(credited) > 0  # an applied re-plan was credited with a saving


def test_a_switch_of_routing_is_followed(setting):
    for runs in _runs(setting, Scenario(4, 4, routing_after="code")):
        after = {rule: r["critical_s"][500:].mean() for rule, r in runs.items()}
        assert runs[COORDINATOR]["applied"] >= 1
        assert after[COORDINATOR] < after["static"]
        assert len(runs["static"]["critical_s"]) == len(runs[COORDINATOR]["critical_s"]) == 1000


def test_run_writes_a_row_per_scenario_and_rule(tmp_path, setting):
    scenarios = {"unchanged": Scenario(2, 2)}
    result = run(tmp_path, seeds=1, scenarios=scenarios, setting=setting, passes=300, change_at=150)
    assert json.loads((tmp_path / "workload_tracking.json").read_text()) == result
    assert [r["rule"] for r in result["rows"]] == [*JUDGES, "static", "re-planned once"]
    assert all(r["applied"] is None and r["credited_ms_per_pass"] is None for r in result["rows"][len(JUDGES):])
    assert all(r["moe_ms"] > 0 for r in result["rows"])


def test_a_slowed_device_is_re_planned_for(setting):
    for runs in _runs(setting, Scenario(4, 4, slowed=(3, 0.5)), seeds=2):
        static = runs["static"]["critical_s"]
        assert static[500:].mean() > 1.2 * static[:500].mean()  # timed on the slowed device from the change
        after = {rule: r["critical_s"][500:].mean() for rule, r in runs.items()}
        assert after["re-planned once"] < after["static"] and after[COORDINATOR] < after["static"]
        assert runs[COORDINATOR]["applied"] >= 1
        assert after[COORDINATOR] <= after["held out, 2 SE"]  # a device's re-plan is judged at the mean
