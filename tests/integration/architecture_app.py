"""What the whole-stack tests of other architectures share: a model folder of a configured root served by
`build_app` on Ray Serve with four emulated workers, the official `openai` client on it, the single-process
model's greedy answers to compare with, and a live re-placement that must move experts."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import torch

from service.model import load_reference_model
from service.text import apply_chat_template
from service.tokenizer import load_tokenizer
from tests.serve_app import serve_app

TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = ["Explain what a dictionary is in Python.", "Write a short note about the weather."]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
NEW_TOKENS = 24


@contextmanager
def served(folder: Path, app_name: str, **args: Any) -> Iterator[str]:
    """The app serving ``folder`` (named by its folder) on four emulated devices; yields the base URL."""
    with serve_app({"model": folder.name, "model_roots": [str(folder.parent)], "num_devices": 4,
                    "speeds": [1.0, 0.95, 0.9, 0.85], "app_name": app_name, "profile_prompts": None,
                    "emulation": {"fixed_s": 1e-4, "jitter": 0.0, "throttle_floor": 1.0},
                    "max_num_seqs": 8, "admin_token": TOKEN, **args}) as base:
        yield base


def chat_model(architecture: str, tokenizer, seed: int = 3) -> torch.nn.Module:
    """The tiny model of ``architecture`` with ``tokenizer``'s vocabulary and room for a tools' prompt."""
    from tests.service.test_text import build_chat_model

    model = build_chat_model(tokenizer, seed=seed, architecture=architecture)
    model.config.max_position_embeddings = 1024
    return model


def vlm_chat_folder(root: Path, name: str, architecture: str) -> Path:
    """A tiny random vision-language checkpoint of ``architecture`` (as Qwen3.5 and Llama 4 are released: the
    served language model under `model.language_model`) with a chat tokenizer, as the model folder ``name``."""
    from transformers import AutoModelForCausalLM

    from tests.service.test_text import build_tokenizer
    from tests.tiny_models import as_vlm, tiny_config

    tokenizer = build_tokenizer()
    config = tiny_config(architecture)
    text = config.text_config
    text.vocab_size, text.max_position_embeddings = len(tokenizer), 1024
    text.eos_token_id, text.pad_token_id, text.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    torch.manual_seed(3)
    vlm = as_vlm(AutoModelForCausalLM.from_config(text).eval(), config)
    vlm.generation_config.eos_token_id = tokenizer.eos_token_id
    return save_folder(root, name, vlm, tokenizer)


def save_folder(root: Path, name: str, model: torch.nn.Module, tokenizer) -> Path:
    """``model`` and ``tokenizer`` saved as the model folder ``name`` under ``root`` (a configured root)."""
    model.save_pretrained(root / name)
    tokenizer.save_pretrained(root / name)
    return root / name


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


def answers(client_: openai.OpenAI, model: str, prompt: str, n: int = 1) -> list[str]:
    """The greedy answers of the served model to one user message (``n`` choices)."""
    response = client_.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=NEW_TOKENS, temperature=0, n=n)
    return [choice.message.content for choice in response.choices]


def expected_answers(folder: Path, content: Callable[[Any, torch.Tensor], str] | None = None) -> list[str]:
    """The single-process model's greedy answers to `PROMPTS` (transformers' `generate` on the checkpoint as
    transformers loads it), as ``content(tokenizer, new_token_ids)`` renders them (default: decoded without
    special tokens)."""
    model, tokenizer = load_reference_model(folder), load_tokenizer(folder)
    content = content or (lambda tok, new: tok.decode(new, skip_special_tokens=True))
    expected = []
    for prompt in PROMPTS:
        ids = apply_chat_template(tokenizer, [{"role": "user", "content": prompt}])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        expected.append(content(tokenizer, out[0, len(ids):]))
    return expected


def assert_forced_weather_call(client_: openai.OpenAI, model: str, **options: Any) -> None:
    """A required call (``tool_choice: required``) of the one function offered, `WEATHER`'s, comes back parsed from
    the model's own call format: ``finish_reason`` tool_calls, the function named, arguments valid JSON of it."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    reply = client_.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                            tools=tools, tool_choice="required", max_tokens=400, temperature=0,
                                            **options)
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def re_place(url: str, num_moe_layers: int) -> None:
    """Check the placement covers the model's MoE layers, then re-place every expert contiguously (a live
    migration that must move some)."""
    placement = httpx.get(f"{url}/admin/placement", headers=ADMIN, timeout=30).json()
    assert len(placement["layers"]) == num_moe_layers and placement["num_experts"] == 8, placement
    moved = httpx.post(f"{url}/admin/recalibrate", headers=ADMIN, timeout=120,
                       json={"policy": "contiguous", "mode": "full", "force": True}).json()
    assert moved.get("status") == "applied" and moved.get("experts_moved", 0) > 0, moved  # (an error body shown whole)
