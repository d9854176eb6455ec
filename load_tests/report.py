"""The benchmark report: headline numbers from `compare.json` (and drift and scale results), `report.md`.

Owns what the headline means: per policy, the SLO frontier of its sweep; P50/P90/P99 TTFT and TPOT,
mean predicted imbalance and barrier idle time (1 - mean / max device time per layer) at eplb's frontier
rate, all policies measured at that same rate with the same trace; the targets checked against them;
the step-time breakdown; and the one summary line per policy that `make bench` prints last. Ignores
running anything (see `compare`, `drift`, `scale`); plots are drawn by `plots`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from load_tests.generator import offered_rate
from load_tests.slo import SLO

TARGETS = {"frontier_vs_eplb": 1.15, "frontier_vs_contiguous": 1.3, "p90_ttft_at_eplb_frontier": 0.6}


def balance(polls: list[dict]) -> dict[str, float | None]:
    """Mean over polls and layers of the predicted per-layer imbalance (max / mean device time) and of
    the barrier idle share 1 - mean / max; None without polls that have loads."""
    rows = [p["imbalance_per_layer"] for p in polls if p.get("imbalance_per_layer")]
    if not rows:
        return {"mean_imbalance": None, "barrier_idle": None}
    imbalance = np.asarray(rows, dtype=np.float64)
    return {"mean_imbalance": float(imbalance.mean()), "barrier_idle": float((1.0 - 1.0 / imbalance).mean())}


def step_breakdown(run: dict) -> dict[str, float | None]:
    """Mean engine step time (from /metrics), the MoE layers' predicted critical path per pass (sum over
    layers of the slowest device's predicted time on the window loads) and its perfectly balanced value
    (sum of the mean device times), in ms; their difference is all that any placement could remove from
    a step (the balance headroom), also as a share of the step."""
    steps = run.get("step_seconds") or {}
    count = steps.get("count", 0)
    step_ms = 1e3 * steps["sum"] / count if count else None
    placement = run.get("placement") or {}
    moe_ms = 1e3 * placement["moe_critical_path_s"] if placement else None
    balanced_ms = 1e3 * placement["moe_balanced_path_s"] if "moe_balanced_path_s" in placement else None
    rest = None if step_ms is None or moe_ms is None else step_ms - moe_ms
    headroom = None if moe_ms is None or balanced_ms is None else moe_ms - balanced_ms
    return {"steps": count, "step_ms": step_ms, "moe_predicted_ms": moe_ms, "moe_balanced_ms": balanced_ms,
            "rest_ms": rest, "balance_headroom_ms": headroom,
            "headroom_share": None if headroom is None or not step_ms else headroom / step_ms}


def headline(result: dict) -> dict[str, dict]:
    """Per policy: frontier, latency percentiles, balance and step breakdown at eplb's frontier rate."""
    rows = {}
    for policy, entry in result["policies"].items():
        point = entry.get("at_eplb_frontier")
        summary = point["summary"] if point else {}
        rows[policy] = {
            "frontier_rps": entry["frontier"]["rate_rps"], "frontier_kind": entry["frontier"]["kind"]
            + ("" if entry["frontier"].get("monotonic", True) else ", non-monotonic"),
            "rate_rps": point["rate_rps"] if point else None,
            **{f"{m}_{q}_ms": summary.get(f"{m}_{q}_ms") for m in ("ttft", "tpot") for q in ("p50", "p90", "p99")},
            "attainment": summary.get("attainment"), "goodput_rps": summary.get("goodput_rps"),
            "failed": summary.get("failed"),
            **balance(point["polls"] if point else []),
            **step_breakdown(point or {}),
        }
    return rows


def targets(rows: dict[str, dict], target: float = 0.9) -> list[dict]:
    """The issue's targets, measured: each with its value, threshold and whether it was met (`target`: the SLO
    attainment a frontier stands for)."""
    checks = []

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    if {"vibe", "eplb"} <= rows.keys():
        checks.append({"what": "vibe frontier / eplb frontier", "baseline": "eplb", "value": ratio(
            rows["vibe"]["frontier_rps"], rows["eplb"]["frontier_rps"]), "want": f">= {TARGETS['frontier_vs_eplb']}"})
        checks.append({"what": "vibe P90 TTFT / eplb P90 TTFT at eplb's frontier rate",
                       "value": ratio(rows["vibe"]["ttft_p90_ms"], rows["eplb"]["ttft_p90_ms"]),
                       "want": f"<= {TARGETS['p90_ttft_at_eplb_frontier']}"})
    if {"vibe", "contiguous"} <= rows.keys():
        checks.append({"what": "vibe frontier / contiguous frontier", "baseline": "contiguous", "value": ratio(
            rows["vibe"]["frontier_rps"], rows["contiguous"]["frontier_rps"]),
            "want": f">= {TARGETS['frontier_vs_contiguous']}"})
    for check in checks:
        op, threshold = check["want"].split()
        value = check["value"]
        check["met"] = value is not None and (value >= float(threshold) if op == ">=" else value <= float(threshold))
        if "baseline" in check and value is None:  # a frontier ratio whose baseline met the SLO at no rate
            check["met"] = rows[check["baseline"]]["frontier_rps"] == 0 and (rows["vibe"]["frontier_rps"] or 0) > 0
        # the balance headroom of the two policies compared (the most their placements can change a step)
        shares = [rows[p]["headroom_share"] for p in ("vibe", "eplb", "contiguous")
                  if p in check["what"] and rows[p].get("headroom_share") is not None]
        check["caveat"] = _caveat(check, rows, max(shares) if shares else None, target)
    return checks


def _caveat(check: dict, rows: dict[str, dict], headroom: float | None, target: float = 0.9) -> str:
    """Why a measured ratio may not be the placement's doing: an unbounded or non-monotonic frontier, eplb's own
    run at its interpolated frontier missing the attainment that frontier stands for, a P90 that leaves out failed
    requests (a policy shedding load looks faster), or a difference larger than the balance headroom (the most the
    compared placements can change a step)."""
    notes = []
    if check["what"].startswith("vibe frontier"):  # a ratio of two frontiers
        for policy in [p for p in ("vibe", "eplb", "contiguous") if f"{p} frontier" in check["what"]]:
            kind = rows[policy]["frontier_kind"]
            if kind != "interpolated":
                notes.append(f"{policy} frontier {kind}")
    eplb = rows.get("eplb", {})
    if "eplb" in check["what"] and eplb.get("attainment") is not None and eplb["attainment"] < target:
        notes.append(f"eplb's own run at its frontier rate reached attainment {eplb['attainment']:.3f}, below "
                     f"{target:g}: the interpolated frontier overstates it")
    if "TTFT" in check["what"]:  # percentiles over completed requests: one that failed or was cut off is left out
        failed = {p: rows.get(p, {}).get("failed") for p in ("vibe", "eplb")}
        if None not in failed.values() and failed["vibe"] != failed["eplb"]:
            notes.append(f"P90 over completed requests only; failed or cut off: vibe {failed['vibe']}, "
                         f"eplb {failed['eplb']}")
    value = check["value"]
    if value is not None and headroom is not None and abs(value - 1.0) > headroom:
        notes.append(f"differs from 1 by more than the balance headroom ({headroom:.1%} of a step): "
                     "not explained by placement")
    return "; ".join(notes)


def summary_lines(rows: dict[str, dict]) -> list[str]:
    """`policy=<name> slo_frontier_rps=<x> p90_ttft_ms=<x> p90_tpot_ms=<x> mean_imbalance=<x>` per policy."""
    return [f"policy={p} slo_frontier_rps={_num(r['frontier_rps'], 3)} p90_ttft_ms={_num(r['ttft_p90_ms'], 1)} "
            f"p90_tpot_ms={_num(r['tpot_p90_ms'], 2)} mean_imbalance={_num(r['mean_imbalance'], 4)}"
            for p, r in rows.items()]


def write(out: Path, result: dict, drift: dict | None = None, scale: dict | None = None,
          headroom: dict | None = None) -> list[str]:
    """Draw the plots, write `<out>/report.md`; returns the summary lines."""
    from load_tests import plots

    rows = headline(result)
    slo = SLO(**{k: result["slo"][k] for k in ("ttft_s", "tpot_s", "target")})
    plots.slo_frontier(result, rows, out / "slo_frontier.png")
    plots.latency(result, rows, slo, out / "latency.png")
    plots.balance(result, rows, out / "balance.png")
    sections = [_header(result, slo), _headline_table(rows), _targets(rows, slo.target)]
    if headroom is not None:
        sections.append(_headroom(headroom))
    sections += [_sweep(result), _breakdown(rows), _knobs(result)]
    if drift is not None:
        sections.append(_drift(drift))
    if scale is not None:
        sections.append(_scale(scale))
    (out / "report.md").write_text("\n\n".join(sections) + "\n")
    return summary_lines(rows)


# --- sections ----------------------------------------------------------------------------------------

def _header(result: dict, slo: SLO) -> str:
    cfg = result["config"]
    command = shlex.join(["python", "-m", "load_tests.compare", *result.get("argv", ["--out", "bench"])])
    unloaded = result["slo"]
    return "\n".join([
        f"# vibe-serve: side-by-side benchmark ({' vs '.join(sorted(result['policies']))})",
        "",
        f"Reproduce: `{command}` from the repository root (`make bench` runs it with `--out bench --drift`; this run "
        f"took {result.get('runtime_s', 0) / 60:.0f} min). Machine: {result['machine']['cpus']} CPUs, {result['machine']['platform']}, "
        f"load average {_loads(result['machine'])}; the machine was shared, so compare within this run only.",
        "",
        f"{_cluster(result)} Model: {result['model']['path']} ({_weights(result['model'])}).",
        f"Trace: Poisson arrivals, workloads {list(cfg['workloads'])}, seed {cfg['seed']}, "
        f"max_tokens capped at {cfg['max_tokens_cap']}, {cfg['duration_s']:g} s of arrivals per rate, `ignore_eos` "
        "and temperature 0 (every policy serves the same tokens). Rates "
        f"{[round(r, 3) for r in result['rates']]} req/s" + (
            f" swept from {list(cfg['rate_multipliers'])} x the single-stream rate {result['single_stream_rps']:.3f} req/s "
            "(1 / (median unloaded TTFT + (mean output tokens - 1) x median unloaded TPOT))" if cfg["rates"] is None
            else "") + f". Warm-up {cfg['warmup_s']:g} s at {cfg['warmup_rate']:g} req/s before measuring.",
        f"SLOs: TTFT <= {slo.ttft_s * 1e3:.1f} ms ({cfg['ttft_factor']:g} x the unloaded median), TPOT <= "
        f"{slo.tpot_s * 1e3:.1f} ms ({cfg['tpot_factor']:g} x the unloaded median); unloaded = "
        f"{cfg['unloaded_requests']} requests sent one at a time (max_tokens <= {cfg['unloaded_max_tokens']}) "
        f"to each app" + (", to every app at the same time" if cfg.get("together", True) else
                          ", one app after another") +
        f", medians over {unloaded['set_by']}, after the warm-up trace and before the sweep. SLO frontier: highest "
        f"rate with >= {slo.target:.0%} of requests within both SLOs: the highest swept rate that meets it, "
        "interpolated linearly towards the next swept rate (failed and cut-off requests count as misses; "
        "'non-monotonic': a lower rate missed the target; 'below_sweep': no swept rate met it, extrapolated "
        "towards full attainment at rate 0 if the lowest rate missed at most twice the requests the target lets "
        "miss, else 0). " + (
            f"The sweep ends after a rate at which every policy is below {cfg['stop_below']:.0%} attainment."
            if cfg.get("together", True) else
            f"A policy leaves the sweep after a rate below {cfg['stop_below']:.0%} attainment."),
        *(["", *(f"Note: {note}" for note in result["notes"])] if result.get("notes") else []),
    ])


def _weights(model: dict) -> str:
    """Which weights: their SHA-256, or (a large or sharded checkpoint, not hashed) its safetensors files."""
    if model.get("weights_sha256"):
        return f"weights sha256 {model['weights_sha256'][:12]}"
    files = model.get("weights_files") or []
    if not files:
        return "weights sha256 ?"
    return (f"{len(files)} safetensors files, {sum(size for _, size, _ in files) / 1e9:.2f} GB, not hashed; "
            "names, sizes and times in compare.json")


def _cluster(result: dict) -> str:
    """The devices the apps ran on: the serve config, its emulated speeds, or its real devices (and where)."""
    args = next(iter(result["policies"].values()))["app_args"]
    config = result["config"].get("deploy_config", "deploy/config.yaml")
    where = f" on the Ray cluster at {result['ray_address']}" if result.get("ray_address") else ""
    if args.get("emulate", True):
        return (f"Emulated cluster ({config}){where}: {args['num_devices']} devices, speeds "
                f"{args.get('speeds')}, emulation {args.get('emulation')}.")
    return f"Cluster ({config}){where}: {args['num_devices']} expert workers on {args.get('device', 'cpu')} devices."


def _headline_table(rows: dict[str, dict]) -> str:
    rate = next((r["rate_rps"] for r in rows.values() if r["rate_rps"] is not None), None)
    lines = [f"## Headline (latency, balance and step time at eplb's frontier rate, {_num(rate, 3)} req/s)", "",
             "| policy | SLO frontier (req/s) | TTFT p50/p90/p99 (ms) | TPOT p50/p90/p99 (ms) | attainment | "
             "mean imbalance | barrier idle | failed |", "|---|---|---|---|---|---|---|---|"]
    for policy, r in rows.items():
        ttft = "/".join(_num(r[f"ttft_{q}_ms"], 1) for q in ("p50", "p90", "p99"))
        tpot = "/".join(_num(r[f"tpot_{q}_ms"], 2) for q in ("p50", "p90", "p99"))
        lines.append(f"| {policy} | {_num(r['frontier_rps'], 3)} ({r['frontier_kind']}) | {ttft} | {tpot} | "
                     f"{_num(r['attainment'], 3)} | {_num(r['mean_imbalance'], 4)} | "
                     f"{_pct(r['barrier_idle'])} | {_num(r['failed'], 0)} |")
    lines += ["", "Imbalance and barrier idle: predicted by the coordinator (its online-refined device models, "
              "expected seconds per forward pass from its statistics window: mean router loads and each expert's "
              "share of passes with tokens, /admin/stats), mean over layers and polls during the run."]
    return "\n".join(lines)


def _targets(rows: dict[str, dict], target: float = 0.9) -> str:
    lines = ["## Targets (measured side by side in this run)", "", "| check | measured | target | met | caveat |",
             "|---|---|---|---|---|"]
    for check in targets(rows, target):
        lines.append(f"| {check['what']} | {_num(check['value'], 3)} | {check['want']} | "
                     f"{'yes' if check['met'] else 'no'} | {check['caveat'] or '-'} |")
    return "\n".join(lines)


def _sweep(result: dict) -> str:
    duration = result["config"]["duration_s"]
    lines = ["## Rate sweep", "", "| policy | rate (req/s): set, offered | requests | attainment (95% interval) | goodput (req/s) | "
             "output tok/s | TTFT p90 (ms) | TPOT p90 (ms) | E2E p90 (ms) | failed | placement version | "
             "mean step (ms) | MoE critical path (ms/pass) | load average before, after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for policy, entry in result["policies"].items():
        runs = entry["runs"] + ([entry["at_eplb_frontier"]] if entry.get("at_eplb_frontier") else [])
        for run in runs:
            s, step = run["summary"], step_breakdown(run)
            loads = ", ".join(f"{la[0]:.1f}" for la in run.get("loadavg") or []) or "-"
            mark = " (eplb frontier)" if run["kind"] == "eplb_frontier" else ""
            spread = _interval(round(s["attainment"] * s["requests"]), s["requests"])
            lines.append(f"| {policy} | {run['rate_rps']:.3f}, {offered_rate(run['rate_rps'], duration):.4f}{mark} | {s['requests']} | {s['attainment']:.3f}{spread} | "
                         f"{s['goodput_rps']:.3f} | {s['output_tokens_per_s']:.0f} | {_num(s['ttft_p90_ms'], 1)} | "
                         f"{_num(s['tpot_p90_ms'], 2)} | {_num(s['e2e_p90_ms'], 0)} | {s['failed']} | "
                         f"{(run.get('placement') or {}).get('version', '-')} | {_num(step['step_ms'], 1)} | "
                         f"{_num(step['moe_predicted_ms'], 2)} | {loads} |")
    lines += ["", "Attainment interval: Wilson 95% interval over the run's requests (the run's own sampling "
              "uncertainty only, not the host's noise between runs). Mean step: the engine's step-time histogram over the run; MoE critical path: as predicted by the "
              "coordinator from its statistics window (see below). Differences in the mean step beyond the "
              "differences in the MoE critical path are the host's (the load average is the whole "
              "machine's one-minute average, this benchmark's processes included)."]
    runs = [(policy, run) for policy, entry in result["policies"].items()
            for run in entry["runs"] + ([entry["at_eplb_frontier"]] if entry.get("at_eplb_frontier") else [])]
    lags = [run["send_lag_ms"]["p99"] for _, run in runs if (run.get("send_lag_ms") or {}).get("p99") is not None]
    if lags:
        lines += ["", f"Client send lag (scheduled arrival to send, this benchmark's own event loop): P99 at most "
                  f"{max(lags):.1f} ms over the runs (median of the runs' P99s {float(np.median(lags)):.1f} ms), "
                  "charged to the requests' TTFT and E2E, which run from the scheduled arrival (no coordinated "
                  "omission); a lag near the TTFT SLO would mean the client, not the service, missed it. Goodput is "
                  "per second of the trace's arrival window, throughput per second of the run's wall time."]
    if noted := [f"- {policy} at {run['rate_rps']:.3f} req/s ({run['kind']}): {note}"
                 for policy, run in runs for note in run.get("notes") or []]:
        lines += ["", "Notes on some runs (what could not be observed after the run, or an engine still busy when "
                  "the next run on that app began; the requests were measured as usual):", *noted]
    return "\n".join(lines)


def _breakdown(rows: dict[str, dict]) -> str:
    lines = ["## Where the step time goes (at eplb's frontier rate)", "",
             "| policy | engine steps | mean step (ms) | MoE critical path (ms/pass) | MoE perfectly balanced "
             "(ms/pass) | balance headroom (ms, share of step) | rest of the step (ms) |", "|---|---|---|---|---|---|---|"]
    for policy, r in rows.items():
        lines.append(f"| {policy} | {_num(r['steps'], 0)} | {_num(r['step_ms'], 2)} | {_num(r['moe_predicted_ms'], 2)} | "
                     f"{_num(r['moe_balanced_ms'], 2)} | {_num(r['balance_headroom_ms'], 2)} "
                     f"({_pct(r['headroom_share'])}) | {_num(r['rest_ms'], 2)} |")
    lines += ["", "Mean step: the engine's step-time histogram on /metrics over the run. MoE critical path: sum over "
              "MoE layers of the slowest device's expected time per forward pass, from the statistics window's "
              "mean loads and each expert's share of passes with tokens (/admin/placement; predicted by the "
              "coordinator's online-refined device models). Perfectly "
              "balanced: the same device work spread evenly (sum of the mean device times). Their difference, "
              "the balance headroom, bounds what any placement can save per step; the rest of the step (dense "
              "layers, dispatch to the workers, scheduling, sampling, all on the shared CPUs) no placement "
              "changes."]
    return "\n".join(lines)


def _knobs(result: dict) -> str:
    lines = ["## Service knobs per policy (build_app arguments)", ""]
    keys = ("policy", "num_redundant", "slot_budget", "auto_recalibrate", "max_num_seqs", "max_num_batched_tokens")
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for entry in result["policies"].values():
        args = entry["app_args"]
        lines.append("| " + " | ".join(str(args.get(k, "default")) for k in keys) + " |")
    if result["config"].get("deploy_apart"):
        if any("at_eplb_frontier" in entry for entry in result["policies"].values()):
            turn = "its sweep and its run at eplb's frontier rate (eplb first)"
        else:
            why = ("its frontier was 0" if "eplb" in result["policies"] else
                   "it failed" if "eplb" in result.get("failed_policies", {}) else "it was not among the policies")
            turn = f"its sweep (no run at eplb's frontier rate: {why})"
        lines += ["", "Each app was deployed alone, twice, and deleted after each turn: once for its warm-up and "
                  f"unloaded latency, once for its warm-up, {turn}; "
                  f"{result.get('startup_s', 0):.0f} s per start on average (profiling pass and calibration "
                  "included). Each policy was loaded in its own stretch of time with the same trace; the load "
                  "average before and after each run is in compare.json (`loadavg`)."]
        return "\n".join(lines)
    loading = ("then were loaded at the same time with the same trace, sharing the host's cores"
               if result["config"].get("together", True) else
               "then were loaded one at a time with the same trace, the order rotated from rate to rate; the load "
               "average before and after each app's turn is in compare.json (`loadavg`)")
    lines += ["", f"All apps started together in one Ray cluster in {result.get('startup_s', 0):.0f} s (profiling "
              f"pass and calibration included), {loading}."]
    return "\n".join(lines)


def _drift(drift: dict) -> str:
    from load_tests.drift import MODES, verdicts

    cfg = drift["config"]
    scenarios = drift["scenarios"]
    scheduled = bool(scenarios) and all("first_after_switch" in entry for entry in scenarios.values())
    split = ("Numbers for the requests scheduled to arrive from the switch on" if scheduled else
             "Numbers for the requests sent from the switch on (this drift.json predates recording which requests "
             "were scheduled from the switch on)")
    lines = ["## Drift scenarios (policy vibe, static vs adaptive, same trace)", "",
             f"Static and adaptive apps loaded at the same time with the same trace, {drift.get('rate_rps', 0):.3f} req/s "
             f"each ({cfg['rate_multiplier']:g} x the single-stream rate unless set), {cfg['duration_s']:g} s of "
             f"arrivals; SLOs TTFT <= {drift['slo']['ttft_s'] * 1e3:.0f} ms, TPOT <= {drift['slo']['tpot_s'] * 1e3:.0f} "
             "ms from the drift apps' own unloaded latency (two apps at once). Workload: prose (sharegpt_like, sonnet_like) -> code "
             f"at {cfg['switch_s']:g} s. Device: device {cfg['throttled_device']} throttles to "
             f"{cfg['throttle_to']:g}x of its speed at {cfg['switch_s']:g} s (emulator speed control, both apps "
             f"at once). {split}; plot: drift.png.", "",
             "| scenario | static attainment | adaptive attainment | static TTFT p90 (ms) | adaptive TTFT p90 (ms) "
             "| static TPOT p90 (ms) | adaptive TPOT p90 (ms) | adaptive recalibrations from the switch (applied / "
             "judged, by cause; whole trace) | adaptive wins (paired 5% two-sided tests after the switch; the same "
             "before it; difference in differences) |",
             "|---|---|---|---|---|---|---|---|---|"]
    found = verdicts(drift)
    for scenario, entry in scenarios.items():
        v = found.get(scenario)
        if v is None:  # a scenario without an after-switch segment in both apps: said, not left out
            missing = [f"no {m} run" if m not in entry else f"{m} has no requests from the switch on" for m in MODES
                       if not (entry.get(m) or {}).get("segments", {}).get("after")]
            lines.append(f"| {scenario} | - | - | - | - | - | - | - | not judged: {'; '.join(missing)} |")
            continue
        causes = ", ".join(f"{c} {v['recalibrations_applied_adaptive_by_cause'][c]} / "
                           f"{v['recalibrations_adaptive_by_cause'][c]}"
                           for c in v["recalibrations_adaptive_by_cause"]
                           if c == v.get("cause") or v["recalibrations_adaptive_by_cause"][c])
        lines.append(f"| {scenario} | {v['static_attainment']:.3f} | {v['adaptive_attainment']:.3f} | "
                     f"{_num(v['static_ttft_p90_ms'], 1)} | {_num(v['adaptive_ttft_p90_ms'], 1)} | "
                     f"{_num(v['static_tpot_p90_ms'], 2)} | {_num(v['adaptive_tpot_p90_ms'], 2)} | "
                     f"{v['recalibrations_applied_adaptive']} / {v['recalibrations_adaptive']}"
                     f"{f' ({causes})' if causes else ''}; "
                     f"{v['recalibrations_applied_adaptive_whole_run']} / {v['recalibrations_adaptive_whole_run']} | "
                     f"{_drift_verdict(v)} |")
    lines += ["", "Tests pair each request of the trace with itself in the other app (same prompt, sent at the same moment "
              "on the same machine): attainment by McNemar's test on the requests only one app served within "
              "the SLO, TTFT by Wilcoxon's signed-rank test on each request's adaptive minus static TTFT (a failure "
              "slower than any TTFT); the median of those differences is given over the pairs both completed. "
              "Requests close in time share the machine's load, so both tests are sign-flip tests over blocks of "
              "consecutive pairs (the cube root of their number, rounded up), not over single pairs: a stretch of "
              "requests one load spike slowed in one app counts once. The same tests run on the requests before the "
              "switch: a difference already there is not the drift's doing. Where they find one in the direction of "
              "the after-switch verdict, that verdict stands only if the difference in differences (the per-pair TTFT "
              "differences after the switch against those before it: pooled ranks, mean rank per block, a "
              "permutation test of the blocks between the two windows) is significant in its direction; else it is "
              "within noise. A scenario whose scheduled event (the throttle) failed in either app is invalid. "
              "Exercised: the adaptive app applied at least one re-plan of the scenario's own cause (a workload "
              "drift, a device drift) from the switch on; a scenario that was not exercised says nothing about "
              "re-planning for its drift."]
    lines += [f"\nNote: {note}" for note in drift.get("notes") or []]
    return "\n".join(lines)


def _drift_verdict(v: dict) -> str:
    """yes / no (within noise) / no (worse) / invalid, with the tests that decided it, the same tests before the
    switch, the difference in differences, why (`reason`) and whether the scenario's own re-plan happened."""
    said = {"win": "yes", "loss": "no (worse)", "within noise": "no (within noise)",
            "invalid": "invalid (neither win nor loss)"}[v["verdict"]]
    parts = [said, _window_tests(v), "before the switch: " + _window_tests(v, "before_")]
    if v["did_ttft_p"] is not None:
        parts.append(f"difference in differences TTFT p={v['did_ttft_p']:.3f} (blocks of {v['did_block']})")
    if v.get("reason"):
        parts.append(v["reason"])
    if v.get("exercised") is False:
        parts.append(f"not exercised: no {v['cause'].replace(' ', '-')} re-plan applied after the switch")
    return "; ".join(parts)


def _window_tests(v: dict, window: str = "") -> str:
    """One window's paired tests as `_drift_verdict` says them (``window``: the keys' prefix, "before_" or none)."""
    tests = [f"{v[window + 'pairs']} pairs in blocks of {v[window + 'block']}",
             f"attainment p={v[window + 'attainment_p']:.2f}"]
    if v[window + "ttft_p"] is not None:
        tests.append(f"TTFT p={v[window + 'ttft_p']:.3f}")
    if v[window + "median_ttft_difference_ms"] is not None:
        tests.append(f"median TTFT difference {v[window + 'median_ttft_difference_ms']:+.1f} ms")
    return ", ".join(tests)


def _headroom(headroom: dict) -> str:
    from load_tests.headroom import best_gain

    rows, cfg = headroom["rows"], headroom["config"]
    served = rows[0]["model"]
    lines = ["## What placement can gain at most here (placement simulator, `python -m load_tests.headroom`)", "",
             f"Engine steps of the served model ({served}) with router loads drawn step by step from its profile, on "
             "this cluster's devices at their sustained-load speed (speed x throttle floor), each policy placed as "
             f"the coordinator places it, on a statistics window of {cfg.get('window', 100)} other steps of that "
             "shape (their mean loads; vibe also weighs each expert's share of steps with tokens), with the devices' "
             "true curves; 'vibe, mean loads': vibe planned on the mean loads alone. MoE critical "
             f"path per step (sum over layers of the slowest device), mean of {cfg['steps']} steps. Dense layers, "
             "dispatch and queueing left out, so eplb / vibe bounds the step-time ratio even if MoE were the whole "
             f"step. Cluster 'edge': the same devices with the slowest throttling to {cfg.get('edge_floor', 0.7):g} "
             "of its speed (the issue's limit). DeepSeek-V3 (real routing trace, 256 experts, top-8, first "
             f"{cfg['deepseek_layers']} MoE layers) on the same 8 devices, 32 experts per device as in the paper, "
             f"for comparison. Redundant: {cfg['num_redundant']} extra slots for both; budget: vibe with uneven "
             "counts, at most as many slots per device as eplb with the redundant slots, against eplb's better "
             "layout (with or without them); best: each policy's best of its layouts.", "",
             "| model | cluster | step | tokens per expert | contiguous (ms) | eplb (ms) | vibe (ms) | eplb / vibe | "
             "eplb / vibe, mean loads | contiguous / vibe | eplb / vibe, redundant | eplb / vibe, budget | "
             "best eplb / best vibe |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["moe_ms"]
        lines.append(f"| {r['model']} | {r.get('cluster', 'deploy')} | {r['step']} | {r['mean_tokens_per_expert']:.1f} | "
                     f"{ms['contiguous']:.2f} | {ms['eplb']:.2f} | {ms['vibe']:.2f} | {r['eplb_over_vibe']:.3f} | "
                     f"{_num(r.get('eplb_over_vibe_mean'), 3)} | "
                     f"{r['contiguous_over_vibe']:.3f} | {_num(r.get('eplb_over_vibe_redundant'), 3)} | "
                     f"{_num(r.get('eplb_over_vibe_budget'), 3)} | {_num(r.get('best_eplb_over_best_vibe'), 3)} |")
    clusters = {r.get("cluster", "deploy") for r in rows if r["model"] == served}
    others = [f"{best_gain(headroom, served, 'edge'):.3f}x on the edge cluster"] if "edge" in clusters else []
    if any(r["model"] == "DeepSeek-V3" for r in rows):
        others.append(f"{best_gain(headroom, 'DeepSeek-V3'):.3f}x for DeepSeek-V3")
    lines += ["", f"eplb's MoE time is at most {best_gain(headroom):.3f}x vibe's for {served} on this "
              "cluster over these step shapes" + (f" ({'; '.join(others)})" if others else "")
              + ". A frontier ratio well beyond that is not the placement's doing; the 1.15x target needs a cluster "
              "or model where placement has more to act on (more experts per device, more variability)."]
    if headroom.get("drift"):
        lines += ["", "Drift scenarios, the same way: vibe planned for the state before the drift (static) against "
                  "vibe planned for the state after it (what an adaptive recalibration can reach), MoE critical "
                  "path on steps of the state after it. Workload: prose prompts (sharegpt_like, sonnet_like) -> "
                  "code, router loads from the served model's prefill of the shipped prompts; device: device 0 "
                  "throttled to 0.8x; load: the same routing, planned for steps of fewer sequences (the batch "
                  "size changed: no cosine drift, only the router load per pass).", "",
                  "| scenario | step | static planned for | static (ms) | re-planned (ms) | static / re-planned |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['scenario']} | {r['step']} | {r.get('planned_for', r['step'])} | {r['static_ms']:.2f} | "
                  f"{r['adaptive_ms']:.2f} | {r['static_over_adaptive']:.3f} |" for r in headroom["drift"]]
    return "\n".join(lines)


def _scale(scale: dict) -> str:
    lines = ["## Scale study (placement simulator, DeepSeek-V3 trace, 256 experts)", "",
             "sum_l makespan / proven lower bound (1.0 = optimal); gain = 1 - T / T(eplb, no redundant "
             "experts). Each placement is scored on the loads and the device curves it was planned on (in sample: "
             "vibe optimises this very objective, so its gains here are upper bounds; the headroom study "
             "scores placements on steps drawn apart from their planning window). Plot: scale.png.", "",
             "| profile | tokens/expert | G | eplb even | vibe even | eplb redundant | vibe redundant | "
             "vibe uneven | vibe redundant+uneven | vibe redundant+uneven gain |", "|---|---|---|---|---|---|---|---|---|---|"]
    cases = dict.fromkeys((r["profile"], r["tokens_per_expert"], r["num_devices"]) for r in scale["rows"])
    for profile, tokens, g in cases:
        pick = {(r["policy"], r["variant"]): r for r in scale["rows"]
                if (r["profile"], r["tokens_per_expert"], r["num_devices"]) == (profile, tokens, g)}
        cells = [_num(pick[k]["bound_ratio"], 3) if k in pick else "-" for k in (
            ("eplb", "even"), ("vibe", "even"), ("eplb", "redundant"), ("vibe", "redundant"), ("vibe", "uneven"),
            ("vibe", "redundant_uneven"))]
        gain = pick.get(("vibe", "redundant_uneven"), {}).get("gain_vs_eplb_even")
        lines.append(f"| {profile} | {tokens:g} | {g} | " + " | ".join(cells) + f" | {_pct(gain)} |")
    return "\n".join(lines)


def _interval(met: int, requests: int) -> str:
    """' (low-high)': the Wilson 95% interval of an attainment of met / requests; '' without requests."""
    from scipy.stats import binomtest

    if not requests:
        return ""
    ci = binomtest(met, requests).proportion_ci(confidence_level=0.95, method="wilson")
    return f" ({ci.low:.2f}-{ci.high:.2f})"


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _loads(machine: dict) -> str:
    start, end = machine.get("loadavg_start"), machine.get("loadavg_end")
    fmt = lambda la: "/".join(f"{x:.1f}" for x in la) if la else "?"  # noqa: E731
    return f"{fmt(start)} at the start, {fmt(end)} at the end"


def main(argv: list[str] | None = None) -> int:
    """Rewrite `<out>/report.md` and the plots from the JSON a `make bench` run left in `<out>`."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m load_tests.report", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench"))
    args = parser.parse_args(argv)
    result = json.loads((args.out / "compare.json").read_text())
    extras = {name: json.loads(path.read_text()) for name in ("drift", "scale", "headroom")
              if (path := args.out / f"{name}.json").exists()}
    for line in write(args.out, result, **extras):
        print(line)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
