"""Test order for `make test`'s two processes (pytest-xdist, `--dist loadfile --no-loadscope-reorder`): each
process takes the next whole module as it runs short. Modules are handed out in collection order, so the long
ones go first (those that start a Ray cluster, then those with a slow test) and the many short ones even out the
end; in the collection's own order the last module out could be a Ray one that runs minutes after the other
process has finished. Within a module, and among modules of one kind, the collection's order stays."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ray = {item.path for item in items if item.get_closest_marker("ray")}
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in ray, item.path not in slow))  # stable: modules stay whole
