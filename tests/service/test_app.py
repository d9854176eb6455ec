"""The OpenAI-compatible app served by uvicorn on an ephemeral port, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch
from fastapi import APIRouter

from service.app import BodySizeLimit, create_app, serve_locally
from service.async_engine import AsyncEngine
from service.engine import Engine, EngineConfig
from service.openai_api import APIError
from service.text import apply_chat_template
from tests.service.test_text import build_chat_model, build_tokenizer

MODEL = "vibe-test"
MAX_MODEL_LEN = 256


_serve = serve_locally  # modules of other tests import it by this name


def _start_engine(tokenizer, *, max_model_len: int = MAX_MODEL_LEN, **config) -> AsyncEngine:
    """A started AsyncEngine over the tiny random chat model (callers shut it down)."""
    engine = AsyncEngine(Engine(build_chat_model(tokenizer), EngineConfig(max_model_len=max_model_len, **config),
                                tokenizer=tokenizer))
    engine.start()
    return engine


@contextlib.contextmanager
def served(engine: AsyncEngine, **app_args):
    """The app over a started ``engine`` on an ephemeral port (its URL); the engine is shut down after."""
    try:
        with _serve(create_app(engine, served_model_name=MODEL, **app_args)) as url:
            yield url
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def server(tokenizer):
    engine = _start_engine(tokenizer, max_num_seqs=16, max_num_batched_tokens=256)
    with served(engine, max_body_bytes=64 * 1024) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def _reference_text(tokenizer, prompt: list[int], max_tokens: int) -> str:
    model = build_chat_model(tokenizer)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)


MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is a list?"}]


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_equals_greedy_generate_and_streaming_equals_non_streaming(client, tokenizer):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    prompt = apply_chat_template(tokenizer, MESSAGES)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == _reference_text(tokenizer, prompt, 20)
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.total_tokens == len(prompt) + response.usage.completion_tokens
    assert (choice.finish_reason == "length") == (response.usage.completion_tokens == 20)

    # what the client sends for stream=None and a stream without obfuscation (each was a 400; a review)
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                          stream=None).choices[0].message.content == choice.message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True,
                                                                              "include_obfuscation": False}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens_details.cached_tokens == len(prompt) - 1
    assert chunks[-1].usage.model_dump(exclude={"prompt_tokens_details"}) == response.usage.model_dump(
        exclude={"prompt_tokens_details"})  # the second request found the first's prompt in the cache


def test_continue_final_message_continues_the_assistants_text(client, server, tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My colour is"}]
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                           extra_body=extra)
    ids = apply_chat_template(tokenizer, messages, add_generation_prompt=False, continue_final_message=True)
    assert tokenizer.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\nMy colour is")
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == _reference_text(tokenizer, ids, 8)
    tokenized = httpx.post(f"{server[0]}/tokenize", json={"messages": messages, **extra}).json()
    assert tokenized["tokens"] == ids
    for body, message in (({"continue_final_message": True}, "add_generation_prompt: false"),
                          ({**extra, "messages": messages[:1]}, "last message from the assistant")):
        response = httpx.post(f"{server[0]}/v1/chat/completions",
                              json={"model": MODEL, "messages": messages, "max_tokens": 2, **body})
        assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_completions_with_text_and_token_prompts(client, tokenizer):
    text = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=12, temperature=0)
    ids = tokenizer.encode("def f(x):")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert text.choices[0].text == by_ids.choices[0].text == _reference_text(tokenizer, ids, 12)
    assert text.usage.prompt_tokens == len(ids)
    streamed = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert streamed[-1].choices[0].finish_reason == text.choices[0].finish_reason


def test_seeded_sampling_is_reproducible_over_http(client):
    def ask(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="x =", max_tokens=16, temperature=1.0, seed=seed
                                         ).choices[0].text

    assert ask(11) == ask(11) != ask(12)


def test_stop_strings_over_http(client):
    full = client.completions.create(model=MODEL, prompt="import os", max_tokens=30, temperature=0).choices[0].text
    stop = full[8:11]
    cut = client.completions.create(model=MODEL, prompt="import os", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_a_stop_string_is_kept_with_include_stop_str_in_output(client):
    """vLLM's include_stop_str_in_output: the text ends with the stop string met (it was a 400, an unknown field),
    whole or streamed, on each endpoint."""
    full = client.completions.create(model=MODEL, prompt="import os", max_tokens=30, temperature=0).choices[0].text
    stop = full[8:11]
    kept = {"include_stop_str_in_output": True}
    cut = client.completions.create(model=MODEL, prompt="import os", max_tokens=30, temperature=0, stop=[stop],
                                    extra_body=kept)
    assert cut.choices[0].text == full[:full.index(stop) + 3] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="import os", max_tokens=30, temperature=0, stop=[stop],
                                         extra_body=kept, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == cut.choices[0].text
    chat = dict(model=MODEL, messages=MESSAGES, max_tokens=30, temperature=0)
    said = client.chat.completions.create(**chat).choices[0].message.content
    stop = said[4:7]
    cut = client.chat.completions.create(**chat, stop=[stop], extra_body=kept).choices[0]
    assert cut.message.content == said[:said.index(stop) + 3] and cut.finish_reason == "stop"
    response = client.responses.create(model=MODEL, input=MESSAGES, max_output_tokens=30, temperature=0,
                                       extra_body={"stop": [stop], **kept})
    assert response.output_text == cut.message.content


def _greedy_logprobs(tokenizer, prompt: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """The reference model's greedy completion and its log-softmax at each completion position."""
    model = build_chat_model(tokenizer)
    with torch.inference_mode():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0]
        logits = model(ids.unsqueeze(0)).logits[0].double()
    return ids[len(prompt):].tolist(), torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]


def test_chat_logprobs_match_the_model_streamed_or_not(client, tokenizer):
    ask = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    response = client.chat.completions.create(**ask)
    content = response.choices[0].logprobs.content
    ids, reference = _greedy_logprobs(tokenizer, apply_chat_template(tokenizer, MESSAGES), 12)
    assert len(content) == response.usage.completion_tokens == len(ids)
    assert [e.token for e in content] == [tokenizer.decode([i]) for i in ids]
    # the entries' bytes rebuild the completion exactly, also where a token holds half a character
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == tokenizer.decode(ids)
    for row, entry in zip(reference, content):
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the top one
        assert entry.logprob == pytest.approx(float(row.max()), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)

    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_format_streamed_or_not(client, tokenizer):
    prompt = tokenizer.encode("def f(x):")
    ask = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
    lp = client.completions.create(**ask).choices[0].logprobs
    ids, reference = _greedy_logprobs(tokenizer, prompt, 10)
    assert lp.tokens == [tokenizer.decode([i]) for i in ids]
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    for row, token, logprob, top in zip(reference, lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob == pytest.approx(float(row.max()), abs=1e-4) and top[token] == logprob
        assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(len(top)).values.tolist(), abs=1e-4)
    streamed = list(client.completions.create(**ask, stream=True))
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == lp.text_offset

    sampled = client.completions.create(**{**ask, "temperature": 1.0, "seed": 3, "logprobs": 0}).choices[0].logprobs
    assert all(top == {token: logprob} for token, logprob, top in
               zip(sampled.tokens, sampled.token_logprobs, sampled.top_logprobs))  # the drawn token is listed


def test_echo_with_logprobs_scores_the_prompt_like_lm_eval_asks(client, tokenizer):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs=1, max_tokens=1."""
    context, continuation = tokenizer.encode("def add(a, b):"), tokenizer.encode(" return a + b")
    prompt = context + continuation
    ask = dict(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    choice = client.completions.create(**ask).choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(tokenizer.decode(prompt)) and len(lp.tokens) == len(prompt) + 1
    assert lp.tokens[:len(prompt)] == [tokenizer.decode([i]) for i in prompt]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    with torch.inference_mode():
        reference = torch.log_softmax(build_chat_model(tokenizer)(torch.tensor([prompt])).logits[0].double(), -1)
    expected = [float(reference[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    assert lp.token_logprobs[1:len(prompt)] == pytest.approx(expected, abs=1e-4)
    for i in range(1, len(prompt)):  # the prompt token is listed with the most likely one
        top = lp.top_logprobs[i]
        assert top[lp.tokens[i]] == lp.token_logprobs[i] and max(top.values()) == pytest.approx(
            float(reference[i - 1].max()), abs=1e-4)
    continuation_logprob = sum(lp.token_logprobs[len(context):len(prompt)])
    assert continuation_logprob == pytest.approx(sum(expected[len(context) - 1:]), abs=1e-3)

    streamed = list(client.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [v for c in streamed if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs] == pytest.approx(
        lp.token_logprobs)
    scored = client.completions.create(**{**ask, "max_tokens": 0})  # OpenAI's way to score a prompt
    assert scored.choices[0].text == tokenizer.decode(prompt) and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:len(prompt)], abs=1e-5)
    assert scored.choices[0].finish_reason == "length"
    streamed_score = list(client.completions.create(**{**ask, "max_tokens": 0}, stream=True))
    assert "".join(c.choices[0].text for c in streamed_score) == scored.choices[0].text
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)
    plain = client.completions.create(model=MODEL, prompt="x = 1", max_tokens=3, temperature=0, echo=True)
    assert plain.choices[0].text.startswith("x = 1") and plain.choices[0].logprobs is None


def test_logprobs_cover_every_token_when_a_stop_string_cuts_the_text(client):
    ask = dict(model=MODEL, prompt="import os", max_tokens=30, temperature=0, logprobs=0)
    full = client.completions.create(**ask).choices[0]
    stop = full.text[8:11]
    cut = client.completions.create(**ask, stop=[stop])
    tokens = cut.choices[0].logprobs.tokens
    assert "".join(tokens).startswith(cut.choices[0].text) and stop in "".join(tokens)  # the stop string's tokens too
    assert tokens == full.logprobs.tokens[:len(tokens)] and cut.usage.completion_tokens == len(tokens)
    streamed = list(client.completions.create(**ask, stop=[stop], stream=True))
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == tokens


def test_logit_bias_and_penalties_over_http(client, tokenizer):
    forced = tokenizer.encode(" list")[-1]
    biased = client.completions.create(model=MODEL, prompt="x =", max_tokens=3, temperature=0,
                                       logit_bias={str(forced): 100})
    assert biased.choices[0].text == tokenizer.decode([forced] * 3)
    ask = dict(model=MODEL, prompt="import os", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}, logprobs=0)
    plain = client.completions.create(**ask).choices[0].logprobs.tokens
    penalized = client.completions.create(**ask, presence_penalty=2, frequency_penalty=2).choices[0].logprobs.tokens
    assert len(set(penalized)) > len(set(plain))  # no token repeated while an unused one is close
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, logit_bias={"100000": 5})
    # a key past Python's int conversion limit (4,300 digits) was refused without naming the parameter
    with pytest.raises(openai.BadRequestError, match="logit_bias") as refused:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, logit_bias={"9" * 5000: 5})
    assert refused.value.param == "logit_bias" and len(refused.value.message) < 400


def test_vllm_sampling_extensions_over_http(client, tokenizer):
    prompt = tokenizer.encode("def f(x):")
    ask = dict(model=MODEL, prompt=prompt, max_tokens=8, logprobs=0)
    greedy = client.completions.create(**ask, temperature=0).choices[0].logprobs.tokens
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # sampling that can only pick the most likely token
        sampled = client.completions.create(**ask, temperature=1.0, seed=5, extra_body=extra)
        assert sampled.choices[0].logprobs.tokens == greedy, extra
    ids, _ = _greedy_logprobs(tokenizer, prompt, 8)
    cut = client.completions.create(**ask, temperature=0, extra_body={"stop_token_ids": [ids[2]]}).choices[0]
    assert cut.finish_reason == "stop" and cut.logprobs.tokens == greedy[:ids.index(ids[2]) + 1]
    penalized = client.completions.create(**ask, temperature=0, extra_body={"repetition_penalty": 5.0, "min_tokens": 8})
    assert len(penalized.choices[0].logprobs.tokens) == 8
    for extra, param in [({"top_k": -2}, "top_k"), ({"min_tokens": 9}, "min_tokens"), ({"min_p": 2}, "min_p"),
                         ({"repetition_penalty": 0}, "repetition_penalty"), ({"stop_token_ids": [-1]}, "stop_token_ids")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(**ask, extra_body=extra)
        assert info.value.body["param"].startswith(param), extra


def _concurrent_streams(url: str, conversations: list, max_tokens: int) -> list[tuple[str, object]]:
    """Stream a greedy chat completion of each conversation at once; (text, usage) of each."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(messages):
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage

    async def main():
        try:
            return await asyncio.gather(*(one(m) for m in conversations))
        finally:
            await client.close()

    return asyncio.run(main())


def test_sixteen_concurrent_streams_complete_with_correct_usage(server, tokenizer):
    url, engine = server
    conversations = [[{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}] for i in range(16)]
    results = _concurrent_streams(url, conversations, 24)
    for messages, (text, usage) in zip(conversations, results):
        prompt = apply_chat_template(tokenizer, messages)
        assert usage.prompt_tokens == len(prompt) and 1 <= usage.completion_tokens <= 24
        assert text == _reference_text(tokenizer, prompt, 24)


def test_streams_beyond_what_the_kv_cache_holds_are_preempted_and_still_complete(tokenizer):
    """An app whose KV cache holds one max_model_len sequence (16 blocks) and 8 concurrent streams of up to 6 blocks
    sharing a system prompt: running streams are preempted and resumed (sharing the prompt's blocks with those still
    running); each answer still equals the single-process model's greedy text, usage is whole, and /metrics counts
    the preemptions."""
    from service.attention import KVCache

    config = build_chat_model(tokenizer).config
    per_token = KVCache.bytes_per_token(config.num_hidden_layers, dtype=torch.float32, **KVCache.for_model(config))
    engine = _start_engine(tokenizer, max_num_seqs=8, kv_cache_bytes=MAX_MODEL_LEN * per_token)
    system = {"role": "system", "content": "You are a patient teacher of arithmetic."}
    conversations = [[system, {"role": "user", "content": f"Tell me about the number {i}."}] for i in range(8)]
    with served(engine) as url:
        results = _concurrent_streams(url, conversations, 56)
        metrics = httpx.get(f"{url}/metrics").text
    preempted = float(re.search(r"^vibe_num_preemptions_total (\S+)$", metrics, re.M).group(1))
    assert preempted > 0 and engine.num_preemptions == preempted
    for messages, (text, usage) in zip(conversations, results):
        prompt = apply_chat_template(tokenizer, messages)
        assert usage.prompt_tokens == len(prompt) and 1 <= usage.completion_tokens <= 56
        assert text == _reference_text(tokenizer, prompt, 56)


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "messages": MESSAGES}, 404, "model"),
    ({"model": MODEL, "messages": MESSAGES, "max_tokens": -5}, 400, "max_tokens"),
    ({"model": MODEL, "messages": MESSAGES, "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": "hello"}, 400, "messages"),
    ({"model": MODEL, "messages": MESSAGES, "n": 17}, 400, "n"),
    ({"model": MODEL, "messages": MESSAGES, "frequency_penalty": 3.0}, 400, "frequency_penalty"),
    ({"model": MODEL, "messages": MESSAGES, "bogus": True}, 400, "bogus"),
    ({"messages": MESSAGES}, 400, "model"),
])
def test_bad_chat_requests_get_openai_errors_and_the_server_stays_healthy(server, body, status, param):
    response = httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=30)
    error = response.json()["error"]
    assert response.status_code == status and error["param"] == param and error["message"]
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}


@pytest.mark.parametrize("content, status", [(b"{not json", 400), (b"x" * (65 * 1024), 413), (b"[1, 2]", 400)])
def test_malformed_and_oversized_bodies(server, content, status):
    """Each answered with the error JSON and counted as rejected (the 413 of a declared size too, which the body
    size limit answers before any handler: it was not counted)."""
    rejected = 'vibe_requests_total{status="rejected"}'
    before = _counter(httpx.get(f"{server[0]}/metrics").text, rejected)
    response = httpx.post(f"{server[0]}/v1/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert _counter(httpx.get(f"{server[0]}/metrics").text, rejected) == before + 1


def test_a_body_not_sent_as_json_and_a_nan_say_what_is_wrong(server):
    """A chat body sent as text/plain was refused with pydantic's "Input should be a valid dictionary or object to
    extract fields from", and `"temperature": NaN` (Python's JSON reads it) as out of range (a README walkthrough)."""
    body = json.dumps({"model": MODEL, "messages": MESSAGES})
    response = httpx.post(f"{server[0]}/v1/chat/completions", content=body, headers={"content-type": "text/plain"},
                          timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == ("the request body must be a JSON object, sent with Content-Type: "
                                                   "application/json")
    response = httpx.post(f"{server[0]}/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"},
                          timeout=30)
    assert "must be a JSON object" in response.json()["error"]["message"]
    for value in ("NaN", "Infinity"):
        response = httpx.post(f"{server[0]}/v1/chat/completions", timeout=30, headers={"content-type": "application/json"},
                              content=body[:-1] + f', "temperature": {value}}}')
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "temperature" and "finite number" in error["message"]


def test_unknown_routes_and_methods_use_the_error_json(server):
    assert httpx.get(f"{server[0]}/v1/nothing").json()["error"]["type"] == "not_found_error"
    response = httpx.get(f"{server[0]}/v1/chat/completions")
    assert response.status_code == 405 and "error" in response.json()


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, presence_penalty=-2.5)


@pytest.mark.parametrize("n", [1, 3])
def test_client_disconnect_mid_stream_aborts_the_sequence(tokenizer, n):
    core = Engine(build_chat_model(tokenizer), EngineConfig(max_model_len=MAX_MODEL_LEN), tokenizer=tokenizer,
                  hooks=_SlowSteps())
    aborted, abort = [], core.abort
    core.abort = lambda request_id: aborted.append(request_id) or abort(request_id)
    engine = AsyncEngine(core)
    engine.start()
    body = {"model": MODEL, "prompt": "a", "max_tokens": 250, "temperature": 0, "stream": True, "n": n}
    try:
        with _serve(create_app(engine, served_model_name=MODEL)) as url:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
                assert next(response.iter_lines()).startswith("data: ")
            deadline = time.monotonic() + 20
            while len(aborted) < n and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(aborted) == n and all(a.startswith("cmpl-") for a in aborted)  # every choice
            assert engine.run_at_step_boundary(lambda: core.num_running).result(10) == 0
            assert 'vibe_requests_total{status="abort"} 1.0' in httpx.get(f"{url}/metrics").text
    finally:
        engine.shutdown()


def test_a_request_cut_at_request_timeout_s_counts_as_a_timeout_not_an_engine_error(tokenizer):
    """A request cut at the engine's request_timeout_s (a client that stopped reading, an overload) was counted as
    status="error", the series the critical engine-errors alert is built on (a walkthrough: 45 timeouts, 45
    "errors")."""
    engine = AsyncEngine(Engine(build_chat_model(tokenizer), EngineConfig(max_model_len=MAX_MODEL_LEN,
                                                                          request_timeout_s=0.3),
                                tokenizer=tokenizer, hooks=_SlowSteps()))
    engine.start()
    body = {"model": MODEL, "prompt": "a", "max_tokens": 250, "temperature": 0}
    try:
        with _serve(create_app(engine, served_model_name=MODEL)) as url:
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            assert response.status_code == 504 and response.json()["error"]["code"] == "request_timeout"
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as stream:
                assert any('"request_timeout"' in line for line in stream.iter_lines())
            metrics = httpx.get(f"{url}/metrics").text
            assert 'vibe_requests_total{status="timeout"} 2.0' in metrics
            assert 'vibe_requests_total{status="error"} 0.0' in metrics
    finally:
        engine.shutdown()


@pytest.mark.parametrize("stream", [False, True])
def test_a_handler_serve_cancels_counts_its_request_as_aborted(tokenizer, stream):
    """Serve cancels the handler of a request whose client left; the CancelledError passed every handler that counts
    a request, and a non-streamed one was counted as nothing (29 of 400 in a disconnect storm; a review)."""
    import contextlib

    engine = AsyncEngine(Engine(build_chat_model(tokenizer), EngineConfig(max_model_len=MAX_MODEL_LEN),
                                tokenizer=tokenizer, hooks=_SlowSteps()))
    engine.start()
    app = create_app(engine, served_model_name=MODEL)
    body = {"model": MODEL, "prompt": "a", "max_tokens": 250, "temperature": 0, "stream": stream}

    async def cancel_one() -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            request = asyncio.create_task(client.post("/v1/completions", json=body))
            await asyncio.sleep(1.0)
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request
            return (await client.get("/metrics")).text

    try:
        metrics = asyncio.run(cancel_one())
        assert 'vibe_requests_total{status="abort"} 1.0' in metrics
    finally:
        engine.shutdown()


def test_a_body_that_does_not_arrive_in_time_is_a_408_and_a_long_stream_is_not_cut(tokenizer):
    """Serve hands a request to the replica on its headers and the replica reads the body from the proxy: some 325
    connections that sent headers and no body held every request slot, /health's too, for as long as they stayed
    open (a review). A body not received within body_timeout_s of the headers is a 408; a response streamed for
    longer than that after its whole body is not cut."""
    import socket
    from urllib.parse import urlparse

    engine = AsyncEngine(Engine(build_chat_model(tokenizer), EngineConfig(max_model_len=MAX_MODEL_LEN),
                                tokenizer=tokenizer, hooks=_SlowSteps()))
    engine.start()
    try:
        with _serve(create_app(engine, served_model_name=MODEL, body_timeout_s=0.5)) as url:
            address = urlparse(url)
            with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"model\": ")
                started = time.monotonic()
                answer = sock.recv(65536).decode()
            assert answer.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in answer, answer
            assert time.monotonic() - started < 5
            body = {"model": MODEL, "prompt": "a", "max_tokens": 60, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            started = time.monotonic()
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
                lines = [line for line in response.iter_lines() if line.startswith("data: ")]
            assert time.monotonic() - started > 1.0 and lines[-1] == "data: [DONE]"
            assert '"finish_reason":"length"' in "".join(lines).replace(" ", "")
    finally:
        engine.shutdown()


def test_serves_cancellation_of_a_gone_clients_request_reads_as_its_disconnect():
    """Ray Serve's receive raises TaskCancelledError once its proxy cancelled a request whose client left: raised
    through the app it was logged as an internal error with its traceback (a walkthrough: 43 in one log)."""
    from ray.exceptions import TaskCancelledError

    async def cancelled():
        raise TaskCancelledError()

    async def broken():
        raise RuntimeError("a real failure")

    limit = BodySizeLimit(None, max_bytes=10)
    assert asyncio.run(limit._limited(cancelled)()) == {"type": "http.disconnect"}
    with pytest.raises(RuntimeError, match="a real failure"):
        asyncio.run(limit._limited(broken)())


def test_n_choices_are_the_seeded_single_requests_with_one_usage(client):
    ask = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=7)
    response = client.chat.completions.create(**ask, n=3)
    singles = [client.chat.completions.create(**{**ask, "seed": 7 + i}).choices[0] for i in range(3)]
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.message.content for c in response.choices] == [c.message.content for c in singles]
    assert [c.finish_reason for c in response.choices] == [c.finish_reason for c in singles]
    assert len({c.message.content for c in response.choices}) > 1  # three draws, not one
    one = client.chat.completions.create(**ask)
    assert response.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert response.usage.completion_tokens == sum(
        client.chat.completions.create(**{**ask, "seed": 7 + i}).usage.completion_tokens for i in range(3))

    chunks = list(client.chat.completions.create(**ask, n=3, stream=True, stream_options={"include_usage": True}))
    for i, choice in enumerate(response.choices):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
    assert all(len(c.choices) <= 1 for c in chunks)
    usage = chunks[-1].usage
    assert usage.model_dump(exclude={"prompt_tokens_details"}) == response.usage.model_dump(
        exclude={"prompt_tokens_details"})
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # once, not once per choice


def test_batched_prompts_are_indexed_prompt_times_n_plus_choice(client, tokenizer):
    prompts = ["def f(x):", "import os"]
    ask = dict(model=MODEL, max_tokens=6, temperature=1.0, seed=3)
    batch = client.completions.create(**ask, prompt=prompts, n=2)
    singles = [client.completions.create(**{**ask, "seed": 3 + i}, prompt=p) for p in prompts for i in range(2)]
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles]
    assert batch.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)  # each prompt once
    assert batch.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    streamed = list(client.completions.create(**ask, prompt=prompts, n=2, stream=True))
    for choice in batch.choices:
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == choice.index) == choice.text
    echoed = client.completions.create(**ask, prompt=[tokenizer.encode(p) for p in prompts], echo=True, logprobs=0)
    for prompt, choice in zip(prompts, echoed.choices):
        assert choice.text.startswith(prompt) and choice.logprobs.token_logprobs[0] is None
        assert len(choice.logprobs.tokens) == len(tokenizer.encode(prompt)) + 6


def test_n_completions_with_logprobs_keep_each_choices_offsets(client):
    ask = dict(model=MODEL, prompt="def f(x):", max_tokens=6, temperature=0.9, seed=1, logprobs=1, n=2)
    choices = client.completions.create(**ask).choices
    for choice in choices:
        assert choice.logprobs.text_offset[0] == 0 and len(choice.logprobs.tokens) == 6
    streamed = list(client.completions.create(**ask, stream=True))
    for choice in choices:
        mine = [c.choices[0] for c in streamed if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [t for c in mine if c.logprobs for t in c.logprobs.tokens] == choice.logprobs.tokens
        assert [o for c in mine if c.logprobs for o in c.logprobs.text_offset] == choice.logprobs.text_offset


def test_metrics_after_traffic(server, client):
    client.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
    assert httpx.post(f"{server[0]}/v1/completions", json={"model": MODEL, "prompt": "x", "n": 0}).status_code == 400
    text = httpx.get(f"{server[0]}/metrics").text
    for name in ("vibe_time_to_first_token_seconds_count", "vibe_time_per_output_token_seconds_count",
                 "vibe_e2e_request_latency_seconds_count", "vibe_num_requests_waiting", "vibe_num_requests_running",
                 "vibe_kv_cache_usage_perc", "vibe_num_preemptions_total",
                 "vibe_generation_tokens_total", 'vibe_requests_total{status="length"}',
                 'vibe_requests_total{status="rejected"}', "vibe_engine_step_seconds_count"):
        assert name in text, name


def test_a_conversations_next_turn_is_served_from_the_prefix_cache(server, client, tokenizer):
    messages = [{"role": "system", "content": "You answer in one line."}, {"role": "user", "content": "Name a fruit."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    before = _counter(httpx.get(f"{server[0]}/metrics").text, "vibe_prefix_cache_hit_tokens_total")
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And a vegetable?"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    prompt = apply_chat_template(tokenizer, messages)
    assert second.choices[0].message.content == _reference_text(tokenizer, prompt, 12)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens  # the first turn's prompt at least
    assert _counter(httpx.get(f"{server[0]}/metrics").text, "vibe_prefix_cache_hit_tokens_total") == before + cached


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_response_format_and_structured_outputs_constrain_the_completion(client):
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=80, temperature=1.0, seed=3,
                                              response_format=schema_format, n=3)
    for choice in response.choices:
        person = json.loads(choice.message.content)
        assert set(person) == {"name", "age"} and isinstance(person["age"], int) and len(person["name"]) <= 12
        assert choice.finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=80, temperature=1.0,
                                                 seed=3, response_format=schema_format, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == response.choices[0].message.content
    anything = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0,
                                              response_format={"type": "json_object"}).choices[0]
    assert anything.message.content.startswith("{")  # a random model may write one endless string value
    assert anything.finish_reason == "length" or isinstance(json.loads(anything.message.content), dict)
    regex = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, temperature=1.0, seed=1,
                                      extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", regex.choices[0].text) and regex.choices[0].finish_reason == "stop"
    choice = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=1.0,
                                            extra_body={"structured_outputs": {"choice": ["list", "tuple"]}})
    assert choice.choices[0].message.content in ("list", "tuple")


@pytest.mark.parametrize("extra, param, match", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     None, "invalid structured output"),
    ({"structured_outputs": {"regex": "[unclosed"}}, None, "invalid structured output"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "structured_outputs"),
    ({"structured_outputs": {"regex": "a+"}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
    ({"structured_outputs": {"choice": ["a"]}, "min_tokens": 1}, "min_tokens", "min_tokens"),
])
def test_bad_structured_outputs_are_400s_naming_the_problem(server, extra, param, match):
    response = httpx.post(f"{server[0]}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **extra})
    error = response.json()["error"]
    assert response.status_code == 400 and error["type"] == "invalid_request_error" and match in error["message"]
    assert param is None or error["param"] == param


def _counter(text: str, name: str) -> float:
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_queue_full_is_a_429_with_retry_after_and_extra_routes_share_the_error_json(tokenizer):
    engine = _start_engine(tokenizer, max_num_seqs=1, max_num_batched_tokens=64, max_queue=1)
    router = APIRouter()

    @router.get("/admin/secret")
    async def secret():
        raise APIError(401, "missing bearer token", type="authentication_error")

    body = {"model": MODEL, "prompt": "a", "max_tokens": 8, "temperature": 0}
    responses = []
    try:
        with _serve(create_app(engine, served_model_name=MODEL, extra_router=router)) as url:
            assert httpx.get(f"{url}/admin/secret").status_code == 401
            # Hold the engine thread so both admissions run in one batch of commands: the first fills the
            # queue (max_queue=1), the second finds it full.
            release = threading.Event()
            engine.run_at_step_boundary(release.wait)
            senders = [threading.Thread(target=lambda: responses.append(
                httpx.post(f"{url}/v1/completions", json=body, timeout=60))) for _ in range(2)]
            for sender in senders:
                sender.start()
            while len(engine._commands) < 2:
                time.sleep(0.02)
            release.set()
            for sender in senders:
                sender.join(60)
    finally:
        engine.shutdown()
    assert sorted(r.status_code for r in responses) == [200, 429]
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["Retry-After"] == "1" and rejected.json()["error"]["code"] == "rate_limit_exceeded"


class _SlowSteps:
    """Step hooks that make each forward take at least 20 ms."""

    def begin_step(self) -> None:
        time.sleep(0.02)

    def end_step(self, completed: bool = True) -> None:
        pass


def test_a_choice_refused_at_admission_fails_the_request_at_once_and_frees_the_others(tokenizer):
    """A request of two choices whose second finds the queue full gets its 429 at once, while a long request
    holds the one running place (not when its first choice has a token, after that one), and its first choice
    is aborted; a request of more choices than the queue holds is a 400 (it could never be admitted)."""
    engine = AsyncEngine(Engine(build_chat_model(tokenizer), EngineConfig(
        max_model_len=MAX_MODEL_LEN, max_num_seqs=1, max_num_batched_tokens=64, max_queue=2), tokenizer=tokenizer,
        hooks=_SlowSteps()))
    engine.start()
    core = engine._engine
    aborted, abort = [], core.abort
    core.abort = lambda request_id: aborted.append(request_id) or abort(request_id)
    long = {"model": MODEL, "prompt": "a", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    body = {"model": MODEL, "prompt": "b", "max_tokens": 8, "temperature": 0, "n": 2}
    try:
        with _serve(create_app(engine, served_model_name=MODEL)) as url:
            responses, others = [], []
            busy = [threading.Thread(target=lambda: others.append(
                httpx.post(f"{url}/v1/completions", json=long, timeout=60))) for _ in range(2)]
            for thread in busy:  # one running (4 s), one waiting
                thread.start()
            while engine.run_at_step_boundary(lambda: (core.num_running, core.num_waiting)).result(10) != (1, 1):
                time.sleep(0.02)
            sender = threading.Thread(target=lambda: responses.append(
                httpx.post(f"{url}/v1/completions", json=body, timeout=60)))
            sender.start()
            sender.join(60)
            assert responses[0].status_code == 429  # the second choice found the queue (2) full
            # at once: the long requests still run and wait, and the admitted choice is gone
            assert engine.run_at_step_boundary(lambda: (core.num_running, core.num_waiting)).result(10) == (1, 1)
            assert "0" in [a.rsplit("-", 1)[1] for a in aborted]
            many = httpx.post(f"{url}/v1/completions", json={**body, "n": 3}, timeout=60)
            assert many.status_code == 400 and many.json()["error"]["param"] == "n"
            assert "at most 2" in many.json()["error"]["message"]
            for thread in busy:
                thread.join(60)
            assert [r.status_code for r in others] == [200, 200]
            ok = httpx.post(f"{url}/v1/completions", json={**body, "n": 1}, timeout=60)
            assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
    finally:
        engine.shutdown()


def test_prompts_are_tokenized_off_the_event_loop():
    """Tokenizing and chat templates (~1 s for a 1 MiB prompt) run on the app's tokenizing thread, not on the
    event loop every stream of the replica shares: completions, chat, responses; /tokenize and /detokenize on a
    thread of their own (`test_app_prompt_limits`)."""
    tokenizer = build_tokenizer()
    threads: set[str] = set()
    for name in ("encode", "apply_chat_template", "decode"):
        method = getattr(tokenizer, name)

        def recorded(*args, _method=method, **kwargs):
            threads.add(threading.current_thread().name)
            return _method(*args, **kwargs)

        setattr(tokenizer, name, recorded)
    engine = _start_engine(tokenizer)
    with served(engine) as url:
        for path, body, thread in (
                ("/v1/completions", {"model": MODEL, "prompt": "def f", "max_tokens": 1}, "tokenize_0"),
                ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}, "tokenize_0"),
                ("/v1/responses", {"model": MODEL, "input": "hello", "max_output_tokens": 16}, "tokenize_0"),
                ("/tokenize", {"prompt": "def f"}, "tokenize-api_0"), ("/tokenize", {"messages": MESSAGES}, "tokenize-api_0"),
                ("/detokenize", {"tokens": [5, 6]}, "tokenize-api_0")):
            threads.clear()  # (the app's start-up encodes its tags; the engine's stream decodes on its own thread)
            response = httpx.post(f"{url}{path}", json=body, timeout=60)
            assert response.status_code == 200, (path, response.text)
            assert thread in threads and not threads - {thread, "vibe-engine"}, (path, threads)  # (not the loop's)



def test_grammars_are_built_off_the_event_loop(server, monkeypatch):
    """A request's grammar text (a structured output, a response format, a forced tool call) is built on a worker
    thread, not on the event loop every stream shares, nor on the tokenizing thread: a GBNF grammar of 100,000
    alternatives takes a second of Python to convert, and one of 100,000 newlines took 48 s (a review)."""
    from service import openai_api

    threads: list[tuple[str, bool]] = []  # (name, whether an event loop runs on it)
    build = openai_api._grammar

    def recorded(request):
        try:
            on_loop = asyncio.get_running_loop() is not None
        except RuntimeError:
            on_loop = False
        threads.append((threading.current_thread().name, on_loop))
        return build(request)

    monkeypatch.setattr(openai_api, "_grammar", recorded)
    url = server[0]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    for path, body in (
            ("/v1/completions", {"prompt": "a", "structured_outputs": {"regex": "[ab]{2}"}}),
            ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {
                "type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}),
            ("/v1/chat/completions", {"messages": MESSAGES, "tools": [tool], "tool_choice": "required"}),
            ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "n",
                                                                  "schema": schema}}}),
            ("/v1/chat/completions", {"messages": MESSAGES, "structured_outputs": {"grammar": "\n" * 1000 + "x"}})):
        threads.clear()
        response = httpx.post(f"{url}{path}", json={"model": MODEL, "max_tokens" if "input" not in body else
                                                    "max_output_tokens": 16, **body}, timeout=60)
        # (the tool's prompt is longer than this server's context: a 400 after its grammar was built, as the GBNF's)
        assert response.status_code == (200 if "text" in body or "response_format" in body or "prompt" in body
                                        else 400), (path, response.text)
        assert threads and not any(on_loop or name.startswith("tokenize") for name, on_loop in threads), (path, threads)

def test_health_reports_degradation_without_leaving_rotation(tokenizer):
    problems: list[str] = []
    engine = _start_engine(tokenizer)
    try:
        app = create_app(engine, served_model_name=MODEL, health_checks=[lambda: problems[0] if problems else None])
        with _serve(app) as url:
            assert httpx.get(f"{url}/health").json() == {"status": "ok"}
            problems.append("coordinator unreachable for 42 s")
            response = httpx.get(f"{url}/health")
            assert response.status_code == 200
            assert response.json() == {"status": "degraded", "problems": ["coordinator unreachable for 42 s"]}
            # an engine whose steps all fail beyond retry (a GPU's sticky error) is out of rotation: 503
            engine._unretried_failures, engine._last_failure = 3, "RuntimeError: CUDA error: an illegal memory access"
            response = httpx.get(f"{url}/health")
            assert response.status_code == 503 and "illegal memory access" in response.json()["error"]["message"]
    finally:
        engine.shutdown()


def test_tokenize_and_detokenize_round_trip_the_prompts_the_endpoints_see(server, tokenizer, client):
    url = server[0]
    text = "def f(x): return x  # héllo"
    got = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert got["tokens"] == tokenizer.encode(text) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == MAX_MODEL_LEN and got["token_strs"] == tokenizer.convert_ids_to_tokens(got["tokens"])
    chat = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == apply_chat_template(tokenizer, MESSAGES) and chat.get("token_strs") is None
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0)
    assert reply.usage.prompt_tokens == chat["count"]  # the count the chat endpoint bills
    bare = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert chat["tokens"][:bare["count"]] == bare["tokens"] and bare["count"] < chat["count"]
    back = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": got["tokens"]}).json()
    assert back == {"prompt": text}
    for path, body, param in [("/tokenize", {"prompt": "a", "messages": MESSAGES}, None),
                              ("/tokenize", {}, None), ("/detokenize", {"tokens": [10**6]}, "tokens"),
                              ("/detokenize", {"tokens": [-1]}, "tokens.0"), ("/detokenize", {"tokens": ["1"]}, "tokens.0"),
                              ("/detokenize", {"tokens": [True]}, "tokens.0"), ("/tokenize", {"prompt": "a", "x": 1}, "x")]:
        response = httpx.post(f"{url}{path}", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (path, body)
    assert httpx.post(f"{url}/tokenize", json={"model": "other", "prompt": "a"}).status_code == 404


def test_requests_sharing_a_system_prompt_report_the_linear_attention_state_snapshots_they_resume_from(tokenizer):
    """Qwen3-Next (gated DeltaNet) over HTTP: two chats with the same system prompt and different questions; the
    second resumes from the snapshot of the linear-attention states at the last multiple of
    ``prefix_state_interval`` (16) within the shared tokens, and `usage.prompt_tokens_details.cached_tokens` and
    `vibe_prefix_cache_hit_tokens_total` count those tokens; its answer is `generate`'s."""
    model = build_chat_model(tokenizer, architecture="qwen3_next")
    engine = AsyncEngine(Engine(build_chat_model(tokenizer, architecture="qwen3_next"),
                                EngineConfig(max_model_len=MAX_MODEL_LEN, prefix_state_interval=16), tokenizer=tokenizer))
    engine.start()
    system = {"role": "system", "content": "You are a terse assistant for a shipping company. Answer in one line, "
                                           "name the port, and never invent a schedule or a price."}
    chats = [[system, {"role": "user", "content": question}] for question in ("Where is Rotterdam?", "Why fog?")]
    prompts = [apply_chat_template(tokenizer, messages) for messages in chats]
    shared = next(i for i, (a, b) in enumerate(zip(*prompts)) if a != b)
    assert shared >= 32
    with served(engine) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        api.chat.completions.create(model=MODEL, messages=chats[0], max_tokens=4, temperature=0)
        before = _counter(httpx.get(f"{url}/metrics").text, "vibe_prefix_cache_hit_tokens_total")
        second = api.chat.completions.create(model=MODEL, messages=chats[1], max_tokens=8, temperature=0)
        assert second.usage.prompt_tokens_details.cached_tokens == shared // 16 * 16
        assert _counter(httpx.get(f"{url}/metrics").text, "vibe_prefix_cache_hit_tokens_total") == before + shared // 16 * 16
    out = model.generate(torch.tensor([prompts[1]]), max_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert second.choices[0].message.content == tokenizer.decode(out[0, len(prompts[1]):], skip_special_tokens=True)


def test_a_whole_response_is_built_off_the_event_loop(server, client, monkeypatch):
    """A non-streamed response is built and encoded on a worker thread: with log-probabilities of long prompts and
    many choices it is tens of MB of JSON, a second or more of work that froze every stream and /health (isolation
    audit: 1-2 s with echo, logprobs 20 and 4 prompts x n=16)."""
    from service import app as app_module

    on_loop = []
    original = app_module._CompletionFormat.response

    def response(self, results):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop runs on this thread
            on_loop.append(False)
        return original(self, results)

    monkeypatch.setattr(app_module._CompletionFormat, "response", response)
    reply = client.completions.create(model=MODEL, prompt="hello", max_tokens=2, temperature=0, echo=True, logprobs=2)
    assert reply.choices[0].logprobs.tokens and on_loop == [False]


def test_a_schema_the_grammar_cannot_compile_is_a_400_naming_where_it_came_from(server):
    """The grammar compiles when the request is admitted: its error named no parameter (and, for a tool, spoke of a
    structured output the client never sent; responses audit)."""
    bogus = {"type": "object", "properties": {"a": {"type": "bogus"}}}
    chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    cases = [("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema",
                                                                   "json_schema": {"name": "x", "schema": bogus}}},
              "response_format"),
             ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "structured_outputs": {"json": bogus}},
              "structured_outputs"),
             ("/v1/responses", {"model": MODEL, "input": "x", "max_output_tokens": 2,
                                "text": {"format": {"type": "json_schema", "name": "x", "schema": bogus}}}, "text.format")]
    for path, body, param in cases:
        response = httpx.post(f"{server[0]}{path}", json=body, timeout=60)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param, (path, error)
        assert error["message"].startswith("invalid structured output") and "bogus" in error["message"]
    # a forced call's grammar is its tools' (this model's context is too short for a tool prompt over HTTP)
    from service.openai_api import ChatCompletionRequest

    tools = [{"type": "function", "function": {"name": "f", "parameters": bogus}}]
    answer = {"response_format": {"type": "json_object"}}
    for choice, extra, param in (("required", {}, "tools"), ("auto", answer, "response_format")):
        request = ChatCompletionRequest.model_validate({**chat, "tools": tools, "tool_choice": choice, **extra})
        assert request.use_tool_format("hermes").grammar_source[1] == param


def test_a_grammar_the_parser_gives_up_on_mid_completion_is_a_400_saying_so(tokenizer):
    """A grammar past llguidance's parser limits fails its request mid-completion (it used to end as "stop" with
    output breaking the grammar); the client is told why (a 400 naming the structured output, streamed as the
    error event), not a bare 500 "the model failed"."""
    alternatives = " | ".join(f'"item{i}"' for i in range(12_000))
    with served(_start_engine(tokenizer, max_num_seqs=4), max_body_bytes=1 << 20) as url:
        body = {"model": MODEL, "prompt": "Pick one:", "max_tokens": 8, "temperature": 0,
                "structured_outputs": {"grammar": f"start: {alternatives}"}}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == "structured_output_failed", error
        assert "grammar failed" in error["message"] and "item11999" not in error["message"]
        assert error["param"] == "structured_outputs"  # (was null: the grammar's parameter is known)
        streamed = httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=120).text
        assert '"param":"structured_outputs"' in streamed.replace(" ", "") and "structured_output_failed" in streamed
        assert httpx.post(f"{url}/v1/completions", json={**body, "structured_outputs": {"choice": ["a", "b"]}},
                          timeout=60).status_code == 200


def test_json_nested_too_deep_inside_a_string_is_a_400_naming_the_field_on_every_endpoint(server):
    """A call's arguments sent back (chat, /tokenize, the Responses API's function_call item) and a structured
    output's schema given as text are parsed: 20,000 levels made json.loads raise RecursionError and 600 (which
    parse) overflowed the chat template, 500s logged with their tracebacks, where the same JSON sent as an object
    is a 400 (MAX_JSON_DEPTH)."""
    from service.openai_api import MAX_JSON_DEPTH

    deep, parsed = "[" * 20_000 + "]" * 20_000, '{"a": ' + "[" * 600 + "]" * 600 + "}"

    def called(arguments: str) -> list[dict]:
        return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]

    arguments = "messages.1.tool_calls.0.function.arguments"
    for text in (deep, parsed):
        for path, body, param in [
            ("/v1/chat/completions", {"model": MODEL, "max_tokens": 1, "messages": called(text)}, arguments),
            ("/tokenize", {"messages": called(text)}, arguments),
            ("/v1/chat/completions", {"model": MODEL, "max_tokens": 1, "messages": MESSAGES,
                                      "structured_outputs": {"json": text}}, "structured_outputs.json"),
            ("/v1/responses", {"model": MODEL, "max_output_tokens": 1, "input": [
                {"role": "user", "content": "hi"}, {"type": "function_call", "call_id": "c1", "name": "f",
                                                    "arguments": text},
                {"type": "function_call_output", "call_id": "c1", "output": "ok"}]}, "input.1.function_call.arguments"),
        ]:
            response = httpx.post(f"{server[0]}{path}", json=body, timeout=60)
            error = response.json()["error"]
            assert response.status_code == 400 and error["param"] == param, (path, len(text), error)
            assert error["type"] == "invalid_request_error"
            assert f"nested deeper than {MAX_JSON_DEPTH} levels" in error["message"]
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_non_finite_number_in_a_tool_schema_is_a_400_before_anything_is_generated(server, stream):
    """``1e400`` (read as infinity) in a tool's schema passed validation: a non-streamed response then failed only
    once the completion was generated (its echoed tools could not be written as JSON: a 500), and a stream echoed
    ``Infinity``, which is not JSON."""
    tools = ('[{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": '
             '"number", "maximum": 1e400}}}}]')
    raw = (f'{{"model": "{MODEL}", "input": "hi", "max_output_tokens": 3, "stream": {json.dumps(stream)}, '
           f'"tools": {tools}}}')
    response = httpx.post(f"{server[0]}/v1/responses", content=raw, headers={"content-type": "application/json"},
                          timeout=60)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "tools.0.parameters", error
    assert "properties.a.maximum: inf is not a finite number" in error["message"]


def test_a_stream_that_fails_with_any_exception_ends_with_an_error_event(server, monkeypatch, caplog):
    """Only an EngineError ended a stream with the error's event (and ``data: [DONE]``): any other exception mid-stream
    (a tool parser's RecursionError, say) cut it with neither, which clients read as a truncated response. Now it is
    logged and sent as a 500's error JSON, then ``[DONE]`` (the Responses API's: error and response.failed)."""
    from service import app as app_module

    def chunks(self, index, out):
        raise RuntimeError("a bug mid-stream")

    for fmt in (app_module._CompletionFormat, app_module._ChatFormat, app_module._ResponsesFormat):
        monkeypatch.setattr(fmt, "chunks", chunks)
    internal = {"message": "internal server error", "type": "server_error", "param": None, "code": None}
    for path, body in (("/v1/completions", {"prompt": "hello", "max_tokens": 4}),
                       ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4})):
        with httpx.stream("POST", f"{server[0]}{path}", json={"model": MODEL, "stream": True, **body},
                          timeout=60) as response:
            events = [line for line in response.iter_lines() if line]
        assert response.status_code == 200 and events[-1] == "data: [DONE]", (path, events)
        assert json.loads(events[-2].removeprefix("data: ")) == {"error": internal}, (path, events)
    with httpx.stream("POST", f"{server[0]}/v1/responses", timeout=60,
                      json={"model": MODEL, "input": "hello", "max_output_tokens": 4, "stream": True}) as response:
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data: ")]
    assert [event["type"] for event in events[-2:]] == ["error", "response.failed"], events
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "internal server error"}
    assert caplog.text.count("a stream failed") == 3 and "a bug mid-stream" in caplog.text
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}
