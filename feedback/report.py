"""Rolling error reports per model version, summed from the store's error counters."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from flywheel.events import utcnow
from flywheel.store import error_counters, window_start


def error_report(
    session: Session,
    model_name: str,
    hours: float = 24.0,
    now: datetime | None = None,
    top_pairs: int = 5,
) -> dict[str, Any]:
    """Error rate, error-type mix and the most frequent confusions, per version, over the
    whole hours from the one that holds `now - hours` (`since` in the result)."""
    since = (now or utcnow()) - timedelta(hours=hours)
    versions: dict[str, dict[str, Counter]] = defaultdict(
        lambda: {"outcomes": Counter(), "pairs": Counter()}
    )
    for row in error_counters(session, model_name, since):
        versions[row.model_version]["outcomes"][row.outcome] += row.count
        if row.outcome != "correct":
            versions[row.model_version]["pairs"][(row.predicted, row.actual)] += row.count
    report = []
    for version in sorted(versions, key=lambda v: (len(v), v)):
        outcomes, pairs = versions[version]["outcomes"], versions[version]["pairs"]
        total = sum(outcomes.values())
        errors = total - outcomes["correct"]
        report.append(
            {
                "model_version": version,
                "corrections": total,
                "errors": errors,
                "error_rate": errors / total if total else 0.0,
                "error_types": {k: v for k, v in sorted(outcomes.items()) if k != "correct"},
                "confusions": [
                    {"predicted": p, "actual": a, "count": n}
                    for (p, a), n in pairs.most_common(top_pairs)
                ],
            }
        )
    return {
        "model_name": model_name,
        "window_hours": hours,
        "since": window_start(since).isoformat(),
        "versions": report,
    }
