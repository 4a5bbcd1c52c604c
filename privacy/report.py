"""What `flywheel privacy report` shows: ε per version, per privacy unit, per ledger entry,
the budget policy in plain words, and how much incoming data the budget keeps out.

The ledger's `source` column holds the privacy unit (`subject:<keyed hash>` or
`prediction:<id>`; `source:<name>` on ledgers written before units were subjects): the
report reads old and new ledgers alike, and counts units of each kind.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flywheel.privacy.ledger import PrivacyLedger
from flywheel.privacy.policy import BudgetPolicy


def build_report(
    ledger: PrivacyLedger,
    *,
    budget: float,
    delta: float,
    lineage: str | None = None,
    top_sources: int | None = None,
    policy: BudgetPolicy | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Plain data (the --json document): entries, versions, units, budget left, the
    policy (default: lifetime) and the incoming data excluded by the budget."""
    policy = policy or BudgetPolicy("lifetime", budget, delta, 30.0)
    since = policy.since(now or datetime.now(UTC))
    entries = ledger.entries(lineage)
    sources = ledger.sources(lineage)
    shown = sources if top_sources is None else sources[:top_sources]
    versions = [
        {
            "version": e.version,
            "lineage": e.lineage,
            "update": e.update_no,
            "epsilon": e.epsilon_lineage,
            "epsilon_update": e.epsilon_update,
            "mechanism": e.mechanism_kind,
            "delta": e.delta,
            "budget_left": max(0.0, budget - e.epsilon_lineage),
            "created_at": e.created_at.isoformat(),
        }
        for e in entries
        if e.version is not None
    ]
    # entries of updates whose learner died, stopped or lost its lease before publishing:
    # never released, still counted for their sources (over-count, never under-count)
    never_published = [
        {"id": e.id, "lineage": e.lineage, "update": e.update_no, "epsilon": e.epsilon_lineage}
        for e in entries
        if e.version is None
    ]
    worst = max((e.epsilon_lineage for e in entries), default=0.0)
    lineages = sorted({e.lineage for e in entries})
    excluded = ledger.excluded(lineages)
    incoming = sum(x["incoming"] for x in excluded.values())
    left_out = sum(x["excluded"] for x in excluded.values())
    kinds: dict[str, int] = {}
    for s in sources:
        kind = s.source.split(":", 1)[0] if ":" in s.source else "other"
        kinds[kind] = kinds.get(kind, 0) + 1

    def out_of_budget(eps: float, last_at: datetime | None) -> bool:
        # renewing: the stored ε is the unit's spending in the window it was written for;
        # out of budget only while that spending is still within the current window
        spent = eps >= budget - 1e-9
        return spent and (since is None or last_at is None or last_at >= since)

    return {
        "budget": {
            "epsilon": budget,
            "delta": delta,
            "policy": policy.kind,
            "period_days": policy.period_days if policy.kind == "renewing" else None,
            "year_epsilon": policy.year_epsilon(),
            "guarantee": policy.statement(),
        },
        "excluded_data": {
            "incoming_examples": incoming,
            "excluded_examples": left_out,
            "excluded_share": left_out / incoming if incoming else 0.0,
            "lineages": excluded,
        },
        "units_by_kind": kinds,
        "epsilon_spent": worst,
        "budget_left": max(0.0, budget - worst),
        "lineages": lineages,
        "versions": versions,
        "never_published": never_published,
        "sources_total": len(sources),
        "sources_out_of_budget": sum(1 for s in sources if out_of_budget(s.epsilon, s.last_at)),
        "sources": [
            {
                "source": s.source,
                "epsilon": s.epsilon,
                "budget_left": max(0.0, budget - s.epsilon),
                "updates": s.updates,
                "examples": s.examples,
                "versions": list(s.versions),
            }
            for s in shown
        ],
        "entries": [e.as_dict() for e in entries],
    }


def plot_epsilon(report: dict[str, Any], path: Path) -> Path:
    """ε of each lineage's worst source over time, against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for lineage in report["lineages"]:
        points = [
            (datetime.fromisoformat(e["created_at"]), e["epsilon_lineage"])
            for e in report["entries"]
            if e["lineage"] == lineage
        ]
        if points:
            # matplotlib plots datetimes (its date converter); its stubs take only arrays
            ax.step(
                [p[0] for p in points],  # type: ignore[arg-type]
                [p[1] for p in points],
                where="post",
                marker="o",
                markersize=3,
                label=lineage,
            )
    ax.axhline(
        report["budget"]["epsilon"],
        color="red",
        linestyle="--",
        label=f"budget ε={report['budget']['epsilon']:g}",
    )
    ax.set_xlabel("time")
    ax.set_ylabel("ε (worst source)")
    ax.set_title(f"privacy spent (δ={report['budget']['delta']:g})")
    ax.legend(loc="lower right")
    fig.autofmt_xdate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
