"""Time an expert worker actor's start, as the app configures it: from `ExpertWorkerActor.remote` until it answers
`info` (its process started, its modules imported, its data plane listening), then until it has profiled and loaded
experts of the checkpoint. What a worker restarted after a fault costs before it can rejoin, and what every worker
of a cold start costs (the emulated devices of `deploy/config.yaml`'s default model on CPU here).

Each start is a new actor (a new process) on one local Ray cluster, killed after. Prints the seconds and their
medians; writes them as JSON with ``--out``. To compare two checkouts, run it in each, alternately:

    python scripts/worker_start_time.py --repeats 3 --out /tmp/worker_start.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="actors started, one after another")
    parser.add_argument("--out", type=Path, help="write the seconds as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from deploy.app import DEFAULT_MODEL, AppArgs, _worker_configs
    from service.checkpoint import load_layout
    from service.worker_actor import ExpertWorkerActor

    layout = load_layout(DEFAULT_MODEL)
    config = _worker_configs(AppArgs.model_validate({"num_devices": 2, "speeds": [1.0, 0.9]}), layout,
                             str(DEFAULT_MODEL))[0]
    keys = [(layer, expert) for layer in range(layout.num_moe_layers) for expert in range(layout.num_experts // 2)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.get(ray.remote(lambda: None).remote())  # the cluster warm: its first worker process started
        ready, loaded = [], []
        for _ in range(args.repeats):
            started = time.monotonic()
            actor = ExpertWorkerActor.options(num_cpus=0.1).remote(config)
            ray.get(actor.info.remote())
            ready.append(time.monotonic() - started)
            ray.get(actor.profile.remote((1, 8, 64), 2))
            ray.get(actor.load_experts.remote(str(DEFAULT_MODEL), keys))
            loaded.append(time.monotonic() - started)
            ray.kill(actor)
            time.sleep(1.0)  # (its process gone before the next)
    finally:
        ray.shutdown()
    result = {"ready_s": [round(s, 3) for s in ready], "loaded_s": [round(s, 3) for s in loaded],
              "median_ready_s": round(statistics.median(ready), 3),
              "median_loaded_s": round(statistics.median(loaded), 3), "experts_loaded": len(keys)}
    print(json.dumps(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
