"""Runtime benchmark: per-MoE-layer dispatch overhead, and distributed vs single-process decode throughput.

    python -m service.bench_runtime --out bench                  # `make bench-runtime`
    python -m service.bench_runtime --out /tmp/b --model PATH    # another local checkpoint

Owns the measurement only: real expert-worker actors on a local Ray cluster (emulation off), reached
over their Unix-socket data plane, exactly as the engine reaches them. Writes `<out>/runtime.json` and
prints a table. Ignores placement quality (routing here is uniform random, every expert on one device).

- Dispatch overhead per MoE-layer call = wall time of `DispatchingExperts.forward` minus the slowest
  worker's reported compute (the sum of its per-expert seconds) in that call. `engine_ms` is the same
  call with in-process channels that answer instantly with zeros: the engine's own Python and torch
  work (grouping, gathering, combining), the rest is transport and the workers' handling. On a CPU
  with fewer cores than workers the workers cannot compute in parallel as devices would, so part of
  the others' compute (`compute_all_workers_median_ms`) shows up as overhead too.
- Throughput: greedy decode steps with a KV cache after a prompt, tokens per second, for the model
  with its experts on the workers and for the unmodified model in this process.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from placement import Placement
from service.checkpoint import ExpertLayout, load_layout
from service.dispatch import DispatchContext, DispatchingExperts, SocketChannel
from service.model import load_engine_model, load_reference_model
from service.worker import WorkerConfig
from service.worker_actor import ExpertWorkerActor

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "deploy" / "models" / "vibe-tiny-moe"
TARGET_OVERHEAD_MS = 2.0


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Attributes:
        model: local checkpoint folder (a supported MoE architecture).
        workers: worker counts G for the overhead sweep; the throughput runs use the first.
        tokens: tokens per MoE-layer call in the overhead sweep.
        calls: timed calls per (G, tokens) point, after `warmup` untimed ones.
        batches: sequences per decode step in the throughput runs.
        prompt_len: prompt tokens before the timed decode steps.
        decode_steps: timed decode steps per batch size.
        throughput_repeats: runs of each decode per batch size, the distributed and the single-process one
            taking turns, each pair in the order the last one did not start with (the host's load drifts: one run
            of each, in turn, moved their ratio 0.32-0.42x from one benchmark run to the next).
        worker_cpus: Ray CPUs reserved per worker actor (all of them must fit in 2).
        engine_threads: torch intra-op threads of this (engine) process. 1 by default: on a small CPU
            the worker processes share the cores, and a second intra-op thread mostly waits at OpenMP
            barriers for a descheduled peer (on 2 busy cores, 2 threads made every model 5-40x slower).
        seed: of prompts and routing.
    """

    model: Path = DEFAULT_MODEL
    workers: tuple[int, ...] = (4, 8)
    tokens: tuple[int, ...] = (1, 4, 16, 64, 128, 512)
    calls: int = 100
    warmup: int = 10
    batches: tuple[int, ...] = (1, 16, 64)
    prompt_len: int = 16
    decode_steps: int = 32
    throughput_repeats: int = 5
    worker_cpus: float = 0.2
    engine_threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"no checkpoint at {str(self.model)!r} (build it with `make model`, or pass --model)")
        for name in ("workers", "tokens", "batches"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ValueError(f"BenchConfig.{name} must be non-empty and >= 1, got {getattr(self, name)}")
        for name in ("calls", "warmup", "prompt_len", "decode_steps", "throughput_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.engine_threads < 1:
            raise ValueError(f"BenchConfig.engine_threads must be >= 1, got {self.engine_threads}")
        if not 0 < self.worker_cpus * max(self.workers) <= 2:
            raise ValueError(f"{max(self.workers)} workers x {self.worker_cpus} CPUs must fit in 2 CPUs")


class _InstantChannel:
    """Answers at once with zero outputs and zero seconds: isolates the engine's own dispatch work."""

    def __init__(self) -> None:
        self._replies: list[tuple[torch.Tensor, np.ndarray]] = []

    def submit(self, seq, layer, experts, counts, tokens) -> None:
        self._replies.append((torch.zeros_like(tokens), np.zeros(len(experts))))

    def result(self) -> tuple[torch.Tensor, np.ndarray]:
        return self._replies.pop(0)

    def close(self) -> None:
        """Nothing to release."""


def contiguous_placement(layout: ExpertLayout, num_devices: int) -> Placement:
    expert_device = np.arange(layout.num_experts) * num_devices // layout.num_experts
    return Placement.from_expert_devices(np.tile(expert_device, (layout.num_moe_layers, 1)), num_devices)


def serve_on(actors, infos, config: BenchConfig, layout: ExpertLayout, num_devices: int) -> DispatchContext:
    """Load the contiguous placement's experts on the first `num_devices` actors; a context reaching them."""
    placement = contiguous_placement(layout, num_devices)
    ray.get([actor.drop_experts.remote(ray.get(actor.held_experts.remote())) for actor in actors])
    ray.get([actors[g].load_experts.remote(str(config.model), sorted(placement.experts_on(g)))
             for g in range(num_devices)])
    return DispatchContext(placement, {g: SocketChannel(infos[g].unix_address) for g in range(num_devices)})


def random_routing(layout: ExpertLayout, num_tokens: int, rng: np.random.Generator):
    """hidden [T, H], top_k_index [T, k] uniform without replacement, top_k_weights [T, k] summing to 1."""
    hidden = torch.from_numpy(rng.standard_normal((num_tokens, layout.hidden_size), dtype=np.float32))
    index = torch.from_numpy(np.argsort(rng.random((num_tokens, layout.num_experts)), axis=1)[:, :layout.top_k])
    weights = torch.from_numpy(rng.random((num_tokens, layout.top_k), dtype=np.float32))
    return hidden, index, weights / weights.sum(-1, keepdim=True)


def time_calls(module: DispatchingExperts, layout: ExpertLayout, num_tokens: int, config: BenchConfig,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per timed call [calls]: wall seconds, the slowest worker's compute seconds, all workers' compute."""
    rng = np.random.default_rng(config.seed + num_tokens)
    wall, compute, total = [], [], []
    for i in range(config.warmup + config.calls):
        hidden, index, weights = random_routing(layout, num_tokens, rng)
        start = time.perf_counter()
        module(hidden, index, weights)
        elapsed = time.perf_counter() - start
        samples = module.context.drain_report("bench").device_samples
        if i >= config.warmup:
            wall.append(elapsed)
            compute.append(max((float(s.seconds.sum()) for s in samples), default=0.0))
            total.append(sum(float(s.seconds.sum()) for s in samples))
    return np.array(wall), np.array(compute), np.array(total)


def measure_overhead(actors, infos, config: BenchConfig, layout: ExpertLayout) -> list[dict]:
    rows = []
    for num_devices in config.workers:
        context = serve_on(actors, infos, config, layout, num_devices)
        instant = DispatchContext(context.placement, {g: _InstantChannel() for g in range(num_devices)})
        for num_tokens in config.tokens:
            wall, compute, total = time_calls(DispatchingExperts(0, layout.num_experts, context), layout,
                                              num_tokens, config)
            engine, _, _ = time_calls(DispatchingExperts(0, layout.num_experts, instant), layout, num_tokens, config)
            rows.append(overhead_row(num_devices, num_tokens, wall, compute, total, engine))
            print(_format_overhead(rows[-1]), flush=True)
        for channel in context.channels.values():
            channel.close()
    return rows


def overhead_row(num_devices: int, num_tokens: int, wall: np.ndarray, compute: np.ndarray, total: np.ndarray,
                 engine: np.ndarray) -> dict:
    """One row of the overhead table from per-call seconds: wall time, the slowest worker's compute, all workers'
    compute, the engine alone (instant channels); in ms."""
    overhead = (wall - compute) * 1e3
    return {"workers": num_devices, "tokens": num_tokens,
            "overhead_median_ms": float(np.median(overhead)),
            "overhead_p90_ms": float(np.percentile(overhead, 90)),
            "wall_median_ms": float(np.median(wall) * 1e3),
            "compute_median_ms": float(np.median(compute) * 1e3),
            "compute_all_workers_median_ms": float(np.median(total) * 1e3),
            # per call, then the median: a lower bound of transport and engine cost (the difference of the two
            # medians above is none: it may exceed both this and the overhead's median; a review)
            "wall_minus_all_compute_median_ms": float(np.median(wall - total) * 1e3),
            "engine_median_ms": float(np.median(engine) * 1e3)}


def decode_tokens_per_s(model, batch: int, config: BenchConfig, vocab_size: int) -> float:
    """Greedy decode throughput (tokens/s) of `decode_steps` steps after a `prompt_len` prompt."""
    generator = torch.Generator().manual_seed(config.seed + batch)
    ids = torch.randint(0, vocab_size, (batch, config.prompt_len), generator=generator)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        start = time.perf_counter()
        for _ in range(config.decode_steps):
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)
        elapsed = time.perf_counter() - start
    return batch * config.decode_steps / elapsed


def throughput_row(num_devices: int, batch: int, distributed: list[float], single: list[float]) -> dict:
    """One batch size's decode throughput: the median of each kind's runs (tokens/s), and the ratio as the median of
    the ratios of runs made side by side (pair k: the k-th of each), with its range."""
    ratios = [d / s for d, s in zip(distributed, single, strict=True)]
    return {"workers": num_devices, "batch": batch, "distributed_tokens_per_s": float(np.median(distributed)),
            "single_process_tokens_per_s": float(np.median(single)), "ratio": float(np.median(ratios)),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": ratios,
            "distributed_runs": distributed, "single_process_runs": single}


def measure_throughput(actors, infos, config: BenchConfig, layout: ExpertLayout) -> list[dict]:
    num_devices = config.workers[0]
    context = serve_on(actors, infos, config, layout, num_devices)
    engine = load_engine_model(config.model, context=context).model
    reference = load_reference_model(config.model)
    vocab_size = reference.config.vocab_size
    rows = []
    for batch in config.batches:
        runs = {"distributed": [], "single": []}
        for repeat in range(config.throughput_repeats):
            order = (("distributed", engine), ("single", reference))
            for name, model in order if repeat % 2 == 0 else reversed(order):
                runs[name].append(decode_tokens_per_s(model, batch, config, vocab_size))
        rows.append(throughput_row(num_devices, batch, runs["distributed"], runs["single"]))
        row = rows[-1]
        print(f"decode batch {batch:3d}: distributed {row['distributed_tokens_per_s']:8.1f} tok/s, single process "
              f"{row['single_process_tokens_per_s']:8.1f} tok/s, ratio {row['ratio']:.2f} "
              f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f} over {len(row['ratios'])} pairs)", flush=True)
    for channel in context.channels.values():
        channel.close()
    return rows


def _format_overhead(row: dict) -> str:
    return (f"G={row['workers']} T={row['tokens']:4d}: overhead median {row['overhead_median_ms']:6.3f} ms, "
            f"p90 {row['overhead_p90_ms']:6.3f} ms (wall {row['wall_median_ms']:6.3f}, compute "
            f"{row['compute_median_ms']:6.3f}, all workers {row['compute_all_workers_median_ms']:6.3f}, "
            f"wall minus all workers' compute {row['wall_minus_all_compute_median_ms']:6.3f}, "
            f"engine-only {row['engine_median_ms']:6.3f})")


def run(config: BenchConfig) -> dict:
    """Start a local 2-CPU Ray cluster and the workers, measure, shut everything down."""
    layout = load_layout(config.model)
    torch.set_num_threads(config.engine_threads)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        actors = [ExpertWorkerActor.options(num_cpus=config.worker_cpus, max_concurrency=4).remote(
            WorkerConfig(index=g, hidden_act=layout.hidden_act, clamped_swiglu=layout.clamped_swiglu)) for g in range(max(config.workers))]
        infos = ray.get([actor.info.remote() for actor in actors])
        overhead = measure_overhead(actors, infos, config, layout)
        throughput = measure_throughput(actors, infos, config, layout)
        ray.get([actor.shutdown.remote() for actor in actors])
    finally:
        ray.shutdown()
    return {
        "config": {**asdict(config), "model": str(config.model)},
        "layout": asdict(layout),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "emulation": False},
        "target_overhead_ms": TARGET_OVERHEAD_MS,
        "overhead": overhead,
        "throughput": throughput,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"), help="folder of runtime.json")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="local checkpoint folder")
    parser.add_argument("--calls", type=int, default=BenchConfig.calls, help="timed calls per point")
    parser.add_argument("--decode-steps", type=int, default=BenchConfig.decode_steps)
    parser.add_argument("--engine-threads", type=int, default=BenchConfig.engine_threads,
                        help="torch intra-op threads of the engine process")
    args = parser.parse_args(argv)
    result = run(BenchConfig(model=args.model, calls=args.calls, decode_steps=args.decode_steps,
                             engine_threads=args.engine_threads))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "runtime.json"
    path.write_text(json.dumps(result, indent=2))
    medians = {row["tokens"]: row["overhead_median_ms"] for row in result["overhead"]
               if row["workers"] == result["config"]["workers"][0]}
    worst = max(medians.values())
    print(f"wrote {path}; worst median overhead with {result['config']['workers'][0]} workers: {worst:.3f} ms "
          f"(target {TARGET_OVERHEAD_MS} ms: {'met' if worst <= TARGET_OVERHEAD_MS else 'NOT met'})")


if __name__ == "__main__":
    main()
