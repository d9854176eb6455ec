"""`dynamic` and `longrope` RoPE in the engine: chosen once for max_model_len (vLLM's rule, `service.rope`), so a
request's logits do not depend on the requests it is batched with, on how its prompt is chunked or on earlier
requests, as they did with transformers' per-call `@dynamic_rope_update` over a whole engine step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from service import rope
from service.engine import Engine, EngineConfig
from service.sampling import SamplingParams
from tests.tiny_models import TINY_ARCHITECTURES, VOCAB_SIZE, tiny_config

TRAINED = 64  # max_position_embeddings (dynamic) and original_max_position_embeddings (longrope) of these models
THETA, FACTOR, HEAD_DIM = 10000.0, 4.0, 16  # (qwen3_moe's tiny head_dim)
LONG_FACTOR = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0]
ROPES = {
    "dynamic": {"rope_type": "dynamic", "rope_theta": THETA, "factor": FACTOR},
    "longrope": {"rope_type": "longrope", "rope_theta": THETA, "short_factor": [1.0] * 8, "long_factor": LONG_FACTOR,
                 "original_max_position_embeddings": TRAINED},
}
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)
SCORE = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)


def _model(kind: str, arch: str = "qwen3_moe"):
    """A tiny model whose (full-attention layers') RoPE is ``kind``, trained for TRAINED positions."""
    config = tiny_config(arch)
    if "full_attention" in config.rope_parameters:  # one RoPE per layer type: scale the full-attention layers'
        config.rope_parameters = {**config.rope_parameters,
                                  "full_attention": {**config.rope_parameters["full_attention"], **ROPES[kind]}}
    else:
        config.rope_parameters = dict(ROPES[kind])
    config.max_position_embeddings = TRAINED
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB_SIZE, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(engine: Engine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict[str, tuple[list, list]]:
    """Add ``requests`` together and step until idle: by id, (tokens, their logprobs), or for a request of prompt
    logprobs, (tokens, its prompt's: of each token after the first)."""
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    results: dict[str, tuple[list, list]] = {}
    while engine.has_work:
        for out in engine.step():
            tokens, logprobs = results.setdefault(out.request_id, ([], []))
            tokens.extend(out.new_token_ids)
            logprobs.extend(lp.logprob for lp in (out.prompt_logprobs or out.logprobs))
    return results


def _expected_inv_freq(kind: str, max_model_len: int) -> torch.Tensor:
    """vLLM's frequencies, computed here from the formulas (not transformers'): longrope's long factors when
    max_model_len exceeds original_max_position_embeddings, dynamic NTK's base for max_position_embeddings x factor
    positions, theta * (factor**2 - factor + 1) ** (dim / (dim - 2)), when max_model_len exceeds it."""
    exponents = torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM
    longer = max_model_len > TRAINED
    if kind == "longrope":
        factors = torch.tensor(LONG_FACTOR if longer else [1.0] * 8, dtype=torch.float64)
        return (1.0 / (factors * THETA ** exponents)).float()
    base = THETA * (FACTOR * FACTOR - FACTOR + 1) ** (HEAD_DIM / (HEAD_DIM - 2)) if longer else THETA
    return (1.0 / base ** exponents).float()


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
@pytest.mark.parametrize("max_model_len", [256, TRAINED])
def test_frequencies_are_vllms_for_max_model_len_and_stay(kind, max_model_len):
    model = _model(kind)
    engine = Engine(model, EngineConfig(max_model_len=max_model_len, max_num_batched_tokens=max_model_len))
    rotary = model.model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, _expected_inv_freq(kind, max_model_len), rtol=1e-6, atol=0)
    _run(engine, [("short", _prompt(10, 1), GREEDY), ("long", _prompt(max_model_len - 9, 2), GREEDY)])
    # a step's longest position no longer moves them (transformers' update would have, past TRAINED)
    torch.testing.assert_close(rotary.inv_freq, _expected_inv_freq(kind, max_model_len), rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch, kind", [("qwen3_moe", "dynamic"), ("qwen3_moe", "longrope"),
                                        ("laguna", "dynamic")])  # Laguna: one RoPE per layer type
def test_a_requests_logits_do_not_depend_on_its_batch_its_chunking_or_earlier_requests(arch, kind):
    short, middle, long_ = _prompt(30, 1), _prompt(100, 3), _prompt(150, 2)  # long: past TRAINED
    alone = Engine(_model(kind, arch), EngineConfig(max_model_len=256, max_num_batched_tokens=512))
    batched = Engine(_model(kind, arch), EngineConfig(max_model_len=256, max_num_batched_tokens=512))
    first = _run(alone, [("short", short, GREEDY)])["short"]
    with_long = _run(batched, [("short", short, GREEDY), ("long", long_, GREEDY)])["short"]
    assert with_long[0] == first[0]
    torch.testing.assert_close(with_long[1], first[1], atol=1e-4, rtol=0)  # (before: 0.65 apart)
    # the same request after a longer one finished (dynamic kept the longer one's scaling) as on its own
    after_long = _run(batched, [("middle", middle, GREEDY)])["middle"]
    on_its_own = _run(Engine(_model(kind, arch), EngineConfig(max_model_len=256)), [("middle", middle, GREEDY)])
    assert after_long[0] == on_its_own["middle"][0]
    torch.testing.assert_close(after_long[1], on_its_own["middle"][1], atol=1e-4, rtol=0)
    # a long prompt prefilled in chunks of 32 (each chunk's own longest position) as in one
    whole = _run(Engine(_model(kind, arch), EngineConfig(max_model_len=256, max_num_batched_tokens=512)),
                 [("p", long_, SCORE)])["p"][1]
    chunked = _run(Engine(_model(kind, arch), EngineConfig(max_model_len=256, max_num_batched_tokens=32)),
                   [("p", long_, SCORE)])["p"][1]
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=0)  # (before: 0.8 apart)
    if kind == "longrope":  # transformers, given the whole prompt past TRAINED, uses the long factors too
        model = _model(kind, arch)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([long_])).logits[0].float()
        reference = torch.log_softmax(logits, -1)[torch.arange(len(long_) - 1), torch.tensor(long_[1:])].tolist()
        torch.testing.assert_close(whole, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", [*TINY_ARCHITECTURES, "llama4_text", "gemma4_text"])
def test_every_supported_rotary_embedding_can_be_frozen_and_static_ones_are_left_alone(arch):
    """Every supported model's rotary embedding runs transformers' per-call update outermost (what `rope.freeze`
    bypasses for dynamic and longrope); with their own static RoPE, freezing changes nothing."""
    config = tiny_config(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(getattr(config, "text_config", None) or config).eval()
    rotaries = [module for module in model.modules() if hasattr(module, "rope_type") and hasattr(module, "config")]
    buffers = {name: buffer for name, buffer in model.named_buffers() if "inv_freq" in name}
    for module in rotaries:
        assert type(module).forward.__code__ is rope._UPDATE_CODE, type(module).__name__
    rope.freeze(model, 10**6)
    assert all("forward" not in module.__dict__ for module in rotaries)
    assert {name: buffer for name, buffer in model.named_buffers() if "inv_freq" in name}.items() == buffers.items()


def test_phi_moes_rotary_embedding_which_computes_its_own_frequencies_is_left_alone():
    """Phi-3.5-MoE's forward recomputes its frequencies from the config every call (the short factors), never reading
    the buffer the per-call update writes: freezing leaves it as transformers has it."""
    config = tiny_config("phimoe")
    config.rope_parameters = {**ROPES["longrope"], "short_mscale": 1.2, "long_mscale": 1.2}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    rotary, inv_freq = model.model.rotary_emb, model.model.rotary_emb.inv_freq
    rope.freeze(model, 10**6)
    assert "forward" not in rotary.__dict__ and rotary.inv_freq is inv_freq
