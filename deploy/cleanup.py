"""Kill the expert workers no running app claims: `python -m deploy.cleanup [--address ADDR] [--dry-run]`.

The workers are detached Ray actors (namespace "vibe", named `vibe-worker-<app_name>-<fingerprint>-<device>`): they
outlive a coordinator restart, and the coordinator kills them when its app is deleted. Some ways of ending an app
leave them running, each holding its device: `app_name` changed on a running app (the new coordinator looks for
workers under the new name), `serve shutdown` or `serve delete` while no coordinator replica was up (it crashed, or
Serve was restarting it), a Ray Serve controller killed by hand. This command asks every coordinator replica alive
which workers are its app's (`worker_family`) and kills the others, each asked to close its data plane first (as the
coordinator's own shutdown does). While that cannot be told (an app that has or may have a coordinator is not
RUNNING: starting, a failed redeploy whose earlier replicas still serve, deleting; or its coordinator replica is down
or does not answer, or is of a version without `worker_family`), or when the apps changed while it checked, nothing
is killed and the exit code is 1: run it again once the apps are RUNNING.
`--dry-run` lists what would be killed. Exit code 0 otherwise (also when there is nothing to kill).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

NAMESPACE = "vibe"  # service.worker_pool.RayPoolConfig.namespace
WORKER_NAME = re.compile(r"vibe-worker-.+-[0-9a-f]{8}-\d+")  # deploy.app: worker_family(app) + fingerprint + device
REPLICA = re.compile(r"SERVE_REPLICA::(?P<app>.+)#(?P<deployment>[^#]+)#[^#]+")  # Serve's replica actor names
SHUTDOWN_WAIT_S = 5.0  # how long the workers have to close their data planes before they are killed


@dataclass(frozen=True)
class Snapshot:
    """What the cluster runs: its expert workers' names, each Serve app's status and deployments (as serve.status()
    lists them), and the deployments each app has replica actors of."""

    workers: tuple[str, ...]
    apps: dict[str, tuple[str, frozenset[str]]]
    replicas: dict[str, frozenset[str]]


def unclaimed(workers: Iterable[str], families: Iterable[str]) -> list[str]:
    """The workers among `workers` no app of `families` claims (`service.worker_pool.in_family`), sorted."""
    from service.worker_pool import in_family

    families = list(families)
    return sorted(name for name in workers if not any(in_family(name, family) for family in families))


def undecided(snapshot: Snapshot) -> list[str]:
    """Why the apps of `snapshot` whose workers cannot be told now cannot (each app's reason): an app not RUNNING
    that is or may be ours (a Coordinator deployment, or none listed: DELETING lists none), whose ingress replicas
    may serve on workers no coordinator of it claims (a failed redeploy keeps the earlier version's; a rolling update
    of `app_name` drains on the earlier name's), or one with replicas and no coordinator replica (crashed, being
    replaced)."""
    reasons = []
    for app in sorted(set(snapshot.apps) | set(snapshot.replicas)):
        status, deployments = snapshot.apps.get(app, ("not listed", frozenset()))
        replicas = snapshot.replicas.get(app, frozenset())
        ours = "Coordinator" in deployments | replicas or not deployments
        if status != "RUNNING" and ours:
            reasons.append(f"{app} ({status})")
        elif "Coordinator" in deployments and "Coordinator" not in replicas:
            reasons.append(f"{app} (no coordinator replica)")
    return reasons


def take_snapshot() -> Snapshot:
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)
    workers = tuple(sorted(entry["name"] for entry in named
                           if entry["namespace"] == NAMESPACE and WORKER_NAME.fullmatch(entry["name"])))
    replicas: dict[str, set[str]] = {}
    for entry in named:
        if match := REPLICA.fullmatch(entry["name"]):
            replicas.setdefault(match["app"], set()).add(match["deployment"])
    apps = {}
    if any(entry["name"] == "SERVE_CONTROLLER_ACTOR" for entry in named):  # (else no Serve: no app)
        from ray import serve

        apps = {name: (str(getattr(app.status, "value", app.status)), frozenset(app.deployments))
                for name, app in serve.status().applications.items()}
    return Snapshot(workers, apps, {app: frozenset(names) for app, names in replicas.items()})


def _families(apps: list[str], timeout_s: float) -> tuple[list[str], list[str]]:
    """Each app's worker family as its coordinator says (`CoordinatorDeployment.worker_family`), and why the apps
    whose coordinator did not answer within `timeout_s` did not."""
    from ray import serve

    from service.deployments import answer

    families, silent = [], []
    for app in apps:
        try:  # (a late call cancelled)
            families.append(answer(serve.get_deployment_handle("Coordinator", app_name=app).worker_family.remote(),
                                   timeout_s))
        except Exception as exc:  # hung, gone meanwhile, or a version without the method
            silent.append(f"{app} ({type(exc).__name__}: {str(exc)[:200]})")
    return families, silent


def _kill(names: list[str]) -> None:
    import ray

    from service.worker_pool import stop_actors

    actors = []
    for name in names:
        with contextlib.suppress(ValueError):  # gone meanwhile
            actors.append(ray.get_actor(name, namespace=NAMESPACE))
    stop_actors(actors, SHUTDOWN_WAIT_S)


def cleanup(*, dry_run: bool = False, timeout_s: float = 10.0, out=sys.stdout) -> int:
    """Kill (or with `dry_run`, list) the expert workers of the connected Ray cluster no app claims; the exit code."""
    before = take_snapshot()
    blocked = undecided(before)
    coordinated = sorted(app for app, (_, deployments) in before.apps.items() if "Coordinator" in deployments)
    families, silent = ([], []) if blocked else _families(coordinated, timeout_s)
    if blocked or silent:
        print("not killing anything: which workers are the app's cannot be told now for "
              + "; ".join(blocked or silent) + " (run this again once the app is RUNNING; a coordinator of a version "
              "before deploy.cleanup cannot answer: upgrade it)", file=out)
        return 1
    orphans = unclaimed(before.workers, families)
    print(f"{len(before.workers)} expert worker(s), {len(coordinated)} app(s) with a coordinator "
          f"({', '.join(coordinated) or 'none'}); {len(orphans)} claimed by none{':' if orphans else ''} "
          f"{' '.join(orphans)}".rstrip(), file=out)
    if not orphans or dry_run:
        return 0
    after = take_snapshot()  # (an app deployed meanwhile may have adopted them)
    if (after.apps, after.replicas) != (before.apps, before.replicas):
        print("not killing anything: the cluster's apps changed meanwhile; run this again", file=out)
        return 1
    _kill(orphans)
    print(f"killed {len(orphans)} worker(s)", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.cleanup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="auto", help="the Ray cluster (default: auto, the one running here)")
    parser.add_argument("--dry-run", action="store_true", help="list the unclaimed workers, kill nothing")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds each coordinator has to answer")
    args = parser.parse_args(argv)
    import ray

    ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        return cleanup(dry_run=args.dry_run, timeout_s=args.timeout)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
