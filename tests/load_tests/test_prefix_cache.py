"""The prefix-caching benchmark (load_tests/prefix_cache.py): its conversations and one small run on the engine."""

from __future__ import annotations

import json

from load_tests.prefix_cache import Served, conversations, main, short_follow_ups, summarise, with_follow_ups
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


def test_a_small_run_on_the_engine_serves_later_turns_from_the_cache(tmp_path):
    main(["--conversations", "2", "--requests", "2", "--burst", "4", "--repeats", "1", "--max-tokens", "4",
          "--out", str(tmp_path)])
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
