"""`deploy.cleanup`: which expert workers no app claims (names only), and that nothing is killed while a coordinator
cannot say which are its app's (no Ray: its calls faked)."""

import io

from deploy import cleanup

NAMED = [
    {"namespace": "vibe", "name": "vibe-worker-vibe-0123abcd-0"},
    {"namespace": "vibe", "name": "vibe-worker-vibe-2-89abcdef-0"},  # app "vibe-2": "vibe-worker-vibe-" begins it
    {"namespace": "vibe", "name": "vibe-worker-old-name-0123abcd-1"},  # an app_name changed on a running app
    {"namespace": "other", "name": "vibe-worker-vibe-0123abcd-0"},  # not ours: another namespace
    {"namespace": "vibe", "name": "vibe-worker-vibe-notes"},  # not a worker's name
    {"namespace": "serve", "name": "SERVE_REPLICA::vibe#Coordinator#abc123"},
    {"namespace": "serve", "name": "SERVE_REPLICA::vibe-2#OpenAIIngress#def456"},  # vibe-2's coordinator is gone
]


def test_a_family_claims_its_own_workers_only():
    workers, apps = cleanup._named(NAMED)
    assert workers == ["vibe-worker-vibe-0123abcd-0", "vibe-worker-vibe-2-89abcdef-0", "vibe-worker-old-name-0123abcd-1"]
    assert apps == ["vibe"]
    assert cleanup.unclaimed(workers, ["vibe-worker-vibe-"]) == ["vibe-worker-old-name-0123abcd-1",
                                                                 "vibe-worker-vibe-2-89abcdef-0"]
    assert cleanup.unclaimed(workers, ["vibe-worker-vibe-", "vibe-worker-vibe-2-", "vibe-worker-old-name-"]) == []
    assert cleanup.unclaimed(workers, []) == sorted(workers)


def _fake_cluster(monkeypatch, families, silent):
    import ray

    killed = []
    monkeypatch.setattr(ray.util, "list_named_actors", lambda all_namespaces=False: NAMED)
    monkeypatch.setattr(cleanup, "_families", lambda apps, timeout_s: (families, silent))
    monkeypatch.setattr(cleanup, "_kill", killed.extend)
    return killed


def test_the_workers_no_coordinator_claims_are_killed_and_listed(monkeypatch):
    killed, out = _fake_cluster(monkeypatch, ["vibe-worker-vibe-"], []), io.StringIO()
    assert cleanup.cleanup(dry_run=True, out=out) == 0 and killed == []
    assert out.getvalue() == ("3 expert worker(s), 1 app(s) with a coordinator (vibe); 2 claimed by none: "
                              "vibe-worker-old-name-0123abcd-1 vibe-worker-vibe-2-89abcdef-0\n")
    assert cleanup.cleanup(out=out) == 0
    assert killed == ["vibe-worker-old-name-0123abcd-1", "vibe-worker-vibe-2-89abcdef-0"]
    assert out.getvalue().endswith("killed 2 worker(s)\n")


def test_nothing_is_killed_while_a_coordinator_cannot_say_which_workers_are_its_apps(monkeypatch):
    killed, out = _fake_cluster(monkeypatch, [], ["vibe (TimeoutError)"]), io.StringIO()
    assert cleanup.cleanup(out=out) == 1 and killed == []
    assert "not killing anything: the coordinator of vibe (TimeoutError) did not answer" in out.getvalue()
