"""Security of the service's edges: the admin API's token, the data plane's framing, what is deserialised,
and where models may be loaded from.

The admin router is mounted on the real OpenAI app (tiny engine) and driven in-process; the coordinator
behind it is a recording fake, so a test sees whether an unauthorised request reached it.
"""

from __future__ import annotations

import array
import ast
import dataclasses
import fcntl
import logging
import re
import socket
import termios
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route

from service import admin as admin_module
from service.admin import admin_router, token_digest
from service.app import create_app
from service.messages import (
    ERROR,
    FORWARD,
    HEADER,
    MAGIC,
    MAX_FRAME_BYTES,
    REPLY,
    ProtocolError,
    encode_forward,
    recv_frame,
    send_frame,
)
from service.transport import WorkerClient, WorkerServer, WorkerUnavailable
from service.worker import ExpertWorker, WorkerConfig
from tests.service.test_app import _start_engine
from tests.service.test_text import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-admin-token-4f9a1c2b7e"
MODEL = "vibe-test"
# Routes anyone may call; everything else must sit behind the admin token.
PUBLIC_ROUTES = {"/v1/models", "/v1/models/{model}", "/v1/completions", "/v1/chat/completions", "/v1/responses",
                 "/v1/responses/{response_id}", "/tokenize",
                 "/detokenize", "/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
CONTROL_WORDS = ("admin", "emulation", "profile", "recalibrate", "fault", "speed", "placement", "stats")


class RecordingCoordinator:
    """`CoordinatorClient` fake: records every call, answers like an empty coordinator."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def call(self, method: str, *args, **kwargs):
        self.calls.append(method)
        if method in ("placement_view",):
            return {"version": 1, "policy": "vibe", "layers": []}
        return {"method": method}


@pytest.fixture(scope="module")
def engine():
    engine = _start_engine(build_tokenizer(), max_model_len=128, max_num_seqs=2, max_num_batched_tokens=64)
    yield engine
    engine.shutdown()


def _app(engine, *, token: str | None = TOKEN, emulation: bool = True):
    coordinator = RecordingCoordinator()
    router = admin_router(coordinator, token_sha256=token_digest(token) if token else None, num_devices=4,
                          emulation=emulation)
    return create_app(engine, served_model_name=MODEL, extra_router=router), coordinator


def _routes(app) -> dict[str, set[str]]:
    """path -> methods of every route of `app`: API routes (included routers too) and plain ones (docs)."""
    routes = {path: {method.upper() for method in item} for path, item in app.openapi()["paths"].items()}
    for route in app.routes:
        if isinstance(route, Route) and not isinstance(route, APIRoute):
            routes[route.path] = set(route.methods)
    return routes


def _admin_requests(app) -> list[tuple[str, str, dict | None]]:
    """(method, path, json body) of every admin route of `app`, with a valid body where one is needed."""
    bodies = {"/admin/emulation/speed": {"device": 1, "speed": 0.5}, "/admin/emulation/fault": {"device": 1}}
    return [(method, path, bodies.get(path)) for path, methods in _routes(app).items()
            if path.startswith("/admin") for method in methods]


ADMIN_PATHS = {"/admin/placement", "/admin/stats", "/admin/recalibrate", "/admin/profile", "/admin/ui",
               "/admin/emulation/speed", "/admin/emulation/fault"}


@pytest.mark.parametrize("headers, status, error_type", [
    ({}, 401, "authentication_error"),
    ({"Authorization": "Bearer"}, 401, "authentication_error"),
    ({"Authorization": f"Basic {TOKEN}"}, 401, "authentication_error"),
    ({"Authorization": "Bearer wrong-token-0123456789"}, 403, "permission_error"),
    ({"Authorization": f"Bearer {TOKEN}x"}, 403, "permission_error"),
    ({"Authorization": f"Bearer {TOKEN[:-1]}"}, 403, "permission_error"),
])
def test_every_admin_route_refuses_missing_and_wrong_tokens_before_reaching_the_coordinator(
        engine, headers, status, error_type):
    app, coordinator = _app(engine)
    requests = _admin_requests(app)
    assert {path for _, path, _ in requests} >= ADMIN_PATHS
    with TestClient(app) as client:
        for method, path, body in requests:
            response = client.request(method, path, headers=headers, json=body)
            assert response.status_code == status, (method, path)
            assert response.json()["error"]["type"] == error_type
            if status == 401:  # RFC 7235: a 401 names the scheme to authenticate with
                assert response.headers["WWW-Authenticate"].startswith("Bearer"), (method, path)
    assert coordinator.calls == []


def test_the_right_token_reaches_the_coordinator_and_scheme_case_and_spaces_do_not_matter(engine):
    app, coordinator = _app(engine)
    with TestClient(app) as client:
        for header in (f"Bearer {TOKEN}", f"bearer  {TOKEN} ", f"BEARER {TOKEN}"):
            assert client.get("/admin/stats", headers={"Authorization": header}).status_code == 200
    assert coordinator.calls == ["stats_view"] * 3


def test_admin_disabled_without_a_token_and_emulation_controls_only_on_emulated_devices(engine):
    disabled, coordinator = _app(engine, token=None)
    requests = _admin_requests(disabled)
    assert {path for _, path, _ in requests} >= ADMIN_PATHS  # disabled means 404, not absent
    with TestClient(disabled) as client:
        for method, path, body in requests:
            response = client.request(method, path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
            assert response.status_code == 404 and "disabled" in response.json()["error"]["message"]
    assert coordinator.calls == []
    real_devices, _ = _app(engine, emulation=False)
    assert not [path for _, path, _ in _admin_requests(real_devices) if "emulation" in path]


def test_a_wrong_method_or_path_under_admin_is_answered_after_the_token_check(engine):
    """A wrong method on an admin path answered 405 before the token check, also with the admin API disabled (which
    says 404 for every /admin route), telling an unauthenticated caller which control routes exist (a review)."""
    enabled, coordinator = _app(engine)
    disabled, _ = _app(engine, token=None)
    right = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(enabled) as client, TestClient(disabled) as off:
        for method, path in (("GET", "/admin/recalibrate"), ("DELETE", "/admin/stats"), ("GET", "/admin/nothing")):
            assert off.request(method, path, headers=right).status_code == 404
            assert client.request(method, path).status_code == 401
            answer = client.request(method, path, headers=right)
            assert answer.status_code == (404 if path == "/admin/nothing" else 405), (method, path)
            assert answer.json()["error"]["message"]
        assert client.get("/admin/stats", headers=right).status_code == 200  # (the routes themselves still answer)
    assert coordinator.calls == ["stats_view"]


def test_control_routes_exist_only_under_the_admin_prefix(engine):
    app, _ = _app(engine)
    unauthenticated = {path for path in _routes(app) if not path.startswith("/admin/")}
    assert unauthenticated <= PUBLIC_ROUTES
    for path in unauthenticated:
        assert not any(word in path for word in CONTROL_WORDS), path


def test_tokens_are_compared_as_digests_in_constant_time(engine, monkeypatch):
    compared = []

    def recording_compare(a, b):
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(admin_module.hmac, "compare_digest", recording_compare)
    app, _ = _app(engine)
    with TestClient(app) as client:
        client.get("/admin/stats", headers={"Authorization": "Bearer short"})
        client.get("/admin/stats", headers={"Authorization": "Bearer " + "long" * 500})
    # Both sides are SHA-256 hex digests: equal length whatever was presented, and never the token itself.
    assert len(compared) == 2 and all(len(a) == len(b) == 64 for a, b in compared)
    assert all(TOKEN not in a + b and re.fullmatch(r"[0-9a-f]{64}", a) for a, b in compared)


def test_no_token_is_echoed_or_logged(engine, caplog):
    wrong = "wrong-but-plausible-token-99"
    app, _ = _app(engine)
    caplog.set_level(logging.DEBUG)
    seen = []
    with TestClient(app) as client:
        for token in (TOKEN, wrong):
            for method, path, body in _admin_requests(app):
                response = client.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"})
                seen.append(response.text + str(response.headers))
    logged = caplog.text + " ".join(str(record.args) for record in caplog.records)
    for token in (TOKEN, wrong):
        assert token not in logged and not any(token in text for text in seen)


def test_the_ingress_keeps_only_the_token_digest():
    from service.deployments import IngressSettings

    names = {f.name for f in dataclasses.fields(IngressSettings)}
    assert [name for name in names if "admin" in name or "secret" in name] == ["admin_token_sha256"]


# --- data plane framing ---------------------------------------------------------------------------


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def _unread_bytes(sock: socket.socket) -> int:
    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    return count[0]


def test_a_header_claiming_a_huge_frame_commits_no_memory_until_bytes_arrive():
    left, right = socket.socketpair()
    num_tokens, hidden = MAX_FRAME_BYTES // (4 * 4096), 4096  # float32: exactly the 2 GiB limit
    header = HEADER.pack(MAGIC, FORWARD, 0, 0, 1, num_tokens, hidden, 7)
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            recv_frame(right)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    before = _rss_bytes()
    reader = threading.Thread(target=receive)
    reader.start()
    left.sendall(header + np.array([0], np.int32).tobytes() + np.array([num_tokens], np.int32).tobytes() + b"x" * 1000)
    deadline = time.monotonic() + 10
    while _unread_bytes(right) and time.monotonic() < deadline:  # until the reader took all that was sent
        time.sleep(0.01)
    assert _unread_bytes(right) == 0 and reader.is_alive()  # it now waits for the rest of the claimed 2 GiB
    grown = _rss_bytes() - before
    left.close()
    reader.join(10)
    right.close()
    assert grown < 256 * 2**20, f"a bare header made the receiver commit {grown / 2**20:.0f} MiB"
    assert len(errors) == 1 and isinstance(errors[0], ProtocolError) and "mid-frame" in str(errors[0])


@pytest.mark.parametrize("header, message", [
    (HEADER.pack(b"HTTP", FORWARD, 0, 0, 0, 0, 0, 0), "bad frame header"),
    (HEADER.pack(MAGIC, 9, 0, 0, 0, 0, 0, 0), "bad frame header"),
    (HEADER.pack(MAGIC, FORWARD, 77, 0, 0, 0, 0, 0), "unknown dtype"),
    (HEADER.pack(MAGIC, FORWARD, 0, 0, 1, 2**20, 2**10, 0), "frame too large"),  # 4 GiB of float32
    (HEADER.pack(MAGIC, FORWARD, 0, 0, 2**21, 1, 1, 0), "frame too large"),  # 2M experts
    (HEADER.pack(MAGIC, ERROR, 0, 0, 0, 2**32 - 1, 0, 0), "error message too large"),
])
def test_malformed_or_oversized_headers_are_refused_before_any_body_is_read(header, message):
    left, right = socket.socketpair()
    with left, right:
        left.sendall(header)
        right.settimeout(5)
        with pytest.raises(ProtocolError, match=message):
            recv_frame(right)


def test_forward_token_counts_must_add_up():
    left, right = socket.socketpair()
    with left, right:
        buffers = encode_forward(1, 0, np.array([0, 1], np.int32), np.array([3, -1], np.int32), torch.zeros(2, 4))
        send_frame(left, buffers)
        with pytest.raises(ProtocolError, match="do not add up"):
            recv_frame(right)


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with our bytes unread
        return True


def test_a_worker_drops_hostile_connections_and_keeps_serving_good_ones():
    worker = ExpertWorker(WorkerConfig(index=0, profile_shape=(8, 16)))
    server = WorkerServer(worker)
    try:
        port = int(server.tcp_address.rsplit(":", 1)[1])
        with WorkerClient(server.tcp_address, timeout_s=10) as good:
            hostile = [b"GET / HTTP/1.1\r\nHost: worker\r\nUser-Agent: curl\r\n\r\n",
                       HEADER.pack(MAGIC, REPLY, 0, 0, 0, 0, 0, 0),  # workers accept FORWARD frames only
                       HEADER.pack(MAGIC, ERROR, 0, 0, 0, 2**31, 0, 0)]
            for payload in hostile:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(payload)
                    assert _closed_by_peer(sock)  # the worker closed this connection, and only this one
            # A good request on the open connection is still answered (an ERROR: it holds no experts).
            good.send_forward(3, 0, np.array([0], np.int32), np.array([1], np.int32), torch.zeros(1, 8))
            with pytest.raises(Exception, match="layer 0 seq 3") as failure:
                good.recv_reply()
            assert not isinstance(failure.value, WorkerUnavailable)
    finally:
        server.close()


# --- what is deserialised, and from where models are loaded ----------------------------------------

_UNSAFE_CALLS = {"pickle.load", "pickle.loads", "marshal.loads", "yaml.load", "yaml.unsafe_load", "torch.load",
                 "eval", "exec", "ray.cloudpickle.loads", "cloudpickle.loads", "dill.loads", "shelve.open"}


def _called_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            names.add(ast.unparse(node.func))
            if any(k.arg in ("allow_pickle", "trust_remote_code") and ast.unparse(k.value) == "True"
                   for k in node.keywords):
                names.add(f"{ast.unparse(node.func)}(... {[k.arg for k in node.keywords]} ...)")
    return names


def test_no_runtime_code_deserialises_untrusted_data():
    sources = [p for folder in ("service", "deploy", "placement") for p in (REPO / folder).rglob("*.py")]
    assert sources
    found = {f"{p.relative_to(REPO)}: {name}" for p in sources for name in _called_names(ast.parse(p.read_text()))
             if name in _UNSAFE_CALLS or "..." in name}
    assert not found


def test_build_app_loads_models_only_from_configured_folders(tmp_path):
    from deploy.app import build_app

    outside = tmp_path / "outside-model"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    for model in (str(outside), "../../../../etc", "/etc", "Qwen/Qwen3-30B-A3B", "deploy/models/../../service"):
        with pytest.raises(ValueError, match="not a checkpoint folder inside the allowed folders"):
            build_app({"model": model, "profile_prompts": None})


@pytest.mark.parametrize("token", ["shortsecret", "\u00e9" * 20, " padded-token-0123456789 "])
def test_bad_admin_tokens_are_refused_without_being_echoed(token, monkeypatch, tmp_path):
    from pydantic import ValidationError

    from deploy.app import AppArgs, build_app
    from tests.tiny_models import save_tiny_model

    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate({"admin_token": token})
    assert "admin_token" in str(info.value) and token.strip() not in str(info.value)
    model = save_tiny_model("qwen3_moe", tmp_path / "tiny")
    monkeypatch.setenv("VIBE_ADMIN_TOKEN", token)
    with pytest.raises(ValueError, match="admin_token") as env_info:
        build_app({"model": str(model), "model_roots": [str(tmp_path)], "profile_prompts": None, "num_devices": 4,
                   "speeds": [1.0] * 4})
    assert token.strip() not in str(env_info.value)
    good = AppArgs.model_validate({"admin_token": TOKEN})
    assert TOKEN not in repr(good) and TOKEN not in str(good.model_dump())


def test_every_operation_in_the_openapi_schema_has_its_own_id(engine):
    """GET and DELETE /v1/responses/{response_id} were one route with two methods: both got one operationId, so the
    schema that client generators read named one operation twice (FastAPI warned 'Duplicate Operation ID')."""
    app, _ = _app(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = app.openapi()
    ids = [op["operationId"] for item in schema["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert {"get", "delete"} <= set(schema["paths"]["/v1/responses/{response_id}"])
