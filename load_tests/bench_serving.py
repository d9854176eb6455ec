"""Serving benchmark: continuous batching against transformers' batched ``generate`` on the same machine.

Runs closed-loop clients (1, 8 and 32 concurrent streams by default), each sending fixed-length prompts
for a fixed number of output tokens, against the in-process `AsyncEngine` (or, with ``--http``, the
OpenAI app served by uvicorn in this process; with ``--url``, any OpenAI-compatible server that accepts
vLLM's ``ignore_eos``), and the
same model's batched greedy ``generate`` with the same prompts. Reports output tokens/s and TTFT/TPOT
p50/p90, prints a table and writes ``<out>/serving.json``. Emulated devices are not involved: the model
runs whole, in this process. Every request's prompt is its own (the warm-up's and every level's are
disjoint slices of one text): the engine's prefix cache, on by default, finds none of them, as the
baseline, which has no cache, does.

    python -m load_tests.bench_serving --out bench                 # `make bench-serving`
    python -m load_tests.bench_serving --concurrency 1 8 --output-tokens 32 --http
    python -m load_tests.bench_serving --device cuda --dtype bfloat16 --model /tmp/wide-moe  # on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from pydoc_data import topics

import httpx
import numpy as np
import torch
from torch.nn.attention import sdpa_kernel
from transformers import AutoModelForCausalLM

from deploy.app import DEFAULT_MODEL
from service.async_engine import AsyncEngine
from service.attention import SDPA_BACKENDS
from service.engine import Engine, EngineConfig
from service.sampling import SamplingParams
from service.tokenizer import load_tokenizer

TARGET_THROUGHPUT_RATIO_AT_32 = 0.5
TARGET_TTFT_P50_MS_AT_1 = 300.0


@dataclass(frozen=True)
class RequestTiming:
    """One request: seconds from submission to first and last token, and output tokens."""

    ttft: float
    e2e: float
    num_tokens: int

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.num_tokens - 1) if self.num_tokens > 1 else None


@dataclass(frozen=True)
class RunResult:
    """One concurrency level of one system."""

    system: str
    concurrency: int
    num_requests: int
    output_tokens: int
    seconds: float
    output_tokens_per_s: float
    ttft_p50_ms: float | None = None
    ttft_p90_ms: float | None = None
    tpot_p50_ms: float | None = None
    tpot_p90_ms: float | None = None


def make_prompts(tokenizer, num: int, length: int) -> list[list[int]]:
    """``num`` distinct prompts of exactly ``length`` tokens, cut from CPython's reference text."""
    ids = tokenizer.encode(" ".join(topics.topics.values()), verbose=False)
    if len(ids) < num * length:
        raise ValueError(f"the reference text has {len(ids)} tokens, fewer than {num} prompts of {length}")
    return [ids[i * length:(i + 1) * length] for i in range(num)]


def prompt_sets(tokenizer, levels: list[int], per_stream: int,
                length: int) -> tuple[list[int], dict[int, list[list[int]]]]:
    """The warm-up prompt and each concurrency level's ``level x per_stream`` prompts, no two the same: consecutive
    slices of one text, offset by the prompts already used. Each level cut from the start of the text repeated
    the lower levels' prompts (and the warm-up's), so with the engine's prefix cache on 1 of 2 measured requests
    at 1 stream, 2 of 16 at 8 and 16 of 64 at 32 skipped their prefill, which the baseline never does (an audit)."""
    prompts = make_prompts(tokenizer, 1 + per_stream * sum(levels), length)
    by_level, used = {}, 1
    for level in levels:
        by_level[level] = prompts[used:used + level * per_stream]
        used += level * per_stream
    return prompts[0], by_level


def summarise(system: str, concurrency: int, timings: list[RequestTiming], seconds: float) -> RunResult:
    tokens = sum(t.num_tokens for t in timings)
    ttft = [t.ttft * 1e3 for t in timings]
    tpot = [t.tpot * 1e3 for t in timings if t.tpot is not None]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return RunResult(system, concurrency, len(timings), tokens, seconds, tokens / seconds,
                     pct(ttft, 50), pct(ttft, 90), pct(tpot, 50), pct(tpot, 90))


async def closed_loop(send: Callable[[list[int]], Awaitable[RequestTiming]], prompts: list[list[int]],
                      concurrency: int) -> tuple[list[RequestTiming], float]:
    """``concurrency`` clients, each sending its share of ``prompts`` one after another."""
    async def client(mine: list[list[int]]) -> list[RequestTiming]:
        return [await send(p) for p in mine]

    start = time.perf_counter()
    shares = await asyncio.gather(*(client(prompts[i::concurrency]) for i in range(concurrency)))
    return [t for share in shares for t in share], time.perf_counter() - start


def engine_sender(engine: AsyncEngine, params: SamplingParams) -> Callable[[list[int]], Awaitable[RequestTiming]]:
    counter = iter(range(1 << 62))

    async def send(prompt: list[int]) -> RequestTiming:
        start = time.perf_counter()
        first, n = None, 0
        async for out in engine.generate(f"bench-{next(counter)}", prompt, params):
            n += len(out.new_token_ids)
            first = first if first is not None else time.perf_counter()
        return RequestTiming(first - start, time.perf_counter() - start, n)

    return send


def http_sender(base_url: str, model: str, max_tokens: int) -> tuple[Callable, Callable[[], Awaitable[None]]]:
    """A sender of streamed completions (token-id prompts, ``ignore_eos``) over HTTP, and its close function.

    Parses the SSE stream with httpx and json rather than the `openai` client, whose per-chunk parsing
    costs more CPU than the server's work on this machine and would be measured instead of the server.
    """
    client = httpx.AsyncClient(base_url=base_url, timeout=600, limits=httpx.Limits(max_connections=256),
                               headers={"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'unused')}"})

    async def send(prompt: list[int]) -> RequestTiming:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first, n = None, 0
        async with client.stream("POST", "/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter()
                n = chunk["usage"]["completion_tokens"] if chunk.get("usage") else n
        end = time.perf_counter()
        return RequestTiming((first or end) - start, end - start, n)

    return send, client.aclose


def bench_generate(model, prompts: list[list[int]], batch: int, output_tokens: int) -> RunResult:
    """Batched greedy ``generate`` (all prompts the same length, so no padding), batch after batch, its attention on
    the engine's scaled-dot-product backends (`SDPA_BACKENDS`: cuDNN's left out, whose per-shape planning would
    cost ``generate`` milliseconds a step on a GPU in half precision, its cache growing a token a step)."""
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i:i + batch], device=model.device)
        with torch.inference_mode(), sdpa_kernel(SDPA_BACKENDS):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_tokens,
                           min_new_tokens=output_tokens, do_sample=False, pad_token_id=0)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    return RunResult("generate", batch, len(prompts), len(prompts) * output_tokens, seconds,
                     len(prompts) * output_tokens / seconds)


def serve_levels(args, tokenizer, config: EngineConfig, warmup: list[int],
                 prompts_by_level: dict[int, list[list[int]]]) -> list[RunResult]:
    """Every concurrency level against ``--url``, or against a fresh in-process engine (direct or ``--http``)."""
    if args.url:
        args.base_url = args.url
        return _levels(args, None, warmup, prompts_by_level)
    engine = AsyncEngine(Engine(load_model(args), config, tokenizer=tokenizer), num_threads=args.threads)
    engine.start()
    try:
        with _in_process_http(args, engine):
            return _levels(args, engine, warmup, prompts_by_level)
    finally:
        engine.shutdown()


def _levels(args, engine: AsyncEngine | None, warmup: list[int],
            prompts_by_level: dict[int, list[list[int]]]) -> list[RunResult]:
    """One unreported request to warm up (its prompt none of the measured ones), then every level in turn."""
    _measure(args, engine, 1, [warmup])
    results = []
    for concurrency, prompts in prompts_by_level.items():
        results.append(_measure(args, engine, concurrency, prompts))
        print_row(results[-1])
    return results


def _measure(args, engine: AsyncEngine | None, concurrency: int, prompts: list[list[int]]) -> RunResult:
    if args.url or args.http:
        return asyncio.run(_http_level(args, concurrency, prompts))
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    timings, seconds = asyncio.run(closed_loop(engine_sender(engine, params), prompts, concurrency))
    return summarise("engine", concurrency, timings, seconds)


async def _http_level(args, concurrency: int, prompts: list[list[int]]) -> RunResult:
    send, close = http_sender(args.base_url, args.served_model_name, args.output_tokens)
    try:
        timings, seconds = await closed_loop(send, prompts, concurrency)
    finally:
        await close()
    return summarise("http", concurrency, timings, seconds)


def print_row(r: RunResult) -> None:
    fmt = lambda x: f"{x:8.1f}" if x is not None else "       -"  # noqa: E731
    print(f"{r.system:>9} {r.concurrency:>4} {r.num_requests:>5} {r.output_tokens_per_s:10.1f} "
          f"{fmt(r.ttft_p50_ms)} {fmt(r.ttft_p90_ms)} {fmt(r.tpot_p50_ms)} {fmt(r.tpot_p90_ms)}", flush=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    levels = sorted(set(args.concurrency))
    warmup, prompts_by_level = prompt_sets(tokenizer, levels, args.requests_per_stream, args.prompt_tokens)
    config = EngineConfig(max_num_seqs=max(levels), max_num_batched_tokens=max(args.max_num_batched_tokens, max(levels)),
                          max_model_len=args.prompt_tokens + args.output_tokens)
    print(f"{'system':>9} {'conc':>4} {'reqs':>5} {'out tok/s':>10} {'TTFT p50':>8} {'TTFT p90':>8} "
          f"{'TPOT p50':>8} {'TPOT p90':>8}   (ms)")
    served = serve_levels(args, tokenizer, config, warmup, prompts_by_level)
    reference = load_model(args)
    bench_generate(reference, [warmup], 1, 4)  # warm-up
    baseline = []
    for c in levels:
        baseline.append(bench_generate(reference, prompts_by_level[c], c, args.output_tokens))
        print_row(baseline[-1])
    write_report(args, config, served, baseline)


def load_model(args) -> torch.nn.Module:
    """The model of ``--model`` in ``--dtype`` (the checkpoint's if not given) on ``--device``, in eval mode."""
    dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()


@contextlib.contextmanager
def _in_process_http(args, engine: AsyncEngine) -> Iterator[None]:
    """With ``--http``, serve the OpenAI app over ``engine`` and set ``args.base_url`` to it."""
    if not args.http:
        yield
        return
    from service.app import create_app, serve_locally

    with serve_locally(create_app(engine, served_model_name=args.served_model_name)) as base:
        url = f"{base}/v1"
        args.base_url = url
        yield


def write_report(args, config: EngineConfig, served: list[RunResult], baseline: list[RunResult]) -> None:
    by_level = {r.concurrency: r for r in served}
    base = {r.concurrency: r for r in baseline}
    ratios = {c: by_level[c].output_tokens_per_s / base[c].output_tokens_per_s for c in by_level}
    checks = {}
    if 32 in ratios:
        checks["throughput_ratio_at_32"] = {"target": TARGET_THROUGHPUT_RATIO_AT_32, "measured": ratios[32],
                                            "met": ratios[32] >= TARGET_THROUGHPUT_RATIO_AT_32}
    if 1 in by_level:
        checks["ttft_p50_ms_at_1"] = {"target": TARGET_TTFT_P50_MS_AT_1, "measured": by_level[1].ttft_p50_ms,
                                      "met": by_level[1].ttft_p50_ms <= TARGET_TTFT_P50_MS_AT_1}
    report = {
        "model": str(args.model), "mode": "url" if args.url else "http" if args.http else "in-process",
        "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
        "requests_per_stream": args.requests_per_stream,
        "prompts": "every request's its own (warm-up included): disjoint slices of one text",
        "sdpa_backends": [backend.name for backend in SDPA_BACKENDS],  # the engine's and generate's
        "engine_config": asdict(config),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "load_average_1m": os.getloadavg()[0],
                    "device": args.device, "dtype": args.dtype,
                    "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None},
        "served": [asdict(r) for r in served], "generate": [asdict(r) for r in baseline],
        "throughput_ratio": {str(c): r for c, r in ratios.items()}, "targets": checks,
    }
    print("throughput vs batched generate: " + ", ".join(f"{c} streams {r:.2f}x" for c, r in ratios.items()))
    for name, check in checks.items():
        print(f"{name}: {check['measured']:.2f} (target {check['target']}) {'met' if check['met'] else 'NOT met'}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'serving.json'}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder with a tokenizer")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared 2-core machine 2 threads spin and run slower)")
    parser.add_argument("--device", default="cpu", help="torch device of both models (cpu, cuda)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="both models' dtype (default: the checkpoint's)")
    parser.add_argument("--http", action="store_true", help="go through the OpenAI app under uvicorn in-process")
    parser.add_argument("--url", default=None, help="an OpenAI-compatible base URL (…/v1) to drive instead")
    parser.add_argument("--served-model-name", default="vibe-tiny-moe")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        parser.error(f"no model at {args.model}: build it with `make model` or pass --model")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    if min(args.concurrency) < 1 or args.requests_per_stream < 1:
        parser.error("--concurrency and --requests-per-stream must be >= 1")
    return args


if __name__ == "__main__":
    main()
