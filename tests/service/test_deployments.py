"""The ingress's client of the coordinator deployment, without a cluster: a Serve handle's errors."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayTaskError

from service.deployments import _HandleClient
from service.openai_api import error_body


class _Handle:
    """A Serve deployment handle whose every method fails remotely with `cause`, as Serve raises it."""

    def __init__(self, cause: Exception) -> None:
        self.error = RayTaskError("recalibrate", "Traceback (most recent call last):\n  File ...\n", cause,
                                  proctitle="ray::ServeReplica:vibe:Coordinator", pid=4242, ip="192.0.2.2")

    def __getattr__(self, method: str):
        handle = self

        class _Method:
            def remote(self, *args, **kwargs):
                async def fail():
                    raise handle.error.as_instanceof_cause()
                return fail()
        return _Method()


def test_a_coordinator_error_is_raised_as_its_cause_and_answered_with_its_own_message():
    cause = ValueError("no router statistics yet: serve some requests first")
    handle = _Handle(cause)
    assert isinstance(handle.error.as_instanceof_cause(), ValueError)  # what made error replies quote the traceback
    assert "192.0.2.2" in str(handle.error.as_instanceof_cause())
    with pytest.raises(ValueError) as info:
        asyncio.run(_HandleClient(handle).call("recalibrate"))
    assert info.value is cause and isinstance(info.value.__cause__, RayTaskError)
    assert error_body(info.value) == (400, {"error": {"message": "no router statistics yet: serve some requests first",
                                                      "type": "invalid_request_error", "param": None, "code": None}})


def test_the_coordinator_passes_each_replicas_serving_metrics_to_the_others(monkeypatch):
    """Each ingress replica sends its serving metrics and gets the others' back (for its /metrics: a scrape reaches
    one replica at random); a replica not heard from for SERVING_METRICS_TTL_S is dropped (its series end). The
    deployment's own state only: its coordinator is not started here."""
    import threading
    import types

    from service import deployments

    clock = [100.0]
    monkeypatch.setattr(deployments.time, "monotonic", lambda: clock[0])
    coordinator = object.__new__(deployments.CoordinatorDeployment)
    coordinator._serving, coordinator._serving_lock, coordinator._drain_s = {}, threading.Lock(), 0.0
    coordinator._closing = threading.Event()
    # (what its __del__ stops: a coordinator with a pool, both doing nothing here)
    coordinator.core = types.SimpleNamespace(stop=lambda: None, pool=types.SimpleNamespace(shutdown=lambda: None))
    assert coordinator.serving_metrics("ingress-a", ["a1"]) == {}
    assert coordinator.serving_metrics("ingress-b", ["b1"]) == {"ingress-a": ["a1"]}
    clock[0] += deployments.SERVING_METRICS_TTL_S / 2
    assert coordinator.serving_metrics("ingress-a", ["a2"]) == {"ingress-b": ["b1"]}
    clock[0] += deployments.SERVING_METRICS_TTL_S * 0.6  # b silent past the TTL: gone
    assert coordinator.serving_metrics("ingress-a", ["a3"]) == {}


def _app_status(status: str):
    import types

    # (Serve 2.60 lists no deployments of a DELETING app; its replicas are found by their actors' names)
    return types.SimpleNamespace(status=status, deployments={})


def _replicas(monkeypatch, *counts: int) -> list:
    """Serve's named replica actors as ray.util.list_named_actors answers, the ingress having `counts[i]` replicas
    at the i-th call (the last count thereafter); returns the list of calls made."""
    import ray

    asked = []

    def named(all_namespaces=False):
        ingress = counts[min(len(asked), len(counts) - 1)]
        asked.append(1)
        return ([{"name": "SERVE_REPLICA::vibe#Coordinator#a1", "namespace": "serve"},
                 {"name": "SERVE_REPLICA::vibe-2#OpenAIIngress#b1", "namespace": "serve"},  # another app's
                 {"name": "vibe-worker-vibe-0123abcd-0", "namespace": "vibe"}]
                + [{"name": f"SERVE_REPLICA::vibe#OpenAIIngress#r{i}", "namespace": "serve"} for i in range(ingress)])

    monkeypatch.setattr(ray.util, "list_named_actors", named)
    return asked


@pytest.mark.parametrize("status", ["RUNNING", "UNHEALTHY", "DEPLOYING", "DEPLOY_FAILED"])
def test_a_coordinator_stopped_while_its_app_stays_keeps_the_workers(monkeypatch, status):
    """Serve stops a coordinator whose health checks fail and starts another; its workers were killed whenever the
    app was not DEPLOYING, so the next coordinator started fresh ones and reloaded every expert, the placement and
    calibration lost (the redeploy audit: a coordinator paused past its health checks)."""
    import types

    from service import deployments

    monkeypatch.setattr(deployments.serve, "get_replica_context",
                        lambda: types.SimpleNamespace(app_name="vibe", deployment="Coordinator"))
    monkeypatch.setattr(deployments.serve, "status",
                        lambda: types.SimpleNamespace(applications={"vibe": _app_status(status)}))
    assert not deployments._app_going_away(drain_s=0.0)


def test_a_deleted_apps_workers_go_once_its_ingress_replicas_drained(monkeypatch):
    """serve.delete stops the coordinator and the ingress replicas at once; the workers went at once too, so the
    requests the ingress was draining stalled and were cut at its force-kill (the redeploy audit). Now: once no
    other deployment of the app has a replica, or after the drain timeout; at once when the app is gone or no
    controller answers (serve shutdown)."""
    import types

    from service import deployments

    monkeypatch.setattr(deployments.serve, "get_replica_context",
                        lambda: types.SimpleNamespace(app_name="vibe", deployment="Coordinator"))
    monkeypatch.setattr(deployments.serve, "status",
                        lambda: types.SimpleNamespace(applications={"vibe": _app_status("DELETING")}))
    asked = _replicas(monkeypatch, 2, 1, 0)
    assert deployments._app_going_away(drain_s=60.0, poll_s=0.0) and len(asked) == 3
    _replicas(monkeypatch, 3)
    assert deployments._app_going_away(drain_s=0.0, poll_s=0.0)  # never drained: at the timeout
    monkeypatch.setattr(deployments.serve, "status", lambda: types.SimpleNamespace(applications={}))
    assert deployments._app_going_away(drain_s=60.0)

    def unreachable():
        raise ConnectionError("controller gone")

    monkeypatch.setattr(deployments.serve, "status", unreachable)
    assert deployments._app_going_away(drain_s=60.0)


class _Clock:
    """time.monotonic for the deployment module, and a closing event whose every wait advances it by the wait."""

    def __init__(self) -> None:
        self.now = 0.0
        self.on_wait = lambda: None

    def monotonic(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += seconds
        self.on_wait()
        return False

    def set(self) -> None:  # (the deployment's __del__ closes it)
        pass


def _shell(monkeypatch, clock: _Clock | None = None, drain_s: float = 60.0):
    """A coordinator deployment of worker configuration "vibe-worker-{app}-aaaaaaaa", its core a stand-in that
    records the reports it is given (not started: the deployment's own state only)."""
    import threading
    import types

    from service import deployments
    from service.messages import SyncReply

    shell = object.__new__(deployments.CoordinatorDeployment)
    shell._workers_id, shell._foreign, shell._foreign_at, shell._drain_s = "vibe-worker-{app}-aaaaaaaa", set(), 0.0, drain_s
    shell._first_report_at = None
    reports = []
    # (and what its __del__ stops: a coordinator with a pool, both doing nothing here)
    shell.core = types.SimpleNamespace(report=lambda report: reports.append(report) or SyncReply(None, None, 7),
                                       stop=lambda: None, pool=types.SimpleNamespace(shutdown=lambda: None))
    shell._closing = threading.Event()
    if clock is not None:
        monkeypatch.setattr(deployments.time, "monotonic", clock.monotonic)
        shell._closing = clock
    return shell, reports


def _report(workers_id: str, engine_id: str = "ingress-old"):
    import numpy as np

    from service.messages import EngineReport

    return EngineReport(engine_id, 3, np.zeros((1, 2, 4), dtype=np.int64), workers_epoch=41, workers_id=workers_id)


def test_an_engine_of_another_worker_configuration_is_told_nothing_and_counted_nowhere(monkeypatch):
    """After a redeploy that changed the workers (another model, dtype, emulation...), the earlier configuration's
    ingress replicas drain their requests reporting to the new coordinator, which answered them with its workers and
    placement: a stream of the earlier model switched to the new model's experts mid-request (its text diverged,
    status 200; a real Serve redeploy in tests/integration/test_serve_redeploy.py), or failed with a 503."""
    from service.messages import SyncReply

    shell, reports = _shell(monkeypatch)
    other = _report("vibe-worker-{app}-bbbbbbbb")
    assert shell.report(other) == SyncReply(placement=None, workers=None, workers_epoch=41)  # (keeps its own)
    assert reports == [] and shell._foreign == {"ingress-old"}
    for own in (_report("vibe-worker-{app}-aaaaaaaa", "ingress-new"), _report("", "ingress-unknown")):
        assert shell.report(own) == SyncReply(None, None, 7)  # the coordinator's answer
    assert [r.engine_id for r in reports] == ["ingress-new", "ingress-unknown"]


def test_the_earlier_configurations_workers_go_once_its_engines_fell_silent(monkeypatch):
    """Kept by the pool at start while its ingress replicas drain (they report every 0.1 s), retired STRAY_QUIET_S
    after the last report of another configuration; however long they keep reporting (a rolling update of many
    replicas), they are kept (a deadline killed them under replicas still draining)."""
    from service import deployments

    clock = _Clock()
    shell, _ = _shell(monkeypatch, clock)
    retired = []
    pool = type("Pool", (), {"retire_strays": lambda self: retired.append(clock.now)})()

    def reporting_until_900_s():
        if clock.now < 900:
            shell.report(_report("vibe-worker-{app}-bbbbbbbb"))

    clock.on_wait = reporting_until_900_s
    shell._retire_strays_when_drained(pool)
    assert retired == [899 + deployments.STRAY_QUIET_S]  # (the last report at 899 s)


def test_the_quiet_window_counts_from_the_first_report_that_reached_the_coordinator(monkeypatch):
    """Serve may stop the earlier coordinator before this one runs: until it is routed to, no report can reach it,
    and a window counted from its start retired the workers under replicas whose reports were waiting."""
    from service import deployments

    clock = _Clock()
    shell, _ = _shell(monkeypatch, clock)
    retired = []
    pool = type("Pool", (), {"retire_strays": lambda self: retired.append(clock.now)})()

    def own_engine_reaches_it_at_30_s():
        if clock.now == 30:
            shell.report(_report("vibe-worker-{app}-aaaaaaaa", "ingress-new"))

    clock.on_wait = own_engine_reaches_it_at_30_s
    shell._retire_strays_when_drained(pool)
    assert retired == [30 + deployments.STRAY_QUIET_S]


def test_a_closing_coordinator_stops_waiting_and_leaves_the_workers_to_its_shutdown(monkeypatch):
    shell, _ = _shell(monkeypatch)
    shell._closing.set()
    retired = []
    shell._retire_strays_when_drained(type("Pool", (), {"retire_strays": lambda self: retired.append(1)})())
    assert retired == []


def test_a_late_coordinator_call_is_cancelled():
    """A report or metrics call that timed out stayed queued in Serve: those sent while no coordinator was up all
    reached the new one together, with stale versions (a Serve review). A late one is cancelled; others answer."""
    from service.deployments import answer

    class Response:
        def __init__(self, late: bool) -> None:
            self.late, self.cancelled, self.waited = late, False, None

        def result(self, timeout_s=None):
            self.waited = timeout_s
            if self.late:
                raise TimeoutError("Timed out resolving to ObjectRef.")
            return "answer"

        def cancel(self):
            self.cancelled = True

    late, prompt = Response(late=True), Response(late=False)
    with pytest.raises(TimeoutError):
        answer(late)
    assert late.cancelled and late.waited == 10.0
    assert answer(prompt) == "answer" and not prompt.cancelled


class _StartingPool:
    """A worker pool as the coordinator deployment uses it: what it was told, when."""

    def __init__(self, worker_configs, config) -> None:
        self.config, self.strays, self.calls = config, {}, []

    def shutdown(self) -> None:
        self.calls.append("shutdown")

    def abandon_start(self) -> None:
        self.calls.append("abandon_start")


def _starting_coordinator(monkeypatch, start):
    """The coordinator deployment's constructor as a coroutine, its Coordinator's start `start` (in a thread), its
    pool a `_StartingPool`."""
    import types

    from service import deployments
    from service.worker_pool import RayPoolConfig

    class Core:
        def __init__(self, config, pool, shape) -> None:
            self.pool, self.stopped = pool, False

        def start(self) -> None:
            start()

        def stop(self) -> None:
            self.stopped = True

    monkeypatch.setattr(deployments, "RayWorkerPool", _StartingPool)
    monkeypatch.setattr(deployments, "Coordinator", Core)
    shell = object.__new__(deployments.CoordinatorDeployment)
    config = RayPoolConfig(name_prefix="vibe-worker-{app}-0123abcd", family_prefix="vibe-worker-{app}-")
    return shell, shell.__init__(types.SimpleNamespace(), [None], config, None, drain_s=0.0)


def test_a_failed_start_kills_the_workers_it_created(monkeypatch):
    """A coordinator whose start raised left its new detached workers running, holding their devices (an app that
    ended DEPLOY_FAILED kept them until another deploy of its name)."""
    def start():
        raise RuntimeError("every worker failed loading its experts")

    shell, init = _starting_coordinator(monkeypatch, start)
    with pytest.raises(RuntimeError, match="every worker failed"):
        asyncio.run(init)
    assert shell.core.pool.calls == ["abandon_start"] and shell.core.stopped
    assert shell.worker_family() == "vibe-worker-default-"  # (outside a replica: app "default")


def test_the_destructor_runs_while_the_start_does_and_a_deleted_app_takes_its_workers(monkeypatch):
    """The start runs in a thread: Serve runs `__del__` meanwhile (an app deleted while its coordinator starts). The
    constructor held the replica's loop, so `__del__` waited for the start, and Serve force-kills the replica at its
    graceful_shutdown_timeout_s: the workers created stayed running (a Serve review)."""
    import threading

    from service import deployments

    monkeypatch.setattr(deployments, "_app_going_away", lambda drain_s: True)
    started, release = threading.Event(), threading.Event()

    def start():
        started.set()
        assert release.wait(10)

    shell, init = _starting_coordinator(monkeypatch, start)

    async def delete_while_starting():
        task = asyncio.ensure_future(init)
        assert await asyncio.to_thread(started.wait, 10)
        shell.__del__()  # (Serve's call_destructor, on the replica's loop)
        assert shell.core.pool.calls == ["shutdown"] and not task.done()
        release.set()
        await task

    asyncio.run(delete_while_starting())
    assert shell.core.stopped and shell.core.pool.calls == ["shutdown"]


def _profiling_ingress(tmp_path, calibration: dict):
    """An ingress shell whose profiling pass runs no prompt and whose coordinator answers `calibration`; the versions
    of the placement it serves, one per read (the placement it switches to as its sync thread answers)."""
    import threading
    import types

    from service.deployments import IngressDeployment

    prompts = tmp_path / "profile.jsonl"
    prompts.write_text("")
    reads: list[int] = []

    class _Context:
        @property
        def placement(self):
            reads.append(1 if len(reads) < 3 else calibration["to_version"])  # switched at the fourth read
            return types.SimpleNamespace(version=reads[-1])

    async def calibrate() -> dict:
        return calibration

    ingress = object.__new__(IngressDeployment)
    ingress.settings = types.SimpleNamespace(profile_prompts=str(prompts), profile_max_tokens=2)
    ingress.engine = types.SimpleNamespace(tokenizer=None, config=types.SimpleNamespace(max_queue=4, max_model_len=64),
                                           shutdown=lambda: None)
    ingress.sync = types.SimpleNamespace(sync_once=lambda: None, stop=lambda: None)
    ingress._stopping = threading.Event()  # (what __del__ touches)
    ingress.coordinator = types.SimpleNamespace(calibrate=types.SimpleNamespace(remote=calibrate))
    ingress.context = _Context()
    return ingress, reads


@pytest.mark.parametrize("status", ["rolled_back", "no_change", "already_calibrated"])
def test_the_profiling_pass_waits_only_for_a_calibration_that_published_its_version(tmp_path, status):
    """A calibration that rolled back names the version it would have published (`to_version`): the ingress waited
    the full 30 s for it before it said it was ready."""
    ingress, reads = _profiling_ingress(tmp_path, {"status": status, "to_version": 5})
    asyncio.run(ingress._profiling_pass())
    assert reads == []


def test_the_profiling_pass_waits_for_an_applied_calibrations_version(tmp_path):
    ingress, reads = _profiling_ingress(tmp_path, {"status": "applied", "to_version": 5})
    asyncio.run(ingress._profiling_pass())
    assert reads == [1, 1, 1, 5]


def test_an_ingress_deleted_while_it_starts_stops_what_it_made():
    """Serve runs a replica's destructor during a start still in progress (the app deleted meanwhile): the ingress's
    touched its placement sync and stop event first, which an engine started before them did not have yet
    (AttributeError, the engine's threads left running)."""
    import types

    from service.deployments import IngressDeployment

    stopped = []
    ingress = object.__new__(IngressDeployment)
    ingress.engine = types.SimpleNamespace(shutdown=lambda: stopped.append("engine"))
    ingress.__del__()
    assert stopped == ["engine"]
    object.__new__(IngressDeployment).__del__()  # nothing made yet
