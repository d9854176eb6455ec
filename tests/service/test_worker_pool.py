"""Which named actors a Ray worker pool retires at start (pure name logic; no Ray)."""

from service.worker_pool import RayPoolConfig, is_stray

CONFIG = RayPoolConfig(name_prefix="vibe-worker-vibe-0123abcd", family_prefix="vibe-worker-vibe-")


def test_workers_of_an_earlier_configuration_of_the_same_app_are_strays():
    assert is_stray("vibe-worker-vibe-89abcdef-3", CONFIG)


def test_current_workers_and_other_apps_workers_are_not():
    assert not is_stray("vibe-worker-vibe-0123abcd-3", CONFIG)  # the current configuration
    assert not is_stray("vibe-worker-vibe-2-89abcdef-3", CONFIG)  # app "vibe-2" shares the prefix
    assert not is_stray("vibe-worker-vibe-notes", CONFIG)
    assert not is_stray("vibe-worker-vibe-89abcdef-3", RayPoolConfig(name_prefix="x"))  # no family given
