"""Each generation request is counted once in vibe_requests_total, under how it was answered (from a review sending
real HTTP to the in-process app): the engine-errors alert reads the `error` series."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.sampling import SamplingParams
from tests.service.test_app import MODEL, _start_engine, served
from tests.service.test_text import build_tokenizer

STATUSES = ("stop", "length", "abort", "timeout", "error", "rejected")


def _counted(url: str) -> dict[str, float]:
    """vibe_requests_total by status, and the running and waiting gauges."""
    counts = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "vibe_requests_total":
                counts[sample.labels["status"]] = sample.value
            elif sample.name in ("vibe_num_requests_running", "vibe_num_requests_waiting"):
                counts[sample.name] = sample.value
    return counts


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {status: after[status] - before[status] for status in STATUSES if after[status] != before[status]}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_a_structured_output_its_grammar_gave_up_on_is_counted_once_as_rejected(tokenizer):
    """Its 400 was counted twice unstreamed (error, then rejected), and as an engine error streamed."""
    alternatives = " | ".join(f'"item{i}"' for i in range(12_000))
    body = {"model": MODEL, "prompt": "Pick one:", "max_tokens": 8, "temperature": 0,
            "structured_outputs": {"grammar": f"start: {alternatives}"}}
    with served(_start_engine(tokenizer, max_num_seqs=4), max_body_bytes=1 << 20) as url:
        for stream in (False, True):
            before = _counted(url)
            response = httpx.post(f"{url}/v1/completions", json={**body, "stream": stream}, timeout=120)
            assert "structured_output_failed" in response.text
            assert _delta(before, _counted(url)) == {"rejected": 1.0}, stream


def test_a_500_of_the_servers_own_code_is_counted_once_as_an_error(tokenizer, monkeypatch):
    """A failure building a finished response was counted as the finish reason of its last choice (the client got a
    500), and one before the engine (preparing the prompt) was not counted at all."""
    from service import app as app_module

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    with served(_start_engine(tokenizer)) as url:
        for owner, name, stream in ((app_module._CompletionFormat, "response", False),
                                    (app_module._Server, "_bounded_encode", False),
                                    (app_module._CompletionFormat, "chunks", True)):
            with monkeypatch.context() as patch:
                patch.setattr(owner, name, boom)
                before = _counted(url)
                httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": stream})
                time.sleep(0.1)
                assert _delta(before, _counted(url)) == {"error": 1.0}, name


def test_requests_cut_by_a_shutdown_are_aborted_and_the_gauges_go_to_zero(tokenizer):
    """A shutdown with requests in flight counted each as an engine error, and the running and waiting gauges kept
    their last values for good."""
    engine = _start_engine(tokenizer, max_num_seqs=2)
    with served(engine) as url:
        answers = []

        def send():
            answers.append(httpx.post(f"{url}/v1/completions", timeout=60, json={
                "model": MODEL, "prompt": "hello", "max_tokens": 200, "ignore_eos": True}).status_code)

        before = _counted(url)
        clients = [threading.Thread(target=send) for _ in range(6)]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 30
        while engine.num_running < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.shutdown()
        for client in clients:
            client.join()
        after = _counted(url)
        assert answers == [503] * 6 and _delta(before, after) == {"abort": 6.0}
        assert after["vibe_num_requests_running"] == after["vibe_num_requests_waiting"] == 0


def test_a_deadline_whose_abort_output_comes_before_its_own_answer_is_still_a_timeout(tokenizer):
    """The deadline's abort is run on the engine thread, then the request is marked expired: when the engine sent the
    abort's output first, it was read as an abort by someone else, a 500 counted as an engine error (a review, with a
    delay between the two)."""
    engine = _start_engine(tokenizer, max_num_seqs=1, request_timeout_s=0.3)
    run_at_step_boundary = engine.run_at_step_boundary

    def late_for_expire(fn):
        import sys

        future = run_at_step_boundary(fn)
        if sys._getframe(1).f_code.co_name == "expire":
            time.sleep(0.2)  # (the engine's abort output arrives before the timer's answer)
        return future

    engine.run_at_step_boundary = late_for_expire

    def hold() -> None:  # the one running place, held by work without a deadline
        async def run():
            async for _ in engine.generate("hold", [5, 6, 7], SamplingParams(max_tokens=240, ignore_eos=True),
                                           timed=False):
                pass
        asyncio.run(run())

    with served(engine) as url:
        holder = threading.Thread(target=hold)
        holder.start()
        time.sleep(0.05)
        before = _counted(url)
        response = httpx.post(f"{url}/v1/completions", timeout=60, json={"model": MODEL, "prompt": "W", "max_tokens": 5})
        holder.join()
        assert response.status_code == 504 and _delta(before, _counted(url)) == {"timeout": 1.0}
