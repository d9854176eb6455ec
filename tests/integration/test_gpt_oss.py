"""GPT-OSS as OpenAI released it, through the whole stack: a tiny random GPT-OSS (clamped SwiGLU experts with
biases, attention sinks, alternating sliding-window layers) with its experts in MXFP4 and a tokenizer and
chat template that write harmony, served by `build_app` on Ray Serve with emulated expert workers that
dequantize the experts they load. Over HTTP with the official `openai` client: greedy answers equal the
single-process model's (transformers dequantizing the same checkpoint) before and after a live re-placement
that moved experts between workers, and a forced call comes as a harmony call.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch

from service.harmony import TAGS, HarmonyStream
from service.model import load_reference_model
from service.text import apply_chat_template
from tests.serve_app import serve_app
from tests.service.test_harmony import HARMONY_TEMPLATE
from tests.service.test_text import build_chat_model, build_tokenizer
from tests.tiny_models import as_mxfp4

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "tiny-gpt-oss"
PROMPTS = ["Explain what a dictionary is in Python.", "Write a short note about the weather."]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A GPT-OSS checkpoint with MXFP4 experts and a harmony tokenizer, as a model folder of a configured root."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(TAGS)})
    tokenizer.chat_template = HARMONY_TEMPLATE
    path = tmp_path_factory.mktemp("models") / MODEL
    model = build_chat_model(tokenizer, seed=3, architecture="gpt_oss")
    model.config.max_position_embeddings = 1024  # room for the tools' prompt
    model.config.rope_parameters["original_max_position_embeddings"] = 32  # (YaRN's factor 32)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(tag) for tag in ("<|return|>", "<|call|>")]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return as_mxfp4(path, seed=3)


@pytest.fixture(scope="module")
def url(folder):
    with serve_app({"model": MODEL, "model_roots": [str(folder.parent)], "num_devices": 4,
                    "speeds": [1.0, 0.95, 0.9, 0.85], "app_name": "gptoss", "profile_prompts": None,
                    "emulation": {"fixed_s": 1e-4, "jitter": 0.0, "throttle_floor": 1.0}, "dtype": "float32",
                    "max_num_seqs": 8, "admin_token": TOKEN, "reasoning_parser": "openai_gptoss"}) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


def _greedy(client, prompt: str) -> str:
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=24, temperature=0)
    return response.choices[0].message.content


def test_gpt_oss_in_mxfp4_answers_as_the_single_process_model_before_and_after_a_re_placement(client, url, folder):
    from transformers import AutoTokenizer

    model, tokenizer = load_reference_model(folder), AutoTokenizer.from_pretrained(folder)
    drop = {*tokenizer.all_special_tokens} - set(TAGS)
    expected = []
    for prompt in PROMPTS:
        ids = apply_chat_template(tokenizer, [{"role": "user", "content": prompt}])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=False)
        # the random model writes no harmony: its text is the content, without the end token and other specials
        expected.append(HarmonyStream({}, drop=drop).push(text, final=True)[1])
    assert all(expected) and [_greedy(client, p) for p in PROMPTS] == expected
    placement = httpx.get(f"{url}/admin/placement", headers=ADMIN, timeout=30).json()
    assert len(placement["layers"]) == 2 and placement["num_experts"] == 8
    moved = httpx.post(f"{url}/admin/recalibrate", headers=ADMIN, timeout=120,
                       json={"policy": "contiguous", "mode": "full", "force": True}).json()
    assert moved["status"] == "applied" and moved["experts_moved"] > 0, moved
    assert [_greedy(client, p) for p in PROMPTS] == expected


def test_forced_calls_come_as_harmony_calls(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=tools, tool_choice="required", max_tokens=400, temperature=0)
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
