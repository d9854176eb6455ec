"""Reading and validating the JSON Lines prompt sets."""

from __future__ import annotations

import json

import pytest

from load_tests.workloads import load_workload, load_workloads, parse_prompt


def _write(path, entries) -> None:
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries))


def test_load_workload_reads_every_line(tmp_path):
    _write(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 8},
        "",
        {"messages": [{"role": "user", "content": "Go on", "name": "ignored"}], "max_tokens": 3},
    ])
    prompts = load_workload("chat", tmp_path)
    assert [(p.workload, p.index, p.max_tokens) for p in prompts] == [("chat", 0, 8), ("chat", 1, 3)]
    assert prompts[1].messages == ({"role": "user", "content": "Go on"},)
    assert set(load_workloads(["chat", "chat"], tmp_path)) == {"chat"}


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not JSON"),
    ('{"messages": [], "max_tokens": 3}', "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}], "max_tokens": 3}', "bad message"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "max_tokens": 3}',
     "last message"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": true}', "max_tokens"),
])
def test_malformed_lines_are_rejected_with_their_place(line, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_prompt("w", 0, line, where="w.jsonl:7")
    assert "w.jsonl:7" in str(err.value)


def test_missing_and_empty_sets(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_workload("nope", tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_workload("empty", tmp_path)


def test_shipped_sets_are_valid():
    sets = load_workloads(["sharegpt_like", "sonnet_like", "code"])
    assert all(len(prompts) >= 50 for prompts in sets.values())
