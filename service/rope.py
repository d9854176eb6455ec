"""RoPE scalings that transformers picks per forward call, made static for the engine.

Owns `freeze`: the engine runs a whole step's tokens (every running sequence's, each prefill chunk) through the
model in one call, and transformers' ``@dynamic_rope_update`` (on every supported model's rotary embedding)
chooses the ``dynamic`` (NTK) and ``longrope`` frequencies from ``torch.max(position_ids)`` of that call, ``dynamic``
keeping a larger scaling in the module across calls. In the engine that made a request's logits depend on the
other requests of its step, on how its prompt was chunked and on earlier requests, and the prefix cache kept keys
rotated under whichever scaling was active. `freeze` chooses the frequencies once, from the engine's
``max_model_len``, as vLLM does, and bypasses the per-call update:

- ``longrope``: the long factors for every position when ``max_model_len`` exceeds the scaling's
  ``original_max_position_embeddings``, the short ones otherwise (vLLM's Phi3LongRoPEScaledRotaryEmbedding);
  the attention factor transformers derives from the scaling's ``factor`` is kept (it does not depend on length).
- ``dynamic``: when ``max_model_len`` exceeds ``max_position_embeddings``, the NTK base for a sequence of
  ``max_position_embeddings`` x ``factor``, the longest the scaling is meant for (vLLM's
  DynamicNTKScalingRotaryEmbedding: ``theta * (factor**2 - factor + 1) ** (dim / (dim - 2))``); otherwise the
  unscaled frequencies (vLLM scales regardless): what transformers uses for every sequence that short, so an engine
  within the trained context gives transformers' outputs exactly.

Other types (default, linear, YaRN, Llama 3, proportional, Hunyuan's ``ntk_alpha``) do not depend on the call and
are left as they are, and so is Phi-3.5-MoE's rotary embedding, which computes its frequencies in its forward
(the short factors, whatever the length): only its mscale follows the call's longest position there, which matters
only where a checkpoint gives ``short_mscale`` and ``long_mscale`` different values (its releases do not).
"""

from __future__ import annotations

import logging
import types

import torch
from transformers import PreTrainedModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

log = logging.getLogger(__name__)

# the code of transformers' per-call update wrapper: a rotary class whose forward runs it is decorated
_UPDATE_CODE = dynamic_rope_update(lambda self, x, position_ids: None).__code__


def freeze(model: PreTrainedModel, max_model_len: int) -> None:
    """Give each rotary embedding of ``model`` with a ``dynamic`` or ``longrope`` scaling the frequencies chosen
    for ``max_model_len`` (see the module docstring) and make its forward skip transformers' per-call update.

    Computed from the config each time, so a model frozen again (another engine) gets the new length's choice.
    Raises ValueError for such a module whose per-call update cannot be bypassed (another decorator around it).
    """
    for module in model.modules():
        kinds = getattr(module, "rope_type", None)
        if kinds is None or not hasattr(module, "config"):
            continue
        per_type = isinstance(kinds, dict)  # one rope type per layer type (Laguna, MiMo-V2-Flash, Gemma 4)
        scaled = {layer_type: kind for layer_type, kind in (kinds.items() if per_type else [(None, kinds)])
                  if isinstance(kind, str) and ("dynamic" in kind or kind == "longrope")}
        if not scaled:
            continue
        forward = type(module).forward
        if getattr(forward, "__code__", None) is not _UPDATE_CODE:
            if any(getattr(f, "__code__", None) is _UPDATE_CODE for f in _wrapped(forward)):
                raise ValueError(f"{type(module).__name__}: its {sorted(set(scaled.values()))} RoPE is updated per "
                                 "call under another decorator, which this engine cannot make static")
            continue  # no per-call update (its forward computes what it uses)
        if "rope_init_fn" in forward.__wrapped__.__code__.co_names:
            continue  # its forward computes its frequencies itself, ignoring the update's (Phi-3.5-MoE's)
        for layer_type, kind in scaled.items():
            prefix = f"{layer_type}_" if layer_type is not None else ""
            inv_freq, choice = _static_inv_freq(module, kind, layer_type, max_model_len)
            current = getattr(module, f"{prefix}inv_freq")
            # a new buffer: the update may have made the current one the module's original_inv_freq itself
            module.register_buffer(f"{prefix}inv_freq", inv_freq.to(current.device, current.dtype), persistent=False)
            log.info("%s%s: %s RoPE frozen for max_model_len %d: %s", type(module).__name__,
                     f" ({layer_type})" if layer_type else "", kind, max_model_len, choice)
        module.forward = types.MethodType(forward.__wrapped__, module)


def _static_inv_freq(module: torch.nn.Module, kind: str, layer_type: str | None,
                     max_model_len: int) -> tuple[torch.Tensor, str]:
    """The inverse frequencies of one rope type of ``module`` for ``max_model_len``, and the choice in words."""
    config = module.config
    params = config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters
    init = ROPE_INIT_FUNCTIONS[kind]
    device = getattr(module, f"{layer_type}_inv_freq" if layer_type else "inv_freq").device
    if kind == "longrope":
        original = params["original_max_position_embeddings"]
        long = max_model_len > original
        inv_freq, _ = init(config, device, seq_len=original + 1 if long else None, layer_type=layer_type)
        return inv_freq, (f"long factors (beyond original_max_position_embeddings {original})" if long
                          else f"short factors (within original_max_position_embeddings {original})")
    trained = getattr(module, "original_max_seq_len", config.max_position_embeddings)
    if max_model_len <= trained:
        inv_freq, _ = init(config, device, seq_len=None, layer_type=layer_type)  # transformers': unscaled up to it
        return inv_freq, f"unscaled (within max_position_embeddings {trained})"
    longest = trained * params["factor"]
    inv_freq, _ = init(config, device, seq_len=longest, layer_type=layer_type)
    return inv_freq, f"NTK-scaled for {longest:g} positions (max_position_embeddings x factor)"


def _wrapped(function) -> list:
    """The functions ``function`` wraps (``functools.wraps``' ``__wrapped__`` chain), outermost first."""
    chain = []
    while (function := getattr(function, "__wrapped__", None)) is not None:
        chain.append(function)
    return chain
