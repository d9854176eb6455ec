"""Hardware telemetry of a worker's GPU through NVML (the `pynvml` module of nvidia-ml-py).

Owns reading SM clocks, power, temperature and the decoded clock-throttle reasons of one CUDA device
(a MIG instance's are its GPU's). Ignores what the numbers mean for placement. Never raises for a missing
GPU, driver or library: it returns `Telemetry(available=False, reason=...)` instead; fields the board does
not report are None, the others kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from service.messages import Telemetry

# NVML clock-event (throttle) reason bits, decoded to names; values from nvml.h.
_THROTTLE_REASONS = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)

_init_lock = threading.Lock()
_initialized = False


def read_telemetry(device_index: int, torch_device: str) -> Telemetry:
    """Telemetry of the worker with placement index `device_index` whose experts live on `torch_device`.

    Args:
        device_index: the worker's device index G (reported back as `Telemetry.device`).
        torch_device: "cpu", "cuda" or "cuda:N" (N counts visible devices, as torch does).
    """
    try:
        device = torch.device(torch_device)
    except RuntimeError as exc:  # (never raises: an unusable device string is a reason, as the rest)
        return Telemetry(device_index, available=False, reason=f"device {torch_device!r} unusable: {exc}")
    if device.type != "cuda":
        return Telemetry(device_index, available=False, reason=f"no NVIDIA GPU: worker runs on {device.type}")
    try:
        import pynvml
    except ImportError as exc:
        return Telemetry(device_index, available=False, reason=f"pynvml not importable: {exc}")
    try:
        return _read(pynvml, device_index, device.index or 0)
    except pynvml.NVMLError as exc:
        return Telemetry(device_index, available=False, reason=f"NVML error: {exc}")
    except (RuntimeError, AssertionError) as exc:  # torch built without CUDA, or no such device
        return Telemetry(device_index, available=False, reason=f"CUDA device {torch_device} unusable: {exc}")


def _read(pynvml, device_index: int, cuda_index: int) -> Telemetry:
    """Each field read on its own: a board that does not report one (power on MIG, vGPU and many boards
    answers "Not Supported") keeps the others; `reason` then names the missing ones. Unavailable only if
    none could be read."""
    _ensure_init(pynvml)
    # torch's index counts CUDA_VISIBLE_DEVICES; NVML's does not, so find the device by its UUID.
    handle = _handle(pynvml, str(torch.cuda.get_device_properties(cuda_index).uuid))
    missing: list[str] = []

    def field(name: str, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except pynvml.NVMLError as exc:
            missing.append(f"{name}: {exc}")
            return None

    sm = pynvml.NVML_CLOCK_SM
    values = {
        "sm_clock_mhz": field("sm_clock_mhz", lambda: float(pynvml.nvmlDeviceGetClockInfo(handle, sm))),
        "max_sm_clock_mhz": field("max_sm_clock_mhz", lambda: float(pynvml.nvmlDeviceGetMaxClockInfo(handle, sm))),
        "power_w": field("power_w", lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
        "power_limit_w": field("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0),
        "temperature_c": field("temperature_c", lambda: float(
            pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))),
    }
    reasons = field("throttle_reasons", lambda: _clock_event_reasons(pynvml, handle))
    if reasons is None and all(value is None for value in values.values()):
        return Telemetry(device_index, available=False, reason="NVML error: " + "; ".join(missing))
    return Telemetry(device_index, available=True, reason="not reported: " + "; ".join(missing) if missing else "",
                     throttle_reasons=() if reasons is None else decode_throttle_reasons(reasons), **values)


def _clock_event_reasons(pynvml, handle) -> int:
    """The clock-event ("throttle") reason bits: NVML's newer query, or, where the driver (before R535) or the
    bindings lack it, the older name of the same bits."""
    newer = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    if newer is not None:
        try:
            return newer(handle)
        except pynvml.NVMLError as exc:
            if getattr(exc, "value", None) != getattr(pynvml, "NVML_ERROR_FUNCTION_NOT_FOUND", 13):
                raise
    return pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)


def _handle(pynvml, uuid: str):
    """The NVML handle of the device whose CUDA UUID (torch's, without NVML's prefix) is `uuid`. A MIG
    instance's UUID is "MIG-<uuid>" in NVML, a whole GPU's "GPU-<uuid>"; clocks, power and temperature are
    the whole GPU's, which a MIG instance's handle does not answer, so a MIG instance gives its GPU's handle."""
    if uuid.startswith(("GPU-", "MIG-")):
        uuid = uuid[4:]
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    except pynvml.NVMLError as exc:
        # not a whole GPU's UUID: a MIG instance's; any other error (a GPU lost) is the GPU's, not the MIG lookup's
        if getattr(exc, "value", None) not in (getattr(pynvml, "NVML_ERROR_NOT_FOUND", 6),
                                               getattr(pynvml, "NVML_ERROR_INVALID_ARGUMENT", 2)):
            raise
        handle = pynvml.nvmlDeviceGetHandleByUUID(f"MIG-{uuid}")  # raises as the GPU- lookup did if not one either
    return pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)


def decode_throttle_reasons(bits: int) -> tuple[str, ...]:
    """Names of the NVML clock-event reason bits set in `bits` (unknown bits as "0x...")."""
    names = tuple(name for bit, name in _THROTTLE_REASONS if bits & bit)
    unknown = bits & ~sum(bit for bit, _ in _THROTTLE_REASONS)
    return names + ((hex(unknown),) if unknown else ())


def _ensure_init(pynvml) -> None:
    global _initialized
    with _init_lock:
        if not _initialized:
            pynvml.nvmlInit()
            _initialized = True
