"""The feedback worker's decode of `flywheel.scores` records (ScoreEvent, issue 28): a bad
one is refused with the reason (and dead-lettered by the worker), a redelivery is no
conflict, other content under the same (prediction, version) is."""

from __future__ import annotations

import orjson
import pytest

from flywheel.events import ScoreEvent
from flywheel.feedback.messages import Rejected, content_of, decode, duplicate_reason, identity

TOPIC = "flywheel.scores"


def score(**changes) -> dict:
    doc = {
        "schema_version": 1,
        "prediction_id": "p1",
        "model_name": "fraud",
        "model_version": "4",
        "role": "shadow",
        "probabilities": {"no": 0.75, "yes": 0.25},
        "label": "no",
        "timestamp": "2026-01-01T00:00:00Z",
    }
    doc.update(changes)
    return doc


def decoded(doc: dict | bytes, key: bytes | None = b"p1"):
    value = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return decode("score", TOPIC, 2, 7, key, value)


def test_a_valid_score_decodes():
    e = decoded(score())
    assert isinstance(e, ScoreEvent)
    assert (e.prediction_id, e.model_version, e.role, e.label) == ("p1", "4", "shadow", "no")


@pytest.mark.parametrize(
    ("doc", "key", "fragment"),
    [
        (b"{not json", b"p1", "not JSON"),
        (score(schema_version=2), b"p1", "unsupported schema_version 2"),
        ({k: v for k, v in score().items() if k != "schema_version"}, b"p1", "schema_version"),
        (score(label="maybe"), b"p1", "label 'maybe' is not one of the probabilities' labels"),
        (score(probabilities={"no": 1.5, "yes": 0.2}), b"p1", "probabilities.no"),
        (score(role=""), b"p1", "role"),
        (score(role="x" * 17), b"p1", "role"),
        (score(model_version="4\x00"), b"p1", "model_version"),
        (score(timestamp="2026-01-01T00:00:00"), b"p1", "timestamp"),
        ({k: v for k, v in score().items() if k != "prediction_id"}, b"p1", "prediction_id"),
        (score(), b"p2", "does not match the prediction id 'p1'"),
        (score(), None, "does not match the prediction id 'p1'"),
        ([1, 2], b"p1", "expected a JSON object"),
    ],
)
def test_a_bad_score_is_refused_with_the_reason(doc, key, fragment):
    r = decoded(doc, key)
    assert isinstance(r, Rejected), r
    assert fragment in r.reason
    assert (r.topic, r.partition, r.offset) == (TOPIC, 2, 7)


def test_a_tombstone_is_refused():
    r = decode("score", TOPIC, 0, 0, b"p1", None)
    assert isinstance(r, Rejected) and "tombstone" in r.reason


def test_a_score_is_identified_by_prediction_and_version():
    a, b = decoded(score()), decoded(score(model_version="5"))
    assert isinstance(a, ScoreEvent) and isinstance(b, ScoreEvent)
    assert identity(a) != identity(b)
    assert identity(a) == identity(decoded(score(role="guard")))  # type: ignore[arg-type]


def test_a_redelivered_score_is_no_conflict_but_other_content_is():
    a = decoded(score())
    assert isinstance(a, ScoreEvent)
    assert duplicate_reason(a, content_of(a), "came earlier") is None
    other = decoded(score(probabilities={"no": 0.1, "yes": 0.9}, label="yes"))
    assert isinstance(other, ScoreEvent)
    why = duplicate_reason(other, content_of(a), "came earlier in the batch")
    assert why == (
        "duplicate: score of prediction 'p1' by version '4' came earlier in the batch with a "
        "different probabilities, label; the first is kept"
    )
