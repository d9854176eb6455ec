"""Llama 4 through the whole stack: a tiny random Llama 4 (a vision-language checkpoint, as Scout and Maverick are
released, whose language model interleaves dense and top-1 MoE layers with the expert's input scaled by its router
score, chunked attention with 8-position chunks and a NoPE layer with temperature tuning) served by `build_app` on
Ray Serve with emulated expert workers. Over HTTP with the official `openai` client: greedy answers (prompts of
several chunks) equal the single-process language model's before and after a live re-placement that moved experts
between workers, and the choices of one request (`n`, sharing its prefill) are each that answer.
"""

from __future__ import annotations

import pytest

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

MODEL = "tiny-llama4"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A Llama 4 vision-language checkpoint with a chat tokenizer, as a model folder of a configured root."""
    return vlm_chat_folder(tmp_path_factory.mktemp("models"), MODEL, "llama4")


@pytest.fixture(scope="module")
def openai_client(folder):
    with served(folder, "llama4") as url:
        yield client(url), url


def test_llama4_answers_as_the_single_process_model_before_and_after_a_re_placement(openai_client, folder):
    from service.model import load_reference_model

    api, url = openai_client
    assert type(load_reference_model(folder)).__name__ == "Llama4ForCausalLM"  # the checkpoint's language model
    expected = expected_answers(folder)
    assert [answers(api, MODEL, p)[0] for p in PROMPTS] == expected
    assert answers(api, MODEL, PROMPTS[0], n=3) == [expected[0]] * 3  # one prefill, its keys and values copied
    re_place(url, num_moe_layers=2)
    assert [answers(api, MODEL, p)[0] for p in PROMPTS] == expected
