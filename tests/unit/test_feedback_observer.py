"""The feedback worker reports its steps to a public observer (what `bench feedback`
times), so nothing outside the worker needs its private methods."""

from __future__ import annotations

import threading
from collections import Counter

import orjson
import pytest

from flywheel.events import SCHEMA_VERSION, prediction_payload, utcnow
from flywheel.feedback import FeedbackWorker, WorkerObserver, WorkerStep
from flywheel.feedback.messages import decode
from flywheel.feedback.writer import Batch
from flywheel.settings import FeedbackSettings, KafkaSettings
from flywheel.store import make_engine, upgrade


class Recorder(WorkerObserver):
    """Overrides only `timed`: the default `step` times each step and reports it here."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []
        self.assigned: list[list] = []

    def timed(self, name: WorkerStep, seconds: float) -> None:
        assert seconds >= 0
        self.steps.append((str(name), threading.current_thread().name))

    def on_assigned(self, partitions: list) -> None:
        self.assigned.append(partitions)


class FakeAnalysis:
    def __init__(self) -> None:
        self.prepared = 0

    def prepare(self, pairs):
        self.prepared += len(pairs)
        return list(pairs)

    def finish(self, session, prepared):
        return [], [], Counter()

    def count(self, session, outcomes):
        pass


@pytest.fixture()
def worker(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    upgrade(url)
    engine = make_engine(url)
    kafka = KafkaSettings(kafka_bootstrap="127.0.0.1:9")
    recorder = Recorder()
    yield (
        FeedbackWorker(FeedbackSettings(), kafka, engine, FakeAnalysis(), observer=recorder),
        recorder,
    )
    engine.dispose()


def events(kafka: KafkaSettings):
    now = utcnow()
    p = prediction_payload(
        id="p1",
        model_name="m",
        model_version="1",
        features=[1.0, 2.0],
        probabilities={"a": 0.25, "b": 0.75},
        label="b",
        timestamp=now,
        latency_ms=1.0,
    )
    c = orjson.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "id": "c1",
            "prediction_id": "p1",
            "label": "a",
            "timestamp": now,
        }
    )
    return [
        decode("prediction", kafka.topic_predictions, 0, 0, b"p1", p),
        decode("correction", kafka.topic_corrections, 0, 0, b"p1", c),
    ]


def test_the_store_thread_steps_reach_the_observer(worker):
    w, recorder = worker
    batch = Batch([(None, e) for e in events(w.kafka)], [], {}, 2)
    w.writer.store_batch(batch)  # the general path (no plan): store + join, then analysis
    assert w.stats.joined == 1 and w.analysis.prepared == 1
    names = [name for name, _ in recorder.steps]
    # nested steps end first: the outer step is reported after its inner ones
    assert names == [
        "store + join",
        "analysis",
        "analysis",
        "example inserts",
        "transaction",
        "store batch",
    ]
    recorder.steps.clear()
    w.sweep()
    assert [name for name, _ in recorder.steps][-2:] == ["transaction", "sweep"]


def test_the_default_observer_does_nothing_and_steps_are_named():
    observer = WorkerObserver()
    with observer.step(WorkerStep.POLL):
        pass
    observer.on_assigned([("t", 0)])
    observer.on_revoked([("t", 0)])
    assert WorkerStep.STORE_JOIN == "store + join" and len(set(WorkerStep)) == len(WorkerStep)
