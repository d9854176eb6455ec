"""ExpertWorker without Ray: outputs, emulated holds, profiling, migration, controls, telemetry."""

import ctypes
import os
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

from service.emulator import EmulationConfig
from service.messages import ExpertTensors
from service.worker import ExpertWorker, WorkerConfig
from tests.service.test_experts import HIDDEN, make_expert, reference_ffn

CURVE = dict(fixed_s=1e-3, knee_tokens=8, jitter=0.0)


class FakeTime:
    """A clock that only moves when the worker sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def worker_with(keys, dtype="float64", emulation=None, fake: FakeTime | None = None) -> ExpertWorker:
    timing = dict(clock=fake.clock, sleep=fake.sleep) if fake else {}
    worker = ExpertWorker(WorkerConfig(index=3, dtype=dtype, emulation=emulation), **timing)
    worker.import_experts([make_expert(layer, expert) for layer, expert in keys])
    return worker


def test_forward_matches_reference_ffn_and_keeps_the_request_dtype():
    worker = worker_with([(1, 0), (1, 4)])
    tokens = torch.randn(7, HIDDEN, dtype=torch.float64)
    outputs, seconds = worker.forward(1, np.array([4, 0]), np.array([2, 5]), tokens)
    expected = torch.cat([reference_ffn(tokens[:2], make_expert(1, 4).tensors),
                          reference_ffn(tokens[2:], make_expert(1, 0).tensors)])
    torch.testing.assert_close(outputs, expected, rtol=0, atol=1e-6)
    assert outputs.dtype == torch.float64 and seconds.shape == (2,) and (seconds > 0).all()
    half, _ = worker.forward(1, [4, 0], [2, 5], tokens.float())
    assert half.dtype == torch.float32


def test_concurrent_expert_calls_compute_one_at_a_time_so_each_is_timed_alone():
    """Calls from several threads (an engine replica per connection, a profile while serving) computed at once: on
    a GPU each call's timing took in the others' kernels, a busy device read as a slow one (an audit)."""
    worker = worker_with([(1, 0)])
    inside, overlaps, real = [], [], worker._ffn

    def ffn(x, tensors):
        inside.append(1)
        overlaps.append(len(inside))
        time.sleep(0.02)
        inside.pop()
        return real(x, tensors)

    ffn.hidden_size = real.hidden_size
    worker._ffn = ffn
    tokens = torch.randn(3, HIDDEN, dtype=torch.float64)
    threads = [threading.Thread(target=worker.forward, args=(1, [0], [3], tokens)) for _ in range(4)]
    threads.append(threading.Thread(target=worker.profile, args=([2],), kwargs={"repeats": 1}))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(overlaps) == 4 + 2 and max(overlaps) == 1  # 4 calls, the profile's warm-up and timed call


def test_a_call_measured_beside_a_copy_of_experts_reports_no_time_and_a_profile_measures_again():
    """Copies of experts (imports, exports, loads) do not wait for expert calls (a migration must not stall
    serving), so on a GPU a call timed while one ran took in its transfer on the shared stream, and its inflated
    time fed the device's model and drift (a review, with fakes). Its time is NaN, which the engine keeps no sample
    of; a profiling sample is measured again."""
    worker = worker_with([(1, 0)])
    real, copying, calls = worker._ffn, threading.Event(), []

    def ffn(x, tensors):
        calls.append(1)
        if len(calls) == 1:  # the call an export runs beside
            copying.wait(5)
        return real(x, tensors)

    ffn.hidden_size = real.hidden_size
    worker._ffn = ffn
    tokens = torch.randn(3, HIDDEN, dtype=torch.float64)
    result = []
    call = threading.Thread(target=lambda: result.append(worker.forward(1, [0], [3], tokens)))
    call.start()
    while not calls:
        time.sleep(0.001)
    worker.export_experts([(1, 0)])
    copying.set()
    call.join()
    assert np.isnan(result[0][1]).all()
    assert np.isfinite(worker.forward(1, [0], [3], tokens)[1]).all()  # quiet: timed

    def copy_ends_in_the_first_timed_call(x, tensors):
        calls.append(1)
        if len(calls) == 2:  # (the first is the profile's warm-up)
            worker._copies.__exit__(None, None, None)
        return real(x, tensors)

    copy_ends_in_the_first_timed_call.hidden_size = real.hidden_size
    worker._ffn, calls[:] = copy_ends_in_the_first_timed_call, []
    worker._copies.__enter__()  # a copy runs as the profile starts
    samples = worker.profile([2], repeats=1)
    assert len(calls) == 3 and np.isfinite(samples.seconds).all() and len(samples.seconds) == 1


def test_the_engine_keeps_no_sample_of_a_call_without_a_time():
    from service.dispatch import DispatchContext

    context = DispatchContext.__new__(DispatchContext)
    context._lock, context._samples = threading.Lock(), {}
    context.config = types.SimpleNamespace(max_samples=8)
    context._record_samples(2, np.array([3, 5, 7]), np.array([0.1, np.nan, 0.3]))
    tokens, seconds = context._samples[2].drain()
    assert tokens.tolist() == [3, 7] and seconds.tolist() == [0.1, 0.3]


GOMP = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")


@pytest.mark.skipif(not os.path.exists(GOMP), reason="torch is not built with GNU OpenMP")
def test_forward_from_a_new_thread_uses_the_configured_thread_count():
    # torch.get_num_threads() reports the global setting; OpenMP's per-thread value is what ops use.
    omp_max_threads = ctypes.CDLL(GOMP).omp_get_max_threads
    worker = worker_with([(0, 0)])
    seen = []

    def call():
        worker.forward(0, [0], [1], torch.randn(1, HIDDEN))
        seen.append(omp_max_threads())

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert seen == [1]


def test_unknown_expert_is_a_key_error():
    worker = worker_with([(0, 0)])
    with pytest.raises(KeyError, match="layer 0, expert 9"):
        worker.forward(0, [9], [1], torch.zeros(1, HIDDEN))


def test_emulation_holds_the_reply_until_the_curve_time():
    fake = FakeTime()
    worker = worker_with([(0, 0), (0, 1)], emulation=EmulationConfig(speed=0.5, **CURVE), fake=fake)
    _, seconds = worker.forward(0, [0, 1], [4, 24], torch.randn(28, HIDDEN))
    expected = np.array([1e-3, 1e-3 + 1e-3 / 8 * 16]) / 0.5
    np.testing.assert_allclose(seconds, expected, rtol=1e-12)
    assert fake.slept == [pytest.approx(expected.sum())]
    worker.set_emulated_speed(1.0)
    _, seconds = worker.forward(0, [0], [4], torch.randn(4, HIDDEN))
    assert seconds[0] == pytest.approx(1e-3)


def test_emulation_holds_in_real_time_and_concurrent_callers_queue():
    worker = worker_with([(0, 0)], emulation=EmulationConfig(fixed_s=0.05, knee_tokens=8, jitter=0.0))
    start = time.monotonic()
    done = []

    def call():
        worker.forward(0, [0], [2], torch.randn(2, HIDDEN))
        done.append(time.monotonic() - start)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.sort()
    for i, elapsed in enumerate(done):  # one device: the calls finish 50 ms apart, not together
        assert 0.05 * (i + 1) - 1e-3 <= elapsed < 0.05 * (i + 1) + 0.1


def test_drift_schedule_applies_through_the_worker():
    fake = FakeTime()
    worker = worker_with([(0, 0)], emulation=EmulationConfig(drift=((60.0, 0.8),), **CURVE), fake=fake)
    assert worker.forward(0, [0], [1], torch.randn(1, HIDDEN))[1][0] == pytest.approx(1e-3)
    fake.now += 60.0
    assert worker.forward(0, [0], [1], torch.randn(1, HIDDEN))[1][0] == pytest.approx(1e-3 / 0.8)


def test_set_emulated_speed_needs_emulation():
    with pytest.raises(ValueError, match="does not emulate"):
        worker_with([]).set_emulated_speed(0.5)


def test_export_import_round_trip_gives_identical_outputs():
    source = worker_with([(2, 5), (2, 6)], dtype="float32")
    target = worker_with([], dtype="float32")
    moved = source.export_experts([(2, 6)])
    assert target.import_experts(moved) == [(2, 6)]
    source.drop_experts([(2, 6)])
    assert source.held_experts() == [(2, 5)] and target.held_experts() == [(2, 6)]
    tokens = torch.randn(5, HIDDEN)
    before = worker_with([(2, 6)], dtype="float32").forward(2, [6], [5], tokens)[0]
    torch.testing.assert_close(target.forward(2, [6], [5], tokens)[0], before, rtol=0, atol=0)


def test_import_rejects_a_corrupted_expert():
    (item,) = worker_with([(0, 0)]).export_experts([(0, 0)])
    corrupted = ExpertTensors(0, 0, {**item.tensors, "down": item.tensors["down"] * 2}, item.checksum)
    target = worker_with([])
    with pytest.raises(ValueError, match="checksum mismatch"):
        target.import_experts([corrupted])
    assert target.held_experts() == []


def test_experts_read_here_are_not_hashed_again_those_from_another_process_are(monkeypatch):
    """A worker's load hashed every expert twice (as read, then on storing it): as long as the read itself on a core,
    minutes for a large model's share (an audit). Imported experts, which crossed processes, are still verified."""
    import service.experts

    monkeypatch.setitem(sys.modules, "service.checkpoint", types.SimpleNamespace(
        read_experts=lambda checkpoint_dir, keys, **kwargs: [make_expert(layer, expert) for layer, expert in keys]))
    monkeypatch.setattr(service.experts, "checksum", lambda tensors: pytest.fail("hashed again"))
    worker = worker_with([])
    assert worker.load_experts("/ckpt", [(0, 2)]) == [(0, 2)]
    monkeypatch.setattr(service.experts, "checksum", lambda tensors: "other")
    with pytest.raises(ValueError, match="checksum mismatch"):
        worker.import_experts([make_expert(0, 3)])


def test_a_load_that_fails_part_way_holds_nothing_it_added(monkeypatch):
    def read_experts(checkpoint_dir, keys, **kwargs):
        if keys[0][0] == 1:
            raise ValueError("the checkpoint lacks layer 1's experts")
        return [make_expert(layer, expert) for layer, expert in keys]

    monkeypatch.setitem(sys.modules, "service.checkpoint", types.SimpleNamespace(read_experts=read_experts))
    worker = worker_with([(0, 2)])
    with pytest.raises(ValueError, match="lacks layer 1"):
        worker.load_experts("/ckpt", [(0, 2), (0, 3), (1, 3)])
    assert worker.held_experts() == [(0, 2)]  # held before: kept; (0, 3), read before the failure: not held


def test_a_load_holds_nothing_until_every_layer_is_read(monkeypatch):
    """Copies of a load in progress were held: a coordinator restarted meanwhile adopted them as held, and lost
    them when the load then failed and dropped what it had added (a review)."""
    worker = worker_with([(5, 5)])
    seen = []

    def read_experts(checkpoint_dir, keys, **kwargs):
        seen.append(worker.held_experts())
        return [make_expert(layer, expert) for layer, expert in keys]

    monkeypatch.setitem(sys.modules, "service.checkpoint", types.SimpleNamespace(read_experts=read_experts))
    assert worker.load_experts("/ckpt", [(0, 2), (1, 3)]) == [(0, 2), (1, 3)]
    assert seen == [[(5, 5)], [(5, 5)]] and sorted(worker.held_experts()) == [(0, 2), (1, 3), (5, 5)]


def test_a_load_past_its_deadline_starts_no_layer_and_holds_nothing(monkeypatch):
    """A load given up by its caller still ran in the actor: what it placed afterwards was tracked by no one (a
    review). The worker starts no layer past the deadline, and a load that ends well after it holds nothing."""
    from service.worker_pool import LOAD_GRACE_S

    now, reads, step = [1000.0], [], [40.0]

    def read_experts(checkpoint_dir, keys, **kwargs):
        reads.append(keys[0][0])
        now[0] += step[0]  # each layer's read takes 40 s
        return [make_expert(layer, expert) for layer, expert in keys]

    monkeypatch.setitem(sys.modules, "service.checkpoint", types.SimpleNamespace(read_experts=read_experts))
    worker = ExpertWorker(WorkerConfig(index=0, dtype="float64"), wall_clock=lambda: now[0])
    worker.load_experts("/ckpt", [(0, 1)])
    with pytest.raises(TimeoutError, match="past the caller's deadline: stopped after 2 of 3 layers, nothing held"):
        worker.load_experts("/ckpt", [(1, 2), (2, 2), (3, 2)], deadline=now[0] + 60.0)
    assert reads == [0, 1, 2] and worker.held_experts() == [(0, 1)]
    step[0] = LOAD_GRACE_S / 2 + 50.0  # one layer that ends after the caller may have given up
    with pytest.raises(TimeoutError, match="the caller may have given up: nothing held"):
        worker.load_experts("/ckpt", [(1, 2)], deadline=now[0] + 30.0)
    assert worker.held_experts() == [(0, 1)]
    step[0] = 40.0
    assert worker.load_experts("/ckpt", [(1, 2)], deadline=now[0] + 30.0) == [(1, 2)]  # within the grace: held


def test_an_import_that_ends_after_its_caller_gave_up_holds_nothing():
    """A copy given up by the coordinator (its call timed out, the migration rolled back, the reconciliation found
    nothing extra) still ran in the importing actor and then held its experts for good, tracked by no one (a
    review: copies on every device outside the placement). An import ending well past its deadline holds nothing."""
    from service.worker_pool import LOAD_GRACE_S

    now = [1000.0]
    source = worker_with([(0, 1), (0, 2)])
    worker = ExpertWorker(WorkerConfig(index=0, dtype="float64"), wall_clock=lambda: now[0])
    exported = source.export_experts([(0, 1)])
    deadline = now[0] + 60.0
    now[0] = deadline + LOAD_GRACE_S / 2 + 1.0
    with pytest.raises(TimeoutError, match="importing 1 experts ended after the caller may have given up"):
        worker.import_experts(exported, deadline)
    assert worker.held_experts() == []
    now[0] = deadline + 1.0  # late, within the grace (the caller still waits): held
    assert worker.import_experts(exported, deadline) == [(0, 1)]
    assert worker.import_experts(source.export_experts([(0, 2)])) == [(0, 2)]  # no deadline: held


def test_the_ray_pool_gives_each_copy_a_deadline_and_waits_for_its_grace(monkeypatch):
    import ray

    from service import worker_pool

    sent, waited = [], []

    class Method:
        def __init__(self, name):
            self.name = name

        def remote(self, *args):
            sent.append((self.name, args))
            return f"ref-{len(sent)}"

    actor = types.SimpleNamespace(export_experts=Method("export"), import_experts=Method("import"))
    pool = object.__new__(worker_pool.RayWorkerPool)
    pool.config = worker_pool.RayPoolConfig(call_timeout_s=45.0)
    pool._actors = [actor, actor]
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: waited.append((ref, timeout)) or [(0, 1)])
    before = time.time()
    assert pool.copy([(0, 1, [(0, 1)])]) == 1
    name, (ref, deadline) = sent[1]
    assert name == "import" and ref == "ref-1" and before + 45.0 <= deadline <= time.time() + 45.0
    [(got, timeout)] = waited  # the import's answer, waited for the call's time and the grace
    assert got == "ref-2" and 45.0 + worker_pool.LOAD_GRACE_S - 1.0 <= timeout <= 45.0 + worker_pool.LOAD_GRACE_S


def test_a_late_load_leaves_the_copy_a_retry_stored_meanwhile(monkeypatch):
    """A load given up, then retried (and the retry's placement published), ended late: it stored its copy over
    the retry's, then dropped it as its own, and the worker lacked an expert the placement put there (a review)."""
    now, nested = [1000.0], []
    worker = ExpertWorker(WorkerConfig(index=0, dtype="float64"), wall_clock=lambda: now[0])

    def read_experts(checkpoint_dir, keys, **kwargs):
        if checkpoint_dir == "/first" and not nested:  # the retry runs while the first reads
            nested.append(worker.load_experts("/retry", keys))
            now[0] += 500.0
        return [make_expert(layer, expert) for layer, expert in keys]

    monkeypatch.setitem(sys.modules, "service.checkpoint", types.SimpleNamespace(read_experts=read_experts))
    with pytest.raises(TimeoutError):
        worker.load_experts("/first", [(0, 3)], deadline=now[0] + 60.0)
    assert nested == [[(0, 3)]] and worker.held_experts() == [(0, 3)]


def test_load_experts_reads_through_the_checkpoint_reader(monkeypatch):
    calls = []

    def read_experts(checkpoint_dir, keys, *, quantized, dtype, layout):
        calls.append((checkpoint_dir, keys, quantized, dtype, layout))
        return [make_expert(layer, expert) for layer, expert in keys]

    monkeypatch.setitem(sys.modules, "service.checkpoint", types.SimpleNamespace(read_experts=read_experts))
    worker = worker_with([])
    assert worker.load_experts("/ckpt", [(0, 2), (1, 3)]) == [(0, 2), (1, 3)]
    # a layer at a time: the host holds one layer's read copies, not the worker's whole share (an audit)
    assert calls == [("/ckpt", [(0, 2)], False, torch.float64, None), ("/ckpt", [(1, 3)], False, torch.float64, None)]
    assert worker.held_experts() == [(0, 2), (1, 3)]
    assert worker.telemetry().expert_bytes == sum(t.numel() * t.element_size() for key in [(0, 2), (1, 3)]
                                                 for t in make_expert(*key).tensors.values())
    keeping = ExpertWorker(WorkerConfig(index=1, keep_quantized=True, dtype="bfloat16"))
    keeping.load_experts("/ckpt", [(0, 1)])
    assert calls[-1] == ("/ckpt", [(0, 1)], True, torch.bfloat16, None)
    # the layout the app gave, for its checkpoint only
    layout = object()
    given = ExpertWorker(WorkerConfig(index=2, profile_checkpoint="/ckpt", checkpoint_layout=layout))
    given.load_experts("/ckpt", [(0, 4)])
    given.load_experts("/other", [(0, 5)])
    assert [call[-1] for call in calls[-2:]] == [layout, None]


def test_a_worker_given_its_checkpoints_layout_reads_and_profiles_its_experts_without_importing_transformers():
    """transformers costs a worker process about a second of CPU to import, at every start and restart; given the
    layout (as the app gives it), the worker never imports it, and reads the very experts the reader reads."""
    import json
    import pickle
    import subprocess

    from deploy.app import DEFAULT_MODEL
    from service.checkpoint import load_layout, read_experts

    layout = load_layout(DEFAULT_MODEL)
    config = WorkerConfig(index=0, hidden_act=layout.hidden_act, profile_checkpoint=str(DEFAULT_MODEL),
                          profile_shape=(layout.hidden_size, layout.intermediate_size), checkpoint_layout=layout)
    code = """if True:
        import json, pickle, sys
        import service.worker_actor
        from service.worker import ExpertWorker
        config = pickle.loads(sys.stdin.buffer.read())
        worker = ExpertWorker(config)
        worker.profile(token_counts=(1, 4), repeats=1)
        worker.load_experts(config.profile_checkpoint, [(0, 1), (1, 7)])
        print(json.dumps({"transformers": sorted(name for name in sys.modules if name.split(".")[0] == "transformers"),
                          "held": [item.checksum for item in worker.export_experts([(0, 1), (1, 7)])]}))
    """
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(config),
                         capture_output=True, check=True, timeout=120)
    seen = json.loads(out.stdout)
    assert seen["transformers"] == [], seen["transformers"]
    assert seen["held"] == [item.checksum for item in read_experts(DEFAULT_MODEL, [(0, 1), (1, 7)])]
    with pytest.raises(ValueError, match="checkpoint_layout is the layout of profile_checkpoint"):
        WorkerConfig(index=0, checkpoint_layout=layout)


def test_profile_with_emulation_samples_the_emulated_curve():
    fake = FakeTime()
    worker = worker_with([(0, 0)], emulation=EmulationConfig(speed=2.0, **CURVE), fake=fake)
    samples = worker.profile(token_counts=(1, 8, 32), repeats=2)
    assert samples.device == 3
    np.testing.assert_array_equal(samples.tokens, [1, 8, 32, 1, 8, 32])
    curve = np.array([1e-3, 1e-3, 1e-3 * 4]) / 2.0
    np.testing.assert_allclose(samples.seconds, np.tile(curve, 2), rtol=1e-12)
    assert worker.stats().calls == 0  # profiling is not serving


def test_profile_without_experts_uses_a_synthetic_expert_and_measures():
    samples = ExpertWorker(WorkerConfig(index=0, profile_shape=(32, 64))).profile(token_counts=(1, 64), repeats=2)
    np.testing.assert_array_equal(samples.tokens, [1, 64, 1, 64])
    assert (samples.seconds > 0).all()


@pytest.mark.parametrize("keep_quantized", [False, True])
def test_profile_without_experts_runs_the_checkpoints_first_expert_as_it_would_be_held(tmp_path, monkeypatch,
                                                                                      keep_quantized):
    """Given a checkpoint, a worker holding nothing profiles its expert (0, 0) held as the worker holds experts:
    FP8 with its scales when it keeps them quantized (its calls then pay the dequantization), else dequantized."""
    import service.worker as worker_module
    from tests.tiny_models import save_tiny_fp8_model

    folder = save_tiny_fp8_model("qwen3_moe", tmp_path / "fp8")
    profiled = []

    def spy(store, layer, experts, counts, tokens, ffn):
        profiled.append(store.get(layer, int(experts[0]))["gate_up"].dtype)
        return run_experts(store, layer, experts, counts, tokens, ffn)

    run_experts = worker_module.run_experts
    monkeypatch.setattr(worker_module, "run_experts", spy)
    worker = ExpertWorker(WorkerConfig(index=0, keep_quantized=keep_quantized, profile_checkpoint=str(folder)))
    samples = worker.profile(token_counts=(1, 8), repeats=1)
    assert list(samples.tokens) == [1, 8] and worker.held_experts() == []  # profiled, not held
    assert set(profiled) == {torch.float8_e4m3fn if keep_quantized else torch.float32}


def test_stats_count_calls_tokens_and_busy_time():
    fake = FakeTime()
    worker = worker_with([(0, 0), (0, 1)], emulation=EmulationConfig(**CURVE), fake=fake)
    worker.forward(0, [0, 1], [3, 0], torch.randn(3, HIDDEN))
    worker.forward(0, [1], [2], torch.randn(2, HIDDEN))
    fake.now += 0.998
    stats = worker.stats()
    assert (stats.calls, stats.expert_calls, stats.tokens) == (2, 2, 5)
    assert stats.busy_s == pytest.approx(2e-3) and stats.uptime_s == pytest.approx(1.0)
    assert stats.duty_cycle == pytest.approx(2e-3)


def test_telemetry_on_cpu_says_why_it_is_unavailable():
    telemetry = worker_with([]).telemetry()
    assert telemetry.device == 3 and not telemetry.available and telemetry.expert_bytes == 0
    assert telemetry.reason == "no NVIDIA GPU: worker runs on cpu"
    holding = worker_with([(0, 1), (2, 0)])
    assert holding.telemetry().expert_bytes == 2 * 3 * 16 * 24 * 8  # two float64 experts


@pytest.mark.parametrize("bad", [dict(index=-1), dict(index=0, device="gpu"), dict(index=0, dtype="int8"),
                                 dict(index=0, hidden_act="swiglu"), dict(index=0, num_threads=0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        WorkerConfig(**bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_worker_matches_cpu_and_reads_nvml_telemetry():
    cpu = worker_with([(0, 0)], dtype="float32")
    gpu = ExpertWorker(WorkerConfig(index=0, device="cuda", dtype="float32"))
    gpu.import_experts(cpu.export_experts([(0, 0)]))
    tokens = torch.randn(64, HIDDEN)
    outputs, seconds = gpu.forward(0, [0], [64], tokens)
    assert outputs.device.type == "cpu" and seconds[0] > 0
    torch.testing.assert_close(outputs, cpu.forward(0, [0], [64], tokens)[0], rtol=1e-4, atol=1e-4)
    telemetry = gpu.telemetry()
    assert telemetry.available, telemetry.reason
    assert 0 < telemetry.sm_clock_mhz <= telemetry.max_sm_clock_mhz and telemetry.power_limit_w > 0


def test_a_failing_or_hung_worker_profiles_as_it_serves():
    """Injected faults reached only the expert calls of serving: an admin profile of a hung or failing device fitted
    it a healthy model (a review). Profiling fails as a call does, and hangs until the faults are cleared."""
    worker = ExpertWorker(WorkerConfig(index=0, dtype="float32"))
    worker.import_experts([make_expert(0, 0)])
    worker.inject_fault("error")
    with pytest.raises(RuntimeError, match="injected fault"):
        worker.profile([1, 2], repeats=1)
    worker.clear_faults()
    worker.inject_fault("hang")
    done = []
    thread = threading.Thread(target=lambda: done.append(worker.profile([1, 2], repeats=1)), daemon=True)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and not done
    worker.clear_faults()
    thread.join(10)
    assert len(done[0].tokens) == 2
