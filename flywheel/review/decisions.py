"""Review decisions with auto-promotion off.

The learner tags a passed candidate `review=pending`; approving promotes it through
`flywheel.promotion.promote` (so the model event is published), rejecting leaves the champion
alone. Both are recorded on the version as tags `review`, `review_by`, `review_reason`,
`review_at`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flywheel.review.versions import (
    APPROVED,
    PENDING,
    REJECTED,
    REVIEW_AT,
    REVIEW_BY,
    REVIEW_REASON,
    REVIEW_TAG,
    registry_docs,
)

if TYPE_CHECKING:
    from flywheel.events import ModelEvent
    from flywheel.registry import ModelVersion, Registry, VersionInfo
    from flywheel.settings import KafkaSettings

MAX_REASON = 1000  # characters; an MLflow tag value holds 5000
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class ReviewError(ValueError):
    """A review request that cannot be done as asked (not pending, empty reason).

    >>> check_reason("  canary looked good ")
    'canary looked good'
    >>> try:
    ...     check_reason(" ")
    ... except ReviewError as exc:
    ...     print(str(exc)[:32])
    a review decision needs a reason
    """


def check_reason(reason: str | None) -> str:
    """The reason as recorded (an MLflow tag): not empty, not too long, and no control
    characters but newlines and tabs (PostgreSQL text cannot hold a NUL)."""
    text = (reason or "").strip()
    if not text:
        raise ReviewError("a review decision needs a reason (it is recorded on the version)")
    if len(text) > MAX_REASON:
        raise ReviewError(f"the reason is {len(text)} characters; at most {MAX_REASON}")
    control = _CONTROL.search(text)
    if control:
        raise ReviewError(f"the reason holds a control character ({control.group()!r})")
    return text


def _actor(actor: str | None) -> str:
    from flywheel.promotion import default_actor

    return (actor or "").strip() or default_actor()


def pending(registry: Registry) -> list[dict[str, Any]]:
    """Versions waiting for a reviewer (passed their gate, auto-promotion off), oldest first."""
    docs = [d for d in registry_docs(registry, with_runs=False) if d["status"] == "pending review"]
    return sorted(docs, key=lambda d: int(d["version"]) if d["version"].isdigit() else 0)


def _pending_info(registry: Registry, version: ModelVersion) -> VersionInfo:
    info = registry.info(version, with_run=False)  # RegistryError if unknown
    state = info.tags.get(REVIEW_TAG)
    if info.is_champion:
        raise ReviewError(f"{registry.name} v{version} is already the champion")
    if state != PENDING:
        why = f"its review is {state!r}" if state else "it has no review tag"
        raise ReviewError(
            f"{registry.name} v{version} is not pending review ({why}); "
            "`flywheel models promote` moves the champion without a review"
        )
    return info


def approve(
    version: ModelVersion,
    *,
    reason: str,
    registry: Registry,
    kafka: KafkaSettings,
    actor: str | None = None,
    notify: bool = True,
) -> ModelEvent:
    """Approve a pending candidate: promote it (the model event goes to `kafka`'s topic),
    then record the review."""
    from flywheel import promotion

    reason, actor = check_reason(reason), _actor(actor)
    _pending_info(registry, version)
    event = promotion.promote(
        kafka,
        version,
        reason=f"review approved: {reason}",
        actor=actor,
        registry=registry,
        notify=notify,
    )
    registry.set_tags(
        version,
        {REVIEW_TAG: APPROVED, REVIEW_BY: actor, REVIEW_REASON: reason, REVIEW_AT: _now_iso()},
    )
    return event


def reject(
    version: ModelVersion, *, reason: str, registry: Registry, actor: str | None = None
) -> dict[str, str]:
    """Reject a pending candidate; the champion stays (nothing is announced, so no settings).
    Returns the tags recorded."""
    reason, actor = check_reason(reason), _actor(actor)
    _pending_info(registry, version)
    tags = {REVIEW_TAG: REJECTED, REVIEW_BY: actor, REVIEW_REASON: reason, REVIEW_AT: _now_iso()}
    registry.set_tags(version, tags)
    return tags


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
