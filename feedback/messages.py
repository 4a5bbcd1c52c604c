"""Turning raw Kafka records into validated events, or a reason they cannot be used."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from pydantic import ValidationError

from flywheel.events import CorrectionEvent, PredictionEvent

MAX_REASON = 1000


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
        parts.append(f"{loc}: {err.get('msg')}")
    return "schema: " + "; ".join(parts)


def decode(kind: str, topic: str, partition: int, offset: int, key: bytes | None,
           value: bytes | None) -> PredictionEvent | CorrectionEvent | Rejected:
    """Validate one record of `kind` ("prediction" or "correction").

    The key must be the prediction id the value names: a wrong key would put the record on
    a partition its partner never reaches, and silently break the join.
    """
    def reject(reason: str) -> Rejected:
        return Rejected(topic, partition, offset, key, value, reason[:MAX_REASON])

    if value is None:
        return reject("empty value (tombstone)")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return reject(f"not JSON: {exc}")
    if not isinstance(doc, dict):
        return reject(f"expected a JSON object, got {type(doc).__name__}")
    version = doc.get("schema_version")
    if version != 1:
        return reject(f"unsupported schema_version {version!r} (this worker reads 1)")
    model = PredictionEvent if kind == "prediction" else CorrectionEvent
    try:
        event = model.model_validate(doc)
    except ValidationError as exc:
        return reject(_describe(exc))
    expected_key = event.id if isinstance(event, PredictionEvent) else event.prediction_id
    if key is None or key != expected_key.encode():
        return reject(f"key {key!r} does not match the prediction id {expected_key!r}")
    return event
