"""Test order for `make test`'s two processes (pytest-xdist, `--dist loadfile --no-loadscope-reorder`): each
process takes the next whole module as it runs short, in collection order. The long modules go first (those that
start a Ray cluster, then those with a slow test) and the many short ones even out the end. xdist's own order (most
tests first) handed out the Ray modules, few tests each, last: one process ran alone for their last minutes.
Within a module, and among modules of one kind, the collection's order stays."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    ray = {item.path for item in items if item.get_closest_marker("ray")}
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in ray, item.path not in slow))  # stable: modules stay whole
