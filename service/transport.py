"""The data plane: a worker's socket server and the engine's client, speaking messages.py frames.

Owns the listeners (TCP with TCP_NODELAY for engines on any node, optionally a Unix domain socket for
engines on the same node), one thread per connection, turning FORWARD frames into worker calls and
REPLY/ERROR frames, and the client's failure semantics (a dead or silent worker raises, never hangs).
Ignores what the worker computes and which worker holds which expert (the engine's dispatch decides).

Per connection the protocol is strictly request-reply in order, so an engine sends one FORWARD to
every worker first and then receives every reply: the fan-out is concurrent without threads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import threading
import time

import numpy as np
import torch

from service.messages import (
    ERROR,
    FORWARD,
    REPLY,
    Frame,
    ProtocolError,
    encode_error,
    encode_forward,
    encode_reply,
    recv_frame,
    send_frame,
)
from service.worker import ExpertWorker

_BACKLOG = 64
# a frame begun must arrive, and a reply be taken, within this (each socket operation): a peer that stops mid-frame
# held a thread and a descriptor for good (engines keep connections idle between steps: no limit between frames)
FRAME_TIMEOUT_S = 60.0
log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The worker answered a FORWARD with an ERROR frame (the connection stays usable)."""


class WorkerUnavailable(ConnectionError):
    """The worker cannot be reached, closed the connection, sent garbage or did not reply in time."""


class WorkerServer:
    """Serves `worker.forward` to FORWARD frames on a TCP listener and optionally a Unix socket.

    A forward that raises is answered with an ERROR frame carrying the message, and the connection is
    kept; a malformed frame, or one that stalls for `frame_timeout_s`, closes that connection only. Listeners and
    connections run in daemon threads until `close()`.
    """

    def __init__(self, worker: ExpertWorker, *, host: str = "127.0.0.1", unix_path: str | None = None,
                 frame_timeout_s: float = FRAME_TIMEOUT_S) -> None:
        self._worker = worker
        self._frame_timeout_s = frame_timeout_s
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        tcp = socket.create_server((host, 0), family=family, backlog=_BACKLOG)
        self.tcp_address = f"tcp://{_format_host(host)}:{tcp.getsockname()[1]}"
        self._listeners = [tcp]
        self._unix_path = unix_path
        self.unix_address = None
        if unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(unix_path)  # a stale socket file left by a dead process
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.bind(unix_path)
            unix.listen(_BACKLOG)
            self.unix_address = f"unix://{unix_path}"
            self._listeners.append(unix)
        for listener in self._listeners:
            self._spawn(self._accept_loop, listener)

    def close(self) -> None:
        """Stop accepting, close every connection, wait for the threads, remove the Unix socket file."""
        with self._lock:
            self._closed = True
            sockets = self._listeners + list(self._connections)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes threads blocked in accept/recv
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5.0)
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)

    def _spawn(self, target, sock: socket.socket) -> None:
        thread = threading.Thread(target=target, args=(sock,), daemon=True, name=f"vibe-{target.__name__}")
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        """Accept connections until `close()`. An error that passes (out of descriptors, buffers or memory) is waited
        out: it ended the loop, and the worker, alive with its experts, answered no engine again (a review)."""
        wait = 0.05
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                with self._lock:
                    closed = self._closed
                if closed or exc.errno in (errno.EBADF, errno.EINVAL):
                    return  # listener closed
                log.warning("worker data plane: accept failed (%s); trying again in %.2f s", exc, wait)
                time.sleep(wait)
                wait = min(2 * wait, 1.0)
                continue
            wait = 0.05
            if conn.family != socket.AF_UNIX:
                with contextlib.suppress(OSError):  # (a connection reset already: its first read says so)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._connections.add(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        # every receive and send is bounded by the kernel (SO_RCVTIMEO / SO_SNDTIMEO, set once: a Python timeout
        # toggled per frame cost 5-13% of a round trip); a wait for a frame to begin that runs out is an idle engine
        seconds, micros = divmod(round(self._frame_timeout_s * 1e6), 1_000_000)
        try:
            # (in the try: a connection the server closed at shutdown before this thread ran is EBADF here)
            for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
                conn.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", seconds, micros))
            while True:
                try:
                    if not conn.recv(1, socket.MSG_PEEK):
                        return  # the peer closed
                except BlockingIOError:  # (no frame begun within the limit: idle as long as the engine likes)
                    continue
                frame = recv_frame(conn)  # (a frame that stalls past the limit raises: the connection is dropped)
                if frame.kind != FORWARD:
                    raise ProtocolError(f"a worker accepts only FORWARD frames, got kind {frame.kind}")
                send_frame(conn, self._answer(frame))
        except (ProtocolError, OSError):
            pass  # malformed frame or peer gone: drop this connection only
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _answer(self, frame: Frame) -> list:
        try:
            outputs, seconds = self._worker.forward(frame.layer, frame.experts, frame.values, frame.tensor)
        except Exception as exc:  # any failure of the call goes back to the caller, the server lives on
            return encode_error(frame.seq, frame.layer, f"{type(exc).__name__}: {exc}")
        return encode_reply(frame.seq, frame.layer, frame.experts, seconds, outputs)


class WorkerClient:
    """One engine's connection to one worker's data plane ("tcp://host:port" or "unix:///path").

    Every socket operation is bounded by `timeout_s` (connecting by `connect_timeout_s`, default the same).
    After any transport failure the client is closed and every later call raises WorkerUnavailable (a late
    reply would desynchronise the stream).
    """

    def __init__(self, address: str, timeout_s: float = 30.0, connect_timeout_s: float | None = None) -> None:
        if not timeout_s > 0 or not (connect_timeout_s is None or connect_timeout_s > 0):
            raise ValueError(f"timeouts must be > 0, got {timeout_s!r}, {connect_timeout_s!r}")
        self.address = address
        self._sock: socket.socket | None = None
        family, target = _parse_address(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout_s if connect_timeout_s is None else connect_timeout_s)
        try:
            sock.connect(target)
        except OSError as exc:
            sock.close()
            raise WorkerUnavailable(f"cannot connect to worker at {address}: {exc}") from exc
        sock.settimeout(timeout_s)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock

    def send_forward(self, seq: int, layer: int, experts: np.ndarray, counts: np.ndarray,
                     tokens: torch.Tensor) -> None:
        """Send one FORWARD: experts/counts [k], tokens [n, H] grouped by expert (see encode_forward)."""
        buffers = encode_forward(seq, layer, experts, counts, tokens)
        try:
            send_frame(self._connected(), buffers)
        except OSError as exc:
            self.close()
            raise WorkerUnavailable(f"cannot send to worker at {self.address}: {exc}") from exc

    def recv_reply(self) -> Frame:
        """The next REPLY (outputs [n, H] and seconds [k], in request order).

        Raises WorkerError for an ERROR frame, WorkerUnavailable if the worker is gone, sends a
        malformed frame or stays silent for timeout_s.
        """
        try:
            frame = recv_frame(self._connected())
        except (OSError, ProtocolError) as exc:
            self.close()
            raise WorkerUnavailable(f"no valid reply from worker at {self.address}: {exc!r}") from exc
        if frame.kind == ERROR:
            raise WorkerError(f"worker at {self.address} failed layer {frame.layer} seq {frame.seq}: "
                              f"{frame.message}")
        if frame.kind != REPLY:
            self.close()
            raise WorkerUnavailable(f"worker at {self.address} sent frame kind {frame.kind}, not a reply")
        return frame

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (by `close`, or by a failed call)."""
        return self._sock is None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _connected(self) -> socket.socket:
        if self._sock is None:
            raise WorkerUnavailable(f"connection to worker at {self.address} is closed")
        return self._sock


def _parse_address(address: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    if address.startswith("unix://"):
        return socket.AF_UNIX, address[len("unix://"):]
    if address.startswith("tcp://"):
        host, sep, port = address[len("tcp://"):].rpartition(":")
        if sep and port.isdigit():
            host = host.strip("[]")
            return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))
    raise ValueError(f"worker address must be 'tcp://host:port' or 'unix:///path', got {address!r}")


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
