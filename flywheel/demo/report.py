"""What `flywheel demo --report DIR` writes: accuracy.png, summary.md, summary.json.

The numbers come from the simulated app's own trace (what it was served, what the frozen
initial model would have said on the same rows), the learner's candidates and the
training store (which correction became which example), so the report checks the loop
from outside rather than trusting any one component's view of itself.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.demo.loop import Trace

# Accuracy "after the drift" is read over the last part of the stream, once the loop has
# had time to turn; the whole post-drift average is reported too.
SETTLED_SHARE = 0.25
RECOVERY_MARGIN = 0.15  # the flywheel must beat the frozen model by this much, settled


def rolling(values: list[int], window: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) == 0:
        return arr
    c = np.cumsum(np.insert(arr, 0, 0.0))
    n = np.minimum(np.arange(1, len(arr) + 1), window)
    return (c[1:] - c[np.maximum(np.arange(1, len(arr) + 1) - window, 0)]) / n


def freshness(
    trace: Trace, learned_by: dict[str, int], promoted: list[tuple[str, int]]
) -> list[float]:
    """Seconds from sending a correction to serving the first version trained on it.

    `learned_by` maps a corrected prediction id to the example id it became (train split
    only); `promoted` is (version, last example id it was trained through), in order.
    """
    served = trace.first_served()
    out = []
    for pid, example_id in learned_by.items():
        sent = trace.corrected_at.get(pid)
        if sent is None:
            continue
        for version, last_id in promoted:
            if last_id >= example_id and version in served:
                out.append(max(0.0, served[version] - sent))
                break
    return out


def _mean(values: Iterable[int]) -> float | None:
    values = list(values)
    return round(float(np.mean(values)), 4) if values else None


def summarize(
    trace: Trace, *, candidates: list[dict[str, Any]], fresh: list[float], elapsed_s: float
) -> dict[str, Any]:
    d = trace.drift_index
    after_ok, after_frozen = trace.ok[d:], trace.ok_frozen[d:]
    settled = max(1, int(len(after_ok) * SETTLED_SHARE))
    promoted = [c["version"] for c in candidates if c["promoted"]]
    summary: dict[str, Any] = {
        "requests": len(trace.ok),
        "drift_at_request": d,
        "accuracy_flywheel_before_drift": _mean(trace.ok[:d]),
        "accuracy_frozen_before_drift": _mean(trace.ok_frozen[:d]),
        "accuracy_flywheel_after_drift": _mean(after_ok[-settled:]),
        "accuracy_frozen_after_drift": _mean(after_frozen[-settled:]),
        "accuracy_flywheel_after_drift_all": _mean(after_ok),
        "accuracy_frozen_after_drift_all": _mean(after_frozen),
        "promoted_versions": promoted,
        "versions_served": sorted(set(trace.version), key=lambda v: int(v)),
        "candidates": candidates,
        "freshness_median_s": round(statistics.median(fresh), 2) if fresh else None,
        "freshness_p95_s": round(float(np.percentile(fresh, 95)), 2) if fresh else None,
        "freshness_samples": len(fresh),
        "elapsed_s": round(elapsed_s, 1),
    }
    fly, frozen = summary["accuracy_flywheel_after_drift"], summary["accuracy_frozen_after_drift"]
    summary["recovered"] = (
        bool(promoted)
        and fly is not None
        and frozen is not None
        and fly >= frozen + RECOVERY_MARGIN
    )
    return summary


def privacy_summary(
    candidates: list[dict[str, Any]],
    enabled: bool,
    budget: float,
    delta: float,
    last: int = 5,
    mechanism: str = "dp-sgd",
) -> dict[str, Any]:
    """ε spent, and the last candidates' accuracy with DP next to the same run without it
    (the learner's non-private shadow, trained on the same examples with the same drift
    response), on the gate's recent and trusted holdouts: the cost of privacy, measured
    on this run; and what the budget means for one person, in plain words."""
    from flywheel.privacy import epsilon_in_words

    if not enabled:
        return {"enabled": False}
    numbers = [c["privacy"] for c in candidates if c.get("privacy")]
    tail = [
        n
        for n in numbers[-last:]
        if n.get("recent_accuracy") is not None and n.get("nonprivate_recent_accuracy") is not None
    ]
    dp = _mean_float([n["recent_accuracy"] for n in tail])
    plain = _mean_float([n["nonprivate_recent_accuracy"] for n in tail])
    trusted = [n for n in numbers[-last:] if n.get("trusted_accuracy") is not None]
    dp_trusted = _mean_float([n["trusted_accuracy"] for n in trusted])
    plain_trusted = _mean_float([n["nonprivate_trusted_accuracy"] for n in trusted])
    return {
        "enabled": True,
        "mechanism": mechanism,
        "budget_epsilon": budget,
        "delta": delta,
        "epsilon_spent": round(max((n["epsilon"] for n in numbers), default=0.0), 4),
        "recent_accuracy_dp": dp,
        "recent_accuracy_without_dp": plain,
        "recent_gap_points": _gap(plain, dp),
        "trusted_accuracy_dp": dp_trusted,
        "trusted_accuracy_without_dp": plain_trusted,
        "trusted_gap_points": _gap(plain_trusted, dp_trusted),
        "candidates_compared": len(tail),
        "meaning": epsilon_in_words(budget, delta),
    }


def pct(v: float | None) -> str:
    """An accuracy for the summaries: `97.5%`, or `n/a`."""
    return "n/a" if v is None else f"{v:.1%}"


def _gap(plain: float | None, dp: float | None) -> float | None:
    """Points lost to DP (positive: DP is worse)."""
    return None if plain is None or dp is None else round(100 * (plain - dp), 2)


@contextmanager
def saved_figure(path: Path, size: tuple[float, float] = (10, 4.5)) -> Iterator[Any]:
    """A matplotlib figure and axes (headless backend) saved to `path` and closed after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def _mean_float(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def plot_accuracy(trace: Trace, path: Path, window: int = 300) -> None:
    t = np.asarray(trace.t)
    with saved_figure(path) as (_fig, ax):
        _draw_accuracy(ax, trace, t, window)


def _draw_accuracy(ax: Any, trace: Trace, t: np.ndarray, window: int) -> None:
    ax.plot(t, rolling(trace.ok, window), label="flywheel (served)", color="tab:blue")
    ax.plot(
        t,
        rolling(trace.ok_frozen, window),
        label="frozen initial model",
        color="tab:gray",
        linestyle="--",
    )
    ax.axvline(trace.drift_t, color="tab:red", linewidth=2, label="concept change")
    first = True
    for version, at in list(trace.first_served().items())[1:]:  # [0]: the initial model
        ax.axvline(
            at,
            color="tab:green",
            alpha=0.5,
            linewidth=1,
            label="new version served" if first else None,
        )
        ax.annotate(f"v{version}", (at, 0.02), rotation=90, fontsize=7, color="tab:green")
        first = False
    ax.set_xlabel("seconds since the app started")
    ax.set_ylabel(f"rolling accuracy ({window} requests)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title("Flywheel vs a frozen model across an abrupt change")


def write_report(directory: Path, summary: dict[str, Any], trace: Trace) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    plot_accuracy(trace, directory / "accuracy.png")
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (directory / "summary.md").write_text(markdown(summary))


def _privacy_lines(p: dict[str, Any] | None) -> list[str]:
    if not p:
        return []
    if not p.get("enabled"):
        return ["Privacy: DP off (`FLYWHEEL_PRIVACY_ENABLED=false`).", ""]

    def gap(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f} points"

    name = {"dp-sgd": "DP-SGD", "dp-ftrl": "DP-FTRL (tree aggregation)"}
    lines = [
        f"Privacy: every update {name.get(p.get('mechanism', 'dp-sgd'), p.get('mechanism'))}, "
        f"ε spent {p['epsilon_spent']} of {p['budget_epsilon']} per data subject "
        f"(δ={p['delta']:g}).",
        "",
        f"The cost of privacy on this run (the last {p['candidates_compared']} candidates "
        "against the learner's non-private shadow: the same examples, the same drift "
        "response, no noise):",
        "",
        "| holdout | with DP | same run without DP | lost to DP |",
        "| --- | --- | --- | --- |",
        f"| recent | {pct(p['recent_accuracy_dp'])} | {pct(p['recent_accuracy_without_dp'])} "
        f"| {gap(p.get('recent_gap_points'))} |",
    ]
    if p.get("trusted_accuracy_dp") is not None:
        lines.append(
            f"| trusted | {pct(p['trusted_accuracy_dp'])} | "
            f"{pct(p['trusted_accuracy_without_dp'])} | {gap(p.get('trusted_gap_points'))} |"
        )
    if p.get("meaning"):
        lines += ["", f"What the budget means for one person: {p['meaning']}"]
    return [*lines, ""]


def _data_lines(s: dict[str, Any]) -> list[str]:
    """Which data the run used (absent in summaries written before the demo read files)."""
    if "data" not in s:
        return []
    features = s.get("features") or []
    return [
        f"Data: {s['data']}; `init` imported {s['trusted_file']}, the app streamed "
        f"{s['stream_file']} ({s['stream_rows']} rows from {s['live_rows']} live rows) by "
        f"name: {len(features)} features ({', '.join(features)}), label `{s['label']}` "
        f"({', '.join(s.get('labels') or [])}). Drift: {s['drift']}.",
        "",
    ]


def markdown(s: dict[str, Any]) -> str:
    lines = [
        "# Flywheel demo",
        "",
        f"{s['requests']} requests, abrupt concept change at request {s['drift_at_request']}; "
        f"ran {s['elapsed_s']} s. Loop closed: **{'yes' if s['recovered'] else 'NO'}**.",
        "",
        *_data_lines(s),
        "![accuracy](accuracy.png)",
        "",
        "| accuracy | flywheel | frozen initial model |",
        "| --- | --- | --- |",
        f"| before the drift | {pct(s['accuracy_flywheel_before_drift'])} | "
        f"{pct(s['accuracy_frozen_before_drift'])} |",
        f"| after the drift (last {SETTLED_SHARE:.0%} of it) | "
        f"{pct(s['accuracy_flywheel_after_drift'])} | {pct(s['accuracy_frozen_after_drift'])} |",
        f"| after the drift (all of it) | {pct(s['accuracy_flywheel_after_drift_all'])} | "
        f"{pct(s['accuracy_frozen_after_drift_all'])} |",
        "",
        f"Freshness (correction sent → a model trained on it served): median "
        f"{s['freshness_median_s']} s, p95 {s['freshness_p95_s']} s "
        f"over {s['freshness_samples']} corrections.",
        "",
        *_privacy_lines(s.get("privacy")),
        "## Versions and gate decisions",
        "",
        "| version | parent | examples | lr | promoted | recent: DP / without DP | gate |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in s["candidates"]:
        lines.append(
            f"| v{c['version']} | v{c['parent_version']} | {c['examples']} | "
            f"{c['lr']:.4g} | {'yes' if c['promoted'] else 'no'} | {_versus(c)} | {c['gate']} |"
        )
    if not s["candidates"]:
        lines.append("| (none) | | | | | | |")
    return "\n".join(lines) + "\n"


def _versus(candidate: dict[str, Any]) -> str:
    """This candidate's recent-holdout accuracy with DP / its non-private shadow's."""
    n = candidate.get("privacy") or {}
    dp, plain = n.get("recent_accuracy"), n.get("nonprivate_recent_accuracy")
    if dp is None or plain is None or plain != plain:  # no DP, or no recent holdout (NaN)
        return "-"
    return f"{dp:.3f} / {plain:.3f}"
