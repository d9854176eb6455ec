"""The continuous-batching engine with its model on CUDA: the CPU engine tests' scenarios (paged KV blocks shared
by reference count and copied on write, preemption, prefix caching, every attention path: latent, sliding with
sinks, DSA, chunked, KV-shared layers, linear attention and Mamba2 states) run again with the tiny models on the
GPU, and each answer equals transformers' own greedy `generate` on the same GPU model. The scenarios are
`tests/service/test_engine.py`'s and `test_engine_more_architectures.py`'s own functions, called here with
`build_tiny_model` returning the model on CUDA. Skipped, building nothing, without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from service.engine import Engine, EngineConfig
from tests.service import test_engine as engine_tests
from tests.service import test_engine_more_architectures as more_tests
from tests.service import test_rope_scaling as rope_tests
from tests.tiny_models import build_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# One architecture per attention path the engine implements (see the CPU modules' parameter comments).
ATTENTION_PATHS = ("qwen3_moe", "deepseek_v3", "gpt_oss", "deepseek_v32", "glm_moe_dsa", "mistral4", "gemma4", "llama4",
                   "qwen3_next", "nemotron_h", "kimi_linear", "minimax")
LINEAR = ("qwen3_next", "nemotron_h", "granitemoehybrid", "kimi_linear", "minimax")


def build_on_cuda(architecture: str, seed: int = 0) -> torch.nn.Module:
    return build_tiny_model(architecture, seed).to("cuda")


class _CudaModels(dict):
    """The reference models by architecture, built on CUDA when first asked for."""

    def __missing__(self, architecture: str) -> torch.nn.Module:
        self[architecture] = build_on_cuda(architecture)
        return self[architecture]


@pytest.fixture(autouse=True)
def models_on_cuda(monkeypatch):
    for module in (engine_tests, more_tests):
        monkeypatch.setattr(module, "build_tiny_model", build_on_cuda)


@pytest.fixture(scope="module")
def reference_models():
    return _CudaModels()


def test_the_engine_runs_on_the_models_device():
    engine = engine_tests._engine("qwen3_moe")
    assert engine._cache.keys[0].device.type == "cuda"
    tokens, _ = engine_tests._run(engine, {0: [("r", engine_tests._prompt(9, 1), engine_tests.GREEDY)]})
    assert len(tokens["r"]) == engine_tests.GREEDY.max_tokens


@pytest.mark.parametrize("arch", ATTENTION_PATHS)
def test_single_greedy_requests_equal_generate(arch, reference_models):
    engine_tests.test_single_greedy_requests_equal_generate(arch, reference_models)


@pytest.mark.parametrize("arch", ATTENTION_PATHS)
def test_staggered_concurrent_requests_equal_generate(arch):
    more_tests.test_staggered_concurrent_requests_equal_generate(arch)


@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt_oss", "deepseek_v32", "qwen3_next", "gemma4"])
def test_preempted_sequences_resume_with_the_tokens_of_generate(arch):
    more_tests.test_preempted_sequences_resume_with_the_tokens_of_generate(arch)


def test_a_full_cache_preempts_the_newest_sequence_which_resumes_with_the_same_tokens(reference_models):
    engine_tests.test_a_full_cache_preempts_the_newest_sequence_which_resumes_with_the_same_tokens(reference_models)


def test_paged_kv_cache_runs_more_sequences_than_it_has_max_model_len_slots_for(reference_models):
    engine_tests.test_paged_kv_cache_runs_more_sequences_than_it_has_max_model_len_slots_for(reference_models)


def test_requests_sharing_a_system_prompt_hold_its_blocks_once(reference_models):
    engine_tests.test_requests_sharing_a_system_prompt_hold_its_blocks_once(reference_models)


def test_shared_blocks_under_memory_pressure_keep_every_answer_equal_to_generate(reference_models):
    engine_tests.test_shared_blocks_under_memory_pressure_keep_every_answer_equal_to_generate(reference_models)


def test_a_cached_prefix_gives_up_its_last_blocks_first(reference_models):
    engine_tests.test_a_cached_prefix_gives_up_its_last_blocks_first(reference_models)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "deepseek_v32", "glm_moe_dsa"])
def test_a_running_requests_prefix_is_shared_and_an_identical_prompt_still_prefills_its_last_token(arch, reference_models):
    engine_tests.test_a_running_requests_prefix_is_shared_and_an_identical_prompt_still_prefills_its_last_token(
        arch, reference_models)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_a_next_turn_prefills_only_what_the_cache_does_not_hold_and_equals_generate(arch, reference_models):
    engine_tests.test_a_next_turn_prefills_only_what_the_cache_does_not_hold_and_equals_generate(arch, reference_models)


@pytest.mark.parametrize("arch", LINEAR)
def test_linear_attention_states_follow_forks_and_whole_cached_sequences_are_reused(arch):
    more_tests.test_linear_attention_states_follow_forks_and_whole_cached_sequences_are_reused(arch)


def test_seeded_sampling_gives_the_same_tokens_whatever_the_batch():
    engine_tests.test_seed_reproducible_whatever_the_batch()


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_frozen_rope_on_cuda_is_vllms_and_a_requests_logits_do_not_depend_on_its_batch(kind):
    """`service.rope.freeze` on a model already on CUDA: the static frequencies are registered on the GPU (the
    module's device, not the CPU), equal vLLM's formulas, and a short request's logits are the same alone as
    batched with a request past the trained context (0.65 apart in log-probability with the per-call update)."""
    short, long_ = rope_tests._prompt(30, 1), rope_tests._prompt(150, 2)
    alone_model = rope_tests._model(kind).to("cuda")
    alone = Engine(alone_model, EngineConfig(max_model_len=256, max_num_batched_tokens=512))
    inv_freq = alone_model.model.rotary_emb.inv_freq
    assert inv_freq.device.type == "cuda"
    torch.testing.assert_close(inv_freq.cpu(), rope_tests._expected_inv_freq(kind, 256), rtol=1e-6, atol=0)
    batched_model = rope_tests._model(kind).to("cuda")
    batched = Engine(batched_model, EngineConfig(max_model_len=256, max_num_batched_tokens=512))
    first = rope_tests._run(alone, [("short", short, rope_tests.GREEDY)])["short"]
    with_long = rope_tests._run(batched, [("short", short, rope_tests.GREEDY), ("long", long_, rope_tests.GREEDY)])
    assert with_long["short"][0] == first[0]
    torch.testing.assert_close(with_long["short"][1], first[1], atol=1e-3, rtol=0)
    torch.testing.assert_close(batched_model.model.rotary_emb.inv_freq.cpu(),
                               rope_tests._expected_inv_freq(kind, 256), rtol=1e-6, atol=0)  # (its steps went past
    # the trained context: they did not move them)
