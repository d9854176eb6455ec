"""Qwen3.5's MoE models through the whole stack: a tiny random Qwen3.5 (a vision-language checkpoint whose
language model has gated DeltaNet linear attention in three layers of four and MoE in every layer) served by
`build_app` on Ray Serve with emulated expert workers. Over HTTP with the official `openai` client: greedy
answers equal the single-process language model's before and after a live re-placement that moved experts
between workers, the choices of one request (`n`, sharing its prefill: the linear-attention states are
copied) are each that answer, and a next turn resumes from the states the last one left.
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

MODEL = "tiny-qwen3.5"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A Qwen3.5 vision-language checkpoint with a chat tokenizer, as a model folder of a configured root."""
    return vlm_chat_folder(tmp_path_factory.mktemp("models"), MODEL, "qwen3_5_moe")


@pytest.fixture(scope="module")
def openai_client(folder):
    with served(folder, "qwen35") as url:
        yield client(url), url


def test_qwen3_5_answers_as_the_single_process_model_before_and_after_a_re_placement(openai_client, folder):
    from service.model import load_reference_model

    api, url = openai_client
    assert type(load_reference_model(folder)).__name__ == "Qwen3_5MoeForCausalLM"  # the checkpoint's language model
    expected = expected_answers(folder)
    assert [answers(api, MODEL, p)[0] for p in PROMPTS] == expected
    assert answers(api, MODEL, PROMPTS[0], n=3) == [expected[0]] * 3  # one prefill, its states copied
    re_place(url, num_moe_layers=4)
    assert [answers(api, MODEL, p)[0] for p in PROMPTS] == expected


def test_a_next_turn_resumes_from_the_linear_attention_states_of_the_last(openai_client, folder):
    """Prefix caching with linear attention: a prompt that extends a finished request's tokens (its prompt and
    its output but the last token, whose states the slot holds) resumes from them: `cached_tokens` says so, and
    the answer is the single-process model's for the whole prompt."""
    from transformers import AutoTokenizer

    from service.model import load_reference_model

    api, _ = openai_client
    model, tokenizer = load_reference_model(folder), AutoTokenizer.from_pretrained(folder)

    def greedy(ids: list[int]) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
        return out[0, len(ids):].tolist()

    first = tokenizer("Tell me about the sea and the ships", add_special_tokens=False).input_ids
    output = greedy(first)
    reply = api.completions.create(model=MODEL, prompt=first, max_tokens=8, temperature=0)
    assert reply.choices[0].text == tokenizer.decode(output, skip_special_tokens=True)
    turn = first + output + tokenizer(" and the harbour", add_special_tokens=False).input_ids
    reply = api.completions.create(model=MODEL, prompt=turn, max_tokens=8, temperature=0)
    assert reply.usage.prompt_tokens_details.cached_tokens == len(first) + len(output) - 1
    assert reply.choices[0].text == tokenizer.decode(greedy(turn), skip_special_tokens=True)
