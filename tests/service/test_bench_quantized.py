"""The quantized-experts benchmark runs the workers' path on both holdings and reports their bytes (its timings
are printed, never asserted)."""

import json

import service.bench_quantized as bench


def test_benchmark_writes_bytes_and_times_per_shape_format_and_token_count(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "SHAPES", (("fp8-small", 256, 128, "fp8"), ("mxfp4-small", 256, 128, "mxfp4"),
                                          ("int4-small", 256, 128, "int4")))
    monkeypatch.setattr(bench, "TOKENS", (1, 4))
    bench.main(["--out", str(tmp_path)])
    rows = json.loads((tmp_path / "quantized_experts.json").read_text())["rows"]
    assert [(r["model"], r["tokens"]) for r in rows] == [("fp8-small", 1), ("fp8-small", 4),
                                                         ("mxfp4-small", 1), ("mxfp4-small", 4),
                                                         ("int4-small", 1), ("int4-small", 4)]
    weights = 3 * 256 * 128
    fp8, mxfp4 = rows[0], rows[2]
    assert fp8["bytes_bf16"] == 2 * weights and fp8["bytes_fp8"] == weights + 6 * 4  # six 128 x 128 scale blocks
    biases = (2 * 128 + 256) * 2  # bf16
    assert mxfp4["bytes_bf16"] == 2 * weights + biases
    assert mxfp4["bytes_mxfp4"] == weights // 2 + weights // 32 + biases  # FP4 pairs and a scale per 32
    # INT4 eight to an int32, a bf16 scale per 32 columns, each weight's [rows, cols] in int64
    assert rows[4]["bytes_int4"] == weights // 2 + weights // 32 * 2 + 2 * 2 * 8
    assert all(r["call_ms_bf16"] > 0 and r["call_time_ratio"] > 0 for r in rows)
    assert "model=mxfp4-small format=mxfp4 tokens=4 memory_ratio=" in capsys.readouterr().out
