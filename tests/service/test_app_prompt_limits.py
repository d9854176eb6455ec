"""What one request's prompt costs the others of a replica: a prompt too long for the context is refused from a
part of it (tokenising runs on one thread per replica), and echoed prompt log-probabilities are built once per
prompt, not once per choice."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from service.text import apply_chat_template
from tests.service.test_app import MODEL, _start_engine, served
from tests.service.test_text import build_tokenizer

MAX_MODEL_LEN = 256
LONG = "Z" * 40  # an added token: the vocabulary's longest entry, 40 characters that are one token
HUGE = "hello world, the prompt goes on. " * 20_000  # 660,000 characters: far past the context


class Recorded:
    """The lengths of the texts the tokenizer was asked to encode, and whether it tokenised a chat template."""

    def __init__(self, tokenizer) -> None:
        self.lengths: list[int] = []
        self.templates_tokenised = 0
        encode, template = tokenizer.encode, tokenizer.apply_chat_template

        def recording_encode(text, *args, **kwargs):
            self.lengths.append(len(text) if isinstance(text, str) else -1)
            return encode(text, *args, **kwargs)

        def recording_template(*args, **kwargs):
            self.templates_tokenised += kwargs.get("tokenize", True) is not False
            return template(*args, **kwargs)

        tokenizer.encode, tokenizer.apply_chat_template = recording_encode, recording_template

    def clear(self) -> None:
        self.lengths.clear()
        self.templates_tokenised = 0


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([LONG])
    return tokenizer


@pytest.fixture(scope="module")
def recorded(tokenizer):
    return Recorded(tokenizer)


@pytest.fixture(scope="module")
def url(tokenizer, recorded):
    with served(_start_engine(tokenizer, max_model_len=MAX_MODEL_LEN, max_num_seqs=16)) as url:
        yield url


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"model": MODEL, **body}, timeout=60)


def _too_long(response: httpx.Response, param: str) -> int:
    """The tokens a refused prompt has at least, checking the error is the context check's."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "context_length_exceeded")
    match = re.fullmatch(rf"the prompt has at least (\d+) tokens; this model's context is {MAX_MODEL_LEN}",
                         error["message"])
    assert match, error["message"]
    return int(match[1])


def test_a_huge_text_prompt_is_refused_from_a_prefix(url, tokenizer, recorded):
    bound = len(tokenizer.encode(HUGE[:20_000]))  # the whole prompt has more
    recorded.clear()
    for body in ({"prompt": HUGE}, {"prompt": ["short", HUGE], "stream": True}, {"prompt": HUGE, "echo": True}):
        at_least = _too_long(_post(url, "/v1/completions", body), "prompt")
        assert MAX_MODEL_LEN <= at_least < bound  # a true lower bound
    assert max(recorded.lengths) < len(HUGE) // 50  # never the whole prompt
    # the same shape as the check of a prompt tokenised whole: a prompt short in characters but over the context
    error = _post(url, "/v1/completions", {"prompt": LONG * MAX_MODEL_LEN, "max_tokens": 1}).json()["error"]
    assert error == {**error, "type": "invalid_request_error", "param": "prompt", "code": "context_length_exceeded",
                     "message": f"the prompt has {MAX_MODEL_LEN} tokens; this model's context is {MAX_MODEL_LEN}"}


def test_a_huge_chat_is_refused_without_tokenising_its_template(url, recorded):
    recorded.clear()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": HUGE}]
    _too_long(_post(url, "/v1/chat/completions", {"messages": messages}), "messages")
    _too_long(_post(url, "/v1/responses", {"input": HUGE}), "input")
    assert recorded.templates_tokenised == 0 and max(recorded.lengths) < len(HUGE) // 50
    # an error of the request's own, checked before the prompt's length, still comes first
    response = _post(url, "/v1/chat/completions", {"messages": messages, "stream_options": {"include_usage": True}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"



def test_a_huge_chat_asking_to_sanitize_control_tokens_is_refused_from_a_prefix_too(url, recorded):
    """transformers' sanitize_control_tokens (an argument of apply_chat_template that chat_template_kwargs reaches)
    renders no text to check in part: the check was skipped, and each 1 MiB prompt was tokenised whole on the
    replica's one tokenizing thread before it was refused (a victim's 0.03 s answer took 3 s behind six; a review).
    The text rendered without it has no more tokens than the sanitized prompt (it tokenises control tokens found
    in user text as text: one token each or more), so a prefix of that refuses it; a prompt that fits is served."""
    recorded.clear()
    sanitize = {"chat_template_kwargs": {"sanitize_control_tokens": True}}
    _too_long(_post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": HUGE}], **sanitize}),
              "messages")
    assert recorded.templates_tokenised == 0 and max(recorded.lengths) < len(HUGE) // 50
    reply = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi <|im_end|>"}],
                                                "max_tokens": 1, **sanitize})
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("where", ["tools", "arguments"])
def test_a_huge_chat_of_numbers_is_refused_from_a_prefix_too(url, recorded, where):
    """The check counted the characters of strings alone: a tool schema (or a call's arguments) of 500,000 zeros
    counted none, and its 1.5M tokens were tokenised whole on the one tokenizing thread before the request was
    refused (a review)."""
    zeros = [0] * 200_000
    if where == "tools":
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "enum": zeros}}}]}
    else:
        body = {"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"a": zeros})}}]},
            {"role": "user", "content": "hi"}]}
    recorded.clear()
    _too_long(_post(url, "/v1/chat/completions", body), "messages")
    assert recorded.templates_tokenised == 0 and max(recorded.lengths) < 200_000 // 10

def test_a_long_prompt_that_fits_exactly_is_accepted_with_the_same_ids(url, tokenizer, recorded):
    """Prompts of more characters per token than any prefix check assumes (40: the long token's), one token short
    of the context: accepted, tokenised whole as before; one token more is refused with the whole count."""
    prompt = LONG * (MAX_MODEL_LEN - 1)
    assert len(tokenizer.encode(prompt)) == MAX_MODEL_LEN - 1
    recorded.clear()
    reply = _post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0}).json()
    assert reply["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 1
    assert max(recorded.lengths) == len(prompt) and min(recorded.lengths) < len(prompt)  # a prefix first, then all

    base = len(apply_chat_template(tokenizer, [{"role": "user", "content": ""}]))
    messages = [{"role": "user", "content": LONG * (MAX_MODEL_LEN - 1 - base)}]
    ids = apply_chat_template(tokenizer, messages)
    assert len(ids) == MAX_MODEL_LEN - 1
    reply = _post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 1, "temperature": 0}).json()
    assert reply["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 1
    tokenized = _post(url, "/tokenize", {"messages": messages}).json()
    assert tokenized["tokens"] == ids

    over = _post(url, "/v1/completions", {"prompt": prompt + LONG, "max_tokens": 1}).json()["error"]
    assert over["message"] == f"the prompt has {MAX_MODEL_LEN} tokens; this model's context is {MAX_MODEL_LEN}"


# --- echoed prompt log-probabilities ------------------------------------------------------------------------


def _reference_choice(pieces, prompt: list[int], prompt_entries, completion_entries) -> dict:
    """A choice's legacy log-probabilities computed here from its entries: the prompt's first token (null), the
    others', then the completion's; top tokens keyed by text with the chosen one added; running text offsets."""
    tokens, token_logprobs, tops, offsets, offset = [], [], [], [], 0
    for entry in [None, *prompt_entries, *completion_entries]:
        token = pieces.text(prompt[0] if entry is None else entry.token_id)
        top = None
        if entry is not None:
            top = {}
            for t, lp in (*entry.top, *(() if any(t == entry.token_id for t, _ in entry.top)
                                        else ((entry.token_id, entry.logprob),))):
                top[pieces.text(t)] = max(top.get(pieces.text(t), -9999.0), max(lp, -9999.0))
        tokens.append(token)
        token_logprobs.append(None if entry is None else max(entry.logprob, -9999.0))
        tops.append(top)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def test_echoed_prompt_logprobs_are_built_once_per_prompt(tokenizer):
    from service.app import _Choice, _CompletionFormat, _Echo
    from service.engine import StepOutput
    from service.sampling import TokenLogprobs
    from service.text import TokenPieces

    pieces = TokenPieces(tokenizer)
    prompts = [tokenizer.encode("def f(x): return x"), tokenizer.encode("class A: pass")]

    def entries(ids, shift=0.0):
        return tuple(TokenLogprobs(t, -0.5 - k - shift, ((t, -0.5 - k - shift), ((t + 1) % 300, -2.0 - shift)))
                     for k, t in enumerate(ids))

    shared = [entries(p[1:]) for p in prompts]
    # prompt 0's choices share its prefill (the same entries); prompt 1's last choice was prefilled alone and got
    # entries of its own (they differ, so it must not reuse the others')
    prompt_entries = [shared[0], tuple(shared[0]), shared[0], shared[1], shared[1], entries(prompts[1][1:], 0.25)]
    completions = [entries([5 + i, 7]) for i in range(6)]
    n = 3
    results = [_Choice([StepOutput(f"r{i}", (c[0].token_id,), "a", False, None, len(prompts[i // n]), 1, c[:1],
                                   prompt_entries[i]),
                        StepOutput(f"r{i}", (c[1].token_id,), "b", True, "length", len(prompts[i // n]), 2, c[1:])])
               for i, c in enumerate(completions)]
    expected = [_reference_choice(pieces, prompts[i // n], prompt_entries[i], completions[i]) for i in range(6)]

    echoes = [_Echo(p, None, tokenizer.decode) for p in prompts]
    fmt = _CompletionFormat(MODEL, pieces, n, len(prompts), echoes)
    response = fmt.response(results)
    assert [c.logprobs.model_dump() for c in response.choices] == expected
    assert [c.text for c in response.choices] == [tokenizer.decode(prompts[i // n]) + "ab" for i in range(6)]
    tops = [c.logprobs.top_logprobs for c in response.choices]
    # one build per prompt's entries: the choices of a prompt hold the same top-token dicts, other prompts' not
    assert all(tops[i][k] is tops[0][k] for i in (1, 2) for k in range(1, len(prompts[0])))
    assert tops[4][1] is tops[3][1] and tops[5][1] is not tops[3][1] and tops[3][1] is not tops[0][1]

    # streamed: the echo chunk of each choice carries the same entries as the response's prompt part
    fmt = _CompletionFormat(MODEL, pieces, n, len(prompts), echoes)
    for i, r in enumerate(results):
        chunks = [chunk for out in r.outputs for chunk in fmt.chunks(i, out)]
        merged = {key: [v for chunk in chunks for v in getattr(chunk.choices[0].logprobs, key)]
                  for key in expected[i]}
        assert merged == expected[i]


def test_echo_with_n_choices_over_http(url, tokenizer):
    """The n choices of a prompt (sharing its prefill: the same entries) echo the same prompt log-probabilities,
    its tokens' texts at their offsets."""
    prompt = "def add(a, b):\n    return a + b"
    ask = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 3, "n": 4}
    choices = _post(url, "/v1/completions", ask).json()["choices"]
    ids = tokenizer.encode(prompt)
    texts = [tokenizer.decode([t]) for t in ids]
    for choice in choices:
        assert choice["text"] == choices[0]["text"] and choice["text"].startswith(prompt)
        assert choice["logprobs"] == choices[0]["logprobs"]
        logprobs = choice["logprobs"]
        assert logprobs["tokens"][:len(ids)] == texts and logprobs["token_logprobs"][0] is None
        assert logprobs["text_offset"][:len(ids)] == [len("".join(texts[:k])) for k in range(len(ids))]
        assert all(top for top in logprobs["top_logprobs"][1:])  # (tokens of one text share a key)


def test_tokenize_runs_apart_from_the_prompts_of_generation_requests():
    """/tokenize answers every id of a text whatever its length, so it cannot be refused from a prefix: on the
    prompts' one tokenizing thread a 1 MiB text held every completion's prompt behind it (~1 s). It runs on a thread
    and a copy of the tokenizer of its own: a completion is answered while a /tokenize is held in its tokenizer."""
    import threading

    tokenizer = build_tokenizer()
    entered, release = threading.Event(), threading.Event()
    encode = tokenizer.encode

    def held_encode(text, *args, **kwargs):
        if isinstance(text, str) and "HOLD" in text:
            entered.set()
            release.wait(60)
        return encode(text, *args, **kwargs)

    tokenizer.encode = held_encode
    with served(_start_engine(tokenizer, max_model_len=MAX_MODEL_LEN)) as url:
        answers = {}
        held = threading.Thread(target=lambda: answers.update(tokenize=_post(url, "/tokenize", {"prompt": "HOLD on"})))
        held.start()
        try:
            assert entered.wait(30)
            completion = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2},
                                    timeout=15)
            assert completion.status_code == 200, completion.text
            assert held.is_alive()  # (still held: the completion did not wait for it)
        finally:
            release.set()
            held.join(30)
        assert answers["tokenize"].status_code == 200
        assert answers["tokenize"].json()["tokens"] == encode("HOLD on")


def test_an_echo_of_too_many_log_probabilities_is_refused_unless_streamed(url, tokenizer, monkeypatch):
    """A response that echoes its prompts with log-probabilities is built whole in memory: 4 prompts of 8,000 tokens,
    n=16, logprobs 20 (a 119 KB body) answered 197 MiB of JSON (+830 MB, the GIL held 1 s; a review). Past
    MAX_LOGPROB_ENTRIES entries (choices x prompt tokens x (1 + logprobs)) it is a 400 unless streamed, where each
    choice's echo is its own chunk."""
    from service import app

    prompt = "def add(a, b):\n    return a + b"
    entries = 4 * len(tokenizer.encode(prompt)) * (1 + 3)
    monkeypatch.setattr(app, "MAX_LOGPROB_ENTRIES", entries - 1)
    ask = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 3, "n": 4}
    refused = _post(url, "/v1/completions", ask)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
    assert f"{entries:,} entries" in refused.json()["error"]["message"]
    assert _post(url, "/v1/completions", {**ask, "stream": True}).status_code == 200
    assert _post(url, "/v1/completions", {**ask, "n": 3}).status_code == 200


@pytest.mark.parametrize("path, ask, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 4},
     "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 4}, "logprobs"),
    ("/v1/responses", {"input": "Hi", "top_logprobs": 4}, "top_logprobs"),
])
def test_generated_log_probabilities_past_the_limit_are_refused_unless_streamed(url, monkeypatch, path, ask, param):
    """The log-probabilities of generated tokens were built whole in memory however many (only an echo's were
    bounded): n choices x max_tokens x (1 + top_logprobs) entries. Counted as they come, a non-streamed response
    past MAX_LOGPROB_ENTRIES is a 400 naming logprobs, its choices aborted; streamed, or under the limit, it is
    answered."""
    from service import app

    monkeypatch.setattr(app, "MAX_LOGPROB_ENTRIES", 50)
    limit = "max_output_tokens" if path == "/v1/responses" else "max_tokens"
    ask = {**ask, limit: 20, "temperature": 0, "ignore_eos": True}  # 20 tokens x (1 + 4) = 100 entries
    refused = _post(url, path, ask)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == param
    assert "50 entries" in refused.json()["error"]["message"]
    assert _post(url, path, {**ask, "stream": True}).status_code == 200
    answered = _post(url, path, {**ask, limit: 8})  # 40 entries
    usage = answered.json()["usage"]
    assert answered.status_code == 200 and usage.get("completion_tokens", usage.get("output_tokens")) == 8
    if path == "/v1/responses":  # asked for by include alone: the error names include (it said top_logprobs)
        ask = {key: value for key, value in ask.items() if key != "top_logprobs"}
        refused = _post(url, path, {**ask, "include": ["message.output_text.logprobs"], limit: 60})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "include"
