"""Ray Serve shells: the coordinator deployment and the OpenAI ingress deployment.

Both are thin: the coordinator shell owns a `Coordinator` over a `RayWorkerPool`; the ingress shell
owns an `AsyncEngine` whose MoE layers dispatch to the workers, the `PlacementSync` thread that keeps
it on the coordinator's placement, and the FastAPI app (`create_app` plus the admin router). Wiring
(which deployments, with what options and arguments) lives in `deploy/app.py` only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from service.coordinator import Coordinator, CoordinatorConfig, ModelShape
from service.messages import EngineReport, SyncReply
from service.placement_metrics import PlacementCollector
from service.worker_pool import RayPoolConfig, RayWorkerPool

log = logging.getLogger("ray.serve")  # Serve prints this logger of a replica in `serve run`'s console
METRICS_REFRESH_S = 2.0
SERVING_METRICS_TTL_S = 30.0  # an ingress replica's serving metrics are exposed this long after it last sent them
STRAY_QUIET_S = 10.0  # an earlier worker configuration's ingress replicas not heard of for this long are gone
APP_PLACEHOLDER = "{app}"  # in worker names: the Serve application's name (see `for_app`)


class CoordinatorDeployment:
    """The app's one coordinator (a single replica). Sync methods run in Serve's thread pool."""

    async def __init__(self, config: CoordinatorConfig, worker_configs: list, pool_config: RayPoolConfig,
                       shape: ModelShape, drain_s: float = 0.0) -> None:
        """`drain_s`: how long the app's ingress replicas drain their requests when stopped (their
        graceful_shutdown_timeout_s): a deleted app's workers wait that long for them.

        The start (workers created, profiled, their experts loaded: minutes for a large model) runs in a thread, so
        Serve can run `__del__` meanwhile: a constructor that held the replica's loop kept its destructor waiting,
        and Serve force-kills a replica at graceful_shutdown_timeout_s, so an app deleted while its coordinator
        started left the new detached workers running, holding their devices, until another deploy of its name. A
        start that fails kills the workers it created (`RayWorkerPool.abandon_start`): an app that ended
        DEPLOY_FAILED left them running too."""
        self._drain_s = drain_s
        self._workers_id = pool_config.name_prefix  # (what the app's ingress replicas of this configuration report)
        self._foreign: set[str] = set()  # engines of another worker configuration that reported here
        self._foreign_at = 0.0  # when one last did (time.monotonic())
        self._first_report_at: float | None = None  # when any engine first reached this replica
        self._closing = threading.Event()
        single_coordinator(_own_deployment_config())
        pool = RayWorkerPool(worker_configs, for_app(pool_config, _serve_app_name()))
        self.core = Coordinator(config, pool, shape)
        try:
            await asyncio.to_thread(self.core.start)
        except BaseException:
            self.core.stop()
            # (here, not in the loop's executor: a `__del__` run meanwhile shut that down, and the kill failed)
            pool.abandon_start()
            raise
        if pool.strays:  # an earlier configuration's workers, kept for its ingress replicas still draining
            threading.Thread(target=self._retire_strays_when_drained, args=(pool,), name="retire-strays",
                             daemon=True).start()
        self._serving: dict[str, tuple[float, list]] = {}  # replica -> (when it last sent them, its serving metrics)
        self._serving_lock = threading.Lock()

    def bootstrap(self) -> dict[str, Any]:
        """What a starting engine needs: the placement, the workers, whether the app is calibrated."""
        workers, epoch = self.core.workers()
        return {"placement": self.core.placement.to_dict(), "workers": workers, "workers_epoch": epoch,
                "calibrated": self.core.calibrated}

    def report(self, report: EngineReport) -> SyncReply:
        """An engine's report, answered by the coordinator; an engine of another worker configuration (an ingress
        replica of the configuration a redeploy replaced, draining its requests) is told nothing and counted
        nowhere (but its serving metrics, which `serving_metrics` keeps as any replica's, for the app's /metrics):
        it keeps its own placement and workers (the earlier configuration's, kept until it is gone).
        Answered, it switched to this configuration's workers mid-request: another model's experts under its dense
        part, or a 503 when they did not fit, and its statistics entered this configuration's."""
        if self._first_report_at is None:
            self._first_report_at = time.monotonic()
        if report.workers_id and report.workers_id != self._workers_id:
            self._foreign_at = time.monotonic()
            if report.engine_id not in self._foreign:
                self._foreign.add(report.engine_id)
                log.info("engine %s of another worker configuration (%s) reports here: left on its own workers "
                         "while it drains", report.engine_id, report.workers_id)
            return SyncReply(placement=None, workers=None, workers_epoch=report.workers_epoch)
        return self.core.report(report)

    def _retire_strays_when_drained(self, pool: RayWorkerPool) -> None:
        """Kill the earlier configuration's workers `pool` kept once its ingress replicas are gone: no engine of
        another configuration reported for STRAY_QUIET_S (they report every sync interval, 0.1 s), counted from the
        first report of any engine that reached this replica (until Serve routes to it, none can: the earlier
        coordinator may be gone while this one starts, their reports waiting). No deadline: the earlier
        configuration's replicas are all replaced (its `workers_id` is in their settings), however long a rolling
        update of many replicas takes, and while one still reports it still needs the workers."""
        while not self._closing.wait(1.0):
            if self._first_report_at is None:
                continue
            if time.monotonic() - max(self._first_report_at, self._foreign_at) >= STRAY_QUIET_S:
                log.info("retiring the earlier configuration's workers: its ingress replicas drained")
                pool.retire_strays()
                return

    def worker_family(self) -> str:
        """The prefix of the names of this app's expert workers, under any configuration (`deploy.cleanup` kills the
        workers no app claims)."""
        family = self.core.pool.config.family_prefix
        if not family:  # (deploy.app always sets one; without it this app's workers could not be told apart)
            raise RuntimeError("this coordinator's workers have no family prefix")
        return family

    def calibrate(self) -> dict[str, Any]:
        return self.core.calibrate()

    def recalibrate(self, **kwargs: Any) -> dict[str, Any]:
        return self.core.recalibrate(**kwargs)

    def profile_devices(self, **kwargs: Any) -> dict[str, Any]:
        return self.core.profile_devices(**kwargs)

    def placement_view(self) -> dict[str, Any]:
        return self.core.placement_view()

    def stats_view(self) -> dict[str, Any]:
        return self.core.stats_view()

    def metrics_summary(self) -> dict[str, Any]:
        return self.core.metrics_summary()

    def serving_metrics(self, replica: str, snapshot: list) -> dict[str, list]:
        """Keep ingress replica ``replica``'s serving metrics (`ServingMetrics.snapshot`); the other replicas' that
        were sent within SERVING_METRICS_TTL_S, for its /metrics to expose too (a scrape through Serve's proxy reaches
        one replica at random)."""
        now = time.monotonic()
        with self._serving_lock:
            self._serving[replica] = (now, snapshot)
            for name in [name for name, (sent, _) in self._serving.items() if now - sent > SERVING_METRICS_TTL_S]:
                del self._serving[name]
            return {name: kept for name, (_, kept) in self._serving.items() if name != replica}

    def set_emulated_speed(self, device: int, speed: float) -> None:
        self.core.pool.set_emulated_speed(device, speed)

    def inject_fault(self, device: int, operation: str) -> None:
        self.core.pool.inject_fault(device, operation)

    def check_health(self) -> None:
        if not self.core.loop_alive:
            raise RuntimeError("the coordinator loop stopped")

    def __del__(self) -> None:
        # Graceful replica shutdown. Only when the app is going away (serve delete, shutdown) do its workers go
        # with it, once its ingress replicas have drained. Serve stops a coordinator for other reasons too: a
        # redeploy, a failed health check (it then starts another). The workers stay, and the next coordinator
        # adopts them (same worker configuration) or retires them once the ingress replicas serving on them have
        # drained (another one: `_retire_strays_when_drained`); they were killed whenever the
        # app was not DEPLOYING, so a coordinator found unhealthy took every worker and expert with it. A
        # crashed coordinator never gets here: its detached workers survive and the restarted one adopts them.
        # Serve runs this during a start still in progress too (the app deleted meanwhile): the pool's shutdown then
        # kills the workers created so far and refuses the rest, and the start fails.
        closing, core = getattr(self, "_closing", None), getattr(self, "core", None)
        if closing is None or core is None:  # (nothing started yet)
            return
        closing.set()
        core.stop()
        if _app_going_away(self._drain_s):
            core.pool.shutdown()  # (the earlier configuration's workers kept, if any, too)


def for_app(config: RayPoolConfig, app: str) -> RayPoolConfig:
    """``config`` with `APP_PLACEHOLDER` in its worker names replaced by the Serve application's name ``app`` (its
    characters outside [A-Za-z0-9_-] as "_" and a short hash of it then, or when cut at 40): two apps left at the default app_name shared, or retired, each other's
    workers (one app's start killed the other's as strays of an earlier configuration, or both adopted the same
    actors and deleting one app killed the other's)."""
    if APP_PLACEHOLDER not in config.name_prefix:
        return config
    name = worker_app_name(app)
    return dataclasses.replace(config, name_prefix=config.name_prefix.replace(APP_PLACEHOLDER, name),
                               family_prefix=(config.family_prefix or "").replace(APP_PLACEHOLDER, name) or None)


def worker_app_name(app: str) -> str:
    """The Serve application's name ``app`` as its workers' names carry it (see `for_app`)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", app)[:40] or "default"
    if name != app:  # (changed or cut: a hash of the real name keeps two apps' names apart)
        name = f"{name[:32]}-{hashlib.sha256(app.encode()).hexdigest()[:6]}"
    return name


def answer(response: Any, timeout_s: float = 10.0) -> Any:
    """A coordinator call's answer within `timeout_s`, the call cancelled when late: Serve kept a late one queued, and
    those a replica sent while no coordinator was up (a redeploy, a restart: minutes) all reached the new one
    together, with stale versions (a Serve review)."""
    try:
        return response.result(timeout_s=timeout_s)
    except TimeoutError:
        response.cancel()
        raise


def single_coordinator(config: Any) -> None:
    """Refuse a Coordinator deployment config (a `deployments:` override in the serve config) that can run two at
    once: more replicas, autoscaling, or a surge that keeps the old one serving through a redeploy. Two would adopt
    the same named workers, each publish its own placements and drop the copies outside its own, and engines would
    dispatch to experts no longer held (a Serve review). None (outside a replica) passes."""
    if config is None:
        return
    replicas, autoscaling = getattr(config, "num_replicas", 1), getattr(config, "autoscaling_config", None)
    surge = getattr(config, "max_surge_percent", 0) or 0
    if replicas not in (1, None) or autoscaling is not None or surge > 0:
        raise ValueError(f"the Coordinator deployment runs exactly one replica (num_replicas {replicas!r}, "
                         f"autoscaling_config {'set' if autoscaling is not None else 'none'}, max_surge_percent "
                         f"{surge}): override the OpenAIIngress deployment's, not the Coordinator's")


def _own_deployment_config() -> Any:
    """This replica's deployment config (Ray 2.60's ReplicaContext), or None outside a Serve replica."""
    try:
        return serve.get_replica_context()._deployment_config
    except Exception:  # outside a Serve replica, or a Ray without it
        return None


def _serve_app_name() -> str:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # outside a Serve replica
        return "default"


def _other_replicas_alive(app: str, own: str) -> bool:
    """Whether a replica of another deployment of ``app`` than ``own`` is alive, by Serve's replica actor names
    (serve.status() lists no deployments once the app is DELETING, while its replicas drain)."""
    import ray

    prefix, mine = f"SERVE_REPLICA::{app}#", f"SERVE_REPLICA::{app}#{own}#"
    try:
        names = [entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)]
    except Exception:  # no cluster to ask: nothing to wait for
        return False
    return any(name.startswith(prefix) and not name.startswith(mine) for name in names)


def _app_going_away(drain_s: float, poll_s: float = 1.0) -> bool:
    """Whether this replica's app is being deleted (DELETING, already gone, or no controller to ask: serve
    shutdown). If it is, first wait, at most `drain_s`, until the app's other deployments have no replica left:
    Serve stops the ingress replicas together with the coordinator, and the requests they drain need the workers
    (they were cut when the workers went at once, streams without an error event)."""
    try:
        context = serve.get_replica_context()
        app, own = context.app_name, context.deployment
    except Exception:  # not in a replica: nothing to ask
        return True
    deadline = time.monotonic() + drain_s
    while True:
        try:
            status = serve.status().applications.get(app)
        except Exception:  # no controller to ask: treat as going away
            return True
        if status is not None and status.status != "DELETING":
            return False
        draining = status is not None and _other_replicas_alive(app, own)
        if not draining or time.monotonic() >= deadline:
            return True
        time.sleep(poll_s)


@dataclass(frozen=True)
class IngressSettings:
    """What an ingress replica is built from (validated by deploy/app.py)."""

    checkpoint: str
    served_model_name: str
    dtype: str
    engine_config: Any  # service.engine.EngineConfig
    admin_token_sha256: str | None
    num_devices: int
    emulation: bool
    profile_prompts: str | None
    engine_threads: int = 1
    reasoning_parser: str | None = None  # service.reasoning.PARSERS
    tool_call_parser: str = "auto"  # service.tools.FORMATS, or auto (from the chat template)
    max_body_bytes: int = 1 << 20  # request bodies over it get 413
    body_timeout_s: float = 30.0  # a body not received this long after its headers gets 408
    # on a GPU replica: the KV cache takes this share of the memory free once the dense part is loaded (None:
    # engine_config.kv_cache_bytes, as on a CPU replica)
    gpu_kv_cache_fraction: float | None = None
    profile_max_tokens: int = 8
    sync_interval_s: float = 0.1
    data_plane_timeout_s: float = 10.0  # service.placement_sync.DATA_PLANE_TIMEOUT_S
    # the workers' configuration (RayPoolConfig.name_prefix): sent in the engine's reports, and a change of it
    # (any change of the workers) rebuilds the ingress replicas, so none stays on workers of another configuration
    workers_id: str = ""


def gpu_kv_cache_bytes(fraction: float, mem_get_info: Callable[[], tuple[int, int]] | None = None) -> int:
    """The KV cache budget of a GPU replica: ``fraction`` of the memory its GPU has free now (the dense part
    loaded; what is left over holds a step's activations and logits). ``mem_get_info``: torch.cuda's."""
    if mem_get_info is None:
        import torch

        mem_get_info = torch.cuda.mem_get_info
    free, _total = mem_get_info()
    return max(1, int(free * fraction))


class _HandleClient:
    """`CoordinatorClient` over a Serve deployment handle. The coordinator's own errors are raised as it raised
    them: Serve hands them over as a `RayTaskError` that is also an instance of the cause, whose text is the whole
    remote traceback (pid, node address, paths), which error replies would otherwise quote."""

    def __init__(self, handle) -> None:
        self._handle = handle

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import (
            BackPressureError,
            DeploymentUnavailableError,
            ReplicaUnavailableError,
        )

        from service.admin import CoordinatorUnavailable

        try:
            return await getattr(self._handle, method).remote(*args, **kwargs)
        except RayTaskError as exc:
            if isinstance(exc.cause, Exception):
                raise exc.cause from exc  # (the remote traceback stays on the chain, for the logs)
            raise
        except (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError) as exc:
            raise CoordinatorUnavailable(f"the coordinator is unavailable ({type(exc).__name__})") from exc


class IngressDeployment:
    """OpenAI HTTP ingress: one engine per replica, experts on the workers."""

    async def __init__(self, coordinator, settings: IngressSettings) -> None:
        import ray

        from placement import Placement
        from service.async_engine import AsyncEngine
        from service.dispatch import DispatchContext, device_failed
        from service.engine import Engine
        from service.model import load_engine_model
        from service.placement_sync import PlacementSync, worker_channels
        from service.tokenizer import load_tokenizer

        self.settings = settings
        self.coordinator = coordinator
        boot = await coordinator.bootstrap.remote()
        node_id = ray.get_runtime_context().get_node_id()
        self.context = DispatchContext(Placement.from_dict(boot["placement"]),
                                       worker_channels(boot["workers"], node_id, settings.data_plane_timeout_s),
                                       workers_epoch=boot["workers_epoch"])
        device = "cuda" if ray.get_gpu_ids() else "cpu"  # the dense part goes where the replica has a GPU
        model = load_engine_model(settings.checkpoint, dtype=settings.dtype, device=device,
                                  context=self.context).model
        tokenizer = load_tokenizer(settings.checkpoint)
        engine_config = settings.engine_config
        if device == "cuda" and settings.gpu_kv_cache_fraction is not None:
            engine_config = dataclasses.replace(engine_config, kv_cache_bytes=gpu_kv_cache_bytes(
                settings.gpu_kv_cache_fraction))
        self.engine = AsyncEngine(Engine(model, engine_config, tokenizer, hooks=self.context,
                                         retryable=device_failed),
                                  num_threads=settings.engine_threads)
        self.engine.start()
        engine_id = self.engine_id = f"ingress-{uuid.uuid4().hex[:8]}"
        self._serving_metrics = None  # the app's ServingMetrics, once Serve built the app
        self.sync = PlacementSync(engine_id, self.context,
                                  lambda report: answer(coordinator.report.remote(report)),
                                  node_id=node_id, interval_s=settings.sync_interval_s,
                                  data_plane_timeout_s=settings.data_plane_timeout_s, workers_id=settings.workers_id)
        # Synced once before the replica serves: the placement it bootstrapped on may be gone by now (a migration
        # that finished while the model loaded, acknowledged by the engines the coordinator knew).
        await asyncio.to_thread(self.sync.start)
        self.placement_metrics = PlacementCollector()
        self._stopping = threading.Event()
        threading.Thread(target=self._refresh_metrics, name="placement-metrics", daemon=True).start()
        if not boot["calibrated"] and settings.profile_prompts:
            await self._profiling_pass()  # (never fails the replica's start: the loop calibrates on served traffic)
        log.info("vibe-serve ready: model %r, %d %s, dense part on %s, placement version %d",
                 settings.served_model_name, settings.num_devices,
                 "emulated devices" if settings.emulation else "expert workers", device,
                 self.context.placement.version)

    async def _profiling_pass(self) -> None:
        """Run the representative prompt set, then have the coordinator place experts for its routing. A prompt
        that does not fit ``max_model_len`` is left out, and none waits on ``request_timeout_s``; a pass that fails
        all the same (a profile file gone bad, an engine failure) is logged and the calibration asked for anyway: it
        then plans on served traffic, tried again by the coordinator's loop (the replica's start failed, and Serve
        restarted it to fail the same way: a valid config never served)."""
        from service.sampling import SamplingParams

        started = time.monotonic()
        limit = self.engine.config.max_model_len - self.settings.profile_max_tokens
        kept: list[list[int]] = []
        try:
            prompts = read_prompts(Path(self.settings.profile_prompts), self.engine.tokenizer)
            kept = [ids for ids in prompts if len(ids) <= limit]
            if len(kept) < len(prompts):
                log.warning("profiling pass: %d of %d prompts are longer than max_model_len %d allows (%d tokens with "
                            "the %d the pass generates): left out", len(prompts) - len(kept), len(prompts),
                            self.engine.config.max_model_len, limit, self.settings.profile_max_tokens)
            params = SamplingParams(max_tokens=self.settings.profile_max_tokens, temperature=0.0)
            # At most max_queue at once: more would be refused (QueueFull).
            admitted = asyncio.Semaphore(self.engine.config.max_queue)

            async def run(i: int, ids: list[int]) -> None:
                async with admitted:
                    async for _ in self.engine.generate(f"profile-{i}", ids, params, timed=False):
                        pass

            outcomes = await asyncio.gather(*(run(i, ids) for i, ids in enumerate(kept)), return_exceptions=True)
            if failed := [o for o in outcomes if isinstance(o, BaseException)]:
                log.warning("profiling pass: %d of %d prompts failed (first: %r)", len(failed), len(kept), failed[0])
        except Exception:
            log.exception("the profiling pass failed: the placement is calibrated on served traffic instead")
        await asyncio.to_thread(self.sync.sync_once)  # hand over every router count of the pass
        try:
            result = await self.coordinator.calibrate.remote()
        except Exception as exc:  # (no statistics yet: the coordinator's loop tries again on served traffic)
            log.warning("startup calibration failed (%s): the coordinator tries it again on served traffic", exc)
            return
        # only an applied calibration published its version (a rollback's names one never published: the wait was
        # 30 s for nothing; the coordinator's loop tries it again)
        deadline = time.monotonic() + 30
        while (result.get("status") == "applied" and self.context.placement.version < result["to_version"]
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        log.info("profiling pass over %d prompts: %s in %.1f s", len(kept), result.get("status"),
                 time.monotonic() - started)

    def _refresh_metrics(self) -> None:
        """Keep a fresh coordinator summary and the other replicas' serving metrics for /metrics (this replica's sent
        in exchange), off the request path."""
        while not self._stopping.wait(METRICS_REFRESH_S):
            try:
                self.placement_metrics.refresh(answer(self.coordinator.metrics_summary.remote()))
                if self._serving_metrics is not None:
                    self._serving_metrics.set_peers(answer(self.coordinator.serving_metrics.remote(
                        self.engine_id, self._serving_metrics.snapshot())))
            except Exception as exc:  # the coordinator may be restarting; /metrics shows the last summary
                log.debug("metrics refresh failed: %s", exc)

    def __serve_build_asgi_app__(self):
        from service.admin import admin_router
        from service.app import create_app

        admin = admin_router(_HandleClient(self.coordinator), token_sha256=self.settings.admin_token_sha256,
                             num_devices=self.settings.num_devices, emulation=self.settings.emulation,
                             flush_statistics=lambda: asyncio.to_thread(self.sync.sync_once))
        app = create_app(self.engine, served_model_name=self.settings.served_model_name, extra_router=admin,
                         health_checks=[self.sync.problem], reasoning_parser=self.settings.reasoning_parser,
                         tool_call_parser=self.settings.tool_call_parser,
                         max_body_bytes=self.settings.max_body_bytes, body_timeout_s=self.settings.body_timeout_s)
        metrics = app.state.metrics
        metrics.replica = self.engine_id  # serving series labelled replica: several replicas answer scrapes
        metrics.add_shared(self.placement_metrics)
        self._serving_metrics = metrics
        return app

    def check_health(self) -> None:
        """Serve's health probe: failing it, the replica is replaced (a new process: a GPU's sticky error cleared)."""
        if not self.engine.is_alive:
            raise RuntimeError("the engine step loop stopped")
        if self.engine.broken:
            raise RuntimeError(self.engine.broken)

    def __del__(self) -> None:
        # (Serve runs this during a start still in progress too, the app deleted meanwhile: what was made is stopped,
        # an engine started before the sync was made included)
        if (stopping := getattr(self, "_stopping", None)) is not None:
            stopping.set()
        if (sync := getattr(self, "sync", None)) is not None:
            sync.stop()
        if (engine := getattr(self, "engine", None)) is not None:
            engine.shutdown()


def read_prompts(path: Path, tokenizer) -> list[list[int]]:
    """Token ids of every prompt in a JSON-lines file of {"messages": [...]} (chat) or {"prompt": str}; a chat's
    messages as plain text (their contents a line apart) for a tokenizer without a chat template (a base model:
    the pass's router statistics need its tokens, not a chat's form).

    Raises:
        ValueError: a line that is not one of the two, naming the file and the line (`profile_lines`).
    """
    from service.text import apply_chat_template, profile_lines

    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = []
    for item in profile_lines(path):
        if "messages" not in item:
            prompts.append(tokenizer.encode(item["prompt"]))
        elif chat:
            prompts.append(apply_chat_template(tokenizer, item["messages"]))
        else:
            prompts.append(tokenizer.encode("\n".join(m["content"] for m in item["messages"])))
    return prompts


def serve_deployments():
    """The two deployment classes, decorated (done here so importing this module needs no Serve context)."""
    coordinator = serve.deployment(name="Coordinator", num_replicas=1)(CoordinatorDeployment)
    ingress = serve.deployment(name="OpenAIIngress")(serve.ingress()(IngressDeployment))
    return coordinator, ingress
