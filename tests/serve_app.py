"""The whole app on a fresh local Ray cluster under Ray Serve, for the integration and GPU test modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from load_tests.compare import serve_apps


@contextlib.contextmanager
def serve_app(args: dict[str, Any], *, ready_timeout_s: float = 180.0) -> Iterator[str]:
    """`deploy.app.build_app(args)` served at `/` on 127.0.0.1 and a free port; yields the base URL once
    /health answers 200. Serve and Ray are shut down afterwards, also when the start fails."""
    with serve_apps({"vibe": args}, at_root=True, ready_timeout_s=ready_timeout_s) as (bases, _):
        yield bases["vibe"]
