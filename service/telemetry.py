"""Hardware telemetry of a worker's GPU through NVML (the `pynvml` module of nvidia-ml-py).

Owns reading SM clocks, power, temperature and the decoded clock-throttle reasons of one CUDA device.
Ignores what the numbers mean for placement. Never raises for a missing GPU, driver or library: it
returns `Telemetry(available=False, reason=...)` instead.
"""

from __future__ import annotations

import threading

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
    device = torch.device(torch_device)
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
    _ensure_init(pynvml)
    # torch's index counts CUDA_VISIBLE_DEVICES; NVML's does not, so find the device by its UUID.
    uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    reasons = pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
    return Telemetry(
        device_index,
        available=True,
        sm_clock_mhz=float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
        max_sm_clock_mhz=float(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)),
        power_w=pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        power_limit_w=pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
        temperature_c=float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
        throttle_reasons=decode_throttle_reasons(reasons),
    )


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
