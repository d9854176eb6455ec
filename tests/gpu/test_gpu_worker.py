"""ExpertWorker on a CUDA device, without Ray: outputs against the CPU reference per dtype, measured
timings, migration off the GPU, and NVML telemetry. Skipped (nothing started) without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.experts import checksum
from service.messages import ExpertTensors
from service.worker import ExpertWorker, WorkerConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

HIDDEN, INTERMEDIATE = 256, 128
# Relative Frobenius error of the outputs against the float32 CPU reference: float32 differs only by
# summation order; half precision rounds weights, tokens and every product (8 or 11 mantissa bits).
REL_TOLERANCE = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}


def random_expert(layer: int, expert: int) -> ExpertTensors:
    generator = torch.Generator().manual_seed(100 * layer + expert)
    tensors = {"gate_up": torch.randn(2 * INTERMEDIATE, HIDDEN, generator=generator) / HIDDEN**0.5,
               "down": torch.randn(HIDDEN, INTERMEDIATE, generator=generator) / INTERMEDIATE**0.5}
    return ExpertTensors(layer, expert, tensors, checksum(tensors))


def worker(device: str, dtype: str) -> ExpertWorker:
    w = ExpertWorker(WorkerConfig(index=0, device=device, dtype=dtype))
    w.import_experts([random_expert(0, e) for e in range(4)])
    return w


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got.double() - want.double()) / torch.linalg.norm(want.double()))


@pytest.mark.parametrize("dtype", sorted(REL_TOLERANCE))
def test_forward_on_cuda_matches_the_cpu_reference(dtype):
    experts, counts = np.array([3, 0, 2]), np.array([5, 0, 300])  # an empty group, and a big one
    tokens = torch.randn(int(counts.sum()), HIDDEN, generator=torch.Generator().manual_seed(1))
    want, _ = worker("cpu", "float32").forward(0, experts, counts, tokens)
    got, seconds = worker("cuda", dtype).forward(0, experts, counts, tokens)
    assert got.device.type == "cpu" and got.dtype == torch.float32  # as the request came
    assert torch.isfinite(got).all()
    assert relative_error(got, want) < REL_TOLERANCE[dtype]
    assert seconds.shape == (3,) and seconds[1] == 0 and (seconds[[0, 2]] > 0).all()


def test_bfloat16_experts_are_held_in_bfloat16_on_the_gpu_and_exported_exactly():
    gpu = worker("cuda", "bfloat16")
    item = gpu.export_experts([(0, 1)])[0]
    assert {t.dtype for t in item.tensors.values()} == {torch.bfloat16}
    assert all(t.device.type == "cpu" for t in item.tensors.values())
    assert item.checksum == checksum(item.tensors)
    # a copy imported elsewhere computes exactly what the exporter computes
    copy = ExpertWorker(WorkerConfig(index=1, device="cuda", dtype="bfloat16"))
    copy.import_experts([item])
    tokens = torch.randn(16, HIDDEN)
    torch.testing.assert_close(copy.forward(0, [1], [16], tokens)[0], gpu.forward(0, [1], [16], tokens)[0],
                               rtol=0, atol=0)


def test_profile_on_cuda_reports_event_timings_that_grow_with_tokens():
    samples = worker("cuda", "bfloat16").profile([1, 4096], repeats=5)
    small = np.median(samples.seconds[samples.tokens == 1])
    large = np.median(samples.seconds[samples.tokens == 4096])
    assert (samples.seconds > 0).all() and (samples.seconds < 1).all()
    assert large > small


def test_telemetry_of_the_worker_gpu_is_available_and_sane():
    telemetry = worker("cuda", "bfloat16").telemetry()
    assert telemetry.available, telemetry.reason
    assert telemetry.device == 0
    assert 0 < telemetry.sm_clock_mhz <= telemetry.max_sm_clock_mhz < 10_000
    assert 0 < telemetry.power_w < 2 * telemetry.power_limit_w
    assert 0 < telemetry.temperature_c < 120
    assert all(isinstance(reason, str) for reason in telemetry.throttle_reasons)
