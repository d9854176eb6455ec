"""The causal LMs of `service.text_models` compute what transformers' vision-language models compute for text."""

from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText

from service.model import load_reference_model
from tests.tiny_models import save_tiny_model


def test_glm4v_moe_language_model_alone_equals_the_vision_language_model_on_text(tmp_path):
    """Loaded text only from GLM-4.5V's checkpoint, its logits and greedy tokens are transformers' own
    Glm4vMoeForConditionalGeneration's for a prompt without images (multimodal RoPE on text positions)."""
    folder = save_tiny_model("glm4v_moe", tmp_path / "glm4v_moe", seed=2)
    text_only = load_reference_model(folder)
    vlm = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    assert type(text_only).__name__ == "Glm4vMoeTextForCausalLM"
    ids = torch.randint(3, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(text_only(ids).logits, vlm(input_ids=ids).logits)
    expected = vlm.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(text_only.generate(ids, max_new_tokens=12, do_sample=False), expected)
