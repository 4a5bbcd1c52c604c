"""Turning raw Kafka records into validated events, or a reason they cannot be used."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from flywheel.events import NO_NUL, CorrectionEvent, PredictionEvent, ScoreEvent
from flywheel.subjects import SUBJECT_KEY_PATTERN

__all__ = [
    "CONTENT",
    "MAX_REASON",
    "Rejected",
    "content_of",
    "decode",
    "duplicate_reason",
    "identity",
]

MAX_REASON = 1000
# pydantic-core's validators, called directly: `model_validate_json` is a Python wrapper
# around the same call that costs ~0.8 us of a ~3 us record.
_VALIDATE_JSON = {
    PredictionEvent: PredictionEvent.__pydantic_validator__.validate_json,
    CorrectionEvent: CorrectionEvent.__pydantic_validator__.validate_json,
    ScoreEvent: ScoreEvent.__pydantic_validator__.validate_json,
}
_MODELS: dict[str, type[PredictionEvent] | type[CorrectionEvent] | type[ScoreEvent]] = {
    "prediction": PredictionEvent,
    "correction": CorrectionEvent,
    "score": ScoreEvent,
}
Decoded = PredictionEvent | CorrectionEvent | ScoreEvent


@dataclass(frozen=True)
class Rejected:
    """A record for the dead-letter topic, with why it was refused."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "value"
        msg = err.get("msg")
        pattern = err.get("ctx", {}).get("pattern")
        if err.get("type") == "string_pattern_mismatch" and pattern == NO_NUL:
            msg = "holds a NUL character, which the store cannot keep"
        elif err.get("type") == "string_pattern_mismatch" and pattern == SUBJECT_KEY_PATTERN:
            msg = (
                "must be the subject's keyed hash (64 hex digits), never a raw id; "
                "send corrections with a subject through POST /v1/corrections"
            )
        parts.append(f"{loc}: {msg}")
    return "schema: " + "; ".join(parts)


# What the store keeps of each kind of event: a second record with the same id and the same
# content is a redelivery (skipped, silently); with other content it is a conflict,
# dead-lettered. A correction's timestamp is not content: the service stamps each call,
# and a client's retry of the same correction is the same event (`correction_id`).
CONTENT: dict[type, tuple[str, ...]] = {
    PredictionEvent: (
        "model_name",
        "model_version",
        "features",
        "probabilities",
        "label",
        "timestamp",
        "latency_ms",
    ),
    CorrectionEvent: ("prediction_id", "label", "source", "subject"),
    # a score is identified by (prediction, version): see `identity`
    ScoreEvent: ("model_name", "role", "probabilities", "label", "timestamp"),
}


def identity(event: Decoded) -> str:
    """What the store keys an event by: its id; a score's prediction id and version (a
    version scores a prediction once), joined by a NUL, which neither may hold."""
    if isinstance(event, ScoreEvent):
        return f"{event.prediction_id}\x00{event.model_version}"
    return event.id


def content_of(event: Decoded) -> dict[str, Any]:
    return {f: getattr(event, f) for f in CONTENT[type(event)]}


def duplicate_reason(event: Decoded, first: Mapping[str, Any], where: str) -> str | None:
    """Why `event` cannot be stored beside `first` (the content of the event with its id
    that came first, or that the store holds), or None when it is a plain redelivery."""
    differ = [f for f in CONTENT[type(event)] if getattr(event, f) != first[f]]
    if not differ:
        return None
    if isinstance(event, ScoreEvent):
        what = f"score of prediction {event.prediction_id!r} by version {event.model_version!r}"
    else:
        kind = "prediction" if isinstance(event, PredictionEvent) else "correction"
        what = f"{kind} id {event.id!r}"
    return (f"duplicate: {what} {where} with a different {', '.join(differ)}; the first is kept")[
        :MAX_REASON
    ]


def decode(
    kind: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
) -> Decoded | Rejected:
    """Validate one record of `kind` ("prediction", "correction" or "score").

    The key must be the prediction id the value names: a wrong key would put the record on
    a partition its partner never reaches, and silently break the join.

    Valid records take one pass of pydantic-core's JSON validator (~3 us); only a record
    it refuses is parsed again, step by step, to say exactly what is wrong with it.
    """
    if value is None:
        return Rejected(topic, partition, offset, key, value, "empty value (tombstone)")
    model = _MODELS[kind]
    try:
        event = _VALIDATE_JSON[model](value)
    except ValidationError:
        return Rejected(
            topic, partition, offset, key, value, _why_invalid(model, value)[:MAX_REASON]
        )
    if "schema_version" not in event.model_fields_set:  # the model's default, not the record's
        return Rejected(
            topic,
            partition,
            offset,
            key,
            value,
            "unsupported schema_version None (this worker reads 1)",
        )
    expected_key = event.id if isinstance(event, PredictionEvent) else event.prediction_id
    if key is None or key != expected_key.encode():
        return Rejected(
            topic,
            partition,
            offset,
            key,
            value,
            f"key {key!r} does not match the prediction id {expected_key!r}"[:MAX_REASON],
        )
    stamp = event.timestamp
    if stamp.year in (1, 9999) and not _in_utc_range(stamp):  # a year test first: ~40 ns
        return Rejected(
            topic,
            partition,
            offset,
            key,
            value,
            f"schema: timestamp: {stamp.isoformat()} is out of range once in UTC",
        )
    return event


def _in_utc_range(stamp: datetime) -> bool:
    """The store keeps UTC: a time whose offset carries it past year 1 or 9999 cannot be
    converted (OverflowError), and failed its whole batch in the store before."""
    try:
        stamp.astimezone(UTC)
    except OverflowError:
        return False
    return True


def _why_invalid(
    model: type[PredictionEvent] | type[CorrectionEvent] | type[ScoreEvent], value: bytes
) -> str:
    """The reason a record failed validation, in the order a reader would check it."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return f"not JSON: {exc}"
    if not isinstance(doc, dict):
        return f"expected a JSON object, got {type(doc).__name__}"
    version = doc.get("schema_version")
    if version != 1:
        return f"unsupported schema_version {version!r} (this worker reads 1)"
    try:
        model.model_validate(doc)
    except ValidationError as exc:
        return _describe(exc)
    return "schema: refused by the JSON validator"  # JSON orjson reads but pydantic does not
