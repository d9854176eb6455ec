"""What constrained decoding costs: the engine's decode with and without a grammar, side by side.

The engine in this process over the embedded model (prefix caching off, so every run prefills the same),
``--requests`` prompts of the shipped sets at once, each decoding exactly ``--tokens`` tokens greedily:

- ``free``: no grammar (``ignore_eos``);
- ``regex``: vLLM's ``structured_outputs`` regex, ``[a-z ,.]{N}`` with N far beyond ``--tokens``;
- ``json``: a JSON schema (an object with a long array of strings) that cannot be complete in time;
- ``tool``: ``tool_choice: "required"`` over four functions, each with a required long string argument.

Every grammar stays incomplete until ``--tokens``, so all modes run the same steps over the same number
of sequences. Modes alternate (``--repeats`` rounds); reported per mode: the median wall time of a
decode step (all sequences past their prefill), of the whole run, the time to build each request's
grammar matcher (at admission), and the decode slowdown against ``free``. Prints a table and writes
``<out>/structured.json``.

    python -m load_tests.structured_overhead --out bench     # `make bench-structured`, about 1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from transformers import AutoModelForCausalLM

from deploy.app import DEFAULT_MODEL
from load_tests.workloads import load_workload
from service.engine import Engine, EngineConfig
from service.sampling import SamplingParams
from service.structured import grammar_from_spec
from service.text import apply_chat_template
from service.tokenizer import load_tokenizer
from service.tools import ToolSetup

_LONG_TEXT = {"type": "string", "minLength": 4000}  # keeps every call incomplete within the benchmark
_FUNCTIONS = {
    "run_tests": {"type": "object", "properties": {"path": {"type": "string"}, "verbose": {"type": "boolean"},
                                                   "why": _LONG_TEXT}, "required": ["path", "verbose", "why"]},
    "read_file": {"type": "object", "properties": {"path": {"type": "string"}, "start": {"type": "integer"},
                                                   "why": _LONG_TEXT}, "required": ["path", "why"]},
    "search": {"type": "object", "properties": {"query": _LONG_TEXT, "top_k": {"type": "integer", "minimum": 1}},
               "required": ["query"]},
    "write_note": {"type": "object", "properties": {"title": {"enum": ["todo", "bug", "idea"]}, "text": _LONG_TEXT},
                   "required": ["title", "text"], "additionalProperties": False},
}


def grammars() -> dict[str, str | None]:
    """Each mode's grammar text (None: free text); none can be complete within a benchmark's tokens."""
    long_list = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"},
                                                            "minItems": 2000}}, "required": ["items"]}
    return {"free": None, "regex": grammar_from_spec("regex", "[a-z ,.]{4000}"),
            "json": grammar_from_spec("json", long_list),
            "tool": ToolSetup(_FUNCTIONS, "required").grammar()}


def run_mode(engine: Engine, prompts: list[list[int]], grammar: str | None, tokens: int, tag: str) -> dict:
    """One run: every prompt admitted at once, stepped until all have ``tokens`` tokens; step timings."""
    admitted = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(max_tokens=tokens, temperature=0.0,
                                                                ignore_eos=grammar is None, grammar=grammar))
    admission_s = time.perf_counter() - admitted
    steps, produced, started = [], 0, time.perf_counter()
    while engine.has_work:
        begin = time.perf_counter()
        outs = engine.step()
        seconds = time.perf_counter() - begin
        # a decode step: every sequence past the step of its prefill (which samples its first token)
        decode = len(outs) == len(prompts) and all(o.num_completion_tokens >= 2 for o in outs)
        produced += sum(len(o.new_token_ids) for o in outs)
        if decode:
            steps.append(seconds)
        if any(o.finish_reason not in (None, "length") for o in outs):
            raise RuntimeError(f"{tag}: a request ended before {tokens} tokens ({outs[0].finish_reason})")
    return {"wall_s": round(time.perf_counter() - started, 4), "tokens": produced, "decode_steps": len(steps),
            "decode_step_ms_p50": round(1000 * statistics.median(steps), 3) if steps else None,
            "admission_ms_per_request": round(1000 * admission_s / len(prompts), 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    prompts = [apply_chat_template(tokenizer, list(p.messages)) for p in load_workload("code")[:args.requests]]
    model = AutoModelForCausalLM.from_pretrained(args.model)
    config = EngineConfig(max_num_seqs=args.requests, max_num_batched_tokens=4096, enable_prefix_caching=False,
                          max_model_len=max(len(p) for p in prompts) + args.tokens + 1)
    engine = Engine(model, config, tokenizer=tokenizer)
    modes = grammars()
    run_mode(engine, prompts[:2], modes["tool"], 2, "warm-up")  # builds the grammar backend's tokenizer once
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for round_ in range(args.repeats):
        for mode, grammar in modes.items():
            runs[mode].append(run_mode(engine, prompts, grammar, args.tokens, f"{mode}-{round_}"))
    free = statistics.median(r["decode_step_ms_p50"] for r in runs["free"])
    summary = {}
    for mode, results in runs.items():
        step = statistics.median(r["decode_step_ms_p50"] for r in results)
        summary[mode] = {"decode_step_ms": step, "wall_s": statistics.median(r["wall_s"] for r in results),
                         "admission_ms_per_request": statistics.median(r["admission_ms_per_request"] for r in results),
                         "decode_step_vs_free": round(step / free, 3)}
    result = {"config": {"model": args.model, "requests": args.requests, "tokens": args.tokens,
                         "repeats": args.repeats, "workload": "code", "machine": platform.platform(),
                         "cpus": os.cpu_count(), "load_average": list(os.getloadavg())},
              "summary": summary, "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'mode':<6} {'decode step (ms)':>17} {'vs free':>8} {'run (s)':>8} {'matcher (ms/request)':>21}")
    for mode, row in summary.items():
        print(f"{mode:<6} {row['decode_step_ms']:>17.3f} {row['decode_step_vs_free']:>8.3f} {row['wall_s']:>8.3f} "
              f"{row['admission_ms_per_request']:>21.3f}")


if __name__ == "__main__":
    main()
