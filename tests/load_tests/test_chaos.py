"""`make chaos`'s measurements, on synthetic inputs (no Ray): what counts as recovered, hung, failed (from a review
of the harness: a fault never seen passed, recoveries came out negative, a slow whole answer was hung)."""

from __future__ import annotations

import threading
import time
import types

import pytest

from load_tests import chaos
from load_tests.chaos import RequestRecord, ScenarioResult


def _history(monkeypatch, records: list[dict]) -> None:
    answer = types.SimpleNamespace(json=lambda: {"recalibrations": records})
    monkeypatch.setattr(chaos, "admin", lambda *args, **kwargs: answer)
    monkeypatch.setattr(chaos.time, "sleep", lambda seconds: None)


def test_only_records_of_the_fault_count_as_its_detection_and_recovery(monkeypatch):
    now = time.time()
    old = {"reason": "device 1 lost", "status": "applied", "started_at": now - 300, "duration_s": 1.0}
    lost = {"reason": "devices 1, 2 lost", "status": "applied", "started_at": now + 0.5, "duration_s": 1.0}
    failed_rejoin = {"reason": "device 1, 2 rejoined", "status": "rolled_back", "started_at": now + 2, "duration_s": 1}
    rejoined = {"reason": "device 1, 2 rejoined", "status": "applied", "started_at": now + 5, "duration_s": 1.0}
    _history(monkeypatch, [old, lost, failed_rejoin, rejoined])
    assert chaos._wait_history(None, 1, now, timeout_s=5) == (lost, rejoined)
    _history(monkeypatch, [old, failed_rejoin])  # an earlier fault's record, a rejoin rolled back: not recovered
    assert chaos._wait_history(None, 1, now, timeout_s=0.05) == (None, None)
    assert chaos._device_event("devices 1, 12 lost", 2) is None and chaos._device_event("device 12 lost", 12) == "lost"


def test_service_answers_again_from_a_start_after_the_fault():
    t0 = 100.0
    records = [RequestRecord(97.0, 101.0, "stream_x"), RequestRecord(98.0, 103.0, "ok"),
               RequestRecord(101.0, 104.0, "hung"), RequestRecord(102.5, 105.0, "ok")]
    assert chaos._answering_again(records, t0) == 2.5
    assert chaos._answering_again(records[:2], t0) == 0.0  # (was -2.0: a request begun before the fault)


class _Response:
    def __init__(self, lines, pause_s: float = 0.0):
        self._lines, self._pause_s = lines, pause_s

    def iter_lines(self):
        for line in self._lines:
            time.sleep(self._pause_s)
            yield line


def test_a_whole_answer_is_ok_however_slow_a_short_one_fails_and_an_endless_one_is_hung(monkeypatch):
    chunk = 'data: {"choices": [{"delta": {"content": "a"}}]}'
    usage = 'data: {"choices": [], "usage": {"completion_tokens": 3}}'
    whole = RequestRecord(time.monotonic() - 200, 0, "ok", expected_tokens=3)  # begun long ago: slow, not hung
    monkeypatch.setattr(chaos, "_STREAM_LIMIT_S", 1000.0)
    chaos._read_stream(_Response([chunk, usage, "data: [DONE]"]), whole)
    assert whole.ok
    short = RequestRecord(time.monotonic(), 0, "ok", expected_tokens=64)
    chaos._read_stream(_Response(["data: {\"choices\": [{\"delta\": {\"role\": \"assistant\"}}]}", "data: [DONE]"]),
                       short)
    assert short.outcome == "short_0_of_64" and not short.server_error
    monkeypatch.setattr(chaos, "_STREAM_LIMIT_S", 0.05)
    endless = RequestRecord(time.monotonic(), 0, "ok")
    chaos._read_stream(_Response([": keep-alive"] * 100, pause_s=0.01), endless)
    assert endless.outcome == "hung" and not endless.server_error


def test_a_client_still_waiting_when_traffic_stops_is_recorded_as_hung(monkeypatch):
    release = threading.Event()

    def never_answers(url, body):
        release.wait(5)
        return RequestRecord(0, 0, "ok")

    monkeypatch.setattr(chaos, "HUNG_AFTER_S", -29.9)  # (the join's wait: 0.1 s)
    with chaos.Traffic("http://unused", "m", 2, 4, send=never_answers) as traffic:
        time.sleep(0.05)
    release.set()
    assert [r.outcome for r in traffic.records] == ["hung", "hung"]


def test_a_fault_never_recovered_from_is_in_the_summary_line(capsys):
    results = [ScenarioResult("worker_death", None, None, 40, 0, 0, 0, unrecovered=True),
               ScenarioResult("overload", None, None, 900, 0, 0, 0)]
    assert "unrecovered=1" in chaos.print_table(results).splitlines()[-1]


@pytest.mark.parametrize("answer, failed, hung", [({"status": 504, "code": "request_timeout"}, 0, 0),
                                                  ({"status": 200, "code": None}, 1, 0), ({"status": None}, 1, 1)])
def test_the_overloads_long_request_must_end_in_a_504(monkeypatch, answer, failed, hung):
    class Quiet:
        def __init__(self, *args, **kwargs):
            self.records, self.answers = [], []

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            pass

    monkeypatch.setattr(chaos, "HealthWatch", Quiet)
    monkeypatch.setattr(chaos, "Traffic", Quiet)
    monkeypatch.setattr(chaos, "_timed_post", lambda url, body: answer if "stream_options" not in body else {})
    monkeypatch.setattr(chaos.time, "sleep", lambda seconds: None)
    result = chaos.run_overload(types.SimpleNamespace(url="http://unused", model="m"), clients=1, seconds=0)
    assert (result.failed, result.hung) == (failed, hung)
