"""The engine side of expert parallelism: send a MoE layer's tokens to the workers, combine their replies.

Owns the channels to the expert workers (`DeviceChannel`: a socket client or an in-process worker), the
pinned placement and channels of each forward step (`DispatchContext`), the router counts and per-call
device timings observed while serving, and `DispatchingExperts`, the module that replaces a MoE layer's
`experts`. Ignores how a placement is chosen or published (the coordinator), what workers compute
(`service.worker`) and the dense parts of the model (they run unchanged in the engine).

Hot path (once per MoE layer per step): (token, k) pairs are mapped to physical slots with NumPy, one
stable sort groups them by slot (slots are device-major, so that also groups them by device), one
gather builds every device's token rows, one request goes to each device (submit to all, then collect),
and the unweighted outputs are weighted and summed per token in ascending expert order, the order of
transformers' eager experts loop.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from placement import Placement
from placement.metrics import replica_bounds, split_bounds
from service.messages import EngineReport, LatencySamples, ProtocolError
from service.transport import WorkerClient, WorkerError, WorkerUnavailable


class DispatchError(RuntimeError):
    """A device failed (or could not be reached) while serving a MoE layer; names both."""

    def __init__(self, device: int, layer: int, cause: BaseException | str):
        super().__init__(f"device {device} failed at MoE layer {layer}: {cause}")
        self.device = device
        self.layer = layer
        self._cause_text = str(cause)

    def __reduce__(self):  # (pickling calls the class with `self.args`, the message alone)
        return type(self), (self.device, self.layer, self._cause_text)


# After a failed call, a channel fails at once for this long before it connects again: longer than the
# coordinator takes to check a worker an engine reported and publish a placement without it (report 0.1 s,
# its loop 0.1 s, probe and one-token call up to 3 s each, re-placement), so a hung worker is not called again.
RECONNECT_AFTER_S = 5.0
# Longest wait to connect to a worker, at its first call or again (a live worker's accept takes well under a millisecond; a node
# that is gone never answers).
RECONNECT_TIMEOUT_S = 2.0


def device_failed(error: BaseException) -> bool:
    """Whether an engine step's error is an expert device's failure (`DispatchError`): transient, as the
    coordinator moves a lost device's experts to the others (the engine's ``retryable``)."""
    return isinstance(error, DispatchError)


class DeviceChannel(Protocol):
    """Request-reply channel to one device's expert worker; requests are answered in order."""

    def submit(self, seq: int, layer: int, experts: np.ndarray, counts: np.ndarray, tokens: torch.Tensor) -> None:
        """Send one request: experts/counts int32 [k], tokens [n, H] grouped by expert in that order."""

    def result(self) -> tuple[torch.Tensor, np.ndarray]:
        """Reply to the oldest unanswered request: unweighted outputs [n, H] and seconds float64 [k]."""

    def close(self) -> None:
        """Release the connection (called when the context stops using the channel)."""


class SocketChannel:
    """A worker's data plane over a socket: a `service.transport.WorkerClient` connected to `address`
    ("tcp://host:port" or "unix:///path"); every receive waits at most `timeout_s`, so nothing hangs.

    A failed call closes the connection (a late reply would put the stream out of step). For the next
    `reconnect_after_s` calls fail at once (the engine retries its step meanwhile, and the coordinator,
    told by the engine's report, checks the worker and moves its experts away if it is lost: a hung worker
    is not waited on again before that); then the channel connects again (waiting at most
    `RECONNECT_TIMEOUT_S`), so a worker that was only slow or briefly unreachable serves again.

    The first connection is made at the first call (waiting at most `RECONNECT_TIMEOUT_S` too), not here: an
    engine builds a channel to every worker its coordinator lists, and one of them may be dead for good (lost and
    not restarted, so in no placement). Building the channels must not fail for it: the engine could then apply
    no later worker list nor the placement sent with it, and a new ingress replica could not start.
    """

    def __init__(self, address: str, timeout_s: float = 30.0, reconnect_after_s: float = RECONNECT_AFTER_S) -> None:
        self._address, self._timeout_s, self._reconnect_after_s = address, timeout_s, reconnect_after_s
        self._client: WorkerClient | None = None  # connected at the first call
        self._pending: deque[int] = deque()
        self._failed_at = -float("inf")  # time.monotonic() of the last failed call

    def submit(self, seq: int, layer: int, experts: np.ndarray, counts: np.ndarray, tokens: torch.Tensor) -> None:
        connected = self._client is not None and not self._client.closed
        if not connected and (since := time.monotonic() - self._failed_at) < self._reconnect_after_s:
            raise WorkerUnavailable(f"worker at {self._address} failed {since:.1f} s ago; connecting again "
                                    f"{self._reconnect_after_s:g} s after that")
        try:
            if not connected:
                self._pending.clear()  # (requests of the closed connection: never answered)
                self._client = WorkerClient(self._address, self._timeout_s,
                                            connect_timeout_s=min(self._timeout_s, RECONNECT_TIMEOUT_S))
            self._client.send_forward(seq, layer, experts, counts, tokens)
        except WorkerUnavailable:
            self._failed_at = time.monotonic()
            raise
        self._pending.append(seq)

    def result(self) -> tuple[torch.Tensor, np.ndarray]:
        seq = self._pending.popleft()
        try:
            frame = self._client.recv_reply()
        except WorkerUnavailable:
            self._failed_at = time.monotonic()
            raise
        if frame.seq != seq:
            self._client.close()  # the stream is out of step; nothing later on it can be trusted
            self._failed_at = time.monotonic()
            raise ProtocolError(f"worker at {self._client.address} answered seq {frame.seq}, expected {seq}")
        return frame.tensor, frame.values

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class LocalChannel:
    """An in-process `ExpertWorker` (unit tests, single-process runs): computes at submit."""

    def __init__(self, worker) -> None:
        self._worker = worker
        self._replies: deque[tuple[torch.Tensor, np.ndarray]] = deque()

    def submit(self, seq: int, layer: int, experts: np.ndarray, counts: np.ndarray, tokens: torch.Tensor) -> None:
        self._replies.append(self._worker.forward(layer, experts, counts, tokens))

    def result(self) -> tuple[torch.Tensor, np.ndarray]:
        return self._replies.popleft()

    def close(self) -> None:
        """Nothing to release: the worker lives in this process and belongs to the caller."""


@dataclass(frozen=True)
class DispatchConfig:
    """Bounds of what a DispatchContext records between two `drain_report` calls.

    Attributes:
        max_steps: router-count rows kept (one [L, E] row per step); older rows are dropped.
        max_samples: (tokens, seconds) samples kept per device; older samples are dropped.
    """

    max_steps: int = 4096
    max_samples: int = 65536

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"DispatchConfig.{name} must be >= 1, got {getattr(self, name)!r}")


class _LayerRoutes:
    """Slot lookup of one layer of a placement, precomputed off the hot path.

    Attributes:
        expert_slot: int [E] first slot of each expert (its only one when the layer has no replicas).
        replica_slots: int [E, W] slots of each expert's replicas, padded with its last slot (W = max
            replicas), or None when no expert of the layer is replicated.
        replica_bounds: float [E, W-1] cumulative shares of the replicas but the last, padded with 1.0.
        device_ranges: (device, first slot, end slot) of each device with slots, in device order.
    """

    def __init__(self, placement: Placement, log2phy: np.ndarray, bounds: np.ndarray, layer: int) -> None:
        """`log2phy`: int [E, W] slots of each expert of this layer, padded with -1; `bounds`: float [E, W-1] their
        cumulative shares (`placement.metrics.replica_bounds`: the recalibration judge times passes by the same
        split)."""
        self.slot_expert = placement.phy2log[layer]
        slot_device = placement.slot_device[layer]
        width = log2phy.shape[1]
        self.expert_slot = log2phy[:, 0]
        self.replica_slots = self.replica_bounds = None
        if width > 1:
            count = placement.logcnt[layer]
            last = log2phy[np.arange(len(count)), count - 1]
            self.replica_slots = np.where(log2phy >= 0, log2phy, last[:, None])
            self.replica_bounds = bounds
        devices, starts = np.unique(slot_device, return_index=True)
        ends = np.append(starts[1:], len(slot_device))
        self.device_ranges = [(int(g), int(s), int(e)) for g, s, e in zip(devices, starts, ends)]

    def slots(self, experts: np.ndarray) -> np.ndarray:
        """int [P]: the slot serving each (token, k) pair, given the pairs' experts [P] in eager order.

        A replicated expert's pairs are split contiguously, in eager order, by cumulative share:
        replica j takes the pairs ranked [round(n c_{j-1}), round(n c_j)) of the expert's n pairs.
        """
        if self.replica_slots is None:
            return self.expert_slot[experts]
        order = np.argsort(experts, kind="stable")
        ranked = experts[order]
        num_pairs = np.bincount(experts, minlength=len(self.expert_slot))
        first = np.cumsum(num_pairs) - num_pairs
        rank = np.arange(len(experts)) - first[ranked]
        bounds = split_bounds(self.replica_bounds[ranked], num_pairs[ranked])
        replica = np.count_nonzero(rank[:, None] >= bounds, axis=1)
        slots = np.empty_like(experts)
        slots[order] = self.replica_slots[ranked, replica]
        return slots


class _Routes:
    """A placement with its per-layer lookups and the channels it is served through."""

    def __init__(self, placement: Placement, channels: Mapping[int, DeviceChannel], workers_epoch: int) -> None:
        missing = sorted(set(range(placement.num_devices)) - set(channels))
        if missing:
            raise ValueError(f"placement v{placement.version} needs devices {missing}, which have no channel")
        self.placement = placement
        self.channels = dict(channels)
        self.workers_epoch = workers_epoch
        log2phy, bounds = placement.log2phy, replica_bounds(placement)
        self.layers = [_LayerRoutes(placement, log2phy[layer], bounds[layer], layer)
                       for layer in range(placement.num_layers)]


class _Step:
    """One forward pass: its pinned routes and router counts int64 [L, E]."""

    def __init__(self, routes: _Routes, implicit: bool) -> None:
        self.routes = routes
        self.implicit = implicit
        self.counts = np.zeros((routes.placement.num_layers, routes.placement.num_experts), dtype=np.int64)


class _SampleRing:
    """The newest `capacity` (tokens, seconds) samples of one device."""

    def __init__(self, capacity: int) -> None:
        self._tokens = np.zeros(capacity, dtype=np.int64)
        self._seconds = np.zeros(capacity)
        self._size = self._next = 0

    def extend(self, tokens: np.ndarray, seconds: np.ndarray) -> None:
        capacity = len(self._tokens)
        tokens, seconds = tokens[-capacity:], seconds[-capacity:]
        index = (self._next + np.arange(len(tokens))) % capacity
        self._tokens[index] = tokens
        self._seconds[index] = seconds
        self._next = (self._next + len(tokens)) % capacity
        self._size = min(self._size + len(tokens), capacity)

    def __len__(self) -> int:
        return self._size

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64 [N], seconds float64 [N]) oldest first, then empty."""
        index = (self._next - self._size + np.arange(self._size)) % len(self._tokens)
        out = self._tokens[index], self._seconds[index]
        self._size = 0
        return out


class DispatchContext:
    """What every DispatchingExperts of one engine shares: placement, channels, observations.

    `set_placement` and `set_channels` may be called from any thread; they take effect when the next
    step begins (`begin_step`), so all MoE layers of one forward use the same placement version. A
    forward outside begin/end pins the newest placement for each call. Router counts (one [L, E] row
    per step) and each device's per-expert (tokens, seconds) samples are kept, bounded, until
    `drain_report`.
    """

    def __init__(self, placement: Placement, channels: Mapping[int, DeviceChannel], *,
                 config: DispatchConfig = DispatchConfig(), workers_epoch: int = -1) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._routes = self._pending = _Routes(placement, channels, workers_epoch)
        self._step: _Step | None = None
        self._seq = itertools.count()
        self._steps: deque[np.ndarray] = deque(maxlen=config.max_steps)
        self._samples: dict[int, _SampleRing] = {}
        self._unreachable: set[int] = set()  # devices whose calls failed since the last report

    # --- configuration (any thread) ----------------------------------------------------------------

    def set_placement(self, placement: Placement) -> None:
        """Serve `placement` from the next step on; ValueError if its shape or devices do not fit."""
        with self._lock:
            current = self._pending.placement
            if (placement.num_layers, placement.num_experts) != (current.num_layers, current.num_experts):
                raise ValueError(f"placement has {placement.num_layers} layers x {placement.num_experts} experts, "
                                 f"the model {current.num_layers} x {current.num_experts}")
            self._pending = _Routes(placement, self._pending.channels, self._pending.workers_epoch)

    def set_channels(self, channels: Mapping[int, DeviceChannel], workers_epoch: int = -1) -> None:
        """Use `channels` (device -> channel) from the next step on; ValueError if a placed device lacks one."""
        with self._lock:
            self._pending = _Routes(self._pending.placement, channels, workers_epoch)

    @property
    def placement(self) -> Placement:
        """The newest placement set (served from the next step on)."""
        return self._pending.placement

    @property
    def pinned_version(self) -> int:
        """Placement version of the current step (of the last one when no step is open)."""
        return self._routes.placement.version

    @property
    def channels(self) -> dict[int, DeviceChannel]:
        """The channels of the current step (of the last one when no step is open)."""
        return dict(self._routes.channels)

    # --- steps (the engine's step loop) ------------------------------------------------------------

    @property
    def in_step(self) -> bool:
        """Whether begin_step has been called and end_step not yet."""
        return self._step is not None

    def begin_step(self) -> None:
        """Pin the newest placement and channels for every MoE layer of the coming forward."""
        if self._step is not None:
            raise RuntimeError("begin_step called while a step is open")
        self._open(implicit=False)

    def end_step(self, completed: bool = True) -> None:
        """Close the step and keep its router counts; a step whose forward failed (`completed` False) leaves them
        out: it routed only the layers before the failure, and the engine's retry routes its tokens again."""
        if self._step is None:
            raise RuntimeError("end_step called without begin_step")
        self._close(self._step, completed)

    def _open(self, implicit: bool) -> _Step:
        """Pin the newest routes; close channels the previous routes used and the new ones do not."""
        with self._lock:
            previous, self._routes = self._routes, self._pending
            step = _Step(self._routes, implicit)
            if not implicit:
                self._step = step  # under the lock: drain_report must never see the routes pinned but no step
        if previous is not self._routes:
            current = {id(channel) for channel in self._routes.channels.values()}
            for channel in previous.channels.values():
                if id(channel) not in current:
                    channel.close()
        return step

    def _close(self, step: _Step, completed: bool = True) -> None:
        with self._lock:
            if completed:
                self._steps.append(step.counts)
            if step is self._step:
                self._step = None

    def _call_step(self) -> _Step:
        """The open step, or one for this call alone (implicit)."""
        return self._step if self._step is not None else self._open(implicit=True)

    def _next_seq(self) -> int:
        return next(self._seq)

    def _record_samples(self, device: int, tokens: np.ndarray, seconds: np.ndarray) -> None:
        """Keep a call's (tokens, seconds) per expert; a NaN time (the worker measured it beside a copy of experts,
        which it may have taken in) is no sample."""
        timed = np.isfinite(seconds)
        if not timed.all():
            tokens, seconds = tokens[timed], seconds[timed]
        with self._lock:
            ring = self._samples.get(device)
            if ring is None:
                ring = self._samples[device] = _SampleRing(self.config.max_samples)
            ring.extend(tokens, seconds)

    def _failed(self, device: int, layer: int, exc: Exception) -> DispatchError:
        """The error of a device's failed call; the device is reported (`drain_report`) when it cannot be reached
        or answered with an error (a GPU after a sticky CUDA error answers every call so) or out of protocol: the
        coordinator's one-token probe then tells a broken device from a passing failure."""
        if isinstance(exc, WorkerUnavailable | WorkerError | ProtocolError):
            with self._lock:
                self._unreachable.add(device)
        return DispatchError(device, layer, exc)

    # --- reporting (any thread) --------------------------------------------------------------------

    def drain_report(self, engine_id: str) -> EngineReport:
        """Everything observed since the last drain (router counts [S, L, E], device samples), then clear.

        The version reported is the one the engine serves: the pinned one during a step; between steps
        the newest one set, since no forward can still use an older one. An idle engine thus
        acknowledges a new placement at once instead of holding up the drop of old copies.
        """
        with self._lock:
            routes = self._routes if self._step is not None else self._pending
            placement = routes.placement
            counts = (np.stack(self._steps) if self._steps
                      else np.zeros((0, placement.num_layers, placement.num_experts), dtype=np.int64))
            self._steps.clear()
            samples = tuple(LatencySamples(device, *ring.drain())
                            for device, ring in sorted(self._samples.items()) if len(ring))
            unreachable, self._unreachable = tuple(sorted(self._unreachable)), set()
            return EngineReport(engine_id, placement.version, counts, samples, routes.workers_epoch, unreachable)

    def restore(self, report: EngineReport) -> None:
        """Take back what `drain_report` handed to a report that failed: its router counts and device samples go
        before what was observed since, within the same bounds (the oldest dropped first), and its unreachable
        devices are reported again. While the coordinator is down (a restart, a redeploy) every report fails, and
        the newest `max_steps` passes then reach the one that comes up instead of none."""
        with self._lock:
            if len(report.router_counts):
                rows = [*report.router_counts, *self._steps]
                self._steps.clear()
                self._steps.extend(rows)  # a full deque drops from the left: the oldest
            for samples in report.device_samples:
                ring = self._samples.get(samples.device)
                if ring is None:
                    ring = self._samples[samples.device] = _SampleRing(self.config.max_samples)
                newer = ring.drain()
                ring.extend(samples.tokens, samples.seconds)
                ring.extend(*newer)
            self._unreachable.update(report.unreachable)


class DispatchingExperts(nn.Module):
    """Drop-in for a MoE layer's `experts`: runs them on the workers under the pinned placement."""

    def __init__(self, layer: int, num_experts: int, context: DispatchContext, *,
                 sum_in_weights_dtype: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.context = context
        # add the weighted outputs in the routing weights' dtype and cast the sum once (NemotronHExperts' order: its
        # float32 router weights), instead of casting each weighted output to the hidden states' dtype first
        self.sum_in_weights_dtype = sum_in_weights_dtype

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}"

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the selected experts' outputs per token.

        Args:
            hidden_states: [T, H] tokens of the layer.
            top_k_index: int [T, k] selected experts of each token (distinct per token).
            top_k_weights: [T, k] routing weights, in the dtype of `hidden_states` (or, with
                ``sum_in_weights_dtype``, the dtype the sum is taken in).

        Returns:
            [T, H]: sum over each token's experts, in ascending expert order, of weight * expert(token).
        """
        step = self.context._call_step()
        num_tokens, top_k = top_k_index.shape
        choices = top_k_index.detach().cpu().numpy()  # [T, k]
        experts = choices.T.reshape(-1)  # [P], P = T * k, eager (k-major) order: p = j * T + t
        step.counts[self.layer] += np.bincount(experts, minlength=self.num_experts)
        if num_tokens == 0:
            return torch.zeros_like(hidden_states)
        routes = step.routes.layers[self.layer]
        slots = routes.slots(experts)
        order = np.argsort(slots, kind="stable")  # [P] pairs grouped by slot, hence by device
        slot_pairs = np.bincount(slots, minlength=len(routes.slot_expert))
        by_expert = np.argsort(choices, axis=1, kind="stable")  # [T, k] each token's choices, ascending
        rows = _take_rows(hidden_states.detach().cpu().contiguous(), order % num_tokens)  # [P, H]
        planes = self._exchange(step, routes, slot_pairs, rows, _plane_rows(by_expert, order))
        planes = planes.to(hidden_states.device).view(top_k, num_tokens, -1)
        weights = torch.take_along_dim(top_k_weights, torch.from_numpy(by_expert).to(top_k_weights.device), dim=1)
        if self.sum_in_weights_dtype:
            out = _weighted_sum(planes, weights, weights.dtype).to(hidden_states.dtype)
        else:
            out = _weighted_sum(planes, weights, hidden_states.dtype)
        if step.implicit:
            self.context._close(step)
        return out

    def _exchange(self, step: _Step, routes: _LayerRoutes, slot_pairs: np.ndarray, rows: torch.Tensor,
                  plane_row: np.ndarray) -> torch.Tensor:
        """Send each device its rows (submit to all, then collect all).

        Returns the unweighted outputs [k * T, H] (CPU), row i of `rows` answered in row plane_row[i].
        """
        seq = self.context._next_seq()
        sent, errors, row = [], [], 0
        for device, first, end in routes.device_ranges:
            counts = slot_pairs[first:end]
            num_rows = int(counts.sum())
            if num_rows == 0:
                continue
            held = counts > 0
            experts = routes.slot_expert[first:end][held].astype(np.int32)
            counts = counts[held].astype(np.int32)
            try:
                step.routes.channels[device].submit(seq, self.layer, experts, counts, rows[row:row + num_rows])
                sent.append((device, counts, plane_row[row:row + num_rows]))
            except Exception as exc:  # the engine decides what fails; name the device and layer
                errors.append(self.context._failed(device, self.layer, exc))
            row += num_rows
        planes = torch.empty_like(rows)
        for device, counts, target in sent:  # collect every reply, even after a failure, to keep streams in step
            try:  # (a malformed reply too: raised here it left the later devices' replies unread, and each of
                # their next steps took the one before's reply as its own)
                output, seconds = step.routes.channels[device].result()
                if tuple(output.shape) != (len(target), planes.shape[1]):
                    raise ProtocolError(f"answered {list(output.shape)} for {len(target)} rows of {planes.shape[1]}")
                _put_rows(planes, target, output)
            except Exception as exc:
                errors.append(self.context._failed(device, self.layer, exc))
                continue
            self.context._record_samples(device, counts, np.asarray(seconds, dtype=np.float64))
        if errors:
            raise errors[0]
        return planes


def _plane_rows(by_expert: np.ndarray, order: np.ndarray) -> np.ndarray:
    """int [P]: row of the [k * T, H] combine buffer for each grouped pair.

    Plane j (rows j*T .. j*T+T-1) holds every token's j-th smallest expert, so that adding the planes
    in order adds each token's experts in ascending order, as the eager loop's index_add_ does.

    Args:
        by_expert: int [T, k] argsort of each token's choices.
        order: int [P] k-major pair index (p = j * T + t) of each grouped pair.
    """
    num_tokens, top_k = by_expert.shape
    rank = np.empty_like(by_expert)  # [T, k] position of each choice among the token's sorted choices
    np.put_along_axis(rank, by_expert, np.arange(top_k)[None, :], axis=1)
    return (rank.T * num_tokens + np.arange(num_tokens)).reshape(-1)[order]


def _weighted_sum(planes: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_j planes[j] * weights[:, j] in order j = 0, 1, ...: [T, H].

    Args:
        planes: [k, T, H] unweighted outputs, plane j = each token's j-th smallest expert.
        weights: [T, k] routing weights in the same order.
        dtype: of the result; each weighted output is cast to it before it is added (as eager does).
    """
    out = (planes[0] * weights[:, :1]).to(dtype)
    for j in range(1, planes.shape[0]):
        out += (planes[j] * weights[:, j:j + 1]).to(dtype)
    return out


# Row gathers and scatters run in NumPy on a same-width integer view: single-threaded, so they never
# wait at an OpenMP barrier on a crowded CPU (torch's parallel index ops did, for 10+ ms), and valid for
# any dtype, bfloat16 included, because they only move bytes.
_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _take_rows(source: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """source[index] for a contiguous CPU tensor [N, H] and int [M] indices: [M, H]."""
    raw = source.view(_RAW[source.element_size()]).numpy()
    return torch.from_numpy(raw[index]).view(source.dtype)


def _put_rows(target: torch.Tensor, index: np.ndarray, rows: torch.Tensor) -> None:
    """target[index] = rows for contiguous CPU tensors of one dtype."""
    target.view(_RAW[target.element_size()]).numpy()[index] = rows.contiguous().view(_RAW[rows.element_size()]).numpy()
