"""The Ray actor shell of an expert worker: the control plane around `ExpertWorker` and its data plane.

Owns starting the worker's socket server in the actor process (TCP on the node's IP, plus a Unix
socket under a per-actor temp folder for engines on the same node), removing that folder (at `shutdown`,
which the pool calls before killing the actor, or when a later incarnation of the actor starts; folders of
workers that died without either are removed by the next worker to start on the node) and
reporting where it lives (`WorkerInfo`). Every other method passes straight through to `ExpertWorker`. Ignores placement and
scheduling: the coordinator creates the actor with
`ExpertWorkerActor.options(name=..., namespace=..., num_cpus=<fraction>, num_gpus=<1 on GPUs>,
lifetime=..., max_concurrency=4).remote(config)`.

Migration moves weights worker to worker through the object store: the caller passes the ObjectRef of
`src.export_experts.remote(keys)` straight to `dst.import_experts.remote(...)`; Ray resolves it there.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence

import ray

from service.experts import Key
from service.messages import ExpertTensors, LatencySamples, Telemetry, WorkerInfo
from service.transport import WorkerServer
from service.worker import DEFAULT_PROFILE_TOKENS, ExpertWorker, WorkerConfig, WorkerStats

log = logging.getLogger(__name__)


def check_own_gpu(gpu_ids: Sequence, visible: str | None, device_count: int) -> None:
    """Refuse a GPU worker that would not compute on the GPU Ray gave it: Ray names that GPU in the actor's
    CUDA_VISIBLE_DEVICES, so its `cuda` is that GPU; where it does not (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES,
    set by some images) every worker of a node would compute on the node's first GPU, or on the GPU the variable
    kept names, timed as if each had its own."""
    if not gpu_ids:
        raise RuntimeError("a GPU worker (device cuda) without a GPU from Ray: give it worker_num_gpus > 0")
    if device_count == 0:
        raise RuntimeError(f"Ray gave this worker GPU {', '.join(map(str, gpu_ids))} but torch sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES {visible!r}): check the node's driver and the torch build")
    if device_count > max(1, len(gpu_ids)):
        shown = "not set" if visible is None else f"{visible!r}"
        raise RuntimeError(f"this worker sees {device_count} GPUs (CUDA_VISIBLE_DEVICES {shown}; RAY_EXPERIMENTAL_"
                           f"NOSET_CUDA_VISIBLE_DEVICES?) where Ray gave it {len(gpu_ids)} "
                           f"({', '.join(map(str, gpu_ids))}): it would compute on the first it sees, not on its own; "
                           f"unset that variable for the workers")
    # as many, but others (a CUDA_VISIBLE_DEVICES kept by that variable, set for the workers by the user or the
    # image): Ray names exactly the GPUs it gave
    if visible is not None and {v.strip() for v in visible.split(",") if v.strip()} != {str(g) for g in gpu_ids}:
        raise RuntimeError(f"this worker's CUDA_VISIBLE_DEVICES is {visible!r} where Ray gave it GPU "
                           f"{', '.join(map(str, gpu_ids))}: it would compute on another GPU than its own "
                           f"(RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES?); unset that variable for the workers")


@ray.remote
class ExpertWorkerActor:
    """One device's expert worker as a Ray actor (threaded: control calls may overlap forwards)."""

    def __init__(self, config: WorkerConfig) -> None:
        if config.device.startswith("cuda"):
            import torch

            check_own_gpu(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
        self._worker = ExpertWorker(config)
        self._record: dict = {}  # the coordinator's latest placement record (for its recovery)
        self._socket_dir, self._socket_lock = _socket_dir()
        self._shutdown_lock = threading.Lock()
        self._server = WorkerServer(self._worker, host=ray.util.get_node_ip_address(),
                                    unix_path=os.path.join(self._socket_dir, "worker.sock"))
        atexit.register(self.shutdown)  # a normal process exit also removes the socket folder

    def info(self) -> WorkerInfo:
        context = ray.get_runtime_context()
        config = self._worker.config
        return WorkerInfo(
            index=config.index,
            actor_name=context.get_actor_name() or "",
            tcp_address=self._server.tcp_address,
            unix_address=self._server.unix_address,
            node_id=context.get_node_id(),
            device=config.device,
            emulated=config.emulation is not None,
        )

    def load_experts(self, checkpoint_dir: str, keys: Iterable[Key], deadline: float | None = None) -> list[Key]:
        return self._worker.load_experts(checkpoint_dir, keys, deadline)

    def import_experts(self, items: Iterable[ExpertTensors], deadline: float | None = None) -> list[Key]:
        return self._worker.import_experts(items, deadline)

    def export_experts(self, keys: Iterable[Key]) -> list[ExpertTensors]:
        return self._worker.export_experts(keys)

    def drop_experts(self, keys: Iterable[Key]) -> None:
        self._worker.drop_experts(keys)

    def held_experts(self) -> list[Key]:
        return self._worker.held_experts()

    def profile(self, token_counts: Sequence[int] = DEFAULT_PROFILE_TOKENS, repeats: int = 3) -> LatencySamples:
        return self._worker.profile(token_counts, repeats)

    def telemetry(self) -> Telemetry:
        return self._worker.telemetry()

    def set_emulated_speed(self, factor: float) -> None:
        self._worker.set_emulated_speed(factor)

    def stats(self) -> WorkerStats:
        return self._worker.stats()

    def inject_fault(self, operation: str) -> None:
        self._worker.inject_fault(operation)

    def ping(self) -> bool:
        return True

    def set_record(self, record: dict) -> None:
        """Keep the coordinator's latest placement record, so a restarted coordinator can recover it."""
        self._record = dict(record)

    def get_record(self) -> dict:
        return self._record

    def shutdown(self) -> None:
        """Close the data plane and remove the socket folder (call before killing the actor; again, also
        concurrently, or at the process's exit after it, does nothing)."""
        with self._shutdown_lock:
            lock, self._socket_lock = self._socket_lock, -1
        if lock < 0:
            return
        atexit.unregister(self.shutdown)
        self._server.close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)  # still holding its lock: no sweep races this
        with contextlib.suppress(OSError):
            os.close(lock)


SOCKET_DIR_PREFIX = "vibe-serve-"
LOCK_NAME = ".lock"  # held (flock) by the folder's worker for its whole life: the kernel lets go when it dies
SOCKET_GRACE_S = 60.0  # a folder of an older version (no lock file) younger than this may be starting: never stale
CLAIM_TIMEOUT_S = 10.0  # how long a worker waits for its folder's lock (a predecessor still exiting, a sweep)


def _socket_dir() -> tuple[str, int]:
    """Create this actor's socket folder and lock it: /tmp/vibe-serve-<hash of the Ray session, namespace and actor
    name (or id)>, the same for every incarnation of the actor, so that one restarted after a crash (Ray restarts
    the process), or recreated under its name by the pool after `ray.kill`, takes over the folder its predecessor
    could not remove. Two actors never share one: names are unique in a namespace, ids everywhere. A path that is
    not a folder of this user (a link, another user's), or one not claimed in CLAIM_TIMEOUT_S: a fresh random one.
    Then removes the folders of workers that are gone (`remove_stale_socket_dirs`). Returns (folder, the lock's
    file descriptor, to keep open while the worker lives)."""
    context = ray.get_runtime_context()
    identity = "/".join((context.get_session_name(), context.namespace,
                         context.get_actor_name() or context.get_actor_id()))
    path = os.path.join(tempfile.gettempdir(), f"{SOCKET_DIR_PREFIX}{hashlib.sha256(identity.encode()).hexdigest()[:16]}")
    try:
        lock = _claim(path)
    except OSError:
        path = tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX)
        lock = _claim(path)
    with contextlib.suppress(OSError):
        remove_stale_socket_dirs(tempfile.gettempdir(), keep=path)
    return path, lock


def _claim(path: str, timeout_s: float = CLAIM_TIMEOUT_S) -> int:
    """Make `path` a folder of this user holding a lock file this process holds (flock), and empty it of
    anything else (an earlier incarnation's socket and files); returns the lock's file descriptor. A sweep
    removes a folder only while holding its lock, so a lock taken on a file the sweep has since removed is let
    go and the folder made anew. OSError when `path` is not this user's folder or stays locked `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        found = os.lstat(path)
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
            raise PermissionError(f"{path} is not a folder of this user")
        lock_path = os.path.join(path, LOCK_NAME)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:  # a sweep removed the folder between the mkdir and the open: make it anew
            continue
        try:
            held = _lock(fd, lock_path)
            if held is None:  # a file system without flock (some NFS or FUSE mounts): sweeps cannot lock it either
                log.warning("socket folder %s cannot be locked: kept without a lock", path)
            if held is not False:
                for entry in os.scandir(path):  # an earlier incarnation's socket and files
                    if entry.name == LOCK_NAME:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # another holds it (a predecessor exiting, a sweep), or a sweep removed it meanwhile
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} stayed locked for {timeout_s:g} s")
        time.sleep(0.05)


def _lock(fd: int, path: str) -> bool | None:
    """Take the lock of the file at `path` through `fd` (opened on it) without waiting: True when held and `fd`
    still is `path`'s file; False when another process holds it or a sweep removed the file meanwhile (a lock
    on it guards nothing); None when the file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return _same_file(fd, path)


def _same_file(fd: int, path: str) -> bool:
    try:
        found = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def remove_stale_socket_dirs(root: str, keep: str | None = None) -> list[str]:
    """Remove the socket folders under `root` of workers that are gone (killed with the node's processes, OOM,
    a session that never reused their name): this user's `vibe-serve-*` folders whose lock file no process
    holds (taken and held here while the folder is removed, so a worker claiming it meanwhile waits, then makes
    it anew). A folder of an older version, without a lock file, goes when its worker.sock is older than
    SOCKET_GRACE_S and refuses a connection (no process listens on it), also under a lock this makes. Folders
    being created, live workers' folders (also on other nodes sharing `root`, where the file system's flock holds
    across hosts: NFS without `local_lock=flock` or `nolock`), links, other users' folders, folders on a file
    system without flock, and `keep` are left alone. Returns the paths removed."""
    removed = []
    for entry in os.scandir(root):
        if not entry.name.startswith(SOCKET_DIR_PREFIX) or entry.path == keep:
            continue
        try:
            found = os.lstat(entry.path)
            if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
                continue
            if _remove_if_unlocked(entry.path):
                removed.append(entry.path)
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    return removed


def _remove_if_unlocked(path: str) -> bool:
    """Remove `path` if its lock is free (held here while removing). A folder without a lock file (an older
    version's, or one whose worker is about to make it) gets one made here, exclusively, and is removed only if
    its socket is stale (`_listening`); a claim meanwhile waits for that lock and then makes the folder anew."""
    lock_path = os.path.join(path, LOCK_NAME)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW)
        legacy = False
    except FileNotFoundError:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return False  # made meanwhile: a claim's, judged at the next sweep
        legacy = True
    try:
        if not _lock(fd, lock_path):
            return False  # its worker lives (or claims it now), replaced meanwhile, or no flock here
        if legacy and _listening(os.path.join(path, "worker.sock")) is not False:
            # kept: take back the lock file made here (a live older-version worker holds no lock, so the next
            # sweep would take a left one for a dead worker's); a claim that opened it meanwhile finds it removed
            os.unlink(lock_path)
            return False
        shutil.rmtree(path)
        return True
    finally:
        os.close(fd)


def _listening(path: str) -> bool | None:
    """Whether a process listens on the Unix socket at `path`: False only for a socket file older than
    SOCKET_GRACE_S that refuses a connection; None when there is no socket there, a younger one, or the probe
    cannot tell."""
    with contextlib.suppress(FileNotFoundError):
        found = os.lstat(path)
        if not stat.S_ISSOCK(found.st_mode) or time.time() - found.st_mtime < SOCKET_GRACE_S:
            return None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                return False
            except OSError:
                return None
            return True
    return None
