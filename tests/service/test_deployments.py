"""The ingress's client of the coordinator deployment, without a cluster: a Serve handle's errors."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayTaskError

from service.deployments import _HandleClient
from service.openai_api import error_body


class _Handle:
    """A Serve deployment handle whose every method fails remotely with `cause`, as Serve raises it."""

    def __init__(self, cause: Exception) -> None:
        self.error = RayTaskError("recalibrate", "Traceback (most recent call last):\n  File ...\n", cause,
                                  proctitle="ray::ServeReplica:vibe:Coordinator", pid=4242, ip="192.0.2.2")

    def __getattr__(self, method: str):
        handle = self

        class _Method:
            def remote(self, *args, **kwargs):
                async def fail():
                    raise handle.error.as_instanceof_cause()
                return fail()
        return _Method()


def test_a_coordinator_error_is_raised_as_its_cause_and_answered_with_its_own_message():
    cause = ValueError("no router statistics yet: serve some requests first")
    handle = _Handle(cause)
    assert isinstance(handle.error.as_instanceof_cause(), ValueError)  # what made error replies quote the traceback
    assert "192.0.2.2" in str(handle.error.as_instanceof_cause())
    with pytest.raises(ValueError) as info:
        asyncio.run(_HandleClient(handle).call("recalibrate"))
    assert info.value is cause and isinstance(info.value.__cause__, RayTaskError)
    assert error_body(info.value) == (400, {"error": {"message": "no router statistics yet: serve some requests first",
                                                      "type": "invalid_request_error", "param": None, "code": None}})
