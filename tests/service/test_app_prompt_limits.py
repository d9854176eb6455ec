"""What one request's prompt costs the others of a replica: a prompt too long for the context is refused from a
part of it (tokenising runs on one thread per replica), and echoed prompt log-probabilities are built once per
prompt, not once per choice."""

from __future__ import annotations

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

