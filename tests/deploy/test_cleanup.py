"""`deploy.cleanup`: which expert workers no app claims (names only), and that nothing is killed while which workers
are an app's cannot be told (no Ray: the cluster's state and the coordinators' answers faked)."""

import io

import pytest

from deploy import cleanup
from deploy.cleanup import Snapshot

WORKERS = ("vibe-worker-old-name-0123abcd-1",  # an app_name changed on a running app
           "vibe-worker-vibe-0123abcd-0",
           "vibe-worker-vibe-2-89abcdef-0")  # app "vibe-2": "vibe-worker-vibe-" begins its names
OURS = frozenset({"Coordinator", "OpenAIIngress"})
RUNNING = Snapshot(WORKERS, {"vibe": ("RUNNING", OURS), "other": ("RUNNING", frozenset({"other"}))},
                   {"vibe": OURS, "other": frozenset({"other"})})


def test_a_family_claims_its_own_workers_only():
    assert cleanup.unclaimed(WORKERS, ["vibe-worker-vibe-"]) == ["vibe-worker-old-name-0123abcd-1",
                                                                 "vibe-worker-vibe-2-89abcdef-0"]
    assert cleanup.unclaimed(WORKERS, ["vibe-worker-vibe-", "vibe-worker-vibe-2-", "vibe-worker-old-name-"]) == []
    assert cleanup.unclaimed(WORKERS, []) == list(WORKERS)
    assert not cleanup.WORKER_NAME.fullmatch("vibe-worker-vibe-notes")


@pytest.mark.parametrize(("apps", "replicas", "reason"), [
    ({"vibe": ("RUNNING", OURS)}, {"vibe": OURS}, None),
    ({"other": ("DEPLOYING", frozenset({"other"}))}, {}, None),  # not ours
    # a redeploy that failed: the earlier version's ingress replicas still serve on the workers it adopted
    ({"vibe": ("DEPLOY_FAILED", OURS)}, {"vibe": frozenset({"OpenAIIngress"})}, "vibe (DEPLOY_FAILED)"),
    ({"vibe": ("DEPLOYING", OURS)}, {"vibe": OURS}, "vibe (DEPLOYING)"),  # (app_name changed: both names in use)
    ({"vibe": ("DELETING", frozenset())}, {"vibe": frozenset({"OpenAIIngress"})}, "vibe (DELETING)"),  # draining
    ({"vibe": ("RUNNING", OURS)}, {"vibe": frozenset({"OpenAIIngress"})}, "vibe (no coordinator replica)"),
    ({}, {"vibe": frozenset({"Coordinator"})}, "vibe (not listed)"),
])
def test_an_app_whose_workers_cannot_be_told_now_blocks_the_cleanup(apps, replicas, reason):
    assert cleanup.undecided(Snapshot(WORKERS, apps, replicas)) == ([reason] if reason else [])


def _fake_cluster(monkeypatch, snapshots, families=("vibe-worker-vibe-",), silent=()):
    killed, asked = [], []
    snapshots = list(snapshots)
    monkeypatch.setattr(cleanup, "take_snapshot", lambda: snapshots.pop(0))
    monkeypatch.setattr(cleanup, "_families", lambda apps, timeout_s: asked.append(apps) or (list(families),
                                                                                           list(silent)))
    monkeypatch.setattr(cleanup, "_kill", killed.extend)
    return killed, asked


def test_the_workers_no_coordinator_claims_are_listed_then_killed(monkeypatch):
    out = io.StringIO()
    killed, asked = _fake_cluster(monkeypatch, [RUNNING, RUNNING, RUNNING])
    assert cleanup.cleanup(dry_run=True, out=out) == 0 and killed == []
    assert out.getvalue() == ("3 expert worker(s), 1 app(s) with a coordinator (vibe); 2 claimed by none: "
                              "vibe-worker-old-name-0123abcd-1 vibe-worker-vibe-2-89abcdef-0\n")
    assert cleanup.cleanup(out=out) == 0 and asked == [["vibe"], ["vibe"]]
    assert killed == ["vibe-worker-old-name-0123abcd-1", "vibe-worker-vibe-2-89abcdef-0"]
    assert out.getvalue().endswith("killed 2 worker(s)\n")


def test_nothing_is_killed_while_a_coordinator_cannot_answer_or_the_apps_change(monkeypatch):
    out = io.StringIO()
    killed, _ = _fake_cluster(monkeypatch, [RUNNING], families=(), silent=["vibe (TimeoutError: late)"])
    assert cleanup.cleanup(out=out) == 1 and killed == []
    assert "cannot be told now for vibe (TimeoutError: late)" in out.getvalue()
    redeployed = Snapshot(WORKERS, {**RUNNING.apps, "vibe-2": ("DEPLOYING", OURS)}, RUNNING.replicas)
    killed, _ = _fake_cluster(monkeypatch, [RUNNING, redeployed])  # (its coordinator may adopt vibe-2's workers)
    assert cleanup.cleanup(out=out) == 1 and killed == []
    assert out.getvalue().endswith("the cluster's apps changed meanwhile; run this again\n")
    failed = Snapshot(WORKERS, {"vibe": ("DEPLOY_FAILED", OURS)}, {"vibe": frozenset({"OpenAIIngress"})})
    killed, asked = _fake_cluster(monkeypatch, [failed])
    assert cleanup.cleanup(out=out) == 1 and killed == [] and asked == []
