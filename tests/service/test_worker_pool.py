"""Which named actors a Ray worker pool retires at start (pure name logic), and which deadline its calls wait on
(no Ray)."""

import time
import types

import pytest
import torch

from service.worker_pool import LocalWorkerPool, RayPoolConfig, WorkerCallError, is_stray

CONFIG = RayPoolConfig(name_prefix="vibe-worker-vibe-0123abcd", family_prefix="vibe-worker-vibe-")


def test_workers_of_an_earlier_configuration_of_the_same_app_are_strays():
    assert is_stray("vibe-worker-vibe-89abcdef-3", CONFIG)


def test_current_workers_and_other_apps_workers_are_not():
    assert not is_stray("vibe-worker-vibe-0123abcd-3", CONFIG)  # the current configuration
    assert not is_stray("vibe-worker-vibe-2-89abcdef-3", CONFIG)  # app "vibe-2" shares the prefix
    assert not is_stray("vibe-worker-vibe-notes", CONFIG)
    assert not is_stray("vibe-worker-vibe-89abcdef-3", RayPoolConfig(name_prefix="x"))  # no family given


def test_loading_experts_has_a_timeout_of_its_own_other_calls_the_control_calls():
    """One 60 s deadline covered a whole load: a large model's share per worker (57 GB) could never load, and each
    retry of the coordinator's start began the load again beside the one still running (an audit)."""
    from service.worker_pool import LOAD_GRACE_S, RayWorkerPool

    sent = []

    class Actor:
        def __getattr__(self, method):
            return types.SimpleNamespace(remote=lambda *args: (method == "load_experts" and sent.append(args)) or method)

    pool = RayWorkerPool.__new__(RayWorkerPool)
    pool.config, pool._actors, waited = RayPoolConfig(load_timeout_s=900.0), [Actor(), Actor()], []
    pool._gather = lambda refs, devices, timeout_s=None: (waited.append((refs, timeout_s)) or [None] * len(refs), {})
    before = time.time()
    pool.load("/ckpt", {0: [(0, 1)], 1: []})
    pool.drop({0: [(0, 1)]})
    # the worker stops at the timeout; the pool waits LOAD_GRACE_S more for the layer it was reading
    assert waited == [(["load_experts"], 900.0 + LOAD_GRACE_S), (["drop_experts"], None)]  # None: call_timeout_s
    # the worker is given the deadline as wall-clock time, set before the call was sent
    assert [args[:2] for args in sent] == [("/ckpt", [(0, 1)])] and before + 900.0 <= sent[0][2] <= time.time() + 900.0
    waited.clear()  # a reload while serving waits for what it reads, never past the load timeout
    pool.load("/ckpt", {0: [(0, 1)]}, timeout_s=60.0)
    pool.load("/ckpt", {0: [(0, 1)]}, timeout_s=5000.0)
    assert [t for _, t in waited] == [60.0 + LOAD_GRACE_S, 900.0 + LOAD_GRACE_S]
    assert [round(args[2] - sent[0][2], -1) for args in sent[1:]] == [-840.0, 0.0]
    with pytest.raises(ValueError, match="invalid RayPoolConfig"):
        RayPoolConfig(load_timeout_s=0)


def test_a_copy_waits_as_long_as_its_caller_sizes_it_never_past_the_load_timeout():
    """A copy had one control call's 60 s whatever it moved, and its destination refuses an import ending well
    past that: a re-plan of a large model, which a refill reloading the same experts was given an hour for, could
    never finish and was rolled back at each try (a review)."""
    from service.worker_pool import LOAD_GRACE_S, RayWorkerPool

    sent = []

    class Actor:
        def __getattr__(self, method):
            return types.SimpleNamespace(remote=lambda *args: sent.append((method, args)) or method)

    pool = RayWorkerPool.__new__(RayWorkerPool)
    pool.config, pool._actors, waited = RayPoolConfig(load_timeout_s=900.0), [Actor(), Actor()], []
    pool._gather = lambda refs, devices, timeout_s=None: (waited.append(timeout_s) or [[]] * len(refs), {})
    for timeout_s in (None, 300.0, 5000.0):
        before = time.time()
        pool.copy([(0, 1, [(0, 1)])], timeout_s=timeout_s)
        limit = {None: 60.0, 300.0: 300.0, 5000.0: 900.0}[timeout_s]  # call_timeout_s by default
        assert waited[-1] == limit + LOAD_GRACE_S
        method, (exported, deadline) = sent[-1]
        assert method == "import_experts" and before + limit <= deadline <= time.time() + limit


def test_a_worker_still_being_created_is_left_to_go_on_not_killed_by_the_next_try(monkeypatch):
    """A worker whose start takes longer than call_timeout_s (its process placed, its creation task running) was
    said to be "left pending", but the coordinator's next try, at once, killed it and created another, which again
    had call_timeout_s: it never came up (a review). The next try waits on it, at start as at a restart."""
    import ray

    from service import worker_pool
    from service.worker_pool import RayWorkerPool, WorkerStartError

    created, killed, waited = [], [], []

    class Actor:
        def __init__(self):
            self.id = len(created)
            self._actor_id = bytes([self.id])
            created.append(self.id)
            self.info = types.SimpleNamespace(remote=lambda: f"info-{self.id}")

    pool = RayWorkerPool.__new__(RayWorkerPool)
    pool.config, pool.num_devices, pool._replacing = RayPoolConfig(call_timeout_s=0.05), 1, {}
    pool._adopted, pool._create = set(), lambda index: Actor()
    pool._collect_strays = lambda running: None
    pool._stop = lambda actors, wait=True: killed.extend(actor.id for actor in actors)
    pool._gather = lambda refs, devices, timeout_s=None: ([None], {0: TimeoutError("no answer")})
    monkeypatch.setattr(ray.util, "list_named_actors", lambda all_namespaces: [])
    monkeypatch.setattr(worker_pool, "_actor_state", lambda actor: ("PENDING_CREATION", 0, True))
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: waited.append(refs[0]) or ([], refs))
    with pytest.raises(WorkerStartError, match="still being created"):
        pool.start()
    for _ in range(2):
        with pytest.raises(WorkerCallError, match="left pending"):
            pool.restart(0)
    assert created == [0] and killed == [] and set(waited) == {"info-0"}
    # a crash loop is killed, and the next try creates a new worker
    monkeypatch.setattr(worker_pool, "_actor_state", lambda actor: ("RESTARTING", 2, True))
    with pytest.raises(WorkerCallError, match="died 2 time"):
        pool.restart(0)
    assert 0 not in pool._replacing and killed == [0]


def test_a_worker_refused_at_its_creation_is_named_with_the_reason_not_the_traceback():
    """A worker that refuses to start (its GPU check) dies in its creation task: Ray's error carries the traceback
    first and the reason last, and the 300 characters kept of it showed Ray's header and frames only (a review)."""
    from ray.exceptions import ActorDiedError, RayTaskError

    from service.worker_actor import check_own_gpu
    from service.worker_pool import error_text

    try:
        check_own_gpu(["5"], None, 8)
    except RuntimeError as exc:
        import traceback

        died = ActorDiedError(RayTaskError("ExpertWorkerActor.__init__", traceback.format_exc(), exc))
    assert len(str(died)) > 300
    text = error_text(died)
    assert text.startswith("ActorDiedError: The actor died because of an error raised in its creation task")
    assert " ... RuntimeError: this worker sees 8 GPUs (CUDA_VISIBLE_DEVICES not set;" in text
    assert "\x1b" not in text and len(text) < 450
    assert error_text(ValueError("short")) == "ValueError: short"
    assert error_text(ValueError("x" * 1000)) == "ValueError: " + "x" * 300
    lines = "The actor died unexpectedly before finishing this task.\n\tclass_name: X\n" + "\tpid: 1\n" * 40 + "\tip: 1"
    assert error_text(ValueError(lines)) == "ValueError: " + lines[:300]  # not a traceback: from the start


def test_a_copy_from_a_dead_source_names_the_source():
    """The in-process pool named the destination of a copy whose source was dead, as the Ray pool did (a review)."""
    from service.experts import checksum
    from service.messages import ExpertTensors
    from service.worker import ExpertWorker, WorkerConfig

    workers = [ExpertWorker(WorkerConfig(index=i)) for i in range(2)]
    tensors = {"gate_up": torch.randn(8, 4), "down": torch.randn(4, 4)}
    workers[0].import_experts([ExpertTensors(0, 0, tensors, checksum(tensors))])
    pool = LocalWorkerPool(workers)
    pool.kill(0)
    with pytest.raises(WorkerCallError) as err:
        pool.copy([(0, 1, [(0, 0)])])
    assert err.value.devices == (0,)


def test_the_in_process_pool_names_every_worker_a_call_failed_on():
    """held, telemetry and load_records stopped at the first dead worker and named it alone, unlike the Ray pool's
    calls and the in-process pool's others (a review): tests on it met another failure path than a cluster's."""
    from service.worker import ExpertWorker, WorkerConfig

    pool = LocalWorkerPool([ExpertWorker(WorkerConfig(index=i)) for i in range(4)])
    pool.kill(1)
    pool.kill(3)
    for call in (pool.held, pool.telemetry, pool.load_records, lambda: pool.drop({1: [(0, 0)], 3: [(0, 0)]})):
        with pytest.raises(WorkerCallError) as err:
            call()
        assert err.value.devices == (1, 3)
    assert set(pool.held([0, 2])) == {0, 2}


def test_the_pools_errors_cross_processes_whole_and_the_admin_answers_503():
    """Ray hands an actor's error to its caller pickled. WorkerCallError took `devices` beside the message, which
    pickling does not pass, so it came back as an UnserializableException: `POST /admin/profile` with a device down
    answered 500 "internal server error" instead of 503 naming the device (a review; the 503 itself:
    tests/service/test_admin.py)."""
    import asyncio
    import pickle

    from ray.exceptions import RayError, RayTaskError

    from service.deployments import _HandleClient
    from service.dispatch import DispatchError
    from service.worker_pool import WorkerStartError

    for error in (WorkerCallError("profile failed on device 1: the actor died", [1]),
                  WorkerStartError("device 2 cannot be placed", [2], [None, None, None]),
                  DispatchError(3, 4, ConnectionError("reset"))):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error) and vars(back) == vars(error)

    cause = WorkerCallError("profile failed on device 1: the actor died", [1])
    sent = RayTaskError("profile_devices", "Traceback ...", cause, proctitle="ray::Coordinator", pid=1, ip="192.0.2.2")

    class Handle:  # a coordinator handle whose call fails as Serve delivers the error: through Ray's bytes
        def __getattr__(self, method):
            async def fail(*args, **kwargs):
                raise RayError.from_bytes(sent.to_bytes())
            return types.SimpleNamespace(remote=fail)

    with pytest.raises(WorkerCallError) as raised:
        asyncio.run(_HandleClient(Handle()).call("profile_devices"))
    assert raised.value.devices == (1,)  # what the admin router answers with a 503 naming the device
