"""The admin routes' behaviour behind a valid token (auth itself is in test_security.py): bodies, errors,
emulation-only routes, the placement page. The coordinator is a recording fake."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.admin import admin_router, render_placement_page, token_digest
from service.openai_api import APIError, error_response
from service.worker_pool import WorkerCallError

TOKEN = "admin-token-for-tests-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VIEW = {"version": 3, "policy": "vibe", "num_devices": 2, "num_experts": 2, "layers": [
    {"layer": 0, "imbalance": 1.25, "device_predicted_s": [0.002, 0.0015], "device_tokens": [30.0, 10.0],
     "slots": [{"slot": 0, "expert": 1, "device": 0, "share": 1.0}, {"slot": 1, "expert": 0, "device": 1, "share": 0.5},
               {"slot": 2, "expert": 0, "device": 1, "share": 0.5}]}]}


class Coordinator:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    async def call(self, method: str, *args, **kwargs):
        self.calls.append((method, args, kwargs))
        return VIEW if method == "placement_view" else {"status": "dry_run"}


def _client(emulation: bool, **router_args) -> tuple[TestClient, Coordinator]:
    coordinator = Coordinator()
    app = FastAPI()
    app.add_exception_handler(APIError, lambda request, exc: error_response(exc))
    app.include_router(admin_router(coordinator, token_sha256=token_digest(TOKEN), num_devices=2,
                                    emulation=emulation, **router_args))
    return TestClient(app), coordinator


@pytest.mark.parametrize("headers", [{}, {"Content-Type": "application/json"},
                                     {"Content-Type": "application/x-www-form-urlencoded"}])
def test_recalibrate_reads_json_whatever_the_content_type(headers):
    client, coordinator = _client(emulation=False)
    response = client.post("/admin/recalibrate", headers={**AUTH, **headers},
                           content=b'{"mode": "full", "dry_run": true, "policy": "eplb"}')
    assert response.status_code == 200
    assert coordinator.calls[-1] == ("recalibrate", (), {"policy": "eplb", "mode": "full", "dry_run": True,
                                                         "force": False, "reason": "admin", "admin": True})


def test_empty_recalibrate_body_means_defaults():
    client, coordinator = _client(emulation=False)
    assert client.post("/admin/recalibrate", headers=AUTH).status_code == 200
    assert coordinator.calls[-1][2]["mode"] == "incremental" and not coordinator.calls[-1][2]["dry_run"]
    assert client.post("/admin/recalibrate", headers=AUTH, json={"mode": "auto"}).status_code == 200
    assert coordinator.calls[-1][2]["mode"] == "auto"


def test_a_recalibration_hands_over_the_ingress_statistics_first_and_goes_on_if_that_fails():
    """The ingress reports its router statistics every 100 ms; a recalibration asked for right after the first
    requests must plan on them, so the route flushes them before calling the coordinator. A flush that fails
    (coordinator unreachable) does not stop the call: the coordinator's own answer says what is wrong."""
    order, failing = [], False

    async def flush() -> None:
        order.append("flush")
        if failing:
            raise TimeoutError("coordinator did not answer")

    client, coordinator = _client(emulation=False, flush_statistics=flush)
    original = coordinator.call

    async def call(method, *args, **kwargs):
        order.append(method)
        return await original(method, *args, **kwargs)

    coordinator.call = call
    assert client.post("/admin/recalibrate", headers=AUTH).status_code == 200
    assert client.get("/admin/placement", headers=AUTH).status_code == 200
    failing = True
    assert client.post("/admin/recalibrate", headers=AUTH).status_code == 200
    assert order == ["flush", "recalibrate", "placement_view", "flush", "recalibrate"]


@pytest.mark.parametrize("body,param", [(b"{nope", None), (b'{"mode": "partial"}', "mode"),
                                        (b'{"surprise": 1}', "surprise"), (b'[1, 2]', None)])
def test_bad_admin_bodies_are_400_naming_the_field(body, param):
    client, coordinator = _client(emulation=False)
    response = client.post("/admin/recalibrate", headers=AUTH, content=body)
    assert response.status_code == 400 and not coordinator.calls
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_emulation_routes_exist_only_with_emulation():
    real, _ = _client(emulation=False)
    assert real.post("/admin/emulation/speed", headers=AUTH, content=b'{"device": 0, "speed": 0.5}').status_code == 404
    emulated, coordinator = _client(emulation=True)
    assert emulated.post("/admin/emulation/speed", headers=AUTH, content=b'{"device": 1, "speed": 0.5}').status_code == 200
    assert coordinator.calls[-1] == ("set_emulated_speed", (1, 0.5), {})
    out_of_range = emulated.post("/admin/emulation/speed", headers=AUTH, content=b'{"device": 2, "speed": 0.5}')
    assert out_of_range.status_code == 400 and out_of_range.json()["error"]["param"] == "device"
    bad_speed = emulated.post("/admin/emulation/speed", headers=AUTH, content=b'{"device": 1, "speed": 0}')
    assert bad_speed.status_code == 400


@pytest.mark.parametrize("body,param", [
    (b'{"device": 1, "speed": 1e-300}', "speed"),  # accepted once: one expert call then emulated 1e296 s
    (b'{"device": 1, "speed": 0.009}', "speed"),
    (b'{"device": true, "speed": 0.5}', "device"),  # strict: not device 1
    (b'{"device": "1", "speed": 0.5}', "device"),
    (b'{"device": 1.0, "speed": 0.5}', "device"),
    (b'{"device": 1, "speed": "0.5"}', "speed"),
])
def test_emulation_bodies_are_strict_and_speeds_emulable(body, param):
    client, coordinator = _client(emulation=True)
    response = client.post("/admin/emulation/speed", headers=AUTH, content=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param and not coordinator.calls
    assert client.post("/admin/emulation/speed", headers=AUTH, content=b'{"device": 1, "speed": 1}').status_code == 200
    assert client.post("/admin/emulation/speed", headers=AUTH, content=b'{"device": 1, "speed": 0.01}').status_code == 200
    assert client.post("/admin/recalibrate", headers=AUTH, content=b'{"force": 1}').status_code == 400
    assert client.post("/admin/emulation/fault", headers=AUTH, content=b'{"device": 0, "operation": "error"}').json() == {
        "device": 0, "operation": "error", "armed": True}


def test_a_worker_that_does_not_answer_the_coordinator_is_a_503_naming_it():
    client, coordinator = _client(emulation=True)

    async def call(method, *args, **kwargs):
        raise WorkerCallError("device 1 is dead", [1])

    coordinator.call = call
    for method, path, body in [("POST", "/admin/profile", None), ("POST", "/admin/emulation/speed",
                                                                  {"device": 1, "speed": 0.5})]:
        response = client.request(method, path, headers=AUTH, json=body)
        error = response.json()["error"]
        assert response.status_code == 503 and error["code"] == "device_unavailable", response.text
        assert error["message"].startswith("device 1 is dead")



@pytest.mark.parametrize("body, key", [(b'{"dry_run": true, "mode": "full", "dry_run": false}', "dry_run"),
                                       (b'{"device": 1, "speed": 0.5, "device": 0}', "device")])
def test_a_key_given_twice_in_an_admin_body_is_a_400(body, key):
    """pydantic's JSON parser keeps a repeated key's last value, strict or not: a dry run that said otherwise at its
    end applied a re-plan, and a speed meant for one device set another's (a review)."""
    client, coordinator = _client(emulation=True)
    path = "/admin/recalibrate" if b"dry_run" in body else "/admin/emulation/speed"
    response = client.post(path, headers=AUTH, content=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == key
    assert f"{key!r} is given more than once" in response.json()["error"]["message"]
    assert coordinator.calls == []
    assert client.post(path, headers=AUTH, content=body.replace(f'"{key}"'.encode(), b'"force"', 1)
                       if key == "dry_run" else b'{"device": 1, "speed": 0.5}').status_code == 200


def test_a_coordinator_that_cannot_take_the_call_is_a_503():
    """Ray's errors for a coordinator replica that died or is restarting are no RayTaskError, and reached the admin
    as a 500 "internal server error"."""
    import asyncio

    from ray.exceptions import ActorUnavailableError

    from service.admin import CoordinatorUnavailable
    from service.deployments import _HandleClient

    class _Method:
        def remote(self, *args, **kwargs):
            async def fail():
                raise ActorUnavailableError("the actor is restarting", None)
            return fail()

    handle = type("Handle", (), {"stats_view": _Method()})()
    with pytest.raises(CoordinatorUnavailable, match="ActorUnavailableError"):
        asyncio.run(_HandleClient(handle).call("stats_view"))
    client, coordinator = _client(emulation=False)

    async def call(method, *args, **kwargs):
        raise CoordinatorUnavailable("the coordinator is unavailable (ActorDiedError)")

    coordinator.call = call
    response = client.get("/admin/stats", headers=AUTH)
    error = response.json()["error"]
    assert response.status_code == 503 and error["code"] == "coordinator_unavailable", response.text

def test_an_admin_call_while_another_is_in_the_coordinator_is_a_409():
    from service.coordinator import AdminBusy

    client, coordinator = _client(emulation=False)

    async def call(method, *args, **kwargs):
        assert kwargs.get("admin") is True  # (the coordinator lets one admin call in: it asks)
        raise AdminBusy("an admin recalibration is in progress: retry once it has answered")

    coordinator.call = call
    for path in ("/admin/recalibrate", "/admin/profile"):
        response = client.post(path, headers=AUTH)
        error = response.json()["error"]
        assert response.status_code == 409 and error["code"] == "admin_busy", response.text
        assert error["type"] == "conflict_error" and "recalibration is in progress" in error["message"]


def test_placement_page_shows_heatmaps_and_replicas():
    client, _ = _client(emulation=False)
    page = client.get("/admin/ui", headers=AUTH)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.count("<svg") == 2 and "0@1(0.50)" in page.text and "Placement version 3" in page.text
    assert "<script" not in render_placement_page(VIEW)
