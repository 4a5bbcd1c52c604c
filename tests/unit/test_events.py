import math
from datetime import UTC, datetime

import orjson
import pytest
from pydantic import ValidationError

from flywheel.events import CorrectionEvent, PredictionEvent, new_id, prediction_payload


def test_prediction_payload_is_a_valid_prediction_event():
    ts = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    raw = prediction_payload(
        id="abc",
        model_name="m",
        model_version="3",
        features=[1.0, 2.5],
        probabilities={"a": 0.25, "b": 0.75},
        label="b",
        timestamp=ts,
        latency_ms=1.5,
    )
    event = PredictionEvent.model_validate_json(raw)
    assert (event.id, event.model_version, event.label, event.timestamp) == ("abc", "3", "b", ts)
    assert event.schema_version == 1
    assert orjson.loads(raw)["schema_version"] == 1


def test_unknown_schema_version_is_refused():
    doc = {
        "schema_version": 2,
        "id": "x",
        "prediction_id": "p",
        "label": "a",
        "timestamp": "2026-01-01T00:00:00Z",
    }
    with pytest.raises(ValidationError, match="schema_version"):
        CorrectionEvent.model_validate(doc)


def test_non_finite_features_are_refused():
    with pytest.raises(ValidationError, match="finite"):
        PredictionEvent(
            id="a",
            model_name="m",
            model_version="1",
            features=[math.nan],
            probabilities={},
            label="x",
            timestamp=datetime.now(UTC),
            latency_ms=0,
        )


def test_correction_round_trip_and_id_shape():
    e = CorrectionEvent(
        id=new_id(), prediction_id=new_id(), label="a", source="site-1", timestamp=datetime.now(UTC)
    )
    assert CorrectionEvent.model_validate_json(e.to_json()) == e
    with pytest.raises(ValidationError):
        CorrectionEvent(id="x", prediction_id="has space", label="a", timestamp=e.timestamp)
    assert len({new_id() for _ in range(1000)}) == 1000


def test_a_named_row_rides_along_without_a_new_schema_version():
    """`row` is optional and additive: `PredictionEvent` (the feedback worker's reader)
    ignores it, `NamedPredictionEvent` reads it, and records without it read as None."""
    from flywheel.events import NamedPredictionEvent

    ts = datetime(2026, 1, 2, tzinfo=UTC)
    common = dict(
        id="abc",
        model_name="m",
        model_version="3",
        features=[12.5, 0.0],
        probabilities={"a": 0.25, "b": 0.75},
        label="b",
        timestamp=ts,
        latency_ms=1.5,
    )
    with_row = prediction_payload(**common, row={"amount": 12.5, "country": 2**70, "ok": None})
    assert orjson.loads(with_row)["schema_version"] == 1
    assert PredictionEvent.model_validate_json(with_row).features == [12.5, 0.0]
    row = NamedPredictionEvent.model_validate_json(with_row).row
    assert row == {"amount": 12.5, "country": str(2**70), "ok": None}  # beyond 64 bits: text
    assert NamedPredictionEvent.model_validate_json(prediction_payload(**common)).row is None
