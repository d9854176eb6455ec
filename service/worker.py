"""The expert worker: one device's experts, their forward, profiling, migration and statistics.

Owns a worker's `ExpertStore`, its optional `DeviceEmulator`, and the single path every expert call
takes (`forward` and `profile` both use it), including holding replies to the emulated end time. A
plain class, thread-safe, knowing nothing of Ray or sockets: `service.worker_actor` wraps it as an
actor and `service.transport` serves its `forward` on the data plane.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from service.emulator import DeviceEmulator, EmulationConfig
from service.experts import ExpertFFN, ExpertStore, Key, activation, checksum, run_experts
from service.messages import ExpertTensors, LatencySamples, Telemetry
from service.telemetry import read_telemetry
from service.worker_pool import LOAD_GRACE_S

if TYPE_CHECKING:
    from service.checkpoint import ExpertLayout

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
DEFAULT_PROFILE_TOKENS = tuple(2**i for i in range(13))  # 1, 2, 4, ..., 4096
# faults a test can inject (inject_fault): "import" fails the next expert import once; "hang" makes every later
# forward block for good, as a hung GPU would (the process, its control calls and its listener still answer);
# "error" makes every later forward fail, as a GPU after a sticky CUDA error (an illegal memory access) would
FAULTS = ("import", "hang", "error")
_PROFILE_SEED = 0


@dataclass(frozen=True)
class WorkerConfig:
    """Configuration of one expert worker.

    Attributes:
        index: device index G of this worker in placements (>= 0).
        device: torch device of the experts: "cpu", "cuda" or "cuda:N".
        dtype: name of the compute dtype, one of DTYPES.
        hidden_act: activation of the expert gate, a key of transformers' ACT2FN.
        clamped_swiglu: GPT-OSS's (alpha, limit) when the experts are its clamped SwiGLU with biases
            (`service.experts.ExpertFFN`; `ExpertLayout.clamped_swiglu` of the model), else None.
        keep_quantized: hold a quantized checkpoint's experts as stored (FP8 with block scales, MXFP4,
            compressed-tensors' packed INT4/INT8 and NVFP4), dequantizing each weight at each call: half
            (FP8) or about a quarter (the 4-bit formats) of the memory and of the bytes a migration moves,
            for a dequantization per expert call. False: dequantize on loading. No effect on other
            checkpoints.
        num_threads: torch intra-op threads of this process (torch.set_num_threads).
        profile_shape: (hidden, intermediate) of the synthetic expert profiled when none is held and no
            `profile_checkpoint` is given.
        profile_checkpoint: checkpoint folder whose first expert (MoE layer 0, expert 0) is profiled when none
            is held, read as this worker holds experts (so a worker keeping them quantized profiles the
            dequantization its calls will pay); None: a synthetic expert of `profile_shape`.
        emulation: emulated device parameters, or None to report measured compute time.
        checkpoint_layout: `load_layout(profile_checkpoint)`, which the app computed: experts of that folder are
            read without reading its config, so the worker process never imports transformers (about a second of
            CPU at each start); None: each read reads the folder's config.
    """

    index: int
    device: str = "cpu"
    dtype: str = "float32"
    hidden_act: str = "silu"
    clamped_swiglu: tuple[float, float] | None = None
    keep_quantized: bool = False
    num_threads: int = 1
    profile_shape: tuple[int, int] = (128, 256)
    profile_checkpoint: str | None = None
    emulation: EmulationConfig | None = None
    checkpoint_layout: ExpertLayout | None = None

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"WorkerConfig.index must be >= 0, got {self.index!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"WorkerConfig.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"WorkerConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        try:
            activation(self.hidden_act)
        except ValueError as exc:
            raise ValueError(f"WorkerConfig.{exc}") from None
        try:
            ExpertFFN(self.hidden_act, self.clamped_swiglu)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"WorkerConfig.clamped_swiglu: {exc}") from None
        if self.num_threads < 1:
            raise ValueError(f"WorkerConfig.num_threads must be >= 1, got {self.num_threads!r}")
        if len(self.profile_shape) != 2 or min(self.profile_shape) < 1:
            raise ValueError(f"WorkerConfig.profile_shape must be (hidden, intermediate) >= 1, "
                             f"got {self.profile_shape!r}")
        if self.checkpoint_layout is not None and self.profile_checkpoint is None:
            raise ValueError("WorkerConfig.checkpoint_layout is the layout of profile_checkpoint, which is not given")


def read_held(config: WorkerConfig, checkpoint_dir: str, keys: Iterable[Key]) -> list[ExpertTensors]:
    """Experts of a checkpoint read as a worker of ``config`` holds them: quantized ones kept as stored
    (`keep_quantized`) or dequantized to its compute dtype."""
    # Imported here so the worker (and its tests) do not depend on the checkpoint reader's imports.
    from service.checkpoint import read_experts

    layout = config.checkpoint_layout if checkpoint_dir == config.profile_checkpoint else None
    return read_experts(checkpoint_dir, list(keys), quantized=config.keep_quantized, dtype=DTYPES[config.dtype],
                        layout=layout)


def held_expert_bytes(config: WorkerConfig, checkpoint_dir: str) -> int:
    """Bytes of one expert of a checkpoint as a worker of ``config`` holds it, the mean over the MoE layers: what a
    migration moves. One expert is read per way the layers are stored (`storage_groups`: one for most checkpoints;
    the first expert alone priced every migration of a checkpoint with unquantized layers as theirs)."""
    from service.checkpoint import storage_groups

    total = layers = 0
    for layer, count in storage_groups(checkpoint_dir):
        store = ExpertStore("cpu", DTYPES[config.dtype])
        store.add(read_held(config, checkpoint_dir, [(layer, 0)]))
        total, layers = total + count * store.held_bytes(), layers + count
    return round(total / layers)


_PROFILE_TRIES = 5  # measurements of one profiling sample while copies of experts run beside it


class _CopyGuard:
    """Whether copies of experts ran during a span of time: ``with guard:`` around each copy; `quiet` before the
    span and `quiet_since` after it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._epoch = 0  # bumped as each copy begins and ends

    def __enter__(self) -> _CopyGuard:
        with self._lock:
            self._active += 1
            self._epoch += 1
        return self

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._active -= 1
            self._epoch += 1

    def quiet(self) -> int | None:
        """A mark of now when no copy runs (None when one does)."""
        with self._lock:
            return None if self._active else self._epoch

    def quiet_since(self, mark: int | None) -> bool:
        """Whether no copy ran between `quiet`'s ``mark`` and now."""
        with self._lock:
            return mark is not None and not self._active and self._epoch == mark


@dataclass(frozen=True)
class WorkerStats:
    """Counters of one worker since it started.

    Attributes:
        calls: forward calls served (profiling excluded).
        expert_calls: expert FFN calls in them (experts with at least one token).
        tokens: token rows computed.
        busy_s: device seconds reported for them (emulated, or measured without emulation).
        uptime_s: seconds since the worker started.
        duty_cycle: busy_s / uptime_s.

    Deliberately no emulation parameters: the placement side learns devices only from timings.
    """

    calls: int
    expert_calls: int
    tokens: int
    busy_s: float
    uptime_s: float
    duty_cycle: float


class ExpertWorker:
    """Holds one device's experts and runs them; safe to call from several threads at once.

    `clock` and `sleep` (seconds) are injectable so tests can check emulated holds without waiting; `wall_clock`
    (time.time) reads load deadlines.
    """

    def __init__(self, config: WorkerConfig, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._wall_clock = wall_clock  # for deadlines set in another process
        self._thread_state = threading.local()
        self._configure_thread()
        self._clock = clock
        self._sleep = sleep
        self._ffn = ExpertFFN(config.hidden_act, config.clamped_swiglu)
        self._store = ExpertStore(config.device, DTYPES[config.dtype])
        self._emulator = DeviceEmulator(config.emulation, clock) if config.emulation else None
        self._lock = threading.Lock()
        # One expert call computes at a time: a device runs them one after another anyway, and a call timed while
        # another thread's kernels run on the same device (another engine replica's connection, a profile while
        # serving) would take in their time, reading a busy device as a slow one (CUDA events on the shared
        # stream, a synchronize of the whole device). The emulated hold after a call is outside it.
        self._compute = threading.Lock()
        # Copies of experts to or from the device (loads, imports, exports) are not held to that: a migration must
        # not stall serving. A call measured while one ran may have taken in its transfer (on a GPU, the default
        # stream's), so its timing is not reported as the expert's (NaN: the engine keeps no sample of it).
        self._copies = _CopyGuard()
        self._started = clock()
        self._calls = self._expert_calls = self._tokens = 0
        self._busy_s = 0.0
        self._faults: set[str] = set()
        self._unhung = threading.Event()  # set by clear_faults: hung forwards go on

    # --- experts ---------------------------------------------------------------------------------

    def load_experts(self, checkpoint_dir: str, keys: Iterable[Key], deadline: float | None = None) -> list[Key]:
        """Read the given (moe layer, expert) experts from a checkpoint folder and hold them: all or nothing, read
        a layer at a time (the host holds one layer's read copies at most, not the worker's whole share before it
        goes to the device), held together once all are read.

        `deadline`: wall-clock time (time.time()) the caller waits until, then `LOAD_GRACE_S` more for the layer in
        progress: no layer starts past it, and a load that ends past it by half that grace holds nothing (the caller
        may have given up: its copies would be tracked by no one). TimeoutError either way.
        """
        keys = [(int(layer), int(expert)) for layer, expert in keys]
        layers = list(dict.fromkeys(layer for layer, _ in keys))  # in the order given
        prepared: dict[Key, dict[str, torch.Tensor]] = {}
        with self._copies:
            for done, layer in enumerate(layers):
                if deadline is not None and self._wall_clock() > deadline:
                    raise TimeoutError(f"loading {len(keys)} experts ran past the caller's deadline: stopped after "
                                       f"{done} of {len(layers)} layers, nothing held")
                # (checksummed as read, in this process: hashing them again took as long, ~0.9 GB/s on a core)
                prepared |= self._store.prepare(
                    read_held(self.config, checkpoint_dir, [k for k in keys if k[0] == layer]), verify=False)
            return self._store.commit(prepared, self._in_time(deadline, f"loading {len(keys)} experts"))

    def import_experts(self, items: Iterable[ExpertTensors], deadline: float | None = None) -> list[Key]:
        """Hold experts moved from another worker; ValueError (nothing held) on a checksum mismatch.

        `deadline`: as `load_experts`'s: an import that ends past it by half of `LOAD_GRACE_S` holds nothing
        (TimeoutError): the caller may have given up and rolled back, and its copies would be tracked by no one.
        """
        self._fail_if_armed("import")
        items = list(items)
        with self._copies:
            return self._store.add(items, check=self._in_time(deadline, f"importing {len(items)} experts"))

    def _in_time(self, deadline: float | None, what: str) -> Callable[[], None]:
        """The check before holding what a call with ``deadline`` prepared (half the grace: clocks of two nodes
        may differ)."""
        def in_time() -> None:
            if deadline is not None and self._wall_clock() > deadline + LOAD_GRACE_S / 2:
                raise TimeoutError(f"{what} ended after the caller may have given up: nothing held")

        return in_time

    def export_experts(self, keys: Iterable[Key]) -> list[ExpertTensors]:
        """CPU copies of held experts, all tensors of each together, checksummed."""
        with self._copies:
            return self._store.export(keys)

    def drop_experts(self, keys: Iterable[Key]) -> None:
        self._store.drop(keys)

    def held_experts(self) -> list[Key]:
        return self._store.keys()

    # --- compute ---------------------------------------------------------------------------------

    def forward(self, layer: int, experts: np.ndarray, counts: np.ndarray,
                tokens: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Unweighted expert outputs for tokens grouped by expert.

        Args:
            experts, counts: int [k] expert ids of `layer` and their token counts.
            tokens: [n, H], n == sum(counts), rows grouped by expert in the order of `experts`.

        Returns:
            outputs [n, H] in the dtype and on the device of `tokens`; seconds float64 [k] per expert:
            emulated (and the call returns at the emulated end time) or measured.
        """
        self._faulted()
        self._configure_thread()
        measured = self._emulator is None  # (an emulated time takes in nothing: no copy guard to read)
        quiet = self._copies.quiet() if measured else None
        outputs, seconds = self._call(self._store, layer, experts, counts, tokens)
        counts = np.asarray(counts).reshape(-1)
        with self._lock:
            self._calls += 1
            self._expert_calls += int(np.count_nonzero(counts))
            self._tokens += int(counts.sum())
            self._busy_s += float(seconds.sum())
        if measured and not self._copies.quiet_since(quiet):
            seconds = np.full_like(seconds, np.nan)
        return outputs.to(device=tokens.device, dtype=tokens.dtype), seconds

    def _faulted(self) -> None:
        """An expert call under an injected fault: a hang waits until the faults are cleared; an error raises."""
        if "hang" in self._faults:
            self._unhung.wait()
        if "error" in self._faults:
            raise RuntimeError(f"injected fault: every expert call fails on worker {self.config.index}")

    def profile(self, token_counts: Sequence[int] = DEFAULT_PROFILE_TOKENS, repeats: int = 3) -> LatencySamples:
        """Latency samples of one expert call per token count, `repeats` times each, through the
        forward path (emulated when emulation is on). Uses the first held expert; when none is held, the
        first expert of `profile_checkpoint` held as the worker would hold it, else a synthetic one of
        shape `profile_shape`. Each token count is run once untimed first (warm-up).
        """
        token_counts = [int(n) for n in token_counts]
        if not token_counts or min(token_counts) < 1 or repeats < 1:
            raise ValueError(f"profile needs token counts >= 1 and repeats >= 1, got {token_counts}, {repeats}")
        self._faulted()  # (a hung or failing device profiled as healthy: an admin profile fitted it a sound model)
        self._configure_thread()
        store, (layer, expert) = self._profile_target()
        hidden = self._ffn.hidden_size(store.get(layer, expert))
        generator = torch.Generator().manual_seed(_PROFILE_SEED)
        tokens = torch.randn(max(token_counts), hidden, generator=generator)
        for n in token_counts:
            with self._compute:
                run_experts(store, layer, [expert], [n], tokens[:n], self._ffn)
        samples = [(n, self._timed(store, layer, expert, tokens[:n])) for _ in range(repeats) for n in token_counts]
        counts, seconds = zip(*samples, strict=True)
        return LatencySamples(self.config.index, np.array(counts, dtype=np.int64), np.array(seconds))

    def _timed(self, store: ExpertStore, layer: int, expert: int, tokens: torch.Tensor) -> float:
        """One profiling sample: measured again (a few times at most) when a copy of experts ran beside it."""
        for _ in range(_PROFILE_TRIES):
            quiet = self._copies.quiet()
            seconds = float(self._call(store, layer, [expert], [len(tokens)], tokens)[1][0])
            if self._emulator is not None or self._copies.quiet_since(quiet):
                break
        return seconds

    def _call(self, store: ExpertStore, layer: int, experts, counts, tokens) -> tuple[torch.Tensor, np.ndarray]:
        """The one path of every timed expert call: compute, then hold until the emulated end."""
        arrived = self._clock()
        with self._compute:
            outputs, seconds = run_experts(store, layer, experts, counts, tokens, self._ffn)
        if self._emulator is None:
            return outputs, seconds
        seconds = self._emulator.expert_seconds(counts, arrived)
        end = self._emulator.reserve(float(seconds.sum()), arrived)
        wait = end - self._clock()
        if wait > 0:
            self._sleep(wait)
        return outputs, seconds

    def _configure_thread(self) -> None:
        """Apply num_threads in the calling thread, once per thread.

        torch.set_num_threads reaches OpenMP only in the thread that calls it: a server or actor thread
        that never did runs every op with an OpenMP team of all cores (measured on 2 busy cores: 18.7 ms
        instead of 16 us for a [1, 128] x [128, 256] linear), while torch.get_num_threads() still says 1.
        """
        if not getattr(self._thread_state, "configured", False):
            torch.set_num_threads(self.config.num_threads)
            self._thread_state.configured = True

    def _profile_target(self) -> tuple[ExpertStore, Key]:
        held = self._store.keys()
        if held:
            return self._store, held[0]
        store = ExpertStore(self._store.device, self._store.dtype)
        if self.config.profile_checkpoint is not None:
            store.add(read_held(self.config, self.config.profile_checkpoint, [(0, 0)]))
            return store, (0, 0)
        hidden, intermediate = self.config.profile_shape
        generator = torch.Generator().manual_seed(_PROFILE_SEED)
        tensors = self._ffn.synthetic(hidden, intermediate, generator)
        store.add([ExpertTensors(0, 0, tensors, checksum(tensors))])
        return store, (0, 0)

    # --- device ----------------------------------------------------------------------------------

    def telemetry(self) -> Telemetry:
        """The device's telemetry, with the bytes of the experts held."""
        return replace(read_telemetry(self.config.index, self.config.device), expert_bytes=self._store.held_bytes())

    def set_emulated_speed(self, factor: float) -> None:
        """Emulation control: change the emulated device's base speed; ValueError without emulation."""
        if self._emulator is None:
            raise ValueError(f"worker {self.config.index} does not emulate a device; cannot set its speed")
        self._emulator.set_speed(factor)

    def inject_fault(self, operation: str) -> None:
        """Test control (admin API, emulated clusters only): the next `operation` call raises, once; "hang":
        every forward and profile from now on blocks for good; "error": every forward and profile from now on raises."""
        if operation not in FAULTS:
            raise ValueError(f"operation must be one of {FAULTS}, got {operation!r}")
        with self._lock:
            self._faults.add(operation)
            if operation == "hang":
                self._unhung.clear()

    def clear_faults(self) -> None:
        """Test control: disarm every injected fault; forwards that hang return."""
        with self._lock:
            self._faults.clear()
        self._unhung.set()

    def _fail_if_armed(self, operation: str) -> None:
        with self._lock:
            armed = operation in self._faults
            self._faults.discard(operation)
        if armed:
            raise RuntimeError(f"injected fault: {operation} on worker {self.config.index}")

    def stats(self) -> WorkerStats:
        uptime = self._clock() - self._started
        with self._lock:
            duty = self._busy_s / uptime if uptime > 0 else 0.0
            return WorkerStats(self._calls, self._expert_calls, self._tokens, self._busy_s, uptime, duty)
