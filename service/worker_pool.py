"""The coordinator's view of the expert workers: create or adopt them, and run control calls on all of them.

Owns worker lifecycle (named, detached Ray actors that outlive a coordinator restart), concurrent
control calls with timeouts, and worker-to-worker expert copies through the Ray object store. Knows
nothing of placements: callers pass (layer, expert) keys per device. `LocalWorkerPool` does the same
with in-process workers, for unit tests and single-process runs.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from service.messages import LatencySamples, Telemetry, WorkerInfo

# How long after a load's timeout its caller still waits for the answer (the layer read when the time ran out).
LOAD_GRACE_S = 60.0

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (moe layer, expert)

_SHUTDOWN_TIMEOUT_S = 5.0  # how long a worker about to be killed has to close its sockets and remove its folder
_PLACEABLE_CHECK_S = 2.0  # a restarted worker not up by then is checked for a node that can host it
_STARTING = ("RESTARTING", "PENDING_CREATION", "DEPENDENCIES_UNREADY")  # Ray actor states before a worker answers
_CREATING = ("PENDING_CREATION", "DEPENDENCIES_UNREADY")  # of those, a first start's (a process, or room for one)


class WorkerCallError(RuntimeError):
    """A control call failed or timed out on some workers; `devices` names them."""

    def __init__(self, message: str, devices: Sequence[int]):
        super().__init__(message)
        self.devices = tuple(devices)

    def __reduce__(self):
        # Pickling calls the class with `self.args` (the message alone), which fails on `devices`: Ray then hands
        # the coordinator's error to the ingress as an UnserializableException, and the admin's 503 naming the
        # device became a 500
        return type(self), (str(self), self.devices)


class WorkerStartError(WorkerCallError):
    """Some workers did not come up at `start`; `devices` names them, each with the reason in the message
    (cannot be placed, died while starting, ...). `infos` holds the info of every worker that answered
    (None for the others): a caller that can serve without the rest may treat them as lost."""

    def __init__(self, message: str, devices: Sequence[int], infos: Sequence[WorkerInfo | None]):
        super().__init__(message, devices)
        self.infos = list(infos)

    def __reduce__(self):
        return type(self), (str(self), self.devices, self.infos)


class WorkerPool(Protocol):
    """Control-plane operations on G workers, indexed 0..G-1 like placement devices. ``devices``, where a call
    takes it, limits the call to those workers (all by default): a coordinator leaves out the ones it lost."""

    num_devices: int

    def start(self) -> list[WorkerInfo]: ...
    def infos(self) -> list[WorkerInfo]: ...
    def load(self, checkpoint: str, keys: Mapping[int, Sequence[Key]], timeout_s: float | None = None) -> None: ...
    def copy(self, transfers: Sequence[tuple[int, int, Sequence[Key]]], timeout_s: float | None = None) -> int: ...
    def drop(self, keys: Mapping[int, Sequence[Key]]) -> None: ...
    def held(self, devices: Sequence[int] | None = None) -> dict[int, set[Key]]: ...
    def profile(self, token_counts: Sequence[int], repeats: int,
                devices: Sequence[int] | None = None) -> list[LatencySamples]: ...
    def telemetry(self) -> list[Telemetry]: ...
    def telemetry_of(self, devices: Sequence[int], timeout_s: float) -> dict[int, Telemetry]: ...
    def held_of(self, devices: Sequence[int], timeout_s: float) -> dict[int, set[Key]]: ...
    def set_emulated_speed(self, device: int, factor: float) -> None: ...
    def inject_fault(self, device: int, operation: str) -> None: ...
    def save_record(self, record: dict[str, Any], devices: Sequence[int] | None = None) -> None: ...
    def load_records(self, devices: Sequence[int] | None = None) -> list[dict[str, Any]]: ...
    def probe(self, timeout_s: float) -> list[WorkerInfo | None]: ...
    def restart(self, device: int) -> WorkerInfo: ...
    def shutdown(self) -> None: ...


# How Ray words a task whose argument (an ObjectRef of another task) failed: an import whose export failed.
_ARGUMENT_FAILED = "input arguments for this task could not be computed"


def error_text(exc: BaseException, limit: int = 300) -> str:
    """"Type: message" of what a worker call raised (a RayTaskError's: the worker's own error), about `limit`
    characters at most. A longer message that ends as a traceback does (an actor that died in its creation task
    carries the whole traceback, the reason last, such as a GPU check's refusal) keeps the start of its first line
    and its last line; another (Ray's account of an actor's death: what it was, then why) its start."""
    cause = getattr(exc, "cause", None) or exc
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip()  # (Ray colours the task's name)
    lines = text.splitlines()
    if len(text) > limit:  # (a traceback ends with the exception's line; other texts are kept from the start)
        raised = len(lines) > 1 and re.match(r"[\w.]+(Error|Exception|Exit|Interrupt)\b", lines[-1])
        text = f"{lines[0][:limit // 3]} ... {lines[-1][:limit]}" if raised else text[:limit]
    return f"{type(cause).__name__}: {text}"


@dataclass(frozen=True)
class RayPoolConfig:
    """How the Ray worker actors are created.

    Attributes:
        name_prefix: actor name prefix; worker i is "<prefix>-<i>" in `namespace`.
        namespace: Ray namespace of the worker actors.
        num_cpus: CPUs reserved per worker (fractional on CPU machines).
        num_gpus: GPUs per worker (1 on GPU clusters, 0 here).
        call_timeout_s: timeout of one control call.
        load_timeout_s: timeout of reading experts from the checkpoint (`load`): every expert a worker holds at
            the first start or after a restart, about 0.4 GB/s per worker on one core (read, checksum, copy to
            the device): minutes for a model of hundreds of GB (a 57 GB share in 60 s could never load, and each
            retry of the coordinator's start began the whole load again beside the one still running).
        detached: detached actors survive a coordinator restart; the coordinator kills them on shutdown.
        scheduling_strategy: Ray's "DEFAULT" (fill nodes where resources allow) or "SPREAD" (spread the
            workers over the nodes; for CPU workers, which no GPU request pins to a node).
        family_prefix: names of this app's workers under any configuration; workers named with it but
            not with `name_prefix` belong to an earlier configuration and are killed at start (or kept a while:
            `keep_strays`).
        keep_strays: keep an earlier configuration's workers running after start (in `strays`, for the caller to
            retire with `retire_strays` once the ingress replicas still serving on them have drained), when the
            cluster's free resources hold the new workers not yet running beside them (summed over the nodes, and
            memory not counted); without room (their GPUs) they are killed at start.
    """

    name_prefix: str = "vibe-worker"
    namespace: str = "vibe"
    num_cpus: float = 0.05
    num_gpus: float = 0.0
    call_timeout_s: float = 60.0
    load_timeout_s: float = 1800.0
    detached: bool = True
    scheduling_strategy: str = "DEFAULT"
    family_prefix: str | None = None
    keep_strays: bool = False

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0 or self.call_timeout_s <= 0 or self.load_timeout_s <= 0:
            raise ValueError(f"invalid RayPoolConfig {self}")
        if self.scheduling_strategy not in ("DEFAULT", "SPREAD"):
            raise ValueError(f"RayPoolConfig.scheduling_strategy must be 'DEFAULT' or 'SPREAD', "
                             f"got {self.scheduling_strategy!r}")


def is_stray(name: str, config: RayPoolConfig) -> bool:
    """Whether actor `name` is a worker of this app under another configuration: exactly
    <family_prefix><8 hex fingerprint>-<index> (app "vibe"'s family prefix also begins app "vibe-2"'s
    names) and not named with the current `name_prefix`."""
    if not config.family_prefix or name.startswith(f"{config.name_prefix}-"):
        return False
    return in_family(name, config.family_prefix)


def in_family(name: str, family: str) -> bool:
    """Whether actor `name` is a worker of the app whose workers are named `<family><8 hex fingerprint>-<index>`
    under any configuration (app "vibe"'s family also begins app "vibe-2"'s names: the rest must be exactly that)."""
    return re.fullmatch(re.escape(family) + r"[0-9a-f]{8}-\d+", name) is not None


def stop_actors(actors: Sequence[Any], wait_s: float | None) -> None:
    """Kill worker `actors` for good, each after asking it to shut down (close its data plane and remove its socket
    folder: `ray.kill` ends the process at once, no exit hook runs), waiting at most `wait_s` for them all (None: not
    at all, for workers that cannot answer). A dead or hung worker's folder is removed by the next worker of its name
    when it starts."""
    import ray

    refs = []
    for actor in actors if wait_s is not None else ():
        with contextlib.suppress(Exception):
            refs.append(actor.shutdown.remote())
    if refs:
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs), timeout=wait_s)
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as exc:  # already gone, or best effort at teardown
            log.debug("could not kill worker actor: %s", exc)


class RayWorkerPool:
    """Workers as named Ray actors (`ExpertWorkerActor`), one per device."""

    def __init__(self, worker_configs: Sequence[Any], config: RayPoolConfig = RayPoolConfig()):
        """Args: worker_configs: one `service.worker.WorkerConfig` per device, index i at position i."""
        self.config = config
        self.worker_configs = list(worker_configs)
        self.num_devices = len(self.worker_configs)
        self._actors: list[Any] = []
        self._infos: list[WorkerInfo] = []
        self._replacing: dict[int, Any] = {}  # device: first call of a worker still waiting for a node or being created
        self.strays: dict[str, Any] = {}  # an earlier configuration's workers kept at start (`keep_strays`), by name
        self._strays_lock = threading.Lock()  # (retired by the coordinator's thread, or by its shutdown)
        # Every worker actor this pool created or adopted, by name (the latest of each name), and whether it is shut
        # down: creations and the shutdown take `_lifecycle_lock`, so a shutdown while `start` runs (an app deleted
        # while its coordinator starts) kills what that start created too, and nothing is created after it.
        self._handles: dict[str, Any] = {}
        self._adopted: set[str] = set()  # names of the workers that ran before `start` (another coordinator's)
        self._closed = False
        self._lifecycle_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> list[WorkerInfo]:
        """Create the workers, or adopt the ones a previous coordinator left running.

        Raises WorkerStartError if some do not answer within call_timeout_s, saying why for each (from Ray's
        view of the actor), with the infos of those that did. A worker that keeps dying while it starts is
        killed rather than left crash-looping (Ray restarts actors without end); one that cannot be placed
        is left pending, for resources that may yet come (an autoscaler adds nodes for it)."""
        import ray

        running = {entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
                   if entry["namespace"] == self.config.namespace}
        self._adopted = {self._name(i) for i in range(self.num_devices)} & running
        self._collect_strays(running)
        self._actors = [self._create(i) for i in range(self.num_devices)]
        refs = [a.info.remote() for a in self._actors]
        infos, errors = self._gather(refs, list(range(self.num_devices)))
        self._infos = infos
        for device in errors:  # one still being created is left pending: a restart waits on it, not kills it
            if self._creating(device):
                self._replacing[device] = refs[device]
        if errors:
            raise WorkerStartError(f"{len(errors)} of {self.num_devices} workers did not start: " + "; ".join(
                f"device {d}: {self._why_not_up(d, error_text(error))}" for d, error in errors.items()), list(errors),
                infos)
        return list(self._infos)

    def _why_not_up(self, device: int, error: str) -> str:
        """Why worker `device` did not answer its first call (which failed with `error`), from its actor's
        state: a crash loop (the worker is then killed), no node with the resources it asks for, or the
        call's own error."""

        state, restarts, placed = _actor_state(self._actors[device])
        # (first: a worker whose node died waits, RESTARTING, for a node with room; that is no crash loop)
        waiting = self._no_room(state, placed)
        if waiting:
            return waiting
        if state in _STARTING and restarts:
            self._stop([self._actors[device]], wait=False)
            return (f"its process died {restarts} time(s) while starting, and it was killed; its log says why "
                    f"(`ray logs actor --id {self._actors[device]._actor_id.hex()}`)")
        if state in _CREATING:
            return f"still being created (state {state}); left pending"
        return f"{error} (actor state {state or 'unknown'})"

    def _creating(self, device: int) -> bool:
        """Whether worker `device` is still in its first creation (no process of it died): a start slower than
        call_timeout_s (a large image, CUDA initialising on a busy node), left to go on."""
        state, restarts, _ = _actor_state(self._actors[device])
        return state in _CREATING and not restarts

    def _no_room(self, state: str | None, placed: bool) -> str | None:
        """Why a worker in Ray actor `state`, with a process (`placed`) or not, waits for a node with room: none has
        the resources it asks for, or those free do not fit it (after a node failure, the survivors' GPUs are all
        held by the other workers); None when it has a process (starting, or crash-looping) or could get one."""
        import ray

        if placed or state not in _STARTING:
            return None
        unplaceable = self._unplaceable()
        if unplaceable:
            return unplaceable
        wants, free = self._wants(), ray.available_resources()
        if all(free.get(k, 0) >= v for k, v in wants.items()):
            return None  # room now: it is being scheduled
        return (f"waiting for resources: it asks for {', '.join(f'{v:g} {k}' for k, v in wants.items())}, the "
                f"cluster has {', '.join(f'{free.get(k, 0):g} {k}' for k in wants)} free; left pending")

    def _wants(self) -> dict[str, float]:
        wants = {"CPU": self.config.num_cpus, "GPU": self.config.num_gpus}
        return {k: v for k, v in wants.items() if v}

    def _unplaceable(self) -> str | None:
        """Why no live node of the cluster can host a worker (the resources it asks for and the cluster's), or
        None when one can (now or once busy resources free up)."""
        import ray

        wants = self._wants()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if any(all(node.get(k, 0) >= v for k, v in wants.items()) for node in nodes):
            return None
        total = ray.cluster_resources()
        asked = ", ".join(f"{v:g} {k}" for k, v in wants.items())
        return (f"cannot be placed: it asks for {asked} and no node of the cluster has that much "
                f"(cluster: {', '.join(f'{total.get(k, 0):g} {k}' for k in wants)} in {len(nodes)} node(s)); "
                f"left pending")

    def _name(self, index: int) -> str:
        return f"{self.config.name_prefix}-{index}"

    def _create(self, index: int):
        """Worker `index`'s actor: a new one, or the one running under its name (adopted). Refused once the pool is
        shut down (WorkerCallError)."""
        from service.worker_actor import ExpertWorkerActor

        options: dict[str, Any] = {
            "name": self._name(index),
            "namespace": self.config.namespace,
            "get_if_exists": True,
            "num_cpus": self.config.num_cpus,
            "num_gpus": self.config.num_gpus,
            "max_concurrency": 4,
            "max_restarts": -1,
            "scheduling_strategy": self.config.scheduling_strategy,
        }
        if self.config.detached:
            options["lifetime"] = "detached"
        with self._lifecycle_lock:
            if self._closed:
                raise WorkerCallError(f"worker {index} not created: the pool is shut down (its app is going away)",
                                      [index])
            actor = ExpertWorkerActor.options(**options).remote(self.worker_configs[index])
            self._handles[options["name"]] = actor
        return actor

    def infos(self) -> list[WorkerInfo]:
        return list(self._infos)

    def _collect_strays(self, running: set[str]) -> None:
        """Kill workers an earlier configuration of this app left behind (e.g. before a redeploy), or, with
        `keep_strays` and room for the new workers beside them, keep them in `strays`: the earlier configuration's
        ingress replicas, draining their requests through a redeploy, still dispatch to them (killed at once,
        every request they held failed). `running`: the named actors of the pool's namespace."""
        import ray

        if not self.config.family_prefix:
            return
        strays = {}
        for name in running:
            if is_stray(name, self.config):
                with contextlib.suppress(Exception):  # gone meanwhile
                    strays[name] = ray.get_actor(name, namespace=self.config.namespace)
        if not strays:
            return
        if self.config.keep_strays:  # (room for the workers to create: a restarted coordinator adopts the others)
            wants, free, new = self._wants(), ray.available_resources(), self.num_devices - len(self._adopted)
            if not all(free.get(k, 0) >= v * new for k, v in wants.items()):
                log.warning("killing %d worker(s) of an earlier configuration at once: the new workers need the "
                            "resources they hold (requests still draining on them fail)", len(strays))
            elif self._keep(strays):
                log.info("kept %d worker(s) of an earlier configuration while its requests drain: %s", len(strays),
                         ", ".join(sorted(strays)))
                return
        with self._strays_lock:
            self.strays.update(strays)
        self.retire_strays()

    def _keep(self, strays: dict[str, Any]) -> bool:
        """Keep `strays` in `strays`, unless the pool is shut down (False): a shutdown while `start` runs kills the
        kept ones with the rest (they were kept past it, holding their devices)."""
        with self._lifecycle_lock:
            if self._closed:
                return False
            with self._strays_lock:
                self.strays.update(strays)
            return True

    def retire_strays(self) -> None:
        """Kill the earlier configuration's workers kept in `strays` (together: one shutdown wait for them all)."""
        self._stop(self._take_strays())

    def _take_strays(self) -> list[Any]:
        """The workers kept in `strays`, which no longer keeps them (each taken once, whichever thread asks)."""
        with self._strays_lock:
            strays, self.strays = self.strays, {}
        for name in strays:
            log.info("killing worker %s of an earlier configuration", name)
        return list(strays.values())

    def restart(self, device: int) -> WorkerInfo:
        """Replace a dead worker by a fresh one with no experts; returns its new address.

        Fails within about _PLACEABLE_CHECK_S when the replacement waits for a node with room (its node gone): the
        replacement is left pending for resources that may yet come (an autoscaler, the node back), and the next
        call waits on it again instead of replacing it. Every wait held the coordinator's loop for call_timeout_s
        (and with it every other worker's health probe)."""
        import ray

        deadline = time.monotonic() + self.config.call_timeout_s
        reuse = device in self._replacing
        killed = None if reuse else self._actors[device]._actor_id
        if not reuse:  # (no shutdown to wait for from a worker without a process: its node is gone, or pending)
            state, _, placed = _actor_state(self._actors[device])
            self._stop([self._actors[device]], wait=state == "ALIVE" and placed)
        while True:  # the name is released asynchronously after the kill
            fresh = reuse  # whether the actor waited on is a new one, not the killed one its name still gave
            try:
                if not reuse:
                    self._actors[device] = self._create(device)
                    fresh = self._actors[device]._actor_id != killed
                    self._replacing[device] = self._actors[device].info.remote()
                reuse = False
                ref = self._replacing[device]
                while not ray.wait([ref], timeout=min(_PLACEABLE_CHECK_S, max(deadline - time.monotonic(), 0)))[0]:
                    state, restarts, placed = _actor_state(self._actors[device])
                    waiting = self._no_room(state, placed)
                    if waiting:
                        raise WorkerCallError(f"restart of device {device} failed: {waiting}", [device])
                    if (restarts and state != "ALIVE") or time.monotonic() > deadline:  # a crash loop: killed
                        if not self._creating(device):  # (one still being created is left pending, waited on
                            self._replacing.pop(device, None)  # again by the next call: it was killed then)
                        raise WorkerCallError(f"restart of device {device} failed: "
                                              f"{self._why_not_up(device, 'no answer')}", [device])
                info = ray.get(ref, timeout=self.config.call_timeout_s)
                self._replacing.pop(device, None)
                break
            except WorkerCallError:
                raise
            except Exception as exc:
                self._replacing.pop(device, None)
                # a new actor that failed is refused (its creation raised: a GPU check, a CUDA init error) and
                # said so at once; re-created for call_timeout_s it held the coordinator's loop, the reason lost
                if fresh or time.monotonic() > deadline:
                    why = error_text(exc) if fresh else self._why_not_up(device, error_text(exc))
                    raise WorkerCallError(f"restart of device {device} failed: {why}", [device]) from exc
                time.sleep(0.2)
        self._infos[device] = info
        return info

    def shutdown(self) -> None:
        """Kill every worker (and the earlier configuration's kept ones); none is created after."""
        self._stop([*self._take(), *self._take_strays()])  # (one shutdown wait for both)

    def abandon_start(self) -> None:
        """After a failed start: kill the workers this pool created, none created after. Those that ran before it
        (adopted: ingress replicas may still serve on them) and the earlier configuration's kept ones stay. A failed
        coordinator start left its new workers running, detached, holding their devices: an app that ended
        DEPLOY_FAILED kept them until another deploy of its name."""
        self._stop(self._take(keep=self._adopted))

    def _take(self, keep: set[str] = frozenset()) -> list[Any]:
        """Refuse creations from now on; the workers created or adopted so far but those named in `keep`, each
        taken once (to kill: a shutdown after `abandon_start` kills the adopted ones)."""
        with self._lifecycle_lock:
            self._closed = True
            taken = {name: actor for name, actor in self._handles.items() if name not in keep}
            for name in taken:
                del self._handles[name]
        return list(taken.values())

    def _stop(self, actors: Sequence[Any], *, wait: bool = True) -> None:
        """`stop_actors`, waiting at most _SHUTDOWN_TIMEOUT_S (`wait`=False: not at all)."""
        stop_actors(actors, min(_SHUTDOWN_TIMEOUT_S, self.config.call_timeout_s) if wait else None)

    # --- control calls -----------------------------------------------------------------------------

    def load(self, checkpoint: str, keys: Mapping[int, Sequence[Key]], timeout_s: float | None = None) -> None:
        """Read `keys` from the checkpoint onto each worker within `timeout_s` (at most, and by default, the
        config's load_timeout_s: a reload while serving waits for what it reads, not for a worker's share), and
        LOAD_GRACE_S more for the layer each was reading then. A call given up still runs in its actor: the worker
        starts no layer past the deadline and holds nothing of a load that ends well after it."""
        limit = self.config.load_timeout_s if timeout_s is None else min(timeout_s, self.config.load_timeout_s)
        deadline = time.time() + limit  # (set before any call is sent: a worker's clock starts no earlier)
        self._on(keys, lambda a, k: a.load_experts.remote(checkpoint, list(k), deadline), "load_experts",
                 limit + LOAD_GRACE_S)

    def copy(self, transfers: Sequence[tuple[int, int, Sequence[Key]]], timeout_s: float | None = None) -> int:
        """Copy experts worker to worker (export ObjectRef passed straight to the importer), within `timeout_s` (by
        default call_timeout_s; at most load_timeout_s: a caller sizes it by what it moves, as a load's) and
        LOAD_GRACE_S more; an import given up still runs in its actor, but holds nothing if it ends well past that
        deadline (as a load: a caller that rolled back would track none of its copies).

        Returns the number of experts confirmed. Raises WorkerCallError if any import fails.
        """

        import ray

        exports, imports = [], []
        limit = self.config.call_timeout_s if timeout_s is None else min(timeout_s, self.config.load_timeout_s)
        deadline = time.time() + limit  # (set before any call is sent)
        for src, dst, keys in transfers:
            exports.append(self._actors[src].export_experts.remote(list(keys)))
            imports.append(self._actors[dst].import_experts.remote(exports[-1], deadline))
        confirmed, errors = self._gather(imports, list(range(len(imports))), limit + LOAD_GRACE_S)
        blamed: dict[int, list[str]] = {}
        for i, exc in errors.items():  # the source's when its export failed or never ended (a copy named only its
            # destination: a dead source had the healthy destination restarted); a call to an actor already dead
            # fails at once, its argument not yet computed: that is the destination's, as is any other error
            src, dst, _ = transfers[i]
            source = _ARGUMENT_FAILED in str(exc) or (isinstance(exc, ray.exceptions.GetTimeoutError)
                                                      and not ray.wait([exports[i]], timeout=0)[0])
            blamed.setdefault(src if source else dst, []).append(
                f"{f'export_experts on device {src}' if source else 'import_experts'}: {error_text(exc)}")
        if blamed:
            raise WorkerCallError("copy failed on " + "; ".join(f"device {d}: {' / '.join(e)}"
                                                              for d, e in blamed.items()), list(blamed))
        return sum(len(c) for c in confirmed)

    def drop(self, keys: Mapping[int, Sequence[Key]]) -> None:
        self._on(keys, lambda a, k: a.drop_experts.remote(list(k)), "drop_experts")

    def held(self, devices: Sequence[int] | None = None) -> dict[int, set[Key]]:
        devices = self._devices(devices)
        held = self._each(devices, lambda a: a.held_experts.remote(), "held_experts")
        return {d: {tuple(k) for k in h} for d, h in zip(devices, held)}

    def held_of(self, devices: Sequence[int], timeout_s: float) -> dict[int, set[Key]]:
        """What those of ``devices`` that answer within ``timeout_s`` hold (the others left out)."""
        held = self._answers(devices, lambda a: a.held_experts.remote(), timeout_s)
        return {d: {tuple(k) for k in keys} for d, keys in held.items()}

    def profile(self, token_counts: Sequence[int], repeats: int,
                devices: Sequence[int] | None = None) -> list[LatencySamples]:
        return self._each(self._devices(devices), lambda a: a.profile.remote(list(token_counts), repeats), "profile")

    def telemetry(self) -> list[Telemetry]:
        return self._each(self._devices(None), lambda a: a.telemetry.remote(), "telemetry")

    def telemetry_of(self, devices: Sequence[int], timeout_s: float) -> dict[int, Telemetry]:
        """The telemetry of those of ``devices`` that answer within ``timeout_s`` (the others left out)."""
        return self._answers(devices, lambda a: a.telemetry.remote(), timeout_s)

    def set_emulated_speed(self, device: int, factor: float) -> None:
        self._on({device: [factor]}, lambda a, f: a.set_emulated_speed.remote(f[0]), "set_emulated_speed")

    def inject_fault(self, device: int, operation: str) -> None:
        self._on({device: [operation]}, lambda a, op: a.inject_fault.remote(op[0]), "inject_fault")

    def save_record(self, record: dict[str, Any], devices: Sequence[int] | None = None) -> None:
        self._each(self._devices(devices), lambda a: a.set_record.remote(record), "set_record")

    def load_records(self, devices: Sequence[int] | None = None) -> list[dict[str, Any]]:
        return [r for r in self._each(self._devices(devices), lambda a: a.get_record.remote(), "get_record") if r]

    def probe(self, timeout_s: float) -> list[WorkerInfo | None]:
        """Each worker's current info, or None when it does not answer within `timeout_s`. A worker that
        Ray restarted answers with new addresses (and holds no experts)."""
        import ray

        refs = [a.info.remote() for a in self._actors]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        infos: list[WorkerInfo | None] = []
        for ref in refs:
            try:
                infos.append(ray.get(ref, timeout=0))
            except Exception:  # not ready, dead or restarting: all mean "lost" to the caller
                infos.append(None)
        return infos

    def _on(self, per_device: Mapping[int, Sequence[Any]], call: Callable, what: str,
            timeout_s: float | None = None) -> list[Any]:
        devices = [d for d, items in per_device.items() if len(items)]
        refs = [call(self._actors[d], per_device[d]) for d in devices]
        return self._wait(refs, devices, what, timeout_s)

    def _devices(self, devices: Sequence[int] | None) -> list[int]:
        return list(range(len(self._actors))) if devices is None else list(devices)

    def _each(self, devices: list[int], call: Callable, what: str) -> list[Any]:
        return self._wait([call(self._actors[d]) for d in devices], devices, what)

    def _wait(self, refs: list, devices: list[int], what: str, timeout_s: float | None = None) -> list[Any]:
        results, errors = self._gather(refs, devices, timeout_s)
        if errors:
            raise WorkerCallError(f"{what} failed on " + "; ".join(f"device {d}: {error_text(e)}"
                                                                  for d, e in errors.items()), list(errors))
        return results

    def _answers(self, devices: Sequence[int], call: Callable, timeout_s: float) -> dict[int, Any]:
        """{device: result} of ``call`` on each of ``devices`` that answers within ``timeout_s``."""
        devices = list(devices)
        results, errors = self._gather([call(self._actors[d]) for d in devices], devices, timeout_s)
        return {d: r for d, r in zip(devices, results) if d not in errors}

    def _gather(self, refs: list, devices: list[int],
                timeout_s: float | None = None) -> tuple[list[Any], dict[int, Exception]]:
        """The results of `refs` (None where one failed), and what each device's call raised that failed or did not
        answer within ``timeout_s`` (call_timeout_s by default; all calls together)."""
        import ray

        results, errors = [], {}
        deadline = time.monotonic() + (self.config.call_timeout_s if timeout_s is None else timeout_s)
        for ref, device in zip(refs, devices):
            try:
                results.append(ray.get(ref, timeout=max(deadline - time.monotonic(), 0.01)))
            except Exception as exc:
                errors[device] = exc
                results.append(None)
        return results, errors


class LocalWorkerPool:
    """Workers as in-process `ExpertWorker` objects (unit tests, single-process runs). Same contract."""

    def __init__(self, workers: Sequence[Any]):
        self.workers = list(workers)
        self.num_devices = len(self.workers)
        self._records: list[dict[str, Any]] = [{} for _ in self.workers]
        self._dead: set[int] = set()
        self._generation = [0] * len(self.workers)  # bumped by restart, like a new actor's address

    def start(self) -> list[WorkerInfo]:
        return self.infos()

    def infos(self) -> list[WorkerInfo]:
        return [WorkerInfo(i, f"local-{i}-{self._generation[i]}", "", None, "local", w.config.device,
                           w.config.emulation is not None) for i, w in enumerate(self.workers)]

    def load(self, checkpoint: str, keys: Mapping[int, Sequence[Key]], timeout_s: float | None = None) -> None:
        deadline = None if timeout_s is None else time.time() + timeout_s
        self._per_device([d for d, k in keys.items() if k],
                         lambda d: self._live(d).load_experts(checkpoint, list(keys[d]), deadline), "load_experts")

    def copy(self, transfers: Sequence[tuple[int, int, Sequence[Key]]], timeout_s: float | None = None) -> int:
        deadline = None if timeout_s is None else time.time() + timeout_s
        failed, count = [], 0
        for src, dst, keys in transfers:
            device = src  # (the source, until its export succeeded: as the Ray pool names it)
            try:
                exported = self._live(src).export_experts(list(keys))
                device = dst
                count += len(self._live(dst).import_experts(exported, deadline))
            except Exception as exc:
                failed.append((device, exc))
        if failed:
            devices = list(dict.fromkeys(d for d, _ in failed))
            raise WorkerCallError(f"copy failed on {devices}: {failed[0][1]}", devices)
        return count

    def drop(self, keys: Mapping[int, Sequence[Key]]) -> None:
        # (every device tried, WorkerCallError naming those that failed, as Ray's: a KeyError escaped the caller)
        self._per_device([d for d, k in keys.items() if k], lambda d: self._live(d).drop_experts(list(keys[d])),
                         "drop_experts")

    def held(self, devices: Sequence[int] | None = None) -> dict[int, set[Key]]:
        devices = self._devices(devices)
        held = self._per_device(devices, lambda d: self._live(d).held_experts(), "held_experts")
        return {d: {tuple(k) for k in keys} for d, keys in zip(devices, held)}

    def held_of(self, devices: Sequence[int], timeout_s: float) -> dict[int, set[Key]]:
        return {d: {tuple(k) for k in self.workers[d].held_experts()} for d in devices if d not in self._dead}

    def profile(self, token_counts: Sequence[int], repeats: int,
                devices: Sequence[int] | None = None) -> list[LatencySamples]:
        return self._per_device(self._devices(devices), lambda d: self._live(d).profile(list(token_counts), repeats),
                                "profile")

    @staticmethod
    def _per_device(devices: Sequence[int], call: Callable[[int], Any], what: str) -> list[Any]:
        """`call(device)` for each device, as the Ray pool's calls: every one tried, then WorkerCallError naming
        those that raised."""
        results, errors = [], {}
        for device in devices:
            try:
                results.append(call(device))
            except Exception as exc:  # noqa: BLE001 - whatever the worker raised, as a Ray task error carries it
                errors[device] = error_text(exc)
        if errors:
            raise WorkerCallError(f"{what} failed on " + "; ".join(f"device {d}: {e}" for d, e in errors.items()),
                                  list(errors))
        return results

    def telemetry(self) -> list[Telemetry]:
        return self._per_device(range(self.num_devices), lambda d: self._live(d).telemetry(), "telemetry")

    def telemetry_of(self, devices: Sequence[int], timeout_s: float) -> dict[int, Telemetry]:
        return {d: self.workers[d].telemetry() for d in devices if d not in self._dead}

    def set_emulated_speed(self, device: int, factor: float) -> None:
        self._live(device).set_emulated_speed(factor)

    def inject_fault(self, device: int, operation: str) -> None:
        self._live(device).inject_fault(operation)

    def save_record(self, record: dict[str, Any], devices: Sequence[int] | None = None) -> None:
        devices = self._devices(devices)
        for i in devices:  # (like Ray's: recorded on the workers that answer, the others named in the error)
            if i not in self._dead:
                self._records[i] = dict(record)
        if self._dead & set(devices):
            raise WorkerCallError(f"set_record failed on devices {sorted(self._dead & set(devices))}: dead",
                                  sorted(self._dead & set(devices)))

    def load_records(self, devices: Sequence[int] | None = None) -> list[dict[str, Any]]:
        devices = self._devices(devices)
        self._per_device(devices, self._live, "get_record")
        return [self._records[i] for i in devices if self._records[i]]

    def probe(self, timeout_s: float) -> list[WorkerInfo | None]:
        infos = self.infos()
        return [None if i in self._dead else info for i, info in enumerate(infos)]

    def kill(self, device: int) -> None:
        """Test hook: the worker stops answering."""
        self._dead.add(device)

    def restart(self, device: int) -> WorkerInfo:
        from service.worker import ExpertWorker

        self.workers[device] = ExpertWorker(self.workers[device].config)
        self._generation[device] += 1
        self._dead.discard(device)
        self._records[device] = {}
        return self.infos()[device]

    def shutdown(self) -> None:
        self.workers = []

    def _devices(self, devices: Sequence[int] | None) -> list[int]:
        return list(range(self.num_devices)) if devices is None else list(devices)

    def _live(self, device: int):
        if device in self._dead:
            raise WorkerCallError(f"device {device} is dead", [device])
        return self.workers[device]


def _actor_state(actor: Any) -> tuple[str | None, int, bool]:
    """Ray's state of `actor` ("ALIVE", "PENDING_CREATION", "RESTARTING", "DEAD", ...), its number of restarts, and
    whether it has a process (False while it waits for a node with the resources it asks for); (None, 0, True) if
    Ray cannot say. Asks the state API, which needs the dashboard, and else the GCS actor table directly (what
    `ray list actors` reads too)."""
    import ray

    actor_id = actor._actor_id.hex()
    with contextlib.suppress(Exception):
        from ray.util.state import get_actor

        found = get_actor(actor_id, timeout=5)
        if found is not None:
            return found.state, int(found.num_restarts or 0), bool(found.pid)
    with contextlib.suppress(Exception):
        found = ray._private.state.actors(actor_id)
        if found:
            return found["State"], int(found["NumRestarts"]), bool(found.get("Pid"))
    return None, 0, True


def keys_by_device(pairs: Iterable[tuple[int, Key]]) -> dict[int, list[Key]]:
    """Group (device, key) pairs into {device: [keys]}."""
    out: dict[int, list[Key]] = {}
    for device, key in pairs:
        out.setdefault(device, []).append(key)
    return out
