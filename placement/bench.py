"""The placement benchmark: `python -m placement.bench --out bench` (`make bench-placement`).

Owns the benchmark's cases and their timing, the printed tables, `<out>/placement.json` and
`<out>/placement.png`. Sections: quality against the lower bound on every real trace, variability
profile, G and load regime; the MILP optimum on small cases; speed of `plan` and `rebalance` at
DeepSeek-V3 scale; slots moved by `rebalance` vs a full re-plan on real drift pairs; the scale study.
Without the trace folder it says so and exits 0 (CI may lack it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from placement.bounds import exact_makespan, lower_bound
from placement.drift import cosine_distance
from placement.metrics import makespan
from placement.migration import migration_plan
from placement.policies import POLICIES, plan
from placement.rebalance import rebalance
from placement.simulate import PROFILES, ScaleStudyConfig, evaluate, sample_devices, scale_study
from placement.traces import (
    Trace,
    load_trace,
    load_traces,
    resample_experts,
    scale_loads,
    select_layers,
    trace_dir,
)

DEEPSEEK = "deepseek_v3_L3-60_calib_normalized4096"
DRIFT_PAIRS = (
    ("olmoe1b7b_arxiv_L0-7-15", "olmoe1b7b_github_L0-7-15"),
    ("esft_dsv2lite_law", "esft_dsv2lite_translation"),
)


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark runs.

    Attributes:
        traces: trace names for the quality section (None: every trace in the folder).
        quality_layers: layers per trace in the quality section, evenly spaced (None: all); the bound's
            LP dominates the runtime on long traces.
        regimes: load regime -> mean tokens per expert (base knee 128: prefill above, decode below).
        device_counts: G of the quality section (those not dividing E are skipped).
        exact_traces, exact_experts, exact_devices, exact_layers: small MILP cases: these traces
            resampled to E experts, their first layers, on G devices.
        speed_layers: DeepSeek-V3 layers timed (None: all 58); speed_devices, speed_redundant: G and
            redundant slots timed; repeats: timed runs per case (the median is reported).
        drift_devices, drift_profiles: G and variability profiles of the drift-pair section.
        scale: the scale study, run once per (profile, regime) of scale_cases on DeepSeek-V3 loads.
        seed: seeds every sampled device set and resampling.
    """

    traces: tuple[str, ...] | None = None
    quality_layers: int | None = 8
    regimes: dict[str, float] = field(default_factory=lambda: {"prefill": 1024.0, "decode": 32.0})
    device_counts: tuple[int, ...] = (4, 8, 16, 32)
    exact_traces: tuple[str, ...] = (DEEPSEEK, "esft_dsv2lite_law", "olmoe1b7b_c4_L0-7-15",
                                     "mixtral8x7b_c4_L0-7-15")
    exact_experts: int = 16
    exact_devices: int = 4
    exact_layers: int = 2
    speed_layers: int | None = None
    speed_devices: tuple[int, ...] = (32, 64)
    speed_redundant: tuple[int, ...] = (0, 32)
    repeats: int = 5
    drift_devices: int = 8
    drift_profiles: tuple[str, ...] = PROFILES
    scale: ScaleStudyConfig = ScaleStudyConfig(num_layers=4)
    scale_cases: tuple[tuple[str, str], ...] = (("spread7", "prefill"), ("two_throttled", "prefill"),
                                                ("two_throttled", "decode"))
    seed: int = 0


QUICK = BenchConfig(
    traces=("olmoe1b7b_arxiv_L0-7-15", "mixtral8x7b_c4_L0-7-15"),
    device_counts=(4, 8),
    exact_traces=("olmoe1b7b_arxiv_L0-7-15",),
    exact_layers=1,
    speed_layers=4,
    speed_devices=(8,),
    repeats=1,
    drift_profiles=("one_slow13",),
    scale=ScaleStudyConfig(device_counts=(8, 16), num_experts=64, num_layers=2),
    scale_cases=(("spread7", "prefill"),),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m placement.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"), help="output folder (default: bench)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else BenchConfig()
    try:
        quality_traces, traces = _load(trace_dir(), config)
    except FileNotFoundError as err:
        print(f"placement bench skipped: {err}", file=sys.stderr)
        return 0
    started = time.perf_counter()
    result = {"config": asdict(config), "machine": _machine()}
    result.update(run(quality_traces, traces, config))
    result["runtime_s"] = time.perf_counter() - started
    result["machine"]["loadavg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "placement.json").write_text(json.dumps(result, indent=1, default=_json_default))
    _plot(result, args.out / "placement.png")
    print(f"\nwrote {args.out}/placement.json and {args.out}/placement.png in {result['runtime_s']:.0f} s")
    return 0


def _load(folder: Path, config: BenchConfig) -> tuple[list[Trace], dict[str, Trace]]:
    """The traces of the quality section, and every trace the sections need by name."""
    if config.traces is None:
        quality_traces = load_traces(folder)
    else:
        quality_traces = [load_trace(folder / f"{name}.npz") for name in config.traces]
    traces = {t.name: t for t in quality_traces}
    for name in (DEEPSEEK, *config.exact_traces, *(n for pair in DRIFT_PAIRS for n in pair)):
        if name not in traces:
            traces[name] = load_trace(folder / f"{name}.npz")
    return quality_traces, traces


def run(quality_traces: list[Trace], traces: dict[str, Trace], config: BenchConfig) -> dict:
    """Every section, printing its tables as it finishes; returns them JSON-ready."""
    result = {"quality": quality(quality_traces, config)}
    _print_summary("quality: sum_l makespan / sum_l lower bound (gain = 1 - T_vibe / T_eplb; captured = "
                   "(eplb - vibe) / (eplb - bound))", result["quality"], ("regime", "profile"))
    _print_summary("quality by G, heterogeneous profiles only", [r for r in result["quality"]
                   if r["profile"] != "identical"], ("regime", "devices"))
    result["exact"] = exact_cases([traces[n] for n in config.exact_traces], config)
    _print_rows(f"MILP optimum on small cases (E={config.exact_experts}, G={config.exact_devices}, prefill; "
                "ratios to the optimum; hot: a layer's hottest expert exceeds a device's fair share)",
                result["exact"], ["trace", "profile", "layers", "hot", "bound", "contiguous", "eplb", "vibe",
                                  "captured"])
    result["speed"] = speed(traces[DEEPSEEK], config)
    _print_rows("speed at DeepSeek-V3 scale (ms)", result["speed"],
                ["what", "layers", "experts", "devices", "redundant", "median_ms", "min_ms", "runs"])
    result["moves"] = drift_pairs(traces, config)
    _print_rows(f"rebalance vs full re-plan on drift pairs (G={config.drift_devices}, prefill; ratios to the "
                "bound on the new loads; moved: fraction of slots per layer)", result["moves"],
                ["pair", "profile", "max_distance", "stale", "rebalanced", "replanned",
                 "rebalance_moved", "rebalance_moved_max", "replan_moved", "replan_moved_max"])
    result["scale"] = scale(traces[DEEPSEEK], config)
    _print_rows("scale study (DeepSeek-V3 loads; bound: the redundant_uneven bound for every variant; gains "
                "1 - T / T_eplb against eplb with the same redundant slots, and against eplb without any)",
                result["scale"], ["profile", "regime", "num_devices", "variant", "policy", "slot_budget",
                                  "bound_ratio", "imbalance", "gain_vs_eplb", "gain_vs_eplb_even"])
    return result


def quality(traces: list[Trace], config: BenchConfig) -> list[dict]:
    """sum_l makespan / sum_l bound per policy for every trace x regime x G x profile."""
    rows = []
    for trace in traces:
        num_experts = trace.counts.shape[1]
        for regime, tokens in config.regimes.items():
            loads = scale_loads(select_layers(trace.counts, config.quality_layers), tokens)
            for num_devices in config.device_counts:
                if num_experts % num_devices:
                    continue
                for profile in PROFILES:
                    devices = sample_devices(num_devices, profile, _rng(config, num_devices, profile))
                    case = evaluate(loads, devices, POLICIES)
                    rows.append({
                        "trace": trace.name, "regime": regime, "devices": num_devices, "profile": profile,
                        "layers": loads.shape[0], "hot_layers": float(_hot(loads, num_devices).mean()),
                        "bound_s": case.bound_s, **{p: r.bound_ratio for p, r in case.policies.items()},
                        "imbalance": {p: r.imbalance for p, r in case.policies.items()},
                        "balancedness": {p: r.balancedness for p, r in case.policies.items()},
                        "gain": case.gain(), "captured": case.captured_gain(),
                    })
    return rows


def exact_cases(traces: list[Trace], config: BenchConfig) -> list[dict]:
    """Policies and the bound against the MILP optimum, on traces resampled to a small size."""
    rows = []
    num_devices = config.exact_devices
    for trace in traces:
        loads = resample_experts(trace.counts[: config.exact_layers], config.exact_experts,
                                 np.random.default_rng(config.seed))
        loads = scale_loads(loads, config.regimes["prefill"])
        for profile in PROFILES:
            devices = sample_devices(num_devices, profile, _rng(config, num_devices, profile))
            optimum = float(exact_makespan(loads, devices).sum())
            case = evaluate(loads, devices, POLICIES)
            totals = {p: r.makespan_s for p, r in case.policies.items()}
            room = totals["eplb"] - optimum
            rows.append({
                "trace": trace.name, "profile": profile, "layers": loads.shape[0],
                "hot": bool(_hot(loads, num_devices).any()), "optimum_s": optimum,
                "bound": case.bound_s / optimum, **{p: t / optimum for p, t in totals.items()},
                "captured": (totals["eplb"] - totals["vibe"]) / room if room > 1e-9 * optimum else float("nan"),
            })
    return rows


def speed(trace: Trace, config: BenchConfig) -> list[dict]:
    """Wall time of `plan` per policy and of `rebalance` on DeepSeek-V3 loads ("spread7" devices), and
    of `lower_bound` once, at the first G (it takes seconds)."""
    loads = scale_loads(select_layers(trace.counts, config.speed_layers), config.regimes["prefill"])
    shape = {"layers": loads.shape[0], "experts": loads.shape[1]}
    rows = []
    for num_devices in config.speed_devices:
        devices = sample_devices(num_devices, "spread7", _rng(config, num_devices, "spread7"))
        for num_redundant in config.speed_redundant:
            # Even counts need num_redundant to be a multiple of G; otherwise only vibe, with a slot budget.
            even = num_redundant % num_devices == 0
            budget = None if even else -(-(shape["experts"] + num_redundant) // num_devices)
            policies = [p for p in POLICIES
                        if (p != "contiguous" or num_redundant == 0) and (even or p == "vibe")]
            for policy in policies:
                seconds = _timed(config.repeats, plan, loads, devices, policy, num_redundant=num_redundant,
                                 slot_budget=budget)
                rows.append({"what": f"plan {policy}", **shape, "devices": num_devices,
                             "redundant": num_redundant, "slot_budget": budget, **seconds})
        if num_devices == config.speed_devices[0]:
            seconds = _timed(1, lower_bound, loads, devices)
            rows.append({"what": "lower_bound", **shape, "devices": num_devices, "redundant": 0, **seconds})
        rows.append({"what": "rebalance", **shape, "devices": num_devices, "redundant": 0,
                     **_time_rebalance(loads, devices, config)})
    return rows


def _time_rebalance(loads: np.ndarray, devices, config: BenchConfig) -> dict:
    """Times `rebalance` of a vibe placement after workload drift: every load times a lognormal(0, 0.3)
    factor (max layer cosine distance recorded; the real drift pairs have 0.29 and 0.51)."""
    rng = np.random.default_rng(config.seed)
    start = plan(loads, devices, "vibe")
    drifted = loads * rng.lognormal(0.0, 0.3, loads.shape)
    seconds = _timed(config.repeats, rebalance, start, drifted, devices)
    new, moves = rebalance(start, drifted, devices)
    fraction = migration_plan(start, new, 1).moved_slot_fraction
    return {**seconds, "max_distance": float(cosine_distance(loads, drifted).max()), "moves": len(moves),
            "moved_mean": float(fraction.mean()), "moved_max": float(fraction.max())}


def drift_pairs(traces: dict[str, Trace], config: BenchConfig) -> list[dict]:
    """Slots moved and quality reached by `rebalance` and by a full re-plan when a vibe placement made
    for one domain's loads starts serving another's."""
    rows = []
    num_devices = config.drift_devices
    for before_name, after_name in DRIFT_PAIRS:
        before, after = (scale_loads(traces[name].counts, config.regimes["prefill"])
                         for name in (before_name, after_name))
        for profile in config.drift_profiles:
            devices = sample_devices(num_devices, profile, _rng(config, num_devices, profile))
            bound = float(lower_bound(after, devices).sum())
            old = plan(before, devices, "vibe")
            rebalanced, _moves = rebalance(old, after, devices)
            replanned = plan(after, devices, "vibe")
            moved = {name: migration_plan(old, new, 1).moved_slot_fraction
                     for name, new in (("rebalance", rebalanced), ("replan", replanned))}
            ratio = {name: float(makespan(p, after, devices).sum()) / bound
                     for name, p in (("stale", old), ("rebalanced", rebalanced), ("replanned", replanned))}
            rows.append({
                "pair": _pair_label(before_name, after_name), "profile": profile,
                "max_distance": float(cosine_distance(before, after).max()), **ratio,
                **{f"{k}_moved": float(v.mean()) for k, v in moved.items()},
                **{f"{k}_moved_max": float(v.max()) for k, v in moved.items()},
            })
    return rows


def scale(trace: Trace, config: BenchConfig) -> list[dict]:
    """The scale study on DeepSeek-V3 loads, once per (profile, regime) of config.scale_cases."""
    rows = []
    for profile, regime in config.scale_cases:
        study = replace(config.scale, profile=profile, tokens_per_expert=config.regimes[regime],
                        seed=config.seed)
        rows += [{"profile": profile, "regime": regime, **row} for row in scale_study(trace.counts, study)]
    return rows


# --- helpers -----------------------------------------------------------------------------------------

def _rng(config: BenchConfig, num_devices: int, profile: str) -> np.random.Generator:
    """The same device sample for a (G, profile) in every section and trace."""
    return np.random.default_rng([config.seed, num_devices, PROFILES.index(profile)])


def _hot(loads: np.ndarray, num_devices: int) -> np.ndarray:
    """bool [L]: the layer's hottest expert has more tokens than a device's fair share."""
    return loads.max(axis=1) > loads.sum(axis=1) / num_devices


def _pair_label(before: str, after: str) -> str:
    """'olmoe1b7b: arxiv -> github' from two trace names sharing a prefix and a suffix."""
    prefix = len(os.path.commonprefix([before, after]))
    suffix = len(os.path.commonprefix([before[::-1], after[::-1]]))
    model = before[:prefix].rstrip("_")
    return f"{model}: {before[prefix:len(before) - suffix]} -> {after[prefix:len(after) - suffix]}"


def _timed(repeats: int, fn, *args, **kwargs) -> dict:
    """Median and minimum wall time of `repeats` calls fn(*args, **kwargs), in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * min(times), "runs": repeats}


def _machine() -> dict:
    """Where the numbers come from; the load average says how shared the CPUs were."""
    return {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def _print_rows(title: str, rows: list[dict], columns: list[str]) -> None:
    table = [columns] + [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    print(f"\n## {title}")
    for line in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def _print_summary(title: str, rows: list[dict], keys: tuple[str, ...]) -> None:
    """Median and worst ratio to the bound per policy, median gain and captured gain, grouped by keys."""
    summary = []
    for group in dict.fromkeys(tuple(r[k] for k in keys) for r in rows):
        sel = [r for r in rows if tuple(r[k] for k in keys) == group]
        line = dict(zip(keys, group)) | {"cases": len(sel)}
        for policy in POLICIES:
            values = [r[policy] for r in sel]
            line[f"{policy} med"], line[f"{policy} max"] = float(np.median(values)), float(np.max(values))
        captured = np.array([r["captured"] for r in sel])
        line["gain med"] = float(np.median([r["gain"] for r in sel]))
        line["captured med"] = float(np.nanmedian(captured)) if np.any(~np.isnan(captured)) else float("nan")
        summary.append(line)
    columns = [*keys, "cases"] + [f"{p} {s}" for p in POLICIES for s in ("med", "max")]
    _print_rows(title, summary, columns + ["gain med", "captured med"])


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["profile"], r["regime"]) for r in result["scale"]))
    columns = max(3, len(cases))
    fig, axes = plt.subplots(2, columns, figsize=(6 * columns, 9), squeeze=False)
    _plot_quality(axes[0, 0], result["quality"])
    _plot_moves(axes[0, 1], result["moves"])
    _plot_exact(axes[0, 2], result["exact"])
    for ax, (profile, regime) in zip(axes[1], cases):
        _plot_scale(ax, [r for r in result["scale"] if (r["profile"], r["regime"]) == (profile, regime)])
        ax.set_title(f"scale study, {profile}, {regime}")
    for ax in [*axes[0, 3:], *axes[1, len(cases):]]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_quality(ax, rows: list[dict]) -> None:
    _bars_by_profile(ax, [r for r in rows if r["regime"] == "prefill"], POLICIES)
    ax.set(title="quality, prefill: median sum makespan / lower bound", ylabel="ratio")


def _plot_exact(ax, rows: list[dict]) -> None:
    _bars_by_profile(ax, rows, ("bound", "eplb", "vibe"))
    ax.set(title="small cases: median ratio to the MILP optimum", ylabel="ratio")


def _bars_by_profile(ax, rows: list[dict], keys: tuple[str, ...]) -> None:
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        medians = [np.median([r[key] for r in rows if r["profile"] == p] or [np.nan]) for p in PROFILES]
        ax.bar(np.arange(len(PROFILES)) + i * width, medians, width, label=key)
    ax.set_xticks(np.arange(len(PROFILES)) + width * (len(keys) - 1) / 2, PROFILES, rotation=20)
    ax.set_ylim(bottom=0.99)
    ax.legend()


def _plot_moves(ax, rows: list[dict]) -> None:
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["rebalance_moved"] for r in rows], 0.4, label="rebalance")
    ax.bar(x + 0.2, [r["replan_moved"] for r in rows], 0.4, label="full re-plan")
    ax.set_xticks(x, [f"{r['pair'].split(': ')[1]}\n{r['profile']}" for r in rows], fontsize=6, rotation=90)
    ax.set(title="drift pairs: mean fraction of slots moved per layer")
    ax.legend()


def _plot_scale(ax, rows: list[dict]) -> None:
    lines = dict.fromkeys((r["policy"], r["variant"]) for r in rows)
    for line in [k for k in lines if k != ("eplb", "even")]:  # eplb even is the baseline, gain 0
        mine = [r for r in rows if (r["policy"], r["variant"]) == line]
        ax.plot([r["num_devices"] for r in mine], [r["gain_vs_eplb_even"] for r in mine], marker="o",
                linestyle="--" if line[0] == "eplb" else "-", label=" ".join(line))
    ax.set_xscale("log", base=2)
    ax.set(xlabel="devices", ylabel="1 - T / T_eplb without redundant slots")
    ax.legend(fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
