"""Kimi-K2 through the whole stack: a tiny folder laid out as Moonshot releases it (DeepSeek-V3's architecture
under ``model_type: kimi_k2`` with remote code that is not run, FP8 weights, a tiktoken tokenizer; see
tests/kimi_release.py) served by `build_app` on Ray Serve with emulated expert workers, over HTTP with the
official `openai` client: greedy answers equal the single-process model's, prompts are counted in the rebuilt
tokenizer's ids, and the tool-call format is read from its chat template (Kimi's, forced calls parsed)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from service.text import apply_chat_template
from service.tokenizer import load_tokenizer
from tests.integration.architecture_app import PROMPTS, WEATHER, answers, client, expected_answers, served
from tests.kimi_release import save_kimi_k2

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "tiny-kimi-k2"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_kimi_k2(tmp_path_factory.mktemp("models") / MODEL)


@pytest.fixture(scope="module")
def api(folder):
    with served(folder, "kimi") as url:  # tool_call_parser "auto": Kimi's, from the chat template
        yield client(url)


def test_kimi_k2_answers_as_the_single_process_model_with_its_tiktoken_tokenizer(api, folder):
    assert [answers(api, MODEL, p)[0] for p in PROMPTS] == expected_answers(folder)
    messages = [{"role": "user", "content": "你好, Kimi! CamelCase 中A"}]
    reply = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens == len(apply_chat_template(load_tokenizer(folder), messages))


def test_forced_calls_come_in_kimis_format(api):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    reply = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                        tools=tools, tool_choice="required", parallel_tool_calls=False,
                                        max_tokens=400, temperature=0)
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
