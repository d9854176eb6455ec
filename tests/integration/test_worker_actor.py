"""Two ExpertWorkerActors on a local Ray cluster: data plane over both transports, migration by ObjectRef;
the pool's worker lifecycle (socket folders removed, workers that cannot start named)."""

import contextlib
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from service.emulator import EmulationConfig
from service.messages import REPLY
from service.transport import WorkerClient, WorkerError, WorkerUnavailable
from service.worker import ExpertWorker, WorkerConfig
from service.worker_pool import RayPoolConfig, RayWorkerPool, WorkerCallError, WorkerStartError
from tests.service.test_experts import HIDDEN, make_expert

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def actors():
    from service.worker_actor import ExpertWorkerActor

    ray.init(num_cpus=2, include_dashboard=False, namespace="test-worker-actor")
    try:
        configs = [WorkerConfig(index=0, dtype="float32"),
                   WorkerConfig(index=1, dtype="float32", emulation=EmulationConfig(jitter=0.0))]
        handles = [ExpertWorkerActor.options(name=f"worker-{c.index}", num_cpus=0.5, max_concurrency=4).remote(c)
                   for c in configs]
        ray.get(handles[0].import_experts.remote([make_expert(0, 0), make_expert(0, 1)]))
        yield handles
        ray.get([h.shutdown.remote() for h in handles])
    finally:
        ray.shutdown()


def reference_outputs(expert: int, tokens: torch.Tensor) -> torch.Tensor:
    local = ExpertWorker(WorkerConfig(index=9, dtype="float32"))
    local.import_experts([make_expert(0, expert)])
    return local.forward(0, [expert], [tokens.shape[0]], tokens)[0]


def forward(address: str, expert: int, tokens: torch.Tensor):
    with WorkerClient(address, timeout_s=30.0) as client:
        client.send_forward(1, 0, np.array([expert], np.int32), np.array([tokens.shape[0]], np.int32), tokens)
        return client.recv_reply()


def test_info_and_forward_over_both_transports(actors):
    infos = ray.get([h.info.remote() for h in actors])
    assert [i.index for i in infos] == [0, 1] and [i.actor_name for i in infos] == ["worker-0", "worker-1"]
    assert [i.emulated for i in infos] == [False, True]
    assert infos[0].node_id == ray.get_runtime_context().get_node_id()
    tokens = torch.randn(6, HIDDEN)
    for address in (infos[0].tcp_address, infos[0].unix_address):
        reply = forward(address, 0, tokens)
        assert reply.kind == REPLY
        torch.testing.assert_close(reply.tensor, reference_outputs(0, tokens), rtol=0, atol=0)


def test_expert_moves_actor_to_actor_through_an_object_ref(actors):
    source, target = actors
    exported = source.export_experts.remote([(0, 1)])  # an ObjectRef, never fetched by the driver
    assert ray.get(target.import_experts.remote(exported)) == [(0, 1)]
    ray.get(source.drop_experts.remote([(0, 1)]))
    assert ray.get(source.held_experts.remote()) == [(0, 0)]
    assert ray.get(target.held_experts.remote()) == [(0, 1)]
    tokens = torch.randn(3, HIDDEN)
    reply = forward(ray.get(target.info.remote()).unix_address, 1, tokens)
    torch.testing.assert_close(reply.tensor, reference_outputs(1, tokens), rtol=0, atol=0)
    assert reply.values[0] == pytest.approx(4e-4)  # the emulated curve of the target device
    assert ray.get(target.stats.remote()).calls == 1


def test_control_calls_pass_through(actors):
    samples = ray.get(actors[1].profile.remote((1, 256), 1))
    np.testing.assert_allclose(samples.seconds, [4e-4, 8e-4])
    ray.get(actors[1].set_emulated_speed.remote(2.0))
    assert not ray.get(actors[0].telemetry.remote()).available
    with pytest.raises(ValueError, match="does not emulate"):
        ray.get(actors[0].set_emulated_speed.remote(2.0))


# --- lifecycle: socket folders, workers that do not start (the worker lifecycle audit) -------------------


def socket_dir(info) -> Path:
    return Path(info.unix_address.removeprefix("unix://")).parent


def test_a_restarted_actor_removes_its_predecessors_socket_folder(actors):
    """Ray restarts a crashed actor's process: the new incarnation takes over the same folder, cleaned."""
    from service.worker_actor import ExpertWorkerActor

    actor = ExpertWorkerActor.options(name="restarted", num_cpus=0.05, max_restarts=1).remote(WorkerConfig(index=5))
    first = socket_dir(ray.get(actor.info.remote()))
    (first / "left-over").touch()
    ray.get(actor.set_record.remote({"incarnation": 1}))
    ray.kill(actor, no_restart=False)  # as a crash: no exit hook runs, Ray restarts the process
    for _ in range(600):  # until the new incarnation answers (it holds no record)
        with contextlib.suppress(ray.exceptions.RayActorError):
            if ray.get(actor.get_record.remote(), timeout=120) == {}:
                break
    second = socket_dir(ray.get(actor.info.remote(), timeout=120))
    assert second == first and sorted(p.name for p in second.iterdir()) == [".lock", "worker.sock"]
    ray.get(actor.shutdown.remote())
    assert not first.exists()
    ray.kill(actor)


def test_a_starting_worker_removes_folders_of_workers_that_died_without_cleaning_up(actors):
    """Folders of workers killed with their node's processes (no exit hook, never restarted under their name) are
    removed by the next worker to start on the node; a live worker's folder is not."""
    import socket
    import tempfile

    from service.worker_actor import SOCKET_DIR_PREFIX, ExpertWorkerActor, _claim

    dead = Path(tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX))  # what a worker killed with its node left behind
    os.close(_claim(str(dead)))  # its lock let go when its process died
    legacy = Path(tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX))  # an older version's: no lock, a dead socket file
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(legacy / "worker.sock"))
    os.utime(legacy / "worker.sock", (time.time() - 3600,) * 2)
    live = [socket_dir(ray.get(actor.info.remote())) for actor in actors]
    for folder in live:  # the module's workers: old enough to be judged, and alive
        os.utime(folder / "worker.sock", (time.time() - 3600,) * 2)
    actor = ExpertWorkerActor.options(name="sweeper", num_cpus=0.05).remote(WorkerConfig(index=6))
    mine = socket_dir(ray.get(actor.info.remote(), timeout=120))
    assert not dead.exists() and not legacy.exists()
    assert mine.is_dir() and all(folder.is_dir() for folder in live)
    ray.get(actor.shutdown.remote())
    ray.kill(actor)


def test_pool_removes_socket_folders_at_restart_retirement_and_shutdown(actors):
    def pool(fingerprint: str) -> RayWorkerPool:
        return RayWorkerPool([WorkerConfig(index=i) for i in range(2)],
                             RayPoolConfig(name_prefix=f"test-folders-{fingerprint}", family_prefix="test-folders-",
                                           namespace="test-worker-pool", detached=False))

    earlier = pool("0123abcd")
    retired = {socket_dir(info) for info in earlier.start()}
    current = pool("89abcdef")  # a new configuration: retires the earlier one's workers at start
    folders = {socket_dir(info) for info in current.start()}
    assert not [folder for folder in retired if folder.exists()]
    folders.add(socket_dir(current.restart(0)))
    assert all(folder.is_dir() for folder in folders)
    current.shutdown()
    assert not [folder for folder in folders if folder.exists()]


def test_a_failed_start_kills_the_workers_it_created_and_keeps_those_it_adopted(actors):
    """`abandon_start` (a coordinator whose start failed): the workers its pool created go, none is created after;
    one that ran before (adopted: another coordinator's, ingress replicas may serve on it) stays until a shutdown.
    A failed start left its new detached workers holding their devices (an app that ended DEPLOY_FAILED)."""
    def pool(devices: int) -> RayWorkerPool:
        return RayWorkerPool([WorkerConfig(index=i) for i in range(devices)],
                             RayPoolConfig(name_prefix="test-abandon-0123abcd", family_prefix="test-abandon-",
                                           namespace="test-worker-pool", detached=False))

    earlier = pool(1)  # (held: the handles of actors not detached keep them alive)
    adopted = earlier.start()[0]
    current = pool(2)
    infos = current.start()
    assert infos[0].tcp_address == adopted.tcp_address  # worker 0 adopted, worker 1 created
    current.abandon_start()
    assert [_answers(info) for info in infos] == [True, False]
    with pytest.raises(WorkerCallError, match="not created: the pool is shut down"):
        current.restart(1)
    current.shutdown()  # (the app going away): the adopted worker goes too
    assert not _answers(infos[0])


def test_cleanup_kills_the_workers_no_app_claims(actors):
    """`python -m deploy.cleanup`'s work on a real cluster (no Serve: no app claims any worker): the listing kills
    nothing, the cleanup kills them, after their data plane closed (the socket folder removed)."""
    from deploy.cleanup import cleanup

    pool = RayWorkerPool([WorkerConfig(index=0)], RayPoolConfig(
        name_prefix="vibe-worker-gone-0123abcd", family_prefix="vibe-worker-gone-", detached=False))  # namespace "vibe"
    info = pool.start()[0]
    assert cleanup(dry_run=True) == 0 and _answers(info)
    assert cleanup() == 0
    assert not _answers(info) and not socket_dir(info).exists()
    assert "vibe-worker-gone-0123abcd-0" not in {entry["name"] for entry in ray.util.list_named_actors(True)}


def test_an_earlier_configurations_workers_are_kept_when_asked_and_there_is_room(actors, monkeypatch):
    """`keep_strays`: an earlier configuration's workers stay up after the new pool started (its ingress replicas
    still drain requests on them, which failed when they were killed at start) until `retire_strays`, or the pool's
    shutdown; without room for the new workers beside them (their GPUs), they are killed at start as before."""
    def pool(fingerprint: str, keep: bool = True) -> RayWorkerPool:
        return RayWorkerPool([WorkerConfig(index=i) for i in range(2)],
                             RayPoolConfig(name_prefix=f"test-keep-{fingerprint}", family_prefix="test-keep-",
                                           namespace="test-worker-pool", detached=False, keep_strays=keep))

    def alive(infos) -> list[bool]:
        return [_answers(info) for info in infos]

    first = pool("0123abcd")  # (held: the handles of actors not detached keep them alive)
    earlier = first.start()
    current = pool("89abcdef")
    current.start()
    assert sorted(current.strays) == ["test-keep-0123abcd-0", "test-keep-0123abcd-1"]
    assert alive(earlier) == [True, True]  # still serving: a forward over the data plane
    import ray as ray_module

    with monkeypatch.context() as patch:  # a coordinator restarted meanwhile, no room left: it creates no worker
        patch.setattr(ray_module, "available_resources", lambda: {"CPU": 0.0})
        restarted = pool("89abcdef")
        restarted.start()
    assert sorted(restarted.strays) == sorted(current.strays) and alive(earlier) == [True, True]
    restarted.strays = {}  # (one owner retires them)
    current.retire_strays()
    assert alive(earlier) == [False, False] and current.strays == {}
    kept = current.infos()
    again = pool("fedcba98")
    again.start()
    assert len(again.strays) == 2
    again.shutdown()  # (an app deleted meanwhile)
    assert alive(kept) == [False, False]
    kept_pool = pool("00000000")
    earlier = kept_pool.start()
    monkeypatch.setattr(ray_module, "available_resources", lambda: {"CPU": 0.01})  # no room for 2 x 0.05 CPU more
    last = pool("11111111")
    last.start()
    assert last.strays == {} and alive(earlier) == [False, False]
    last.shutdown()


def _answers(info) -> bool:
    """Whether the worker of `info` answers a forward on its data plane."""
    try:
        forward(info.unix_address or info.tcp_address, 0, torch.zeros(1, HIDDEN))
    except WorkerUnavailable:
        return False
    except WorkerError:  # answered, with an error (it holds no expert): up
        return True
    return True


class CrashOnLoad:
    """Kills the worker process while it starts (when the actor's arguments are unpickled), as a segfault in
    CUDA initialisation or an OOM kill would."""

    def __reduce__(self):
        return (os._exit, (1,))


def test_start_names_a_worker_that_dies_while_starting_and_stops_its_crash_loop(actors):
    crashing = WorkerConfig(index=1)
    object.__setattr__(crashing, "emulation", CrashOnLoad())
    pool = RayWorkerPool([WorkerConfig(index=0), crashing],
                         RayPoolConfig(name_prefix="test-crash", namespace="test-worker-pool", detached=False,
                                       call_timeout_s=15))
    try:
        with pytest.raises(WorkerStartError, match=r"device 1: its process died \d+ time\(s\) while starting") as err:
            pool.start()
        assert err.value.devices == (1,)  # the workers that did start are reported, for the caller to go on
        assert err.value.infos[0].index == 0 and err.value.infos[1] is None
        with pytest.raises(ray.exceptions.ActorDiedError):  # killed: Ray restarts it no more
            ray.get(pool._actors[1].info.remote(), timeout=120)
    finally:
        pool.shutdown()


def test_start_names_a_worker_no_node_can_place(actors):
    pool = RayWorkerPool([WorkerConfig(index=0)],
                         RayPoolConfig(name_prefix="test-unplaceable", namespace="test-worker-pool",
                                       detached=False, num_cpus=64, call_timeout_s=3))
    try:
        with pytest.raises(WorkerStartError, match=r"device 0: cannot be placed: it asks for 64 CPU and no node "
                                                   r"of the cluster has that much \(cluster: 2 CPU in 1 node"):
            pool.start()
    finally:
        pool.shutdown()


@pytest.mark.parametrize("num_cpus, reason", [(64, "cannot be placed: it asks for 64 CPU"),
                                               (1.5, "waiting for resources: it asks for 1.5 CPU")])
def test_a_restart_without_a_node_with_room_fails_at_once_and_keeps_its_replacement_pending(actors, num_cpus, reason):
    """A lost worker whose node is gone: its restart waited call_timeout_s (60 s by default) before failing, and the
    coordinator retried it at every probe, its loop (every other worker's health probe) held all that time. It now
    fails as soon as Ray shows no node has room for it: none has the resources (64 CPUs), or the free ones do not
    fit (1.5 CPUs of a 2-CPU node that other actors use: on GPUs, the survivors' GPUs held by the other workers).
    The replacement stays pending for a node to come, and the next try waits on it rather than replacing it (with
    call_timeout_s this long, the old wait outlasts the test's timeout)."""
    from dataclasses import replace

    pool = RayWorkerPool([WorkerConfig(index=0)],
                         RayPoolConfig(name_prefix=f"test-restart-pending-{int(num_cpus)}",
                                       namespace="test-worker-pool", detached=False))
    pool.start()
    try:
        pool.config = replace(pool.config, num_cpus=num_cpus, call_timeout_s=3600)  # its node gone
        with pytest.raises(WorkerCallError, match=rf"restart of device 0 failed: {re.escape(reason)}"):
            pool.restart(0)
        pending = pool._actors[0]
        with pytest.raises(WorkerCallError, match=rf"restart of device 0 failed: {re.escape(reason)}"):
            pool.restart(0)
        assert pool._actors[0] is pending  # waited on again, not replaced
    finally:
        pool.shutdown()


def test_a_restart_whose_new_worker_is_refused_at_creation_fails_at_once_with_the_reason(actors):
    """A worker refused at every creation (a GPU worker without its GPU: a GPU fallen off the bus) was re-created for
    call_timeout_s at each restart (31 actors in 15 s), holding the coordinator's loop, and failed saying the last
    one was 'still being created' (a review): the new actor's error is the restart's."""
    from dataclasses import replace

    pool = RayWorkerPool([WorkerConfig(index=0)],
                         RayPoolConfig(name_prefix="test-restart-refused", namespace="test-worker-pool",
                                       detached=False, call_timeout_s=20))
    pool.start()
    try:
        pool.worker_configs = [replace(pool.worker_configs[0], device="cuda")]  # its GPU gone (this host has none)
        created, create = [], pool._create
        pool._create = lambda index: created.append(index) or create(index)
        with pytest.raises(WorkerCallError, match=r"restart of device 0 failed: .*a GPU worker \(device cuda\)"):
            pool.restart(0)
        assert created == [0] or created == [0, 0]  # (a second only while the killed one's name was not released)
    finally:
        pool.shutdown()


def test_a_copy_from_a_dead_worker_names_it_not_the_destination(actors):
    """A copy whose source was dead named its healthy destination (the import failed on its argument): the
    coordinator then restarted a rejoining destination and did not suspect the source (a review)."""
    pool = RayWorkerPool([WorkerConfig(index=i) for i in range(3)],
                         RayPoolConfig(name_prefix="test-copy-blame", namespace="test-worker-pool", detached=False,
                                       call_timeout_s=20))
    pool.start()
    try:
        ray.get(pool._actors[0].import_experts.remote([make_expert(0, 0)]))
        with pytest.raises(WorkerCallError) as err:  # not held there: its export fails
            pool.copy([(1, 0, [(0, 0)])])
        assert err.value.devices == (1,) and "export_experts on device 1" in str(err.value)
        for dead, (src, dst) in ((2, (0, 2)), (0, (0, 1))):  # the destination dead, then the source
            ray.kill(pool._actors[dead], no_restart=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # (the kill is asynchronous: a call may still be answered)
                try:
                    ray.get(pool._actors[dead].info.remote(), timeout=30)
                except ray.exceptions.RayActorError:
                    break
                time.sleep(0.1)
            with pytest.raises(WorkerCallError) as err:
                pool.copy([(src, dst, [(0, 0)])])
            assert err.value.devices == (dead,)
    finally:
        pool.shutdown()


def test_telemetry_of_leaves_out_a_worker_that_does_not_answer(actors):
    """The coordinator's telemetry refresh asks the devices not lost and keeps those that answer in time: a dead
    worker no longer fails the whole call (every GPU's readings froze while one worker was down)."""
    pool = RayWorkerPool([WorkerConfig(index=i) for i in range(2)],
                         RayPoolConfig(name_prefix="test-telemetry-0", family_prefix="test-telemetry-",
                                       namespace="test-worker-pool", detached=False))
    pool.start()
    try:
        assert sorted(pool.telemetry_of([0, 1], timeout_s=30)) == [0, 1]
        ray.kill(pool._actors[1], no_restart=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the kill is asynchronous: a call may still run before it takes effect
            try:
                ray.get(pool._actors[1].info.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                break
            time.sleep(0.2)
        readings = pool.telemetry_of([0, 1], timeout_s=10)
        assert list(readings) == [0] and readings[0].device == 0
    finally:
        pool.shutdown()
