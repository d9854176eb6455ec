"""Kimi-K2-Thinking through the whole stack: a tiny folder laid out as Moonshot releases it (DeepSeek-V3's
architecture under ``model_type: kimi_k2`` with remote code that is not run, INT4 experts in compressed-tensors'
pack-quantized format, a tiktoken tokenizer; see tests/kimi_release.py) served by `build_app` on Ray Serve with
emulated expert workers holding the experts as stored (`keep_quantized_experts`), over HTTP with the official
`openai` client: greedy answers equal the single-process model's (transformers with compressed-tensors), before
and after a live re-placement that moves the INT4 experts; prompts are counted in the rebuilt tokenizer's ids,
and the tool-call format is read from its chat template (Kimi's, forced calls parsed). (K2's FP8 weights take
DeepSeek-V3's path, tested whole in test_architectures.py.)"""

from __future__ import annotations

import pytest

from service.text import apply_chat_template
from service.tokenizer import load_tokenizer
from tests.integration.architecture_app import (
    PROMPTS,
    answers,
    assert_forced_weather_call,
    client,
    expected_answers,
    re_place,
    served,
)
from tests.kimi_release import save_kimi_k2

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "tiny-kimi-k2"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_kimi_k2(tmp_path_factory.mktemp("models") / MODEL, quantization="int4")


@pytest.fixture(scope="module")
def api(folder):
    # tool_call_parser "auto": Kimi's, from the chat template
    with served(folder, "kimi", keep_quantized_experts=True) as url:
        yield client(url), url


def test_kimi_k2_thinking_answers_as_the_single_process_model_before_and_after_a_re_placement(api, folder):
    api, url = api
    expected = expected_answers(folder)
    assert [answers(api, MODEL, p)[0] for p in PROMPTS] == expected
    re_place(url, num_moe_layers=2)  # decoder layer 0 is dense; the workers move INT4 experts and their scales
    assert [answers(api, MODEL, p)[0] for p in PROMPTS] == expected


def test_prompts_are_counted_in_the_rebuilt_tokenizers_ids(api, folder):
    api, _ = api
    messages = [{"role": "user", "content": "你好, Kimi! CamelCase 中A"}]
    reply = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens == len(apply_chat_template(load_tokenizer(folder), messages))


def test_forced_calls_come_in_kimis_format(api):
    assert_forced_weather_call(api[0], MODEL, parallel_tool_calls=False)
