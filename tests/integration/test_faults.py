"""Faults under load: a dead or hung expert device, a request that cannot finish in time, and (Ray) a killed
and a hung worker.

The in-process tests run the real pieces without Ray: the OpenAI app over uvicorn, the engine, expert
workers behind their socket servers (the real data plane), and a coordinator over a `LocalWorkerPool`
of the same workers. "Killing" a device stops its control plane and closes its socket server; "hanging" one
makes its expert calls block while it answers probes. The one real-stack test kills an expert worker actor
of the Serve app with `ray.kill`, then hangs another, while streams run: they stall and finish (`make chaos`
measures the same and more).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from service.app import create_app
from service.async_engine import AsyncEngine
from service.checkpoint import load_layout
from service.coordinator import Coordinator, CoordinatorConfig, ModelShape
from service.dispatch import DispatchContext, DispatchError, DispatchingExperts, SocketChannel, device_failed
from service.emulator import EmulationConfig
from service.engine import Engine, EngineConfig
from service.messages import EngineReport
from service.model import load_engine_model
from service.transport import WorkerServer
from service.worker import ExpertWorker, WorkerConfig
from service.worker_pool import LocalWorkerPool
from tests.service.test_app import _serve
from tests.service.test_text import build_chat_model, build_tokenizer

MODEL = "vibe-test"
NUM_DEVICES = 4
DEAD = 2
STREAM = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0,
          "ignore_eos": True, "stream": True}
SHORT = {"model": MODEL, "messages": [{"role": "user", "content": "What is a list?"}], "max_tokens": 12,
         "temperature": 0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny chat model with its tokenizer, saved as a local checkpoint folder."""
    folder = tmp_path_factory.mktemp("chat-model")
    tokenizer = build_tokenizer()
    build_chat_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Devices:
    """NUM_DEVICES emulated expert workers, each behind its own socket server, and their control pool."""

    def __init__(self, checkpoint: Path) -> None:
        layout = load_layout(checkpoint)
        self._configs = [WorkerConfig(index=i, hidden_act=layout.hidden_act,
                                      profile_shape=(layout.hidden_size, layout.intermediate_size),
                                      emulation=EmulationConfig(fixed_s=1e-3, knee_tokens=16, jitter=0.0))
                         for i in range(NUM_DEVICES)]
        self.pool = LocalWorkerPool([ExpertWorker(config) for config in self._configs])
        self.servers = [WorkerServer(worker) for worker in self.pool.workers]

    def channels(self) -> dict[int, SocketChannel]:
        return {d: SocketChannel(server.tcp_address, timeout_s=10) for d, server in enumerate(self.servers)}

    def kill(self, device: int) -> None:
        """The device's process is gone: control calls fail, its data-plane connections drop."""
        self.pool.kill(device)
        self.servers[device].close()

    def serve_restarted(self, device: int) -> SocketChannel:
        """A socket server for the worker the pool restarted in the dead one's place, and a channel to it."""
        self.servers[device] = WorkerServer(self.pool.workers[device])
        return SocketChannel(self.servers[device].tcp_address, timeout_s=10)

    def close(self) -> None:
        for server in self.servers:
            server.close()


def _coordinator(checkpoint: Path, pool: LocalWorkerPool, **overrides) -> Coordinator:
    layout = load_layout(checkpoint)
    shape = ModelShape(len(layout.moe_layers), layout.num_experts, 3 * layout.hidden_size * layout.intermediate_size * 4)
    config = CoordinatorConfig(checkpoint=str(checkpoint), profile_token_counts=(1, 8, 64), profile_repeats=1,
                               ack_timeout_s=1.0, **overrides)
    coordinator = Coordinator(config, pool, shape)
    coordinator.start(background=False)
    return coordinator


def _engine(checkpoint: Path, context, **config) -> AsyncEngine:
    """The engine as the app builds it: a device's failure is retried for ``step_retry_s`` (default 20 s)."""
    from transformers import AutoTokenizer

    model = load_engine_model(checkpoint, context=context).model
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    engine = AsyncEngine(Engine(model, EngineConfig(max_model_len=512, max_num_seqs=8, **config), tokenizer,
                                hooks=context, retryable=device_failed), num_threads=1)
    engine.start()
    return engine


def _stream_events(url: str, started: threading.Event) -> list[dict]:
    """Every SSE data event of one streaming completion (the last is an error event if it failed)."""
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=STREAM, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
                started.set()
    return events


def _short(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=SHORT, timeout=60)


def _stream_text(events: list[dict]) -> str:
    assert all("error" not in event for event in events), events[-1]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    return "".join(event["choices"][0]["text"] for event in events)


def test_a_dead_device_delays_in_flight_requests_which_finish_unchanged_once_its_experts_move(checkpoint):
    """The app's default: the engine keeps the requests of steps that failed on the dead device and runs them
    again once the coordinator has moved its experts to the survivors; no client sees an error."""
    devices = Devices(checkpoint)
    coordinator = _coordinator(checkpoint, devices.pool)
    context = DispatchContext(coordinator.placement, devices.channels())
    engine = _engine(checkpoint, context)
    try:
        with _serve(create_app(engine, served_model_name=MODEL)) as url:
            unfaulted = _stream_text(_stream_events(url, threading.Event()))
            before = _short(url).json()["choices"][0]["message"]["content"]
            started = [threading.Event() for _ in range(4)]
            with ThreadPoolExecutor(6) as pool:
                streams = [pool.submit(_stream_events, url, event) for event in started]
                assert all(event.wait(30) for event in started)
                devices.kill(DEAD)
                time.sleep(0.5)  # steps fail and are retried meanwhile
                during = pool.submit(_short, url)  # sent while the dead device still holds experts
                time.sleep(0.5)
                assert coordinator.check_workers() == [DEAD] and not coordinator.placement.experts_on(DEAD)
                context.set_placement(coordinator.placement)  # what PlacementSync applies at its next report
                texts = [_stream_text(stream.result(timeout=60)) for stream in streams]
                answered = during.result(timeout=60)
            assert texts == [unfaulted] * 4
            assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"] == before
            assert engine.num_step_retries >= 4
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            assert float(re.search(r"^vibe_num_step_retries_total (\S+)$", metrics, re.M).group(1)) >= 4
            assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    finally:
        engine.shutdown()
        devices.close()


def test_without_step_retries_a_dead_device_fails_in_flight_requests_fast_with_503_and_service_recovers(checkpoint):
    devices = Devices(checkpoint)
    coordinator = _coordinator(checkpoint, devices.pool)
    context = DispatchContext(coordinator.placement, devices.channels())
    engine = _engine(checkpoint, context, step_retry_s=0)
    try:
        with _serve(create_app(engine, served_model_name=MODEL)) as url:
            before = _short(url).json()["choices"][0]["message"]["content"]
            started = [threading.Event() for _ in range(4)]
            with ThreadPoolExecutor(4) as pool:
                streams = [pool.submit(_stream_events, url, event) for event in started]
                assert all(event.wait(30) for event in started)
                killed = time.monotonic()
                devices.kill(DEAD)
                events = [stream.result(timeout=30) for stream in streams]  # none hangs
            failed_after = time.monotonic() - killed
            for stream in events:
                error = stream[-1]["error"]
                assert error["code"] == "device_unavailable" and f"expert device {DEAD} failed" in error["message"]
            assert failed_after < 5, f"in-flight requests took {failed_after:.1f} s to fail"
            # Until the coordinator re-places the dead device's experts, requests fail fast with a 503.
            refused = _short(url)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "device_unavailable"

            assert coordinator.check_workers() == [DEAD]
            assert not coordinator.placement.experts_on(DEAD)
            context.set_placement(coordinator.placement)  # what PlacementSync applies at its next report
            assert _short(url).json()["choices"][0]["message"]["content"] == before

            # The restarted (empty) worker rejoins at the next recalibration, outputs unchanged.
            context.set_channels({**context.channels, DEAD: devices.serve_restarted(DEAD)})
            coordinator.report(context.drain_report("engine"))  # the router statistics a re-plan needs
            coordinator._readmit()
            assert coordinator.placement.experts_on(DEAD)
            context.set_placement(coordinator.placement)
            assert _short(url).json()["choices"][0]["message"]["content"] == before
            assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    finally:
        engine.shutdown()
        devices.close()


def test_a_restarted_coordinator_that_cannot_recover_publishes_above_what_engines_serve(checkpoint):
    """Coordinator and a worker lost together (a node): the restarted worker holds nothing, so no record
    can be recovered. The new placement must still be newer than the engines' version, or they would
    never switch to it and keep sending tokens to experts that are gone."""
    devices = Devices(checkpoint)
    try:
        first = _coordinator(checkpoint, devices.pool)
        first.report(EngineReport("engine", 1, np.ones((1, first.shape.num_layers, first.shape.num_experts), dtype=np.int64)))
        assert first.recalibrate(policy="contiguous", mode="full", force=True)["status"] == "applied"
        served = first.placement.version
        devices.pool.restart(DEAD)  # Ray restarts the lost worker actor: empty, without the record
        second = _coordinator(checkpoint, devices.pool)
        assert second.placement.version > served
        reply = second.report(EngineReport("engine", served, np.zeros((0, first.shape.num_layers, first.shape.num_experts), dtype=np.int64)))
        assert reply.placement is not None and reply.placement["version"] == second.placement.version
        held = devices.pool.held()
        assert all(second.placement.experts_on(d) <= held[d] for d in range(NUM_DEVICES))
    finally:
        devices.close()


class _StarvedPool(LocalWorkerPool):
    """Workers whose probes of one device go unanswered `unanswered` more times (a CPU-starved worker)."""

    def __init__(self, workers, device: int) -> None:
        super().__init__(workers)
        self.device, self.unanswered = device, 0

    def probe(self, timeout_s: float):
        infos = super().probe(timeout_s)
        if self.unanswered:
            self.unanswered -= 1
            infos[self.device] = None
        return infos


def test_a_starved_worker_is_lost_only_after_probe_misses_in_a_row_a_restarted_one_at_once(checkpoint):
    devices = Devices(checkpoint)
    pool = _StarvedPool(devices.pool.workers, DEAD)
    try:
        coordinator = _coordinator(checkpoint, pool, probe_misses=3)
        version = coordinator.placement.version
        pool.unanswered = 2
        assert [coordinator.check_workers() for _ in range(3)] == [[], [], []]  # missed twice, then answered
        assert coordinator.placement.version == version and pool.infos()[DEAD].actor_name.endswith("-0")
        pool.unanswered = 3
        assert [coordinator.check_workers() for _ in range(3)] == [[], [], [DEAD]]
        assert not coordinator.placement.experts_on(DEAD) and pool.infos()[DEAD].actor_name.endswith("-1")
        pool.restart(0)  # Ray restarted another one: a new process answers, lost without waiting for misses
        assert coordinator.check_workers() == [0]
    finally:
        devices.close()


def test_a_worker_an_engine_cannot_reach_is_probed_at_once_and_lost_at_its_first_missed_probe(checkpoint):
    devices = Devices(checkpoint)
    pool = _StarvedPool(devices.pool.workers, DEAD)
    try:
        coordinator = _coordinator(checkpoint, pool, probe_misses=3)
        context = DispatchContext(coordinator.placement, devices.channels(), workers_epoch=coordinator._workers_epoch)
        layout = load_layout(checkpoint)
        layer = DispatchingExperts(0, layout.num_experts, context)
        expert = min(e for layer_index, e in coordinator.placement.experts_on(DEAD) if layer_index == 0)
        devices.servers[DEAD].close()  # its data plane is gone (the actor, for its probes, not yet)
        with pytest.raises(DispatchError):
            layer(torch.ones(2, layout.hidden_size), torch.tensor([[expert], [expert]]), torch.ones(2, 1))
        report = context.drain_report("engine")
        assert report.unreachable == (DEAD,) and context.drain_report("engine").unreachable == ()
        coordinator._next_probe = float("inf")
        coordinator.report(report)
        assert coordinator._next_probe == 0.0  # the loop probes at its next tick
        pool.unanswered = 1
        assert coordinator.check_workers() == [DEAD]  # one missed probe, not three
        # An engine on an older worker epoch is not believed: it may be calling a worker since replaced.
        coordinator._next_probe = float("inf")
        coordinator.report(EngineReport("old", coordinator.placement.version, np.zeros((0, 1, 1), dtype=np.int64),
                                        workers_epoch=coordinator._workers_epoch - 1, unreachable=(0,)))
        assert coordinator._next_probe == float("inf")
    finally:
        devices.close()


class _ServedPool(LocalWorkerPool):
    """In-process workers whose infos carry their socket servers' TCP addresses (the coordinator calls a
    suspect's data plane there)."""

    def __init__(self, workers, servers) -> None:
        super().__init__(workers)
        self.servers = servers

    def infos(self):
        return [dataclasses.replace(info, tcp_address=server.tcp_address)
                for info, server in zip(super().infos(), self.servers)]


@pytest.mark.parametrize("fault", ["hang", "error"])
def test_a_hung_or_failing_worker_that_still_answers_probes_is_lost_once_an_engine_reports_it_and_requests_finish(
        checkpoint, fault):
    """A worker whose expert calls block ("hang": a hung GPU) or fail ("error": a GPU after a sticky CUDA error)
    while its process answers probes: the engine reports it, the coordinator's one-token call finds it broken,
    its experts move, and the request in flight finishes with the same answer."""
    devices = Devices(checkpoint)
    pool = _ServedPool(devices.pool.workers, devices.servers)
    coordinator = _coordinator(checkpoint, pool, probe_misses=3, probe_timeout_s=0.5)
    channels = {d: SocketChannel(server.tcp_address, timeout_s=1.0) for d, server in enumerate(devices.servers)}
    context = DispatchContext(coordinator.placement, channels, workers_epoch=coordinator._workers_epoch)
    engine = _engine(checkpoint, context)
    hung = pool.workers[DEAD]
    try:
        with _serve(create_app(engine, served_model_name=MODEL)) as url:
            before = _short(url).json()["choices"][0]["message"]["content"]
            pool.inject_fault(DEAD, fault)  # its expert calls block or fail; its process answers probes
            assert coordinator.check_workers() == []  # nothing tells it apart yet
            with ThreadPoolExecutor(1) as executor:
                answer = executor.submit(_short, url)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # PlacementSync's reports, by hand
                    report = context.drain_report("engine")
                    coordinator.report(report)
                    if report.unreachable:
                        break
                    time.sleep(0.1)
                assert report.unreachable == (DEAD,), f"the engine never reported the device ({fault})"
                assert coordinator.check_workers() == [DEAD]  # answered its probe, not a one-token call
                assert not coordinator.placement.experts_on(DEAD)
                context.set_placement(coordinator.placement)
                response = answer.result(timeout=60)
            assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == before
            assert engine.num_step_retries >= 1
    finally:
        hung.clear_faults()
        engine.shutdown()
        devices.close()


class _SlowSteps:
    """Step hooks that make each forward take at least 20 ms."""

    def begin_step(self) -> None:
        time.sleep(0.02)

    def end_step(self, completed: bool = True) -> None:
        pass


def test_a_request_that_cannot_finish_in_time_is_aborted_with_a_504_and_never_hangs():
    tokenizer = build_tokenizer()
    core = Engine(build_chat_model(tokenizer), EngineConfig(max_model_len=512, request_timeout_s=0.5), tokenizer,
                  hooks=_SlowSteps())
    engine = AsyncEngine(core)
    engine.start()
    long = {"model": MODEL, "prompt": "a", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    try:
        with _serve(create_app(engine, served_model_name=MODEL)) as url:
            started = time.monotonic()
            response = httpx.post(f"{url}/v1/completions", json=long, timeout=30)
            took = time.monotonic() - started
            error = response.json()["error"]
            assert response.status_code == 504 and error["code"] == "request_timeout" and "0.5 s" in error["message"]
            assert took < 3
            with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=30) as stream:
                lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
            assert json.loads(lines[-2][len("data: "):])["error"]["code"] == "request_timeout"
            assert lines[-1] == "data: [DONE]"
            # Both were aborted in the engine, and the engine serves on.
            assert engine.run_at_step_boundary(lambda: core.num_running + core.num_waiting).result(10) == 0
            short = httpx.post(f"{url}/v1/completions", json={**long, "max_tokens": 3}, timeout=30)
            assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
    finally:
        engine.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_serve_app_survives_a_killed_and_a_hung_worker_actor(tmp_path):
    from load_tests.chaos import run_worker_death, run_worker_hang, running_app, wait_healthy

    with running_app(4) as app:
        result = run_worker_death(app, device=1, concurrency=6)
        wait_healthy(app.url, 60)
        hang = run_worker_hang(app, device=2, concurrency=6)
        wait_healthy(app.url, 60)
        after = httpx.post(f"{app.url}/v1/chat/completions", timeout=60, json={**SHORT, "model": app.model})
    detail = result.detail
    assert result.hung == 0 and after.status_code == 200, detail
    assert detail["replace_status"] == "applied" and detail["rejoin_status"] == "applied", detail
    # Found lost from the engine's report that it cannot reach the worker, not after three 1 s probes missed.
    assert result.detection_s < 2 and result.recovery_s < 30, (result.detection_s, result.recovery_s)
    # Nothing failed: the steps that failed on the dead device were retried once its experts had moved.
    assert set(detail["outcomes"]) == {"ok"} and detail["answering_again_s"] == 0.0, detail
    assert detail["longest_stall_s"] < 20, detail  # the engine's step_retry_s
    # The hung worker answered its probes throughout; the engines' data-plane timeout (10 s) and the
    # coordinator's one-token call found it, and no request failed meanwhile.
    detail = hang.detail
    assert hang.hung == 0 and set(detail["outcomes"]) == {"ok"}, detail
    assert detail["replace_status"] == "applied" and detail["rejoin_status"] == "applied", detail
    assert hang.detection_s < 30 and detail["longest_stall_s"] < 30, (hang.detection_s, detail)


def _profiling(engine, prompts, calibrate):
    """An ingress shell over ``engine`` whose profiling pass reads ``prompts``; its sync and ``calibrate`` calls."""
    from types import SimpleNamespace

    from service.deployments import IngressDeployment, IngressSettings

    calls = []

    async def calibrating() -> dict:
        calls.append("calibrate")
        return calibrate()

    ingress = object.__new__(IngressDeployment)
    ingress.settings = IngressSettings(checkpoint="", served_model_name=MODEL, dtype="float32",
                                       engine_config=engine.config, admin_token_sha256=None, num_devices=1,
                                       emulation=False, profile_prompts=str(prompts), profile_max_tokens=2)
    ingress.engine = engine
    ingress.sync = SimpleNamespace(sync_once=lambda: calls.append("sync"), stop=lambda: None)
    ingress._stopping = threading.Event()  # what __del__ touches
    ingress.coordinator = SimpleNamespace(calibrate=SimpleNamespace(remote=calibrating))
    ingress.context = SimpleNamespace(placement=SimpleNamespace(version=0))
    return ingress, calls


def test_a_profiling_pass_the_serving_limits_would_refuse_runs_what_fits_and_never_fails_the_start(tmp_path, caplog,
                                                                                                   monkeypatch):
    """Each failed every ingress replica's start after the build had passed, so a valid config never served (a
    review): a profile prompt longer than max_model_len allows, a request_timeout_s shorter than the pass (every
    prompt queued at once), a base model's tokenizer without a chat template for the chat-form prompts. A pass that
    fails all the same (the file gone) still asks for the calibration, whose failure is the coordinator's to retry."""
    from service import deployments

    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    engine = AsyncEngine(Engine(build_chat_model(tokenizer), EngineConfig(max_model_len=64, max_num_seqs=2, max_queue=2,
                                                                         request_timeout_s=1e-3), tokenizer))
    prompts = tmp_path / "profile.jsonl"
    lines = [{"prompt": f"Prompt number {i}."} for i in range(4)] + [{"prompt": "word " * 80}] + [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"}]}
        for i in range(2)]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    seen = []
    generate = engine.generate

    def recording(request_id, ids, params, **kwargs):
        seen.append(len(ids))
        return generate(request_id, ids, params, **kwargs)

    engine.generate = recording
    engine.start()
    # (the replica's logger, ray.serve, which Ray configures as it likes: it dropped the capture's handler)
    monkeypatch.setattr(deployments, "log", logging.getLogger("tests.profiling"))
    try:
        ingress, calls = _profiling(engine, prompts, lambda: {"status": "applied", "to_version": 0})
        with caplog.at_level(logging.WARNING, logger="tests.profiling"):
            asyncio.run(ingress._profiling_pass())
        assert calls == ["sync", "calibrate"] and len(seen) == 6 and max(seen) <= 62
        assert "1 of 7 prompts are longer than max_model_len 64 allows" in caplog.text and "failed" not in caplog.text

        def refused() -> dict:
            raise RuntimeError("no router statistics yet")

        prompts.unlink()
        ingress, calls = _profiling(engine, prompts, refused)
        with caplog.at_level(logging.WARNING, logger="tests.profiling"):
            asyncio.run(ingress._profiling_pass())  # (raised: the replica's start failed)
        assert calls == ["sync", "calibrate"] and "the profiling pass failed" in caplog.text
        assert "startup calibration failed (no router statistics yet)" in caplog.text
    finally:
        engine.shutdown()


def test_the_startup_profiling_pass_fits_a_queue_smaller_than_its_prompt_set(tmp_path):
    """An ingress with max_queue below the number of profile prompts used to fail its start (QueueFull)
    and Serve retried it forever; `make chaos` (max_queue 32, 64 prompts) found it."""
    prompts = tmp_path / "profile.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Prompt number {i}."}) + "\n" for i in range(10)))
    tokenizer = build_tokenizer()
    engine = AsyncEngine(Engine(build_chat_model(tokenizer), EngineConfig(max_model_len=64, max_num_seqs=2,
                                                                         max_queue=2), tokenizer))
    engine.start()
    ingress, calls = _profiling(engine, prompts, lambda: {"status": "applied", "to_version": 0})
    try:
        asyncio.run(ingress._profiling_pass())
    finally:
        engine.shutdown()
    assert calls == ["sync", "calibrate"]
