"""The committed default model `deploy/models/vibe-tiny-moe` and the prompt sets built with it.

Checks what the service relies on: the folder loads offline within its size budget, the tokenizer's chat
template, greedy generation, per-expert keys on disk, realistic routing skew without dead experts on the
profile prompts, and the JSON Lines fields of every prompt set.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.build_default_model import (
    MAX_FOLDER_BYTES,
    MODEL_DIR,
    PROMPTS_DIR,
    WORKLOADS_DIR,
    prompt_tokens,
    read_jsonl,
    router_loads,
    routing_summary,
)

WORKLOADS = ("sharegpt_like", "sonnet_like", "code")
ROLES = {"system", "user", "assistant"}


@pytest.fixture(scope="module")
def loaded():
    """(model, tokenizer) loaded from the committed folder with the hub switched off."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def stats() -> dict:
    return json.loads((MODEL_DIR / "routing_stats.json").read_text())


def test_folder_holds_the_expected_files_within_budget():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "routing_stats.json"} <= names
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) <= MAX_FOLDER_BYTES


def test_config_is_an_all_moe_qwen3(loaded):
    config = loaded[0].config
    assert config.model_type == "qwen3_moe"
    assert (config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok) == (4, 32, 4)
    assert config.decoder_sparse_step == 1 and not config.mlp_only_layers
    assert config.max_position_embeddings == 1024
    assert next(loaded[0].parameters()).dtype == torch.float32


def test_weights_are_stored_per_expert():
    with safe_open(MODEL_DIR / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        gate = f.get_tensor("model.layers.3.mlp.experts.31.gate_proj.weight")
    for layer in range(4):
        for expert in (0, 31):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight" in keys
    assert gate.ndim == 2


def test_chat_template_renders_roles_and_generation_prompt(loaded):
    tokenizer = loaded[1]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tuple?"}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = tokenizer.decode(encoded["input_ids"])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is a tuple?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id in loaded[0].generation_config.eos_token_id


def test_greedy_generation_is_deterministic_text(loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "Explain the for statement."}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        first = model.generate(**encoded, max_new_tokens=24, do_sample=False)
        second = model.generate(**encoded, max_new_tokens=24, do_sample=False)
    assert torch.equal(first, second)
    reply = tokenizer.decode(first[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    assert sum(c.isalpha() for c in reply) >= 10  # words, not only whitespace or punctuation


def test_profile_prompts_route_with_realistic_skew_and_no_dead_expert(loaded, stats):
    model, tokenizer = loaded
    profile = read_jsonl(PROMPTS_DIR / "profile.jsonl")
    loads = router_loads(model, tokenizer, [entry["messages"] for entry in profile])
    summary = routing_summary(loads)
    assert loads.shape == (4, 32)
    assert summary["dead_experts"] == [0, 0, 0, 0]
    assert all(1.5 <= skew <= 5.0 for skew in summary["max_over_mean"])
    # the committed statistics describe this model on this prompt set
    np.testing.assert_allclose(summary["max_over_mean"], stats["max_over_mean"], rtol=0.02)


def test_routing_stats_file_is_complete(stats):
    assert stats["prompt_set"] == "deploy/prompts/profile.jsonl"
    assert np.asarray(stats["loads"]).shape == (4, 32)
    for key in ("max_over_mean", "min_share", "dead_experts"):
        assert len(stats[key]) == 4
    assert set(stats["drift_cosine_distance"]) == {
        "sharegpt_like_vs_code", "sonnet_like_vs_code", "sharegpt_like_vs_sonnet_like"}


def check_messages(messages) -> None:
    assert isinstance(messages, list) and messages
    for message in messages:
        assert set(message) == {"role", "content"} and message["role"] in ROLES
        assert isinstance(message["content"], str) and message["content"]
    assert messages[-1]["role"] == "user"


@pytest.mark.parametrize("name", WORKLOADS)
def test_workload_files_parse_and_fit_the_context(loaded, name):
    tokenizer = loaded[1]
    path = WORKLOADS_DIR / f"{name}.jsonl"
    assert path.stat().st_size < 2**20
    entries = read_jsonl(path)
    assert len(entries) >= 100
    for entry in entries:
        assert set(entry) == {"messages", "max_tokens"}
        check_messages(entry["messages"])
        assert isinstance(entry["max_tokens"], int) and entry["max_tokens"] > 0
    lengths = np.array([prompt_tokens(tokenizer, entry["messages"]) for entry in entries])
    outputs = np.array([entry["max_tokens"] for entry in entries])
    assert np.all(lengths + outputs <= 1024)
    if name == "sonnet_like":
        assert lengths.min() >= 300 and outputs.max() <= 64


def test_profile_set_parses():
    entries = read_jsonl(PROMPTS_DIR / "profile.jsonl")
    assert 48 <= len(entries) <= 96
    for entry in entries:
        check_messages(entry["messages"])
