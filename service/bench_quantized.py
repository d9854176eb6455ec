"""Benchmark: an expert call on weights held quantized (dequantized at each call) against held dequantized.

    python -m service.bench_quantized --out bench             # `make bench-quantized`
    python -m service.bench_quantized --out /tmp/b --quick    # one shape, fewer repeats

Owns the measurement behind `keep_quantized_experts`: for the expert shapes of released models, the
bytes one expert takes in a worker and the median time of one expert call (`run_experts`, the workers'
own path) at several token counts, with the expert held in the compute dtype (bfloat16) and held as the
checkpoint stores it (FP8 with 128 x 128 block scales; GPT-OSS's MXFP4; Kimi-K2-Thinking's INT4 with a bf16
scale per 32 columns). Weights are random, in the
formats' ranges; what is measured is the arithmetic, not the values. Runs on CUDA when asked and
available (kernel time by CUDA events, as the workers time calls), else on the CPU with one thread.
Writes `quantized_experts.json` to --out and prints one line per shape, format and token count.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import numpy as np
import torch

from service.experts import ExpertFFN, ExpertStore, checksum, expert_weight, run_experts
from service.messages import ExpertTensors

# (name, hidden, intermediate, format): routed experts of released checkpoints
SHAPES = (("Qwen3-30B-A3B", 2048, 768, "fp8"), ("DeepSeek-V3", 7168, 2048, "fp8"),
          ("gpt-oss-20b", 2880, 2880, "mxfp4"), ("Kimi-K2-Thinking", 7168, 2048, "int4"))
TOKENS = (1, 16, 128)
BLOCK = 128
INT4_GROUP = 32


def fp8_expert(hidden: int, intermediate: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, (rows, cols) in (("gate_up", (2 * intermediate, hidden)), ("down", (hidden, intermediate))):
        tensors[name] = (torch.randn(rows, cols, generator=generator) * 100).to(torch.float8_e4m3fn)
        tensors[f"{name}_scale_inv"] = torch.rand(rows // BLOCK, cols // BLOCK, generator=generator) * 1e-3
    return tensors


def mxfp4_expert(hidden: int, intermediate: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {"gate_up_bias": torch.zeros(2 * intermediate), "down_bias": torch.zeros(hidden)}
    for name, (rows, cols) in (("gate_up", (2 * intermediate, hidden)), ("down", (hidden, intermediate))):
        tensors[f"{name}_blocks"] = torch.randint(0, 256, (rows, cols // 32, 16), dtype=torch.uint8,
                                                  generator=generator)
        tensors[f"{name}_scales"] = torch.randint(118, 124, (rows, cols // 32), dtype=torch.uint8, generator=generator)
    return tensors


def int4_expert(hidden: int, intermediate: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Kimi-K2-Thinking's format: INT4 packed eight to an int32, a bf16 scale per 32 columns."""
    tensors = {}
    for name, (rows, cols) in (("gate_up", (2 * intermediate, hidden)), ("down", (hidden, intermediate))):
        tensors[f"{name}_packed"] = torch.randint(-2**31, 2**31 - 1, (rows, cols // 8), dtype=torch.int32,
                                                  generator=generator)
        tensors[f"{name}_scale"] = (torch.rand(rows, cols // INT4_GROUP, generator=generator) * 1e-2).to(torch.bfloat16)
        tensors[f"{name}_shape"] = torch.tensor([rows, cols])
    return tensors


EXPERTS = {"fp8": fp8_expert, "mxfp4": mxfp4_expert, "int4": int4_expert}


def dequantized(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The expert's tensors with its weights dequantized as the workers' FFN dequantizes them."""
    biases = {name: t for name, t in tensors.items() if name.endswith("_bias")}
    return {**biases, **{name: expert_weight(tensors, name, dtype) for name in ("gate_up", "down")}}


def time_calls(store: ExpertStore, ffn: ExpertFFN, hidden: int, tokens: int, repeats: int) -> float:
    """Median seconds of one expert call on `tokens` rows (the workers' per-expert timing), after a warm-up."""
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens))
    run_experts(store, 0, np.array([0]), np.array([tokens]), x, ffn)
    return statistics.median(float(run_experts(store, 0, np.array([0]), np.array([tokens]), x, ffn)[1][0])
                             for _ in range(repeats))


def measure(device: str, quick: bool) -> list[dict]:
    dtype, rows = torch.bfloat16, []
    shapes = SHAPES[:1] if quick else SHAPES
    repeats = 3 if quick else 7
    for model, hidden, intermediate, fmt in shapes:
        generator = torch.Generator().manual_seed(0)
        held = EXPERTS[fmt](hidden, intermediate, generator)
        ffn = ExpertFFN("silu", (1.702, 7.0) if fmt == "mxfp4" else None)
        stores = {}
        for kind, tensors in (("bfloat16", dequantized(held, torch.float32)), (fmt, held)):
            store = ExpertStore(device, dtype)
            store.add([ExpertTensors(0, 0, tensors, checksum(tensors))])
            stores[kind] = store
        for tokens in TOKENS:
            seconds = {kind: time_calls(store, ffn, hidden, tokens, repeats) for kind, store in stores.items()}
            row = {"model": model, "hidden": hidden, "intermediate": intermediate, "format": fmt, "tokens": tokens,
                   "bytes_bf16": stores["bfloat16"].held_bytes(), f"bytes_{fmt}": stores[fmt].held_bytes(),
                   "memory_ratio": stores["bfloat16"].held_bytes() / stores[fmt].held_bytes(),
                   "call_ms_bf16": seconds["bfloat16"] * 1e3, f"call_ms_{fmt}": seconds[fmt] * 1e3,
                   "call_time_ratio": seconds[fmt] / seconds["bfloat16"]}
            rows.append(row)
            print(f"model={model} format={fmt} tokens={tokens} memory_ratio={row['memory_ratio']:.2f} "
                  f"call_ms_bf16={row['call_ms_bf16']:.3f} call_ms_{fmt}={row[f'call_ms_{fmt}']:.3f} "
                  f"call_time_ratio={row['call_time_ratio']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(1)  # as a worker runs (worker_threads: 1)
    rows = measure(args.device, args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "torch": torch.__version__, "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
            "compute_dtype": "bfloat16", "fp8_block": BLOCK, "int4_group": INT4_GROUP, "statistic": "median seconds of one expert call"}
    (out / "quantized_experts.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out / 'quantized_experts.json'}")


if __name__ == "__main__":
    main()
