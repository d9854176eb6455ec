"""Models released as vision-language checkpoints, served for text through the whole stack: a tiny random
Qwen3.5 (gated DeltaNet linear attention in three layers of four, MoE in every layer) and a tiny random Llama 4
(dense and top-1 MoE layers interleaved, the expert's input scaled by its router score, chunked attention with
8-position chunks, a NoPE layer with temperature tuning) and a tiny random Gemma 4 (GELU experts beside a dense
MLP in every layer, sliding layers and a wider full-attention layer whose keys are its values), each served by `build_app` on Ray Serve with emulated
expert workers. Over HTTP with the official `openai` client: greedy answers equal the single-process language
model's before and after a live re-placement that moved experts between workers; the choices of one request
(`n`, sharing its prefill: Qwen3.5's linear-attention states are copied) are each that answer; and a next turn
resumes from what the last one left in its KV slot (for Qwen3.5, its linear-attention states).
"""

from __future__ import annotations

import pytest
import torch

from tests.integration.architecture_app import (
    PROMPTS,
    answers,
    client,
    expected_answers,
    re_place,
    served,
    vlm_chat_folder,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# architecture -> (served model name, its language model's class, MoE layers)
MODELS = {"qwen3_5_moe": ("tiny-qwen3.5", "Qwen3_5MoeForCausalLM", 4), "llama4": ("tiny-llama4", "Llama4ForCausalLM", 2),
          "gemma4": ("tiny-gemma4", "Gemma4TextOnlyForCausalLM", 3)}


@pytest.fixture(scope="module", params=list(MODELS))
def served_model(request, tmp_path_factory):
    """(architecture, model folder, openai client, base URL) of one vision-language checkpoint being served."""
    architecture = request.param
    folder = vlm_chat_folder(tmp_path_factory.mktemp("models"), MODELS[architecture][0], architecture)
    with served(folder, architecture.replace("_", "")) as url:
        yield architecture, folder, client(url), url


def test_answers_equal_the_single_process_model_before_and_after_a_re_placement(served_model):
    from service.model import load_reference_model

    architecture, folder, api, url = served_model
    model, language_model, num_moe_layers = MODELS[architecture]
    assert type(load_reference_model(folder)).__name__ == language_model  # the checkpoint's language model
    expected = expected_answers(folder)
    assert [answers(api, model, p)[0] for p in PROMPTS] == expected
    assert answers(api, model, PROMPTS[0], n=3) == [expected[0]] * 3  # one prefill, its states or keys copied
    re_place(url, num_moe_layers=num_moe_layers)
    assert [answers(api, model, p)[0] for p in PROMPTS] == expected


def test_a_next_turn_resumes_from_what_the_last_left(served_model):
    """A prompt that extends a finished request's tokens (its prompt and its output but the last token, whose
    keys, values or linear-attention states the slot holds) resumes from them: `cached_tokens` says so, and the
    answer is the single-process model's for the whole prompt. (Qwen3.5's states hold one position: this is the
    one prefix its cache reuses.)"""
    from transformers import AutoTokenizer

    from service.model import load_reference_model

    architecture, folder, api, _ = served_model
    model_name = MODELS[architecture][0]
    model, tokenizer = load_reference_model(folder), AutoTokenizer.from_pretrained(folder)

    def greedy(ids: list[int]) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
        return out[0, len(ids):].tolist()

    first = tokenizer("Tell me about the sea and the ships", add_special_tokens=False).input_ids
    output = greedy(first)
    reply = api.completions.create(model=model_name, prompt=first, max_tokens=8, temperature=0)
    assert reply.choices[0].text == tokenizer.decode(output, skip_special_tokens=True)
    turn = first + output + tokenizer(" and the harbour", add_special_tokens=False).input_ids
    reply = api.completions.create(model=model_name, prompt=turn, max_tokens=8, temperature=0)
    assert reply.usage.prompt_tokens_details.cached_tokens == len(first) + len(output) - 1
    assert reply.choices[0].text == tokenizer.decode(greedy(turn), skip_special_tokens=True)
