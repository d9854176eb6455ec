"""The whole app on GPU workers (`device: cuda`, `emulate: false`): `build_app` on Ray Serve answers a
chat request over HTTP, and the admin API shows NVML telemetry of every worker. Two workers share the
one GPU (`worker_num_gpus: 0.25`), the ingress takes a share too. Skipped, starting nothing, without CUDA.
"""

from __future__ import annotations

import socket
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    import ray
    from ray import serve

    from deploy.app import build_app

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"device": "cuda", "emulate": False, "num_devices": 2, "worker_num_gpus": 0.25,
                     "ingress_num_gpus": 0.25, "dtype": "bfloat16", "app_name": "gputest",
                     "max_num_seqs": 8, "admin_token": TOKEN})
    serve.run(app, name="vibe", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    yield base
    serve.shutdown()
    ray.shutdown()


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
