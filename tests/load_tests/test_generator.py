"""Trace generation, and sending traces with the `openai` client to a scripted fake and to the real app."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from load_tests.generator import ClientConfig, Event, RequestSpec, TraceConfig, make_trace, run_trace
from load_tests.slo import SLO, summarize
from load_tests.workloads import Prompt
from service.app import serve_locally


def _prompts(name: str, count: int, max_tokens: int = 8) -> list[Prompt]:
    return [Prompt(name, i, ({"role": "user", "content": f"{name} {i}"},), max_tokens) for i in range(count)]


PROMPTS = {"prose": _prompts("prose", 20, 50), "code": _prompts("code", 10, 300)}


def test_trace_is_seeded_and_poisson():
    config = TraceConfig(rate_rps=4.0, duration_s=500.0, phases=((0.0, ("prose",)),), seed=3)
    trace = make_trace(config, PROMPTS)
    again = make_trace(config, PROMPTS)
    assert [(r.arrival_s, r.prompt.index) for r in trace] == [(r.arrival_s, r.prompt.index) for r in again]
    gaps = np.diff([0.0] + [r.arrival_s for r in trace])
    assert abs(len(trace) - 2000) < 4 * np.sqrt(2000)
    assert gaps.mean() == pytest.approx(0.25, rel=0.1) and gaps.std() == pytest.approx(0.25, rel=0.1)
    assert all(0 <= r.arrival_s < 500 for r in trace) and [r.index for r in trace] == list(range(len(trace)))
    other = make_trace(TraceConfig(4.0, 500.0, ((0.0, ("prose",)),), seed=4), PROMPTS)
    assert [r.arrival_s for r in other[:5]] != [r.arrival_s for r in trace[:5]]


@pytest.mark.parametrize("rate", [0.231, 0.462, 1.502, 1.636, 1.953])
def test_a_trace_sends_the_requests_its_rate_names(rate):
    """Every rate scaled one unbounded arrival pattern of its seed: seed 0's ran slow, so every trace of `make bench`
    sent 11-13% fewer requests than its rate's label (120 instead of 135 at 1.502 req/s over 90 s; an audit)."""
    trace = make_trace(TraceConfig(rate, 90.0, ((0.0, ("prose",)),), seed=0), PROMPTS)
    assert len(trace) == round(rate * 90.0) and all(0 <= r.arrival_s < 90.0 for r in trace)


def test_same_seed_gives_the_same_prompts_at_every_rate():
    slow = make_trace(TraceConfig(1.0, 200.0, ((0.0, ("prose",)),), seed=0), PROMPTS)
    fast = make_trace(TraceConfig(2.0, 100.0, ((0.0, ("prose",)),), seed=0), PROMPTS)
    assert [r.prompt.index for r in slow] == [r.prompt.index for r in fast]
    np.testing.assert_allclose([r.arrival_s for r in slow], [2 * r.arrival_s for r in fast])


def test_phases_switch_the_prompt_sets_and_cap_max_tokens():
    config = TraceConfig(5.0, 60.0, ((0.0, ("prose",)), (30.0, ("code",))), seed=1, max_tokens_cap=100)
    trace = make_trace(config, PROMPTS)
    assert {r.prompt.workload for r in trace if r.arrival_s < 30} == {"prose"}
    assert {r.prompt.workload for r in trace if r.arrival_s >= 30} == {"code"}
    assert {r.max_tokens for r in trace} == {50, 100}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rate_rps": 0, "duration_s": 1}, "rate_rps"),
    ({"rate_rps": 1, "duration_s": float("inf")}, "duration_s"),
    ({"rate_rps": 1, "duration_s": 1, "phases": ((5.0, ("prose",)),)}, "phases"),
    ({"rate_rps": 1, "duration_s": 1, "phases": ((0.0, ("a",)), (0.0, ("b",)))}, "phases"),
    ({"rate_rps": 1, "duration_s": 1, "phases": ((0.0, ()),)}, "workload"),
    ({"rate_rps": 1, "duration_s": 1, "max_tokens_cap": 0}, "max_tokens_cap"),
])
def test_trace_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TraceConfig(**kwargs)


def test_trace_needs_the_named_prompts():
    with pytest.raises(ValueError, match="missing"):
        make_trace(TraceConfig(1.0, 10.0, ((0.0, ("missing",)),)), PROMPTS)


# --- a scripted OpenAI-compatible server -----------------------------------------------------------

FIRST_TOKEN_S, GAP_S = 0.15, 0.02
LATER = time.time() + 3600.0  # a recalibration stamped after any run here started


def _fake_app() -> FastAPI:
    """Streams `max_tokens` one-token chunks: role chunk at once, first content after FIRST_TOKEN_S, then one
    per GAP_S, then usage. Model "missing" is a 404; a prompt "hang" never sends content; a prompt "badjson" sends
    one content chunk, then one that is not JSON."""
    app = FastAPI()
    app.state.polls = 0

    def chunk(delta: dict | None, usage: dict | None = None) -> str:
        body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": None}],
                "usage": usage}
        return f"data: {json.dumps(body)}\n\n"

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body["model"] != "fake":
            return JSONResponse({"error": {"message": "no such model", "type": "not_found_error"}}, status_code=404)
        assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["ignore_eos"]

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            if body["messages"][-1]["content"] == "hang":
                await asyncio.sleep(60)
            if body["messages"][-1]["content"] == "badjson":
                yield chunk({"content": "x"})
                yield "data: {not json\n\n"
                return
            await asyncio.sleep(FIRST_TOKEN_S)
            for i in range(body["max_tokens"]):
                if i:
                    await asyncio.sleep(GAP_S)
                yield chunk({"content": "x"})
            yield chunk(None, {"prompt_tokens": 7, "completion_tokens": body["max_tokens"], "total_tokens": 0})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/metrics")
    async def metrics():
        app.state.polls += 1
        return PlainTextResponse(f"vibe_engine_step_seconds_sum {0.5 * app.state.polls}\n"
                                 f"vibe_engine_step_seconds_count {10 * app.state.polls}\n")

    @app.get("/admin/stats")
    async def stats(request: Request):
        assert request.headers["authorization"] == "Bearer secret"
        return {"placement_version": 3, "imbalance_per_layer": [1.1, 1.2], "devices": [{"observed_over_predicted": 1.0}],
                "recalibrations": [{"started_at": 5.0, "reason": "drift", "status": "applied", "moves": [1, 2]},
                                   {"started_at": LATER, "reason": "drift", "status": "skipped", "moves": []}]}

    return app


@pytest.fixture(scope="module")
def fake_url():
    with serve_locally(_fake_app()) as url:
        yield url


def _spec(index: int, arrival: float, content: str, max_tokens: int) -> RequestSpec:
    return RequestSpec(index, arrival, Prompt("w", index, ({"role": "user", "content": content},), max_tokens),
                       max_tokens)


def test_run_trace_times_first_content_tpot_usage_and_failures(fake_url):
    trace = [_spec(0, 0.0, "a", 6), _spec(1, 0.3, "b", 1), _spec(2, 0.35, "hang", 3)]
    config = ClientConfig(base_url=fake_url, model="fake", drain_s=1.0, admin_token="secret", poll_interval_s=0.2)
    record = asyncio.run(run_trace(config, trace, progress=False))
    first, single, hung = record.results
    assert first.error is None and first.output_tokens == 6 and first.prompt_tokens == 7
    # lower bounds only (the server's sleeps guarantee them): the empty role chunk, sent at once, is no TTFT
    assert first.ttft_s >= FIRST_TOKEN_S and first.tpot_s >= GAP_S
    assert first.tpot_s == pytest.approx((first.e2e_s - first.ttft_s) / 5)
    assert single.error is None and single.tpot_s is None and single.sent_s >= 0.3
    assert hung.error == "cutoff" and hung.ttft_s is None
    assert record.duration_s >= 0.35 + 1.0  # the last arrival plus the drain
    assert record.step_seconds == {"sum": 0.5, "count": 10.0}
    assert len(record.polls) >= 2 and record.polls[0]["imbalance_per_layer"] == [1.1, 1.2]
    # none at the start: the coordinator's window then holds what ran before (an audit); one after the run
    assert record.polls[0]["t"] >= 0.2 and record.polls[-1]["t"] >= record.duration_s
    # only what started during the run: the coordinator's history also holds the runs before (an audit)
    assert record.recalibrations == [{"started_at": LATER, "reason": "drift", "status": "skipped"}]
    assert record.notes == []


def test_a_metrics_scrape_that_fails_after_the_run_costs_the_step_times_not_the_results(fake_url, monkeypatch):
    """A slow /metrics after an overloaded run raised out of run_trace and lost every measured request (an audit)."""
    from load_tests import generator

    real, calls = generator.scrape_step_seconds, []

    async def flaky(http):
        calls.append(1)
        if len(calls) > 1:
            raise httpx.ReadTimeout("timed out")
        return await real(http)

    monkeypatch.setattr(generator, "scrape_step_seconds", flaky)
    record = asyncio.run(run_trace(ClientConfig(base_url=fake_url, model="fake"), [_spec(0, 0.0, "a", 2)],
                                   progress=False))
    assert [r.error for r in record.results] == [None] and record.step_seconds == {}
    assert record.notes == ["/metrics after the run: ReadTimeout: timed out (no step times)"]


def test_apps_of_one_clock_start_the_trace_together(fake_url, monkeypatch):
    """Each app's trace began when its own warm-up ended, so apps 'sent the same trace at the same time' were up
    to 107 ms apart, systematically (a review); the runs of one TraceClock start together."""
    from load_tests import generator

    real, plan = generator.warm_up, iter([0.4, 0.0, RuntimeError("no warm-up"), 0.0])

    async def uneven(client, config, spec):
        step = next(plan)
        if isinstance(step, Exception):
            raise step
        await asyncio.sleep(step)
        await real(client, config, spec)

    monkeypatch.setattr(generator, "warm_up", uneven)
    trace = [_spec(0, 0.0, "a", 2), _spec(1, 0.1, "b", 2)]

    async def both():
        clock = generator.TraceClock(2)
        return await asyncio.gather(*(run_trace(ClientConfig(base_url=fake_url, model="fake"), trace, progress=False,
                                                clock=clock) for _ in range(2)))

    first, second = asyncio.run(both())
    assert first.started_wall == second.started_wall
    assert [r.error for r in first.results + second.results] == [None] * 4

    async def broken():  # a run that cannot start does not leave the other waiting for good
        clock = generator.TraceClock(2)
        return await asyncio.gather(*(run_trace(ClientConfig(base_url=fake_url, model="fake"), trace, progress=False,
                                                clock=clock) for _ in range(2)), return_exceptions=True)

    failed, waiting = asyncio.run(asyncio.wait_for(broken(), 30))
    assert isinstance(failed, RuntimeError) and isinstance(waiting, asyncio.BrokenBarrierError)


def test_events_run_at_their_time_and_are_recorded(fake_url):
    done = []

    async def action() -> None:
        done.append(True)

    record = asyncio.run(run_trace(ClientConfig(base_url=fake_url, model="fake"), [_spec(0, 0.0, "a", 2)],
                                   progress=False, events=[Event("throttle", 0.2, action)]))
    assert done == [True] and record.events[0]["name"] == "throttle" and record.events[0]["t"] >= 0.2


def test_a_failing_event_is_recorded_and_the_runs_results_are_kept(fake_url):
    """A scheduled action that raised (drift's throttle POST answered with an error) surfaced only after every
    request had finished, from run_trace, which lost the run's results (an audit)."""
    async def action() -> None:
        raise RuntimeError("admin said no")

    trace = [_spec(0, 0.0, "a", 2), _spec(1, 0.3, "b", 2)]
    record = asyncio.run(run_trace(ClientConfig(base_url=fake_url, model="fake"), trace, progress=False,
                                   events=[Event("throttle", 0.1, action)]))
    assert [r.error for r in record.results] == [None, None]
    (event,) = record.events
    assert event["name"] == "throttle" and event["error"] == "RuntimeError: admin said no" and event["t"] >= 0.1


def test_an_unexpected_exception_fails_its_request_not_the_run(fake_url):
    """A malformed SSE chunk raised json.JSONDecodeError, which send_request let through: run_trace raised and
    every result of the run was lost (an audit). vLLM's benchmark_serving counts any exception as one failure."""
    trace = [_spec(0, 0.0, "a", 3), _spec(1, 0.05, "badjson", 3), _spec(2, 0.1, "c", 3)]
    record = asyncio.run(run_trace(ClientConfig(base_url=fake_url, model="fake"), trace, progress=False))
    ok, bad, after = record.results
    assert ok.error is None and after.error is None and after.output_tokens == 3
    assert bad.error.startswith("JSONDecodeError") and bad.ttft_s is None and bad.output_tokens == 0


def test_http_errors_are_recorded_not_raised(fake_url):
    record = asyncio.run(run_trace(ClientConfig(base_url=fake_url, model="other"), [_spec(0, 0.0, "a", 2)],
                                   progress=False))
    (result,) = record.results
    assert result.error.startswith("NotFoundError 404") and result.output_tokens == 0
    assert record.polls == []
    with pytest.raises(ValueError, match="no requests"):
        asyncio.run(run_trace(ClientConfig(base_url=fake_url, model="fake"), [], progress=False))


def test_a_request_that_runs_past_its_timeout_fails_though_every_read_is_quick(fake_url):
    """The client's timeout bounded each read: a 40-token stream (about 0.9 s, a chunk every 20 ms) finished under a
    0.5 s request timeout (an audit)."""
    record = asyncio.run(run_trace(ClientConfig(base_url=fake_url, model="fake", request_timeout_s=0.5),
                                   [_spec(0, 0.0, "a", 40)], progress=False))
    assert record.results[0].error == "timeout"


def test_client_config_rejects_bad_values():
    with pytest.raises(ValueError, match="drain_s"):
        ClientConfig(base_url="http://x", model="m", drain_s=0)


def test_a_malformed_admin_answer_costs_a_poll_not_the_run(fake_url, monkeypatch):
    """The admin poller caught only httpx errors: an /admin/stats answer that is not JSON (a proxy's 200 page) or
    lacks a key killed it, and run_trace re-raised that when stopping it, losing every result (a review)."""
    import json

    from load_tests import generator

    async def bad(http, token, path):
        raise json.JSONDecodeError("Expecting value", "<html>", 0)

    monkeypatch.setattr(generator, "fetch_admin", bad)
    config = ClientConfig(base_url=fake_url, model="fake", admin_token="secret", poll_interval_s=0.1)
    record = asyncio.run(run_trace(config, [_spec(0, 0.0, "a", 2), _spec(1, 0.2, "b", 2)], progress=False))
    assert len(record.results) == 2 and all(r.error is None for r in record.results) and record.polls == []


def test_ttft_is_charged_the_clients_own_send_lag(fake_url):
    """Open loop: a request's TTFT and E2E run from its scheduled arrival. TTFT was timed from the late send, so a
    client-side stall (the event loop busy, as parsing a burst of three apps' chunks on two loaded cores is) never
    reached TTFT, E2E or attainment: coordinated omission (a measurement review)."""
    async def stall():
        time.sleep(0.6)  # the client's loop busy, not the server

    trace = [_spec(0, 0.0, "a", 2), _spec(1, 0.1, "b", 2)]
    config = ClientConfig(base_url=fake_url, model="fake", drain_s=5.0)
    record = asyncio.run(run_trace(config, trace, progress=False, events=[Event("stall", 0.05, stall)]))
    late = record.results[1]
    assert late.sent_s - 0.1 > 0.4  # the send lag is real (send_lag_ms)...
    assert late.ttft_s >= (late.sent_s - 0.1) + FIRST_TOKEN_S  # ...and charged to TTFT
    assert late.e2e_s >= late.ttft_s and late.tpot_s == pytest.approx(GAP_S, abs=0.05)  # (TPOT unchanged)


def test_goodput_at_full_attainment_is_the_rate_served(fake_url):
    """Goodput was divided by the run's wall time (the arrivals plus the tail until the last stream ended): in
    bench/compare.json at 1.304 req/s, 117 of 117 within SLO read 1.199 / 1.201 / 1.201 req/s, the three differing only
    by their last request's end (a measurement review). It is per second of the trace's arrival window."""
    trace = [_spec(i, 0.25 * i, "a", 50) for i in range(4)]  # 4 requests over a 1 s arrival window
    config = ClientConfig(base_url=fake_url, model="fake", drain_s=5.0)
    record = asyncio.run(run_trace(config, trace, progress=False))
    summary = summarize(record.results, SLO(10.0, 10.0), record.duration_s, window_s=1.0)
    assert summary["attainment"] == 1.0 and summary["goodput_rps"] == pytest.approx(4.0)
    assert summary["output_tokens_per_s"] == pytest.approx(200 / record.duration_s)  # tokens over the wall time
