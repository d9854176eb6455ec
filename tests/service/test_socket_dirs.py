"""Socket folders of expert workers: a worker claims its folder by a lock it holds while it lives; the next
worker to start removes the folders of workers that are gone, never a live one's."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from service.worker_actor import (
    LOCK_NAME,
    SOCKET_DIR_PREFIX,
    SOCKET_GRACE_S,
    _claim,
    remove_stale_socket_dirs,
)


def _legacy_folder(root: Path, name: str, *, listening: bool, age_s: float = 2 * SOCKET_GRACE_S):
    """A folder as an older version left it (no lock file): worker.sock bound and listening (a live worker) or
    bound and closed (the file a dead process leaves); returns (folder, the listening socket or None)."""
    folder = root / f"{SOCKET_DIR_PREFIX}{name}"
    folder.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "worker.sock"))
    if listening:
        sock.listen(1)
    else:
        sock.close()
        sock = None
    then = time.time() - age_s
    os.utime(folder / "worker.sock", (then, then), follow_symlinks=False)
    return folder, sock


def _held(folder: Path) -> int:
    """Hold `folder`'s lock as its live worker does (another open file description: flock conflicts)."""
    fd = os.open(folder / LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_only_folders_whose_lock_no_worker_holds_are_removed(tmp_path):
    dead = tmp_path / f"{SOCKET_DIR_PREFIX}dead"
    os.close(_claim(str(dead)))  # its worker died: the kernel let go of the lock
    (dead / "worker.sock").touch()
    live = tmp_path / f"{SOCKET_DIR_PREFIX}live"
    os.close(_claim(str(live)))
    holder = _held(live)
    mine = tmp_path / f"{SOCKET_DIR_PREFIX}mine"
    os.close(_claim(str(mine)))
    starting = tmp_path / f"{SOCKET_DIR_PREFIX}starting"  # made, its lock not yet: left alone
    starting.mkdir()
    other = tmp_path / "not-a-worker-folder"
    os.close(_claim(str(other)))
    (tmp_path / f"{SOCKET_DIR_PREFIX}link").symlink_to(dead, target_is_directory=True)
    (tmp_path / f"{SOCKET_DIR_PREFIX}file").write_text("")
    try:
        removed = remove_stale_socket_dirs(str(tmp_path), keep=str(mine))
    finally:
        os.close(holder)
    assert removed == [str(dead)] and not dead.exists()
    assert all(p.exists() for p in (live, mine, starting, other, tmp_path / f"{SOCKET_DIR_PREFIX}file"))
    assert (tmp_path / f"{SOCKET_DIR_PREFIX}link").is_symlink()


def test_folders_of_older_versions_go_when_nobody_listens_on_their_socket(tmp_path):
    stale, _ = _legacy_folder(tmp_path, "stale", listening=False)
    live, server = _legacy_folder(tmp_path, "live", listening=True)
    young, _ = _legacy_folder(tmp_path, "young", listening=False, age_s=1.0)  # bound, maybe not listening yet
    try:
        removed = remove_stale_socket_dirs(str(tmp_path))
    finally:
        server.close()
    assert removed == [str(stale)] and live.exists() and young.exists()


def test_a_second_sweep_finds_nothing(tmp_path):
    for i in range(3):
        os.close(_claim(str(tmp_path / f"{SOCKET_DIR_PREFIX}dead{i}")))
    assert len(remove_stale_socket_dirs(str(tmp_path))) == 3
    assert remove_stale_socket_dirs(str(tmp_path)) == [] and not list(tmp_path.iterdir())


def test_a_claim_empties_a_predecessors_folder_and_keeps_the_lock_while_open(tmp_path):
    folder = tmp_path / f"{SOCKET_DIR_PREFIX}w"
    os.close(_claim(str(folder)))
    (folder / "worker.sock").touch()
    (folder / "left-over").mkdir()
    fd = _claim(str(folder))
    try:
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]
        with pytest.raises(TimeoutError, match="stayed locked"):
            _claim(str(folder), timeout_s=0.2)  # a second worker cannot take a live one's folder
        assert remove_stale_socket_dirs(str(tmp_path)) == []
    finally:
        os.close(fd)


def test_a_claim_waiting_on_a_sweep_makes_the_folder_anew(tmp_path):
    """The sweep holds the lock while it removes the folder: a worker claiming it meanwhile waits, finds its lock
    on a removed file, and makes the folder again, holding the new folder's lock."""
    folder = tmp_path / f"{SOCKET_DIR_PREFIX}w"
    os.close(_claim(str(folder)))
    sweep = _held(folder)  # the sweep has the lock
    claimed = {}
    claimant = threading.Thread(target=lambda: claimed.setdefault("fd", _claim(str(folder), timeout_s=10)))
    claimant.start()
    time.sleep(0.3)
    assert claimant.is_alive()  # waiting for the lock
    shutil.rmtree(folder)  # the sweep removes the folder, then lets go
    os.close(sweep)
    claimant.join(timeout=10)
    fd = claimed["fd"]
    try:
        assert folder.is_dir() and os.fstat(fd).st_ino == os.stat(folder / LOCK_NAME).st_ino
        assert remove_stale_socket_dirs(str(tmp_path)) == []  # held: a live worker's
    finally:
        os.close(fd)


def test_a_folder_without_a_lock_is_judged_under_one_the_sweep_makes_and_takes_back(tmp_path):
    """A folder whose worker has not made its lock yet: the sweep makes one exclusively to judge it, keeps the
    folder (no stale socket) and removes that lock file again, so the worker's claim makes its own at once."""
    starting = tmp_path / f"{SOCKET_DIR_PREFIX}starting"
    starting.mkdir()
    assert remove_stale_socket_dirs(str(tmp_path)) == []
    assert starting.is_dir() and not (starting / LOCK_NAME).exists()
    fd = _claim(str(starting), timeout_s=0.5)
    os.close(fd)


def test_live_and_young_folders_of_older_versions_survive_every_sweep(tmp_path):
    """An older version's live worker holds no lock: a lock file a sweep left behind would make the next sweep
    take its folder for a dead worker's (a review found the second sweep removing it)."""
    live, server = _legacy_folder(tmp_path, "live", listening=True)
    young, _ = _legacy_folder(tmp_path, "young", listening=False, age_s=1.0)
    try:
        for _ in range(3):
            assert remove_stale_socket_dirs(str(tmp_path)) == []
    finally:
        server.close()
    assert (live / "worker.sock").exists() and (young / "worker.sock").exists()
