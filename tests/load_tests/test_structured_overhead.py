"""The constrained-decoding benchmark (load_tests/structured_overhead.py): one small run on the engine."""

from __future__ import annotations

import json

from load_tests.structured_overhead import grammars, main


def test_every_mode_has_a_grammar_but_free():
    modes = grammars()
    assert list(modes) == ["free", "regex", "json", "tool"] and modes["free"] is None
    assert all(isinstance(modes[m], str) and modes[m] for m in ("regex", "json", "tool"))


def test_a_small_run_decodes_the_same_steps_in_every_mode(tmp_path):
    main(["--requests", "3", "--tokens", "6", "--repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "structured.json").read_text())
    runs = {mode: results[0] for mode, results in result["runs"].items()}
    assert {r["tokens"] for r in runs.values()} == {18}  # no grammar ended a request early
    assert {r["decode_steps"] for r in runs.values()} == {5}  # all three past prefill, 5 times
    assert result["summary"]["free"]["decode_step_vs_free"] == 1.0
    assert all(row["decode_step_ms"] > 0 for row in result["summary"].values())
