"""ExpertStore and run_experts against a hand-written reference FFN."""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.experts import ExpertStore, checksum, run_experts
from service.messages import ExpertTensors

HIDDEN, INTERMEDIATE = 16, 24


def make_expert(layer: int, expert: int, seed: int = 0, scale: bool = False) -> ExpertTensors:
    gen = torch.Generator().manual_seed(seed * 1000 + layer * 100 + expert)
    tensors = {"gate_up": torch.randn(2 * INTERMEDIATE, HIDDEN, generator=gen, dtype=torch.float64),
               "down": torch.randn(HIDDEN, INTERMEDIATE, generator=gen, dtype=torch.float64)}
    if scale:
        tensors["scale"] = torch.tensor([3], dtype=torch.int32)
    return ExpertTensors(layer, expert, tensors, checksum(tensors))


def reference_ffn(x: torch.Tensor, tensors: dict) -> torch.Tensor:
    w_gate, w_up = tensors["gate_up"][:INTERMEDIATE], tensors["gate_up"][INTERMEDIATE:]
    h = torch.sigmoid(x @ w_gate.T) * (x @ w_gate.T) * (x @ w_up.T)
    return h @ tensors["down"].T


def test_checksum_depends_on_names_dtype_shape_and_bytes():
    base = {"a": torch.arange(6, dtype=torch.float32)}
    variants = [{"b": base["a"]}, {"a": base["a"].double()}, {"a": base["a"].view(2, 3)},
                {"a": base["a"] + 1}, {"a": base["a"], "b": torch.zeros(0)}]
    digests = {checksum(base)} | {checksum(v) for v in variants}
    assert len(digests) == 1 + len(variants)
    assert checksum({"a": base["a"].clone()}) == checksum(base)
    assert checksum({"x": torch.ones(3, dtype=torch.bfloat16), "y": torch.tensor(2.0)})  # bf16 and 0-d


def test_outputs_match_reference_ffn_per_expert_group():
    store = ExpertStore("cpu", torch.float64)
    items = [make_expert(2, e) for e in range(3)]
    store.add(items)
    counts = np.array([3, 0, 5])
    tokens = torch.randn(8, HIDDEN, dtype=torch.float64)
    outputs, seconds = run_experts(store, 2, np.array([2, 1, 0]), counts, tokens, F.silu)
    expected = torch.cat([reference_ffn(tokens[:3], items[2].tensors), reference_ffn(tokens[3:], items[0].tensors)])
    torch.testing.assert_close(outputs, expected, rtol=0, atol=1e-6)
    assert seconds.shape == (3,) and seconds[0] > 0 and seconds[1] == 0 and seconds[2] > 0


def test_store_casts_float_tensors_only_and_exports_checksummed_cpu_copies():
    store = ExpertStore("cpu", torch.float32)
    item = make_expert(0, 1, scale=True)
    assert store.add([item]) == [(0, 1)]
    held = store.get(0, 1)
    assert held["gate_up"].dtype == torch.float32 and held["scale"].dtype == torch.int32
    (exported,) = store.export([(0, 1)])
    assert (exported.layer, exported.expert) == (0, 1)
    assert set(exported.tensors) == {"gate_up", "down", "scale"}
    assert exported.checksum == checksum(exported.tensors)
    assert exported.tensors["down"].data_ptr() != held["down"].data_ptr()
    other = ExpertStore("cpu", torch.float32)
    other.add([exported])
    torch.testing.assert_close(other.get(0, 1)["down"], held["down"], rtol=0, atol=0)


def test_checksum_mismatch_rejects_the_whole_batch():
    store = ExpertStore("cpu", torch.float32)
    good, bad = make_expert(0, 0), make_expert(0, 1)
    bad.tensors["down"][0, 0] += 1.0  # corrupted after checksumming
    with pytest.raises(ValueError, match=r"layer 0, expert 1"):
        store.add([good, bad])
    assert store.keys() == []


def test_unknown_expert_raises_key_error_before_computing():
    store = ExpertStore("cpu", torch.float32)
    store.add([make_expert(0, 0)])
    with pytest.raises(KeyError, match=r"layer 3, expert 0"):
        run_experts(store, 3, [0], [1], torch.zeros(1, HIDDEN), F.silu)
    with pytest.raises(KeyError, match=r"\(0, 5\)"):
        store.drop([(0, 0), (0, 5)])
    assert store.keys() == [(0, 0)]
    store.drop([(0, 0)])
    assert store.keys() == []


@pytest.mark.parametrize("experts, counts, rows", [([0, 1], [1], 1), ([0], [2], 1), ([0], [-1], 0)])
def test_inconsistent_requests_raise_value_error(experts, counts, rows):
    store = ExpertStore("cpu", torch.float32)
    store.add([make_expert(0, 0), make_expert(0, 1)])
    with pytest.raises(ValueError):
        run_experts(store, 0, experts, counts, torch.zeros(rows, HIDDEN), F.silu)


def test_forward_runs_while_another_thread_imports_and_drops():
    store = ExpertStore("cpu", torch.float32)
    store.add([make_expert(0, 0)])
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            store.add([make_expert(1, 0)])
            store.drop([(1, 0)])

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        tokens = torch.randn(4, HIDDEN)
        first, _ = run_experts(store, 0, [0], [4], tokens, F.silu)
        for _ in range(50):
            again, _ = run_experts(store, 0, [0], [4], tokens, F.silu)
            torch.testing.assert_close(again, first, rtol=0, atol=0)
    finally:
        stop.set()
        thread.join()
