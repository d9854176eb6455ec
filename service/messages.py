"""Every message that crosses a process boundary, in one place.

Two planes:

- **Data plane** (engine <-> expert worker, once per MoE layer per step): a compact binary frame over a
  stream socket. No pickle: a worker never deserialises anything but integers and raw tensor bytes, so a
  hostile peer can at worst send wrong numbers. Layout of every frame: a fixed 32-byte header, then
  arrays whose sizes follow from the header.

      header   magic "VIBE", kind u8, dtype u8, 2 pad, layer u32, num_experts u32, num_tokens u32,
               hidden u32, seq u64
      FORWARD  experts i32[k], counts i32[k], tokens dtype[n, hidden]   (tokens grouped by expert, in order)
      REPLY    experts i32[k], seconds f64[k], outputs dtype[n, hidden] (same order as the request)
      ERROR    utf-8 message of num_tokens bytes

- **Control plane** (coordinator <-> workers and engines, over Ray calls): small frozen records below.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

# The expert workers' interface (their actor methods' signatures, the data plane's frames): part of the fingerprint
# that names them, so that new code deployed over workers of old code (detached, adopted by name) starts new ones.
# Bump it at any change to either. 2: import_experts and load_experts take a wall-clock deadline.
WORKER_PROTOCOL = 2

MAGIC = b"VIBE"
FORWARD, REPLY, ERROR = 1, 2, 3
HEADER = struct.Struct("<4sBBxxIIIIQ")
MAX_FRAME_BYTES = 1 << 31  # refuse absurd frames before allocating
MAX_ERROR_BYTES = 1 << 16  # an ERROR frame's message at most

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
CODE_DTYPES: dict[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}


class ProtocolError(RuntimeError):
    """A peer sent a frame that does not follow the data-plane protocol, or closed mid-frame."""


@dataclass(frozen=True)
class Frame:
    """One decoded data-plane frame.

    Attributes:
        kind: FORWARD, REPLY or ERROR.
        layer: MoE layer index.
        seq: caller-chosen sequence number, echoed in the reply.
        experts: int32 [k] logical expert ids.
        values: FORWARD: int32 [k] token counts per expert; REPLY: float64 [k] compute seconds per expert.
        tensor: FORWARD: tokens [n, hidden]; REPLY: outputs [n, hidden]; ERROR: None.
        message: ERROR text ("" otherwise).
    """

    kind: int
    layer: int
    seq: int
    experts: np.ndarray
    values: np.ndarray
    tensor: torch.Tensor | None
    message: str = ""


def encode_forward(seq: int, layer: int, experts: np.ndarray, counts: np.ndarray, tokens: torch.Tensor) -> list:
    """Buffers of a FORWARD frame, ready for `socket.sendmsg` (no copy of the token tensor).

    Args:
        experts, counts: [k] logical expert ids and their token counts; sum(counts) == tokens.shape[0].
        tokens: [n, hidden] contiguous CPU tensor, rows grouped by expert in the order of `experts`.
    """
    return _encode(FORWARD, seq, layer, experts, np.asarray(counts, dtype=np.int32), tokens)


def encode_reply(seq: int, layer: int, experts: np.ndarray, seconds: np.ndarray, outputs: torch.Tensor) -> list:
    """Buffers of a REPLY frame: per-expert compute seconds [k] and outputs [n, hidden]."""
    return _encode(REPLY, seq, layer, experts, np.asarray(seconds, dtype=np.float64), outputs)


def encode_error(seq: int, layer: int, message: str) -> list:
    data = message.encode("utf-8", errors="replace")[:MAX_ERROR_BYTES]
    return [HEADER.pack(MAGIC, ERROR, 0, layer, 0, len(data), 0, seq), data]


def _encode(kind: int, seq: int, layer: int, experts, values: np.ndarray, tensor: torch.Tensor) -> list:
    experts = np.ascontiguousarray(experts, dtype=np.int32)
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    num_tokens, hidden = tensor.shape
    if experts.shape != values.shape:
        raise ValueError(f"experts {experts.shape} and per-expert values {values.shape} differ")
    header = HEADER.pack(MAGIC, kind, DTYPE_CODES[tensor.dtype], layer, experts.size, num_tokens, hidden, seq)
    payload = memoryview(tensor.view(torch.uint8).numpy()).cast("B") if tensor.numel() else b""
    return [header, experts.tobytes(), np.ascontiguousarray(values).tobytes(), payload]


def send_frame(sock: socket.socket, buffers: list) -> None:
    """Send all buffers of a frame (handles partial sends)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views)
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def recv_frame(sock: socket.socket) -> Frame:
    """Read exactly one frame. Raises ProtocolError on a malformed frame or a closed connection."""
    magic, kind, dtype_code, layer, num_experts, num_tokens, hidden, seq = HEADER.unpack(
        _recv_exact(sock, HEADER.size)
    )
    if magic != MAGIC or kind not in (FORWARD, REPLY, ERROR):
        raise ProtocolError(f"bad frame header (magic {magic!r}, kind {kind})")
    if kind == ERROR:
        if num_tokens > MAX_ERROR_BYTES:
            raise ProtocolError(f"error message too large ({num_tokens} bytes)")
        return Frame(kind, layer, seq, np.empty(0, np.int32), np.empty(0), None,
                     _recv_exact(sock, num_tokens).tobytes().decode("utf-8", errors="replace"))
    if dtype_code not in CODE_DTYPES:
        raise ProtocolError(f"unknown dtype code {dtype_code}")
    dtype = CODE_DTYPES[dtype_code]
    nbytes = num_tokens * hidden * dtype.itemsize
    if nbytes > MAX_FRAME_BYTES or num_experts > (1 << 20):
        raise ProtocolError(f"frame too large ({num_experts} experts, {nbytes} bytes)")
    experts = np.frombuffer(_recv_exact(sock, 4 * num_experts), dtype=np.int32)
    value_dtype = np.int32 if kind == FORWARD else np.float64
    values = np.frombuffer(_recv_exact(sock, np.dtype(value_dtype).itemsize * num_experts), dtype=value_dtype)
    if kind == FORWARD and (values.min(initial=0) < 0 or int(values.sum()) != num_tokens):
        raise ProtocolError("token counts do not add up to the number of tokens")
    raw = _recv_exact(sock, nbytes)
    tensor = torch.frombuffer(raw, dtype=dtype).view(num_tokens, hidden) if nbytes else torch.empty(
        (num_tokens, hidden), dtype=dtype)
    return Frame(kind, layer, seq, experts, values, tensor)


def _recv_exact(sock: socket.socket, size: int) -> np.ndarray:
    """Exactly `size` bytes, uint8 [size]. The buffer is left uninitialised (np.empty, not bytearray's
    zero fill), so memory is committed only as bytes arrive: a header that merely claims a 2 GiB frame
    costs nothing, and large frames skip a memset."""
    buf = np.empty(size, dtype=np.uint8)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ProtocolError("connection closed mid-frame" if got else "connection closed")
        got += n
    return buf


# --- control plane -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerInfo:
    """Where a worker lives and how to reach its data plane.

    Attributes:
        index: device index G in placements.
        actor_name: Ray actor name (namespace-local).
        tcp_address: data-plane address reachable from any node, "tcp://host:port".
        unix_address: data-plane address for engines on the same node, "unix:///path" (None if none).
        node_id: Ray node id of the worker's process (engines on this node use unix_address).
        device: torch device string the experts live on ("cpu", "cuda:0").
        emulated: whether the worker emulates a device's latency curve.
    """

    index: int
    actor_name: str
    tcp_address: str
    unix_address: str | None
    node_id: str
    device: str
    emulated: bool


@dataclass(frozen=True)
class ExpertTensors:
    """Every tensor of one expert, moved together, with a checksum over all of them.

    Attributes:
        layer, expert: which expert.
        tensors: name -> CPU tensor (e.g. "gate_up" [2I, H], "down" [H, I], any quantisation scales).
        checksum: hex digest over names, dtypes, shapes and bytes (see service.experts.checksum).
    """

    layer: int
    expert: int
    tensors: dict[str, torch.Tensor]
    checksum: str

    def __reduce__(self):
        """Pickled with every tensor as its raw bytes, dtype and shape: torch 2.13 pickles an FP8 tensor but
        cannot unpickle it, and experts held quantized travel as FP8 between workers."""
        raw = {name: (str(t.dtype).removeprefix("torch."), tuple(t.shape),
                      t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8))
               for name, t in self.tensors.items()}
        return _unpickle_expert, (self.layer, self.expert, raw, self.checksum)


def _unpickle_expert(layer: int, expert: int, raw: dict, checksum: str) -> ExpertTensors:
    tensors = {name: data.view(getattr(torch, dtype)).reshape(shape) for name, (dtype, shape, data) in raw.items()}
    return ExpertTensors(layer, expert, tensors, checksum)


@dataclass(frozen=True)
class LatencySamples:
    """Per-expert-call latency samples of one device: tokens [N] and seconds [N]."""

    device: int
    tokens: np.ndarray
    seconds: np.ndarray


@dataclass(frozen=True)
class Telemetry:
    """Hardware telemetry of one worker's device; `available` False with a reason when there is none.
    `expert_bytes`: bytes of the experts the worker holds (every worker reports it, GPU or not)."""

    device: int
    available: bool
    reason: str = ""
    sm_clock_mhz: float | None = None
    max_sm_clock_mhz: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    temperature_c: float | None = None
    throttle_reasons: tuple[str, ...] = ()
    expert_bytes: int | None = None


@dataclass(frozen=True)
class EngineReport:
    """What one engine hands the coordinator, batched over many steps (never per token).

    Attributes:
        engine_id: stable id of the engine (ingress replica).
        placement_version: the version the engine serves now (its acknowledgement).
        workers_epoch: the worker-address epoch the engine is connected to (-1: none yet).
        router_counts: int64 [S, L, E]: tokens routed to each logical expert in each of S forward passes.
        device_samples: per device, per-expert-call (tokens, seconds) observed while serving.
        unreachable: devices whose data plane failed since the last report (connection lost or refused, no
            reply in time, or an error answered): the coordinator probes them at once rather than at its next
            health check.
        workers_id: the worker configuration the engine was built for (its workers' name prefix; "" when not
            known): a coordinator of another one, after a redeploy that changed the workers, tells such an engine
            nothing and counts nothing of it.
    """

    engine_id: str
    placement_version: int
    router_counts: np.ndarray
    device_samples: tuple[LatencySamples, ...] = field(default_factory=tuple)
    workers_epoch: int = -1
    unreachable: tuple[int, ...] = ()
    workers_id: str = ""


@dataclass(frozen=True)
class SyncReply:
    """The coordinator's answer to an EngineReport: what the engine must switch to, if anything.

    Attributes:
        placement: the published placement as `Placement.to_dict()`, when newer than the engine's.
        workers: every worker's address, when the worker epoch changed (a worker restarted or moved).
        workers_epoch: the current worker-address epoch.
    """

    placement: dict | None
    workers: tuple[WorkerInfo, ...] | None
    workers_epoch: int
