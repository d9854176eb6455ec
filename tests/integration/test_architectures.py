"""MoE architectures beyond the embedded model's, through the whole stack: a tiny random DeepSeek-V3 (a
dense first layer, a shared expert, group-limited sigmoid routing, multi-head latent attention whose
values are narrower than its keys; Kimi-K2 is this architecture), in FP8 with block scales as DeepSeek
released it, served by `build_app` on Ray Serve with
emulated expert workers, over HTTP with the official `openai` client: greedy answers equal the
single-process model's before and after a live re-placement, and forced calls come in DeepSeek's format.
"""

from __future__ import annotations

import pytest

from tests.integration.architecture_app import (
    PROMPTS,
    answers,
    assert_forced_weather_call,
    chat_model,
    client,
    expected_answers,
    re_place,
    save_folder,
    served,
)
from tests.service.test_text import build_tokenizer
from tests.tiny_models import as_fp8

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "tiny-deepseek-v3"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A DeepSeek-V3 checkpoint in FP8 with block scales and a chat tokenizer, as a model folder of a
    configured root."""
    tokenizer = build_tokenizer()
    model = chat_model("deepseek_v3", tokenizer)
    path = save_folder(tmp_path_factory.mktemp("models"), MODEL, model, tokenizer)
    return as_fp8(path, model)  # as DeepSeek released V3 and R1: the ingress and the workers dequantize


@pytest.fixture(scope="module")
def openai_client(folder):
    with served(folder, "arch", tool_call_parser="deepseek_v3") as url:
        yield client(url), url


def test_deepseek_v3_answers_as_the_single_process_model_before_and_after_a_re_placement(openai_client, folder):
    api, url = openai_client
    expected = expected_answers(folder)
    assert [answers(api, MODEL, p)[0] for p in PROMPTS] == expected
    re_place(url, num_moe_layers=2)  # decoder layer 0 is dense
    assert [answers(api, MODEL, p)[0] for p in PROMPTS] == expected


def test_forced_calls_come_in_deepseeks_format(openai_client):
    assert_forced_weather_call(openai_client[0], MODEL, parallel_tool_calls=False)
