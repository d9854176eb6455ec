"""PNG plots of the load tests (matplotlib, Agg): SLO frontier, latency, balance, drift timeline, scale study.

Owns drawing only: every function takes the JSON-ready results the other modules wrote and a path.
Ignores what the numbers mean (see `slo`, `report`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from load_tests.compare import results_from_json  # noqa: E402
from load_tests.generator import offered_rate  # noqa: E402
from load_tests.slo import SLO  # noqa: E402

COLORS = {"contiguous": "tab:gray", "eplb": "tab:blue", "vibe": "tab:red", "static": "tab:blue",
          "adaptive": "tab:red"}


def slo_frontier(result: dict, rows: dict[str, dict], path: Path) -> None:
    """Attainment, goodput and P90 TTFT against the request rate per policy, frontiers marked."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    target = result["slo"]["target"]
    for policy, entry in result["policies"].items():
        runs = sorted(entry["runs"], key=lambda r: r["rate_rps"])
        rates = [offered_rate(r["rate_rps"], result["config"]["duration_s"]) for r in runs]  # (the frontier's scale)
        color = COLORS.get(policy)
        axes[0].plot(rates, [r["summary"]["attainment"] for r in runs], "o-", color=color, label=policy)
        axes[0].axvline(rows[policy]["frontier_rps"], color=color, linestyle=":", linewidth=1)
        axes[1].plot(rates, [r["summary"]["goodput_rps"] for r in runs], "o-", color=color, label=policy)
        axes[2].plot(rates, [r["summary"]["ttft_p90_ms"] or np.nan for r in runs], "o-", color=color, label=policy)
    axes[0].axhline(target, color="black", linewidth=0.8)
    axes[0].set(xlabel="request rate offered (req/s)", ylabel="SLO attainment", ylim=(0, 1.02),
                title=f"SLO attainment (dotted: frontier at {target:.0%})")
    axes[1].set(xlabel="request rate offered (req/s)", ylabel="requests within SLO per second", title="goodput")
    axes[2].axhline(result["slo"]["ttft_s"] * 1e3, color="black", linewidth=0.8)
    axes[2].set(xlabel="request rate offered (req/s)", ylabel="ms", yscale="log", title="P90 TTFT (line: TTFT SLO)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def latency(result: dict, rows: dict[str, dict], slo: SLO, path: Path) -> None:
    """CDFs of TTFT and TPOT, and P50/P90/P99 bars, per policy at eplb's frontier rate."""
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    bars = {}
    for policy, entry in result["policies"].items():
        run = entry.get("at_eplb_frontier")
        if run is None:
            continue
        # shares of all the run's requests: a failed one never reaches 1 (the curves of a policy that failed
        # requests end below 1 instead of looking as good as one that served them all)
        sent = results_from_json(run)
        results = [r for r in sent if r.error is None]
        for ax, values, total in ((axes[0], [r.ttft_s for r in results], len(sent)),
                                  (axes[1], [r.tpot_s for r in results if r.tpot_s is not None],
                                   len(sent) - sum(r.error is None and r.tpot_s is None for r in sent))):
            x = np.sort(np.asarray(values) * 1e3)
            ax.plot(x, np.arange(1, x.size + 1) / max(total, 1), color=COLORS.get(policy), label=policy)
        bars[policy] = rows[policy]
    axes[0].axvline(slo.ttft_s * 1e3, color="black", linewidth=0.8)
    axes[1].axvline(slo.tpot_s * 1e3, color="black", linewidth=0.8)
    rate = next((r["rate_rps"] for r in bars.values()), None)
    axes[0].set(xlabel="TTFT (ms)", ylabel="share of all requests (failed: never)", xscale="log", title=f"TTFT CDF at {rate or 0:.2f} req/s")
    axes[1].set(xlabel="TPOT (ms)", ylabel="share of all requests (failed: never)", title="TPOT CDF (line: SLO)")
    for ax, metric in ((axes[2], "ttft"), (axes[3], "tpot")):
        _percentile_bars(ax, bars, metric)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:  # no policy ran at eplb's frontier rate (eplb found none): said, not an empty legend
            ax.text(0.5, 0.5, "no run at eplb's frontier rate", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)


def _percentile_bars(ax, rows: dict[str, dict], metric: str) -> None:
    quantiles = ("p50", "p90", "p99")
    width = 0.8 / max(len(rows), 1)
    for i, (policy, row) in enumerate(rows.items()):
        values = [np.nan if row[f"{metric}_{q}_ms"] is None else row[f"{metric}_{q}_ms"] for q in quantiles]  # no
        # bar, not a 0 ms one, for a policy that completed no request there
        ax.bar(np.arange(3) + i * width, values, width, color=COLORS.get(policy), label=policy)
    ax.set_xticks(np.arange(3) + width * (len(rows) - 1) / 2, quantiles)
    ax.set(ylabel="ms", title=f"{metric.upper()} percentiles at eplb's frontier rate")


def balance(result: dict, rows: dict[str, dict], path: Path) -> None:
    """Mean predicted per-layer imbalance over time through every run, and mean imbalance / barrier idle."""
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    for policy, entry in result["policies"].items():
        runs = entry["runs"] + ([entry["at_eplb_frontier"]] if entry.get("at_eplb_frontier") else [])
        offset, times, values = 0.0, [], []
        for run in runs:
            polls = [p for p in run["polls"] if p.get("imbalance_per_layer")]
            times += [offset + p["t"] for p in polls]
            values += [float(np.mean(p["imbalance_per_layer"])) for p in polls]
            axes[0].axvline(offset, color="lightgray", linewidth=0.6)
            offset += run["duration_s"]
        axes[0].plot(times, values, color=COLORS.get(policy), label=policy, linewidth=1)
    axes[0].set(xlabel="seconds of load (runs back to back, grey lines: run starts; the swept rates ascending, "
                       "then the run at eplb's frontier rate)",
                ylabel="mean over layers of max/mean", title="predicted per-layer imbalance (/admin/stats)")
    names = list(rows)
    for ax, key, title in ((axes[1], "mean_imbalance", "mean imbalance at eplb's frontier rate"),
                           (axes[2], "barrier_idle", "barrier idle (1 - mean/max) at eplb's frontier rate")):
        ax.bar(names, [rows[p][key] or 0.0 for p in names], color=[COLORS.get(p) for p in names])
        ax.set(title=title)
    axes[1].set_ylim(bottom=1.0)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    _save(fig, path)


def drift_timeline(result: dict, path: Path) -> None:
    """Per scenario: TTFT of every request by send time (static and adaptive), a rolling P90 of those with one,
    the failed requests (an error: failed, timed out, cut off, with or without a TTFT) as crosses along the top of
    the axis (so a stretch of timeouts does not read as a stretch of good latency), the switch, and each app's
    recalibrations (solid: applied, dotted: other outcomes)."""
    from matplotlib.transforms import blended_transform_factory

    scenarios = result["scenarios"]
    duration = result["config"]["duration_s"]
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(14, 4.5 * len(scenarios)), squeeze=False)
    for ax, (scenario, entry) in zip(axes[:, 0], scenarios.items()):
        top = blended_transform_factory(ax.transData, ax.transAxes)  # x: send time, y: share of the axis
        for row, mode in enumerate(("static", "adaptive")):
            run = entry.get(mode)
            if run is None:  # (a scenario that ended before this app's run: the report says so)
                continue
            results = results_from_json(run)
            done = [r for r in results if r.ttft_s is not None]
            sent = np.array([r.sent_s for r in done])
            ttft = np.array([r.ttft_s for r in done]) * 1e3
            color = COLORS.get(mode)
            ax.scatter(sent, ttft, s=6, alpha=0.35, color=color)
            centers, p90 = _rolling_p90(sent, ttft, duration)
            ax.plot(centers, p90, color=color, label=f"{mode}: rolling P90 (10 s, requests with a TTFT)")
            failed = [r.sent_s for r in results if r.ttft_s is None or r.error is not None]
            if failed:
                ax.scatter(failed, [0.97 - 0.03 * row] * len(failed), marker="x", s=24, color=color,
                           transform=top, clip_on=False, label=f"{mode}: failed or timed out ({len(failed)})")
            for event in run["recalibrations"]:
                at = event["started_at"] - run["started_wall"]
                if 0 <= at <= run["duration_s"]:
                    ax.axvline(at, color=color, linewidth=0.8, linestyle="-" if event["status"] == "applied" else ":")
        ax.axvline(result["config"]["switch_s"], color="black", linewidth=1.5, label="drift starts")
        if "slo" in result:
            ax.axhline(result["slo"]["ttft_s"] * 1e3, color="green", linewidth=0.8, label="TTFT SLO")
        ax.set(yscale="log", xlabel="seconds into the trace (send time)", ylabel="TTFT (ms)",
               title=f"{scenario} drift: TTFT over time (thin lines: recalibrations of the app of that colour)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def _rolling_p90(sent: np.ndarray, values: np.ndarray, duration_s: float, window_s: float = 10.0):
    centers = np.arange(window_s / 2, duration_s, 2.0)
    p90 = [np.percentile(values[np.abs(sent - c) <= window_s / 2], 90) if np.any(np.abs(sent - c) <= window_s / 2)
           else np.nan for c in centers]
    return centers, np.asarray(p90)


def scale_study(rows: list[dict], path: Path) -> None:
    """Per case: sum_l makespan over the bound against G for every (policy, variant); and vibe's gain over
    eplb with the same number of redundant slots (eplb always keeps even counts)."""
    cases = list(dict.fromkeys((r["profile"], r["tokens_per_expert"]) for r in rows))
    fig, axes = plt.subplots(2, len(cases), figsize=(5.5 * len(cases), 9), squeeze=False)
    for column, (profile, tokens) in enumerate(cases):
        mine = [r for r in rows if (r["profile"], r["tokens_per_expert"]) == (profile, tokens)]
        for line in dict.fromkeys((r["policy"], r["variant"]) for r in mine):
            pts = [r for r in mine if (r["policy"], r["variant"]) == line]
            style = "--" if line[0] == "eplb" else "-"
            g = [r["num_devices"] for r in pts]
            axes[0, column].plot(g, [r["bound_ratio"] for r in pts], style, marker="o", label=" ".join(line))
            if line[0] == "vibe":
                axes[1, column].plot(g, [100 * r["gain_vs_eplb"] for r in pts], marker="o", label=" ".join(line))
        regime = "prefill-like" if tokens > 128 else "decode-like"
        axes[0, column].set(yscale="log", xlabel="devices", ylabel="sum makespan / lower bound",
                            title=f"{profile}, {tokens:g} tokens/expert ({regime})")
        axes[1, column].set(xlabel="devices", ylabel="% less sum makespan than eplb",
                            title="vibe's gain over eplb with the same redundant slots")
        for ax in axes[:, column]:
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
