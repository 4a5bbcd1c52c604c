"""What the training store says about versions: the data behind one, the feedback loop's
error mix and hourly accuracy, and ε spent per source from the privacy ledger.

A review works without a store (registry facts only): `open_store_or_reason` never creates
one, and reports an un-migrated or unreachable store instead of raising.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.review.versions import example_range, finite

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from flywheel.settings import StateSettings


def open_store_or_reason(state: StateSettings) -> tuple[Engine | None, str | None]:
    """The training store if it is there and migrated, else (None, why not).

    A review works without a store (registry facts only): a missing SQLite file is not
    created, and an un-migrated store is reported rather than raised.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from flywheel.store import SchemaNotCurrent, display_url, normalize_url, open_store

    url = state.resolved_database_url
    try:
        parsed = normalize_url(url)
        database = parsed.database
        local = parsed.get_backend_name() == "sqlite" and database not in (None, "", ":memory:")
        if local and database is not None and not Path(database).exists():
            return None, f"no training store at {display_url(parsed)} yet"
        return open_store(url), None
    except SchemaNotCurrent as exc:
        return None, str(exc)
    except (SQLAlchemyError, OSError, ValueError) as exc:
        return None, f"training store unusable: {' '.join(str(exc).split())[:300]}"


def data_counts(engine: Engine, lo: int, hi: int) -> dict[str, Any]:
    """Examples with ids in [lo, hi] by origin and split; counterexamples among them."""
    from flywheel.store import ExampleReader, Origin

    rows = ExampleReader(engine).counts(lo, hi)
    origins: Counter[str] = Counter()
    splits: Counter[str] = Counter()
    for origin, split, n in rows:
        origins[origin] += n
        splits[split] += n
    return {
        "range": [lo, hi],
        "total": sum(origins.values()),
        "counterexamples": origins[Origin.COUNTEREXAMPLE.value],
        "by_origin": dict(sorted(origins.items())),
        "by_split": dict(sorted(splits.items())),
    }


def version_data(doc: dict[str, Any], engine: Engine | None) -> dict[str, Any]:
    """What a version was trained on: its `examples` tag and, from the store, what is there."""
    span = example_range(doc.get("examples"))
    out: dict[str, Any] = {
        "examples": doc.get("examples"),
        "range": list(span) if span else None,
        "total": None,
        "counterexamples": None,
        "by_origin": None,
        "by_split": None,
    }
    if span is not None and engine is not None:
        out |= data_counts(engine, *span)
    return out


def error_mix(engine: Engine, model_name: str, hours: float) -> dict[str, Any]:
    """The feedback report per version (corrections, error rate, error-type mix, confusions),
    with accuracy = 1 - error rate on the corrected predictions of the window."""
    from flywheel.feedback import error_report
    from flywheel.store import session_factory

    with session_factory(engine)() as session:
        doc = error_report(session, model_name, hours)
    for v in doc["versions"]:
        v["accuracy"] = 1.0 - v["error_rate"] if v["corrections"] else None
    return doc


def accuracy_timeline(
    engine: Engine, model_name: str, hours: float, now: datetime | None = None
) -> dict[str, Any]:
    """Accuracy of the corrected predictions per version and hour (the store keeps hourly
    counters), oldest first: the "rolling accuracy" chart of the review page."""
    from flywheel.store import error_counters, session_factory

    since = (now or datetime.now(UTC)) - timedelta(hours=hours)
    with session_factory(engine)() as session:
        rows = error_counters(session, model_name, since)
    cells: dict[tuple[str, datetime], list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        cell = cells[(row.model_version, row.hour)]
        cell[0] += row.count
        cell[1] += row.count if row.outcome == "correct" else 0
    points = [
        {
            "version": v,
            "hour": h.isoformat(),
            "corrections": total,
            "accuracy": right / total if total else None,
        }
        for (v, h), (total, right) in sorted(cells.items(), key=lambda kv: kv[0][1])
    ]
    return {"model_name": model_name, "window_hours": hours, "points": points}


def privacy_ledger(engine: Engine | None, store_note: str | None = None) -> dict[str, Any]:
    """ε spent per source (the privacy unit) and per version, from the privacy ledger in the
    training store (`flywheel.privacy.PrivacyLedger`). Without the ledger (no store, or a
    build without privacy) reviewers see ε from the version tags only, and this says so."""
    missing = {"available": False, "sources": [], "versions": []}
    try:
        from flywheel.privacy import PrivacyLedger
    except ImportError:
        return missing | {
            "note": "this build has no privacy ledger (flywheel.privacy): ε "
            "here comes from version tags only"
        }
    if engine is None:
        return missing | {
            "note": f"the privacy ledger lives in the training store, which is "
            f"not available ({store_note}): ε here comes from version "
            "tags only"
        }
    try:
        ledger = PrivacyLedger(engine)
        sources = [
            {
                "source": s.source,
                "epsilon": finite(s.epsilon),
                "updates": s.updates,
                "examples": s.examples,
                "versions": list(s.versions),
            }
            for s in ledger.sources()
        ]
        versions = [
            {
                "version": e.version,
                "lineage": e.lineage,
                "update": e.update_no,
                "epsilon_update": finite(e.epsilon_update),
                "epsilon_lineage": finite(e.epsilon_lineage),
                "delta": e.delta,
                "sources": e.sources,
                "examples": e.examples,
            }
            for e in ledger.entries()
        ]
        lineages = sorted({e.lineage for e in ledger.entries()})
        per_lineage = ledger.excluded(lineages)
        incoming = sum(x["incoming"] for x in per_lineage.values())
        left_out = sum(x["excluded"] for x in per_lineage.values())
        excluded = {
            "incoming_examples": incoming,
            "excluded_examples": left_out,
            "excluded_share": left_out / incoming if incoming else 0.0,
            "lineages": per_lineage,
        }
    except Exception as exc:  # a broken ledger must not take the review down
        return missing | {"note": f"privacy ledger unreadable: {' '.join(str(exc).split())[:300]}"}
    return {
        "available": True,
        "sources": sources,
        "versions": versions,
        # incoming trainable data the budget keeps out (units whose budget is spent)
        "excluded": excluded,
        "note": None if sources else "no DP update is recorded in the privacy ledger yet",
    }
