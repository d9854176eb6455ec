"""Expert weights held on one torch device, and the single-device expert FFN.

Owns the checksum that travels with every expert (`ExpertTensors`), a thread-safe store of experts by
(layer, expert), `ExpertFFN` (the computation of one routed expert, as transformers' eager experts loop
writes it) and `run_experts`. Ignores where experts come from (checkpoints, migrations), routing weights
(the engine applies them), placement and Ray.

Tensor names of one expert: "gate_up" [2I, H] (gate rows first, then up) and "down" [H, I] (SwiGLU
experts: Qwen, Mixtral, DeepSeek, ...), or "up" [I, H] and "down" for experts without a gate (Nemotron-H's
``down(act(up x))``: the names say which); GPT-OSS's clamped SwiGLU experts keep transformers' own layout,
"gate_up" [H, 2I] (gate and up columns interleaved), "gate_up_bias" [2I], "down" [I, H], "down_bias" [H].
A worker may hold quantized weights as checkpoints store them (`read_experts(..., quantized=True)`): an
FP8 "gate_up" or "down" beside its float32 block scales ("gate_up_scale_inv", "down_scale_inv"),
GPT-OSS's MXFP4 "gate_up_blocks" / "gate_up_scales" and "down_blocks" / "down_scales" in place of the
weight, or pack-quantized integers "gate_up_packed" / "gate_up_scale" / "gate_up_shape" (int32, the scale's
dtype, the weight's [rows, cols]) or NVFP4 "gate_up_packed" / "gate_up_scale" / "gate_up_global_scale" (uint8,
FP8, float32 per row), and the same for "down"; `ExpertFFN` dequantizes such a weight at each call, to the compute dtype, as transformers does
on loading (service.quantization). Any other tensors are stored, moved and checksummed with an expert but
not used here.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from service.messages import ExpertTensors
from service.quantization import (
    FP8_DTYPES,
    dequantize_fp8,
    dequantize_int_packed,
    dequantize_mxfp4,
    dequantize_nvfp4,
)

Key = tuple[int, int]  # (moe layer index, logical expert id)
_log = logging.getLogger(__name__)
CPU_ALIGNMENT = 64  # bytes: what torch's CPU allocator aligns to (one cache line, an AVX-512 register)


# transformers' ACT2FN entries whose forward is one torch function call (transformers 5: SiLUActivation and nn.SiLU,
# nn.ReLU, GELUActivation, GELUTanh), called here as they call it: a worker process then never imports transformers
# (its activations module costs about a second of CPU at every worker start). Other names are ACT2FN's own.
_TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' activation ``name`` (a key of its ACT2FN); ValueError if it has none of that name."""
    if name in _TORCH_ACTIVATIONS:
        return _TORCH_ACTIVATIONS[name]
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"hidden_act must be a transformers activation, got {name!r}")
    return ACT2FN[name]


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """Hex blake2b digest over the sorted names, dtypes, shapes and raw bytes of `tensors`.

    Every field is length-prefixed, so no two different expert contents hash the same stream.
    """
    digest = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        for part in (name, str(tensor.dtype), repr(tuple(tensor.shape))):
            _update(digest, part.encode("utf-8"))
        _update(digest, tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _update(digest, data) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


class ExpertStore:
    """Experts of one worker on one torch device, by (layer, expert); safe to use from several threads.

    Floating-point weights are cast to `dtype` on arrival; quantized ones (FP8, integer) and block scales
    ("*_scale_inv") keep their dtype (see the module docstring). An
    expert's tensors are replaced as a whole, never modified in place, so a reader may use a dict it
    got from `get` while another thread adds or drops experts.
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self._experts: dict[Key, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def add(self, items: Iterable[ExpertTensors], *, verify: bool = True,
            check: Callable[[], None] | None = None) -> list[Key]:
        """Verify every item's checksum (`verify`: items that crossed a process; not those this process has
        just read and checksummed itself), then store all of them (replacing any held copy), after `check()`
        as `commit` runs it.

        Returns the keys added, in order. Raises ValueError naming the first expert whose checksum does
        not match; then nothing is added.
        """
        return self.commit(self.prepare(items, verify=verify), check)

    def prepare(self, items: Iterable[ExpertTensors], *, verify: bool = True) -> dict[Key, dict[str, torch.Tensor]]:
        """`add`'s checks and copies to the device, not yet held: `commit` holds them (a load of several parts
        holds none of them until all are read)."""
        items = list(items)
        for item in items if verify else ():
            if checksum(item.tensors) != item.checksum:
                raise ValueError(f"checksum mismatch for expert (layer {item.layer}, expert {item.expert}): "
                                 f"got {item.checksum!r}")
        return {(item.layer, item.expert): self._to_device(item.tensors) for item in items}

    def commit(self, prepared: dict[Key, dict[str, torch.Tensor]], check: Callable[[], None] | None = None) -> list[Key]:
        """Hold what `prepare` returned, all at once; `check()` first, under the store's lock (what it raises:
        nothing held)."""
        with self._lock:
            if check is not None:
                check()
            self._experts.update(prepared)
        return list(prepared)

    def export(self, keys: Iterable[Key]) -> list[ExpertTensors]:
        """CPU copies of the given experts, every tensor of an expert together, each with its checksum."""
        exported = []
        for layer, expert in keys:
            tensors = {name: t.to("cpu", copy=True) for name, t in self.get(layer, expert).items()}
            exported.append(ExpertTensors(layer, expert, tensors, checksum(tensors)))
        return exported

    def drop(self, keys: Iterable[Key]) -> None:
        """Forget the given experts; KeyError (nothing dropped) if any is not held."""
        keys = [(int(layer), int(expert)) for layer, expert in keys]
        with self._lock:
            missing = [key for key in keys if key not in self._experts]
            if missing:
                raise KeyError(f"cannot drop experts not held (layer, expert): {missing}")
            for key in keys:
                del self._experts[key]

    def keys(self) -> list[Key]:
        """Held (layer, expert) keys, sorted."""
        with self._lock:
            return sorted(self._experts)

    def get(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Tensors of one expert (on the store's device); KeyError naming it when not held."""
        with self._lock:
            tensors = self._experts.get((int(layer), int(expert)))
        if tensors is None:
            raise KeyError(f"expert (layer {layer}, expert {expert}) is not held by this worker")
        return tensors

    def _to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` on the store's device (compute weights in its dtype), but a packed weight's ``_shape`` on the
        host: each call reads it (on a GPU that read synchronised the stream at every weight of every call)."""
        return {name: aligned(t.detach().cpu() if name.endswith("_shape") else
                              t.detach().to(self.device, dtype=self.dtype if _compute_weight(name, t) else t.dtype))
                for name, t in tensors.items()}

    def held_bytes(self) -> int:
        """Bytes of every tensor of the held experts."""
        with self._lock:
            held = list(self._experts.values())
        return sum(t.numel() * t.element_size() for tensors in held for t in tensors.values())


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy of it in memory of its own, if it starts off a `CPU_ALIGNMENT`-byte boundary (a view into a
    checkpoint file's or a message's buffer, or a parameter transformers loaded as one): on some CPUs (an AMD EPYC
    here) a matrix-vector product with such a matrix sums in another order, so one token's output would differ in its
    last bits from the same product with the matrix aligned; and aligned loads are the fast ones."""
    if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % CPU_ALIGNMENT:
        return tensor.clone()
    return tensor


def _compute_weight(name: str, tensor: torch.Tensor) -> bool:
    """Whether a tensor is held in the compute dtype: floating point, neither FP8 nor a scale (an integer
    weight's scale keeps its dtype: its dequantization computes in it)."""
    return tensor.is_floating_point() and tensor.dtype not in FP8_DTYPES and not name.endswith(("_scale_inv",
                                                                                                "_scale"))


@dataclass(frozen=True)
class ExpertFFN:
    """The computation of one routed expert of a model, on its tensors (see the module docstring).

    Attributes:
        hidden_act: activation of the gate of SwiGLU experts, of the up projection of experts without a gate
            (a key of transformers' ACT2FN).
        clamped_swiglu: GPT-OSS's (alpha, limit): the experts are its clamped SwiGLU with biases,
            ``(up + 1) * gate * sigmoid(alpha * gate)`` with gate <= limit and |up| <= limit.
    """

    hidden_act: str = "silu"
    clamped_swiglu: tuple[float, float] | None = None
    _act: Callable[[torch.Tensor], torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        act = activation(self.hidden_act)
        if self.clamped_swiglu is not None:
            alpha, limit = (float(value) for value in self.clamped_swiglu)
            if not (alpha > 0 and limit > 0):
                raise ValueError(f"clamped_swiglu must be (alpha, limit) > 0, got {self.clamped_swiglu!r}")
            object.__setattr__(self, "clamped_swiglu", (alpha, limit))
        object.__setattr__(self, "_act", act)

    def __call__(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The expert's output for x [n, H], unweighted: exactly the expression of transformers' eager
        experts loop (e.g. Qwen3MoeExperts.forward, GptOssExperts.forward, NemotronHExperts.forward without a
        gate), so outputs are bit-identical."""
        if "up" in tensors or "up_packed" in tensors:  # no gate
            return F.linear(self._act(F.linear(x, expert_weight(tensors, "up", x.dtype))),
                            expert_weight(tensors, "down", x.dtype))
        if self.clamped_swiglu is None:
            gate, up = F.linear(x, expert_weight(tensors, "gate_up", x.dtype)).chunk(2, dim=-1)
            return F.linear(self._act(gate) * up, expert_weight(tensors, "down", x.dtype))
        alpha, limit = self.clamped_swiglu
        gate_up = x @ expert_weight(tensors, "gate_up", x.dtype) + tensors["gate_up_bias"]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        glu = gate * torch.sigmoid(gate * alpha)
        return ((up + 1) * glu) @ expert_weight(tensors, "down", x.dtype) + tensors["down_bias"]

    def hidden_size(self, tensors: dict[str, torch.Tensor]) -> int:
        """H of an expert's tensors."""
        if "down_blocks" in tensors:  # MXFP4 [H, I/32, 16]
            return tensors["down_blocks"].shape[0]
        if "down_packed" in tensors:  # NVFP4 (two a byte) or pack-quantized integers (the weight's shape beside)
            return tensors["down_packed"].shape[0] if "down_global_scale" in tensors else int(tensors["down_shape"][0])
        down = tensors["down"]
        return down.shape[1] if self.clamped_swiglu is not None else down.shape[0]

    def synthetic(self, hidden: int, intermediate: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random tensors of one expert of this form (for profiling a worker that holds none)."""
        gate_up = torch.randn(2 * intermediate, hidden, generator=generator) / hidden**0.5
        down = torch.randn(hidden, intermediate, generator=generator) / intermediate**0.5
        if self.clamped_swiglu is None:
            return {"gate_up": gate_up, "down": down}
        return {"gate_up": gate_up.T.contiguous(), "gate_up_bias": torch.zeros(2 * intermediate),
                "down": down.T.contiguous(), "down_bias": torch.zeros(hidden)}


def expert_weight(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """Weight ``name`` of an expert, dequantized to ``dtype`` if it is held quantized."""
    weight = tensors.get(name)
    if weight is None:  # held as stored: pack-quantized integers, or GPT-OSS's MXFP4
        if f"{name}_global_scale" in tensors:
            return dequantize_nvfp4(tensors[f"{name}_packed"], tensors[f"{name}_scale"],
                                    tensors[f"{name}_global_scale"], dtype)
        if f"{name}_packed" in tensors:
            shape = tensors[f"{name}_shape"]
            return dequantize_int_packed(tensors[f"{name}_packed"], tensors[f"{name}_scale"],
                                         (int(shape[0]), int(shape[1])), dtype)
        return dequantize_mxfp4(tensors[f"{name}_blocks"], tensors[f"{name}_scales"], dtype)
    if weight.dtype in FP8_DTYPES:
        return dequantize_fp8(weight, tensors[f"{name}_scale_inv"], dtype)
    return weight


def run_experts(
    store: ExpertStore,
    layer: int,
    experts: np.ndarray,
    counts: np.ndarray,
    tokens: torch.Tensor,
    ffn: ExpertFFN,
) -> tuple[torch.Tensor, np.ndarray]:
    """Run each expert's FFN on its rows of `tokens`, unweighted.

    Args:
        store: holds every expert in `experts` for `layer`.
        experts: int [k] logical expert ids.
        counts: int [k] rows of `tokens` per expert; rows are grouped by expert in the order of `experts`.
        tokens: [n, H] with n == sum(counts), any device and float dtype.
        ffn: the computation of the model's experts.

    Returns:
        outputs: [n, H] on the store's device in the store's dtype, rows in the order of `tokens`.
        seconds: float64 [k] compute seconds per expert (perf_counter on CPU, CUDA events on GPU).

    Raises:
        ValueError: inconsistent shapes or counts. KeyError: an expert is not held (nothing computed).
    """
    experts = np.asarray(experts).reshape(-1)
    counts = np.asarray(counts).reshape(-1)
    _check_request(experts, counts, tokens)
    weights = [store.get(layer, expert) for expert in experts]
    x = tokens.to(store.device, dtype=store.dtype)
    outputs = torch.empty_like(x)
    timer = _CudaTimer(len(weights), store.device) if store.device.type == "cuda" else _CpuTimer(len(weights))
    start = 0
    with torch.no_grad():
        for i, (tensors, end) in enumerate(zip(weights, np.cumsum(counts).tolist())):
            if end > start:
                timer.start(i)
                _ffn_rows(ffn, x[start:end], tensors, outputs[start:end])
                timer.stop(i)
            start = end
    return outputs, timer.seconds()


def _ffn_rows(ffn: ExpertFFN, x: torch.Tensor, tensors: dict[str, torch.Tensor], out: torch.Tensor,
              depth: int = 0) -> None:
    """out[:] = ffn(x, tensors): at once, or, where the device runs out of memory for the intermediates of that
    many rows (a hot expert's share of a long prefill beside the experts a worker holds), in halves, down to one
    row (then the error stands: the worker's caller treats it as a failed call). An expert works row by row, so
    a split changes a row only by the kernels' own order of summation."""
    try:
        out[:] = ffn(x, tensors)
        return
    except torch.OutOfMemoryError:
        if x.shape[0] <= 1:
            raise
    # retried outside the handler: the exception's frames hold the failed attempt's intermediates
    if x.is_cuda:
        torch.cuda.empty_cache()
    if depth == 0:
        _log.warning("an expert call ran out of device memory at %d rows: run in parts", x.shape[0])
    half = x.shape[0] // 2
    _ffn_rows(ffn, x[:half], tensors, out[:half], depth + 1)
    _ffn_rows(ffn, x[half:], tensors, out[half:], depth + 1)


def _check_request(experts: np.ndarray, counts: np.ndarray, tokens: torch.Tensor) -> None:
    if experts.shape != counts.shape:
        raise ValueError(f"experts {experts.shape} and counts {counts.shape} must have the same length")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [n, hidden], got shape {tuple(tokens.shape)}")
    if counts.size and counts.min() < 0:
        raise ValueError(f"token counts must be >= 0, got {counts.tolist()}")
    if int(counts.sum()) != tokens.shape[0]:
        raise ValueError(f"token counts sum to {int(counts.sum())} but tokens has {tokens.shape[0]} rows")


class _CpuTimer:
    """Per-expert wall seconds by perf_counter (CPU kernels are synchronous)."""

    def __init__(self, num_experts: int) -> None:
        self._seconds = np.zeros(num_experts)
        self._t0 = 0.0

    def start(self, i: int) -> None:
        self._t0 = time.perf_counter()

    def stop(self, i: int) -> None:
        self._seconds[i] = time.perf_counter() - self._t0

    def seconds(self) -> np.ndarray:
        return self._seconds


class _CudaTimer:
    """Per-expert device seconds by CUDA events on ``device``'s current stream (the one its kernels run on, not the
    current device's: a store on cuda:1 was timed on cuda:0's), with one synchronize of it at the end."""

    def __init__(self, num_experts: int, device: torch.device) -> None:
        self._events: dict[int, tuple[torch.cuda.Event, torch.cuda.Event]] = {}
        self._num_experts = num_experts
        self._device = device
        self._stream = torch.cuda.current_stream(device)

    def start(self, i: int) -> None:
        self._events[i] = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._events[i][0].record(self._stream)

    def stop(self, i: int) -> None:
        self._events[i][1].record(self._stream)

    def seconds(self) -> np.ndarray:
        seconds = np.zeros(self._num_experts)
        if self._events:
            torch.cuda.synchronize(self._device)
        for i, (begin, end) in self._events.items():
            seconds[i] = begin.elapsed_time(end) / 1000.0
        return seconds
