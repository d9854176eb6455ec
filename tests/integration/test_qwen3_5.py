"""Qwen3.5's MoE models through the whole stack: a tiny random Qwen3.5 (a vision-language checkpoint whose
language model has gated DeltaNet linear attention in three layers of four and MoE in every layer) served by
`build_app` on Ray Serve with emulated expert workers. Over HTTP with the official `openai` client: greedy
answers equal the single-process language model's before and after a live re-placement that moved experts
between workers, and the choices of one request (`n`, sharing its prefill: the linear-attention states are
copied) are each that answer.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from service.model import load_reference_model
from service.text import apply_chat_template
from tests.serve_app import serve_app
from tests.service.test_text import build_tokenizer
from tests.tiny_models import as_vlm, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "tiny-qwen3.5"
PROMPTS = ["Explain what a dictionary is in Python.", "Write a short note about the weather."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A Qwen3.5 vision-language checkpoint with a chat tokenizer, as a model folder of a configured root."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_config("qwen3_5_moe")
    text = config.text_config
    text.vocab_size, text.max_position_embeddings = len(tokenizer), 1024
    text.eos_token_id, text.pad_token_id, text.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    torch.manual_seed(3)
    language_model = AutoModelForCausalLM.from_config(text).eval()
    path = tmp_path_factory.mktemp("models") / MODEL
    vlm = as_vlm(language_model, config)
    vlm.generation_config.eos_token_id = tokenizer.eos_token_id
    vlm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def url(folder):
    with serve_app({"model": MODEL, "model_roots": [str(folder.parent)], "num_devices": 4,
                    "speeds": [1.0, 0.95, 0.9, 0.85], "app_name": "qwen35", "profile_prompts": None,
                    "emulation": {"fixed_s": 1e-4, "jitter": 0.0, "throttle_floor": 1.0},
                    "max_num_seqs": 8, "admin_token": TOKEN}) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


def _answers(client, prompt: str, n: int = 1) -> list[str]:
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=24, temperature=0, n=n)
    return [choice.message.content for choice in response.choices]


def test_qwen3_5_answers_as_the_single_process_model_before_and_after_a_re_placement(client, url, folder):
    from transformers import AutoTokenizer

    model, tokenizer = load_reference_model(folder), AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "Qwen3_5MoeForCausalLM"  # the language model of the checkpoint
    expected = []
    for prompt in PROMPTS:
        ids = apply_chat_template(tokenizer, [{"role": "user", "content": prompt}])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        expected.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    assert [_answers(client, p)[0] for p in PROMPTS] == expected
    assert _answers(client, PROMPTS[0], n=3) == [expected[0]] * 3  # one prefill, its states copied
    placement = httpx.get(f"{url}/admin/placement", headers=ADMIN, timeout=30).json()
    assert len(placement["layers"]) == 4 and placement["num_experts"] == 8
    moved = httpx.post(f"{url}/admin/recalibrate", headers=ADMIN, timeout=120,
                       json={"policy": "contiguous", "mode": "full", "force": True}).json()
    assert moved["status"] == "applied" and moved["experts_moved"] > 0, moved
    assert [_answers(client, p)[0] for p in PROMPTS] == expected
