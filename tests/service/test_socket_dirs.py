"""Socket folders of workers that are gone: which ones the next worker to start removes."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from service.worker_actor import SOCKET_DIR_PREFIX, SOCKET_GRACE_S, remove_stale_socket_dirs


def _socket_folder(root: Path, name: str, *, listening: bool, age_s: float = 2 * SOCKET_GRACE_S):
    """A worker's folder with worker.sock: bound and listening (a live worker) or bound and closed (the file a
    dead process leaves); returns (folder, the listening socket or None)."""
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


def test_only_folders_whose_socket_nobody_listens_on_are_removed(tmp_path):
    stale, _ = _socket_folder(tmp_path, "stale", listening=False)
    live, server = _socket_folder(tmp_path, "live", listening=True)
    young, _ = _socket_folder(tmp_path, "young", listening=False, age_s=1.0)  # bound, maybe not listening yet
    kept, _ = _socket_folder(tmp_path, "mine", listening=False)
    starting = tmp_path / f"{SOCKET_DIR_PREFIX}starting"  # its worker has not bound the socket yet
    starting.mkdir()
    other, _ = _socket_folder(tmp_path, "x", listening=False)
    renamed = other.rename(tmp_path / "not-a-worker-folder")
    (tmp_path / f"{SOCKET_DIR_PREFIX}link").symlink_to(stale, target_is_directory=True)
    (tmp_path / f"{SOCKET_DIR_PREFIX}file").write_text("")
    try:
        removed = remove_stale_socket_dirs(str(tmp_path), keep=str(kept))
    finally:
        server.close()
    assert removed == [str(stale)]
    assert not stale.exists()
    assert all(p.exists() for p in (live, young, kept, starting, renamed, tmp_path / f"{SOCKET_DIR_PREFIX}file"))
    assert (tmp_path / f"{SOCKET_DIR_PREFIX}link").is_symlink()


def test_a_second_sweep_finds_nothing(tmp_path):
    for i in range(3):
        _socket_folder(tmp_path, f"dead{i}", listening=False)
    assert len(remove_stale_socket_dirs(str(tmp_path))) == 3
    assert remove_stale_socket_dirs(str(tmp_path)) == [] and not list(tmp_path.iterdir())
