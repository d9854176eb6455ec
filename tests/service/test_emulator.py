"""DeviceEmulator: the curve, speed, drift, throttling and queueing, all on explicit times."""

import math
import threading

import numpy as np
import pytest

from service.emulator import DeviceEmulator, EmulationConfig


def emulator(**overrides) -> DeviceEmulator:
    params = dict(jitter=0.0) | overrides
    return DeviceEmulator(EmulationConfig(**params), clock=lambda: 0.0)


def test_curve_is_flat_then_linear_and_scaled_by_speed():
    emu = emulator(fixed_s=1e-3, knee_tokens=100, speed=0.5)
    seconds = emu.expert_seconds([0, 1, 100, 300], now=0.0)
    np.testing.assert_allclose(seconds, [0.0, 2e-3, 2e-3, 2e-3 * 3], rtol=1e-12)
    assert EmulationConfig(fixed_s=4e-4, knee_tokens=128).slope_s == pytest.approx(4e-4 / 128)


def test_jitter_has_the_configured_relative_spread_and_is_seeded():
    config = EmulationConfig(jitter=0.05, seed=7)
    a = DeviceEmulator(config, clock=lambda: 0.0).expert_seconds(np.full(4000, 64), now=0.0)
    b = DeviceEmulator(config, clock=lambda: 0.0).expert_seconds(np.full(4000, 64), now=0.0)
    np.testing.assert_array_equal(a, b)
    relative = a / config.fixed_s
    assert relative.mean() == pytest.approx(1.0, abs=0.005)
    assert relative.std() == pytest.approx(0.05, rel=0.1)
    assert relative.min() > 0


def test_drift_schedule_steps_the_speed():
    emu = emulator(drift=((60.0, 0.8), (120.0, 0.5)))
    assert [emu.effective_speed(t) for t in (0.0, 59.9, 60.0, 119.0, 500.0)] == [1.0, 1.0, 0.8, 0.8, 0.5]
    assert emu.expert_seconds([10], now=61.0)[0] == pytest.approx(4e-4 / 0.8)


def test_set_speed_replaces_the_base_speed_and_keeps_drift():
    emu = emulator(speed=1.0, drift=((10.0, 0.5),))
    emu.set_speed(2.0)
    assert emu.effective_speed(0.0) == 2.0 and emu.effective_speed(10.0) == 1.0
    with pytest.raises(ValueError, match="-1"):
        emu.set_speed(-1.0)


def test_concurrent_reservations_queue_on_one_timeline():
    emu = emulator()
    assert emu.reserve(1.0, now=0.0) == 1.0
    assert emu.reserve(0.5, now=0.2) == 1.5  # waits for the first call
    assert emu.reserve(0.5, now=3.0) == 3.5  # idle device starts at once
    ends = []
    threads = [threading.Thread(target=lambda: ends.append(emu.reserve(0.25, now=4.0))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ends) == [4.0 + 0.25 * (i + 1) for i in range(8)]


def test_duty_cycle_is_the_exponentially_weighted_busy_fraction():
    emu = emulator(throttle_tau_s=2.0)
    emu.reserve(4.0, now=0.0)
    assert emu.duty_cycle(4.0) == pytest.approx(1 - math.exp(-2.0))
    assert emu.duty_cycle(6.0) == pytest.approx((1 - math.exp(-2.0)) * math.exp(-1.0))


def test_throttling_lowers_speed_under_sustained_load_and_recovers():
    emu = emulator(throttle_floor=0.6, throttle_tau_s=1.0)
    assert emu.effective_speed(0.0) == 1.0
    now = 0.0
    for _ in range(2000):  # back-to-back calls for about 10 s
        seconds = emu.expert_seconds([512], now=now)
        now = emu.reserve(float(seconds.sum()), now=now)
    loaded = emu.effective_speed(now)
    assert loaded == pytest.approx(0.6, abs=0.01)
    assert emu.expert_seconds([512], now=now)[0] == pytest.approx(emulator().expert_seconds([512], 0.0)[0] / loaded)
    assert emu.effective_speed(now + 10.0) == pytest.approx(1.0, abs=1e-3)


def test_no_throttling_by_default():
    emu = emulator()
    emu.reserve(100.0, now=0.0)
    assert emu.effective_speed(100.0) == 1.0


@pytest.mark.parametrize("bad", [dict(speed=0.0), dict(fixed_s=-1.0), dict(jitter=1.5), dict(throttle_floor=0.0),
                                 dict(throttle_tau_s=0.0), dict(drift=((5.0, 0.8), (5.0, 0.7))),
                                 dict(drift=((1.0, 0.0),)), dict(knee_tokens=0.0), dict(speed=float("nan"))])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        EmulationConfig(**bad)


def test_speeds_below_the_floor_are_refused_and_drift_never_takes_a_device_below_it():
    """A speed of 1e-300 was accepted (admin API, serve config): one expert call then emulated 1e296 s, the worker's
    sleep overflowed, and every call failed for good. Now speeds start at MIN_SPEED, and drift and throttling never
    take the effective speed below it."""
    from service.emulator import MIN_SPEED

    with pytest.raises(ValueError, match="speed"):
        EmulationConfig(speed=1e-300)
    emu = DeviceEmulator(EmulationConfig(speed=MIN_SPEED, jitter=0.0, throttle_floor=0.5,
                                         drift=((0.0, 1e-12),)), clock=lambda: 0.0)
    with pytest.raises(ValueError, match="speed"):
        emu.set_speed(1e-300)
    with pytest.raises(ValueError, match="speed"):
        emu.set_speed(MIN_SPEED / 2)
    assert emu.effective_speed() == MIN_SPEED
    seconds = emu.expert_seconds(np.array([1, 4096]))
    assert np.all(np.isfinite(seconds)) and seconds.max() < 5.0
