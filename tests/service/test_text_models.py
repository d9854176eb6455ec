"""The causal LMs of `service.text_models` compute what transformers' vision-language models compute for text."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from service.model import _aligned_weights, load_reference_model
from tests.tiny_models import save_tiny_model


@pytest.mark.parametrize("architecture,causal_lm", [("glm4v_moe", "Glm4vMoeTextForCausalLM"),
                                                    ("qwen3_vl_moe", "Qwen3VLMoeTextForCausalLM"),
                                                    ("gemma4", "Gemma4TextOnlyForCausalLM")])
def test_language_model_alone_equals_the_vision_language_model_on_text(tmp_path, architecture, causal_lm):
    """Loaded text only from a vision-language checkpoint (GLM-4.5V's, Qwen3-VL-MoE's: its experts fused and
    transposed on disk; Gemma 4's: its lm_head tied to the embeddings, its final logits soft-capped), its logits and
    greedy tokens are transformers' own vision-language model's for a prompt without images (multimodal RoPE on text
    positions)."""
    folder = save_tiny_model(architecture, tmp_path / architecture, seed=2)
    text_only = load_reference_model(folder)
    # (its weights in aligned memory, as load_reference_model holds them: see experts.aligned)
    vlm = _aligned_weights(AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)).eval()
    assert type(text_only).__name__ == causal_lm
    ids = torch.randint(3, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = text_only(ids).logits
        # bit for bit with the same experts' implementation (the text-only class runs transformers' eager loop), and
        # within float32 rounding with the VLM's default (grouped_mm sums in another order on some CPUs: an AMD EPYC)
        torch.testing.assert_close(logits, vlm(input_ids=ids).logits, rtol=0, atol=1e-5)
        vlm.config.get_text_config()._experts_implementation = text_only.config._experts_implementation
        assert torch.equal(logits, vlm(input_ids=ids).logits)
    expected = vlm.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(text_only.generate(ids, max_new_tokens=12, do_sample=False), expected)
