"""A redeploy that changes the expert workers (here: the model's weights), on a real Ray Serve, while a request
streams: the earlier configuration's ingress replica drains it on the earlier workers, whole and unchanged, and
those workers go once it has drained.

Before: the drained replica kept reporting to the app's coordinator, now the new configuration's, which answered it
with its own workers and placement, so the stream switched to the new model's experts mid-request (200, [DONE], the
text diverging from the earlier model's greedy output); with other expert shapes, or the workers of another
configuration, its request failed with a 503 once the new coordinator killed the earlier workers at its start.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import httpx
import pytest
import torch

from deploy.app import DEFAULT_MODEL
from load_tests.compare import _free_port, _wait_healthy
from service.model import load_reference_model

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPT = "def fibonacci(n):"
TOKENS = 1000  # at most: ~50 s at 6 ms per emulated expert call, more than the redeploy takes
AFTER = 60  # chunks read once the new coordinator replica runs (answering the reports), then the stream closes
ARGS = {"num_devices": 2, "speeds": [1.0, 1.0], "app_name": "redeploy", "profile_prompts": None,
        "emulation": {"fixed_s": 6e-3, "jitter": 0.0, "throttle_floor": 1.0}}


def _negated_experts(folder) -> None:
    """The model at `folder` with its experts' down projections negated: same shapes, another model."""
    from safetensors.torch import load_file, save_file

    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            tensors = load_file(folder / name)
            save_file({key: -value if ".experts." in key and "down" in key else value
                       for key, value in tensors.items()}, folder / name, metadata={"format": "pt"})


def _replicas(deployment: str) -> set[str]:
    """The app's replica actors of `deployment`, by Serve's names."""
    return {entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["name"].startswith(f"SERVE_REPLICA::vibe#{deployment}#")}


def _coordinator_running() -> bool:
    """Whether the app's coordinator replica is up (Serve stops the earlier one before starting the next)."""
    try:
        deployment = serve.status().applications["vibe"].deployments["Coordinator"]
    except (KeyError, AttributeError):
        return False
    return dict(deployment.replica_states) == {"RUNNING": 1}


def _workers() -> list[str]:
    return sorted(entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
                  if entry["name"].startswith("vibe-worker-redeploy-"))


def test_a_request_streaming_through_a_redeploy_of_other_workers_ends_on_the_workers_it_began_on(tmp_path):
    from transformers import AutoTokenizer

    from deploy.app import build_app

    other = tmp_path / "other-model"
    shutil.copytree(DEFAULT_MODEL, other)
    _negated_experts(other)
    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        out = load_reference_model(str(DEFAULT_MODEL)).generate(
            torch.tensor([ids]), max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
    expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ARGS), name="vibe", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, time.monotonic() + 180)
        earlier, earlier_coordinator = _workers(), _replicas("Coordinator")
        streamed: dict = {}
        replaced = threading.Event()  # the new coordinator replica runs: every report reaches it

        def stream() -> None:
            """Stream the request; close it AFTER chunks after the new coordinator replica came up."""
            body = {"model": DEFAULT_MODEL.name, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            streamed.update(text="", events=[], after=0)
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
                    streamed["status"] = response.status_code
                    for line in response.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[len("data: "):])
                        streamed["events"].append("error" if "error" in chunk else "chunk")
                        streamed["text"] += "".join(choice["text"] for choice in chunk.get("choices", []))
                        streamed["after"] += replaced.is_set()
                        if streamed["after"] == AFTER or "error" in chunk:
                            break
            except httpx.HTTPError as exc:
                streamed["events"].append(repr(exc))

        def watch() -> None:
            while thread.is_alive() and not (_replicas("Coordinator") - earlier_coordinator and _coordinator_running()):
                time.sleep(0.2)
            streamed["workers then"] = _workers()
            replaced.set()

        thread = threading.Thread(target=stream)
        thread.start()
        threading.Thread(target=watch, daemon=True).start()
        time.sleep(2.0)
        serve.run(build_app({**ARGS, "model": str(other), "model_roots": [str(tmp_path)]}), name="vibe",
                  route_prefix="/")
        thread.join(timeout=300)
        assert streamed["status"] == 200 and set(streamed["events"]) == {"chunk"}, streamed["events"][-3:]
        assert streamed["after"] == AFTER, "the stream ended before the new coordinator ran: nothing was tested"
        assert expected.startswith(streamed["text"])  # the earlier model's experts, every token
        assert set(earlier) < set(streamed["workers then"])  # (kept while the earlier ingress replica drains)
        deadline = time.monotonic() + 90
        while set(earlier) & set(_workers()) and time.monotonic() < deadline:
            time.sleep(1.0)
        assert not set(earlier) & set(_workers()) and len(_workers()) == 2  # then gone
        answer = httpx.post(f"{url}/v1/completions", json={"model": "other-model", "prompt": PROMPT, "max_tokens": 16,
                                                          "temperature": 0, "ignore_eos": True}, timeout=120)
        assert answer.status_code == 200  # the other model, served on its own workers
        assert not expected.startswith(answer.json()["choices"][0]["text"])
    finally:
        serve.shutdown()
        ray.shutdown()
