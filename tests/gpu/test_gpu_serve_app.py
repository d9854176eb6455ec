"""The whole app on GPU workers (`device: cuda`, `emulate: false`): `build_app` on Ray Serve answers a
chat request over HTTP, and the admin API and /metrics show NVML telemetry of every worker. Two workers share the
one GPU (`worker_num_gpus: 0.25`), the ingress takes a share too. Skipped, starting nothing, without CUDA.
"""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from deploy.app import DEFAULT_MODEL

pytestmark = [pytest.mark.gpu, pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(),
                                 reason=f"{DEFAULT_MODEL} is not built (make model)")]

TOKEN = "gpu-test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def url():
    from tests.serve_app import serve_app

    with serve_app({"device": "cuda", "emulate": False, "num_devices": 2, "worker_num_gpus": 0.25,
                    "ingress_num_gpus": 0.25, "dtype": "bfloat16", "app_name": "gputest",
                    "max_num_seqs": 8, "admin_token": TOKEN}, ready_timeout_s=300) as base:
        yield base


def test_chat_request_is_answered_by_gpu_workers(url):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    response = client.chat.completions.create(model=DEFAULT_MODEL.name, max_tokens=16, temperature=0,
                                              messages=[{"role": "user", "content": "What is a list?"}])
    assert response.choices[0].message.content
    assert 1 <= response.usage.completion_tokens <= 16


def test_admin_stats_show_telemetry_of_every_gpu_worker(url):
    deadline = time.monotonic() + 60
    telemetry: list = []
    while time.monotonic() < deadline and len(telemetry) < 2:  # refreshed with the health probe
        telemetry = httpx.get(f"{url}/admin/stats", headers=ADMIN, timeout=30).json()["telemetry"]
        time.sleep(1)
    assert [t["device"] for t in telemetry] == [0, 1]
    assert all(t["available"] for t in telemetry), [t["reason"] for t in telemetry]
    assert all(0 < t["sm_clock_mhz"] <= t["max_sm_clock_mhz"] and t["power_w"] > 0 for t in telemetry)


def test_prometheus_metrics_export_the_gpu_telemetry(url):
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline and 'vibe_gpu_sm_clock_mhz{device="1"}' not in text:
        text = httpx.get(f"{url}/metrics", timeout=30).text  # refreshed from the coordinator off the request path
        time.sleep(1)
    from prometheus_client.parser import text_string_to_metric_families

    values = {(sample.name, sample.labels.get("device")): sample.value
              for family in text_string_to_metric_families(text) for sample in family.samples}
    for device in (0, 1):
        for name in ("vibe_gpu_sm_clock_mhz", "vibe_gpu_power_watts", "vibe_gpu_temperature_celsius"):
            assert (name, str(device)) in values, f"{name} of device {device} missing from /metrics"
            assert values[name, str(device)] > 0  # (parsed: a line ends with the sample's time)
