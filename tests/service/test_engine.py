"""Continuous-batching Engine and its AsyncEngine shell, against transformers' own greedy `generate`."""

from __future__ import annotations

import asyncio
import copy
import random
import threading
import time

import pytest
import torch

from service.async_engine import RETRY_PAUSES_S, AsyncEngine, EngineError, EngineStopped, RequestTimeout
from service.attention import KVCache
from service.engine import (
    CACHED_SEQUENCES_PER_SEQ,
    Engine,
    EngineConfig,
    QueueFull,
    StepFailed,
    _CachedPrefixes,
    _common_prefix,
)
from service.sampling import SamplingParams
from tests.service.test_attention import assert_block_counts
from tests.service.test_text import build_chat_model, build_tokenizer
from tests.tiny_models import TINY_ARCHITECTURES, VOCAB_SIZE, build_tiny_model

ARCHITECTURES = (*TINY_ARCHITECTURES, "llama4")  # (Llama 4's language model; its checkpoint tests are its own)
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB_SIZE, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _generate(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    # every token attended, as the engine attends them: without a mask generate would infer one that hides the prompt's
    # tokens equal to pad_token_id (0: a next turn's prompt may hold an earlier reply's 0)
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _engine(arch: str = "qwen3_moe", **config) -> Engine:
    return Engine(build_tiny_model(arch), EngineConfig(**{"max_model_len": 256, **config}))


def _run(engine: Engine, joins: dict[int, list[tuple[str, list[int], SamplingParams]]], max_steps: int = 500):
    """Step until idle, adding requests at the given steps; returns tokens and finish reasons by id."""
    tokens, reasons = {}, {}
    for step in range(max_steps):
        for request_id, prompt, params in joins.get(step, []):
            engine.add_request(request_id, prompt, params)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        if not engine.has_work and step >= max(joins, default=0):
            return tokens, reasons
    raise AssertionError("engine did not finish")


@pytest.fixture(scope="module")
def reference_models():
    return {arch: build_tiny_model(arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_single_greedy_requests_equal_generate(arch, reference_models):
    prompts = [_prompt(1, 0), _prompt(37, 1)]
    for i, prompt in enumerate(prompts):
        tokens, reasons = _run(_engine(arch), {0: [(f"r{i}", prompt, GREEDY)]})
        assert tokens[f"r{i}"] == _generate(reference_models[arch], prompt, 24)
        assert reasons[f"r{i}"] in ("length", "stop")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])  # DeepSeek-V3: latent; GPT-OSS: sinks
def test_staggered_concurrent_requests_equal_generate(arch, reference_models):
    lengths = {0: [5, 17], 3: [40], 5: [3, 64], 9: [9, 2]}
    joins = {step: [(f"s{step}-{i}", _prompt(n, 10 * step + i), GREEDY) for i, n in enumerate(ns)]
             for step, ns in lengths.items()}
    engine = _engine(arch, max_num_seqs=4, max_num_batched_tokens=24)  # some wait; prefill shares steps
    tokens, _ = _run(engine, joins)
    for requests in joins.values():
        for request_id, prompt, _ in requests:
            assert tokens[request_id] == _generate(reference_models[arch], prompt, 24), request_id


def test_chunked_prefill_equals_unchunked(reference_models):
    prompt = _prompt(150, 3)
    chunked, _ = _run(_engine(max_num_seqs=2, max_num_batched_tokens=16), {0: [("long", prompt, GREEDY)]})
    whole, _ = _run(_engine(max_num_batched_tokens=512), {0: [("long", prompt, GREEDY)]})
    assert chunked["long"] == whole["long"] == _generate(reference_models["qwen3_moe"], prompt, 24)


def test_every_forward_respects_the_token_budget_and_batch_size():
    engine = _engine(max_num_seqs=3, max_num_batched_tokens=20)
    sizes, running = [], []
    engine._model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[1]), with_kwargs=True)
    joins = {0: [(f"r{i}", _prompt(30 + i, i), GREEDY) for i in range(5)]}
    for request_id, prompt, params in joins[0]:
        engine.add_request(request_id, prompt, params)
    while engine.has_work:
        engine.step()
        running.append(engine.num_running)
    assert max(sizes) <= 20 and max(running) <= 3 and engine.num_waiting == 0


def test_counts_and_length_finish():
    tokens, reasons = _run(_engine(), {0: [("a", _prompt(7, 0), SamplingParams(max_tokens=5, temperature=0.0))]})
    assert len(tokens["a"]) == 5 and reasons["a"] == "length"
    engine = _engine()
    engine.add_request("b", _prompt(7, 0), SamplingParams(max_tokens=3, temperature=0.0))
    outs = [out for _ in range(3) for out in engine.step()]
    assert [(o.num_prompt_tokens, o.num_completion_tokens, o.finished) for o in outs] == [
        (7, 1, False), (7, 2, False), (7, 3, True)]


def test_abort_frees_the_slot_for_the_next_request():
    engine = _engine(max_num_seqs=1)
    engine.add_request("a", _prompt(5, 0), GREEDY)
    engine.add_request("b", _prompt(5, 1), GREEDY)
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (1, 1)
    assert engine.abort("a") and not engine.abort("missing")
    assert (engine.num_running, engine.num_waiting) == (0, 1)
    outs = engine.step()
    assert outs[0].request_id == "a" and outs[0].finish_reason == "abort" and outs[0].finished
    assert outs[1].request_id == "b" and engine.num_running == 1
    assert engine.abort("b")
    assert [(o.request_id, o.finish_reason) for o in engine.step()] == [("b", "abort")] and not engine.has_work


def test_abort_of_a_waiting_request():
    engine = _engine(max_num_seqs=1)
    engine.add_request("a", _prompt(5, 0), GREEDY)
    engine.add_request("b", _prompt(5, 1), GREEDY)
    assert engine.abort("b") and engine.num_waiting == 1
    assert [o.request_id for o in engine.step() if o.finished] == ["b"]


def _token_bytes(model) -> int:
    cfg = model.config
    return KVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, torch.float32)


def _run_all(engine: Engine, prompts: dict, params: SamplingParams, watch=None, prompt_logprobs=None) -> dict[str, list[int]]:
    """Queue every prompt, step until idle (calling ``watch(engine)`` after each step); tokens by request id (and
    their prompt log-probability entries added to ``prompt_logprobs``, if given)."""
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
    tokens = {}
    while engine.has_work:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if prompt_logprobs is not None:
                prompt_logprobs.setdefault(out.request_id, []).extend(out.prompt_logprobs)
        if watch is not None:
            watch(engine)
    return tokens


def test_paged_kv_cache_runs_more_sequences_than_it_has_max_model_len_slots_for(reference_models):
    """Memory for two sequences of max_model_len (8 blocks of 16) runs four short ones at once (one block each
    at admission, two at the end: all 8 blocks), each holding blocks for the tokens it wrote only, with the tokens
    of `generate`; a cache too small for one max_model_len sequence is refused."""
    model = build_tiny_model("qwen3_moe")
    engine = Engine(model, EngineConfig(max_num_seqs=8, max_model_len=64, kv_cache_bytes=2 * 64 * _token_bytes(model)))
    assert engine.num_kv_blocks == 8 and engine.num_kv_slots == 16
    prompts = {f"r{i}": _prompt(10 + i, i) for i in range(4)}
    running, usage = [], []

    def watch(e: Engine) -> None:
        running.append(e.num_running)
        usage.append(e.kv_cache_usage)
        held = [len(e._cache.blocks[seq.slot]) for seq in e._running]
        assert held == [e._cache.blocks_for(seq.num_cached) for seq in e._running]  # (the tokens written so far)

    tokens = _run_all(engine, prompts, SamplingParams(max_tokens=12, temperature=0.0), watch)
    assert max(running) == 4 and max(usage) == 1.0 and engine.num_preemptions == 0
    for request_id, prompt in prompts.items():
        assert tokens[request_id] == _generate(reference_models["qwen3_moe"], prompt, 12)
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        Engine(build_tiny_model("qwen3_moe"), EngineConfig(max_model_len=64, kv_cache_bytes=64 * _token_bytes(model) - 1))


def test_a_full_cache_preempts_the_newest_sequence_which_resumes_with_the_same_tokens(reference_models):
    """Memory for one max_model_len sequence (4 blocks) and three that each grow to 4 blocks: the newest running
    sequences are preempted as the others grow, prefilled again later (prompt and generated tokens) and end
    with the tokens `generate` gives, greedy; sampled ones (seeded) equal those of an engine with room for all,
    so preemption keeps each request's sampling state; their prompt log-probabilities are reported once."""
    model = build_tiny_model("qwen3_moe")
    one = 64 * _token_bytes(model)
    prompts = {f"r{i}": _prompt(12, i) for i in range(3)}
    engine = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=64, kv_cache_bytes=one))
    tokens = _run_all(engine, prompts, SamplingParams(max_tokens=50, temperature=0.0))
    assert engine.num_preemptions >= 2 and engine.num_running == 0 and engine.num_waiting == 0
    for request_id, prompt in prompts.items():
        assert tokens[request_id] == _generate(reference_models["qwen3_moe"], prompt, 50)
    sampled = SamplingParams(max_tokens=50, temperature=1.0, seed=3, prompt_logprobs=1)
    roomy = Engine(build_tiny_model("qwen3_moe"), EngineConfig(max_num_seqs=4, max_model_len=64, kv_cache_bytes=4 * one))
    expected = _run_all(roomy, prompts, sampled)
    tight = Engine(build_tiny_model("qwen3_moe"), EngineConfig(max_num_seqs=4, max_model_len=64, kv_cache_bytes=one))
    prompt_logprobs = {}
    got = _run_all(tight, prompts, sampled, prompt_logprobs=prompt_logprobs)
    assert tight.num_preemptions >= 2 and roomy.num_preemptions == 0 and got == expected
    assert all(len(entries) == 11 for entries in prompt_logprobs.values())  # positions 1..11, once each


@pytest.mark.parametrize("prompt, params, match", [
    ([], GREEDY, "at least one token"),
    ([VOCAB_SIZE], GREEDY, "must be in"),
    ([5] * 250, SamplingParams(max_tokens=7), "exceeds max_model_len 256"),
    ([5], SamplingParams(stop=("x",)), "tokenizer"),
])
def test_bad_requests_raise_value_error(prompt, params, match):
    with pytest.raises(ValueError, match=match):
        _engine().add_request("r", prompt, params)


def test_duplicate_ids_and_queue_bound():
    engine = _engine(max_queue=2)
    engine.add_request("a", [5], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [5], GREEDY)
    engine.add_request("b", [5], GREEDY)
    with pytest.raises(QueueFull):
        engine.add_request("c", [5], GREEDY)
    engine.step()  # both admitted: the queue has room again
    engine.add_request("c", [5], GREEDY)


@pytest.mark.parametrize("bad", [{"max_num_seqs": 0}, {"max_queue": -1}, {"max_num_batched_tokens": 4, "max_num_seqs": 8},
                                 {"kv_cache_bytes": 1.5}, {"kv_block_size": 0}, {"prefix_state_interval": 0},
                                 {"prefix_state_memory": 1.0},
                                 {"prefix_state_memory": -0.1}, {"step_retry_s": -1.0},
                                 {"step_retry_s": float("nan")}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        EngineConfig(**bad)


def test_seed_reproducible_whatever_the_batch():
    params = SamplingParams(max_tokens=16, temperature=1.5, seed=5)
    alone, _ = _run(_engine(), {0: [("x", _prompt(9, 0), params)]})
    crowd, _ = _run(_engine(), {0: [(f"o{i}", _prompt(20, i + 1), GREEDY) for i in range(3)],
                                2: [("x", _prompt(9, 0), params)]})
    other, _ = _run(_engine(), {0: [("x", _prompt(9, 0), SamplingParams(max_tokens=16, temperature=1.5, seed=6))]})
    assert alone["x"] == crowd["x"] and alone["x"] != other["x"]


def test_stop_token_ids_and_eos(reference_models):
    prompt = _prompt(11, 4)
    expected = _generate(reference_models["qwen3_moe"], prompt, 24)
    stop = expected[5]
    stopped, reasons = _run(_engine(), {0: [("a", prompt, SamplingParams(max_tokens=24, temperature=0.0,
                                                                              stop_token_ids=(stop,)))]})
    assert stopped["a"] == expected[:expected.index(stop) + 1] and reasons["a"] == "stop"
    model = build_tiny_model("qwen3_moe")
    model.generation_config.eos_token_id = stop
    engine = Engine(model, EngineConfig(max_model_len=256))
    tokens, reasons = _run(engine, {0: [("eos", prompt, GREEDY),
                                        ("ignore", prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))]})
    assert tokens["eos"] == stopped["a"] and reasons["eos"] == "stop"
    assert tokens["ignore"] == expected and reasons["ignore"] == "length"


@pytest.fixture(scope="module")
def chat_parts():
    tokenizer = build_tokenizer()
    return tokenizer, build_chat_model(tokenizer)


def test_stop_strings_cut_the_text(chat_parts):
    tokenizer, reference = chat_parts
    prompt = tokenizer.encode("def main():")
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    full = tokenizer.decode(_generate(reference, prompt, 40))
    stop = full[10:13]
    engine = Engine(build_chat_model(tokenizer), EngineConfig(max_model_len=128), tokenizer=tokenizer)
    engine.add_request("plain", prompt, params)
    engine.add_request("stopped", prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=(stop,)))
    texts, reasons = {"plain": "", "stopped": ""}, {}
    while engine.has_work:
        for out in engine.step():
            texts[out.request_id] += out.text
            reasons[out.request_id] = out.finish_reason
    assert texts["plain"] == full and reasons["plain"] == "length"
    assert texts["stopped"] == full[:full.index(stop)] and reasons["stopped"] == "stop"


def test_min_tokens_holds_stop_strings_back_as_it_holds_eos(chat_parts):
    """A stop string ends the completion only once it has more than ``min_tokens`` tokens (as vLLM's): one that
    ended earlier is text like any other; one begun before and ending after stops it."""
    tokenizer, reference = chat_parts
    prompt = tokenizer.encode("def main():")
    pieces = [tokenizer.decode(_generate(reference, prompt, 10)[:i + 1]) for i in range(10)]
    # two characters ending in token k's text, nowhere else in the ten tokens' (k >= 2: the first token's text may
    # hold one); and two that straddle tokens k and k + 1
    k, stop = next((k, pieces[k][-2:]) for k in range(2, 8) if len(pieces[k]) - len(pieces[k - 1]) >= 2
                   and pieces[9].count(pieces[k][-2:]) == 1)
    straddle = pieces[k + 1][len(pieces[k]) - 1:len(pieces[k]) + 1]
    assert pieces[9].count(straddle) == 1 and len(pieces[k + 1]) > len(pieces[k])
    engine = Engine(build_chat_model(tokenizer), EngineConfig(max_model_len=128), tokenizer=tokenizer)
    cases = {"free": (stop, 0), "searched": (stop, k), "held": (stop, k + 1), "straddle": (straddle, k + 1)}
    for name, (text, min_tokens) in cases.items():  # (token k is the (k + 1)-th)
        engine.add_request(name, prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                        stop=(text,), min_tokens=min_tokens))
    texts, reasons, counts = dict.fromkeys(cases, ""), {}, {}
    while engine.has_work:
        for out in engine.step():
            texts[out.request_id] += out.text
            reasons[out.request_id], counts[out.request_id] = out.finish_reason, out.num_completion_tokens
    assert texts["free"] == texts["searched"] == pieces[k][:-2] and counts["free"] == counts["searched"] == k + 1
    assert reasons["free"] == reasons["searched"] == "stop"
    assert texts["held"] == pieces[9] and reasons["held"] == "length" and counts["held"] == 10
    assert texts["straddle"] == pieces[k][:-1] and reasons["straddle"] == "stop" and counts["straddle"] == k + 2


class _Hooks:
    """Counts forwards; the forwards numbered ``fail_at`` (one number or several, from 1) raise."""

    def __init__(self, fail_at: int | range | set[int] | None = None) -> None:
        self.begun = self.ended = 0
        self.fail_at = {fail_at} if isinstance(fail_at, int) else set(fail_at or ())
        self.completed: list[bool] = []

    def begin_step(self) -> None:
        self.begun += 1
        if self.begun in self.fail_at:
            raise RuntimeError("device lost")

    def end_step(self, completed: bool = True) -> None:
        self.ended += 1
        self.completed.append(completed)


def test_hooks_wrap_every_forward_and_a_failed_step_frees_its_requests():
    hooks = _Hooks(fail_at=3)
    engine = Engine(build_tiny_model("qwen3_moe"), EngineConfig(max_model_len=64), hooks=hooks)
    engine.add_request("a", [5, 6, 7], GREEDY)
    engine.add_request("b", [8, 9], GREEDY)
    engine.step()
    engine.step()
    with pytest.raises(StepFailed) as failure:
        engine.step()
    assert set(failure.value.request_ids) == {"a", "b"} and "device lost" in str(failure.value)
    assert (engine.num_running, engine.has_work, hooks.begun, hooks.ended) == (0, False, 3, 2)  # no step opened
    tokens, _ = _run(engine, {0: [("c", [5, 6, 7], GREEDY)]})
    assert len(tokens["c"]) == 24 and hooks.begun == hooks.ended + 1


def test_the_hooks_are_told_a_forward_failed_so_its_router_counts_are_left_to_the_retry():
    hooks = _Hooks()
    model = build_tiny_model("qwen3_moe")
    forwards = []

    def lose_the_third(module, args) -> None:
        forwards.append(1)
        if len(forwards) == 3:
            raise RuntimeError("device lost")

    model.register_forward_pre_hook(lose_the_third)
    engine = Engine(model, EngineConfig(max_model_len=64), hooks=hooks, retryable=_lost_device)
    engine.add_request("a", [5, 6, 7], GREEDY)
    tokens, failures = _step_through_failures(engine)
    assert len(failures) == 1 and len(tokens["a"]) == 24
    assert hooks.completed == [True, True, False] + [True] * (len(forwards) - 3)


def _lost_device(error: BaseException) -> bool:
    return "device lost" in str(error)


def _step_through_failures(engine: Engine) -> tuple[dict[str, list[int]], list[StepFailed]]:
    """Step until idle; the tokens by request and the failures raised on the way."""
    tokens, failures = {}, []
    while engine.has_work:
        try:
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        except StepFailed as failure:
            failures.append(failure)
    return tokens, failures


def test_an_aborts_final_output_survives_a_failed_step():
    """An abort's final output waits for the next step; a step that failed dropped it, so whoever drives the engine
    waited for it for ever (an audit's stress test)."""
    hooks = _Hooks(fail_at={2})
    engine = Engine(build_tiny_model("qwen3_moe"), EngineConfig(max_model_len=64), hooks=hooks, retryable=_lost_device)
    engine.add_request("a", [5, 6, 7], GREEDY)
    engine.add_request("b", [8, 9, 10], GREEDY)
    engine.step()
    assert engine.abort("b")
    with pytest.raises(StepFailed):
        engine.step()
    finished = []
    while engine.has_work or not finished:
        finished += [(out.request_id, out.finish_reason) for out in engine.step() if out.finished]
    assert sorted(finished) == [("a", "length"), ("b", "abort")]


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_next"])  # Qwen3-Next: linear-attention states, prefilled again
def test_transiently_failed_steps_retry_their_requests_which_answer_as_if_nothing_failed(arch, reference_models):
    hooks = _Hooks(fail_at={3, 4})  # a decode step fails, then its first retry
    engine = Engine(build_tiny_model(arch), EngineConfig(max_model_len=64), hooks=hooks, retryable=_lost_device)
    counted = _counting(engine)
    prompts = {"a": _prompt(9, 1), "b": _prompt(20, 2)}
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, GREEDY)
    tokens, failures = _step_through_failures(engine)
    assert [(failure.request_ids, failure.retried) for failure in failures] == [((), ("a", "b"))] * 2
    for request_id, prompt in prompts.items():
        assert tokens[request_id] == _generate(reference_models[arch], prompt, 24), request_id
    assert engine.num_step_retries == 4 and engine.num_preemptions == 0
    # Retried decodes run one token each: their keys and values before the failed step were kept. Linear-attention
    # states may have moved on in the failed forward: those sequences are prefilled again (prompt + 2 tokens each).
    assert counted[2:5] == ([2, 2, 2] if arch == "qwen3_moe" else [2, 33, 33])
    assert_block_counts(engine._cache)


@pytest.mark.parametrize("retry_s, retryable, retries", [(0.05, _lost_device, True), (0.0, _lost_device, False),
                                                          (20.0, lambda error: False, False)])
def test_a_request_fails_once_its_steps_failed_for_step_retry_s_or_at_once_when_not_retried(retry_s, retryable, retries):
    hooks = _Hooks(fail_at=range(2, 10_000))  # the device never comes back
    engine = Engine(build_tiny_model("qwen3_moe"), EngineConfig(max_model_len=64, step_retry_s=retry_s), hooks=hooks,
                    retryable=retryable)
    engine.add_request("a", [5, 6, 7], GREEDY)
    engine.step()
    failures, first = [], time.monotonic()
    while not failures or failures[-1].retried:
        with pytest.raises(StepFailed) as failure:
            engine.step()
        failures.append(failure.value)
        time.sleep(0.005)
    assert [failure.request_ids for failure in failures] == [()] * (len(failures) - 1) + [("a",)]
    assert (len(failures) > 1) == retries and not engine.has_work and engine.num_running == 0
    if retries:
        assert time.monotonic() - first >= retry_s and "1 more kept to retry" in str(failures[0])
    hooks.fail_at = set()
    assert _run(engine, {0: [("b", [5, 6, 7], GREEDY)]})[0]["b"] == _run(_engine(), {0: [("b", [5, 6, 7], GREEDY)]})[0]["b"]


# --- AsyncEngine -----------------------------------------------------------------------------------


@pytest.fixture
def async_engine():
    engine = AsyncEngine(_engine(max_num_seqs=4))
    engine.start()
    yield engine
    engine.shutdown()


async def _collect(engine: AsyncEngine, request_id: str, prompt: list[int], params: SamplingParams = GREEDY):
    return [out async for out in engine.generate(request_id, prompt, params)]


def test_async_generate_matches_generate(async_engine, reference_models):
    prompts = [_prompt(6 + 5 * i, i) for i in range(6)]

    async def main():
        return await asyncio.gather(*(_collect(async_engine, f"r{i}", p) for i, p in enumerate(prompts)))

    for prompt, outs in zip(prompts, asyncio.run(main())):
        assert [t for o in outs for t in o.new_token_ids] == _generate(reference_models["qwen3_moe"], prompt, 24)
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])


def test_closing_the_iterator_aborts_the_request(async_engine):
    async def main():
        stream = async_engine.generate("r", [5, 6], SamplingParams(max_tokens=200, temperature=0.0))
        await anext(stream)
        await stream.aclose()
        return await async_engine.call_at_step_boundary(lambda: async_engine._engine.num_running)

    assert asyncio.run(main()) == 0


def test_cancelling_a_consumer_aborts_the_request(async_engine):
    async def main():
        task = asyncio.create_task(_collect(async_engine, "r", [5, 6], SamplingParams(max_tokens=200, temperature=0.0)))
        while async_engine.num_running == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        return await async_engine.call_at_step_boundary(lambda: async_engine._engine.has_work and
                                                        async_engine._engine.num_running)

    assert not asyncio.run(main())


def test_a_request_whose_consumer_stops_reading_is_aborted_at_its_deadline():
    """The deadline aborts the request in the engine whether or not its consumer reads (a client that stalls
    without closing holds no KV blocks past it); the consumer's next read is the timeout, not the outputs
    left unread. One that finished in time is not timed out after, however late it is read."""
    engine = AsyncEngine(Engine(build_tiny_model("qwen3_moe"), EngineConfig(max_model_len=1024,
                                                                             request_timeout_s=1.0)))
    engine.start()

    async def main():
        stream = engine.generate("slow", [5, 6], SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True))
        await anext(stream)  # then nothing read for 1.5 s
        short = engine.generate("done", [5, 6], SamplingParams(max_tokens=2, temperature=0.0))
        first = await anext(short)
        await asyncio.sleep(1.5)
        running = await engine.call_at_step_boundary(lambda: (engine._engine.num_running, engine._engine.num_waiting))
        with pytest.raises(RequestTimeout):
            await anext(stream)
        rest = [out async for out in short]
        return running, first, rest

    try:
        running, first, rest = asyncio.run(main())
    finally:
        engine.shutdown()
    assert running == (0, 0)
    assert not first.finished and rest[-1].finished and rest[-1].finish_reason == "length"


class _Fatal(BaseException):
    """Escapes a step's error handling (which catches Exception)."""


def test_a_step_thread_that_dies_stops_the_engine_and_fails_what_waits_on_it():
    engine = AsyncEngine(_engine(max_num_seqs=2))
    engine.start()

    async def main():
        stream = engine.generate("r", [5, 6], SamplingParams(max_tokens=200, temperature=0.0))
        await anext(stream)
        engine._engine.step = lambda: (_ for _ in ()).throw(_Fatal())
        async with asyncio.timeout(30):  # (not waiting on a dead thread)
            with pytest.raises(EngineStopped, match="internal error"):
                async for _ in stream:
                    pass
            with pytest.raises(EngineStopped):
                await _collect(engine, "late", [5, 6])

    try:
        asyncio.run(main())
        assert not engine.is_alive
    finally:
        engine.shutdown()


def test_admission_errors_reach_the_caller(async_engine):
    async def main():
        with pytest.raises(ValueError, match="at least one token"):
            await _collect(async_engine, "r", [])

    asyncio.run(main())


def test_a_failed_step_fails_its_requests_and_the_loop_goes_on():
    hooks = _Hooks(fail_at=2)
    engine = AsyncEngine(Engine(build_tiny_model("qwen3_moe"), EngineConfig(max_model_len=64), hooks=hooks))
    failures = []
    engine.add_step_listener(lambda stats: failures.append(stats.failed))
    engine.start()
    try:
        async def main():
            with pytest.raises(EngineError, match="device lost"):
                await _collect(engine, "a", [5, 6, 7])
            return await _collect(engine, "b", [5, 6, 7])

        assert len(asyncio.run(main())) == 24 and engine.is_alive and failures.count(True) == 1
    finally:
        engine.shutdown()


def test_async_retries_pause_longer_after_each_failed_step_and_the_client_sees_no_error(reference_models):
    hooks = _Hooks(fail_at={2, 3, 4})
    engine = AsyncEngine(Engine(build_tiny_model("qwen3_moe"), EngineConfig(max_model_len=64), hooks=hooks,
                                retryable=_lost_device))
    steps = []
    engine.add_step_listener(lambda stats: steps.append((time.monotonic(), stats.failed)))
    engine.start()
    try:
        tokens = [out.new_token_ids[0] for out in asyncio.run(_collect(engine, "a", [5, 6, 7]))]
    finally:
        engine.shutdown()
    assert tokens == _generate(reference_models["qwen3_moe"], [5, 6, 7], 24) and engine.num_step_retries == 3
    assert [failed for _, failed in steps[:5]] == [False, True, True, True, False]
    gaps = [later - earlier for (earlier, _), (later, _) in zip(steps[1:4], steps[2:5])]
    assert all(gap >= pause for gap, pause in zip(gaps, RETRY_PAUSES_S)), gaps


def test_num_threads_must_be_positive():
    with pytest.raises(ValueError, match="num_threads"):
        AsyncEngine(_engine(), num_threads=0)


def test_functions_run_at_a_step_boundary(async_engine):
    assert async_engine.run_at_step_boundary(lambda: 41 + 1).result(timeout=10) == 42
    with pytest.raises(ZeroDivisionError):
        async_engine.run_at_step_boundary(lambda: 1 / 0).result(timeout=10)


def test_shutdown_fails_unfinished_requests():
    engine = AsyncEngine(_engine())
    engine.start()

    async def main():
        task = asyncio.create_task(_collect(engine, "r", [5], SamplingParams(max_tokens=200, temperature=0.0)))
        while engine.num_running == 0:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineStopped):
            await task

    asyncio.run(main())
    assert not engine.is_alive
    with pytest.raises(EngineStopped):
        engine.run_at_step_boundary(lambda: None).result(timeout=1)


def test_calls_still_queued_at_shutdown_fail_with_engine_stopped_not_cancelled():
    engine = AsyncEngine(_engine())  # never started: the call stays queued until shutdown
    pending = engine.run_at_step_boundary(lambda: None)
    engine.shutdown()
    assert not pending.cancelled()
    with pytest.raises(EngineStopped):
        pending.result(timeout=1)


def test_logprobs_of_every_token_match_the_model_and_only_when_asked(reference_models):
    prompt = _prompt(9, 3)
    engine = _engine(max_num_seqs=2, max_num_batched_tokens=4)  # the prompts are prefilled in chunks
    engine.add_request("lp", prompt, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))
    engine.add_request("plain", prompt, SamplingParams(max_tokens=6, temperature=0.0))
    entries, tokens = [], []
    while engine.has_work:
        for out in engine.step():
            if out.request_id == "plain":
                assert out.logprobs == ()
                continue
            assert len(out.logprobs) == len(out.new_token_ids) == 1
            entries += out.logprobs
            tokens += out.new_token_ids
    assert tokens == _generate(reference_models["qwen3_moe"], prompt, 6)
    with torch.inference_mode():
        logits = reference_models["qwen3_moe"](torch.tensor([prompt + tokens])).logits[0].double()
    reference = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]
    for row, entry, token in zip(reference, entries, tokens):
        assert entry.token_id == token and entry.top[0][0] == token  # greedy: the most likely token
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()


class _OpenAIPenalties:
    """transformers logits processor with OpenAI's penalties on the completion: the reference."""

    def __init__(self, prompt_len: int, presence: float, frequency: float, bias: dict[int, float]) -> None:
        self.prompt_len, self.presence, self.frequency, self.bias = prompt_len, presence, frequency, bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for token, value in self.bias.items():
            scores[:, token] += value
        completion = input_ids[0, self.prompt_len:]
        counts = torch.bincount(completion, minlength=scores.shape[-1]).float() if len(completion) else 0.0
        return scores - counts * self.frequency - (torch.as_tensor(counts) > 0) * self.presence


def test_penalties_and_logit_bias_equal_generate_with_the_same_rules(reference_models):
    from transformers import LogitsProcessorList

    model, prompt = reference_models["qwen3_moe"], _prompt(7, 4)
    plain = _generate(model, prompt, 16)
    bias = {plain[0]: -100.0, 5: 1.5}
    params = SamplingParams(max_tokens=16, temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7,
                            logit_bias=bias)
    processor = LogitsProcessorList([_OpenAIPenalties(len(prompt), 1.5, 0.7, bias)])
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0,
                              logits_processor=processor)[0, len(prompt):].tolist()
    tokens, _ = _run(_engine(), {0: [("p", prompt, params)], 2: [("q", _prompt(5, 5), GREEDY)]})
    assert tokens["p"] == expected != plain
    assert len(set(expected)) > len(set(plain))  # the penalties spread the output over more tokens


def test_logit_bias_beyond_the_vocabulary_is_refused_at_admission():
    with pytest.raises(ValueError, match="logit_bias"):
        _engine().add_request("r", _prompt(3, 0), SamplingParams(logit_bias={VOCAB_SIZE: 1.0}))


def test_prompt_logprobs_over_chunked_prefill_match_the_model(reference_models):
    prompt, other = _prompt(11, 6), _prompt(6, 7)
    engine = _engine(max_num_seqs=2, max_num_batched_tokens=4)  # prefill chunks of 4, 4 and 3 tokens
    engine.add_request("other", other, SamplingParams(max_tokens=3, temperature=0.0, logprobs=1))
    engine.add_request("echo", prompt, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2))
    outputs = {"echo": [], "other": []}
    while engine.has_work:
        for out in engine.step():
            outputs[out.request_id].append(out)
    first, *rest = outputs["echo"]
    assert len(first.prompt_logprobs) == len(prompt) - 1 and all(not o.prompt_logprobs for o in rest)
    assert all(not o.prompt_logprobs for o in outputs["other"])
    with torch.inference_mode():
        reference = torch.log_softmax(reference_models["qwen3_moe"](torch.tensor([prompt])).logits[0].double(), -1)
    for position, entry in enumerate(first.prompt_logprobs):
        assert entry.token_id == prompt[position + 1]
        assert entry.logprob == pytest.approx(float(reference[position, prompt[position + 1]]), abs=1e-4)
        assert [t for t, _ in entry.top] == reference[position].topk(2).indices.tolist()
    assert [o.new_token_ids[0] for o in outputs["echo"]] == _generate(reference_models["qwen3_moe"], prompt, 3)
    assert [o.new_token_ids[0] for o in outputs["other"]] == _generate(reference_models["qwen3_moe"], other, 3)


def test_prompt_only_requests_score_the_prompt_and_sample_nothing(reference_models):
    prompt = _prompt(9, 8)
    engine = _engine(max_num_seqs=3, max_num_batched_tokens=4)
    engine.add_request("score", prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    engine.add_request("one", _prompt(1, 9), SamplingParams(max_tokens=0, prompt_logprobs=1))  # nothing to score
    engine.add_request("gen", _prompt(4, 10), GREEDY)
    outputs = {}
    while engine.has_work:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    (score,), (one,) = outputs["score"], outputs["one"]
    assert score.finished and score.finish_reason == "length" and score.new_token_ids == ()
    assert score.num_completion_tokens == 0 and len(score.prompt_logprobs) == len(prompt) - 1
    with torch.inference_mode():
        reference = torch.log_softmax(reference_models["qwen3_moe"](torch.tensor([prompt])).logits[0].double(), -1)
    assert [e.logprob for e in score.prompt_logprobs] == pytest.approx(
        [float(reference[i - 1, prompt[i]]) for i in range(1, len(prompt))], abs=1e-4)
    assert one.finished and one.prompt_logprobs == () and one.new_token_ids == ()
    assert [t for o in outputs["gen"] for t in o.new_token_ids] == _generate(reference_models["qwen3_moe"],
                                                                             _prompt(4, 10), 24)
    assert engine.num_kv_slots == len(engine._free_slots)  # every slot is free again
    alone = _engine()  # a step whose forward keeps no logits at all
    alone.add_request("one", [5], SamplingParams(max_tokens=0))
    (out,) = alone.step()
    assert out.finished and out.new_token_ids == () and not alone.has_work


def test_repetition_penalty_and_min_tokens_equal_generate_with_transformers_processors(reference_models):
    from transformers import LogitsProcessorList

    model, prompt = reference_models["qwen3_moe"], _prompt(6, 11)
    eos = model.config.eos_token_id
    favour_eos = {eos: 6.0}  # EOS would end the completion at once without min_tokens
    processor = LogitsProcessorList([_OpenAIPenalties(len(prompt), 0.0, 0.0, favour_eos)])
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                              repetition_penalty=1.8, min_new_tokens=5, eos_token_id=eos,
                              logits_processor=processor)[0, len(prompt):].tolist()
    params = SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.8, min_tokens=5,
                            logit_bias=favour_eos)
    tokens, reasons = _run(_engine(), {0: [("r", prompt, params)]})
    assert tokens["r"] == expected and len(expected) == 6 and expected[-1] == eos  # EOS right after the 5th
    assert reasons["r"] == "stop"
    plain, _ = _run(_engine(), {0: [("r", prompt, SamplingParams(max_tokens=12, temperature=0.0, logit_bias=favour_eos))]})
    assert plain["r"] == [eos]


def test_stop_token_ids_beyond_the_vocabulary_are_refused_at_admission():
    with pytest.raises(ValueError, match="stop_token_ids"):
        _engine().add_request("r", _prompt(3, 0), SamplingParams(stop_token_ids=[VOCAB_SIZE]))


def _counting(engine: Engine) -> list[int]:
    """Record the tokens each step's forward runs (prefill chunks and decodes)."""
    counted, schedule = [], engine._schedule

    def wrapped():
        chunks = schedule()
        counted.append(sum(n for _, n in chunks))
        return chunks

    engine._schedule = wrapped
    return counted


@pytest.mark.parametrize("max_num_seqs", [4, 1])  # room for the sharers, or none: they prefill alone
def test_requests_sharing_a_prefill_equal_separate_requests(max_num_seqs):
    prompt = _prompt(20, 12)
    params = [SamplingParams(max_tokens=6, temperature=0.9, seed=s, logprobs=1, prompt_logprobs=1) for s in (3, 4, 5)]
    separate = {}
    for i, p in enumerate(params):
        tokens, _ = _run(_engine(), {0: [(f"c{i}", prompt, p)]})
        separate.update(tokens)
    engine = _engine(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(max_num_seqs, 8))
    counted = _counting(engine)
    engine.add_request("c0", prompt, params[0])
    for i in (1, 2):
        engine.add_request(f"c{i}", prompt, params[i], share_prefill_with="c0")
    assert engine.num_waiting == 3
    outputs = {}
    while engine.has_work:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in outputs.items()} == separate
    firsts = [outputs[f"c{i}"][0].prompt_logprobs for i in range(3)]
    assert len(firsts[0]) == len(prompt) - 1 and firsts[1] == firsts[0] == firsts[2]
    prefilled = sum(counted) - 3 * 5  # every forward token beyond the decodes after each first token
    assert prefilled == (len(prompt) if max_num_seqs == 4 else 3 * len(prompt))
    assert engine.num_kv_slots == len(engine._free_slots)


def test_a_request_waiting_to_share_a_prefill_survives_its_parents_abort_and_can_be_aborted():
    prompt = _prompt(12, 13)
    engine = _engine(max_num_seqs=4, max_num_batched_tokens=4)  # the parent's prefill takes three steps
    engine.add_request("p", prompt, GREEDY)
    engine.add_request("c", prompt, GREEDY, share_prefill_with="p")
    engine.add_request("d", prompt, GREEDY, share_prefill_with="p")
    engine.step()
    assert engine.abort("d") and engine.abort("p")
    tokens, reasons = _run(engine, {})
    assert reasons == {"p": "abort", "d": "abort", "c": reasons["c"]} and reasons["c"] in ("length", "stop")
    expected, _ = _run(_engine(), {0: [("c", prompt, GREEDY)]})
    assert tokens["c"] == expected["c"]


def test_sharing_needs_a_queued_parent_with_the_same_prompt():
    engine = _engine()
    engine.add_request("p", _prompt(5, 1), GREEDY)
    engine.add_request("other-prompt", _prompt(6, 2), GREEDY, share_prefill_with="p")
    engine.add_request("no-parent", _prompt(5, 1), GREEDY, share_prefill_with="missing")
    assert engine._forks == {} and engine.num_waiting == 3
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("no-parent", _prompt(5, 1), GREEDY)


def test_prompt_logprob_prefill_is_chunked_to_bound_the_kept_logits(reference_models):
    prompt, other = _prompt(30, 14), _prompt(30, 15)
    engine = _engine(max_num_seqs=2, max_num_batched_tokens=64, max_prompt_logprob_tokens=8)
    recorded = _recording(engine)
    engine.add_request("scored", prompt, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=0))
    engine.add_request("plain", other, SamplingParams(max_tokens=2, temperature=0.0))
    outputs = {}
    while engine.has_work:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert [r.get("scored") for r in recorded[:4]] == [8, 8, 8, 6]  # chunks of at most 8 prompt tokens
    assert recorded[0]["plain"] == 30  # other prefills are not held back
    with torch.inference_mode():
        reference = torch.log_softmax(reference_models["qwen3_moe"](torch.tensor([prompt])).logits[0].double(), -1)
    assert [e.logprob for e in outputs["scored"][0].prompt_logprobs] == pytest.approx(
        [float(reference[i - 1, prompt[i]]) for i in range(1, len(prompt))], abs=1e-4)


def test_logprobs_are_the_models_whatever_the_request_samples_from():
    """Greedy and sampled (temperature, top-p, penalties, bias) requests report the same numbers at the
    same prefix: the model's log-softmax, before anything reshapes the distribution tokens are drawn from."""
    prompt = _prompt(7, 16)
    engine = _engine()
    engine.add_request("greedy", prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=3))
    engine.add_request("sampled", prompt, SamplingParams(max_tokens=1, temperature=0.3, top_p=0.5, seed=1,
                                                         repetition_penalty=1.5, logit_bias={5: 3.0}, logprobs=3))
    entries = {out.request_id: out.logprobs[0] for out in engine.step()}
    greedy, sampled = entries["greedy"].top, entries["sampled"].top
    assert [t for t, _ in greedy] == [t for t, _ in sampled]
    assert [lp for _, lp in greedy] == pytest.approx([lp for _, lp in sampled], abs=1e-6)


# --- prefix caching ---------------------------------------------------------------------------------------


def _finish(engine: Engine, request_id: str, prompt: list[int], params: SamplingParams = GREEDY):
    """Run one request to its end alone; its tokens and its first output."""
    engine.add_request(request_id, prompt, params)
    outputs = []
    while engine.has_work:
        outputs += [out for out in engine.step() if out.request_id == request_id]
    return [t for out in outputs for t in out.new_token_ids], outputs[0]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_a_next_turn_prefills_only_what_the_cache_does_not_hold_and_equals_generate(arch, reference_models):
    first = _prompt(30, 20)
    engine = _engine(arch, max_num_seqs=2)
    answer, out = _finish(engine, "turn1", first)
    assert out.num_cached_tokens == 0
    second = first + answer + _prompt(9, 21)  # the conversation so far, then the user's next message
    counted = _counting(engine)
    tokens, out = _finish(engine, "turn2", second)
    cached = len(first) + len(answer) - 1  # the last sampled token never ran through the model
    assert out.num_cached_tokens == cached and counted[0] == len(second) - cached
    assert tokens == _generate(reference_models[arch], second, 24)
    assert (engine.prefix_cache_queries, engine.prefix_cache_hits) == (len(first) + len(second), cached)


def test_prefix_cached_outputs_equal_uncached_ones_log_probabilities_included():
    system = _prompt(40, 22)
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=7, logprobs=2)
    runs = {}
    for enabled in (True, False):
        engine = _engine(max_num_seqs=2, enable_prefix_caching=enabled)
        _finish(engine, "warm", system + _prompt(5, 23), params)
        outputs = []
        engine.add_request("user", system + _prompt(6, 24), params)
        while engine.has_work:
            outputs += engine.step()
        runs[enabled] = outputs
    assert runs[True][0].num_cached_tokens == 40 and runs[False][0].num_cached_tokens == 0
    assert [o.new_token_ids for o in runs[True]] == [o.new_token_ids for o in runs[False]]
    for cached, uncached in zip(runs[True], runs[False]):
        assert [e.logprob for e in cached.logprobs] == pytest.approx([e.logprob for e in uncached.logprobs], abs=1e-4)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "deepseek_v32", "glm_moe_dsa"])  # latent slots; DSA keys
def test_a_running_requests_prefix_is_shared_and_an_identical_prompt_still_prefills_its_last_token(arch, reference_models):
    system, prompt = _prompt(25, 25), _prompt(25, 25) + _prompt(4, 26)
    engine = _engine(arch, max_num_seqs=3)
    engine.add_request("long", system + _prompt(3, 27), SamplingParams(max_tokens=40, temperature=0.0))
    engine.step()
    engine.add_request("joins", prompt, GREEDY)
    engine.add_request("same", system + _prompt(3, 27), GREEDY)
    outputs = {}
    while engine.has_work:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert outputs["joins"][0].num_cached_tokens == 25  # shared from the running request's slot
    assert outputs["same"][0].num_cached_tokens == 27  # all but the last prompt token
    model = reference_models[arch]
    assert [t for o in outputs["joins"] for t in o.new_token_ids] == _generate(model, prompt, 24)
    assert [t for o in outputs["same"] for t in o.new_token_ids] == _generate(model, system + _prompt(3, 27), 24)


def _recording(engine: Engine) -> list[dict[str, int]]:
    """Record each step's schedule: tokens by request."""
    recorded, schedule = [], engine._schedule

    def wrapped():
        chunks = schedule()
        recorded.append({seq.request_id: n for seq, n in chunks})
        return chunks

    engine._schedule = wrapped
    return recorded


def test_a_burst_with_one_uncached_system_prompt_prefills_it_once_and_others_go_ahead_meanwhile(reference_models):
    system = _prompt(100, 40)
    prompts = {f"user{i}": system + _prompt(10, 41 + i) for i in range(3)}
    prompts["other"] = _prompt(50, 45)  # behind them in the queue, nothing in common: not held back
    engine = _engine(max_num_seqs=8)
    recorded = _recording(engine)
    tokens, _ = _run(engine, {0: [(request_id, prompt, GREEDY) for request_id, prompt in prompts.items()]})
    # user1 and user2 wait one step for user0's prefill of the system prompt, then prefill only their 10 tokens
    assert recorded[:2] == [{"user0": 110, "other": 50}, {"user0": 1, "other": 1, "user1": 10, "user2": 10}]
    assert engine.num_prefill_deferrals == 2 and engine.prefix_cache_hits == 200
    for request_id, prompt in prompts.items():
        assert tokens[request_id] == _generate(reference_models["qwen3_moe"], prompt, 24), request_id
    assert_block_counts(engine._cache)


def test_a_long_shared_prompt_chunked_over_steps_is_prefilled_once():
    system = _prompt(100, 46)
    engine = _engine(max_num_seqs=4, max_num_batched_tokens=64)
    recorded = _recording(engine)
    _run(engine, {0: [("first", system + [7, 8], GREEDY), ("second", system + [9], GREEDY)]})
    # The leader's last chunk leaves budget; admitted beside it, the follower would prefill its 36 system prompt
    # tokens too (37 tokens, only 64 of them cached): it waits a step and prefills one.
    assert recorded[:3] == [{"first": 64}, {"first": 38}, {"first": 1, "second": 1}]
    assert engine.num_prefill_deferrals == 1 and engine.prefix_cache_hits == 100


@pytest.mark.parametrize("case", ["short", "scored", "linear", "uncached"])
def test_no_deferral_for_a_short_shared_prefix_scored_prompts_linear_attention_or_without_prefix_caching(case):
    shared = 20 if case == "short" else 60
    system = _prompt(shared, 47)
    arch = "qwen3_next" if case == "linear" else "qwen3_moe"
    engine = _engine(arch, max_num_seqs=4, enable_prefix_caching=case != "uncached")
    recorded = _recording(engine)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=0 if case == "scored" else None)
    engine.add_request("first", system + [7, 8], GREEDY)
    engine.add_request("second", system + [9], params)
    engine.step()
    assert recorded[0] == {"first": shared + 2, "second": shared + 1} and engine.num_prefill_deferrals == 0


def _check_blocks(engine: Engine) -> None:
    """The KV cache's block counts hold (`assert_block_counts`), its live slots are the running sequences', and
    no running sequence shares a block it will write."""
    cache = engine._cache
    assert_block_counts(cache)
    assert {seq.slot for seq in engine._running} == {slot for slot in range(cache.num_slots) if cache.live[slot]}
    for seq in engine._running:
        assert all(cache.refs[block] == 1 for block in cache.blocks[seq.slot][seq.num_cached // cache.block_size:])


def test_requests_sharing_a_system_prompt_hold_its_blocks_once(reference_models):
    """Memory for two sequences of max_model_len (16 blocks of 16) runs six requests sharing a 96-token system
    prompt at once: they hold its six blocks together and one block each of their own (12 blocks; copies would
    take 42), each answer equal to `generate`."""
    model = build_tiny_model("qwen3_moe")
    engine = Engine(model, EngineConfig(max_num_seqs=8, max_model_len=128, kv_cache_bytes=2 * 128 * _token_bytes(model)))
    assert engine.num_kv_blocks == 16
    system = _prompt(96, 60)
    _finish(engine, "warm", system + [7], SamplingParams(max_tokens=1, temperature=0.0))
    prompts = {f"r{i}": system + _prompt(5, 61 + i) for i in range(6)}
    running, usage, outputs = [], [], {}

    def watch(e: Engine) -> None:
        _check_blocks(e)
        running.append(e.num_running)
        usage.append(e.kv_cache_usage)
        if e.num_running == 6:  # the system prompt's blocks, the same for all
            assert len({tuple(e._cache.blocks[seq.slot][:6]) for seq in e._running}) == 1

    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=8, temperature=0.0))
    while engine.has_work:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        watch(engine)
    assert max(running) == 6 and max(usage) == 12 / 16 and engine.num_preemptions == 0
    for request_id, prompt in prompts.items():
        assert outputs[request_id][0].num_cached_tokens == 96
        tokens = [t for out in outputs[request_id] for t in out.new_token_ids]
        assert tokens == _generate(reference_models["qwen3_moe"], prompt, 8), request_id


def test_a_cached_prefix_gives_up_its_last_blocks_first(reference_models):
    """Four blocks of 16: a finished 40-token request caches three; an unrelated 20-token prompt needs two with
    one free, so the cached prefix gives up its last block only and keeps its first 32 tokens, which the next
    prompt starting with them takes from the cache (taking its one more block from the second's tail)."""
    model = build_tiny_model("qwen3_moe")
    engine = Engine(model, EngineConfig(max_num_seqs=1, max_model_len=64, kv_cache_bytes=64 * _token_bytes(model)))
    first = _prompt(40, 40)
    params = SamplingParams(max_tokens=2, temperature=0.0)
    _finish(engine, "first", first, params)
    _finish(engine, "other", _prompt(20, 43), params)
    assert sorted(map(len, dict(engine._slot_tokens.items()).values())) == [21, 32] and not engine._cache.num_free
    again = first[:32] + _prompt(10, 44)
    tokens, out = _finish(engine, "again", again, params)
    assert out.num_cached_tokens == 32 and tokens == _generate(reference_models["qwen3_moe"], again, 2)
    assert sorted(map(len, dict(engine._slot_tokens.items()).values())) == [16, 43]
    _check_blocks(engine)


def test_shared_blocks_under_memory_pressure_keep_every_answer_equal_to_generate(reference_models):
    """Requests branching off three roots at random points, arriving over time into memory for three sequences
    of max_model_len: prefixes are shared from running and cached sequences, copied on write, taken in place,
    given up, and sequences preempted; the block accounting holds after every step and every answer equals
    `generate`."""
    rng = random.Random(7)  # (a seed whose run takes a cached prefix in place while others share its blocks)
    model = build_tiny_model("qwen3_moe")
    engine = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=48,
                                        kv_cache_bytes=3 * 64 * _token_bytes(model)))
    roots = [_prompt(40, 70 + i) for i in range(3)]
    requests = {}
    for i in range(18):
        root = rng.choice(roots)
        prompt = root[:rng.randint(1, 40)] + _prompt(rng.randint(1, 12), 80 + i)
        requests[f"q{i}"] = (rng.randint(0, 30), prompt, rng.randint(2, 64 - len(prompt)))
    outputs, step = {}, 0
    while step <= 30 or engine.has_work:
        for request_id, (arrival, prompt, max_tokens) in requests.items():
            if arrival == step:
                engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        _check_blocks(engine)
        step += 1
    assert engine.num_preemptions > 0 and engine.prefix_cache_hits > 0
    for request_id, (_, prompt, max_tokens) in requests.items():
        assert outputs[request_id] == _generate(reference_models["qwen3_moe"], prompt, max_tokens), request_id


def test_free_slots_are_overwritten_empty_first_then_least_recently_released():
    a, b, c = _prompt(12, 30), _prompt(12, 31), _prompt(12, 32)
    engine = _engine(max_num_seqs=1, max_cached_sequences=1)  # two slots: one to run in, one for a cached prefix
    assert engine.num_kv_slots == 2
    _finish(engine, "a", a)
    _finish(engine, "b", b)  # takes the empty slot: a's stays cached
    assert _finish(engine, "a2", a + [5])[1].num_cached_tokens == 12
    _finish(engine, "c", c)  # overwrites b's slot (a's was released after it)
    assert _finish(engine, "b2", b + [5])[1].num_cached_tokens == 0  # overwrites a2's, released before c's
    assert _finish(engine, "c2", c + [5])[1].num_cached_tokens == 12
    assert _finish(engine, "a3", a + [5])[1].num_cached_tokens == 0


def test_cached_prefix_lookup_finds_the_longest_shared_prefix_among_many():
    """The sorted lookup (two neighbours of where a prompt sorts) finds as long a prefix as comparing every cached
    sequence, through puts, trims and pops, for prompts that extend, branch from, or share nothing with them."""
    rng = random.Random(0)
    stems = [[rng.randrange(3, 9) for _ in range(rng.randrange(1, 40))] for _ in range(6)]  # few tokens: many ties
    cache, slots = _CachedPrefixes(), {}
    for step in range(3000):
        slot, action = rng.randrange(60), rng.random()
        if action < 0.5:
            tokens = rng.choice(stems)[:rng.randrange(1, 40)] + [rng.randrange(3, 9) for _ in range(rng.randrange(0, 9))]
            cache.put(slot, tokens)
            slots[slot] = tokens
        elif action < 0.7 and slot in slots:
            keep = rng.randrange(1, len(slots[slot]) + 1)
            cache.trim(slot, keep)
            slots[slot] = slots[slot][:keep]
        elif action < 0.8:
            cache.pop(slot)
            slots.pop(slot, None)
        prompt = rng.choice(stems)[:rng.randrange(1, 40)] + [rng.randrange(3, 9) for _ in range(rng.randrange(0, 9))]
        limit = rng.randrange(0, len(prompt) + 2)
        brute = max((_common_prefix(prompt, tokens, limit) for tokens in slots.values()), default=0)
        source, length = cache.longest(prompt, limit)
        assert length == brute and (source is None) == (brute == 0), step
        if source is not None:
            assert _common_prefix(prompt, slots[source], limit) == length
    assert dict(cache.items()) == slots


def test_the_prefix_cache_keeps_more_finished_requests_than_running_ones():
    """With the default max_cached_sequences, a finished request's prefix is still found after many more requests
    than max_num_seqs have finished since (as in a chat service whose users take turns); with as many cached
    sequences as running ones it is overwritten. The cached prefixes hold blocks, not slots, of the KV memory."""
    prompts, one = [_prompt(20, 100 + i) for i in range(12)], SamplingParams(max_tokens=1, temperature=0.0)
    roomy = _engine(max_num_seqs=4)  # 64 blocks: each prompt holds 2
    assert roomy.num_kv_slots == 4 + min(CACHED_SEQUENCES_PER_SEQ * 4, roomy.num_kv_blocks) == 68
    few = _engine(max_num_seqs=4, max_cached_sequences=4)
    assert few.num_kv_slots == 8
    for engine in (roomy, few):
        for i, prompt in enumerate(prompts):
            _finish(engine, f"first-{i}", prompt, one)
    found = [_finish(roomy, f"again-{i}", prompt + [5], one)[1].num_cached_tokens for i, prompt in enumerate(prompts)]
    assert found == [20] * len(prompts)
    assert _finish(few, "again-0", prompts[0] + [5], one)[1].num_cached_tokens == 0
    with pytest.raises(ValueError, match="max_cached_sequences"):
        EngineConfig(max_cached_sequences=0)


def test_the_prefix_cache_holds_what_the_kv_memory_holds_beyond_the_running_sequences(reference_models):
    """Two running sequences of at most 64 positions fill 8 blocks. With prefix caching a budget of 40 blocks is
    all taken (as vLLM gives its cache all the memory): 12 finished 40-token requests (3 blocks each) are all
    found again, their greedy tokens those of `generate`. With 8 (what the cache took of any budget before) two
    are held, and asking for them in turn finds none. Without prefix caching 8 of the 40 are taken (the rest
    would hold nothing)."""
    model = build_tiny_model("qwen3_moe")
    config = {"max_num_seqs": 2, "max_model_len": 64}
    roomy = Engine(model, EngineConfig(**config, kv_cache_bytes=40 * 16 * _token_bytes(model)))
    tight = Engine(build_tiny_model("qwen3_moe"), EngineConfig(**config, kv_cache_bytes=8 * 16 * _token_bytes(model)))
    off = Engine(build_tiny_model("qwen3_moe"), EngineConfig(**config, kv_cache_bytes=40 * 16 * _token_bytes(model),
                                                             enable_prefix_caching=False))
    assert (roomy.num_kv_blocks, tight.num_kv_blocks, off.num_kv_blocks) == (40, 8, 8)
    prompts, one = [_prompt(40, 300 + i) for i in range(12)], SamplingParams(max_tokens=1, temperature=0.0)
    for engine in (roomy, tight):
        for i, prompt in enumerate(prompts):
            _finish(engine, f"first-{i}", prompt, one)
    params = SamplingParams(max_tokens=3, temperature=0.0)
    again = [_finish(roomy, f"again-{i}", prompt + [5], params) for i, prompt in enumerate(prompts)]
    assert [out.num_cached_tokens for _, out in again] == [40] * len(prompts)
    for (tokens, _), prompt in zip(again, prompts):
        assert tokens == _generate(reference_models["qwen3_moe"], prompt + [5], 3)
    found = [_finish(tight, f"again-{i}", prompt + [5], one)[1].num_cached_tokens for i, prompt in enumerate(prompts)]
    assert found == [0] * len(prompts)  # two held, each the next to go as the one asked for is prefilled again


def test_a_cached_prefix_shared_again_is_overwritten_after_one_released_later():
    """Overwriting goes by last use: a cached prefix that a newer request shared outlives one released after it
    and not used since."""
    a, b = _prompt(20, 36), _prompt(20, 37)
    engine = _engine(max_num_seqs=2, max_cached_sequences=2)  # four slots
    _finish(engine, "a", a)
    _finish(engine, "b", b)
    assert _finish(engine, "x", a[:16] + _prompt(4, 38))[1].num_cached_tokens == 16  # shares a's blocks
    _finish(engine, "c", _prompt(20, 39))  # the last empty slot
    _finish(engine, "d", _prompt(20, 40))  # overwrites b's slot, not a's
    assert _finish(engine, "a2", a + [5])[1].num_cached_tokens == 20
    assert _finish(engine, "b2", b + [5])[1].num_cached_tokens == 0


def test_no_prefix_reuse_for_prompt_log_probabilities_when_disabled_or_after_a_failed_step():
    prompt = _prompt(16, 33)
    engine = _engine(max_num_seqs=1)
    _finish(engine, "warm", prompt)
    _, out = _finish(engine, "scored", prompt, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == len(prompt) - 1
    disabled = _engine(max_num_seqs=1, enable_prefix_caching=False)
    _finish(disabled, "warm", prompt)
    assert _finish(disabled, "again", prompt)[1].num_cached_tokens == 0 and disabled.prefix_cache_queries == 0
    hooks = _Hooks(fail_at=3)
    failing = Engine(build_tiny_model("qwen3_moe"), EngineConfig(max_model_len=64, max_num_seqs=1), hooks=hooks)
    failing.add_request("a", prompt, GREEDY)
    failing.step()
    failing.step()
    with pytest.raises(StepFailed):
        failing.step()
    assert _finish(failing, "b", prompt)[1].num_cached_tokens == 0  # the failed forward may have half-written it


def test_a_short_match_is_shared_and_leaves_a_longer_cached_sequence_whole():
    long, other = _prompt(30, 34), _prompt(30, 34)[:3] + _prompt(10, 35)
    engine = _engine(max_num_seqs=2)
    _finish(engine, "long", long)
    assert _finish(engine, "other", other)[1].num_cached_tokens == 3  # shared into the empty slot
    assert _finish(engine, "long2", long + [5])[1].num_cached_tokens == 30


def test_cached_prefixes_give_their_blocks_up_when_a_prompt_needs_them(reference_models):
    """Four blocks of 16 positions: a finished 40-token request keeps three as its cached prefix; a 50-token
    prompt sharing its first 20 tokens has no room for a copy beside them, so it takes that slot in place (20
    tokens from the cache); a 60-token prompt sharing nothing then takes the cached blocks back. Greedy tokens
    equal `generate` throughout."""
    model = build_tiny_model("qwen3_moe")
    engine = Engine(model, EngineConfig(max_num_seqs=1, max_model_len=64, kv_cache_bytes=64 * _token_bytes(model)))
    assert engine.num_kv_blocks == 4
    first = _prompt(40, 40)
    params = SamplingParams(max_tokens=2, temperature=0.0)
    _finish(engine, "first", first, params)
    assert engine._cache.spare_blocks() == 4 and engine._cache.num_free == 1  # 41 positions cached: 3 blocks
    shares = first[:20] + _prompt(30, 41)
    tokens, out = _finish(engine, "shares", shares, params)
    assert out.num_cached_tokens == 20 and tokens == _generate(reference_models["qwen3_moe"], shares, 2)
    other = _prompt(60, 42)
    tokens, out = _finish(engine, "other", other, params)
    assert out.num_cached_tokens == 0 and tokens == _generate(reference_models["qwen3_moe"], other, 2)
    assert list(dict(engine._slot_tokens.items()).values()) == [other + tokens[:1]]  # the only prefix cached now


def _evict_one_block_at_a_time(engine: Engine, slot: int, num_tokens: int) -> bool:
    """`_make_room` before the review, the reference: one block a call, the victim's cached tokens re-sorted each
    time."""
    cache = engine._cache
    while not cache.grow(slot, num_tokens):
        victim = engine._to_evict(None)
        if victim is None:
            return False
        kept = (len(cache.blocks[victim]) - 1) * cache.block_size
        if kept <= 0:
            engine._clear_slot(victim)
        else:
            engine._slot_tokens.trim(victim, kept)
            cache.trim(victim, kept)
    return True


def _cached_prefix_tree(seed: int, num_cached: int, share: float) -> tuple[Engine, int]:
    """An engine whose free slots hold ``num_cached`` finished sequences, each sharing a random prefix of an earlier
    one (with probability ``share``) as requests over common prefixes leave them, and a slot taken for a prompt."""
    rng = random.Random(seed)
    model = build_tiny_model("qwen3_moe")
    engine = Engine(model, EngineConfig(max_num_seqs=1, max_model_len=256, kv_block_size=4,
                                        max_cached_sequences=num_cached + 1,
                                        kv_cache_bytes=(16 + 3 * num_cached) * 4 * _token_bytes(model)))
    cache, cached = engine._cache, []
    for _ in range(num_cached):
        slot = engine._take_free_slot(engine._victim())
        if cached and rng.random() < share:
            source, prefix = cached[0] if share == 1.0 else rng.choice(cached)  # (1.0: one system prompt, whole)
            shared = len(prefix) if share == 1.0 else rng.randint(1, len(prefix))
            tokens = prefix[:shared] + [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(1, 24))]
            cache.share_prefix(source, slot, shared)
            grown = cache.grow(slot, len(tokens), write_from=shared)
        else:
            tokens = [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(1, 60) if share < 1.0 else 160)]
            grown = cache.grow(slot, len(tokens))
        if not grown:  # (the tree is only as large as the memory holds)
            cache.release(slot)
            engine._free_slot(slot)
            continue
        engine._free_slot(slot)
        engine._slot_tokens.put(slot, tokens)
        cached.append((slot, tokens))
    return engine, engine._take_free_slot(engine._victim())


@pytest.mark.parametrize("seed", range(14))
def test_giving_cached_prefixes_up_leaves_what_one_block_at_a_time_did_at_a_cost_in_the_slots_not_the_blocks(seed):
    """A prompt that needs the memory of cached prefixes gave them up one block per call, each call re-sorting the
    victim's cached tokens: with 64 cached conversations on a 16k-token system prompt (whose shared blocks free
    nothing until every one gave them up) one admission took 11 s (a review). Now blocks go a slot at a time: the
    blocks, their references and the cached tokens end as the reference left them, and the evictions are at most
    one per cached slot and two per freed block (the last two slots sharing a block take turns: after one gives it
    up, the other's last block may be its own)."""
    share = 1.0 if seed >= 12 else (0.0, 0.5, 0.95)[seed % 3]
    engine, slot = _cached_prefix_tree(seed, num_cached=24, share=share)
    reference, ref_slot = _cached_prefix_tree(seed, num_cached=24, share=share)
    assert slot == ref_slot and engine._cache.blocks == reference._cache.blocks
    calls, evict = [], engine._evict
    engine._evict = lambda victim, *rest: calls.append(victim) or evict(victim, *rest)
    need = random.Random(seed).randint(160, 256)
    assert engine._make_room(slot, need) == _evict_one_block_at_a_time(reference, slot, need)
    assert engine._cache.blocks == reference._cache.blocks and engine._cache.refs == reference._cache.refs
    assert dict(engine._slot_tokens.items()) == dict(reference._slot_tokens.items())
    assert engine._slot_tokens._sorted == reference._slot_tokens._sorted
    assert_block_counts(engine._cache)
    assert len(calls) <= 24 + 2 * engine._cache.blocks_for(need)


def test_a_tiny_temperature_is_greedy_and_fails_no_request_of_its_step():
    # temperature 1e-39 overflowed the logits to inf: the draw raised and the step failed every request in it
    prompt, sampled = _prompt(9, 0), SamplingParams(max_tokens=8, temperature=0.8, seed=1)
    greedy, _ = _run(_engine(), {0: [("g", prompt, SamplingParams(max_tokens=8, temperature=0.0))]})
    alone, _ = _run(_engine(), {0: [("s", _prompt(12, 1), sampled)]})
    tiny = SamplingParams(max_tokens=8, temperature=1e-39, seed=3)
    tokens, reasons = _run(_engine(), {0: [("s", _prompt(12, 1), sampled), ("t", prompt, tiny)]})
    assert tokens["t"] == greedy["g"] and tokens["s"] == alone["s"] and set(reasons.values()) == {"length"}


def test_an_engine_whose_steps_all_fail_beyond_retry_reports_itself_broken():
    """A GPU after a sticky CUDA error fails every forward: the step loop still runs, so the replica's health check
    passed and every request got an error for good (GPU-path review). Three steps in a row failed beyond retry mark
    the engine broken (Serve's health probe then replaces the replica; /health answers 503); one that runs clears it,
    and steps failing on an expert device (retried) never count."""
    from service.async_engine import BROKEN_AFTER_FAILED_STEPS

    hooks = _Hooks(fail_at=set(range(2, 2 + BROKEN_AFTER_FAILED_STEPS)))
    engine = AsyncEngine(Engine(build_tiny_model("qwen3_moe"), EngineConfig(max_model_len=64), hooks=hooks,
                                retryable=lambda exc: False))
    engine.start()
    try:
        asyncio.run(_collect(engine, "ok", [5, 6], SamplingParams(max_tokens=1, temperature=0.0)))
        for i in range(BROKEN_AFTER_FAILED_STEPS):
            assert engine.broken is None
            with pytest.raises(EngineError):
                asyncio.run(_collect(engine, f"fails-{i}", [5, 6, 7]))
        assert engine.is_alive and "steps failed: " in engine.broken and "device lost" in engine.broken
        import types

        from service.deployments import IngressDeployment

        with pytest.raises(RuntimeError, match="steps failed"):  # what Serve's health probe calls
            IngressDeployment.check_health(types.SimpleNamespace(engine=engine))
        asyncio.run(_collect(engine, "recovered", [5, 6], SamplingParams(max_tokens=1, temperature=0.0)))
        assert engine.broken is None
    finally:
        engine.shutdown()
    retried = AsyncEngine(Engine(build_tiny_model("qwen3_moe"), EngineConfig(max_model_len=64),
                                 hooks=_Hooks(fail_at={2, 3, 4, 5}), retryable=_lost_device))
    retried.start()
    try:
        asyncio.run(_collect(retried, "a", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0)))
        assert retried.broken is None and retried.num_step_retries == 4
    finally:
        retried.shutdown()
    # an expert device's failures past step_retry_s (here 0: never retried) fail their requests but are the
    # workers' (the coordinator replaces the device): they never mark the engine broken, which would have had Serve
    # replace every ingress replica during a worker outage (review)
    past_retry = AsyncEngine(Engine(build_tiny_model("qwen3_moe"), EngineConfig(max_model_len=64, step_retry_s=0.0),
                                    hooks=_Hooks(fail_at=set(range(1, 1 + BROKEN_AFTER_FAILED_STEPS))),
                                    retryable=_lost_device))
    past_retry.start()
    try:
        for i in range(BROKEN_AFTER_FAILED_STEPS):
            with pytest.raises(EngineError):
                asyncio.run(_collect(past_retry, f"fails-{i}", [5, 6, 7]))
        assert past_retry.broken is None
    finally:
        past_retry.shutdown()


def test_a_request_admitted_after_a_step_failed_unexpectedly_is_not_left_running(async_engine):
    """A step that raised unexpectedly failed every registered stream, also one whose admission was still queued
    for the step boundary (or whose grammar was compiling): it was admitted after, read the error, ended without
    aborting, and ran unread to max_tokens (a review)."""
    core, real_step = async_engine._engine, async_engine._engine.step
    entered, release = threading.Event(), threading.Event()

    def step():
        if not release.is_set():
            entered.set()
            release.wait(10)
            raise RuntimeError("a bug outside the forward")
        return real_step()

    async def main():
        first = asyncio.create_task(_collect(async_engine, "a", [5, 6], SamplingParams(max_tokens=200, temperature=0)))
        while async_engine.num_running == 0:
            await asyncio.sleep(0.01)
        core.step = step
        while not entered.is_set():
            await asyncio.sleep(0.01)
        late = asyncio.create_task(_collect(async_engine, "b", [7, 8], SamplingParams(max_tokens=200, temperature=0)))
        await asyncio.sleep(0.2)  # registered, its admission queued behind the failing step
        release.set()
        for task in (first, late):
            with pytest.raises(EngineError, match="engine step failed"):
                await task
        return await async_engine.call_at_step_boundary(lambda: (core.num_running, core.num_waiting))

    assert asyncio.run(main()) == (0, 0)


def test_phi_moe_attends_within_its_configs_sliding_window():
    """PhimoeModel masks every layer with config.sliding_window while its attention is given no window, and its
    config names no layer types: the engine attended every key (a review: a window of 4 diverged at the first
    token)."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_config

    config = tiny_config("phimoe")
    config.sliding_window = 4
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config).eval()
    engine = Engine(copy.deepcopy(reference), EngineConfig(max_model_len=128))
    prompt = _prompt(40, 3)
    tokens, _ = _run(engine, {0: [("a", prompt, GREEDY)]})
    assert tokens["a"] == _generate(reference, prompt, GREEDY.max_tokens)
