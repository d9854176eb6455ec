"""KV cache benchmark: paged blocks against one ``max_model_len`` slot per sequence, at the same memory.

The engine's KV cache gives a sequence blocks of ``kv_block_size`` positions as it grows. With
``kv_block_size = max_model_len`` each sequence takes one whole ``max_model_len`` block at admission: the
allocation the engine had before paging (one preallocated slot per running sequence), which this compares
against in the same run, on the same requests and the same memory (``--slots`` sequences of ``max_model_len``).

The embedded model runs whole in this process (the `Engine`, no Ray, no HTTP): ShareGPT-like chat prompts
through the model's chat template, each for its set's ``max_tokens`` (capped by ``--max-tokens``) with
``ignore_eos`` and greedy decoding, all queued at once (an offline batch: the queue is never empty, so what
limits the running batch is the cache). Rounds alternate the two layouts; medians are reported.

A second comparison gives every request the same long system prompt (``--system-tokens`` of the Sonnet-like
set's first document, as an assistant answering about a document, or an agent with many tools, is prompted)
and runs paged with prefix caching off and on: on, the running sequences hold the system prompt's blocks once,
shared, and prefill only their own tokens; off, each holds and prefills its own copy. Prints both tables and
writes ``<out>/kv_paging.json``.

    python -m load_tests.kv_paging --out bench      # `make bench-kv`, about 5 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from deploy.app import DEFAULT_MODEL
from load_tests.workloads import load_workload
from service.attention import KVCache
from service.engine import Engine, EngineConfig
from service.sampling import SamplingParams
from service.tokenizer import load_tokenizer


def _prompts(tokenizer, count: int, max_tokens: int, system_tokens: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) of the first ``count`` ShareGPT-like requests (cycled if the set is shorter),
    with a system prompt of about ``system_tokens`` tokens shared by all (none for 0)."""
    prompts = load_workload("sharegpt_like")
    system = []
    if system_tokens:
        document = load_workload("sonnet_like")[0].messages[-1]["content"]
        text = tokenizer.decode(tokenizer.encode(document, add_special_tokens=False)[:system_tokens])
        system = [{"role": "system", "content": f"Answer the user with this document in mind.\n\n{text}"}]
    out = []
    for i in range(count):
        prompt = prompts[i % len(prompts)]
        messages = system + [m for m in prompt.messages if m["role"] != "system" or not system]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        out.append((list(ids), min(prompt.max_tokens, max_tokens)))
    return out


def run_once(model, config: EngineConfig, requests: list[tuple[list[int], int]]) -> dict:
    """Queue every request, step until done; throughput, running batch, TTFT and preemptions."""
    engine = Engine(model, config)
    start = time.perf_counter()
    for i, (ids, max_tokens) in enumerate(requests):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    first: dict[str, float] = {}
    running, tokens, steps = [], 0, 0
    while engine.has_work:
        outputs = engine.step()
        now = time.perf_counter() - start
        steps += 1
        running.append(engine.num_running)
        for out in outputs:
            tokens += len(out.new_token_ids)
            if out.new_token_ids:
                first.setdefault(out.request_id, now)
    wall = time.perf_counter() - start
    ttfts = sorted(first.values())
    return {"wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall, "steps": steps,
            "max_running": max(running), "mean_running": statistics.fmean(running),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
            "preemptions": engine.num_preemptions, "kv_blocks": engine.num_kv_blocks}


def compare(model, configs: dict[str, EngineConfig], requests: list[tuple[list[int], int]], rounds: int) -> dict:
    """Each config's runs over ``requests``, alternating, and the medians of their numbers."""
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for round_ in range(rounds):
        for name, config in configs.items():
            result = run_once(model, config, requests)
            runs[name].append(result)
            print(f"round {round_ + 1} {name:>26}: {result['output_tokens_per_s']:7.1f} tok/s, running max "
                  f"{result['max_running']} mean {result['mean_running']:.1f}, TTFT p50 {result['ttft_p50_s']:.2f} s,"
                  f" {result['preemptions']} preemptions", flush=True)
    medians = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for name, results in runs.items()}
    return {"runs": runs, "medians": medians}


def _table(title: str, medians: dict[str, dict], first: str) -> None:
    print(f"\n{title}")
    print(f"| {first} | output tok/s | running (mean / max) | TTFT p50 / p90 (s) | preemptions |")
    print("| --- | --- | --- | --- | --- |")
    for name, m in medians.items():
        print(f"| {name} | {m['output_tokens_per_s']:.1f} | {m['mean_running']:.1f} / {m['max_running']:.0f} | "
              f"{m['ttft_p50_s']:.2f} / {m['ttft_p90_s']:.2f} | {m['preemptions']:.0f} |")


def _ratios(new: dict, old: dict) -> dict:
    return {"output_tokens_per_s": new["output_tokens_per_s"] / old["output_tokens_per_s"],
            "ttft_p50": new["ttft_p50_s"] / old["ttft_p50_s"], "mean_running": new["mean_running"] / old["mean_running"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--slots", type=int, default=4, help="memory: this many sequences of max_model_len")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--system-tokens", type=int, default=384,
                        help="the shared system prompt of the second comparison (0: skip it)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = load_tokenizer(args.model)
    requests = _prompts(tokenizer, args.requests, args.max_tokens)
    mc = model.config
    per_token = KVCache.bytes_per_token(mc.num_hidden_layers, dtype=model.dtype, **KVCache.for_model(mc))
    budget = args.slots * args.max_model_len * per_token

    def config(block: int, prefix_caching: bool) -> EngineConfig:
        return EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                            max_num_batched_tokens=512, kv_cache_bytes=budget, kv_block_size=block,
                            enable_prefix_caching=prefix_caching)

    layouts = compare(model, {"one slot per sequence": config(args.max_model_len, False),
                              "paged": config(args.block_size, False)}, requests, args.rounds)
    slot, paged = layouts["medians"]["one slot per sequence"], layouts["medians"]["paged"]
    lengths = [len(ids) + n for ids, n in requests]
    report = {
        "config": {**vars(args), "kv_cache_bytes": budget, "bytes_per_token": per_token,
                   "mean_request_tokens": statistics.fmean(lengths), "max_request_tokens": max(lengths)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
        **layouts, "paged_over_slots": _ratios(paged, slot),
    }
    _table(f"{args.requests} ShareGPT-like requests (mean {report['config']['mean_request_tokens']:.0f} tokens, max "
           f"{max(lengths)}), KV memory for {args.slots} sequences of {args.max_model_len}; medians of {args.rounds}:",
           layouts["medians"], "layout")
    ratio = report["paged_over_slots"]
    print(f"paged / one slot per sequence: throughput {ratio['output_tokens_per_s']:.2f}x, "
          f"TTFT p50 {ratio['ttft_p50']:.2f}x, mean running batch {ratio['mean_running']:.2f}x")
    if args.system_tokens:
        shared = _prompts(tokenizer, args.requests, args.max_tokens, args.system_tokens)
        system = len(os.path.commonprefix([ids for ids, _ in shared]))
        result = compare(model, {"prefix caching off": config(args.block_size, False),
                                 "prefix caching on (shared)": config(args.block_size, True)}, shared, args.rounds)
        on, off = result["medians"]["prefix caching on (shared)"], result["medians"]["prefix caching off"]
        lengths = [len(ids) + n for ids, n in shared]
        report["shared_system_prompt"] = {**result, "system_prompt_tokens": system,
                                          "mean_request_tokens": statistics.fmean(lengths),
                                          "max_request_tokens": max(lengths), "on_over_off": _ratios(on, off)}
        _table(f"The same requests after a shared {system}-token system prompt (mean {statistics.fmean(lengths):.0f} "
               f"tokens, max {max(lengths)}), paged, same memory; medians of {args.rounds}:", result["medians"],
               "prefix caching")
        ratio = report["shared_system_prompt"]["on_over_off"]
        print(f"on / off: throughput {ratio['output_tokens_per_s']:.2f}x, TTFT p50 {ratio['ttft_p50']:.2f}x, "
              f"mean running batch {ratio['mean_running']:.2f}x")
    if args.out:
        path = Path(args.out) / "kv_paging.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
