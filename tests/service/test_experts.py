"""ExpertStore and run_experts against a hand-written reference FFN, and ExpertFFN against transformers' experts."""

import threading

import numpy as np
import pytest
import torch

from service.experts import ExpertFFN, ExpertStore, checksum, expert_weight, run_experts
from service.messages import ExpertTensors

HIDDEN, INTERMEDIATE = 16, 24
SILU = ExpertFFN("silu")


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
    outputs, seconds = run_experts(store, 2, np.array([2, 1, 0]), counts, tokens, SILU)
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
        run_experts(store, 3, [0], [1], torch.zeros(1, HIDDEN), SILU)
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
        run_experts(store, 0, experts, counts, torch.zeros(rows, HIDDEN), SILU)


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
        first, _ = run_experts(store, 0, [0], [4], tokens, SILU)
        for _ in range(50):
            again, _ = run_experts(store, 0, [0], [4], tokens, SILU)
            torch.testing.assert_close(again, first, rtol=0, atol=0)
    finally:
        stop.set()
        thread.join()


def randomized(module: torch.nn.Module) -> torch.Generator:
    """Give ``module``'s parameters standard normal values (seed 0); returns the generator for more draws."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return generator


def test_gpt_oss_ffn_is_transformers_clamped_swiglu_bit_for_bit():
    """GPT-OSS's experts (biases, interleaved gate and up, clamped SwiGLU) computed from one expert's tensors as
    read from a checkpoint equal transformers' eager loop's output for that expert."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = GptOssConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_local_experts=2,
                          swiglu_limit=1.5)  # a limit the random gates and ups cross
    module = GptOssExperts(config)
    generator = randomized(module)
    tokens = torch.randn(5, HIDDEN, generator=generator)
    tensors = {"gate_up": module.gate_up_proj[1], "gate_up_bias": module.gate_up_proj_bias[1],
               "down": module.down_proj[1], "down_bias": module.down_proj_bias[1]}
    ffn = ExpertFFN("silu", (config.swiglu_alpha, config.swiglu_limit))
    with torch.no_grad():
        expected = module(tokens, torch.ones(5, 1, dtype=torch.long), torch.ones(5, 1))
        assert torch.equal(ffn(tokens, tensors), expected)
        gate_up = tokens @ tensors["gate_up"] + tensors["gate_up_bias"]
        assert (gate_up.abs() > 1.5).any()  # the clamps were active
        assert not torch.equal(ExpertFFN("silu", (config.swiglu_alpha, 100.0))(tokens, tensors), expected)
    assert ffn.hidden_size(tensors) == HIDDEN == ffn.hidden_size(ffn.synthetic(HIDDEN, 8, generator))
    with pytest.raises(ValueError, match="alpha, limit"):
        ExpertFFN("silu", (1.702, 0.0))


def test_experts_without_a_gate_are_transformers_nemotron_h_experts_bit_for_bit():
    """Nemotron-H's experts ("up" and "down", no gate: down(relu2(up x))) computed from one expert's tensors equal
    transformers' eager loop's output for that expert; the tensor names decide the form (the same tensors read
    as a gated expert's would not even have its shapes)."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    config = NemotronHConfig(hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE, n_routed_experts=2)
    config._experts_implementation = "eager"
    module = NemotronHExperts(config)
    generator = randomized(module)
    tokens = torch.randn(5, HIDDEN, generator=generator)
    tensors = {"up": module.up_proj[1], "down": module.down_proj[1]}
    ffn = ExpertFFN(config.mlp_hidden_act)
    with torch.no_grad():
        expected = module(tokens, torch.ones(5, 1, dtype=torch.long), torch.ones(5, 1))
        assert torch.equal(ffn(tokens, tensors), expected)
        assert not torch.equal(ExpertFFN("silu")(tokens, tensors), expected)  # relu2, not the default
    assert ffn.hidden_size(tensors) == HIDDEN


def quantized_expert(layer: int, expert: int, block: int = 8) -> tuple[ExpertTensors, ExpertTensors]:
    """An expert held quantized (FP8 weights with float32 block scales) and the same expert dequantized."""
    gen = torch.Generator().manual_seed(layer * 100 + expert)
    held, whole = {}, {}
    for name, (rows, cols) in (("gate_up", (2 * INTERMEDIATE, HIDDEN)), ("down", (HIDDEN, INTERMEDIATE))):
        weight = torch.randn(rows, cols, generator=gen).to(torch.float8_e4m3fn)
        scale = torch.rand(rows // block, cols // block, generator=gen) + 0.5
        held[name], held[f"{name}_scale_inv"] = weight, scale
        whole[name] = (weight.float().reshape(rows // block, block, cols // block, block)
                       * scale[:, None, :, None]).reshape(rows, cols)
    return (ExpertTensors(layer, expert, held, checksum(held)), ExpertTensors(layer, expert, whole, checksum(whole)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_held_quantized_compute_what_their_dequantized_weights_compute(dtype):
    """FP8 weights and their scales keep their dtypes in the store (moved and checksummed as they are), a
    quarter of float32's bytes plus the scales, and the FFN dequantizes them at each call to the compute
    dtype: outputs equal those of the same weights held dequantized, bit for bit."""
    pairs = [quantized_expert(0, e) for e in range(3)]
    held, whole = ExpertStore("cpu", dtype), ExpertStore("cpu", dtype)
    held.add([q for q, _ in pairs])
    whole.add([w for _, w in pairs])
    stored = held.get(0, 1)
    assert stored["gate_up"].dtype == torch.float8_e4m3fn and stored["gate_up_scale_inv"].dtype == torch.float32
    assert held.export([(0, 1)])[0].checksum == pairs[1][0].checksum  # moved as they arrived
    fp8_bytes = 3 * (3 * HIDDEN * INTERMEDIATE + 3 * HIDDEN * INTERMEDIATE // 64 * 4)
    assert held.held_bytes() == fp8_bytes and whole.held_bytes() == 3 * 3 * HIDDEN * INTERMEDIATE * dtype.itemsize
    tokens = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(1))
    got, _ = run_experts(held, 0, np.array([2, 0, 1]), np.array([4, 0, 5]), tokens, SILU)
    want, _ = run_experts(whole, 0, np.array([2, 0, 1]), np.array([4, 0, 5]), tokens, SILU)
    assert got.dtype == dtype and torch.equal(got, want)
    broken = dict(stored, gate_up_scale_inv=stored["gate_up_scale_inv"] * 2)  # the scales are applied
    assert not torch.equal(SILU(tokens[:2].to(dtype), broken), SILU(tokens[:2].to(dtype), stored))


def test_experts_held_as_packed_integers_keep_their_scales_dtype_and_compute_what_they_dequantize_to():
    """Pack-quantized INT4 experts (Kimi-K2-Thinking's) with bf16 scales in a float32 store: the integers, scales
    and shapes keep their dtypes (the dequantization computes in the scale's dtype, as compressed-tensors does),
    and the FFN's outputs equal those of the dequantized weights, bit for bit; the scales are applied."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from service.quantization import dequantize_int_packed

    gen = torch.Generator().manual_seed(7)
    held, whole = {}, {}
    for name, (rows, cols) in (("gate_up", (2 * INTERMEDIATE, HIDDEN)), ("down", (HIDDEN, INTERMEDIATE))):
        values = torch.randint(-8, 8, (rows, cols), dtype=torch.int8, generator=gen)
        scale = (torch.rand(rows, cols // 8, generator=gen) / 7).to(torch.bfloat16)
        held.update({f"{name}_packed": pack_to_int32(values, 4), f"{name}_scale": scale,
                     f"{name}_shape": torch.tensor([rows, cols])})
        whole[name] = dequantize_int_packed(held[f"{name}_packed"], scale, (rows, cols), torch.float32)
    store, plain = ExpertStore("cpu", torch.float32), ExpertStore("cpu", torch.float32)
    store.add([ExpertTensors(0, 0, held, checksum(held))])
    plain.add([ExpertTensors(0, 0, whole, checksum(whole))])
    stored = store.get(0, 0)
    assert (stored["gate_up_packed"].dtype, stored["gate_up_scale"].dtype, stored["down_shape"].dtype) == (
        torch.int32, torch.bfloat16, torch.int64)
    assert SILU.hidden_size(stored) == HIDDEN
    tokens = torch.randn(5, HIDDEN, generator=gen)
    assert torch.equal(SILU(tokens, stored), SILU(tokens, plain.get(0, 0)))
    assert not torch.equal(SILU(tokens, dict(stored, down_scale=stored["down_scale"] * 2)), SILU(tokens, stored))


def test_experts_pickle_with_fp8_tensors_as_they_are():
    """Experts cross processes pickled (Ray): torch 2.13 pickles an FP8 tensor but cannot unpickle it, so an
    expert's tensors travel as bytes, dtype and shape, and arrive equal, non-contiguous and 0-d ones too."""
    import pickle

    held, _ = quantized_expert(0, 3)
    tensors = {**held.tensors, "view": torch.arange(12.0).reshape(3, 4)[:, 1:3], "scalar": torch.tensor(2.5)}
    item = ExpertTensors(0, 3, tensors, checksum(tensors))
    back = pickle.loads(pickle.dumps(item))
    assert (back.layer, back.expert, back.checksum) == (0, 3, item.checksum)
    assert checksum(back.tensors) == item.checksum  # names, dtypes, shapes and bytes
    assert back.tensors["gate_up"].dtype == torch.float8_e4m3fn and back.tensors["view"].shape == (3, 2)


def test_a_packed_weights_shape_stays_on_the_host_where_the_experts_go_to_a_device():
    """Each call reads a pack-quantized weight's shape: held on the GPU, that read synchronised the stream at every
    weight of every expert call (GPU-path review). Shown on the meta device, where reading a device tensor's value
    raises (on a GPU it silently waits)."""
    from service.bench_quantized import int4_expert

    tensors = int4_expert(256, 128, torch.Generator().manual_seed(0))
    store = ExpertStore("meta", torch.bfloat16)  # (stands in for "cuda")
    store.add([ExpertTensors(0, 0, tensors, checksum(tensors))])
    held = store.get(0, 0)
    assert {held[name].device.type for name in held if name.endswith("_shape")} == {"cpu"}
    assert {held[name].device.type for name in held if not name.endswith("_shape")} == {"meta"}
    assert expert_weight(held, "gate_up", torch.bfloat16).shape == (256, 256)


def test_an_expert_call_that_runs_out_of_device_memory_is_run_in_parts(caplog):
    """A hot expert's rows of a long prefill could exceed the device's free memory for the intermediates: the call
    failed, the worker was counted lost and its requests retried elsewhere, then answered 503 (a left-out item).
    Now the rows run in halves until they fit; a single row that cannot still fails the call."""
    store = ExpertStore(torch.device("cpu"), torch.float64)
    store.add([make_expert(0, 0), make_expert(0, 1)])
    sizes = []

    class Tight(ExpertFFN):
        def __init__(self, max_rows: int) -> None:
            super().__init__("silu")
            self.max_rows = max_rows

        def __call__(self, x, tensors):
            sizes.append(x.shape[0])
            if x.shape[0] > self.max_rows:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().__call__(x, tensors)

    x = torch.randn(13, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    experts, counts = np.array([0, 1]), np.array([10, 3])
    whole, _ = run_experts(store, 0, experts, counts, x, SILU)
    with caplog.at_level("WARNING", logger="service.experts"):
        parts, seconds = run_experts(store, 0, experts, counts, x, Tight(max_rows=3))
    torch.testing.assert_close(parts, whole)
    assert sizes == [10, 5, 2, 3, 5, 2, 3, 3] and seconds.shape == (2,)  # expert 0 split down to <= 3; expert 1 whole
    assert caplog.text.count("ran out of device memory at 10 rows") == 1
    with pytest.raises(torch.OutOfMemoryError):
        run_experts(store, 0, experts, counts, x, Tight(max_rows=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["silu", "swish", "relu", "gelu", "gelu_pytorch_tanh"])
def test_activations_called_without_transformers_are_its_own_bit_for_bit(name, dtype):
    """The activations a worker calls without importing transformers compute what transformers' ACT2FN does."""
    from transformers.activations import ACT2FN

    from service.experts import activation

    x = torch.cat([torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 8,
                   torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan")])]).to(dtype)
    ours, theirs = activation(name)(x), ACT2FN[name](x)
    assert ours.dtype == theirs.dtype and torch.equal(ours.view(torch.int16 if dtype == torch.bfloat16 else
                                                                torch.int32),
                                                      theirs.view(torch.int16 if dtype == torch.bfloat16 else
                                                                  torch.int32))


def test_other_activations_are_transformers_and_unknown_ones_are_refused():
    from transformers.activations import ACT2FN

    from service.experts import activation

    x = torch.randn(64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(activation("relu2")(x), ACT2FN["relu2"](x))
    with pytest.raises(ValueError, match="hidden_act must be a transformers activation, got 'swiglu'"):
        ExpertFFN("swiglu")


def test_a_gpu_store_is_timed_on_its_own_device(monkeypatch):
    """CUDA events were recorded on the current device's stream and the whole current device synchronized: a store on
    cuda:1 was timed on cuda:0 (a review, with fakes; serving's workers see one GPU, cuda:0, but
    scripts/measure_gpu_curve.py takes --device cuda:N)."""
    from service import experts

    log = []

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            log.append(("record", stream))

        def elapsed_time(self, other):
            return 2.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("synchronize", device)))
    device = torch.device("cuda:1")
    timer = experts._CudaTimer(2, device)
    timer.start(1)
    timer.stop(1)
    assert timer.seconds().tolist() == [0.0, 0.002]
    assert log == [("record", f"stream of {device}")] * 2 + [("synchronize", device)]
