"""Retention's settings refuse windows that would lose data, and a feedback worker's sweep
runs the store's maintenance when the store says it is due (one worker an interval)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from flywheel.events import PredictionEvent
from flywheel.feedback import FeedbackWorker
from flywheel.feedback.join import store_and_join
from flywheel.settings import FeedbackSettings, KafkaSettings
from flywheel.store import Prediction, RetentionPolicy, make_engine, session_factory, upgrade

DAY = 86_400.0


def test_retention_shorter_than_the_correction_window_is_refused() -> None:
    with pytest.raises(ValidationError, match="FLYWHEEL_RETENTION_PREDICTIONS_S"):
        FeedbackSettings(correction_expiry_s=9 * DAY)  # default retention: 8 days
    with pytest.raises(ValidationError, match="FLYWHEEL_RETENTION_CORRECTIONS_S"):
        FeedbackSettings(retention_corrections_s=7 * DAY)  # = the default expiry
    ok = FeedbackSettings(correction_expiry_s=9 * DAY, retention_predictions_s=9 * DAY)
    policy = RetentionPolicy.of(ok)
    assert policy.predictions_s == 9 * DAY and policy.usage_s == ok.counterexample_window_s


class NoAnalysis:
    def prepare(self, pairs):
        return list(pairs)

    def finish(self, session, prepared):
        return [], [], Counter()

    def count(self, session, outcomes):
        pass


def test_sweep_runs_maintenance_once_an_interval(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    upgrade(url)
    engine = make_engine(url)
    old = datetime.now(UTC) - timedelta(days=9)
    with session_factory(engine).begin() as session:
        event = PredictionEvent(
            id="old",
            model_name="m",
            model_version="1",
            features=[1.0],
            probabilities={"a": 1.0},
            label="a",
            timestamp=old,
            latency_ms=1.0,
        )
        store_and_join(session, [event], [], old)
    kafka = KafkaSettings(kafka_bootstrap="127.0.0.1:9")
    try:
        workers = [
            FeedbackWorker(FeedbackSettings(), kafka, engine, NoAnalysis()) for _ in range(2)
        ]
        workers[0].sweep()
        assert workers[0].stats.maintenance_runs == 1
        with session_factory(engine)() as session:
            assert session.scalars(select(Prediction.id)).all() == []
        workers[0].sweep()  # asks again only MAINTENANCE_TRY_S later
        workers[1].sweep()  # asks, but the group's run is not due for an hour
        assert [w.stats.maintenance_runs for w in workers] == [1, 0]
        off = FeedbackWorker(FeedbackSettings(retention_every_s=0), kafka, engine, NoAnalysis())
        off.sweep()
        assert off.stats.maintenance_runs == 0 and off.stats.maintenance_failures == 0
    finally:
        engine.dispose()
