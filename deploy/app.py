"""The only place that wires the application: `build_app(args)` for `serve run` / `serve deploy`.

    serve run deploy/config.yaml                       # the local default (8 emulated devices on CPU)
    serve run deploy.app:build_app model=/models/x model_roots=/models   # same, arguments on the command line
    VIBE_MODEL_ROOTS=/models serve run deploy.app:build_app model=x       # the same model, its root from the env

A model is looked up only under deploy/models, `model_roots` and `$VIBE_MODEL_ROOTS`; on the command line, where
every value is a string, `model_roots` is `:`-separated like the variable.

Arguments are validated here (pydantic, `AppArgs`) and turned into one frozen config per component.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

DEPLOY_DIR = Path(__file__).resolve().parent
# the folder holding deploy/: relative paths of the repository's own files (profile_prompts) resolve there too
REPO_ROOT = DEPLOY_DIR.parent
DEFAULT_MODEL = DEPLOY_DIR / "models" / "vibe-tiny-moe"
DEFAULT_PROFILE_PROMPTS = DEPLOY_DIR / "prompts" / "profile.jsonl"
# A node with one degraded GPU (issue "OpenAI-compatible serving"): relative speeds of 8 devices.
DEFAULT_SPEEDS = (1.00, 0.99, 0.98, 0.97, 0.96, 0.95, 0.93, 0.87)
# One expert's latency curve measured on a GPU (scripts/measure_gpu_curve.py): the emulated curve's shape.
GPU_CURVE = DEPLOY_DIR / "data" / "gpu_expert_curve.json"
MIN_ADMIN_TOKEN_CHARS = 16
# a request body may hold a whole context of text: 32 bytes per token leaves room for JSON escapes
_BODY_BYTES_PER_TOKEN = 32
log = logging.getLogger(__name__)


@functools.cache
def gpu_curve_shape(path: Path = GPU_CURVE) -> tuple[float, float]:
    """(knee tokens, slope per token beyond the knee as a fraction of the flat cost) of a measured curve.

    The emulated devices take this shape by default and `fixed_s` as their scale: an expert of
    Qwen3-30B-A3B's size on an NVIDIA H200, bfloat16, kernel time (deploy/data/gpu_expert_curve.json).
    """
    fit = json.loads(Path(path).read_text())["fit"]
    return float(fit["knee"]), float(fit["slope"]) / float(fit["fixed"])


class EmulationArgs(BaseModel):
    """The emulated devices' shared latency curve and behaviour (per-device speeds are in `speeds`).

    `fixed_s` is the scale (seconds of one expert call up to the knee). With `knee_tokens` and `slope_s`
    both left out the curve takes the measured GPU curve's shape (`gpu_curve_shape`): its knee, and its
    slope relative to its flat cost, times `fixed_s`. With `knee_tokens` given and `slope_s` left out,
    the slope is `fixed_s / knee_tokens` (the emulator's own rule).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # (a nested model has its own config)
    fixed_s: float = Field(default=4e-4, gt=0)  # 0 would emulate calls that take no time: nothing to fit
    knee_tokens: float | None = Field(default=None, gt=0)
    slope_s: float | None = Field(default=None, ge=0)
    jitter: float = Field(default=0.02, ge=0, lt=1)
    throttle_floor: float = Field(default=0.8, gt=0, le=1)
    throttle_tau_s: float = Field(default=5.0, gt=0)
    # {device: [[seconds_after_start, speed_multiplier], ...]}, e.g. {"2": [[60, 0.8]]}
    drift: dict[int, list[tuple[float, float]]] = Field(default_factory=dict)

    @field_validator("drift")
    @classmethod
    def _steps_in_order(cls, drift: dict[int, list[tuple[float, float]]]) -> dict[int, list[tuple[float, float]]]:
        """Each device's steps at times >= 0, strictly increasing, with multipliers > 0 (the emulator's rule), said
        here with the device they are for (they were refused at build time, naming EmulationConfig.drift)."""
        for device, steps in drift.items():
            times = [t for t, _ in steps]
            if not (all(t >= 0 for t in times) and times == sorted(set(times)) and all(m > 0 for _, m in steps)):
                raise ValueError(f"emulation.drift[{device}] must be [seconds_after_start, speed_multiplier] steps "
                                 f"with times >= 0 and strictly increasing and multipliers > 0, got {steps}")
        return drift


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of a serve config, or key=value on the CLI)."""

    # Errors name the argument but never echo values: Serve logs them, and one may be the admin token. No
    # infinities or NaN: an infinite timeout overflowed the socket's and Ray's at the first call (every MoE call a
    # device failure; the coordinator never started); `request_timeout_s: null` is the one "no limit"
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False)
    model: str = str(DEFAULT_MODEL)
    model_roots: list[str] = Field(default_factory=list)
    served_model_name: str | None = None
    num_devices: int = Field(default=8, ge=1, le=1024)
    device: Literal["cpu", "cuda"] = "cpu"
    # None: bfloat16 on GPU workers (float32 held twice the memory there), float32 on the CPU
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # workers hold an FP8, MXFP4, packed INT4/INT8 or NVFP4 checkpoint's experts as stored, dequantizing each call
    keep_quantized_experts: bool = False
    emulate: bool = True
    # None: DEFAULT_SPEEDS for 8 devices, their spread (1.00 to 0.87) interpolated over other counts
    speeds: list[float] | None = None
    emulation: EmulationArgs = Field(default_factory=EmulationArgs)
    policy: Literal["vibe", "eplb", "contiguous"] = "vibe"
    num_redundant: int = Field(default=0, ge=0)
    slot_budget: int | None = Field(default=None, ge=1)
    auto_recalibrate: bool = True
    recalibration_mode: Literal["auto", "incremental", "full"] = "auto"
    profile_prompts: str | None = str(DEFAULT_PROFILE_PROMPTS)
    max_num_seqs: int = Field(default=32, ge=1)
    max_num_batched_tokens: int = Field(default=512, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    max_queue: int = Field(default=256, ge=1)
    # largest request body (413 beyond); default: 1 MiB, or 32 bytes per token of context when that is more
    max_body_bytes: int | None = Field(default=None, ge=1024)
    body_timeout_s: float = Field(default=30.0, gt=0)  # a body not received this long after its headers: 408
    request_timeout_s: float | None = Field(default=300.0, gt=0)  # admission to last token; then 504
    # a request whose engine step failed on an expert device is kept and run again (the coordinator moves the
    # device's experts away) for this long after that first failure, then fails with a 503; 0: fails at once
    step_retry_s: float = Field(default=20.0, ge=0)
    # an engine waits this long for a worker's reply to one MoE layer's call; then the step fails (and is
    # retried) and the coordinator checks the worker (a hung one, answering probes but not computing, is lost)
    data_plane_timeout_s: float = Field(default=10.0, gt=0, le=86400)  # (a socket's timeout overflows near 1e10 s)
    enable_prefix_caching: bool = True  # a new request starts from the cached keys/values of its prompt's prefix
    # finished requests whose keys/values the prefix cache holds at once (each a row of the block table); None:
    # 16 x max_num_seqs (at most one per block); blocks, not this, bound it: the least recently used give theirs up
    max_cached_sequences: int | None = Field(default=None, ge=1)
    # memory of each ingress replica's KV cache (blocks that sequences take as they grow; linear-attention states
    # too); None: 512 MiB on a CPU replica, kv_cache_memory_fraction of what its GPU has free after the dense part
    # loads
    kv_cache_bytes: int | None = Field(default=None, ge=1 << 20)
    kv_cache_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    kv_block_size: int = Field(default=16, ge=1, le=1024)  # positions per KV cache block
    # linear-attention models: their states copied every this many prefilled positions, in this share of the KV
    # cache's memory (EngineConfig's docstring), so that a shorter shared prefix (a system prompt) resumes too
    prefix_state_interval: int = Field(default=256, ge=1)
    prefix_state_memory: float = Field(default=0.125, ge=0, lt=1)
    # a thinking model's <think> block -> reasoning (openai_gptoss: GPT-OSS's analysis channel, read with its
    # harmony tool calls)
    reasoning_parser: Literal["qwen3", "deepseek_r1", "kimi_k2", "openai_gptoss"] | None = None
    # how the model writes tool calls (service.tools.FORMATS; auto: as its chat template renders them)
    tool_call_parser: Literal["auto", "hermes", "qwen3_coder", "deepseek_v3", "kimi_k2", "glm45", "glm47", "minimax_m2",
                              "mistral", "mistral_v11", "openai", "llama3_json", "llama4_json"] = "auto"
    worker_probe_misses: int = Field(default=3, ge=1)  # missed health probes (3 s each) before a worker is lost
    # reading a worker's experts from the checkpoint (Ray's waits take milliseconds as an int64: ~1e16 s overflowed,
    # and every load failed)
    worker_load_timeout_s: float = Field(default=1800.0, gt=0, le=7 * 86400)
    num_replicas: int = Field(default=1, ge=1)
    # how long a stopped ingress replica (redeploy, scale-down, delete) finishes the requests it holds before Serve
    # kills it (graceful_shutdown_timeout_s; requests still running then are cut); its coordinator waits this long
    # too before a deleted app's workers go
    drain_timeout_s: float = Field(default=60.0, ge=0, le=86400)
    ingress_num_cpus: float = Field(default=0.5, ge=0)
    coordinator_num_cpus: float = Field(default=0.1, ge=0)
    worker_num_cpus: float = Field(default=0.05, ge=0)
    worker_num_gpus: float | None = Field(default=None, gt=0, le=1)  # device cuda: 1, or a share of one GPU
    worker_scheduling: Literal["default", "spread"] = "default"  # spread: workers over all nodes
    ingress_num_gpus: float = Field(default=0.0, ge=0, le=1)  # the engine computes on one GPU
    worker_threads: int = Field(default=1, ge=1)
    engine_threads: int = Field(default=1, ge=1)  # torch threads of the engine's dense compute
    admin_token: SecretStr | None = None  # else VIBE_ADMIN_TOKEN; masked in reprs
    # names the app's expert workers (vibe-worker-<app_name>-...); None: the Serve application's name, so two apps
    # never share or retire each other's workers
    app_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,40}$")

    @field_validator("admin_token")
    @classmethod
    def _valid_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None:
            check_admin_token(token.get_secret_value(), "admin_token")
        return token

    @field_validator("model_roots", mode="before")
    @classmethod
    def _roots_from_text(cls, roots: Any) -> Any:
        """A string is an `os.pathsep`-separated list, as in VIBE_MODEL_ROOTS: `serve run`'s key=value arguments
        are all strings, so a list could not be given there."""
        return _split_roots(roots) if isinstance(roots, str) else roots

    @field_validator("speeds", mode="before")
    @classmethod
    def _speeds_from_text(cls, speeds: Any) -> Any:
        """A string is a comma-separated list (`serve run deploy.app:build_app speeds=1,0.95,0.9`: every key=value
        argument is a string there, so a list could not be given)."""
        if _is_null(speeds):
            return None
        if isinstance(speeds, str):
            return [part.strip() for part in speeds.split(",")]
        return speeds

    @field_validator("profile_prompts", "request_timeout_s", "served_model_name", "app_name", "dtype", "slot_budget",
                     "max_model_len", "max_body_bytes", "max_cached_sequences", "kv_cache_bytes", "reasoning_parser",
                     "worker_num_gpus", mode="before")
    @classmethod
    def _null_from_text(cls, value: Any) -> Any:
        """`request_timeout_s=null` on the command line (a string there) is null, as in YAML: no limit (or no
        profiling pass, the default name, ...). It was refused as not a number, and `app_name=null` named the
        workers "null"."""
        return None if _is_null(value) else value

    @field_validator("speeds")
    @classmethod
    def _positive_speeds(cls, speeds: list[float] | None) -> list[float] | None:
        from service.emulator import MIN_SPEED

        if speeds is None:
            return None
        if not speeds or min(speeds) < MIN_SPEED:
            raise ValueError(f"speeds must be at least {MIN_SPEED} (a hundredth of the reference device), got {speeds}")
        return speeds

    @model_validator(mode="after")
    def _consistent(self) -> AppArgs:
        if self.speeds is None:  # (a 4-device app needed a speeds list of its own, which the command line could not
            # give)
            self.speeds = default_speeds(self.num_devices)
        if self.emulate and len(self.speeds) != self.num_devices:
            raise ValueError(f"speeds has {len(self.speeds)} entries for {self.num_devices} devices")
        if self.device == "cuda" and self.emulate:
            raise ValueError("emulate must be false on GPU workers (device: cuda)")
        if self.device == "cpu" and self.worker_num_gpus is not None:
            raise ValueError(f"worker_num_gpus {self.worker_num_gpus} needs GPU workers (device: cuda)")
        if self.dtype is None:
            self.dtype = "bfloat16" if self.device == "cuda" else "float32"
        if bad := [d for d in self.emulation.drift if not 0 <= d < self.num_devices]:
            raise ValueError(f"emulation.drift names devices {bad} outside 0..{self.num_devices - 1}")
        if "max_num_batched_tokens" in self.model_fields_set and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                             f"({self.max_num_seqs}): a step must fit a token of every running sequence")
        if self.profile_prompts is not None:
            self.profile_prompts = _profile_file(self.profile_prompts)
        if self.reasoning_parser == "openai_gptoss" and self.tool_call_parser not in ("auto", "openai"):
            raise ValueError(f"reasoning_parser openai_gptoss reads GPT-OSS's harmony format, whose tool calls are "
                             f"tool_call_parser openai's (or auto), not {self.tool_call_parser}'s")
        if self.tool_call_parser == "openai" and self.reasoning_parser not in (None, "openai_gptoss"):
            raise ValueError(f"tool_call_parser openai reads GPT-OSS's harmony format, whose reasoning is "
                             f"reasoning_parser openai_gptoss's, not {self.reasoning_parser}'s (it was dropped)")
        return self


def default_speeds(num_devices: int) -> list[float]:
    """Emulated devices' relative speeds when the config gives none: DEFAULT_SPEEDS for 8, their spread (1.00 down to
    0.87, within published measurements) interpolated over another count."""
    if num_devices == len(DEFAULT_SPEEDS):
        return list(DEFAULT_SPEEDS)
    spots = np.linspace(0, len(DEFAULT_SPEEDS) - 1, num_devices)
    return [round(float(v), 4) for v in np.interp(spots, np.arange(len(DEFAULT_SPEEDS)), DEFAULT_SPEEDS)]


def worker_family(app_name: str) -> str:
    """The prefix of the names of every expert worker of the app named `app_name` (namespace "vibe"), over its
    configurations."""
    return f"vibe-worker-{app_name}-"


def build_app(args: dict[str, Any] | None = None):
    """The Serve application: coordinator (with its expert workers) and the OpenAI ingress."""
    from service.admin import token_digest
    from service.app import DEFAULT_MAX_BODY_BYTES
    from service.checkpoint import check_checkpoint, load_layout
    from service.coordinator import CoordinatorConfig, ModelShape
    from service.deployments import APP_PLACEHOLDER, IngressSettings, serve_deployments
    from service.engine import EngineConfig
    from service.worker import held_expert_bytes
    from service.worker_pool import RayPoolConfig

    parsed = AppArgs.model_validate(args or {})
    checkpoint = checkpoint_folder(parsed)
    layout = load_layout(checkpoint)
    check_checkpoint(checkpoint)  # whole shards, every expert's tensors (headers only): not later, in a worker
    _check_tokenizer(checkpoint)
    _check_plannable(parsed, layout.num_experts)
    _warn_gpus(parsed)
    worker_configs = _worker_configs(parsed, layout, checkpoint)
    shape = ModelShape(num_layers=len(layout.moe_layers), num_experts=layout.num_experts,
                       expert_bytes=held_expert_bytes(worker_configs[0], checkpoint))
    coordinator_config = CoordinatorConfig(checkpoint=checkpoint, policy=parsed.policy,
                                           num_redundant=parsed.num_redundant, slot_budget=parsed.slot_budget,
                                           auto_recalibrate=parsed.auto_recalibrate,
                                           recalibration_mode=parsed.recalibration_mode,
                                           probe_misses=parsed.worker_probe_misses)
    # (APP_PLACEHOLDER: the coordinator puts the Serve application's name there, known only inside it)
    family = worker_family(parsed.app_name or APP_PLACEHOLDER)
    resources = {"num_cpus": parsed.worker_num_cpus,
                 "num_gpus": (parsed.worker_num_gpus or 1.0) if parsed.device == "cuda" else 0.0,
                 "scheduling_strategy": parsed.worker_scheduling.upper()}
    # (an earlier configuration's workers kept, where there is room, until its ingress replicas drained)
    pool_config = RayPoolConfig(name_prefix=f"{family}{_fingerprint(worker_configs, checkpoint, **resources)}",
                                family_prefix=family, keep_strays=True, load_timeout_s=parsed.worker_load_timeout_s,
                                **resources)
    default_len, longest = _model_context(checkpoint)
    if parsed.max_model_len is not None and parsed.max_model_len > longest:
        raise ValueError(f"max_model_len {parsed.max_model_len} is beyond the {longest} positions the model at "
                         f"{checkpoint} was trained for (config.json's max_position_embeddings, with its RoPE "
                         "scaling): its output past them would be wrong")
    max_model_len = parsed.max_model_len or default_len
    if parsed.kv_cache_bytes or not parsed.ingress_num_gpus:  # (a GPU ingress's budget: its free memory, at start)
        _check_kv_budget(checkpoint, parsed.dtype, max_model_len, parsed.kv_block_size,
                         parsed.kv_cache_bytes or EngineConfig.kv_cache_bytes)
    token = parsed.admin_token.get_secret_value() if parsed.admin_token else _env_token()
    settings = IngressSettings(
        checkpoint=checkpoint,
        served_model_name=parsed.served_model_name or Path(checkpoint).name,
        dtype=parsed.dtype,
        engine_config=EngineConfig(max_num_seqs=parsed.max_num_seqs,
                                   max_num_batched_tokens=_batched_tokens(parsed),
                                   max_model_len=max_model_len, max_queue=parsed.max_queue,
                                   request_timeout_s=parsed.request_timeout_s, step_retry_s=parsed.step_retry_s,
                                   enable_prefix_caching=parsed.enable_prefix_caching,
                                   max_cached_sequences=parsed.max_cached_sequences,
                                   kv_cache_bytes=parsed.kv_cache_bytes or EngineConfig.kv_cache_bytes,
                                   kv_block_size=parsed.kv_block_size,
                                   prefix_state_interval=parsed.prefix_state_interval,
                                   prefix_state_memory=parsed.prefix_state_memory),
        admin_token_sha256=token_digest(token) if token else None,
        num_devices=parsed.num_devices,
        emulation=parsed.emulate,
        profile_prompts=parsed.profile_prompts,  # absolute (AppArgs resolved it)
        engine_threads=parsed.engine_threads,
        reasoning_parser=parsed.reasoning_parser,
        tool_call_parser=parsed.tool_call_parser,
        max_body_bytes=parsed.max_body_bytes or max(DEFAULT_MAX_BODY_BYTES, _BODY_BYTES_PER_TOKEN * max_model_len),
        body_timeout_s=parsed.body_timeout_s,
        # (a replica on a share of a GPU, beside workers or other replicas, takes that share of it: the whole
        # fraction of the free memory took 125 GiB of an H200 two workers shared, GPU-path review)
        gpu_kv_cache_fraction=None if parsed.kv_cache_bytes else parsed.kv_cache_memory_fraction * (
            parsed.ingress_num_gpus if 0 < parsed.ingress_num_gpus < 1 else 1.0),
        data_plane_timeout_s=parsed.data_plane_timeout_s,
        workers_id=pool_config.name_prefix,
    )
    coordinator_cls, ingress_cls = serve_deployments()
    coordinator = coordinator_cls.options(
        ray_actor_options={"num_cpus": parsed.coordinator_num_cpus}, max_ongoing_requests=64,
        logging_config={"enable_access_log": False},  # engines report ten times a second
        # (outlasts the ingress's drain, which it waits for when the app is deleted, by its own shutdown's time)
        health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=parsed.drain_timeout_s + 30,
    ).bind(coordinator_config, worker_configs, pool_config, shape, parsed.drain_timeout_s)
    return ingress_cls.options(
        num_replicas=parsed.num_replicas,
        ray_actor_options={"num_cpus": parsed.ingress_num_cpus, "num_gpus": parsed.ingress_num_gpus},
        max_ongoing_requests=max(64, 2 * parsed.max_num_seqs + parsed.max_queue),
        health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=parsed.drain_timeout_s,
    ).bind(coordinator, settings)


def checkpoint_folder(parsed: AppArgs) -> str:
    """The checkpoint folder `parsed.model` names, looked up where build_app allows (ValueError if none)."""
    from service.checkpoint import resolve_checkpoint

    roots = [DEPLOY_DIR / "models", *parsed.model_roots, *_env_roots()]
    try:
        return str(resolve_checkpoint(parsed.model, roots))
    except ValueError as exc:
        raise ValueError(f"{exc} (allowed folders: deploy/models, model_roots (a list, or a {os.pathsep!r}-separated "
                         f"string on the command line) and $VIBE_MODEL_ROOTS ({os.pathsep!r}-separated))") from None


def _warn_gpus(args: AppArgs) -> None:
    """Say in the log what a GPU app set up like this would do without saying: its dense part on the CPU, or the
    cluster (when this process is connected to one) short of the GPUs it asks for (Serve then waits for them
    without an error, and the app stays DEPLOYING or serves without some of its devices)."""
    if args.device != "cuda":
        return
    if args.ingress_num_gpus == 0:
        log.warning("expert workers on GPUs with ingress_num_gpus 0: the dense part (attention, routers, lm_head) "
                    "runs on the ingress replica's CPU; give it ingress_num_gpus (1, or a share)")
    import ray

    if ray.is_initialized():
        need = (args.worker_num_gpus or 1.0) * args.num_devices + args.ingress_num_gpus * args.num_replicas
        have = ray.cluster_resources().get("GPU", 0.0)
        if need > have + 1e-9:
            log.warning("the app asks for %g GPUs (num_devices x worker_num_gpus + num_replicas x ingress_num_gpus) "
                        "and the cluster has %g: Serve waits for the rest (an autoscaler may bring them)", need, have)


def _check_tokenizer(checkpoint: str) -> None:
    """ValueError unless the checkpoint folder has a tokenizer that encodes text: without tokenizer files transformers
    builds an empty one (a vocabulary of 1), and every request then failed as the client's fault ("prompt must contain
    at least one token", "no chat template")."""
    from service.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(checkpoint)
    except (OSError, ValueError) as exc:
        raise ValueError(f"the tokenizer of {checkpoint} does not load: {exc}") from exc
    if len(tokenizer) < 2 or not tokenizer.encode("Hello, world", add_special_tokens=False):
        raise ValueError(f"{checkpoint} has no usable tokenizer (tokenizer.json, tokenizer.model, tiktoken.model or "
                         f"vocab files; the one transformers built has {len(tokenizer)} token(s)): copy the release's "
                         f"tokenizer files into the folder")
    if not getattr(tokenizer, "chat_template", None):
        log.warning("%s has no chat template: /v1/chat/completions and /v1/responses will answer 400", checkpoint)


def _check_plannable(args: AppArgs, num_experts: int) -> None:
    """Raise ValueError, as the coordinator would at its start (where it only shows in Serve's logs), if the
    policy cannot place ``num_experts`` experts per layer on the devices with these settings."""
    import numpy as np

    from placement import DeviceModel, plan

    try:
        plan(np.ones((1, num_experts)), [DeviceModel(1e-4, 8.0, 1e-5)] * args.num_devices, args.policy,
             num_redundant=args.num_redundant, slot_budget=args.slot_budget)
    except ValueError as exc:
        raise ValueError(f"the model's {num_experts} experts per layer cannot be placed on {args.num_devices} "
                         f"devices: {exc}") from exc


def emulation_configs(args: AppArgs) -> list:
    """The EmulationConfig of every emulated device (device i: speeds[i], its drift steps, seed i)."""
    from service.emulator import EmulationConfig

    e = args.emulation
    knee_tokens, slope_s = e.knee_tokens, e.slope_s
    if knee_tokens is None:
        knee_tokens, relative_slope = gpu_curve_shape()
        slope_s = e.fixed_s * relative_slope if slope_s is None else slope_s
    return [EmulationConfig(speed=args.speeds[index], fixed_s=e.fixed_s, knee_tokens=knee_tokens,
                            slope_s=slope_s, jitter=e.jitter,
                            drift=tuple(tuple(step) for step in e.drift.get(index, ())),
                            throttle_floor=e.throttle_floor, throttle_tau_s=e.throttle_tau_s, seed=index)
            for index in range(args.num_devices)]


def _worker_configs(args: AppArgs, layout, checkpoint: str) -> list:
    from service.worker import WorkerConfig

    emulations = emulation_configs(args) if args.emulate else [None] * args.num_devices
    return [WorkerConfig(index=index, device=args.device, dtype=args.dtype, hidden_act=layout.hidden_act,
                         clamped_swiglu=layout.clamped_swiglu, keep_quantized=args.keep_quantized_experts,
                         num_threads=args.worker_threads,
                         profile_shape=(layout.hidden_size, layout.intermediate_size),
                         profile_checkpoint=checkpoint, emulation=emulation, checkpoint_layout=layout)
            for index, emulation in enumerate(emulations)]


def _model_context(checkpoint: str) -> tuple[int, int]:
    """(default, longest) max_model_len of a checkpoint: its max_position_embeddings (2048 when missing), and the
    context its RoPE scaling extends it to, as vLLM derives it (a YaRN model's original length times the factor,
    another scaling's max_position_embeddings times the factor; Llama 3's and LongRoPE's already count it)."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    config = config.get("text_config") or config  # a vision-language model's language model (Qwen3.5)
    default = int(config.get("max_position_embeddings", 2048))
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if kind in ("default", "llama3", "longrope", "su") or not isinstance(factor, int | float) or factor <= 1:
        return default, default
    base = int(rope.get("original_max_position_embeddings") or default) if kind == "yarn" else default
    return default, max(default, int(base * factor))


def _check_kv_budget(checkpoint: str, dtype: str, max_model_len: int, block: int, budget: int) -> None:
    """ValueError when `budget` bytes of KV cache cannot hold one sequence of `max_model_len`'s keys and values: each
    ingress replica refused to start (the engine's own check), and `serve run` waited on an app that never came up
    (a Serve review: kv_cache_bytes 1 MiB for the default model's 2 MiB). A lower bound of the engine's check (which
    adds linear-attention states); a config transformers cannot read is left to it."""
    from service.checkpoint import auto_config
    from service.engine import kv_blocks_bytes
    from service.model import DTYPES

    try:  # (auto_config: Kimi-K2's folders too, whatever was imported before)
        config = auto_config().from_pretrained(checkpoint, local_files_only=True).get_text_config()
        need = kv_blocks_bytes(config, DTYPES[dtype], max_model_len, block)
    except Exception:  # noqa: BLE001 - the engine checks it at its start all the same
        return
    if need > budget:
        raise ValueError(f"kv_cache_bytes {budget} cannot hold one sequence of max_model_len {max_model_len} ({need} "
                         f"bytes of keys and values in {dtype}): give the app a larger kv_cache_bytes or a smaller "
                         "max_model_len")


def _batched_tokens(args: AppArgs) -> int:
    """max_num_batched_tokens: as given (AppArgs refuses one below max_num_seqs), or, left at its default, at least
    max_num_seqs (a step must fit a token of every running sequence)."""
    return max(args.max_num_batched_tokens, args.max_num_seqs)


def _is_null(value: Any) -> bool:
    """Whether a key=value argument's text means null (`null`, `none` or nothing, any case)."""
    return isinstance(value, str) and value.strip().lower() in ("null", "none", "")


def check_admin_token(token: str, source: str = "admin_token") -> str:
    """`token` if it is at least MIN_ADMIN_TOKEN_CHARS printable ASCII characters without surrounding spaces
    (HTTP headers arrive as latin-1, so any other token could never match); the error names where it came from
    (`source`: the argument, or the environment variable, as on KubeRay from a Secret), never the token."""
    if not (len(token) >= MIN_ADMIN_TOKEN_CHARS and token.isascii() and token.isprintable()
            and token.strip() == token):
        raise ValueError(f"{source} must be at least {MIN_ADMIN_TOKEN_CHARS} printable ASCII characters "
                         "without surrounding spaces (the token is not shown)")
    return token


def _env_token() -> str | None:
    token = os.environ.get("VIBE_ADMIN_TOKEN") or None
    return None if token is None else check_admin_token(token, "VIBE_ADMIN_TOKEN")


def _profile_file(path: str) -> str:
    """The absolute path of the profile prompts file `path`: a relative one is looked up from the working
    directory, then from the repository root (as `model` is under deploy/models), so the documented
    `deploy/prompts/profile.jsonl` names the same file wherever the app is built (and the coordinator, which reads
    it in another process, needs no working directory of ours)."""
    from service.text import profile_lines

    given = Path(path)
    for candidate in [given] if given.is_absolute() else [given, REPO_ROOT / given]:
        if candidate.is_file():
            try:
                profile_lines(candidate)  # (a bad line failed every ingress replica's start, after the build)
            except (ValueError, OSError) as exc:
                raise ValueError(f"profile_prompts: {exc}") from None
            return str(candidate.resolve())
    raise ValueError(f"profile_prompts: no file at {path} (a JSONL of chat requests, absolute or relative to the "
                     f"working directory or to {REPO_ROOT}; null: no profiling pass)")


def _env_roots() -> list[str]:
    return _split_roots(os.environ.get("VIBE_MODEL_ROOTS", ""))


def _split_roots(text: str) -> list[str]:
    """Folders of an `os.pathsep`-separated list (empty entries left out)."""
    return [root for root in text.split(os.pathsep) if root]


def _fingerprint(worker_configs: list, checkpoint: str, **resources: Any) -> str:
    """Short hash of what the workers are built from (every worker's config, the checkpoint, the code's worker
    interface) and the resources their actors hold: adopting workers of another config, or of code whose actor
    methods differ, is never right, so any change to either names new workers."""
    from service.messages import WORKER_PROTOCOL

    described = [[dataclasses.asdict(config) for config in worker_configs], checkpoint, weights_identity(checkpoint),
                 resources, WORKER_PROTOCOL]
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:8]


def weights_identity(checkpoint: str) -> list:
    """What tells a checkpoint folder's weights apart without reading them: config.json's and the index's bytes'
    hash and each safetensors file's size and modification time. (Weights saved over the old ones in the same folder,
    a fine-tune or `make model` run again, kept the path: a redeploy adopted workers holding the old experts beside
    the new dense part.) The modification times make the same weights copied anew (a new volume, a refreshed cache)
    name new workers too: their experts are reloaded once, the price of never serving stale ones."""
    folder = Path(checkpoint)
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    files = [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in sorted(folder.glob("*.safetensors"))]
    return [digest.hexdigest(), files]
