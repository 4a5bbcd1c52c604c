"""Model versions as plain data: status, lineage, gate and review facts, tag parsing.

What `flywheel models list | show` prints with `--json` and what the review page shows;
every function takes registry facts (`VersionInfo`) or the documents made from them, so
nothing here loads a model or opens the training store.

>>> v3 = dict.fromkeys(LINEAGE_KEYS) | {"version": "3", "parent_version": "1"}
>>> [(hop["version"], hop["missing"]) for hop in lineage("3", {"3": v3})]
[('3', False), ('1', True)]
>>> example_range("ids 12..340 (300 new, update 4)"), example_range("[100,200)")
((12, 340), (100, 199))
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flywheel.registry import ModelVersion, Registry, VersionInfo

REVIEW_TAG = "review"
PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"
REVIEW_BY, REVIEW_REASON, REVIEW_AT = "review_by", "review_reason", "review_at"
LINEAGE_KEYS = (
    "version",
    "champion",
    "status",
    "source",
    "parent_version",
    "examples",
    "epsilon",
    "delta",
    "gate",
    "created_at",
)
_NO_PARENT = {"", "none", "null", "-"}
# "ids 12..340 (300 new, update 4)" (the learner) or "[100,200)" (half-open, hand-made)
_IDS_RANGE = re.compile(r"\bids\s+(\d+)\s*\.\.\s*(\d+)")
_HALF_OPEN = re.compile(r"^\s*\[(\d+)\s*,\s*(\d+)\)")


def parent_of(tags: dict[str, str]) -> str | None:
    raw = tags.get("parent_version", "").strip()
    if raw.lower() in _NO_PARENT:
        return None
    return raw[1:] if raw[:1] in "vV" and raw[1:].isdigit() else raw


def status(info: VersionInfo, history: AbstractSet[ModelVersion]) -> str:
    """champion | rolled back | former champion | pending review | review rejected | candidate.

    From the alias, the champion history and the audit tags promotions, rollbacks, reviews
    and the learner (`review=pending`) leave.
    """
    if info.is_champion:
        return "champion"
    rolled, promoted = info.tags.get("rolled_back_at"), info.tags.get("promoted_at")
    if rolled and (not promoted or rolled >= promoted):  # one ISO format: string order works
        return "rolled back"
    if promoted or info.version in history:
        return "former champion"
    review = info.tags.get(REVIEW_TAG)
    if review == PENDING:  # passed its gate; auto-promotion is off
        return "pending review"
    if review == REJECTED:
        return "review rejected"
    return "candidate"


def finite(value: float | None) -> float | None:
    """NaN (an empty holdout) is not JSON; it becomes null."""
    return value if value is not None and math.isfinite(value) else None


def version_doc(info: VersionInfo, history: AbstractSet[ModelVersion]) -> dict[str, Any]:
    """One version as JSON-ready data; every key is always there (null when unknown)."""
    tags = info.tags
    return {
        "version": info.version,
        "champion": info.is_champion,
        "status": status(info, history),
        "source": tags.get("source"),
        "parent_version": parent_of(tags),
        "examples": tags.get("examples"),
        "epsilon": tags.get("epsilon"),
        "delta": tags.get("delta"),
        "gate": tags.get("gate"),
        "created_at": info.created_at.isoformat(),
        "run_id": info.run_id,
        "tags": dict(sorted(tags.items())),
        "params": dict(sorted(info.params.items())),
        "metrics": {k: finite(v) for k, v in sorted(info.metrics.items())},
    }


def lineage(version: str, by_version: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The version, its parent, the parent's parent, ... down to a version without one.

    Keyed by text, not `ModelVersion`: a hop is named by a `parent_version` tag, free text
    that may name no registered version. A parent that is not in the registry (deleted, or
    junk in the tag) ends the chain as `missing: true`; a loop in the tags ends it too,
    rather than hanging.
    """
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: str | None = version
    while current is not None and current not in seen:
        seen.add(current)
        doc = by_version.get(current)
        if doc is None:
            chain.append(
                {k: None for k in LINEAGE_KEYS}
                | {
                    "version": current,
                    "champion": False,
                    "status": "not in the registry",
                    "missing": True,
                }
            )
            break
        chain.append({k: doc[k] for k in LINEAGE_KEYS} | {"missing": False})
        current = doc["parent_version"]
    return chain


def gate_passed(doc: dict[str, Any]) -> bool | None:
    """What the gate decided: the `gate_passed` metric, else the tag's first word."""
    value = (doc.get("metrics") or {}).get("gate_passed")
    if value is not None:
        return bool(value)
    gate = (doc.get("gate") or "").strip().lower()
    if gate.startswith("passed"):
        return True
    if gate.startswith("rejected"):
        return False
    return None


def gate_numbers(doc: dict[str, Any]) -> dict[str, float | None]:
    return {k: v for k, v in (doc.get("metrics") or {}).items() if k.startswith("gate_")}


def review_of(doc: dict[str, Any]) -> dict[str, str | None]:
    tags = doc.get("tags") or {}
    return {
        "state": tags.get(REVIEW_TAG),
        "by": tags.get(REVIEW_BY),
        "reason": tags.get(REVIEW_REASON),
        "at": tags.get(REVIEW_AT),
    }


def registry_docs(
    registry: Registry, *, with_runs: bool = True, limit: int = 0
) -> list[dict[str, Any]]:
    """The newest `limit` versions (0: all) as `version_doc`s, newest first."""
    history = set(registry.champion_history())
    listed = registry.versions(with_runs=False)
    shown = listed[:limit] if limit else listed
    if with_runs:  # a run costs a query: fetch runs only for the versions shown
        shown = [registry.info(v.version, with_run=True) for v in shown]
    return [version_doc(v, history) for v in shown]


def epsilon_value(text: str | None) -> float | None:
    """The `epsilon` tag as a number; `none` (no private data) and junk are None."""
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return finite(value)


def example_range(tag: str | None) -> tuple[int, int] | None:
    """Store ids (inclusive) named by an `examples` tag; None for seed data or free text."""
    if not tag:
        return None
    match = _IDS_RANGE.search(tag)
    if match:
        lo, hi = int(match.group(1)), int(match.group(2))
        return (lo, hi) if lo <= hi else None
    match = _HALF_OPEN.match(tag)
    if match:
        lo, hi = int(match.group(1)), int(match.group(2)) - 1
        return (lo, hi) if lo <= hi else None
    return None
