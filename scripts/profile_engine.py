"""Where an engine step's time goes: decode steps of the in-process `Engine` under cProfile (Python functions,
host-side; on a GPU a function that waits for the device, `.tolist()` or `.cpu()`, holds the wait) and
torch.profiler (operators, CUDA kernels, synchronisations, host-to-device copies), with a plain forward of
the same model over transformers' own cache for comparison.

    python scripts/profile_engine.py --device cuda --streams 1 32 --out /tmp/profile
    python scripts/profile_engine.py --model /tmp/wide-moe --dtype bfloat16 --device cuda --out /tmp/profile

Prints the mean step and forward times and writes, per stream count, the cProfile and torch.profiler tables to
--out (profile_<streams>.txt).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from deploy.app import DEFAULT_MODEL  # noqa: E402
from load_tests.bench_serving import load_model  # noqa: E402
from service.engine import Engine, EngineConfig  # noqa: E402
from service.sampling import SamplingParams  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decoding_engine(args, streams: int) -> Engine:
    """An engine with `streams` sequences past their prefill, decoding."""
    engine = Engine(load_model(args), EngineConfig(max_num_seqs=max(streams, 1), max_model_len=args.prompt + 4 * args.steps + 8))
    for i in range(streams):
        prompt = [(7 * i + j) % 4000 + 3 for j in range(args.prompt)]
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=4 * args.steps, temperature=0.0, ignore_eos=True))
    while engine.num_waiting or any(seq.num_cached < seq.num_prompt_tokens for seq in engine._running):
        engine.step()
    for _ in range(3):
        engine.step()
    return engine


def timed(fn, steps: int, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def profile(args, streams: int) -> str:
    engine = decoding_engine(args, streams)
    step_s = timed(engine.step, args.steps, args.device)
    reference = load_model(args)
    ids = torch.tensor([[5] * args.prompt] * streams, device=args.device)
    with torch.inference_mode():
        cache = reference(ids, use_cache=True).past_key_values
        token = torch.tensor([[7]] * streams, device=args.device)

        def forward():
            reference(token, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # (the position it added: every forward attends the prompt and one more)

        forward()  # (once untimed: cuDNN's attention, which transformers' SDPA call may take, plans its shape)
        forward_s = timed(forward, args.steps, args.device)
    head = (f"streams={streams} device={args.device} model={args.model.name} engine_step_ms={step_s * 1e3:.2f} "
            f"transformers_forward_ms={forward_s * 1e3:.2f}")
    print(head, flush=True)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        engine.step()
    sync(args.device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            engine.step()
        sync(args.device)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    return f"{head}\n\n== cProfile, {args.steps} steps, by own time\n{text.getvalue()}\n== torch.profiler\n{table}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("/tmp/profile"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for streams in args.streams:
        (args.out / f"profile_{streams}.txt").write_text(profile(args, streams))


if __name__ == "__main__":
    main()
