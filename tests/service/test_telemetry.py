"""NVML telemetry of a worker's GPU, against a fake `pynvml` (no GPU needed): fields a board does not report
and MIG instances (from the worker lifecycle audit)."""

import sys
import types

import pytest
import torch

from service.telemetry import decode_throttle_reasons, read_telemetry

pynvml = pytest.importorskip("pynvml")

UUID = "5b4d4b4c-0000-0000-0000-000000000000"


def not_supported(*_):
    raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


def not_found(*_):
    raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)


@pytest.fixture
def nvml(monkeypatch):
    """A fake pynvml with one H200-like GPU "GPU-<UUID>"; tests replace its functions."""
    fake = types.ModuleType("pynvml")
    fake.NVMLError = pynvml.NVMLError
    fake.NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    fake.NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    fake.nvmlInit = lambda: None

    def by_uuid(uuid):
        return "gpu" if uuid == f"GPU-{UUID}" else not_found()

    def on_gpu(value):
        return lambda handle, *_: value if handle == "gpu" else not_supported()

    fake.nvmlDeviceGetHandleByUUID = by_uuid
    fake.nvmlDeviceGetCurrentClocksEventReasons = on_gpu(0x4)
    fake.nvmlDeviceGetClockInfo = on_gpu(1980)
    fake.nvmlDeviceGetMaxClockInfo = on_gpu(1980)
    fake.nvmlDeviceGetTemperature = on_gpu(91)
    fake.nvmlDeviceGetPowerUsage = on_gpu(350_000)
    fake.nvmlDeviceGetEnforcedPowerLimit = on_gpu(700_000)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(uuid=UUID))
    return fake


def test_every_field_read(nvml):
    t = read_telemetry(3, "cuda:0")
    assert t.available and t.reason == "" and t.device == 3
    assert (t.sm_clock_mhz, t.max_sm_clock_mhz, t.power_w, t.power_limit_w, t.temperature_c) == (
        1980.0, 1980.0, 350.0, 700.0, 91.0)
    assert t.throttle_reasons == ("sw_power_cap",)


def test_a_field_the_board_does_not_report_keeps_the_others(nvml):
    nvml.nvmlDeviceGetPowerUsage = nvml.nvmlDeviceGetEnforcedPowerLimit = not_supported  # vGPU, many boards
    t = read_telemetry(3, "cuda:0")
    assert t.available and t.power_w is None and t.power_limit_w is None
    assert (t.sm_clock_mhz, t.temperature_c, t.throttle_reasons) == (1980.0, 91.0, ("sw_power_cap",))
    assert "power_w: Not Supported" in t.reason and "power_limit_w" in t.reason and "temperature" not in t.reason


def test_no_field_read_is_unavailable(nvml):
    for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetClockInfo", "nvmlDeviceGetMaxClockInfo",
                 "nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit"):
        setattr(nvml, name, not_supported)
    t = read_telemetry(3, "cuda:0")
    assert not t.available and t.reason.startswith("NVML error: ") and "Not Supported" in t.reason


def test_a_mig_instance_is_found_by_its_mig_uuid_and_reports_its_gpu(nvml):
    """NVML names a MIG instance "MIG-<uuid>" (torch gives the bare uuid); its handle answers few queries,
    so the readings are its GPU's."""
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: "mig" if uuid == f"MIG-{UUID}" else not_found()
    nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle = lambda handle: "gpu" if handle == "mig" else None
    t = read_telemetry(3, "cuda:0")
    assert t.available and t.reason == "" and t.sm_clock_mhz == 1980.0 and t.power_w == 350.0


def test_no_such_device(nvml):
    t = read_telemetry(3, "cuda:0")
    assert t.available
    nvml.nvmlDeviceGetHandleByUUID = not_found
    t = read_telemetry(3, "cuda:0")
    assert not t.available and "Not Found" in t.reason


def test_cpu_worker_and_reason_names():
    assert not read_telemetry(0, "cpu").available
    assert decode_throttle_reasons(0x4 | 0x40 | 0x1000) == ("sw_power_cap", "hw_thermal_slowdown", "0x1000")


def test_a_driver_without_the_clock_event_query_gives_the_reasons_by_their_older_name(nvml):
    """Drivers before R535 (and older bindings) have no nvmlDeviceGetCurrentClocksEventReasons: the throttle reasons,
    what tells a power-capped device from a slow one, were never reported there (an audit)."""
    def function_not_found(*_):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    nvml.nvmlDeviceGetCurrentClocksEventReasons = function_not_found
    nvml.nvmlDeviceGetCurrentClocksThrottleReasons = lambda handle: 0x4 | 0x20 if handle == "gpu" else not_supported()
    t = read_telemetry(3, "cuda:0")
    assert t.available and t.reason == "" and t.throttle_reasons == decode_throttle_reasons(0x24)
    del nvml.nvmlDeviceGetCurrentClocksEventReasons  # bindings that predate the new name
    assert read_telemetry(3, "cuda:0").throttle_reasons == decode_throttle_reasons(0x24)
    nvml.nvmlDeviceGetCurrentClocksThrottleReasons = not_supported  # a board that reports neither
    t = read_telemetry(3, "cuda:0")
    assert t.available and t.throttle_reasons == () and "throttle_reasons: Not Supported" in t.reason


def test_a_lost_gpu_is_reported_as_lost_not_as_a_mig_instance_not_found(nvml):
    """Any error of the whole GPU's lookup fell back to the MIG one, whose Not Found replaced the first error: a lost
    GPU read as no such device (a review, with fakes)."""
    def lookup(uuid):
        if uuid.startswith("GPU-"):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        not_found()

    nvml.nvmlDeviceGetHandleByUUID = lookup
    t = read_telemetry(3, "cuda:0")
    assert not t.available and "lost" in t.reason.lower() and "Not Found" not in t.reason


def test_an_unusable_device_string_is_a_reason_not_an_exception():
    t = read_telemetry(3, "cuda:x")
    assert not t.available and "'cuda:x' unusable" in t.reason
