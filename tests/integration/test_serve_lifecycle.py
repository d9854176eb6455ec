"""`service.deployments._app_going_away` on a real Ray Serve: when a coordinator replica stops, it takes the
expert workers only if its app is being deleted, and only once the app's ingress replicas have drained.

A small app named like ours (an "OpenAIIngress" deployment in front of a "Coordinator" one): the coordinator's
`__del__` calls the real `_app_going_away` and, when it answers True, removes a file standing for the expert
workers (what `CoordinatorDeployment.__del__` shuts down); the ingress holds each request ~5 s and answers 503
if the "workers" went meanwhile. Each `__del__` writes what `_app_going_away` returned, which ingress replica
actors were still alive then and whether the ingress's request had finished. The check read serve.status(),
which in Serve 2.60 lists no deployments of a DELETING app, so it never waited: the workers went at once and
the request being drained failed; only a run on the real Serve showed it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REQUEST_S = 5.0  # how long the ingress holds a request
DRAIN_S = 30.0  # the coordinator's drain_timeout_s: at most this long waiting for the ingress


@serve.deployment(name="Coordinator", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  graceful_shutdown_timeout_s=DRAIN_S + 30)  # outlasts the ingress's, as deploy/app.py sets it
class Coordinator:
    def __init__(self, folder: str, label: str):
        self.folder, self.label = Path(folder), label
        (self.folder / f"workers-{label}").touch()

    def __del__(self) -> None:
        from service.deployments import _app_going_away

        returned = _app_going_away(DRAIN_S, poll_s=0.2)
        context = serve.get_replica_context()
        ingress = f"SERVE_REPLICA::{context.app_name}#OpenAIIngress#"
        alive = sorted(entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
                       if entry["name"].startswith(ingress))
        finished = (self.folder / f"finished-{self.label}").exists()
        if returned:  # as CoordinatorDeployment.__del__ shuts the pool down
            (self.folder / f"workers-{self.label}").unlink()
        record = {"label": self.label, "returned": returned, "ingress_alive": alive, "request_finished": finished}
        with open(self.folder / "records.jsonl", "a") as out:
            out.write(json.dumps(record) + "\n")


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=DRAIN_S)
class OpenAIIngress:
    def __init__(self, coordinator, folder: str, label: str):
        self.coordinator, self.folder, self.label = coordinator, Path(folder), label

    async def __call__(self, request):
        import asyncio

        from starlette.responses import PlainTextResponse

        (self.folder / f"started-{self.label}").touch()
        await asyncio.sleep(REQUEST_S)  # generating: every step needs the workers
        if not (self.folder / f"workers-{self.label}").exists():
            return PlainTextResponse("the expert workers went", status_code=503)
        (self.folder / f"finished-{self.label}").touch()
        return PlainTextResponse("ok")


def _app(folder: Path, label: str):
    return OpenAIIngress.bind(Coordinator.bind(str(folder), label), str(folder), label)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(check, what: str, timeout_s: float = 60.0):
    """What ``check`` returns once it is truthy (polled)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout_s} s")


def _record(folder: Path, label: str) -> dict | None:
    """The record coordinator ``label``'s __del__ wrote, if it did."""
    path = folder / "records.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return next((r for r in map(json.loads, lines) if r["label"] == label), None)


@pytest.fixture(scope="module")
def base_url():
    # a cluster of its own ("local"), not one a developer's `ray start` left running
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def test_a_deleted_apps_coordinator_keeps_the_workers_until_its_ingress_drained(base_url, tmp_path):
    serve.run(_app(tmp_path, "v1"), name="going-away", route_prefix="/gone")
    response = {}
    request = threading.Thread(target=lambda: response.update(r=httpx.get(f"{base_url}/gone", timeout=60)))
    request.start()
    _wait_for(lambda: (tmp_path / "started-v1").exists(), "request on the ingress")
    serve.delete("going-away")  # stops the coordinator and the ingress together, the request in flight
    request.join(timeout=60)
    record = _wait_for(lambda: _record(tmp_path, "v1"), "record of the coordinator's __del__")
    # it answered True (the workers go) only once the ingress replica was gone, its request finished
    assert record == {"label": "v1", "returned": True, "ingress_alive": [], "request_finished": True}
    assert response["r"].status_code == 200 and response["r"].text == "ok"
    assert not (tmp_path / "workers-v1").exists()


def test_a_coordinator_replaced_while_its_app_stays_keeps_the_workers(base_url, tmp_path):
    serve.run(_app(tmp_path, "v1"), name="staying", route_prefix="/stay")
    serve.run(_app(tmp_path, "v2"), name="staying", route_prefix="/stay")  # a new version: v1's replicas stop
    record = _wait_for(lambda: _record(tmp_path, "v1"), "record of the replaced coordinator's __del__")
    assert record["returned"] is False and (tmp_path / "workers-v1").exists()
    assert httpx.get(f"{base_url}/stay", timeout=60).text == "ok"
    serve.delete("staying")
    record = _wait_for(lambda: _record(tmp_path, "v2"), "record of the deleted app's coordinator's __del__")
    assert record["returned"] is True and record["ingress_alive"] == []


def _workers(app: str) -> list[str]:
    """The expert workers of app `app` alive now, by name."""
    return sorted(entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
                  if entry["name"].startswith(f"vibe-worker-{app}-"))


def test_an_app_deleted_while_its_coordinator_starts_takes_the_new_workers_with_it(base_url):
    """The real coordinator (its start in a thread) of a real app: deleted while it profiles its workers, its
    `__del__` runs then and the workers it created go. Its constructor held the replica's loop, so `__del__` waited for
    the start, and Serve force-kills a replica at its graceful_shutdown_timeout_s (here 8 s, well within the start:
    the profile alone is 45 emulated calls of at least 0.3 s per worker): the new detached workers stayed, holding
    their devices, until another deploy of the app's name (a Serve review)."""
    from ray.serve import Application

    from deploy.app import build_app
    from deploy.cleanup import cleanup

    args = {"num_devices": 2, "speeds": [1.0, 1.0], "app_name": "slow-start", "profile_prompts": None,
            "emulation": {"fixed_s": 0.3, "jitter": 0.0, "throttle_floor": 1.0}}
    coordinator = build_app(args)._bound_deployment.init_args[0]._bound_deployment  # (the ingress's argument)
    serve._run(Application(coordinator.options(graceful_shutdown_timeout_s=8)), _blocking=False, name="slow-start",
               route_prefix=None)
    created = _wait_for(lambda: _workers("slow-start"), "expert worker of the starting app")
    assert serve.status().applications["slow-start"].status == "DEPLOYING"
    # (`deploy.cleanup` meanwhile: the starting coordinator cannot say which workers are its app's; nothing is killed)
    assert cleanup(timeout_s=1.0) == 1 and set(created) <= set(_workers("slow-start"))
    serve.delete("slow-start")
    _wait_for(lambda: not _workers("slow-start"), f"end of the workers {created} (killed with the app)", timeout_s=30)
