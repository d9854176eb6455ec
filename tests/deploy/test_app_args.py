"""AppArgs: every bad argument is refused with a message that names it; the shipped serve configs
validate; GPU and scheduling arguments reach the actors' options (build_app without starting Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deploy.app import AppArgs, build_app
from tests.tiny_models import save_tiny_model

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def error_of(args: dict) -> str:
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate(args)
    return str(info.value)


@pytest.mark.parametrize("args, expected", [
    ({"num_devices": 4, "speeds": [1.0, 1.0, 1.0]}, "speeds has 3 entries for 4 devices"),
    ({"speeds": [1.0] * 7 + [0.0]}, "speeds must be positive"),
    ({"device": "cuda"}, "emulate must be false on GPU workers (device: cuda)"),
    ({"worker_num_gpus": 0.5}, "worker_num_gpus 0.5 needs GPU workers (device: cuda)"),
    ({"device": "cuda", "emulate": False, "worker_num_gpus": 2}, "worker_num_gpus"),
    ({"device": "tpu"}, "device"),
    ({"worker_scheduling": "pack"}, "'default' or 'spread'"),
    ({"emulation": {"drift": {"9": [[60, 0.8]]}}}, "emulation.drift names devices [9] outside 0..7"),
    ({"num_devices": 0}, "num_devices"),
    ({"admin_token": "short"}, "admin_token"),
])
def test_bad_arguments_are_refused_naming_the_argument(args, expected):
    assert expected in error_of(args)


@pytest.mark.parametrize("args, field", [
    ({"num_device": 8}, "num_device"),
    ({"emulation": {"knee": 64}}, "emulation.knee"),
    ({"device": "cuda", "emulate": False, "gpus_per_worker": 1}, "gpus_per_worker"),
])
def test_unknown_fields_are_refused_by_name(args, field):
    message = error_of(args)
    assert field in message and "Extra inputs are not permitted" in message


@pytest.mark.parametrize("config", ["config.yaml", "config.gpu.yaml"])
def test_shipped_serve_configs_validate(config):
    app = yaml.safe_load((DEPLOY / config).read_text())["applications"][0]
    assert app["import_path"] == "deploy.app:build_app"
    AppArgs.model_validate(app["args"])


def test_gpu_config_puts_workers_on_gpus_without_emulation():
    args = AppArgs.model_validate(yaml.safe_load((DEPLOY / "config.gpu.yaml").read_text())["applications"][0]["args"])
    assert args.device == "cuda" and not args.emulate and args.ingress_num_gpus > 0


def test_gpu_and_scheduling_arguments_reach_the_actor_options(tmp_path):
    save_tiny_model("qwen3_moe", tmp_path / "tiny")
    app = build_app({"model": "tiny", "model_roots": [str(tmp_path)], "device": "cuda", "emulate": False,
                     "num_devices": 2, "worker_num_gpus": 0.5, "ingress_num_gpus": 1.0,
                     "worker_scheduling": "spread", "profile_prompts": None})
    ingress = app._bound_deployment  # Serve's Application keeps its deployment privately
    coordinator = ingress.init_args[0]._bound_deployment
    worker_configs, pool = coordinator.init_args[1], coordinator.init_args[2]
    assert ingress.ray_actor_options["num_gpus"] == 1.0
    assert pool.num_gpus == 0.5 and pool.scheduling_strategy == "SPREAD"
    assert [(c.device, c.emulation) for c in worker_configs] == [("cuda", None), ("cuda", None)]
    default = build_app({"model": "tiny", "model_roots": [str(tmp_path)], "device": "cuda", "emulate": False,
                         "num_devices": 2, "profile_prompts": None})
    assert default._bound_deployment.init_args[0]._bound_deployment.init_args[2].num_gpus == 1.0
