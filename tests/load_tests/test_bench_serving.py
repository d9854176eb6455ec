"""The serving benchmark's prompts: every request, the warm-up included, sends a prompt of its own."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch

from load_tests import bench_serving as bs


class _Tokenizer:
    def encode(self, text: str, verbose: bool = False) -> list[int]:
        return list(range(100_000))


class _Engine:
    """Stands in for AsyncEngine: records every prompt it is sent and streams `max_tokens` one-token outputs."""

    prompts: list[tuple[int, ...]] = []

    def __init__(self, engine, num_threads: int) -> None:
        pass

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    async def generate(self, request_id: str, prompt: list[int], params):
        _Engine.prompts.append(tuple(prompt))
        for _ in range(params.max_tokens):
            yield SimpleNamespace(new_token_ids=[0])


def test_no_request_repeats_a_prompt_the_prefix_cache_could_serve(monkeypatch, tmp_path):
    """Each level cut its prompts from the start of the same text and the warm-up sent level 1's first prompt: with the
    engine's prefix cache on, 1 of 2 measured requests at 1 stream, 2 of 16 at 8 and 16 of 64 at 32 skipped their
    prefill, which batched `generate` never does (an audit). main() as `make bench-serving` runs it, model stubbed."""
    args = argparse.Namespace(out=tmp_path, model="m", concurrency=[1, 8, 32], requests_per_stream=2, prompt_tokens=16,
                              output_tokens=3, max_num_batched_tokens=512, threads=torch.get_num_threads(),
                              device="cpu", dtype=None, http=False, url=None, served_model_name="m")
    _Engine.prompts = []
    baseline = []

    def generate(model, prompts, batch, output_tokens):
        baseline.append([tuple(p) for p in prompts])
        return bs.RunResult("generate", batch, len(prompts), len(prompts) * output_tokens, 1.0, 1.0)

    monkeypatch.setattr(bs, "parse_args", lambda: args)
    monkeypatch.setattr(bs, "load_tokenizer", lambda model: _Tokenizer())
    monkeypatch.setattr(bs, "load_model", lambda args: None)
    monkeypatch.setattr(bs, "Engine", lambda *a, **k: None)
    monkeypatch.setattr(bs, "AsyncEngine", _Engine)
    monkeypatch.setattr(bs, "bench_generate", generate)
    bs.main()

    sent = _Engine.prompts
    assert len(sent) == 1 + 2 * (1 + 8 + 32)  # the warm-up, then every level's requests
    assert all(len(p) == 16 for p in sent)
    assert len({p[:8] for p in sent}) == len(sent)  # no two share even their first half: nothing to find cached
    # the baseline gets the same prompts per level as the engine (its warm-up first)
    assert baseline[0] == sent[:1] and sorted(p for level in baseline[1:] for p in level) == sorted(sent[1:])
    report = json.loads((tmp_path / "serving.json").read_text())
    assert [r["num_requests"] for r in report["served"]] == [2, 16, 64]


def test_the_generate_baseline_runs_on_the_engines_attention_backends():
    """The baseline's attention leaves cuDNN's backend out as the engine's steps do: on a GPU in half precision its
    per-shape planning cost ``generate`` milliseconds a step (its cache grows a token a step), so the wide model's
    engine looked up to 4.2x faster than a baseline slowed by a backend the engine does not use."""
    cuda = torch.backends.cuda
    seen = []

    class _Model:
        device = torch.device("cpu")

        def generate(self, ids, **kwargs):
            seen.append((cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
                         cuda.math_sdp_enabled()))

    before = cuda.cudnn_sdp_enabled()
    result = bs.bench_generate(_Model(), [[1, 2], [3, 4], [5, 6]], 2, 4)
    assert seen == [(False, True, True, True)] * 2 and result.num_requests == 3
    assert cuda.cudnn_sdp_enabled() == before
