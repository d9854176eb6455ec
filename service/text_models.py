"""Causal LMs for the language models of vision-language MoE checkpoints that transformers defines none for.

Owns `Glm4vMoeTextForCausalLM` (GLM-4.5V) and `Qwen3VLMoeTextForCausalLM` (Qwen3-VL's MoE models): each its
vision-language model's text model and lm_head, loaded text only from the vision-language checkpoint (its
`model.language_model.*` keys read as `model.*`, as transformers reads Qwen3.5's, with the experts converted
as transformers converts them for the vision-language model; the vision tower's keys skipped), and registered
with AutoModelForCausalLM for the vision-language config and its text config; and maps `mistral4` to
transformers' own `Mistral4ForCausalLM`, which AutoModelForCausalLM lacks (5.24 maps it for pretraining and
image-text-to-text only); and `Gemma4TextOnlyForCausalLM`, transformers' `Gemma4ForCausalLM` loaded text only from
Gemma 4's vision-language checkpoint (AutoModelForCausalLM maps that config to the vision-language model),
registered for the vision-language config only. Their multimodal RoPE runs on
text positions, one position for every section, which is what the vision-language model computes for a prompt
without images (`get_rope_index`). Ignores images and videos (Qwen3-VL's deepstack features included).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3ForCausalLM,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4TextConfig,
    GenerationMixin,
    Glm4vMoeConfig,
    Glm4vMoeTextConfig,
    Mistral4Config,
    Mistral4ForCausalLM,
    Qwen3VLMoeConfig,
    Qwen3VLMoeTextConfig,
)
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.core_model_loading import PrefixChange
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoePreTrainedModel, Glm4vMoeTextModel
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
    Qwen3VLMoePreTrainedModel,
    Qwen3VLMoeTextModel,
)

from service.checkpoint import KimiK2Config


class _LanguageModelOnly:
    """A vision-language model's text model (``text_model``, at `self.model`) and lm_head (`self.lm_head`, tied to
    the embeddings), the vision tower's keys skipped, and their forward, as transformers' causal LMs."""

    text_model: type[nn.Module]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _keys_to_ignore_on_load_unexpected = [r"^model\.visual\."]

    def __init__(self, config) -> None:
        super().__init__(config)
        self.model = self.text_model(config)
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


class Glm4vMoeTextForCausalLM(_LanguageModelOnly, Glm4vMoePreTrainedModel, GenerationMixin):
    """GLM-4.5V's language model alone: `Glm4vMoeTextModel` and the lm_head of `Glm4vMoeForConditionalGeneration`."""

    config: Glm4vMoeTextConfig
    config_class = Glm4vMoeTextConfig
    text_model = Glm4vMoeTextModel


class Qwen3VLMoeTextForCausalLM(_LanguageModelOnly, Qwen3VLMoePreTrainedModel, GenerationMixin):
    """Qwen3-VL-MoE's language model alone: `Qwen3VLMoeTextModel` and the lm_head of
    `Qwen3VLMoeForConditionalGeneration`."""

    config: Qwen3VLMoeTextConfig
    config_class = Qwen3VLMoeTextConfig
    text_model = Qwen3VLMoeTextModel


class Gemma4TextOnlyForCausalLM(Gemma4ForCausalLM):
    """Gemma 4's language model alone, from its vision-language checkpoint (`Gemma4ForConditionalGeneration`, as the
    releases are saved): transformers' own `Gemma4ForCausalLM` (the text model and the lm_head tied to its
    embeddings, the final logits soft-capped as the vision-language model does), its `model.language_model.*` keys
    read as `model.*`, the vision and audio towers and their embedders skipped. (AutoModelForCausalLM maps the
    vision-language config to `Gemma4ForConditionalGeneration`, whose text model is not at `model`.)"""

    config: Gemma4TextConfig
    config_class = Gemma4TextConfig
    _keys_to_ignore_on_load_unexpected = [r"^model\.(vision_tower|embed_vision|audio_tower|embed_audio)\."]


for _causal_lm, _vlm_config, _model_type in ((Glm4vMoeTextForCausalLM, Glm4vMoeConfig, "glm4v_moe"),
                                              (Qwen3VLMoeTextForCausalLM, Qwen3VLMoeConfig, "qwen3_vl_moe"),
                                              (Gemma4TextOnlyForCausalLM, Gemma4Config, "gemma4")):
    # the checkpoint's language model under `model.language_model`, its experts as transformers converts them
    # (Gemma 4's: no conversion, its experts are stored fused as the model holds them)
    register_checkpoint_conversion_mapping(
        _causal_lm.__name__, [PrefixChange(prefix_to_remove="language_model", model_prefix="model"),
                              *(get_checkpoint_conversion_mapping(_model_type) or ())], overwrite=True)
    if _causal_lm is not Gemma4TextOnlyForCausalLM:  # (a text-only Gemma 4 folder loads as transformers' Gemma4ForCausalLM)
        AutoModelForCausalLM.register(_causal_lm.config_class, _causal_lm, exist_ok=True)
    # the vision-language config too, as transformers maps Qwen3.5's (its `register` insists on the class's own
    # config; `from_pretrained` then builds the class from the text config)
    AutoModelForCausalLM._model_mapping.register(_vlm_config, _causal_lm, exist_ok=True)
AutoModelForCausalLM.register(Mistral4Config, Mistral4ForCausalLM, exist_ok=True)


class KimiK2ForCausalLM(DeepseekV3ForCausalLM):
    """DeepSeek-V3's causal LM for Kimi-K2's config (its checkpoints keep DeepSeek-V3's keys)."""

    config_class = KimiK2Config


AutoModelForCausalLM.register(KimiK2Config, KimiK2ForCausalLM, exist_ok=True)
register_checkpoint_conversion_mapping(KimiK2Config.model_type, get_checkpoint_conversion_mapping("deepseek_v3"),
                                       overwrite=True)
