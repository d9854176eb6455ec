"""The prefix-caching benchmark (load_tests/prefix_cache.py): its conversations and one small run on the engine."""

from __future__ import annotations

import asyncio
import json

from load_tests.prefix_cache import (
    Conversation,
    Served,
    conversations,
    main,
    play,
    short_follow_ups,
    summarise,
    with_follow_ups,
)
from load_tests.workloads import load_workload


def test_multi_turn_conversations_keep_every_user_turn_and_single_turns_the_last():
    prompts = load_workload("sharegpt_like")
    multi = conversations(prompts, multi_turn=True, max_tokens=16)
    assert multi and all(len(c.users) >= 2 and c.max_tokens <= 16 for c in multi)
    assert [c.index for c in multi] == list(range(len(multi)))
    single = conversations(load_workload("code"), multi_turn=False, max_tokens=64)
    assert len(single) == 160 and all(len(c.users) == 1 and c.system for c in single)
    follow_ups = short_follow_ups(prompts)
    assert follow_ups and all(len(f) <= 80 for f in follow_ups)
    long = with_follow_ups(load_workload("sonnet_like"), follow_ups, turns=3, max_tokens=32)
    assert len(long) == 120 and all(len(c.users) == 3 for c in long)
    assert long[0].users[1:] == tuple(follow_ups[:2]) and long[1].users[1:] == tuple(follow_ups[2:4])


def test_summary_counts_prefilled_and_cached_tokens_and_later_turns_apart():
    served = [Served(0, 1, 0.10, 0.5, 100, 0, "a"), Served(0, 2, 0.02, 0.4, 150, 120, "b"),
              Served(1, 1, 0.30, 0.6, 80, 3, "c")]
    summary = summarise(served, 2.0)
    assert (summary["prompt_tokens"], summary["cached_tokens"], summary["prefilled_tokens"]) == (330, 123, 207)
    assert summary["ttft_p50_ms_first_turns"] == 200.0 and summary["ttft_p50_ms_later_turns"] == 20.0


def test_conversations_are_played_whole_or_taking_turns():
    """A client plays a conversation to its end, or (interleave) one turn of each in line before the next turns;
    each turn's prompt is the history with the answers, and a turn that would not fit ends its conversation."""
    items = [Conversation(0, "sys", ("a", "b", "c"), 2), Conversation(1, None, ("d", "e"), 2),
             Conversation(2, None, ("f", "g" * 50), 2)]
    sent = []

    async def send(request_id, messages, max_tokens):
        sent.append((request_id, [m["content"] for m in messages]))
        return 0.0, 0.0, len(messages), 0, f"answer-{request_id}"

    count = lambda messages: sum(len(m["content"]) for m in messages)  # noqa: E731
    asyncio.run(play(send, items, 1, "t", 7, 60, count))
    assert [r for r, _ in sent] == ["t-0-1", "t-0-2", "t-0-3", "t-1-1", "t-1-2", "t-2-1"]
    assert sent[1][1] == ["(session 7) sys", "a", "answer-t-0-1", "b"] and sent[3][1] == ["(session 7) d"]
    sent.clear()
    served = asyncio.run(play(send, items, 1, "t", 7, 60, count, interleave=True))
    assert [r for r, _ in sent] == ["t-0-1", "t-1-1", "t-2-1", "t-0-2", "t-1-2", "t-0-3"]
    assert [(s.conversation, s.turn) for s in served] == [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (0, 3)]
    assert sent[3][1] == ["(session 7) sys", "a", "answer-t-0-1", "b"]


def test_a_small_run_on_the_engine_serves_later_turns_from_the_cache(tmp_path):
    main(["--conversations", "2", "--requests", "2", "--burst", "4", "--users", "40", "--repeats", "1",
          "--max-tokens", "4", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "prefix_cache.json").read_text())
    multi = result["scenarios"]["multi_turn"]
    off, on = multi["runs"]["off"][0], multi["runs"]["on"][0]
    assert off["cached_tokens"] == 0 and on["cached_tokens"] > 0 and off["requests"] == on["requests"] >= 4
    assert on["prefilled_tokens"] + on["cached_tokens"] == off["prefilled_tokens"]  # the same prompts
    assert multi["same_answers"] == f"{on['requests']}/{on['requests']}"
    # The burst: the followers wait for the leader's prefill of the shared system prompt instead of prefilling it
    burst = result["burst"]
    off, on = burst["runs"]["off"][0], burst["runs"]["on"][0]
    assert off["deferrals"] == 0 and on["deferrals"] > 0 and on["prefilled_tokens"] < off["prefilled_tokens"]
    assert on["prompt_tokens"] == off["prompt_tokens"] and burst["same_answers"] == "4/4"
    # Users taking turns: 40 conversations do not fit in 16 cached sequences and the slots of the 12 of 16 running ones
    # that 4 clients leave free (a history is overwritten before its next turn), they do in the default's
    users = result["users"]
    # (their histories, about 6k tokens, fit in the 16 running sequences' KV memory: capped keeps them as the default
    # does, up to the 4 clients' timing)
    off, few, capped, default = (users["runs"][mode][0] for mode in ("off", "running", "capped", "default"))
    assert off["cached_tokens"] == 0
    assert max(default["prefilled_tokens"], capped["prefilled_tokens"]) < few["prefilled_tokens"] < off["prefilled_tokens"]
    assert off["prompt_tokens"] == few["prompt_tokens"] == capped["prompt_tokens"] == default["prompt_tokens"]
    assert users["same_answers"] == f"{3 * off['requests']}/{3 * off['requests']}"
