"""Causal LMs for the language models of vision-language MoE checkpoints that transformers defines none for.

Owns `Glm4vMoeTextForCausalLM`: GLM-4.5V's text model (`Glm4vMoeTextModel`) and its lm_head, loaded text only
from the vision-language checkpoint (its `model.language_model.*` keys read as `model.*`, as transformers reads
Qwen3.5's; the vision tower's keys skipped), and registered with AutoModelForCausalLM for the vision-language
config and its text config. Its multimodal RoPE runs on text positions, one position for all three sections,
which is what the vision-language model computes for a prompt without images (`get_rope_index`). Ignores images
and videos.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, Glm4vMoeConfig, Glm4vMoeTextConfig
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.core_model_loading import PrefixChange
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoePreTrainedModel, Glm4vMoeTextModel


class Glm4vMoeTextForCausalLM(Glm4vMoePreTrainedModel, GenerationMixin):
    """GLM-4.5V's language model alone: `Glm4vMoeTextModel` and the lm_head of `Glm4vMoeForConditionalGeneration`."""

    config: Glm4vMoeTextConfig
    config_class = Glm4vMoeTextConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _keys_to_ignore_on_load_unexpected = [r"^model\.visual\."]

    def __init__(self, config: Glm4vMoeTextConfig) -> None:
        super().__init__(config)
        self.model = Glm4vMoeTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        return CausalLMOutputWithPast(logits=logits, cache=outputs.cache)


# the checkpoint's language model under `model.language_model`, its experts per expert (as transformers reads GLM-4.5V)
register_checkpoint_conversion_mapping(
    "Glm4vMoeTextForCausalLM",
    [PrefixChange(prefix_to_remove="language_model", model_prefix="model"),
     *get_checkpoint_conversion_mapping("glm4v_moe")], overwrite=True)
AutoModelForCausalLM.register(Glm4vMoeTextConfig, Glm4vMoeTextForCausalLM, exist_ok=True)
# the vision-language config too, as transformers maps Qwen3.5's (its `register` insists on the class's own config;
# `from_pretrained` then builds the class from the text config)
AutoModelForCausalLM._model_mapping.register(Glm4vMoeConfig, Glm4vMoeTextForCausalLM, exist_ok=True)
