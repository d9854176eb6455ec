"""Soak: the real Serve app under steady load near 70% of its capacity, watching every process's memory.

Starts the app as `load_tests.chaos` does, measures its capacity (completed requests per second with
`max_num_seqs` closed-loop clients), then sends Poisson arrivals at `--load` of that rate for
`--minutes`, sampling the resident memory (RSS, psutil) of every process of the service (Ray's
processes, the Serve controller and proxy, the ingress, the coordinator, each expert worker) every
`--sample-s` seconds. Reports every error, latency percentiles and their drift (per tenth of the run, by
arrival, and a least-squares slope), and each process's RSS at start and end with its growth rate over the
second half; processes that exited or appeared meanwhile are counted (a restarted process's leak would hide in
the total, which falls back at the restart: the growth summed over processes keeps it). Prints a summary and
writes ``<out>/soak.json`` and ``<out>/soak.png``. Nothing is asserted: the numbers are the result.

    python -m load_tests.soak --out bench                # 10 minutes at 70%
    python -m load_tests.soak --minutes 1 --out /tmp/s   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from load_tests.chaos import (
    HealthWatch,
    RequestRecord,
    Traffic,
    _count,
    chat_body,
    running_app,
    stream_request,
)
from load_tests.slo import percentiles

OUTPUT_TOKENS = 64


def service_processes() -> dict[int, str]:
    """pid -> label of every process this driver's Ray cluster runs (its descendants), by process title."""
    import psutil  # ships with Ray (ray/thirdparty_files), on sys.path once ray is imported

    labels = {}
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            labels[proc.pid] = _label(proc.cmdline() or [proc.name()])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return labels


def _label(argv: list[str]) -> str:
    """A short, stable name: the Ray actor or replica class of a worker process ("ray::ExpertWorkerActor",
    without the method it runs now), the script of a Python process, else the executable."""
    title = " ".join(argv)
    if title.startswith("ray::"):
        return title.split()[0].removeprefix("ray::").split(".")[0]
    scripts = [Path(arg).name for arg in argv[1:] if arg.endswith(".py")]
    return scripts[0] if scripts else Path(argv[0]).name


def process_memory(pid: int) -> tuple[float, float | None]:
    """RSS and PSS of a process, MiB (PSS: None where the kernel does not give it). RSS counts every page a process
    maps, so pages shared by processes (Ray's object store, torch's libraries) count once in each: a sum over
    processes counts them again and again; PSS shares each page out over the processes that map it, and sums."""
    import psutil

    info = psutil.Process(pid).memory_full_info()
    pss = getattr(info, "pss", None)
    return info.rss / 2**20, None if pss is None else pss / 2**20


class MemorySampler:
    """Samples the RSS and PSS (MiB; `process_memory`) of every service process every `interval_s` while open."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.pss_samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> MemorySampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(30)

    def elapsed(self) -> float:
        """Seconds since sampling started (the time axis of `samples`)."""
        return time.monotonic() - self._t0

    def _run(self) -> None:
        import psutil

        labels: dict[int, str] = {}  # one label per pid: titles change with the method running
        while True:
            rss, pss = {}, {}
            for pid, label in service_processes().items():
                if labels.get(pid, "IDLE") == "IDLE":  # an idle Ray worker may become an actor later
                    labels[pid] = label
                name = f"{labels[pid]}[{pid}]"
                try:
                    rss[name], shared_out = process_memory(pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if shared_out is not None:
                    pss[name] = shared_out
            now = round(time.monotonic() - self._t0, 1)
            self.samples.append((now, rss))
            self.pss_samples.append((now, pss))
            if self._stop.wait(self.interval_s):
                return


def measure_capacity(url: str, model: str, concurrency: int, seconds: float) -> dict:
    """Completed requests per second with `concurrency` closed-loop clients (after a 5 s warm-up)."""
    with Traffic(url, model, concurrency, OUTPUT_TOKENS) as traffic:
        time.sleep(5)
        start = time.monotonic()
        time.sleep(seconds)
        end = time.monotonic()
    done = [r for r in traffic.records if r.ok and start <= r.ended <= end]
    return {"concurrency": concurrency, "seconds": seconds, "completed": len(done),
            "requests_per_s": len(done) / seconds,
            "errors": sum(not r.ok for r in traffic.records)}


def poisson_load(url: str, model: str, rate: float, seconds: float, seed: int = 0) -> list[RequestRecord]:
    """Open-loop Poisson arrivals at `rate` per second for `seconds`; every request's record."""
    rng = random.Random(seed)
    records: list[RequestRecord] = []
    lock = threading.Lock()

    def one(i: int, arrival: float) -> None:
        try:
            record = stream_request(url, chat_body(model, i, OUTPUT_TOKENS))
        except Exception as exc:  # noqa: BLE001 - recorded, never dropped (every request sent has a record)
            record = RequestRecord(arrival, time.monotonic(), f"client_{type(exc).__name__}")
        record.started = arrival  # latency counts from the arrival, waiting for a free thread included
        with lock:
            records.append(record)

    start, next_at, i = time.monotonic(), 0.0, 0
    with ThreadPoolExecutor(max_workers=256) as pool:
        while next_at < seconds:
            delay = start + next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, i, start + next_at)
            i += 1
            next_at += rng.expovariate(rate)
    return records


def memory_report(samples: list[tuple[float, dict[str, float]]]) -> dict:
    """Per process: RSS at the first and last sample, peak, and growth rate (MiB/min, least squares)
    over the second half of the run; the same for the total. ``processes``: how many processes each role
    (label) had, how many exited before the last sample and appeared after the first, and the growth summed
    over its processes (each one's last sample less its first): a process restarted after leaking takes its
    leak out of the total, not out of that sum."""
    if not samples:
        return {"total": {"start_mib": None, "end_mib": None, "peak_mib": None,
                          "growth_mib_per_min_second_half": None}, "processes": {}}
    names = sorted({name for _, rss in samples for name in rss})
    half = samples[len(samples) // 2:]
    out: dict = {"processes": _processes(samples, names)}
    for name in names + ["total"]:
        series = [(t, rss.get(name) if name != "total" else sum(rss.values())) for t, rss in samples]
        series = [(t, v) for t, v in series if v is not None]
        tail = [(t, v) for t, v in series if t >= half[0][0]] if half else []
        slope = float(np.polyfit(*zip(*tail), 1)[0]) * 60 if len(tail) >= 3 else None
        out[name] = {"start_mib": round(series[0][1], 1), "end_mib": round(series[-1][1], 1),
                     "peak_mib": round(max(v for _, v in series), 1),
                     "growth_mib_per_min_second_half": None if slope is None else round(slope, 2)}
    return out


def _processes(samples: list[tuple[float, dict[str, float]]], names: list[str]) -> dict:
    """Per role (the label without its pid) and in all: processes seen, exited, appeared, growth summed."""
    first, last = set(samples[0][1]), set(samples[-1][1])
    roles: dict[str, dict] = {}
    for name in names:
        series = [rss[name] for _, rss in samples if name in rss]
        role = roles.setdefault(name.rsplit("[", 1)[0], {"processes": 0, "exited": 0, "appeared": 0,
                                                        "growth_summed_mib": 0.0})
        role["processes"] += 1
        role["exited"] += name not in last
        role["appeared"] += name not in first
        role["growth_summed_mib"] += series[-1] - series[0]
    everything = {key: sum(role[key] for role in roles.values()) for key in
                  ("processes", "exited", "appeared", "growth_summed_mib")}
    for role in [*roles.values(), everything]:
        role["growth_summed_mib"] = round(role["growth_summed_mib"], 1)
    return roles | {"all": everything}


def latency_report(records: list[RequestRecord], parts: int = 10) -> dict:
    """Seconds from each completed request's scheduled arrival to its end: p50, p90, p99 and max; and their
    drift: p50 and p99 of each tenth of the run (by arrival), the last tenth's p50 over the first's, and the
    least-squares slope of latency against arrival (seconds per minute). A latency that climbs through the run
    has the same pooled percentiles as one that does not."""
    done = sorted((r.started, r.ended - r.started) for r in records if r.ok)
    ok = [latency for _, latency in done]
    report = {f"{q}_s": None if v is None else round(v, 3) for q, v in percentiles(ok).items()}
    report |= {"max_s": round(max(ok), 3) if ok else None}
    if len(done) < 2 * parts:
        return report | {"by_tenth": None, "p50_last_over_first": None, "slope_s_per_min": None}
    start, end = done[0][0], done[-1][0]
    width = (end - start) / parts or 1.0
    tenths = [[latency for at, latency in done if min(int((at - start) / width), parts - 1) == k] for k in range(parts)]
    by_tenth = [{"requests": len(part), "p50_s": _rounded(percentiles(part)["p50"]),
                 "p99_s": _rounded(percentiles(part)["p99"])} for part in tenths]
    first, last = by_tenth[0]["p50_s"], by_tenth[-1]["p50_s"]
    slope = float(np.polyfit([at - start for at, _ in done], ok, 1)[0]) * 60
    return report | {"by_tenth": by_tenth,
                     "p50_last_over_first": round(last / first, 3) if first and last is not None else None,
                     "slope_s_per_min": round(slope, 4)}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def plot(samples: list[tuple[float, dict[str, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for _, rss in samples for name in rss})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name in names:
        points = [(t, rss[name]) for t, rss in samples if name in rss]
        top.plot(*zip(*points), label=name, lw=1)
    bottom.plot([t for t, _ in samples], [sum(rss.values()) for _, rss in samples], color="black")
    top.set_ylabel("RSS (MiB)")
    top.set_title(title, fontsize=9)
    top.legend(fontsize=5, ncol=3)
    bottom.set_ylabel("total RSS (MiB)")
    bottom.set_xlabel("seconds since the app was up")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: embedded model)")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.7, help="share of the measured capacity")
    parser.add_argument("--capacity-s", type=float, default=40.0)
    parser.add_argument("--sample-s", type=float, default=5.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with (running_app(args.devices, model=args.model, max_queue=256,
                      request_timeout_s=60.0) as app,  # below HUNG_AFTER_S: the server answers first
          MemorySampler(args.sample_s) as memory):
        capacity = measure_capacity(app.url, app.model, app.args["max_num_seqs"], args.capacity_s)
        rate = args.load * capacity["requests_per_s"]
        print(f"capacity {capacity['requests_per_s']:.2f} req/s; soaking at {rate:.2f} req/s "
              f"for {args.minutes} min ({app.model_note})", flush=True)
        soak_started = memory.elapsed()
        with HealthWatch(app.url, interval_s=5.0) as health:
            records = poisson_load(app.url, app.model, rate, args.minutes * 60)
    errors = [asdict(r) for r in records if not r.ok]
    soak_samples = [(t, rss) for t, rss in memory.samples if t >= soak_started]
    soak_pss = [(t, pss) for t, pss in memory.pss_samples if t >= soak_started and pss]
    report = {"app": app.args, "model": app.model_note, "capacity": capacity, "load": args.load,
              "rate_per_s": rate, "minutes": args.minutes, "output_tokens": OUTPUT_TOKENS,
              "requests": len(records), "errors": len(errors), "error_records": errors[:50],
              "outcomes": _count(r.outcome for r in records),
              "latency": latency_report(records), "health": _count(health.answers),
              "memory_during_soak": memory_report(soak_samples), "rss_samples_mib": memory.samples,
              # PSS: shared pages counted once over the processes (their RSS sum counts them in each)
              "pss_during_soak": memory_report(soak_pss), "pss_samples_mib": memory.pss_samples}
    (args.out / "soak.json").write_text(json.dumps(report, indent=1))
    plot(memory.samples, args.out / "soak.png",
         f"soak: {len(records)} requests at {rate:.2f} req/s ({args.load:.0%} of capacity), {len(errors)} errors")
    total, processes = report["memory_during_soak"]["total"], report["memory_during_soak"]["processes"].get("all", {})
    pss = report["pss_during_soak"]["total"]
    print(f"soak minutes={args.minutes} rate={rate:.2f}/s requests={len(records)} errors={len(errors)} "
          f"latency_p99_s={report['latency']['p99_s']} latency_p50_last_over_first="
          f"{report['latency']['p50_last_over_first']} latency_slope_s_per_min={report['latency']['slope_s_per_min']} "
          f"rss_total_mib={total['start_mib']}->{total['end_mib']} "
          f"growth_mib_per_min={total['growth_mib_per_min_second_half']} "
          f"rss_growth_summed_mib={processes.get('growth_summed_mib')} "
          f"pss_total_mib={pss['start_mib']}->{pss['end_mib']} "
          f"processes_exited={processes.get('exited')} processes_appeared={processes.get('appeared')}")


if __name__ == "__main__":
    main()
