"""The hostile request corpus (`load_tests.fuzz_cases`) against the in-process OpenAI app with its admin API.

Every case must get the statuses it allows (a 4xx unless it says otherwise) with OpenAI error JSON when
the app answered, never a 5xx and never a hang; meanwhile good streaming requests get exactly the
tokens they get on a quiet server, the admin coordinator is never reached, and /health stays green.
`make chaos` sends the same corpus to the real Serve app.
"""

from __future__ import annotations

import hashlib
import threading

import httpx
import pytest

from load_tests.fuzz_cases import cases, send
from service.admin import admin_router
from service.app import create_app
from tests.service.test_app import _serve, _start_engine
from tests.service.test_security import RecordingCoordinator
from tests.service.test_text import build_tokenizer

MODEL = "vibe-test"
CASES = cases(MODEL)
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Say something about lists."}],
        "max_tokens": 24, "temperature": 0, "stream": True}


@pytest.fixture(scope="module")
def server():
    engine = _start_engine(build_tokenizer(), max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256)
    coordinator = RecordingCoordinator()
    admin = admin_router(coordinator, token_sha256=hashlib.sha256(b"a-token-nobody-guesses").hexdigest(),
                         num_devices=4, emulation=True)
    try:
        with _serve(create_app(engine, served_model_name=MODEL, extra_router=admin)) as url:
            yield url, coordinator
    finally:
        engine.shutdown()


def _good_stream(url: str) -> str:
    text = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=GOOD, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = httpx.Response(200, content=line[len("data: "):]).json()
                assert "error" not in chunk, chunk
                text += [c["delta"].get("content") or "" for c in chunk["choices"]]
    return "".join(text)


def test_the_corpus_is_large_and_named_uniquely():
    names = [case.name for case in CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_each_hostile_request_gets_a_4xx_openai_error_never_a_5xx(server, case):
    outcome = send(server[0], case, timeout_s=30)
    assert outcome.ok, outcome.problem


def test_good_streams_are_unaffected_while_the_corpus_runs_and_the_server_stays_healthy(server):
    url, coordinator = server
    expected = _good_stream(url)
    assert expected  # a quiet server streams real text to compare with
    results: list[str] = []
    stop = threading.Event()

    def keep_streaming() -> None:
        while not stop.is_set():
            try:
                results.append(_good_stream(url))
            except Exception as exc:  # noqa: BLE001 - recorded, so the assertion below names it
                results.append(f"failed: {exc!r}")

    streamers = [threading.Thread(target=keep_streaming) for _ in range(3)]
    for thread in streamers:
        thread.start()
    try:
        outcomes = [send(url, case, timeout_s=30) for case in CASES]
    finally:
        stop.set()
        for thread in streamers:
            thread.join(60)
    assert [o.problem for o in outcomes if not o.ok] == []
    assert len(results) >= 3 and set(results) == {expected}
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    assert coordinator.calls == []
