"""scripts/measure_gpu_curve.py: its CPU path (always run: small and quick), a short GPU run (gpu marker),
and that nothing but a GPU measurement may be written to the shipped curve file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "measure_gpu_curve.py"
QUICK = ["--hidden", "64", "--intermediate", "32", "--max-tokens", "64", "--repeats", "3", "--warmup-s", "0"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("measure_gpu_curve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def check_record(record: dict, path: Path) -> None:
    assert json.loads(path.read_text()) == json.loads(json.dumps(record))
    tokens, median = record["tokens"], record["median_s"]
    assert tokens[0] == 1 and tokens == sorted(set(tokens)) and len(median) == len(tokens)
    assert all(0 < lo <= m <= hi for lo, m, hi in zip(record["p10_s"], median, record["p90_s"]))
    assert {"fixed", "knee", "slope"} == set(record["fit"]) and record["fit"]["fixed"] > 0


def test_token_grid_has_powers_of_two_and_half_steps(script):
    assert script.token_grid(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert script.token_grid(100)[-3:] == [64, 96, 100]


def test_cpu_path_writes_a_fitted_curve(script, tmp_path):
    out = tmp_path / "curve.json"
    record = script.main(["--device", "cpu", "--dtype", "float32", *QUICK, "--out", str(out)])
    check_record(record, out)
    assert record["device_name"] == "cpu" and record["config"]["hidden"] == 64
    assert record["telemetry"]["before"]["available"] is False


def test_cpu_measurement_never_goes_into_the_shipped_gpu_curve(script):
    with pytest.raises(SystemExit):
        script.main(["--device", "cpu", *QUICK])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_run_times_with_cuda_events_and_reads_telemetry(script, tmp_path):
    out = tmp_path / "curve.json"
    record = script.main(["--hidden", "2048", "--intermediate", "768", "--max-tokens", "4096", "--repeats", "3",
                          "--warmup-s", "1", "--out", str(out)])
    check_record(record, out)
    assert record["config"]["dtype"] == "bfloat16" and record["device_name"] != "cpu"
    assert record["telemetry"]["after"]["available"], record["telemetry"]["after"]["reason"]
    assert record["median_s"][-1] > record["median_s"][0]


def test_timing_defaults_to_the_kernels_on_a_gpu_and_the_service_path_on_a_cpu(script):
    assert script.CurveConfig(device="cpu").timing == "service"
    if torch.cuda.is_available():
        assert script.CurveConfig(device="cuda").timing == "graph"


def test_graph_timing_needs_cuda(script, tmp_path):
    with pytest.raises(SystemExit):
        script.main(["--device", "cpu", "--timing", "graph", *QUICK, "--out", str(tmp_path / "curve.json")])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_timing_measures_kernels_without_launch_overhead(script, tmp_path):
    args = ["--hidden", "2048", "--intermediate", "768", "--max-tokens", "4096", "--repeats", "3", "--warmup-s", "1"]
    service = script.main([*args, "--timing", "service", "--out", str(tmp_path / "service.json")])
    graph = script.main([*args, "--out", str(tmp_path / "graph.json")])  # graph: the default on a GPU
    check_record(graph, tmp_path / "graph.json")
    assert graph["config"]["timing"] == "graph" and "CUDA graph" in graph["what"]
    # one token: a few microseconds of kernels, against the host launching them one by one
    assert graph["median_s"][0] < service["median_s"][0]
    assert graph["median_s"][-1] > graph["median_s"][0]
