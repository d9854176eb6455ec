import numpy as np

import placement as pl

# Per-expert latency curves, fitted from profiling samples (here: synthetic). Device 3 is 13% slower.
tokens = np.array([1, 8, 32, 64, 128, 256, 512, 1024])
base = pl.DeviceModel(fixed=2e-4, knee=128, slope=2e-4 / 128)
devices = [pl.DeviceModel.fit(tokens, base.scaled(s).latency(tokens)) for s in (1.0, 1.0, 1.0, 1.13)]

# Router loads: tokens per expert in one forward pass, 2 MoE layers x 16 experts (a real OLMoE trace works too).
rng = np.random.default_rng(0)
loads = np.round(rng.lognormal(5.5, 0.6, size=(2, 16)))

for policy in ("contiguous", "eplb", "vibe"):
    p = pl.plan(loads, devices, policy)
    share = p.device_tokens(loads)[:, 3].sum() / loads.sum()
    print(f"{policy:10s} sum of layer makespans {pl.makespan(p, loads, devices).sum() * 1e3:.3f} ms, "
          f"slow device's token share {share:.1%}")
print(f"lower bound                {pl.lower_bound(loads, devices).sum() * 1e3:.3f} ms")

# Workload drift: re-balance incrementally instead of re-planning. By default at most 10% of a layer's slots
# move, or one swap (2 slots) where 10% is less: here 2 of 16 per layer.
vibe = pl.plan(loads, devices, "vibe")
drifted = loads * rng.lognormal(0, 0.5, size=loads.shape)
new, moves = pl.rebalance(vibe, drifted, devices)
print(f"after drift {pl.makespan(vibe, drifted, devices).sum() * 1e3:.3f} ms -> "
      f"{pl.makespan(new, drifted, devices).sum() * 1e3:.3f} ms with {len(moves)} expert moves")
