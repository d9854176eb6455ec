"""AppArgs: every bad argument is refused with a message that names it; the shipped serve configs
validate; GPU and scheduling arguments reach the actors' options (build_app without starting Ray)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from deploy.app import (
    DEFAULT_MODEL,
    DEFAULT_SPEEDS,
    GPU_CURVE,
    AppArgs,
    build_app,
    emulation_configs,
    gpu_curve_shape,
)
from tests.tiny_models import save_tiny_fp8_model, save_tiny_model

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def with_tokenizer(folder: Path) -> Path:
    """``folder`` (a tiny model's) with the shipped model's tokenizer files: build_app refuses a folder without a
    usable tokenizer. (Its ids pass the tiny models' vocabulary: these apps are built, not served.)"""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(DEFAULT_MODEL / name, folder / name)
    return folder


def error_of(args: dict) -> str:
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate(args)
    return str(info.value)


@pytest.mark.parametrize("args, expected", [
    ({"num_devices": 4, "speeds": [1.0, 1.0, 1.0]}, "speeds has 3 entries for 4 devices"),
    ({"speeds": [1.0] * 7 + [0.0]}, "speeds must be at least 0.01"),
    ({"speeds": [1.0] * 7 + [1e-300]}, "speeds must be at least 0.01"),  # one call would emulate years
    ({"emulation": {"fixed_s": 0}}, "emulation.fixed_s"),  # calls of no time: the coordinator has nothing to fit
    ({"max_num_seqs": 64, "max_num_batched_tokens": 16}, "max_num_batched_tokens (16) must be at least max_num_seqs"),
    ({"profile_prompts": "/nonexistent/profile.jsonl"}, "profile_prompts: no file at /nonexistent/profile.jsonl"),
    ({"device": "cuda"}, "emulate must be false on GPU workers (device: cuda)"),
    ({"worker_num_gpus": 0.5}, "worker_num_gpus 0.5 needs GPU workers (device: cuda)"),
    ({"device": "cuda", "emulate": False, "worker_num_gpus": 2}, "worker_num_gpus"),
    ({"device": "tpu"}, "device"),
    ({"worker_scheduling": "pack"}, "'default' or 'spread'"),
    ({"emulation": {"drift": {"9": [[60, 0.8]]}}}, "emulation.drift names devices [9] outside 0..7"),
    ({"num_devices": 0}, "num_devices"),
    ({"admin_token": "short"}, "admin_token"),
    ({"reasoning_parser": "openai_gptoss", "tool_call_parser": "hermes"},
     "reasoning_parser openai_gptoss reads GPT-OSS's harmony format"),
    # the reverse: the reasoning parser was dropped without a word (a review)
    ({"reasoning_parser": "qwen3", "tool_call_parser": "openai"}, "not qwen3's (it was dropped)"),
    # infinite or overflowing timeouts: every MoE call failed as a device failure, the coordinator never started
    ({"data_plane_timeout_s": float("inf")}, "data_plane_timeout_s"), ({"data_plane_timeout_s": 1e10}, "86400"),
    ({"worker_load_timeout_s": "inf"}, "worker_load_timeout_s"), ({"request_timeout_s": float("nan")}, "finite"),
    ({"speeds": "1,fast"}, "speeds.1"),
    # Ray's waits take int64 milliseconds: every load failed (a review)
    ({"worker_load_timeout_s": 1e17}, "worker_load_timeout_s"), ({"drain_timeout_s": 1e17}, "drain_timeout_s"),
    # the emulation's own values, at parse time and named (refused at build naming EmulationConfig; a review)
    ({"emulation": {"fixed_s": "inf"}}, "emulation.fixed_s"), ({"emulation": {"throttle_tau_s": "inf"}}, "emulation"),
    ({"emulation": {"drift": {"2": [[60, 0.8], [30, 0.9]]}}}, "emulation.drift[2] must be"),
    ({"emulation": {"drift": {"2": [[60, 0.0]]}}}, "emulation.drift[2] must be"),
])
def test_bad_arguments_are_refused_naming_the_argument(args, expected):
    assert expected in error_of(args)


def test_other_device_counts_take_the_default_spread_and_the_command_line_gives_lists_and_null():
    """num_devices: 4 alone was refused (speeds has 8 entries), and `serve run deploy.app:build_app key=value` (every
    value a string) could give no speeds list nor a null profile_prompts (a review)."""
    assert AppArgs().speeds == list(DEFAULT_SPEEDS) and AppArgs(num_devices=1).speeds == [1.0]
    four = AppArgs.model_validate({"num_devices": "4"}).speeds
    assert len(four) == 4 and four[0] == 1.0 and four[-1] == DEFAULT_SPEEDS[-1] and four == sorted(four, reverse=True)
    assert len(AppArgs(num_devices=16).speeds) == 16 and min(AppArgs(num_devices=16).speeds) == DEFAULT_SPEEDS[-1]
    cli = AppArgs.model_validate({"num_devices": "3", "speeds": "1, 0.9,0.8", "profile_prompts": "null"})
    assert cli.speeds == [1.0, 0.9, 0.8] and cli.profile_prompts is None
    # every argument that may be null, as YAML's: request_timeout_s=null (no limit) was refused as not a number,
    # app_name=null named the workers "null" (a review)
    cli = AppArgs.model_validate({"request_timeout_s": "null", "app_name": "null", "max_model_len": "None",
                                  "served_model_name": "NULL", "speeds": "null"})
    assert (cli.request_timeout_s, cli.app_name, cli.max_model_len, cli.served_model_name) == (None,) * 4
    assert cli.speeds == list(DEFAULT_SPEEDS)


def test_a_short_token_from_the_environment_is_named_as_such(monkeypatch):
    """A short VIBE_ADMIN_TOKEN (on KubeRay, from a Secret) was refused as a short admin_token, an argument the user
    never gave (a review)."""
    from deploy.app import _env_token

    monkeypatch.setenv("VIBE_ADMIN_TOKEN", "short-token")
    with pytest.raises(ValueError, match="^VIBE_ADMIN_TOKEN must be at least 16"):
        _env_token()


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


def test_shipped_gpu_curve_is_a_kernel_time_measurement_of_a_realistic_expert():
    record = json.loads(GPU_CURVE.read_text())
    assert record["device_name"] != "cpu" and record["config"]["device"].startswith("cuda")
    assert record["config"]["timing"] == "graph" and record["config"]["dtype"] == "bfloat16"
    assert (record["config"]["hidden"], record["config"]["intermediate"]) == (2048, 768)
    assert record["tokens"][0] == 1 and record["tokens"][-1] == 4096
    fit = record["fit"]
    assert 1 < fit["knee"] < 4096 and fit["fixed"] > 0 and fit["slope"] > 0
    # the fit follows the medians it was made from
    assert record["fit_max_rel_error"] < 0.25


def test_emulated_devices_take_the_measured_curve_shape_unless_told_otherwise():
    knee, relative_slope = gpu_curve_shape()
    fit = json.loads(GPU_CURVE.read_text())["fit"]
    assert (knee, relative_slope) == (fit["knee"], pytest.approx(fit["slope"] / fit["fixed"]))
    default = emulation_configs(AppArgs(speeds=[1.0, 0.5], num_devices=2))
    assert all(e.knee_tokens == knee and e.slope_s == pytest.approx(4e-4 * relative_slope) for e in default)
    assert default[1].speed == 0.5 and default[0].fixed_s == 4e-4
    # the curve's shape scales with fixed_s: the emulated time is the measured curve times a constant
    scaled = emulation_configs(AppArgs.model_validate({"num_devices": 1, "speeds": [1.0],
                                                       "emulation": {"fixed_s": 2e-3}}))[0]
    tokens = [1, 64, 1024, 4096]
    ratio = scaled.curve().latency(tokens) / (fit["fixed"] + fit["slope"] * np.maximum(0, np.array(tokens) - knee))
    assert ratio == pytest.approx(np.full(4, 2e-3 / fit["fixed"]))
    # a knee given without a slope keeps the emulator's rule (slope = fixed_s / knee); both given are kept
    own = AppArgs.model_validate({"emulation": {"knee_tokens": 128}})
    assert emulation_configs(own)[0].slope_s == pytest.approx(4e-4 / 128)
    both = AppArgs.model_validate({"emulation": {"knee_tokens": 64, "slope_s": 0.0}})
    assert (emulation_configs(both)[0].knee_tokens, emulation_configs(both)[0].slope_s) == (64, 0.0)


def test_gpu_config_puts_workers_on_gpus_without_emulation():
    args = AppArgs.model_validate(yaml.safe_load((DEPLOY / "config.gpu.yaml").read_text())["applications"][0]["args"])
    assert args.device == "cuda" and not args.emulate and args.ingress_num_gpus > 0


def test_gpu_and_scheduling_arguments_reach_the_actor_options(tmp_path):
    with_tokenizer(save_tiny_model("qwen3_moe", tmp_path / "tiny"))
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


def test_gpu_workers_default_to_bfloat16_and_take_one_gpu_for_the_engine_at_most():
    """On GPUs an unset dtype held the experts in float32, twice a bf16 checkpoint's memory; `ingress_num_gpus: 2`
    was accepted though the engine computes on one GPU (an audit)."""
    gpu = {"device": "cuda", "emulate": False}
    assert AppArgs.model_validate(gpu).dtype == "bfloat16" and AppArgs.model_validate({}).dtype == "float32"
    assert AppArgs.model_validate({**gpu, "dtype": "float32"}).dtype == "float32"  # given: kept
    with pytest.raises(ValidationError, match="ingress_num_gpus"):
        AppArgs.model_validate({**gpu, "ingress_num_gpus": 2})


def test_a_gpu_app_says_when_its_engine_has_no_gpu_or_the_cluster_too_few(monkeypatch, caplog):
    import ray

    from deploy import app

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    with caplog.at_level("WARNING", logger="deploy.app"):
        app._warn_gpus(AppArgs.model_validate({"device": "cuda", "emulate": False, "num_devices": 8,
                                               "ingress_num_gpus": 1}))
        assert "asks for 9 GPUs" in caplog.text and "cluster has 8" in caplog.text
        caplog.clear()
        app._warn_gpus(AppArgs.model_validate({"device": "cuda", "emulate": False, "num_devices": 8,
                                               "worker_num_gpus": 0.5}))
        assert "ingress_num_gpus 0" in caplog.text and "asks for" not in caplog.text  # 4 GPUs of 8
        caplog.clear()
        app._warn_gpus(AppArgs.model_validate({"num_devices": 64, "speeds": [1.0] * 64}))  # emulated: no GPU asked
        assert caplog.text == ""


def test_engine_arguments_reach_the_ingress_engine_config(tmp_path):
    with_tokenizer(save_tiny_model("qwen3_moe", tmp_path / "tiny"))
    base = {"model": "tiny", "model_roots": [str(tmp_path)], "num_devices": 2, "speeds": [1.0, 0.9],
            "profile_prompts": None}
    settings = build_app(base)._bound_deployment.init_args[1]
    assert settings.engine_config.enable_prefix_caching and settings.engine_config.max_num_seqs == 32
    assert (settings.engine_config.prefix_state_interval, settings.engine_config.prefix_state_memory) == (256, 0.125)
    assert settings.engine_config.max_cached_sequences is None
    settings = build_app({**base, "enable_prefix_caching": False, "max_num_seqs": 4, "prefix_state_interval": 64,
                          "prefix_state_memory": 0.25, "max_cached_sequences": 100})._bound_deployment.init_args[1]
    assert not settings.engine_config.enable_prefix_caching and settings.engine_config.max_num_seqs == 4
    assert (settings.engine_config.prefix_state_interval, settings.engine_config.prefix_state_memory) == (64, 0.25)
    assert settings.engine_config.max_cached_sequences == 100
    with pytest.raises(ValueError, match="max_cached_sequences"):
        build_app({**base, "max_cached_sequences": 0})


def test_the_kv_cache_budget_is_the_argument_or_a_share_of_the_gpu_memory_left(tmp_path):
    """kv_cache_bytes reaches the engine; without it a CPU replica takes 512 MiB and a GPU replica the given share
    of what its GPU has free once the dense part is loaded (torch.cuda.mem_get_info, here a stand-in)."""
    from service.deployments import gpu_kv_cache_bytes

    with_tokenizer(save_tiny_model("qwen3_moe", tmp_path / "tiny"))
    base = {"model": "tiny", "model_roots": [str(tmp_path)], "num_devices": 2, "speeds": [1.0, 0.9],
            "profile_prompts": None}
    settings = build_app(base)._bound_deployment.init_args[1]
    assert settings.engine_config.kv_cache_bytes == 512 * 2**20 and settings.gpu_kv_cache_fraction == 0.9
    settings = build_app({**base, "kv_cache_bytes": 40 * 2**30})._bound_deployment.init_args[1]
    assert settings.engine_config.kv_cache_bytes == 40 * 2**30 and settings.gpu_kv_cache_fraction is None
    settings = build_app({**base, "kv_cache_memory_fraction": 0.5})._bound_deployment.init_args[1]
    assert settings.gpu_kv_cache_fraction == 0.5 and settings.engine_config.kv_block_size == 16
    settings = build_app({**base, "kv_block_size": 32})._bound_deployment.init_args[1]
    assert settings.engine_config.kv_block_size == 32
    assert gpu_kv_cache_bytes(0.9, lambda: (60 * 2**30, 141 * 2**30)) == int(0.9 * 60 * 2**30)
    # a replica on half a GPU (beside workers) takes half of that
    settings = build_app({**base, "device": "cuda", "emulate": False, "ingress_num_gpus": 0.5,
                          "worker_num_gpus": 0.25})._bound_deployment.init_args[1]
    assert settings.gpu_kv_cache_fraction == pytest.approx(0.45)
    for bad in ({"kv_cache_bytes": 1000}, {"kv_cache_memory_fraction": 0}, {"kv_cache_memory_fraction": 1.5},
                {"kv_block_size": 0}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            build_app({**base, **bad})


def test_keeping_quantized_experts_reaches_the_workers_and_the_migration_cost(tmp_path):
    """The coordinator prices a migration at the bytes of an expert as the workers hold it: FP8 weights and
    their scales when they keep them, the weights in `dtype` when they dequantize."""
    with_tokenizer(save_tiny_fp8_model("qwen3_moe", tmp_path / "fp8"))
    base = {"model": "fp8", "model_roots": [str(tmp_path)], "num_devices": 2, "speeds": [1.0, 0.9],
            "profile_prompts": None, "dtype": "bfloat16"}

    def built(args: dict):
        coordinator = build_app(args)._bound_deployment.init_args[0]._bound_deployment
        return coordinator.init_args[1], coordinator.init_args[3]  # worker configs, model shape

    hidden, intermediate = 64, 32  # the tiny Qwen3-MoE's expert: 3 H x I weights, FP8 scales per 8 x 8 block
    workers, shape = built(base)
    assert not any(c.keep_quantized for c in workers) and shape.expert_bytes == 3 * hidden * intermediate * 2
    workers, shape = built({**base, "keep_quantized_experts": True})
    assert all(c.keep_quantized and c.profile_checkpoint == str((tmp_path / "fp8").resolve()) for c in workers)
    assert shape.expert_bytes == 3 * hidden * intermediate + 3 * hidden * intermediate // 64 * 4


def test_the_reasoning_parser_reaches_the_ingress_and_names_a_known_parser(tmp_path):
    import typing

    from service.reasoning import PARSERS

    with_tokenizer(save_tiny_model("qwen3_moe", tmp_path / "tiny"))
    base = {"model": "tiny", "model_roots": [str(tmp_path)], "num_devices": 2, "speeds": [1.0, 0.9],
            "profile_prompts": None}
    assert build_app(base)._bound_deployment.init_args[1].reasoning_parser is None
    assert build_app({**base, "reasoning_parser": "qwen3"})._bound_deployment.init_args[1].reasoning_parser == "qwen3"
    with pytest.raises(ValidationError, match="reasoning_parser"):
        build_app({**base, "reasoning_parser": "gpt"})
    allowed = typing.get_args(typing.get_args(AppArgs.model_fields["reasoning_parser"].annotation)[0])
    assert allowed == PARSERS


def test_the_tool_call_parser_reaches_the_ingress_and_names_a_known_format(tmp_path):
    import typing

    from service.tools import FORMATS

    with_tokenizer(save_tiny_model("qwen3_moe", tmp_path / "tiny"))
    base = {"model": "tiny", "model_roots": [str(tmp_path)], "num_devices": 2, "speeds": [1.0, 0.9],
            "profile_prompts": None}
    assert build_app(base)._bound_deployment.init_args[1].tool_call_parser == "auto"  # from the chat template
    settings = build_app({**base, "tool_call_parser": "deepseek_v3"})._bound_deployment.init_args[1]
    assert settings.tool_call_parser == "deepseek_v3"
    with pytest.raises(ValidationError, match="tool_call_parser"):
        build_app({**base, "tool_call_parser": "pythonic"})
    assert set(typing.get_args(AppArgs.model_fields["tool_call_parser"].annotation)) == {"auto", *FORMATS}


def _with_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_the_body_limit_follows_the_context_unless_set(tmp_path):
    with_tokenizer(save_tiny_model("qwen3_moe", tmp_path / "tiny"))
    _with_config(tmp_path / "tiny", max_position_embeddings=131072)
    base = {"model": "tiny", "model_roots": [str(tmp_path)], "num_devices": 2, "speeds": [1.0, 0.9],
            "profile_prompts": None}
    short = build_app({**base, "max_model_len": 1024})._bound_deployment.init_args[1]
    assert short.max_body_bytes == 1 << 20  # a short context: 1 MiB
    long = build_app({**base, "max_model_len": 131072})._bound_deployment.init_args[1]
    assert long.max_body_bytes == 32 * 131072
    assert build_app({**base, "max_body_bytes": 5000})._bound_deployment.init_args[1].max_body_bytes == 5000
    with pytest.raises(ValidationError, match="max_body_bytes"):
        build_app({**base, "max_body_bytes": 10})


def test_a_model_the_policy_cannot_place_is_refused_when_the_app_is_built(tmp_path):
    """8 experts on 3 devices: vibe needs a slot budget for uneven counts, eplb cannot; refused by build_app
    (where `serve run` shows it) instead of by the coordinator at its start."""
    with_tokenizer(save_tiny_model("qwen3_moe", tmp_path / "tiny"))  # 8 experts per layer
    base = {"model": "tiny", "model_roots": [str(tmp_path)], "num_devices": 3, "speeds": [1.0, 0.9, 0.8],
            "profile_prompts": None}
    for policy in ("vibe", "eplb"):
        with pytest.raises(ValueError, match="8 experts per layer cannot be placed on 3 devices.*divisible"):
            build_app({**base, "policy": policy})
    build_app({**base, "slot_budget": 3})  # vibe with uneven counts places them


def test_workers_of_another_configuration_are_never_adopted(tmp_path):
    """Workers are detached actors named after a fingerprint of their configuration and resources (a redeploy adopts
    workers of the same name): every worker setting changes the name, engine-only settings do not."""
    with_tokenizer(save_tiny_fp8_model("qwen3_moe", tmp_path / "fp8"))
    base = {"model": "fp8", "model_roots": [str(tmp_path)], "num_devices": 2, "speeds": [1.0, 0.9],
            "profile_prompts": None}

    def name_prefix(args: dict) -> str:
        return build_app(args)._bound_deployment.init_args[0]._bound_deployment.init_args[2].name_prefix

    first = name_prefix(base)
    assert first.startswith("vibe-worker-{app}-") and name_prefix(base) == first
    assert name_prefix({**base, "max_num_seqs": 4, "policy": "eplb"}) == first
    changed = [{"keep_quantized_experts": True}, {"worker_num_cpus": 0.5}, {"worker_threads": 2},
               {"speeds": [1.0, 0.8]}, {"emulation": {"jitter": 0.05}}, {"dtype": "bfloat16"},
               {"worker_scheduling": "spread"}]
    prefixes = [name_prefix({**base, **change}) for change in changed]
    assert first not in prefixes and len(set(prefixes)) == len(changed)
    # new weights saved over the old ones in the same folder (audit: the old experts were adopted beside the new
    # dense part)
    save_tiny_fp8_model("qwen3_moe", tmp_path / "fp8", seed=7)
    assert name_prefix(base) != first
    # new code whose worker methods changed, deployed over running workers (a review: the old actors refused the
    # new arguments, and every copy failed)
    from service import messages

    second = name_prefix(base)
    messages.WORKER_PROTOCOL += 1
    try:
        assert name_prefix(base) != second
    finally:
        messages.WORKER_PROTOCOL -= 1


def test_max_model_len_defaults_to_the_models_context_and_may_not_pass_what_rope_scaling_extends_it_to(tmp_path):
    """vLLM's rule: a context beyond the positions the model was trained for (max_position_embeddings, times a
    RoPE scaling factor: a YaRN model's original length times it) is refused; a left-out max_model_len takes
    max_position_embeddings; max_num_batched_tokens left out rises to max_num_seqs."""
    with_tokenizer(save_tiny_model("qwen3_moe", tmp_path / "tiny"))
    _with_config(tmp_path / "tiny", max_position_embeddings=4096)
    base = {"model": "tiny", "model_roots": [str(tmp_path)], "num_devices": 2, "speeds": [1.0, 0.9],
            "profile_prompts": None}

    def engine_config(args: dict):
        return build_app({**base, **args})._bound_deployment.init_args[1].engine_config

    assert engine_config({}).max_model_len == 4096 and engine_config({"max_model_len": 4096}).max_model_len == 4096
    with pytest.raises(ValueError, match="max_model_len 4097 is beyond the 4096 positions"):
        build_app({**base, "max_model_len": 4097})
    _with_config(tmp_path / "tiny", max_position_embeddings=4096,
                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
                                  "rope_theta": 10000.0})
    assert engine_config({}).max_model_len == 4096 and engine_config({"max_model_len": 8192}).max_model_len == 8192
    with pytest.raises(ValueError, match="max_model_len 8193 is beyond the 8192 positions"):
        build_app({**base, "max_model_len": 8193})
    _with_config(tmp_path / "tiny", max_position_embeddings=4096,
                 rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert engine_config({"max_model_len": 8192}).max_model_len == 8192
    assert engine_config({"max_num_seqs": 600}).max_num_batched_tokens == 600  # default 512 raised to fit
    assert engine_config({"max_num_seqs": 8, "max_num_batched_tokens": 8}).max_num_batched_tokens == 8


def test_a_checkpoint_missing_weights_or_a_tokenizer_is_refused_when_the_app_is_built(tmp_path):
    """Refused by build_app, naming what is missing, not later in a worker (Serve's logs only) or at each request: a
    missing or truncated shard (a partial download), an expert of the wrong shape (it served, wrongly), a folder
    without tokenizer files (transformers built an empty tokenizer: every request failed as the client's fault)."""
    import safetensors.torch

    args = {"model": "m", "model_roots": [str(tmp_path)], "profile_prompts": None}
    folder = with_tokenizer(save_tiny_model("qwen3_moe", tmp_path / "m"))
    build_app(args)
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    name = "model.layers.2.mlp.experts.5.gate_proj.weight"
    narrow = {**tensors, name: tensors[name][:16].contiguous()}
    safetensors.torch.save_file(narrow, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name} is \[16, 64\] F32, expected \[32, 64\]"):
        build_app(args)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a whole safetensors file"):
        build_app(args)
    shards = {"a.safetensors": {k: v for k, v in tensors.items() if ".layers.2." not in k},
              "b.safetensors": {k: v for k, v in tensors.items() if ".layers.2." in k}}
    (folder / "model.safetensors").unlink()
    for shard, part in shards.items():
        safetensors.torch.save_file(part, folder / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    build_app(args)
    (folder / "b.safetensors").unlink()
    with pytest.raises(ValueError, match="b.safetensors is missing"):
        build_app(args)
    safetensors.torch.save_file(shards["b.safetensors"], folder / "b.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ValueError, match="has no usable tokenizer"):
        build_app(args)


def test_two_serve_apps_left_at_the_default_app_name_get_workers_of_their_own(tmp_path):
    """Worker names take the Serve application's name unless app_name is given (the coordinator fills it in): two
    apps at the default app_name "vibe" shared, or retired, each other's workers (pool audit: starting app b killed
    app a's workers as strays of an earlier configuration; with the same worker settings both adopted the same
    actors)."""
    from service.deployments import for_app
    from service.worker_pool import is_stray

    with_tokenizer(save_tiny_model("qwen3_moe", tmp_path / "tiny"))
    args = {"model": "tiny", "model_roots": [str(tmp_path)], "num_devices": 2, "speeds": [1.0, 0.9], "profile_prompts": None}
    pool = build_app(args)._bound_deployment.init_args[0]._bound_deployment.init_args[2]
    a, b = for_app(pool, "a"), for_app(pool, "chat-b")
    assert a.name_prefix.startswith("vibe-worker-a-") and b.name_prefix.startswith("vibe-worker-chat-b-")
    assert a.family_prefix == "vibe-worker-a-" and not is_stray(f"{b.name_prefix}-0", a)
    assert not is_stray(f"{a.name_prefix}-0", b)
    # names that would map alike stay apart (a hash of the real name when it had to change or be cut; review)
    assert len({for_app(pool, app).name_prefix for app in ("my-app", "my_app", "my.app", "x" * 41, "x" * 42)}) == 5
    named = build_app({**args, "app_name": "mine"})._bound_deployment.init_args[0]._bound_deployment.init_args[2]
    assert for_app(named, "a") == named and named.name_prefix.startswith("vibe-worker-mine-")


def test_a_relative_profile_prompts_path_is_found_from_the_repository_root_wherever_the_app_is_built(
        tmp_path, monkeypatch):
    """README's default as written, `deploy/prompts/profile.jsonl`, names the shipped file from any working directory
    (it was refused unless the app was built from the repo root, while a relative `model` resolves under
    deploy/models); a file relative to the working directory comes first, and the path kept is absolute."""
    monkeypatch.chdir(tmp_path)
    shipped = str((DEPLOY / "prompts" / "profile.jsonl").resolve())
    assert AppArgs.model_validate({"profile_prompts": "deploy/prompts/profile.jsonl"}).profile_prompts == shipped
    (tmp_path / "deploy" / "prompts").mkdir(parents=True)
    (tmp_path / "deploy" / "prompts" / "profile.jsonl").write_text("{\"prompt\": \"mine\"}\n")
    own = AppArgs.model_validate({"profile_prompts": "deploy/prompts/profile.jsonl"}).profile_prompts
    assert own == str((tmp_path / "deploy" / "prompts" / "profile.jsonl").resolve())
    assert "profile_prompts: no file at deploy/prompts/other.jsonl" in error_of(
        {"profile_prompts": "deploy/prompts/other.jsonl"})


def test_model_roots_can_be_given_on_the_command_line_and_a_refused_model_names_every_way_to_allow_it(
        tmp_path, monkeypatch):
    """`serve run deploy.app:build_app model=... model_roots=...` passes strings: model_roots is then `:`-separated,
    as VIBE_MODEL_ROOTS is (a list was required: a ValidationError), and a model outside the allowed folders is refused
    naming model_roots and VIBE_MODEL_ROOTS (deploy/app.py's own example, model=/models/x, was refused, the error
    pointing at model_roots only)."""
    monkeypatch.delenv("VIBE_MODEL_ROOTS", raising=False)
    with_tokenizer(save_tiny_model("qwen3_moe", tmp_path / "root" / "tiny"))
    assert AppArgs.model_validate({"model_roots": f"/a{os.pathsep}{tmp_path}"}).model_roots == ["/a", str(tmp_path)]
    cli = {"model": str(tmp_path / "root" / "tiny"), "num_devices": "2", "speeds": [1.0, 0.9],
           "profile_prompts": None}
    with pytest.raises(ValueError, match="VIBE_MODEL_ROOTS") as refused:
        build_app(cli)
    assert "model_roots" in str(refused.value)
    build_app({**cli, "model_roots": str(tmp_path / "root")})
    monkeypatch.setenv("VIBE_MODEL_ROOTS", str(tmp_path / "root"))
    build_app({**cli, "model": "tiny"})


def test_the_drain_timeout_reaches_the_ingress_and_the_coordinator_outlasts_it(tmp_path):
    """Every ingress rebuild (a changed argument, num_replicas included) or delete cut requests running past a
    hard-coded 10 s, streams without an error event (the redeploy audit); a deleted app's coordinator waits for
    the drain before its workers go, so it must outlast it."""
    with_tokenizer(save_tiny_model("qwen3_moe", tmp_path / "tiny"))
    base = {"model": "tiny", "model_roots": [str(tmp_path)], "profile_prompts": None}
    for args, drain in ((base, 60.0), ({**base, "drain_timeout_s": 400}, 400.0)):
        ingress = build_app(args)._bound_deployment
        coordinator = ingress.init_args[0]._bound_deployment
        assert ingress._deployment_config.graceful_shutdown_timeout_s == drain
        assert coordinator._deployment_config.graceful_shutdown_timeout_s == drain + 30
        assert coordinator.init_args[4] == drain


@pytest.mark.parametrize("line, expected", [("not json", "line 2 is not JSON"), ('{"messages": []}', "line 2 is neither"),
                                            ('{"prompt": 5}', "line 2 is neither"),
                                            ('{"messages": [{"role": "user"}]}', "line 2 is neither")])
def test_a_profile_prompts_file_with_a_bad_line_is_refused_when_the_app_is_built(tmp_path, line, expected):
    """It passed the build and failed every ingress replica's start, its profiling pass reading it (a review)."""
    path = tmp_path / "profile.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n\n")
    message = error_of({"profile_prompts": str(path)})
    assert "profile_prompts" in message and expected in message and str(path) in message
    path.write_text('{"prompt": "fine"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert AppArgs(profile_prompts=str(path)).profile_prompts == str(path)
