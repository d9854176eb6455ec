"""SamplingParams validation and next-token sampling (service/sampling.py)."""

from __future__ import annotations

import pytest
import torch

from service.sampling import (
    MAX_LOGPROBS,
    SAMPLING_EPS,
    History,
    SamplingParams,
    TokenLogprobs,
    _nucleus,
    sample,
    token_logprobs,
)


@pytest.mark.parametrize("kwargs, bad", [
    ({"max_tokens": -1}, "-1"), ({"max_tokens": 2.5}, "2.5"), ({"temperature": -0.1}, "-0.1"),
    ({"top_p": 0.0}, "0.0"), ({"top_p": 1.5}, "1.5"), ({"seed": -2**63 - 1}, str(-2**63 - 1)), ({"seed": 2**63}, str(2**63)),
    ({"stop": ["a", "b", "c", "d", "e"]}, "5"), ({"stop": [""]}, "''"), ({"stop_token_ids": [-3]}, "-3"),
    ({"logprobs": -1}, "-1"), ({"logprobs": MAX_LOGPROBS + 1}, str(MAX_LOGPROBS + 1)), ({"logprobs": True}, "True"),
    ({"reasoning_tokens": (5, 5)}, "two different"), ({"reasoning_tokens": (5, 6), "reasoning_gap": (6,)}, "reasoning_gap"),
    ({"reasoning_gap": (-2,)}, "-2"),
])
def test_bad_params_raise_value_error_naming_the_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        SamplingParams(**kwargs)


def test_params_are_frozen_and_lists_become_tuples():
    params = SamplingParams(stop=["x"], stop_token_ids=[5])
    assert params.stop == ("x",) and params.stop_token_ids == (5,)
    with pytest.raises(AttributeError):
        params.max_tokens = 3


def test_greedy_is_exact_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, [greedy] * 6, [None] * 6) == logits.argmax(-1).tolist()


def _draws(params: SamplingParams, logits: torch.Tensor, n: int) -> list[int]:
    gen = params.make_generator()
    return [sample(logits[None], [params], [gen])[0] for _ in range(n)]


def test_same_seed_reproduces_and_different_seeds_differ():
    logits = torch.zeros(1000)
    a = _draws(SamplingParams(seed=7), logits, 20)
    assert a == _draws(SamplingParams(seed=7), logits, 20)
    assert a != _draws(SamplingParams(seed=8), logits, 20)


def test_every_bit_of_a_64_bit_seed_counts():
    """torch's CPU generator keeps a seed's low 32 bits: s and s + 2**32, -1 and 2**32 - 1, 0 and -2**63 drew the same
    completion (a review). Seeds in [0, 2**32) draw as they did."""
    logits = torch.zeros(1000)
    for a, b in [(1, 2**32 + 1), (12345, 7 * 2**32 + 12345), (-1, 2**32 - 1), (0, -2**63), (2**63 - 1, -1)]:
        assert _draws(SamplingParams(seed=a), logits, 20) != _draws(SamplingParams(seed=b), logits, 20), (a, b)
    for seed in (0, 7, 2**32 - 1):
        params = SamplingParams(seed=seed)
        assert _draws(params, logits, 20) == _draws_with(torch.Generator().manual_seed(seed), params, logits, 20)


def _draws_with(gen: torch.Generator, params: SamplingParams, logits: torch.Tensor, n: int) -> list[int]:
    return [sample(logits[None], [params], [gen])[0] for _ in range(n)]


def test_sampling_follows_the_softmax():
    logits = torch.log(torch.tensor([0.75, 0.25]))
    draws = _draws(SamplingParams(seed=0), logits, 4000)
    assert abs(draws.count(0) / 4000 - 0.75) < 0.03


def test_temperature_sharpens():
    logits = torch.log(torch.tensor([0.6, 0.4]))
    draws = _draws(SamplingParams(temperature=0.1, seed=0), logits, 500)
    assert draws.count(0) > 480  # p = 0.6^10 / (0.6^10 + 0.4^10) = 0.983


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert set(_draws(SamplingParams(top_p=0.7, seed=0), logits, 400)) == {0, 1}
    assert set(_draws(SamplingParams(top_p=0.01, seed=0), logits, 50)) == {0}


def test_mixed_batch_samples_each_row_with_its_own_params():
    logits = torch.stack([torch.tensor([0.0, 5.0, 0.0]), torch.zeros(3)])
    params = [SamplingParams(temperature=0.0), SamplingParams(seed=1)]
    tokens = sample(logits, params, [p.make_generator() for p in params])
    assert tokens[0] == 1 and 0 <= tokens[1] < 3


def test_token_logprobs_are_the_raw_log_softmax_with_the_top_tokens_in_order():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    logits[2, 7] = float("-inf")  # a token the model rules out
    entries = token_logprobs(logits, [5, 0, 7], [3, 0, MAX_LOGPROBS])
    reference = torch.log_softmax(logits.double(), dim=-1)
    for row, (entry, token, k) in enumerate(zip(entries, [5, 0, 7], [3, 0, MAX_LOGPROBS])):
        assert isinstance(entry, TokenLogprobs) and entry.token_id == token
        assert entry.logprob == pytest.approx(float(reference[row, token]), abs=1e-5)
        assert [t for t, _ in entry.top] == reference[row].topk(k).indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(reference[row].topk(k).values.tolist(), abs=1e-5)
    assert entries[1].top == () and entries[2].logprob == float("-inf")


def test_logit_bias_bans_and_forces_tokens():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(3))
    best = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0.0, logit_bias={best[0]: -100}),
              SamplingParams(temperature=0.0, logit_bias=((17, 100.0),))]
    banned, forced = sample(logits, params, [None, None])
    assert banned == logits[0].topk(2).indices[1] and forced == 17
    seeded = SamplingParams(temperature=1.0, seed=0, logit_bias={4: 100})
    assert sample(logits[:1], [seeded], [seeded.make_generator()]) == [4]


def test_penalties_subtract_per_occurrence_and_per_presence():
    logits = torch.zeros(1, 8)
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    completion = [3, 3, 5]
    # token 3: 2 x 0.25 + 0.5 = 1.0 lower; token 5: 0.25 + 0.5 = 0.75 lower; greedy takes an unseen token
    assert sample(logits, [params], [None], [History(completion, 0)]) == [0]
    negative = SamplingParams(temperature=0.0, frequency_penalty=-1.0)  # a negative penalty favours repeats
    assert sample(logits, [negative], [None], [History(completion, 0)]) == [3]
    # the prompt's tokens are not penalised, only the completion's
    assert sample(logits, [negative], [None], [History([3, 3, 5, 6], 3)]) == [6]
    assert sample(logits, [params], [None], [History([], 0)]) == [0]  # nothing generated yet: nothing to penalise


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.2]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    # token 0 (seen in the prompt) drops to 1.0 below token 1; a seen negative token gets more negative
    assert sample(logits, [params], [None], [History([0], 1)]) == [1]
    given = logits.clone()
    biased = SamplingParams(temperature=0.0, repetition_penalty=2.0, logit_bias={3: 10.0})
    # bias first (-1.2 + 10 = 8.8), then the penalty divides it (4.4): still above token 0's 2.0
    assert sample(given, [biased], [None], [History([2, 3], 2)]) == [3]
    assert torch.equal(given, logits)  # the caller's logits are left alone


def test_min_tokens_bans_the_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 5.0, 1.0]])  # token 1 is EOS and the most likely
    params = SamplingParams(temperature=0.0, min_tokens=2, max_tokens=4)
    assert sample(logits, [params], [None], [History([7, 2], 1, stop_ids=(1,))]) == [2]  # 1 generated < 2
    assert sample(logits, [params], [None], [History([7, 2, 2], 1, stop_ids=(1,))]) == [1]  # 2 generated


def test_top_k_and_min_p_cut_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda **kw: {sample(logits, [p := SamplingParams(temperature=1.0, seed=s, **kw)],  # noqa: E731
                                 [p.make_generator()])[0] for s in range(200)}
    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=2) == {0, 1} and draws(top_k=-1) == {0, 1, 2, 3}
    assert draws(min_p=0.5) == {0, 1}  # 0.15 and 0.05 are under half of 0.5


@pytest.mark.parametrize("kwargs, bad", [
    ({"presence_penalty": 2.5}, "2.5"), ({"frequency_penalty": float("nan")}, "nan"),
    ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"), ({"logit_bias": {-1: 1.0}}, "-1"), ({"logit_bias": {1: 101}}, "101"), ({"logit_bias": {i: 1 for i in range(301)}}, "301"),
])
def test_bad_penalties_and_bias_raise_value_error(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [9e-6, 1e-30, 1e-39, 5e-324])
def test_a_temperature_below_sampling_eps_is_greedy_seed_or_not(temperature):
    # dividing by 1e-39 overflowed the logits to inf and the draw raised (failing every request of the step)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    for seed in (None, 0, 1):
        params = SamplingParams(temperature=temperature, seed=seed)
        assert params.greedy and params.make_generator() is None
        assert sample(logits, [params] * 4, [None] * 4) == logits.argmax(-1).tolist()
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy  # vLLM's bound: from it on, the row is sampled


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 2}, {"top_p": 0.5}, {"min_p": 0.9}, {"top_k": 2, "top_p": 0.3, "min_p": 0.5}])
@pytest.mark.parametrize("temperature", [SAMPLING_EPS, 1.0, 100.0])
def test_a_draw_never_fails_and_never_takes_an_impossible_token(temperature, kwargs):
    big, inf, nan = torch.finfo(torch.float32).max, float("inf"), float("nan")
    rows = {  # the row, the tokens it may give
        "huge": ([big, -big, 0.0, big / 2], {0}),  # big / 1e-5 overflowed to inf: NaN probabilities
        "infinite": ([1.0, inf, -inf, inf], {1, 3}),  # equally likely, whatever the temperature
        "nan": ([nan, 2.0, -inf, 1.0], {1, 3}),
        "nothing": ([-inf, -inf, -inf, -inf], {0}),  # nothing to draw: the argmax, as greedy
    }
    for name, (row, allowed) in rows.items():
        params = SamplingParams(temperature=temperature, seed=3, **kwargs)
        gen = params.make_generator()
        draws = {sample(torch.tensor([row]), [params], [gen])[0] for _ in range(40)}
        assert draws <= allowed, name
    batch = torch.tensor([[big, -big, 0.0], [0.0, 1.0, 2.0]])
    params = [SamplingParams(temperature=temperature, seed=4, **kwargs)] * 2
    assert len(sample(batch, params, [p.make_generator() for p in params])) == 2


def test_a_tiny_repetition_penalty_keeps_the_logits_finite_and_ruled_out_tokens_out():
    # 1e-300 is 0 in float32: a seen positive logit became inf (the draw raised) and a seen ruled-out one (-inf, as a
    # structured output forbids it) NaN, which greedy's argmax took
    logits = torch.tensor([[float("-inf"), 1.0, 0.5, 2.0]])
    history = History([0, 1], 2)
    for penalty in (1e-300, 5e-324, 1e-40):
        greedy = SamplingParams(temperature=0.0, repetition_penalty=penalty)
        assert sample(logits, [greedy], [None], [history]) == [1]  # 1 / penalty: the largest
        sampled = SamplingParams(temperature=1.0, seed=0, repetition_penalty=penalty)
        gen = sampled.make_generator()
        assert {sample(logits, [sampled], [gen], [history])[0] for _ in range(20)} == {1}


def test_top_p_judges_the_mass_min_p_kept():
    # min-p keeps 0.4, 0.3 and 0.2 (of 0.9): renormalised, 0.444 + 0.333 reach top-p's 0.75 and 0.2 is cut; judged
    # on the mass before min-p (0.4 + 0.3 < 0.75) it was drawn 22% of the time
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]]))
    params = SamplingParams(temperature=1.0, seed=0, min_p=0.45, top_p=0.75)
    gen = params.make_generator()
    assert {sample(logits, [params], [gen])[0] for _ in range(300)} == {0, 1}


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])  # a flat row's nucleus reaches past the partial sort's candidates
@pytest.mark.parametrize("top_p", [1e-9, 0.3, 0.9, 0.999])
def test_the_nucleus_is_the_full_sorts(scale, top_p):
    generator = torch.Generator().manual_seed(5)
    for kwargs in ({}, {"top_k": 40}, {"min_p": 0.01}):
        logits = torch.randn(5000, generator=generator) * scale
        params = SamplingParams(temperature=1.0, top_p=top_p, **kwargs)
        probs = torch.softmax(logits, -1)
        if params.top_k:
            probs = torch.softmax(logits.masked_fill(logits < logits.topk(params.top_k).values[-1], float("-inf")), -1)
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
        sorted_probs, order = probs.sort(descending=True)
        expected = order[(sorted_probs.cumsum(0) - sorted_probs < top_p) & (sorted_probs > 0)]
        kept = _nucleus(probs, top_p).nonzero().squeeze(1)
        assert sorted(kept.tolist()) == sorted(expected.tolist())
