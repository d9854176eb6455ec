"""MoE architectures beyond the embedded model's, through the whole stack: a tiny random DeepSeek-V3 (a
dense first layer, a shared expert, group-limited sigmoid routing, multi-head latent attention whose
values are narrower than its keys; Kimi-K2 is this architecture), in FP8 with block scales as DeepSeek
released it, served by `build_app` on Ray Serve with
emulated expert workers, over HTTP with the official `openai` client: greedy answers equal the
single-process model's before and after a live re-placement, and forced calls come in DeepSeek's format.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch

from service.model import load_reference_model
from service.text import apply_chat_template
from tests.serve_app import serve_app
from tests.service.test_text import build_chat_model, build_tokenizer
from tests.tiny_models import as_fp8

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "tiny-deepseek-v3"
PROMPTS = ["Explain what a dictionary is in Python.", "Write a short note about the weather."]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A DeepSeek-V3 checkpoint in FP8 with block scales and a chat tokenizer, as a model folder of a
    configured root."""
    tokenizer = build_tokenizer()
    path = tmp_path_factory.mktemp("models") / MODEL
    model = build_chat_model(tokenizer, seed=3, architecture="deepseek_v3")
    model.config.max_position_embeddings = 1024  # room for the tools' prompt
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return as_fp8(path, model)  # as DeepSeek released V3 and R1: the ingress and the workers dequantize


@pytest.fixture(scope="module")
def url(folder):
    with serve_app({"model": MODEL, "model_roots": [str(folder.parent)], "num_devices": 4,
                    "speeds": [1.0, 0.95, 0.9, 0.85], "app_name": "arch", "profile_prompts": None,
                    "emulation": {"fixed_s": 1e-4, "jitter": 0.0, "throttle_floor": 1.0},
                    "max_num_seqs": 8, "admin_token": TOKEN, "tool_call_parser": "deepseek_v3"}) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


def _greedy(client, prompt: str) -> str:
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=24, temperature=0)
    return response.choices[0].message.content


def test_deepseek_v3_answers_as_the_single_process_model_before_and_after_a_re_placement(client, url, folder):
    from transformers import AutoTokenizer

    model, tokenizer = load_reference_model(folder), AutoTokenizer.from_pretrained(folder)
    expected = []
    for prompt in PROMPTS:
        ids = apply_chat_template(tokenizer, [{"role": "user", "content": prompt}])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        expected.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    assert [_greedy(client, p) for p in PROMPTS] == expected
    placement = httpx.get(f"{url}/admin/placement", headers=ADMIN, timeout=30).json()
    assert len(placement["layers"]) == 2 and placement["num_experts"] == 8  # decoder layer 0 is dense
    moved = httpx.post(f"{url}/admin/recalibrate", headers=ADMIN, timeout=120,
                       json={"policy": "contiguous", "mode": "full", "force": True}).json()
    assert moved["status"] == "applied" and moved["experts_moved"] > 0, moved
    assert [_greedy(client, p) for p in PROMPTS] == expected


def test_forced_calls_come_in_deepseeks_format(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=tools, tool_choice="required", parallel_tool_calls=False,
                                           max_tokens=400, temperature=0)
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
