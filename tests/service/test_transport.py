"""WorkerServer and WorkerClient over real TCP and Unix sockets in this process."""

import socket
import time

import numpy as np
import pytest
import torch

from service.emulator import EmulationConfig
from service.messages import HEADER, MAGIC, REPLY
from service.transport import WorkerClient, WorkerError, WorkerServer, WorkerUnavailable
from service.worker import ExpertWorker, WorkerConfig
from tests.service.test_experts import HIDDEN, make_expert


@pytest.fixture(scope="module")
def worker():
    worker = ExpertWorker(WorkerConfig(index=0, dtype="float32"))
    worker.import_experts([make_expert(0, e) for e in range(3)])
    return worker


@pytest.fixture(scope="module")
def server(worker, tmp_path_factory):
    server = WorkerServer(worker, unix_path=str(tmp_path_factory.mktemp("sock") / "w.sock"))
    yield server
    server.close()


def request(num_tokens: int):
    counts = np.array([num_tokens // 2, num_tokens - num_tokens // 2], dtype=np.int32)
    return np.array([2, 0], dtype=np.int32), counts, torch.randn(num_tokens, HIDDEN)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_forward_round_trip_equals_a_local_call(server, worker, transport):
    address = server.tcp_address if transport == "tcp" else server.unix_address
    experts, counts, tokens = request(9)
    with WorkerClient(address, timeout_s=5.0) as client:
        for seq in (7, 8):  # the connection serves several requests in order
            client.send_forward(seq, 0, experts, counts, tokens)
            reply = client.recv_reply()
            assert (reply.kind, reply.seq, reply.layer) == (REPLY, seq, 0)
    np.testing.assert_array_equal(reply.experts, experts)
    assert reply.values.shape == (2,) and (reply.values > 0).all()
    torch.testing.assert_close(reply.tensor, worker.forward(0, experts, counts, tokens)[0], rtol=0, atol=0)


def test_fan_out_sends_all_then_receives_all(server):
    clients = [WorkerClient(server.tcp_address, 5.0), WorkerClient(server.unix_address, 5.0)]
    for seq, client in enumerate(clients):
        client.send_forward(seq, 0, *request(512))
    assert [client.recv_reply().seq for client in clients] == [0, 1]
    for client in clients:
        client.close()


def test_a_failing_forward_returns_an_error_frame_and_keeps_the_connection(server):
    with WorkerClient(server.tcp_address, timeout_s=5.0) as client:
        client.send_forward(1, 5, np.array([0], np.int32), np.array([2], np.int32), torch.zeros(2, HIDDEN))
        with pytest.raises(WorkerError, match=r"KeyError.*layer 5, expert 0"):
            client.recv_reply()
        client.send_forward(2, 0, *request(4))
        assert client.recv_reply().seq == 2


def test_a_malformed_frame_closes_only_that_connection(server):
    host, port = server.tcp_address.removeprefix("tcp://").split(":")
    bad = socket.create_connection((host, int(port)), timeout=5.0)
    good = WorkerClient(server.tcp_address, timeout_s=5.0)
    bad.sendall(b"JUNK" + bytes(28))
    assert bad.recv(1) == b""  # the server closed it
    bad.close()
    good.send_forward(3, 0, *request(4))
    assert good.recv_reply().seq == 3
    good.close()


def test_a_reply_frame_sent_to_the_worker_closes_the_connection(server):
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(5.0)
    conn.connect(server.unix_address.removeprefix("unix://"))
    conn.sendall(HEADER.pack(MAGIC, REPLY, 0, 0, 0, 0, 0, 0))  # well-formed, but a worker takes FORWARD only
    assert conn.recv(1) == b""
    conn.close()


def test_a_peer_that_stops_mid_frame_is_dropped_and_an_idle_one_is_kept(worker):
    """Server sockets had no timeout: a peer that sent part of a header and went silent held a thread and a
    descriptor for good, and enough of them ran the worker out of descriptors (a review). A frame begun must arrive
    within frame_timeout_s; between frames an engine may stay idle as long as it likes."""
    server = WorkerServer(worker, frame_timeout_s=0.3)
    try:
        host, port = server.tcp_address.removeprefix("tcp://").split(":")
        stalled = socket.create_connection((host, int(port)), timeout=5.0)
        stalled.sendall(b"VIBE\x01")  # 5 of the header's bytes
        with WorkerClient(server.tcp_address, timeout_s=5.0) as idle:
            time.sleep(1.0)
            assert stalled.recv(1) == b""  # dropped
            idle.send_forward(1, 0, *request(4))  # idle for longer than the limit: served
            assert idle.recv_reply().seq == 1
        stalled.close()
    finally:
        server.close()


def test_an_accept_error_that_passes_does_not_end_the_listener(worker):
    """Any error from accept() (out of descriptors: EMFILE) ended the accept loop for good; the worker, alive with its
    experts, answered no engine again until the coordinator restarted it and reloaded them (a review)."""
    import errno
    import threading

    from service.messages import encode_forward, recv_frame, send_frame

    server = WorkerServer(worker)
    ours, theirs = socket.socketpair()
    closed = threading.Event()

    class _Listener:  # EMFILE twice, then a connection, then closed
        def __init__(self):
            self.answers = [OSError(errno.EMFILE, "Too many open files")] * 2 + [(theirs, None)]

        def accept(self):
            if self.answers:
                answer = self.answers.pop(0)
                if isinstance(answer, Exception):
                    raise answer
                return answer
            closed.wait(10)
            raise OSError(errno.EBADF, "closed")

    loop = threading.Thread(target=server._accept_loop, args=(_Listener(),), daemon=True)
    loop.start()
    try:
        ours.settimeout(5.0)
        experts, counts, tokens = request(4)
        send_frame(ours, encode_forward(4, 0, experts, counts, tokens))
        assert recv_frame(ours).seq == 4
    finally:
        closed.set()
        loop.join(5)
        ours.close()
        server.close()
    assert not loop.is_alive()


def test_dead_server_raises_worker_unavailable_quickly(worker, tmp_path):
    server = WorkerServer(worker, unix_path=str(tmp_path / "dead.sock"))
    client = WorkerClient(server.tcp_address, timeout_s=30.0)
    server.close()
    start = time.monotonic()
    with pytest.raises(WorkerUnavailable):
        client.send_forward(0, 0, *request(4))
        client.recv_reply()
    with pytest.raises(WorkerUnavailable):
        client.send_forward(1, 0, *request(4))  # the client stays closed
    for address in (server.tcp_address, server.unix_address):
        with pytest.raises(WorkerUnavailable, match="cannot connect"):
            WorkerClient(address, timeout_s=30.0)
    assert time.monotonic() - start < 5.0


def test_silent_worker_times_out(tmp_path):
    slow = ExpertWorker(WorkerConfig(index=1, emulation=EmulationConfig(fixed_s=1.0, jitter=0.0)))
    slow.import_experts([make_expert(0, 0)])
    server = WorkerServer(slow)
    try:
        with WorkerClient(server.tcp_address, timeout_s=0.2) as client:
            client.send_forward(0, 0, np.array([0], np.int32), np.array([1], np.int32), torch.zeros(1, HIDDEN))
            with pytest.raises(WorkerUnavailable, match="timed out"):
                client.recv_reply()
    finally:
        server.close()


@pytest.mark.parametrize("address", ["http://x:1", "tcp://host", "tcp://host:port", "/tmp/x.sock"])
def test_bad_address_is_a_value_error(address):
    with pytest.raises(ValueError, match="worker address"):
        WorkerClient(address)


def test_a_connection_closed_before_its_thread_runs_is_dropped_quietly(server):
    """The server closes every connection at shutdown, possibly before a connection's thread has set its socket
    options: that thread ends quietly (it raised EBADF from setsockopt, an unhandled exception in a thread)."""
    ours, theirs = socket.socketpair()
    ours.close()
    server._connections.add(ours)
    server._serve(ours)  # returns, raising nothing
    assert ours not in server._connections
    theirs.close()
