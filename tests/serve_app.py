"""The whole app on a fresh local Ray cluster under Ray Serve, for the integration and GPU test modules."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(args: dict[str, Any], *, num_cpus: int, ready_timeout_s: float = 180.0) -> Iterator[str]:
    """`deploy.app.build_app(args)` served on 127.0.0.1 and a free port; yields the base URL once /health
    answers 200. Serve and Ray are shut down afterwards, also when the start fails."""
    import ray
    from ray import serve

    from deploy.app import build_app

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="vibe", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the app was not healthy within {ready_timeout_s:g} s")
            time.sleep(0.5)
        yield base
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
