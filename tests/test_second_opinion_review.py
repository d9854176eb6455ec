"""Second opinion on 50c94a6..13be3b5: the reasoning's log-probability entries left out (include_reasoning false),
vibe's extra searches under a slot budget, and plan's guard against predicted times that overflow."""

from __future__ import annotations

import numpy as np
import pytest

import placement.vibe as vibe
from placement.device_model import DeviceModel
from placement.metrics import makespan
from placement.policies import plan
from service.app import _ChatFormat, _Choice, _Reasoning
from service.engine import StepOutput
from service.sampling import TokenLogprobs
from service.text import TokenPieces
from tests.service.test_app import MODEL
from tests.service.test_text import build_tokenizer


@pytest.mark.parametrize("in_block", [False, True])
@pytest.mark.parametrize("held", ["H", "\n"])
def test_an_answer_token_whose_text_was_held_back_keeps_its_log_probability(in_block, held):
    """The engine sends a token's text later while it could be a stop string or is half a character: the answer's
    first token after ``</think>`` came with text '' and, the parser still 'before the answer', its entry was left
    out with the reasoning's (content "Hello world." with entries for "ello world." only), streamed or not."""
    tokenizer = build_tokenizer()
    text = ("" if in_block else "<think>") + "\nSECRET PLAN\n</think>\n\nHello world."
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode(ids[:k + 1]) for k in range(len(ids))]
    pieces = [b[len(a):] for a, b in zip(["", *pieces], pieces)]
    # the token held: the answer's first ("H", its text sent with the next token's) or the whitespace before it
    # (the second "\n" after the block, sent with "H": then the answer's first output brings both)
    k = pieces.index("H") - (held == "\n")
    pieces[k + 1], pieces[k] = pieces[k] + pieces[k + 1], ""
    outs = [StepOutput("r", (t,), piece, k == len(ids) - 1, "stop" if k == len(ids) - 1 else None, 5, k + 1,
                       logprobs=(TokenLogprobs(t, -0.5),)) for k, (t, piece) in enumerate(zip(ids, pieces))]

    def fmt():
        return _ChatFormat(MODEL, TokenPieces(tokenizer), reasoning=_Reasoning(in_block, False))

    choice = fmt().response([_Choice(outs)]).choices[0]
    streaming = fmt()
    streamed = [entry.token for out in outs for chunk in streaming.chunks(0, out) for c in chunk.choices
                if c.logprobs is not None for entry in c.logprobs.content]
    kept = [entry.token for entry in choice.logprobs.content]
    assert choice.message.content == "Hello world." and choice.message.reasoning is None
    assert streamed == kept
    assert "".join(kept).lstrip("\n") == "Hello world.", kept  # (the held "\n" comes with the answer's text)


@pytest.mark.parametrize("pieces", [["<think>", "plan", "<|tool_calls_section_begin|>", "X", "Y"],
                                    ["<think>", "plan", "</think>Hello", " world"]])
def test_the_token_that_ends_the_block_and_begins_the_answer_keeps_its_log_probability(pieces):
    """An output that ends the reasoning and stays in the content (Kimi-K2's call section's opening tag, an implicit
    end) or brings the answer's first text with ``</think>`` was left out with the reasoning's entries: content of
    three outputs with two entries. Streamed or not."""
    from service.reasoning import IMPLICIT_ENDS
    tokenizer = build_tokenizer()
    last = len(pieces) - 1
    outs = [StepOutput("r", (k,), p, k == last, "stop" if k == last else None, 5, k + 1,
                       logprobs=(TokenLogprobs(k, -0.5),)) for k, p in enumerate(pieces)]

    def fmt():
        return _ChatFormat(MODEL, TokenPieces(tokenizer), reasoning=_Reasoning(False, False, IMPLICIT_ENDS["kimi_k2"]))

    choice = fmt().response([_Choice(outs)]).choices[0]
    streaming = fmt()
    streamed = [entry.token_id if hasattr(entry, "token_id") else entry.token for out in outs
                for chunk in streaming.chunks(0, out) for c in chunk.choices if c.logprobs is not None
                for entry in c.logprobs.content]
    kept = [entry.token_id if hasattr(entry, "token_id") else entry.token for entry in choice.logprobs.content]
    assert len(kept) == len(pieces) - 2, kept  # every output but <think> and the plan
    assert streamed == kept


def _count_greedy_searches(monkeypatch) -> list[int]:
    calls = []
    original = vibe.greedy_search

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(vibe, "greedy_search", counted)
    return calls


def test_a_budget_of_exactly_equal_counts_is_not_searched_twice(monkeypatch):
    """Under a slot budget vibe also searches the plan of equal counts (a second greedy search, twice the planning
    time). A budget of exactly (E + R) / G slots on every device allows no other plan, so that search found the
    plan already made: DeepSeek-V3 on 64 devices, 64 redundant slots, slot_budget 5 took 1.1 s of CPU for the
    0.6 s plan. A budget with room for uneven counts still compares both."""
    rng = np.random.default_rng(3)
    devices = [DeviceModel(float(rng.uniform(0.5, 2.0)), 16.0, float(rng.uniform(0.001, 0.02))) for _ in range(4)]
    loads = rng.exponential(100.0, (3, 8))
    calls = _count_greedy_searches(monkeypatch)
    exact = plan(loads, devices, "vibe", num_redundant=4, slot_budget=3)
    assert len(calls) == 1
    free = plan(loads, devices, "vibe", num_redundant=4)
    assert np.allclose(makespan(exact, loads, devices), makespan(free, loads, devices))
    calls.clear()
    plan(loads, devices, "vibe", num_redundant=4, slot_budget=4)
    assert len(calls) == 2


@pytest.mark.parametrize("case", ["fixed cost per slot", "activity", "activity with replicas"])
def test_predicted_times_that_overflow_are_refused_with_one_clear_error(case):
    """The guard timed one slot holding a layer's tokens; a device's time sums its slots' fixed costs, and with
    activity a slot's curve is read at load / activity tokens per call: both overflowed past it (a DeviceModel
    error from inside the search, or the misleading slot_budget error the guard was meant to replace)."""
    if case == "fixed cost per slot":
        devices, loads, kwargs = [DeviceModel(1e308, 1.0, 0.0)] * 2, np.ones((1, 8)), {}
    else:
        devices, loads = [DeviceModel(1.0, 1.0, 1e3)] * 2, np.full((1, 4), 1e3)
        kwargs = {"activity": np.full((1, 4), 1e-308), "num_redundant": 2 if case.endswith("replicas") else 0}
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="make predicted times overflow"):
        plan(loads, devices, "vibe", **kwargs)


@pytest.mark.parametrize("key, value", [("version", 2**63), ("version", 1e20), ("phy2log", [[0, 2**63, 2]])])
def test_placement_records_with_whole_numbers_past_int64_are_refused(key, value):
    """`Placement.from_dict` refuses numbers that are not whole; whole ones past int64 were cast with wrap-around:
    a version 2**63 or 1e20 read back as -2**63 (an older plan than any), silently."""
    from placement.placement import Placement

    record = Placement.from_expert_devices(np.array([[0, 1, 1]]), 2, version=7).to_dict()
    with pytest.raises(ValueError, match=f"placement {key} must hold whole numbers"):
        Placement.from_dict({**record, key: value})
