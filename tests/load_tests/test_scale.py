"""The scale study driver: case rows, output files, and a clean skip without the trace folder."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from load_tests import scale
from placement import ScaleStudyConfig
from placement.traces import TRACES_ENV

SMALL = scale.ScaleConfig(cases=(("one_slow13", 1024.0), ("spread7", 32.0)),
                          study=ScaleStudyConfig(device_counts=(4, 8), num_experts=16, num_layers=2))


def _trace_folder(tmp_path):
    counts = np.random.default_rng(0).integers(1, 500, size=(4, 32))
    np.savez(tmp_path / f"{scale.TRACE}.npz", counts=counts, meta=json.dumps({"model": "synthetic"}))
    return tmp_path


def test_rows_cover_every_case_device_count_and_variant():
    counts = np.random.default_rng(1).integers(1, 500, size=(4, 32))
    rows = scale.study_rows(counts, SMALL)
    cases = {(r["profile"], r["tokens_per_expert"], r["num_devices"]) for r in rows}
    assert cases == {(p, t, g) for p, t in SMALL.cases for g in (4, 8)}
    assert all(r["bound_ratio"] >= 1 - 1e-9 for r in rows)
    assert {r["variant"] for r in rows if r["policy"] == "eplb"} == {"even", "redundant"}


def test_run_writes_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACES_ENV, str(_trace_folder(tmp_path)))
    out = tmp_path / "out"
    result = scale.run(out, SMALL)
    assert result is not None and json.loads((out / "scale.json").read_text())["rows"] == result["rows"]
    assert (out / "scale.png").stat().st_size > 10_000


def test_run_skips_without_traces(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(TRACES_ENV, str(tmp_path / "absent"))
    assert scale.run(tmp_path / "out", SMALL) is None
    assert "scale study skipped" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_config_rejects_unknown_profiles_and_empty_cases():
    with pytest.raises(ValueError, match="profile"):
        replace(SMALL, cases=(("wobbly", 1024.0),))
    with pytest.raises(ValueError, match="at least one case"):
        replace(SMALL, cases=())


def test_study_runs_on_the_measured_deepseek_v3_expert_curve():
    base = scale.ScaleConfig().study.base_device
    record = json.loads(scale.MEASURED_CURVE.read_text())
    assert (record["config"]["hidden"], record["config"]["intermediate"]) == (7168, 2048)
    assert record["config"]["timing"] == "graph" and record["device_name"] != "cpu"
    assert (base.fixed, base.knee, base.slope) == tuple(record["fit"][k] for k in ("fixed", "knee", "slope"))
    # the makespans scale with the base curve: twice as slow a base, twice every makespan, same ratios
    counts = np.random.default_rng(2).integers(1, 500, size=(4, 32))
    slow = replace(SMALL, study=replace(SMALL.study, base_device=SMALL.study.base_device.scaled(2.0)))
    rows, slow_rows = scale.study_rows(counts, SMALL), scale.study_rows(counts, slow)
    for row, slow_row in zip(rows, slow_rows, strict=True):
        assert slow_row["makespan_s"] == pytest.approx(2 * row["makespan_s"])
        assert slow_row["bound_ratio"] == pytest.approx(row["bound_ratio"], rel=1e-6)
