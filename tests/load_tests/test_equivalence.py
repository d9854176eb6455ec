"""The equivalence benchmark's pure parts (load_tests/equivalence.py); the benchmark itself needs Ray Serve."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from deploy.app import DEFAULT_MODEL
from load_tests.equivalence import EquivalenceConfig, differences, prompt_ids, reference_logprobs
from service.model import load_reference_model


def test_differences_over_every_token():
    result = differences([[-1.0, -2.0], [-0.5]], [[-1.0, -2.5], [-0.4]])
    assert result["tokens"] == 3 and result["max_abs_logprob_diff"] == pytest.approx(0.5)
    assert result["mean_abs_logprob_diff"] == pytest.approx(0.2)
    assert differences([[-1.0]], [[-1.0]])["max_abs_logprob_diff"] == 0.0
    with pytest.raises(ValueError, match="different tokens"):
        differences([[-1.0]], [[-1.0, -2.0]])


def test_prompts_and_reference_scores_cover_every_token_after_the_first():
    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    prompts = prompt_ids(EquivalenceConfig(prompts_per_workload=1, max_prompt_tokens=12), tokenizer)
    assert len(prompts) == 3 and all(1 < len(p) <= 12 for p in prompts)
    scores = reference_logprobs(load_reference_model(str(DEFAULT_MODEL)), prompts[:1])
    assert len(scores[0]) == len(prompts[0]) - 1 and all(s <= 0 for s in scores[0])
    with torch.inference_mode():  # the same numbers as scoring the whole prompt at once
        model = load_reference_model(str(DEFAULT_MODEL))
        whole = torch.log_softmax(model(torch.tensor([prompts[0]])).logits[0].double(), -1)
    assert scores[0][0] == pytest.approx(float(whole[0, prompts[0][1]]))
