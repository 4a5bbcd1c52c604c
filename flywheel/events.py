"""Event schemas on the Kafka topics: the contract between service, feedback and learner.

Keys are prediction ids (UTF-8); values are JSON objects with a `schema_version`
field so a consumer can refuse what it does not understand instead of guessing.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from flywheel.appkeys import app_of
from flywheel.subjects import SubjectKey

SCHEMA_VERSION: Literal[1] = 1

Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")
]
# a correction's source: an app, or one sub-source in its namespace (`shop/eu`; flywheel.appkeys)
SourceName = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+(/[A-Za-z0-9_.:\-]+)?$"
    ),
]
# Text the training store keeps in a column of its own: at most as long as the column
# (flywheel.store.models: NAME_LENGTH 200, ID_LENGTH 64), and without NUL, which
# PostgreSQL's text types refuse. Checked by pydantic-core's own regex (no Python call):
# the store refused such a record only after the whole batch had failed, and a record the
# worker cannot store must be dead-lettered at decode, with the field named.
NO_NUL = r"^[^\x00]*$"
LabelName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=NO_NUL)]
ModelName = Annotated[str, StringConstraints(max_length=200, pattern=NO_NUL)]
VersionText = Annotated[str, StringConstraints(max_length=64, pattern=NO_NUL)]


def new_id() -> str:
    """A random, URL-safe id for predictions and corrections."""
    return uuid.uuid4().hex


def correction_id(prediction_id: str, label: str, source: str | None = None) -> str:
    """The id of a correction event: the same for the same prediction, label and source.

    The store keys corrections (and the training examples made from them) by this id and
    skips an id it already has, so sending the same correction again -- a client's retry
    after a lost response, a resend from an app's outbox, the HTTP route and a direct
    Kafka producer alike -- is one correction, not a second vote for the same label. A
    different label (the app changed its mind) or another app is a new correction; the
    sub-sources of one app (`shop/eu`, `shop/us`) are not: the id uses the app
    (`flywheel.appkeys.app_of`), so one prediction corrected under 40 invented names is
    one correction, one training example.

    >>> correction_id("p-1", "cat", "shop/eu") == correction_id("p-1", "cat", "shop/us")
    True

    >>> correction_id("p-1", "cat", "app-7") == correction_id("p-1", "cat", "app-7")
    True
    >>> correction_id("p-1", "cat") == correction_id("p-1", "dog")
    False
    >>> len(correction_id("p-1", "cat"))
    32
    """
    # a JSON array is an unambiguous encoding of the three fields (a label may hold any
    # character); 128 bits of SHA-256, hex, is within `Identifier` like `new_id`'s
    key = orjson.dumps([prediction_id, label, app_of(source)])
    return hashlib.sha256(key).hexdigest()[:32]


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    schema_version: Literal[1] = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


# Checked by pydantic-core itself, not by Python validators: a feedback worker validates
# tens of thousands of these a second (3 us each instead of 6.5).
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
# one value of a named row as a client sent it: a number, a category, a flag, or null
RowValue = str | bool | int | FiniteFloat | None


class PredictionEvent(_Event):
    """One served prediction, logged to `flywheel.predictions`."""

    id: Identifier
    model_name: ModelName
    model_version: VersionText
    features: Annotated[list[FiniteFloat], Field(min_length=1)]
    probabilities: dict[LabelName, Probability]
    label: LabelName
    # aware: the store keeps UTC and refuses a time without its zone
    timestamp: AwareDatetime
    latency_ms: FiniteFloat = Field(ge=0)
    # which network answered: "single" (a plain model), "light" or "heavy" (a cascade);
    # optional and free-form so records without it, or with a future value, stay valid
    path: Annotated[str, StringConstraints(max_length=32)] | None = None

    @model_validator(mode="after")
    def _label_is_a_class(self) -> PredictionEvent:
        if self.label not in self.probabilities:
            raise ValueError(f"label {self.label!r} is not one of the probabilities' labels")
        return self


class NamedPredictionEvent(PredictionEvent):
    """A prediction event read with its optional `row`: the named features as the client
    sent them (ignored columns dropped; a missing feature is absent, and `features`
    holds what it was filled with), present when the client sent named rows.

    `PredictionEvent` ignores `row` (as every model here ignores fields it does not
    know): the feedback worker needs only `features`, and validating a 12-feature row
    cost 5-10 us on top of a ~7 us record. Consumers that want the row (audit, analytics)
    validate with this class; records without `row` read as `row=None`.

    >>> NamedPredictionEvent.model_validate_json(
    ...     b'{"schema_version": 1, "id": "p1", "model_name": "m", "model_version": "3",'
    ...     b' "features": [12.5, 2.0], "probabilities": {"no": 0.9, "yes": 0.1},'
    ...     b' "label": "no", "timestamp": "2026-01-01T00:00:00Z", "latency_ms": 0.4,'
    ...     b' "row": {"amount": 12.5, "country": "FR"}}').row
    {'amount': 12.5, 'country': 'FR'}
    """

    row: dict[str, RowValue] | None = None


class ScoreEvent(_Event):
    """A version's score of a served prediction it did not answer, on `flywheel.scores`
    (key: the prediction id; issue 28).

    The service writes one, off the request path, for every shadow or guard that scored
    a sampled request beside the champion, and for the champion when a canary answered:
    each correction of the prediction is then credited to every version that scored it,
    so versions are compared paired, on the same requests. `role` is what the version
    was for the service when it scored (`shadow`, `guard`, `champion`); free-form so a
    future role stays valid.

    >>> ScoreEvent.model_validate_json(
    ...     b'{"schema_version": 1, "prediction_id": "p1", "model_name": "m",'
    ...     b' "model_version": "4", "role": "shadow", "probabilities": {"no": 0.2,'
    ...     b' "yes": 0.8}, "label": "yes", "timestamp": "2026-01-01T00:00:00Z"}').label
    'yes'
    """

    prediction_id: Identifier
    model_name: ModelName
    model_version: VersionText
    role: Annotated[str, StringConstraints(min_length=1, max_length=16, pattern=NO_NUL)]
    probabilities: dict[LabelName, Probability]
    label: LabelName
    timestamp: AwareDatetime

    @model_validator(mode="after")
    def _label_is_a_class(self) -> ScoreEvent:
        if self.label not in self.probabilities:
            raise ValueError(f"label {self.label!r} is not one of the probabilities' labels")
        return self


class CorrectionEvent(_Event):
    """The true label for an earlier prediction, on `flywheel.corrections`."""

    id: Identifier
    prediction_id: Identifier
    label: LabelName
    source: SourceName | None = None
    timestamp: AwareDatetime
    # the data subject the label is about, as its keyed hash (`flywheel.subjects`): never a
    # raw id; a record with anything else here is dead-lettered, not stored
    subject: SubjectKey | None = None


class DeadLetter(_Event):
    """A message a consumer could not use, with the reason, on `flywheel.deadletter`.

    Bounded whatever the record was (flywheel.feedback.deadletter): `value` is the first
    bytes of the record's value (16 KiB), read as UTF-8 with each invalid byte replaced
    by U+FFFD, `key` the first 1 KiB of its key, the same way; `value_bytes` and
    `value_sha256` describe the whole value, and `truncated` says whether `value` is all
    of it. The record itself stays at (topic, partition, offset) while the topic keeps it.
    The last three have defaults so that letters written before them still read.
    """

    topic: str
    partition: int
    offset: int
    key: str | None
    value: str
    reason: str
    timestamp: datetime
    value_bytes: int = 0
    value_sha256: str | None = None  # hex; None for a tombstone (no value at all)
    truncated: bool = False


class ModelEvent(_Event):
    """A change of the served version, on `flywheel.model-events` (key: model name).

    `kind` is `promoted` (a new champion), `rolled_back` (the alias moved back),
    `role_changed` (a version became, or stopped being, the shadow, canary or guard named
    in `role`; `version` is "none" when the role was cleared) or `live_decision` (a
    sequential test on live paired traffic decided; `evidence` holds what it rests on,
    whether or not it was acted on). Followers handle all the same: an event only wakes
    them, and they load whatever the aliases name. So `version` stays wire text (an
    `Identifier`), not a `flywheel.registry.ModelVersion`: nothing loads it, and decoding
    an event must not import the registry (and torch) into every consumer.
    """

    kind: Literal["promoted", "rolled_back", "role_changed", "live_decision"]
    model_name: str
    version: Identifier
    previous_version: Identifier | None = None
    reason: str = ""
    actor: str = ""
    timestamp: datetime
    role: str | None = None  # role_changed, live_decision: the role concerned
    evidence: dict[str, Any] | None = None  # live_decision: the test's counts and verdict


def prediction_payload(
    *,
    id: str,
    model_name: str,
    model_version: str,
    features: list[float],
    probabilities: dict[str, float],
    label: str,
    timestamp: datetime,
    latency_ms: float,
    path: str | None = None,
    row: Mapping[str, Any] | None = None,
) -> bytes:
    """Encode a prediction event without re-validating what the service already checked.

    The service builds thousands per second on the request path's neighbour thread;
    skipping a pydantic round trip keeps logging cheap. Consumers still validate
    with `PredictionEvent`. `features` is the raw input vector the model read (what the
    feedback worker stores); `row` the named features the client sent, if it sent any
    (an integer in it beyond 64 bits is written as its decimal text).

    >>> from datetime import datetime, UTC
    >>> doc = prediction_payload(id="p1", model_name="m", model_version="3",
    ...     features=[12.5, 2.0], probabilities={"no": 0.9, "yes": 0.1}, label="no",
    ...     timestamp=datetime(2026, 1, 1, tzinfo=UTC), latency_ms=0.4,
    ...     row={"amount": 12.5, "country": "FR"})
    >>> NamedPredictionEvent.model_validate_json(doc).row
    {'amount': 12.5, 'country': 'FR'}
    """
    doc = {
        "schema_version": SCHEMA_VERSION,
        "id": id,
        "model_name": model_name,
        "model_version": model_version,
        "features": features,
        "probabilities": probabilities,
        "label": label,
        "timestamp": timestamp,
        "latency_ms": latency_ms,
    }
    if path is not None:
        doc["path"] = path
    if row is None:
        return orjson.dumps(doc)
    doc["row"] = row
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits: JSON has them, orjson not
        doc["row"] = {k: _json_safe(v) for k, v in row.items()}
        return orjson.dumps(doc)


def _json_safe(value: Any) -> Any:
    """An integer beyond 64 bits as its decimal text, anything else as it is."""
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return str(value)
    return value
