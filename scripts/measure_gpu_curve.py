"""Measure one expert's latency curve on a device and fit the placement's `DeviceModel` to it.

Owns the measurement behind `deploy/data/gpu_expert_curve.json`, whose shape (knee, slope relative to
the flat cost) is the emulated devices' default curve (`deploy.app.gpu_curve_shape`): a realistic expert
(hidden 2048, intermediate 768, bfloat16 by default: the expert size of Qwen3-30B-A3B) at token counts
from 1 to 4096, after a warm-up that brings the device to steady clocks; the median of repeats per token
count; the robust flat-then-linear fit `placement.DeviceModel.fit` over every sample; NVML telemetry
before and after. Two timings: "graph" (the default on a GPU) replays the expert's kernels captured in a
CUDA graph, the device's own time; "service" (the default on a CPU) calls the service's expert path
`service.experts.run_experts`, kernels launched one by one from Python, so on a GPU the host's launch
time counts wherever the GPU waits for it. Ignores placement and serving. Writes nothing it did not measure.

    python scripts/measure_gpu_curve.py           # on a GPU: writes deploy/data/gpu_expert_curve.json
    python scripts/measure_gpu_curve.py --timing service --out deploy/data/gpu_expert_curve_service.json
    python scripts/measure_gpu_curve.py --device cpu --hidden 256 --intermediate 128 --max-tokens 256 \\
        --repeats 3 --warmup-s 0.2 --out /tmp/curve.json     # the CPU path, in seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.activations import ACT2FN

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a file (`python scripts/...`), not only under `make`

from placement import DeviceModel  # noqa: E402
from service.experts import ExpertFFN, ExpertStore, checksum, run_experts  # noqa: E402
from service.messages import ExpertTensors  # noqa: E402
from service.telemetry import read_telemetry  # noqa: E402

GPU_CURVE_PATH = REPO_ROOT / "deploy" / "data" / "gpu_expert_curve.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TIMINGS = ("service", "graph")


@dataclass(frozen=True)
class CurveConfig:
    """What one measurement runs.

    Attributes:
        device: torch device of the expert, "cpu", "cuda" or "cuda:N".
        dtype: expert and token dtype, a key of DTYPES.
        hidden, intermediate: expert shape (gate_up [2I, H], down [H, I]).
        hidden_act: activation of the gate projection, a key of transformers' ACT2FN.
        max_tokens: largest token count measured (the grid runs from 1 up to it).
        repeats: timed calls per token count (>= 1); their median is reported.
        warmup_s: seconds of back-to-back calls at max_tokens before timing (>= 0).
        seed: seed of the weights, the tokens and the order of the timed calls.
        timing: "graph" (CUDA only; the default there) captures the FFN once per token count in a CUDA
            graph and times its replay between CUDA events: the kernels' own time, as a graph-captured or
            fused MoE kernel would see it. "service" (the default on a CPU) times each call through the
            service's expert path (`run_experts`: kernels launched one by one from Python, CUDA events
            around them on a GPU, so host launch time counts wherever the GPU waits for it).
    """

    device: str = "cuda"
    dtype: str = "bfloat16"
    hidden: int = 2048
    intermediate: int = 768
    hidden_act: str = "silu"
    max_tokens: int = 4096
    repeats: int = 30
    warmup_s: float = 10.0
    seed: int = 0
    timing: str | None = None

    def __post_init__(self) -> None:
        if self.timing is None:
            object.__setattr__(self, "timing", "graph" if torch.device(self.device).type == "cuda" else "service")
        if self.timing not in TIMINGS:
            raise ValueError(f"timing must be one of {TIMINGS}, got {self.timing!r}")
        if self.timing == "graph" and torch.device(self.device).type != "cuda":
            raise ValueError("timing 'graph' needs a CUDA device (CUDA graphs)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act must be a transformers activation, got {self.hidden_act!r}")
        if min(self.hidden, self.intermediate, self.max_tokens, self.repeats) < 1:
            raise ValueError(f"hidden, intermediate, max_tokens and repeats must be >= 1, got {self}")
        if self.warmup_s < 0:
            raise ValueError(f"warmup_s must be >= 0, got {self.warmup_s!r}")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: no CUDA device here (use --device cpu for the CPU path)")


def token_grid(max_tokens: int) -> list[int]:
    """Powers of two and the points halfway between them (1, 2, 3, 4, 6, 8, 12, ...), up to max_tokens.

    The half steps resolve the knee of the curve, which lies between powers of two on most devices.
    """
    grid = {1, max_tokens}
    power = 1
    while power < max_tokens:
        grid.update(n for n in (power, power + power // 2) if n <= max_tokens)
        power *= 2
    return sorted(grid)


def synthetic_expert(config: CurveConfig) -> ExpertStore:
    """A store holding one random expert (layer 0, expert 0) of the configured shape, on the device."""
    generator = torch.Generator().manual_seed(config.seed)
    h, i = config.hidden, config.intermediate
    tensors = {"gate_up": torch.randn(2 * i, h, generator=generator) / h**0.5,
               "down": torch.randn(h, i, generator=generator) / i**0.5}
    store = ExpertStore(config.device, DTYPES[config.dtype])
    store.add([ExpertTensors(0, 0, tensors, checksum(tensors))])
    return store


def measure(config: CurveConfig) -> tuple[np.ndarray, np.ndarray]:
    """Warm up, then time `repeats` calls per token count, each round in a shuffled order.

    Returns:
        tokens int64 [R * K], seconds float64 [R * K]: every timed call (K token counts, R repeats).
    """
    store = synthetic_expert(config)
    ffn = ExpertFFN(config.hidden_act)
    generator = torch.Generator().manual_seed(config.seed)
    tokens = torch.randn(config.max_tokens, config.hidden, generator=generator).to(store.device, store.dtype)
    grid = token_grid(config.max_tokens)
    if config.timing == "graph":
        call = _graph_calls(store, tokens, grid, ffn)
    else:
        call = lambda n: run_experts(store, 0, [0], [n], tokens[:n], ffn)[1][0]  # noqa: E731
    for n in grid:  # first calls pay for kernel selection and allocation
        call(n)
    deadline = time.monotonic() + config.warmup_s
    while time.monotonic() < deadline:
        call(config.max_tokens)
    order = random.Random(config.seed)
    samples = []
    for _ in range(config.repeats):
        for n in order.sample(grid, len(grid)):
            samples.append((n, call(n)))
    counts, seconds = zip(*samples, strict=True)
    return np.array(counts, dtype=np.int64), np.array(seconds, dtype=np.float64)


def _graph_calls(store: ExpertStore, tokens: torch.Tensor, grid: list[int], ffn: ExpertFFN):
    """A function n -> seconds of one replay of the expert FFN on n tokens, captured in a CUDA graph."""
    weights = store.get(0, 0)
    graphs = {}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graph capture requires
            for n in grid:
                ffn(tokens[:n], weights)
        torch.cuda.current_stream().wait_stream(side)
        for n in grid:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ffn(tokens[:n], weights)
            graphs[n] = graph
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def call(n: int) -> float:
        begin.record()
        graphs[n].replay()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000.0

    return call


def summarize(config: CurveConfig, tokens: np.ndarray, seconds: np.ndarray, telemetry: dict) -> dict:
    """The JSON record: configuration, per-token-count quantiles, the fit and where it was measured."""
    grid = np.unique(tokens)
    per_count = [seconds[tokens == n] for n in grid]
    median = np.array([np.median(s) for s in per_count])
    fit = DeviceModel.fit(tokens, seconds)
    device = torch.device(config.device)
    return {
        "what": ("seconds of one expert FFN call (SwiGLU) per token count, "
                 + ("through service.experts.run_experts" if config.timing == "service"
                    else "one CUDA graph replay of service.experts.ExpertFFN (kernel time, no launch overhead)")),
        "config": asdict(config),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tokens": grid.tolist(),
        "median_s": median.tolist(),
        "p10_s": [float(np.quantile(s, 0.1)) for s in per_count],
        "p90_s": [float(np.quantile(s, 0.9)) for s in per_count],
        "fit": asdict(fit),
        "fit_max_rel_error": float(np.max(np.abs(fit.latency(grid) - median) / median)),
        "telemetry": telemetry,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    defaults = CurveConfig.__dataclass_fields__
    for name in ("device", "dtype", "hidden", "intermediate", "hidden_act", "max_tokens", "repeats",
                 "warmup_s", "seed"):
        default = defaults[name].default
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--timing", choices=TIMINGS, default=None,
                        help="graph: kernel time (CUDA, the default there); service: through run_experts")
    parser.add_argument("--out", type=Path, default=GPU_CURVE_PATH, help="JSON file to write")
    args = parser.parse_args(argv)
    try:
        config = CurveConfig(**{k: v for k, v in vars(args).items() if k != "out"})
    except ValueError as exc:
        parser.error(str(exc))
    if args.out.resolve() == GPU_CURVE_PATH and config.timing != "graph":
        parser.error(f"only a GPU's kernel time (--timing graph) goes into {GPU_CURVE_PATH}: pass --out")
    torch.set_num_threads(1)  # like a worker (WorkerConfig.num_threads); matters on the CPU path only
    before = asdict(read_telemetry(0, config.device))
    tokens, seconds = measure(config)
    telemetry = {"before": before, "after": asdict(read_telemetry(0, config.device))}
    record = summarize(config, tokens, seconds, telemetry)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    fit = record["fit"]
    print(f"{record['device_name']} {config.dtype} expert ({config.timing} timing) {config.hidden}x{config.intermediate}: "
          f"fixed {fit['fixed'] * 1e6:.1f} us, knee {fit['knee']:.0f} tokens, slope {fit['slope'] * 1e9:.2f} ns/token "
          f"(max relative error of the fit vs medians {record['fit_max_rel_error']:.1%}) -> {args.out}")
    for n, m in zip(record["tokens"], record["median_s"]):
        print(f"  {n:6d} tokens  {m * 1e6:10.1f} us")
    return record


if __name__ == "__main__":
    main()
