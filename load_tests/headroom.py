"""What a placement can gain at most on the emulated cluster: `python -m load_tests.headroom --out bench`.

Owns the what-if behind the side-by-side benchmark's targets: engine steps of the shapes the service runs
(decode batches of 1 to 32 sequences, a prefill chunk of `max_num_batched_tokens` tokens) with router loads
drawn step by step from the served model's own profile (deploy/models/<model>/routing_stats.json: tokens per
expert per layer over the profile prompts; each token picks `top_k` distinct experts with probability
following those shares, Gumbel top-k), on the devices of deploy/config.yaml at their sustained-load speed
(speed x throttle floor: the regime near the SLO frontier), and the MoE critical path of a step (sum over
layers of the slowest device's time) under each policy's placement. Placements are planned, as the
coordinator plans them, on a statistics window of `window` steps of that shape drawn apart from the
measured ones (its mean router counts per forward pass, and for vibe each expert's share of steps with
tokens), with the devices' true curves where the service learns them by profiling; "vibe/mean" is vibe
planned on the mean counts alone, as before the coordinator weighed how often experts are called. The same for
DeepSeek-V3's real routing trace (256 experts, top-8) on the same 8 devices, the paper's setting of 32
experts per device, for comparison; and the served model on the "edge" cluster: the
same devices with the slowest one throttling to `edge_floor` (0.7, the lowest the issue allows) instead of
the config's floor. And the same bound for the drift scenarios of `make bench` (`drift_rows`): after the
prompts switch from prose to code, or after a device throttles to 0.8x, how much shorter the MoE time of
vibe re-planned for the new state is than that of the placement made for the old one (static); and for a
change of batch size (planned at one sequence per step, run at more), which the coordinator's volume
trigger catches. Router loads per workload come from the served model's own prefill of the shipped
workload prompts.
Writes `<out>/headroom.json`.

Ignores the dense layers, the dispatch to the workers and queueing: the ratio it reports, vibe's MoE time
against another policy's, bounds how much shorter vibe can make a step even if MoE were the whole step, and
so (with the SLOs unchanged) about how much more load vibe can carry.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from placement import DeviceModel, Placement, load_trace, pass_critical_paths, plan, trace_dir

DEEPSEEK_TRACE = "deepseek_v3_L3-60_calib_normalized4096"


@dataclass(frozen=True)
class HeadroomConfig:
    """The cases of the what-if.

    Attributes:
        decode_batches: sequences per decode step (one token each).
        steps: steps drawn per case.
        window: steps of the statistics window each placement is planned on (the coordinator's default
            drift_window).
        num_redundant: extra slots (0 or a multiple of the device count) for eplb and vibe in the
            "redundant" variant.
        edge_floor: throttle floor of the slowest device in the "edge" cluster.
        deepseek_layers: the first this many MoE layers of the DeepSeek-V3 trace (the trace has 58).
        deepseek_prefill_tokens: tokens of the DeepSeek-V3 prefill step (its decode steps reuse
            `decode_batches` x 8, a batch per device as in expert-parallel serving).
        seed: seed of the drawn steps.
    """

    decode_batches: tuple[int, ...] = (1, 8, 16, 32)
    steps: int = 200
    window: int = 100
    num_redundant: int = 8
    edge_floor: float = 0.7
    deepseek_layers: int = 8
    deepseek_prefill_tokens: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.decode_batches or min(self.decode_batches) < 1:
            raise ValueError(f"decode_batches must be >= 1, got {self.decode_batches}")
        for name in ("steps", "window", "deepseek_layers", "deepseek_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"HeadroomConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.num_redundant < 0:
            raise ValueError(f"num_redundant must be >= 0, got {self.num_redundant}")
        if not 0 < self.edge_floor <= 1:
            raise ValueError(f"edge_floor must be in (0, 1], got {self.edge_floor}")


def cluster_devices(app_args: dict) -> list[DeviceModel]:
    """The emulated devices of a build_app config (as its workers emulate them) at their sustained-load
    speed: the emulator's curve scaled by 1 / (speed x throttle floor)."""
    from deploy.app import AppArgs, emulation_configs

    return [e.curve().scaled(1.0 / (e.speed * e.throttle_floor))
            for e in emulation_configs(AppArgs.model_validate(app_args))]


def edge_devices(app_args: dict, floor: float) -> list[DeviceModel]:
    """`cluster_devices`, with the slowest device throttling to `floor` of its speed instead of the config's
    throttle floor."""
    from deploy.app import AppArgs, emulation_configs

    configs = emulation_configs(AppArgs.model_validate(app_args))
    slowest = min(range(len(configs)), key=lambda d: configs[d].speed)
    devices = cluster_devices(app_args)
    devices[slowest] = devices[slowest].scaled(configs[slowest].throttle_floor / floor)
    return devices


def draw_steps(shares: np.ndarray, tokens: int, top_k: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """float [steps, L, E]: tokens per expert of `steps` engine steps of `tokens` tokens each; every token
    picks `top_k` distinct experts per layer, weighted by `shares` [L, E] (Gumbel top-k)."""
    num_layers, num_experts = shares.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    logits = np.log(np.maximum(shares, 1e-12))
    out = np.zeros((steps, num_layers, num_experts))
    for step in range(steps):
        keys = logits + rng.gumbel(size=(tokens, num_layers, num_experts))
        chosen = np.argpartition(-keys, top_k - 1, axis=2)[:, :, :top_k]  # [tokens, L, k]
        layer = np.broadcast_to(np.arange(num_layers)[None, :, None], chosen.shape)
        np.add.at(out[step], (layer.ravel(), chosen.ravel()), 1.0)
    return out


def critical_paths(loads: np.ndarray, steps: np.ndarray, devices: list[DeviceModel],
                   num_redundant: int, slot_budget: int | None = None,
                   activity: np.ndarray | None = None) -> dict[str, float]:
    """Mean over `steps` of the MoE critical path (seconds, sum over layers of the slowest device) of each
    policy's placement planned on `loads` [L, E] (and, for vibe, `activity` [L, E]: each expert's share of
    passes with tokens); "redundant" variants with `num_redundant` extra slots, "vibe+budget" with at most
    `slot_budget` slots per device (uneven counts), "vibe/mean" (with activity only) vibe without it."""
    # name: (policy, redundant slots, slot budget, activity it plans on)
    variants = {"contiguous": ("contiguous", 0, None, None), "eplb": ("eplb", 0, None, None),
                "vibe": ("vibe", 0, None, activity)}
    if activity is not None:
        variants["vibe/mean"] = ("vibe", 0, None, None)
    if num_redundant:
        variants |= {"eplb+redundant": ("eplb", num_redundant, None, None),
                     "vibe+redundant": ("vibe", num_redundant, None, activity)}
    if slot_budget is not None:
        variants["vibe+budget"] = ("vibe", 0, slot_budget, activity)
    return {name: mean_critical_path(plan(loads, devices, policy, num_redundant=redundant, slot_budget=budget,
                                          activity=weighs), steps, devices)
            for name, (policy, redundant, budget, weighs) in variants.items()}


def mean_critical_path(placement: Placement, steps: np.ndarray, devices: list[DeviceModel]) -> float:
    """Seconds: the MoE critical path (sum over layers of the slowest device) of `placement`, mean over
    `steps` [S, L, E]."""
    return float(np.mean(pass_critical_paths(placement, steps, devices)))


def window_statistics(shares: np.ndarray, tokens: int, top_k: int, window: int, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(mean router counts per step, each expert's share of steps with tokens), both [L, E]: what the
    coordinator's statistics window of `window` steps of `tokens` tokens holds."""
    drawn = draw_steps(shares, tokens, top_k, window, rng)
    return drawn.mean(axis=0), (drawn > 0).mean(axis=0)


def case_rows(name: str, cluster: str, loads: np.ndarray, top_k: int, shapes: list[tuple[str, int]],
              devices: list[DeviceModel], config: HeadroomConfig, rng: np.random.Generator) -> list[dict]:
    """One row per step shape: each variant's mean MoE critical path (ms) and vibe's gain over the others."""
    shares = loads / loads.sum(axis=1, keepdims=True)
    rows = []
    for shape, tokens in shapes:
        steps = draw_steps(shares, tokens, top_k, config.steps, rng)
        mean, activity = window_statistics(shares, tokens, top_k, config.window, rng)
        budget = (loads.shape[1] + config.num_redundant) // len(devices)  # eplb's slots per device with replicas
        paths = critical_paths(mean, steps, devices, config.num_redundant, budget, activity)
        row = {"model": name, "cluster": cluster, "step": shape, "tokens": tokens, "experts_per_device": loads.shape[1] / len(devices),
               "mean_tokens_per_expert": tokens * top_k / loads.shape[1],
               "moe_ms": {k: v * 1e3 for k, v in paths.items()},
               "eplb_over_vibe": paths["eplb"] / paths["vibe"],
               "eplb_over_vibe_mean": paths["eplb"] / paths["vibe/mean"],
               "contiguous_over_vibe": paths["contiguous"] / paths["vibe"]}
        if "vibe+redundant" in paths:
            row["eplb_over_vibe_redundant"] = paths["eplb+redundant"] / paths["vibe+redundant"]
        # equal memory: vibe with at most eplb+redundant's slots per device against eplb's better layout
        best_eplb = min(paths["eplb"], paths.get("eplb+redundant", np.inf))
        row["eplb_over_vibe_budget"] = best_eplb / paths["vibe+budget"]
        # each policy's best layout within eplb+redundant's slots per device
        row["best_eplb_over_best_vibe"] = best_eplb / min(paths[k] for k in ("vibe", "vibe+redundant", "vibe+budget")
                                                          if k in paths)
        rows.append(row)
    return rows


def workload_loads(model_dir: Path, workloads: tuple[str, ...], limit: int | None = None) -> np.ndarray:
    """float [L, E]: the served model's router assignments over the prefill of the prompts of `workloads`
    (the first `limit` of each; None: all)."""
    import torch

    from deploy.build_default_model import router_loads
    from load_tests.workloads import load_workloads
    from service.model import load_reference_model
    from service.tokenizer import load_tokenizer

    model = load_reference_model(str(model_dir))
    tokenizer = load_tokenizer(model_dir)
    conversations = [list(p.messages) for prompts in load_workloads(workloads).values() for p in prompts[:limit]]
    with torch.no_grad():
        return router_loads(model, tokenizer, conversations).astype(np.float64)


def drift_rows(before: np.ndarray, after: np.ndarray, top_k: int, decode_batches: tuple[int, ...],
               devices: list[DeviceModel], throttled: int, throttle_to: float, steps: int,
               rng: np.random.Generator, window: int = HeadroomConfig.window, load_from: int = 1) -> list[dict]:
    """Static against re-planned vibe for three drift scenarios, per decode batch size: MoE critical path
    (ms) on steps drawn from the new state. Workload: planned for `before`'s shares, run on `after`'s.
    Device: planned for `devices`, run with device `throttled` at `throttle_to` of its speed (on `before`).
    Load: planned for decode steps of `load_from` sequences, run at each other batch size (on `before`):
    the same shares, so no cosine drift, only the router load per pass changes. Each plan is made on a
    statistics window of `window` steps of its routing and batch size (`window_statistics`), one window per
    routing state and batch size."""
    slowed = list(devices)
    slowed[throttled] = devices[throttled].scaled(1.0 / throttle_to)
    states = {"before": before / before.sum(axis=1, keepdims=True), "after": after / after.sum(axis=1, keepdims=True)}
    batches = tuple(dict.fromkeys((*decode_batches, load_from)))
    windows = {(state, batch): window_statistics(shares, batch, top_k, window, rng)
               for state, shares in states.items() for batch in batches}
    if np.array_equal(states["before"], states["after"]):  # one routing state: one window
        windows |= {("after", batch): windows["before", batch] for batch in batches}
    # scenario: (routing planned for, routing run on, devices planned for, devices run on, batch planned for)
    cases = {"workload": ("before", "after", devices, devices, None),
             "device": ("before", "before", devices, slowed, None),
             "load": ("before", "before", devices, devices, load_from)}
    rows = []
    for scenario, (planned_for, runs_on, planned_devices, run_devices, planned_batch) in cases.items():
        for batch in decode_batches:
            if batch == planned_batch:
                continue
            drawn = draw_steps(states[runs_on], batch, top_k, steps, rng)
            old_mean, old_activity = windows[planned_for, planned_batch or batch]
            new_mean, new_activity = windows[runs_on, batch]
            static = plan(old_mean, planned_devices, "vibe", activity=old_activity)
            adaptive = plan(new_mean, run_devices, "vibe", activity=new_activity)
            ms = {name: 1e3 * mean_critical_path(p, drawn, run_devices)
                  for name, p in (("static", static), ("adaptive", adaptive))}
            rows.append({"scenario": scenario, "step": f"decode {batch}",
                         "planned_for": f"decode {planned_batch or batch}", "static_ms": ms["static"],
                         "adaptive_ms": ms["adaptive"], "static_over_adaptive": ms["static"] / ms["adaptive"]})
    return rows


def run(out: Path | None, config: HeadroomConfig = HeadroomConfig(), app_args: dict | None = None) -> dict:
    """The what-if for the served model (and DeepSeek-V3 when its trace is present); writes
    `<out>/headroom.json` unless `out` is None; returns the result."""
    from deploy.app import AppArgs, checkpoint_folder
    from load_tests.compare import deploy_args

    app_args = deploy_args() if app_args is None else app_args
    args = AppArgs.model_validate(app_args)
    model_dir = Path(checkpoint_folder(args))
    stats = json.loads((model_dir / "routing_stats.json").read_text())
    top_k = int(json.loads((model_dir / "config.json").read_text())["num_experts_per_tok"])
    devices = cluster_devices(app_args)
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()
    shapes = [(f"decode {b}", b) for b in config.decode_batches] + [("prefill", args.max_num_batched_tokens)]
    loads = np.asarray(stats["loads"], dtype=np.float64)
    rows = case_rows(model_dir.name, "deploy", loads, top_k, shapes, devices, config, rng)
    rows += case_rows(model_dir.name, "edge", loads, top_k, shapes, edge_devices(app_args, config.edge_floor),
                      config, rng)
    try:
        trace = load_trace(trace_dir() / f"{DEEPSEEK_TRACE}.npz")
    except FileNotFoundError as err:
        print(f"headroom: DeepSeek-V3 case skipped: {err}", file=sys.stderr)
    else:
        counts = trace.counts[:config.deepseek_layers].astype(np.float64) + 1e-3  # no expert with zero share
        per_device = len(devices)
        ds_shapes = [(f"decode {b}/device", b * per_device) for b in config.decode_batches] + [
            ("prefill", config.deepseek_prefill_tokens)]
        rows += case_rows("DeepSeek-V3", "deploy", counts, int(trace.meta.get("top_k", 8)), ds_shapes, devices, config, rng)
    drift = drift_rows(workload_loads(model_dir, ("sharegpt_like", "sonnet_like")), workload_loads(model_dir, ("code",)),
                       top_k, config.decode_batches, devices, 0, 0.8, config.steps, rng, config.window)
    result = {"config": asdict(config), "devices": [asdict(d) for d in devices], "app_args": {
        k: app_args.get(k) for k in ("speeds", "emulation", "num_devices", "max_num_batched_tokens")},
        "rows": rows, "drift": drift, "runtime_s": time.perf_counter() - started}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "headroom.json").write_text(json.dumps(result, indent=1))
    return result


def best_gain(result: dict, model: str | None = None, cluster: str = "deploy") -> float:
    """vibe's largest MoE-time gain over eplb, each at its best layout within eplb+redundant's slots per
    device (eplb with or without the redundant slots; vibe also with uneven counts), over the step shapes of
    `model` (default: the served model, the first row's) on `cluster` ("deploy" or "edge")."""
    model = model or result["rows"][0]["model"]
    return max(r["best_eplb_over_best_vibe"] for r in result["rows"]
               if r["model"] == model and r.get("cluster", "deploy") == cluster)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.headroom", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--steps", type=int, default=HeadroomConfig.steps)
    args = parser.parse_args(argv)
    result = run(args.out, HeadroomConfig(steps=args.steps))
    for row in result["rows"]:
        paths = " ".join(f"{k}={v:.2f}" for k, v in row["moe_ms"].items())
        print(f"{row['model']:>14} {row['cluster']:>6} {row['step']:>18} tokens/expert={row['mean_tokens_per_expert']:7.1f} "
              f"moe_ms: {paths}  eplb/vibe={row['eplb_over_vibe']:.3f} (vibe/mean: {row['eplb_over_vibe_mean']:.3f}) "
              f"contiguous/vibe={row['contiguous_over_vibe']:.3f}")
    for row in result["drift"]:
        print(f"drift {row['scenario']:>8} {row['step']:>10} (planned for {row['planned_for']}) static={row['static_ms']:.2f} ms "
              f"adaptive={row['adaptive_ms']:.2f} ms static/adaptive={row['static_over_adaptive']:.3f}")
    print(f"wrote {args.out}/headroom.json in {result['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
