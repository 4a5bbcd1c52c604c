"""What `flywheel fed demo --report DIR` writes beside summary.json: accuracy.png and
summary.md, from the run's own summary (`RunSummary.to_dict` plus the demo's sites).

The figure and the accuracy format are `flywheel.demo.report`'s (`saved_figure`, `pct`),
so both demos' reports read alike: per round, the served model's accuracy on the union of
the sites' holdouts and on the platform's trusted holdout, and the client-level ε spent.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flywheel.demo.report import pct, saved_figure


def _number(v: Any) -> float | None:
    """A round's value, None where it is missing or NaN (a round with no global model)."""
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


def plot_rounds(summary: dict[str, Any], path: Path) -> None:
    rounds = summary.get("rounds") or []
    x = [r["round"] for r in rounds]
    with saved_figure(path) as (_fig, ax):
        for key, label, style in (
            ("recent_accuracy", "served model, union of the sites' holdouts", "-"),
            ("trusted_accuracy", "served model, platform's trusted holdout", "--"),
        ):
            y = [_number(r.get(key)) for r in rounds]
            ax.plot(x, [math.nan if v is None else v for v in y], style, marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        eps = ax.twinx()
        eps.plot(
            x,
            [_number(r.get("epsilon_cumulative")) or 0.0 for r in rounds],
            color="tab:red",
            linestyle=":",
            marker=".",
            label="client ε spent (cumulative)",
        )
        eps.set_ylabel("client ε")
        lines = ax.get_legend_handles_labels()
        more = eps.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
        ax.set_title(
            f"Federated rounds ({summary.get('strategy')}, {len(summary.get('sites') or [])} sites)"
        )


def round_trust(r: dict[str, Any]) -> dict[str, float]:
    """One round's trust scores by site: the summary's `trust` ({site: score}), or, in a
    summary written before it had one, `trust_scores` paired with the node ids in `sites`."""
    trust = r.get("trust")
    if trust:
        return {str(k): float(v) for k, v in trust.items()}
    scores = r.get("trust_scores") or []
    return {str(n): float(v) for n, v in zip(r.get("sites") or [], scores, strict=False)}


def trust_lines(rounds: list[dict[str, Any]]) -> list[str]:
    """fltrust: per round, what the sites were scored against, that reference's norm over
    the sites' median update norm, and each site's score (none for other strategies)."""
    scored = [r for r in rounds if round_trust(r)]
    if not scored:
        return []
    lines = [
        "",
        "## Trust per round",
        "",
        "Each site's FLTrust score, ReLU(cos) of its update with the reference (0: no weight).",
        "",
        "| round | reference | reference norm / sites' median | trust by site |",
        "| --- | --- | --- | --- |",
    ]
    for r in scored:
        ratio = _number(r.get("trust_reference_ratio"))
        scores = ", ".join(f"{site} {v:.2f}" for site, v in round_trust(r).items())
        lines.append(
            f"| {r['round']} | {r.get('trust_reference') or 'n/a'} | "
            f"{'n/a' if ratio is None else f'{ratio:.2f}'} | {scores} |"
        )
    return lines


def markdown(s: dict[str, Any]) -> str:
    rounds = s.get("rounds") or []
    version = s.get("version")
    outcome = (
        f"registered **v{version}** from v{s.get('start_version')} ({s.get('gate')})"
        f"{', promoted' if s.get('promoted') else ', not promoted'}"
        if version
        else f"no version registered ({s.get('gate') or 'no round changed the model'})"
    )
    lines = [
        "# Flywheel federated demo",
        "",
        f"{len(rounds)} rounds of {s.get('strategy')} with {s.get('clipping')}-side DP "
        f"clipping (C={s.get('clip')}, σ={s.get('noise_multiplier')}); client-level "
        f"ε {float(s.get('epsilon') or 0):.3g} (δ={float(s.get('delta') or 0):g}); ran "
        f"{float(s.get('demo_seconds') or s.get('seconds') or 0):.0f} s. Outcome: {outcome}.",
        "",
        "![accuracy per round](accuracy.png)",
        "",
        "| round | sites replied | examples | accuracy (union holdout) | trusted holdout "
        "| ε round | ε cumulative | overhead s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rounds:
        lines.append(
            f"| {r['round']} | {r['replied']}/{len(r.get('sites') or [])} | {r['examples']} | "
            f"{pct(_number(r.get('recent_accuracy')))} | "
            f"{pct(_number(r.get('trusted_accuracy')))} | {float(r['epsilon_round']):.3g} | "
            f"{float(r['epsilon_cumulative']):.3g} | {float(r['overhead_s']):.2f} |"
        )
    if not rounds:
        lines.append("| (none) | | | | | | | |")
    sites = s.get("sites") or []
    if sites:
        lines += ["", "## Sites", "", "| site | examples | label counts |", "| --- | --- | --- |"]
        for i, site in enumerate(sites):
            counts = ", ".join(str(c) for c in site.get("label_counts") or [])
            lines.append(f"| {i} | {site.get('examples')} | {counts} |")
    lines += trust_lines(rounds)
    quarantined = s.get("quarantined") or []
    if quarantined:
        lines += ["", "## Quarantined sites", ""]
        lines += [
            f"- {q.get('site')} after round {q.get('round')}: trust 0 in rounds "
            f"{', '.join(str(r) for r in q.get('zero_rounds') or [])} (its update pointed away "
            "from the reference); not asked again"
            for q in quarantined
        ]
    refused, dropped = s.get("refused") or [], s.get("dropped") or []
    if refused or dropped:
        lines += ["", "## Refused replies and dropped rounds", ""]
        lines += [
            f"- round {x.get('round')}, site {x.get('site')}: {x.get('why')}" for x in refused
        ]
        lines += [f"- round {x.get('round')} dropped: {x.get('why')}" for x in dropped]
    return "\n".join(lines) + "\n"


def write_fed_report(directory: Path, summary: dict[str, Any]) -> None:
    """accuracy.png and summary.md into `directory` (summary.json is the run's own)."""
    directory.mkdir(parents=True, exist_ok=True)
    plot_rounds(summary, directory / "accuracy.png")
    (directory / "summary.md").write_text(markdown(summary))
