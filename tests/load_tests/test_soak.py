"""The soak's measurements on synthetic inputs (no Ray), from a review of the harness: a leak hidden by a restart,
requests dropped when their client raised, latency drift pooled away."""

from __future__ import annotations

import time

from load_tests import soak
from load_tests.chaos import RequestRecord, _read_stream


def test_a_restarted_processs_leak_is_kept_in_the_growth_summed_over_processes():
    """A worker leaking 8 MiB/min, killed at 500 s and restarted under a new pid, still leaking: the total fell
    back at the restart (+12.7 MiB over 10 minutes, a negative slope) and nothing said a process had gone."""
    samples = []
    for k in range(121):
        t = 5.0 * k
        rss = {"raylet[10]": 300.0, "ExpertWorkerActor[31]": 400.0}
        if t < 500:
            rss["ExpertWorkerActor[34]"] = 400.0 + 8.0 * t / 60
        elif t >= 505:
            rss["ExpertWorkerActor[99]"] = 400.0 + 8.0 * (t - 505) / 60
        samples.append((t, rss))
    report = soak.memory_report(samples)
    assert report["total"]["end_mib"] - report["total"]["start_mib"] < 15  # what the total alone shows
    workers = report["processes"]["ExpertWorkerActor"]
    assert (workers["processes"], workers["exited"], workers["appeared"]) == (3, 1, 1)
    assert 78 < workers["growth_summed_mib"] < 80  # 66.5 before the kill, 12.7 after it
    assert report["processes"]["all"]["exited"] == 1 and report["processes"]["raylet"]["growth_summed_mib"] == 0
    assert soak.memory_report([])["total"]["end_mib"] is None  # (no sample in the soak: it raised IndexError)


def test_process_memory_shares_out_the_pages_processes_share():
    """The total summed RSS over processes, counting pages they share (Ray's object store, torch's libraries) once
    in each; PSS shares each page out: at most the RSS, and summable."""
    import os

    rss, pss = soak.process_memory(os.getpid())
    assert rss > 10 and pss is not None and 0 < pss <= rss


class _Response:
    def __init__(self, lines):
        self._lines = lines

    def iter_lines(self):
        return iter(self._lines)


def test_a_malformed_chunk_is_a_failure_and_every_request_sent_is_recorded(monkeypatch):
    """A chunk of an unforeseen shape raised out of the stream reader (AttributeError, TypeError): the soak dropped
    the request from its count and its errors (88 sent, 79 recorded, 0 errors)."""
    for lines in (['data: {"error": "overloaded"}'], ['data: {"choices": null}'], ['data: {"choices": [1]}']):
        record = RequestRecord(time.monotonic(), 0, "ok")
        _read_stream(_Response(lines), record)
        assert record.outcome == "stream_malformed" and record.server_error, lines
    sent = []

    def answered(url, body):
        sent.append(body)
        if len(sent) % 10 == 0:
            raise RuntimeError("a client bug")
        record = RequestRecord(time.monotonic(), 0, "ok")
        _read_stream(_Response(['data: {"error": "overloaded"}'] if len(sent) % 10 == 5 else
                               ['data: {"choices": [{"delta": {"content": "x"}}]}', "data: [DONE]"]), record)
        record.ended = time.monotonic()
        return record

    monkeypatch.setattr(soak, "stream_request", answered)
    records = soak.poisson_load("http://unused", "m", rate=200.0, seconds=0.3)
    assert len(records) == len(sent) > 20
    failed = [r for r in records if not r.ok]
    assert len(failed) == len(sent) // 10 + (len(sent) + 5) // 10
    assert {r.outcome for r in failed} == {"client_RuntimeError", "stream_malformed"}


def test_latency_that_climbs_through_the_run_is_reported_as_drift():
    """Pooled percentiles of a latency climbing from 3 s to 6 s equal those of the same values in any order: the
    report has each tenth's p50 and p99, the last tenth's p50 over the first's, and the slope."""
    def records(latencies):
        return [RequestRecord(float(i), float(i) + latency, "ok") for i, latency in enumerate(latencies)]

    climbing = [3.0 + 3.0 * i / 599 for i in range(600)]
    steady = climbing[::2] + climbing[1::2][::-1]  # the same values, no trend
    drift, flat = soak.latency_report(records(climbing)), soak.latency_report(records(steady))
    assert drift["p50_s"] == flat["p50_s"] and drift["p99_s"] == flat["p99_s"]
    assert drift["by_tenth"][0]["p50_s"] < 3.2 and drift["by_tenth"][-1]["p50_s"] > 5.8
    assert drift["p50_last_over_first"] > 1.8 and abs(drift["slope_s_per_min"] - 0.3) < 0.01
    assert 0.9 < flat["p50_last_over_first"] < 1.1 and abs(flat["slope_s_per_min"]) < 0.05
    assert soak.latency_report(records([1.0] * 5))["by_tenth"] is None
