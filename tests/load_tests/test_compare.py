"""The side-by-side benchmark's configuration: app arguments per policy and the validated knobs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deploy.app import AppArgs
from load_tests.compare import ADMIN_TOKEN, DEFAULT, CompareConfig, app_args_for, deploy_args


def test_every_policy_runs_the_deploy_cluster_with_its_own_knobs():
    config = replace(DEFAULT, app_args={"max_num_seqs": 16},
                     policy_args={"eplb": {"num_redundant": 8}, "vibe": {"num_redundant": 4, "slot_budget": 5}})
    base = deploy_args()
    for policy in ("contiguous", "eplb", "vibe"):
        args = app_args_for(policy, config, f"bench-{policy}")
        AppArgs.model_validate(args)  # build_app accepts it
        assert args["policy"] == policy and args["app_name"] == f"bench-{policy}"
        assert args["speeds"] == base["speeds"] and args["emulation"] == base["emulation"]
        assert args["max_num_seqs"] == 16 and args["admin_token"] == ADMIN_TOKEN
    assert app_args_for("eplb", config, "x")["num_redundant"] == 8
    assert app_args_for("vibe", config, "x")["slot_budget"] == 5
    assert app_args_for("contiguous", config, "x").get("num_redundant", 0) == 0


def test_deploy_cluster_stays_within_published_variability():
    args = deploy_args()
    speeds = args["speeds"]
    assert 1 - min(speeds) / max(speeds) <= 0.13 + 1e-9
    assert args["emulation"]["throttle_floor"] >= 0.7


@pytest.mark.parametrize(("change", "message"), [
    ({"policies": ()}, "policies"),
    ({"policies": ("eplb", "eplb")}, "policies"),
    ({"rates": (2.0, 1.0)}, "rates"),
    ({"rates": (0.0, 1.0)}, "rates"),
    ({"duration_s": 0}, "duration_s"),
    ({"unloaded_requests": 0}, "unloaded"),
    ({"stop_below": 0.95}, "stop_below"),
])
def test_compare_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        replace(DEFAULT, **change)


def test_default_is_valid():
    assert isinstance(DEFAULT, CompareConfig) and DEFAULT.policies[0] == "eplb"
