"""Kill the expert workers no running app claims: `python -m deploy.cleanup [--address ADDR] [--dry-run]`.

The workers are detached Ray actors (namespace "vibe", named `vibe-worker-<app_name>-<fingerprint>-<device>`): they
outlive a coordinator restart, and the coordinator kills them when its app is deleted. Some ways of ending an app
leave them running, each holding its device: `app_name` changed on a running app (the new coordinator looks for
workers under the new name), `serve shutdown` or `serve delete` while no coordinator replica was up (it crashed, or
Serve was restarting it), a Ray Serve controller killed by hand. This command asks every coordinator replica alive
which workers are its app's (`worker_family`) and kills the others, each asked to close its data plane first (as the
coordinator's own shutdown does). A coordinator that does not answer (still starting, or hung) could claim any of
them: then nothing is killed, the exit code is 1, and the command can be run again once its app is RUNNING.
`--dry-run` lists what would be killed. Exit code 0 otherwise (also when there is nothing to kill).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterable

NAMESPACE = "vibe"  # service.worker_pool.RayPoolConfig.namespace
WORKER_NAME = re.compile(r"vibe-worker-.+-[0-9a-f]{8}-\d+")  # deploy.app: worker_family(app) + fingerprint + device
COORDINATOR_REPLICA = re.compile(r"SERVE_REPLICA::(?P<app>.+)#Coordinator#[^#]+")  # Serve's replica actor names
SHUTDOWN_WAIT_S = 5.0  # how long the workers have to close their data planes before they are killed


def claimed(name: str, families: Iterable[str]) -> bool:
    """Whether worker `name` belongs to an app whose workers are named `<family><8 hex>-<device>` (app "vibe"'s
    family, `vibe-worker-vibe-`, also begins app "vibe-2"'s names: the rest must be a fingerprint and a device)."""
    return any(re.fullmatch(re.escape(family) + r"[0-9a-f]{8}-\d+", name) for family in families)


def unclaimed(workers: Iterable[str], families: Iterable[str]) -> list[str]:
    """The workers among `workers` no app of `families` claims, sorted."""
    families = list(families)
    return sorted(name for name in workers if not claimed(name, families))


def _named(named_actors: list[dict]) -> tuple[list[str], list[str]]:
    """The expert workers (namespace "vibe") and the apps with a coordinator replica alive, among Ray's named
    actors (`ray.util.list_named_actors(all_namespaces=True)`)."""
    workers = [entry["name"] for entry in named_actors
               if entry["namespace"] == NAMESPACE and WORKER_NAME.fullmatch(entry["name"])]
    apps = sorted({match["app"] for entry in named_actors if (match := COORDINATOR_REPLICA.fullmatch(entry["name"]))})
    return workers, apps


def _families(apps: list[str], timeout_s: float) -> tuple[list[str], list[str]]:
    """Each app's worker family as its coordinator says (`CoordinatorDeployment.worker_family`), and the apps whose
    coordinator did not answer within `timeout_s`."""
    from ray import serve

    from service.deployments import answer

    families, silent = [], []
    for app in apps:
        try:  # (a late call cancelled)
            families.append(answer(serve.get_deployment_handle("Coordinator", app_name=app).worker_family.remote(),
                                   timeout_s))
        except Exception as exc:  # starting, hung, gone meanwhile, or a version without the method
            silent.append(f"{app} ({type(exc).__name__})")
    return families, silent


def _kill(names: list[str]) -> None:
    import ray

    actors = []
    for name in names:
        with contextlib.suppress(ValueError):  # gone meanwhile
            actors.append(ray.get_actor(name, namespace=NAMESPACE))
    refs = []
    for actor in actors:
        with contextlib.suppress(Exception):
            refs.append(actor.shutdown.remote())
    if refs:
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_WAIT_S)
    for actor in actors:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(actor, no_restart=True)


def cleanup(*, dry_run: bool = False, timeout_s: float = 10.0, out=sys.stdout) -> int:
    """Kill (or with `dry_run`, list) the expert workers of the connected Ray cluster no app claims; the exit code."""
    import ray

    workers, apps = _named(ray.util.list_named_actors(all_namespaces=True))
    families, silent = _families(apps, timeout_s)
    if silent:
        print(f"not killing anything: the coordinator of {', '.join(silent)} did not answer within {timeout_s:g} s "
              "(starting? run this again once the app is RUNNING)", file=out)
        return 1
    orphans = unclaimed(workers, families)
    print(f"{len(workers)} expert worker(s), {len(apps)} app(s) with a coordinator ({', '.join(apps) or 'none'}); "
          f"{len(orphans)} claimed by none{':' if orphans else ''} {' '.join(orphans)}".rstrip(), file=out)
    if orphans and not dry_run:
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
