"""The feedback worker's decode checks and its dead letters: every field the store would
refuse is refused at decode, with the field named; a dead letter is bounded whatever the
record was."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from flywheel.events import CorrectionEvent, DeadLetter, PredictionEvent
from flywheel.feedback.deadletter import (
    KEY_CAP,
    MAX_LETTER_BYTES,
    MAX_REQUEST_BYTES,
    VALUE_CAP,
    dead_letter,
    letter_key,
)
from flywheel.feedback.messages import (
    MAX_REASON,
    Rejected,
    content_of,
    decode,
    duplicate_reason,
)
from flywheel.store.models import ID_LENGTH, NAME_LENGTH

TOPIC = "flywheel.predictions"


def prediction(**changes) -> dict:
    doc = {
        "schema_version": 1,
        "id": "p1",
        "model_name": "fraud",
        "model_version": "3",
        "features": [0.5, 1.5],
        "probabilities": {"no": 0.75, "yes": 0.25},
        "label": "no",
        "timestamp": "2026-01-01T00:00:00Z",
        "latency_ms": 0.5,
    }
    doc.update(changes)
    return doc


def correction(**changes) -> dict:
    doc = {
        "schema_version": 1,
        "id": "c1",
        "prediction_id": "p1",
        "label": "yes",
        "source": "app",
        "timestamp": "2026-01-01T00:00:01Z",
    }
    doc.update(changes)
    return doc


def decoded(kind: str, doc: dict | bytes, key: bytes = b"p1"):
    value = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return decode(kind, TOPIC, 0, 7, key, value)


def test_valid_records_decode():
    assert isinstance(decoded("prediction", prediction()), PredictionEvent)
    assert isinstance(decoded("correction", correction()), CorrectionEvent)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"model_version": "9" * (ID_LENGTH + 1)}, "model_version: String should have at most 64"),
        ({"model_version": "9" * 5_000_000}, "model_version: String should have at most 64"),
        ({"model_name": "m" * (NAME_LENGTH + 1)}, "model_name: String should have at most 200"),
        (
            {"label": "n" * 201, "probabilities": {"n" * 201: 1.0}},
            "label: String should have at most 200",
        ),
        ({"model_name": "a\x00b"}, "model_name: holds a NUL character"),
        ({"label": "x\x00", "probabilities": {"x\x00": 1.0}}, "label: holds a NUL character"),
        ({"timestamp": "2026-01-01T00:00:00"}, "timestamp: Input should have timezone info"),
        ({"latency_ms": -1}, "latency_ms: Input should be greater than or equal to 0"),
        ({"latency_ms": "fast"}, "latency_ms: Input should be a valid number"),
        ({"features": []}, "features: List should have at least 1 item"),
        ({"features": [1.0, "x"]}, "features.1: Input should be a valid number"),
        ({"model_version": 3}, "model_version: Input should be a valid string"),
    ],
)
def test_a_field_the_store_would_refuse_is_refused_at_decode(changes, fragment):
    out = decoded("prediction", prediction(**changes))
    assert isinstance(out, Rejected)
    assert out.reason.startswith("schema: ") and fragment in out.reason, out.reason
    assert len(out.reason) <= MAX_REASON
    assert (out.topic, out.partition, out.offset, out.key) == (TOPIC, 0, 7, b"p1")


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:00:00-05:00"])
def test_a_time_beyond_the_years_utc_can_hold_is_refused(stamp):
    out = decoded("correction", correction(timestamp=stamp))
    assert isinstance(out, Rejected)
    assert out.reason == f"schema: timestamp: {stamp} is out of range once in UTC"
    for fine in ("0001-01-01T00:00:00-01:00", "9999-12-31T20:00:00+05:00"):
        assert isinstance(decoded("correction", correction(timestamp=fine)), CorrectionEvent)


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"Infinity", b"NaN"])
def test_non_finite_numbers_are_refused(number):
    """JSON has no infinity, but pydantic-core's parser reads a number beyond a double as
    one (1e400), and takes `Infinity` and `NaN`; the reason names the field, or says the
    JSON is not JSON where orjson's strict reading refuses it first."""
    clean = orjson.dumps(prediction(latency_ms=0.25, features=[0.125, 2.0]))
    for where in (b"0.25", b"0.125"):
        out = decoded("prediction", clean.replace(where, number))
        assert isinstance(out, Rejected), (where, number)
        field = "latency_ms" if where == b"0.25" else "features.0"
        assert field in out.reason or out.reason.startswith("not JSON"), out.reason


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"label": "y" * 201}, "label: String should have at most 200"),
        ({"label": "y\x00"}, "label: holds a NUL character"),
        ({"source": "s" * 65}, "source: String should have at most 64"),
        ({"prediction_id": "p 1"}, "prediction_id: String should match pattern"),
        ({"timestamp": "2026-01-01T00:00:01"}, "timestamp: Input should have timezone info"),
    ],
)
def test_correction_fields_are_checked_the_same_way(changes, fragment):
    key = changes.get("prediction_id", "p1").encode()
    out = decoded("correction", correction(**changes), key=key)
    assert isinstance(out, Rejected) and fragment in out.reason, out


def test_a_lone_surrogate_or_invalid_utf8_is_not_json():
    escaped = orjson.dumps(prediction()).replace(b'"fraud"', b'"\\ud800"')
    for value in (escaped, orjson.dumps(prediction()).replace(b"fraud", b"fr\xffud")):
        out = decoded("prediction", value)
        assert isinstance(out, Rejected) and out.reason.startswith("not JSON"), out


def test_a_redelivery_is_no_conflict_but_other_content_is():
    first = PredictionEvent.model_validate(prediction())
    same = PredictionEvent.model_validate(prediction())
    assert duplicate_reason(same, content_of(first), "came earlier") is None
    # the same instant in another zone is the same timestamp
    shifted = PredictionEvent.model_validate(prediction(timestamp="2026-01-01T01:00:00+01:00"))
    assert duplicate_reason(shifted, content_of(first), "came earlier") is None
    other = PredictionEvent.model_validate(prediction(model_version="4", features=[0.5, 2.5]))
    why = duplicate_reason(other, content_of(first), "is stored already")
    assert why == (
        "duplicate: prediction id 'p1' is stored already with a different "
        "model_version, features; the first is kept"
    )


def test_a_correction_resent_later_is_the_same_correction():
    """The service stamps each call: a client's retry differs only in its timestamp."""
    first = CorrectionEvent.model_validate(correction())
    retry = CorrectionEvent.model_validate(correction(timestamp="2026-01-02T00:00:00Z"))
    assert duplicate_reason(retry, content_of(first), "came earlier") is None
    relabelled = CorrectionEvent.model_validate(correction(label="no"))
    why = duplicate_reason(relabelled, content_of(first), "came earlier")
    assert why is not None and why.startswith("duplicate: correction id 'c1'")
    assert "different label;" in why


def letter_size(r: Rejected) -> int:
    return len(dead_letter(r).to_json())


def test_a_dead_letter_is_bounded_whatever_the_record():
    huge = b"\x01" * (5 * 1024 * 1024)  # control bytes: 6 bytes each once JSON-escaped
    r = Rejected(TOPIC, 3, 99, b"\x01" * 5_000_000, huge, "r\x02" * 5000)
    raw = dead_letter(r).to_json()
    assert len(raw) <= MAX_LETTER_BYTES < MAX_REQUEST_BYTES
    letter = DeadLetter.model_validate_json(raw)
    assert letter.truncated and letter.value_bytes == len(huge)
    assert letter.value_sha256 == hashlib.sha256(huge).hexdigest()
    assert len(letter.value) == VALUE_CAP and len(letter.key or "") == KEY_CAP
    assert len(letter.reason) == MAX_REASON
    assert (letter.topic, letter.partition, letter.offset) == (TOPIC, 3, 99)
    assert letter_key(r.key) == b"\x01" * KEY_CAP


def test_invalid_utf8_is_kept_as_replacement_characters():
    value = b"ok " + b"\xff" * 300_000
    letter = dead_letter(Rejected(TOPIC, 0, 1, b"k", value, "not JSON: x"))
    assert letter.value == "ok " + "\ufffd" * (VALUE_CAP - 3)
    assert letter.truncated and letter.value_bytes == len(value)
    assert letter_size(Rejected(TOPIC, 0, 1, b"k", value, "not JSON")) < 3 * VALUE_CAP + 1024


def test_a_small_record_is_kept_whole_and_a_tombstone_has_no_hash():
    value = orjson.dumps(prediction())
    letter = dead_letter(Rejected(TOPIC, 0, 1, b"p1", value, "schema: x"))
    assert letter.value == value.decode() and not letter.truncated
    assert letter.value_bytes == len(value) and letter.key == "p1"
    tomb = dead_letter(Rejected(TOPIC, 0, 2, b"p1", None, "empty value (tombstone)"))
    assert tomb.value == "" and tomb.value_sha256 is None and tomb.value_bytes == 0


def test_a_letter_written_before_the_bounds_still_reads():
    old = orjson.dumps(
        {
            "schema_version": 1,
            "topic": TOPIC,
            "partition": 0,
            "offset": 1,
            "key": "k",
            "value": "v",
            "reason": "r",
            "timestamp": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
        }
    )
    letter = DeadLetter.model_validate_json(old)
    assert letter.value_sha256 is None and not letter.truncated


def test_events_built_in_code_need_an_aware_time():
    with pytest.raises(ValueError, match="timezone"):
        CorrectionEvent(id="c", prediction_id="p", label="x", timestamp=datetime(2026, 1, 1))
    zone = timezone(timedelta(hours=2))
    assert CorrectionEvent(
        id="c", prediction_id="p", label="x", timestamp=datetime(2026, 1, 1, tzinfo=zone)
    )
