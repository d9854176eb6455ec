"""GPT-OSS as OpenAI released it, through the whole stack: a tiny random GPT-OSS (clamped SwiGLU experts with
biases, attention sinks, alternating sliding-window layers) with its experts in MXFP4 and a tokenizer and
chat template that write harmony, served by `build_app` on Ray Serve with emulated expert workers that
hold the experts in MXFP4 as released (`keep_quantized_experts`), dequantizing them at each call. Over HTTP with the official `openai` client: greedy answers equal the
single-process model's (transformers dequantizing the same checkpoint) before and after a live re-placement
that moved experts between workers, and a forced call comes as a harmony call.
"""

from __future__ import annotations

import pytest

from service.harmony import TAGS, HarmonyStream
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
from tests.service.test_harmony import HARMONY_TEMPLATE
from tests.service.test_text import build_tokenizer
from tests.tiny_models import as_mxfp4

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "tiny-gpt-oss"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A GPT-OSS checkpoint with MXFP4 experts and a harmony tokenizer, as a model folder of a configured root."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(TAGS)})
    tokenizer.chat_template = HARMONY_TEMPLATE
    model = chat_model("gpt_oss", tokenizer)
    model.config.rope_parameters["original_max_position_embeddings"] = 32  # (YaRN's factor 32)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(tag) for tag in ("<|return|>", "<|call|>")]
    return as_mxfp4(save_folder(tmp_path_factory.mktemp("models"), MODEL, model, tokenizer), seed=3)


@pytest.fixture(scope="module")
def openai_client(folder):
    with served(folder, "gptoss", dtype="float32", reasoning_parser="openai_gptoss", keep_quantized_experts=True) as url:
        yield client(url), url


def _content(tokenizer, new_tokens) -> str:
    """The random model writes no harmony: its text is the content, without the end token and other specials."""
    drop = {*tokenizer.all_special_tokens} - set(TAGS)
    return HarmonyStream({}, drop=drop).push(tokenizer.decode(new_tokens, skip_special_tokens=False), final=True)[1]


def test_gpt_oss_in_mxfp4_answers_as_the_single_process_model_before_and_after_a_re_placement(openai_client, folder):
    api, url = openai_client
    expected = expected_answers(folder, _content)
    assert all(expected) and [answers(api, MODEL, p)[0] for p in PROMPTS] == expected
    re_place(url, num_moe_layers=2)
    assert [answers(api, MODEL, p)[0] for p in PROMPTS] == expected


def test_forced_calls_come_as_harmony_calls(openai_client):
    assert_forced_weather_call(openai_client[0], MODEL)
