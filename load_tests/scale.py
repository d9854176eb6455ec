"""The scale study: `python -m load_tests.scale --out bench`.

Owns the question "does ViBE's gain survive at 64-128 devices when redundant experts and uneven expert
counts are allowed?" asked of `placement.simulate.scale_study` on a real trace (DeepSeek-V3's 58 MoE
layers, 256 experts) with per-device curves sampled from variability profiles within the published
range around the curve of one DeepSeek-V3 expert measured on an H200
(`deploy/data/gpu_expert_curve_dsv3.json`, kernel time: 43.9 us flat up to 150 tokens, then 139 ns per
token), `<out>/scale.json` and `<out>/scale.png` (sum_l makespan over the proven bound per policy and
variant, and the gain over EPLB without redundant experts). Without the trace folder it says so and
skips (CI may lack it). Ignores serving: this is the placement simulator only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from placement import DeviceModel, ScaleStudyConfig, load_trace, scale_study, trace_dir

TRACE = "deepseek_v3_L3-60_calib_normalized4096"
MEASURED_CURVE = Path(__file__).resolve().parents[1] / "deploy" / "data" / "gpu_expert_curve_dsv3.json"


def measured_device(path: Path = MEASURED_CURVE) -> DeviceModel:
    """The fitted curve of a measured expert (scripts/measure_gpu_curve.py's JSON)."""
    return DeviceModel(**json.loads(path.read_text())["fit"])


@dataclass(frozen=True)
class ScaleConfig:
    """The cases of the study.

    Attributes:
        trace: trace name in the trace folder.
        cases: (variability profile, mean tokens per expert) pairs; 1024 is prefill-like (above the
            measured curve's 150-token knee), 32 decode-like. Profiles: "spread7" (speeds uniform in
            1 +- 3.5%), "one_slow13" (one device 13% slower), "two_throttled" (two devices at 0.8x): all within the
            published 13% static spread and 70% throttling floor.
        study: the simulator's settings shared by every case (profile and tokens are set per case).
    """

    trace: str = TRACE
    cases: tuple[tuple[str, float], ...] = (("spread7", 1024.0), ("one_slow13", 1024.0),
                                            ("two_throttled", 1024.0), ("spread7", 32.0))
    study: ScaleStudyConfig = ScaleStudyConfig(device_counts=(8, 16, 32, 64, 128), num_experts=256,
                                               num_layers=8, base_device=measured_device())

    def __post_init__(self) -> None:
        if not self.cases:
            raise ValueError("the scale study needs at least one case")
        for profile, tokens in self.cases:
            replace(self.study, profile=profile, tokens_per_expert=tokens)  # validates the pair


def study_rows(counts, config: ScaleConfig) -> list[dict]:
    """Every case's rows of `scale_study`, each tagged with its profile and tokens per expert."""
    rows = []
    for profile, tokens in config.cases:
        study = replace(config.study, profile=profile, tokens_per_expert=tokens)
        rows += [{"profile": profile, "tokens_per_expert": tokens, **row} for row in scale_study(counts, study)]
    return rows


def run(out: Path, config: ScaleConfig = ScaleConfig()) -> dict | None:
    """Run the study, write `<out>/scale.json` and `<out>/scale.png`; None when the traces are absent."""
    from load_tests import plots

    try:
        counts = load_trace(trace_dir() / f"{config.trace}.npz").counts
    except FileNotFoundError as err:
        print(f"scale study skipped: {err}", file=sys.stderr)
        return None
    started = time.perf_counter()
    result = {"config": asdict(config), "rows": study_rows(counts, config)}
    result["runtime_s"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=1))
    plots.scale_study(result["rows"], out / "scale.png")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    args = parser.parse_args(argv)
    result = run(args.out)
    if result is not None:
        for row in result["rows"]:
            if row["policy"] == "vibe" or row["variant"] in ("even", "redundant"):
                print(f"{row['profile']:>13} tokens={row['tokens_per_expert']:<6g} G={row['num_devices']:<4} "
                      f"{row['variant']:>16} {row['policy']:>5} bound_ratio={row['bound_ratio']:.4f} "
                      f"gain_vs_eplb_even={row['gain_vs_eplb_even']:+.4f}")
        print(f"wrote {args.out}/scale.json and {args.out}/scale.png in {result['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
