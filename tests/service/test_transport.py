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
