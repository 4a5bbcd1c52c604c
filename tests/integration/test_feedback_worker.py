"""The feedback worker on the real broker with PostgreSQL and SQLite: joins in any order,
idempotent under replay and crashes, shares work in a group, dead-letters bad records."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import numpy as np
import orjson
import pytest
import torch
from kafka import KafkaProducer
from sqlalchemy import func, select

from flywheel.broker import read_topic
from flywheel.events import CorrectionEvent, DeadLetter, PredictionEvent, new_id, utcnow
from flywheel.feedback.runner import build_worker
from flywheel.registry import Registry
from flywheel.settings import Settings
from flywheel.store import (
    Correction,
    Example,
    Prediction,
    make_engine,
    session_factory,
    upgrade,
)
from flywheel.streams import Concept, seed_concept
from tests.deadlines import deadline
from tests.integration.worker_settings import worker_settings

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def fb_settings(request, settings: Settings) -> Settings:
    return worker_settings(
        request,
        settings,
        # the pipeline, fed unsigned records; signatures: tests/integration/test_apps.py
        auth="off",
    )


class Traffic:
    """Prediction events from the real champion, on the seed concept or a drifted one."""

    def __init__(self, settings: Settings) -> None:
        loaded = Registry.of(settings).load(Registry.of(settings).champion_version())
        self.s, self.model, self.labels = settings, loaded.module, loaded.spec.labels
        self.version = loaded.version
        self.producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")

    def predictions(
        self, n: int, drifted: bool = False, seed: int = 0
    ) -> list[tuple[PredictionEvent, str]]:
        concept = Concept(self.s.seed + 1) if drifted else seed_concept(self.s.seed)
        x, truth = concept.sample(n, sample_seed=1000 + seed)
        with torch.inference_mode():
            probs = torch.softmax(self.model(torch.from_numpy(x)), 1).numpy()
        out = []
        for row, p, t in zip(x, probs, truth, strict=True):
            pd = {lab: float(v) for lab, v in zip(self.labels, p, strict=True)}
            out.append(
                (
                    PredictionEvent(
                        id=new_id(),
                        model_name=self.s.model_name,
                        model_version=self.version,
                        features=row.tolist(),
                        probabilities=pd,
                        label=max(pd, key=pd.get),
                        timestamp=utcnow(),
                        latency_ms=0.5,
                    ),
                    t,
                )
            )
        return out

    def send_predictions(self, events) -> None:
        for e, _ in events:
            self.producer.send(self.s.topic_predictions, key=e.id.encode(), value=e.to_json())
        self.producer.flush()

    def send_corrections(self, events, source: str = "app") -> list[CorrectionEvent]:
        out = []
        for e, truth in events:
            c = CorrectionEvent(
                id=new_id(), prediction_id=e.id, label=truth, source=source, timestamp=utcnow()
            )
            self.producer.send(self.s.topic_corrections, key=e.id.encode(), value=c.to_json())
            out.append(c)
        self.producer.flush()
        return out

    def send_raw(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        self.producer.send(topic, key=key, value=value)
        self.producer.flush()


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0, what: str = "") -> None:
    until = time.monotonic() + deadline(timeout_s)
    while not condition():
        assert time.monotonic() < until, f"timed out waiting for {what}"
        time.sleep(0.2)


def count(s: Settings, stmt) -> int:
    engine = make_engine(s.resolved_database_url)
    try:
        with session_factory(engine)() as session:
            return session.scalar(stmt)
    finally:
        engine.dispose()


def start(s: Settings, name: str = "w1"):
    worker = build_worker(s, client_id=name)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    return worker, stop, thread


def joined(s: Settings) -> int:
    return count(
        s, select(func.count()).select_from(Correction).where(Correction.status == "joined")
    )


def test_out_of_order_and_late_corrections_join_exactly_once(fb_settings):
    s = fb_settings
    traffic = Traffic(s)
    early = traffic.predictions(30, drifted=True, seed=1)
    normal = traffic.predictions(40, seed=2)
    late = traffic.predictions(10, drifted=True, seed=3)
    worker, stop, thread = start(s)
    try:
        traffic.send_corrections(early)  # corrections first: their predictions are unknown
        wait_for(
            lambda: count(s, select(func.count()).select_from(Correction)) == 30,
            what="early corrections stored as pending",
        )
        assert joined(s) == 0
        traffic.send_predictions(early + normal + late)
        traffic.send_corrections(normal)
        wait_for(lambda: joined(s) == 70, what="early and normal joins")
        traffic.send_corrections(late)  # days later, in production
        wait_for(lambda: joined(s) == 80, what="late joins")
        traffic.send_corrections(normal[:5])  # a client resends: new correction ids
        wait_for(lambda: joined(s) == 85, what="resent corrections")
    finally:
        stop.set()
        thread.join(30)
    engine = make_engine(s.resolved_database_url)
    with session_factory(engine)() as session:
        rows = session.execute(
            select(
                Example.origin,
                Example.label,
                Example.split,
                Example.error_type,
                Example.parent_prediction_id,
                Example.features,
            ).where(Example.origin != "seed")
        ).all()
        assert session.scalar(select(func.count()).select_from(Prediction)) == 80
    engine.dispose()
    truth = {e.id: t for e, t in early + normal + late}
    corrections = [r for r in rows if r.origin == "correction"]
    assert len(corrections) == 85
    assert all(r.label == truth[r.parent_prediction_id] for r in rows)
    assert {r.split for r in corrections} <= {"train", "holdout", "quarantine"}
    wrong = [r for r in corrections if r.error_type is not None]
    assert wrong, "the drifted traffic should contain errors"
    counterexamples = [r for r in rows if r.origin == "counterexample"]
    assert counterexamples, "trainable errors get counterexamples"
    parents = {r.parent_prediction_id: r for r in corrections}
    for cx in counterexamples:
        parent = parents[cx.parent_prediction_id]
        assert parent.split == "train" and cx.split == "train"
        assert cx.error_type == parent.error_type is not None
    assert worker.stats.joined == 85


def test_every_kind_of_bad_message_reaches_the_dead_letter_topic(fb_settings):
    s = fb_settings
    traffic = Traffic(s)
    good = traffic.predictions(3)
    bad = {
        "not JSON": (s.topic_predictions, b"k1", b"{oops"),
        "expected a JSON object": (s.topic_predictions, b"k2", b"[1, 2]"),
        "unsupported schema_version": (
            s.topic_predictions,
            b"k3",
            orjson.dumps({"schema_version": 2, "id": "k3"}),
        ),
        "schema": (
            s.topic_corrections,
            b"k4",
            orjson.dumps({"schema_version": 1, "id": "c4", "prediction_id": "k4"}),
        ),
        "does not match": (
            s.topic_corrections,
            b"someone-else",
            CorrectionEvent(
                id="c5", prediction_id="k5", label="class_0", timestamp=utcnow()
            ).to_json(),
        ),
        "empty value": (s.topic_predictions, b"k6", None),
    }
    worker, stop, thread = start(s)
    try:
        for topic, key, value in bad.values():
            traffic.send_raw(topic, key, value)
        traffic.send_predictions(good)
        traffic.send_corrections(good)
        wait_for(lambda: worker.stats.dead_letters == len(bad), what="dead letters")
        wait_for(lambda: joined(s) == 3, what="good records still flow")
    finally:
        stop.set()
        thread.join(30)
    letters = [
        DeadLetter.model_validate_json(r.value)
        for r in read_topic(s.kafka_bootstrap, s.topic_deadletter, at_least=len(bad))
    ]
    assert len(letters) == len(bad)
    for fragment, (topic, key, _) in bad.items():
        match = [d for d in letters if fragment in d.reason and d.topic == topic]
        assert match, f"no dead letter saying {fragment!r}: {[d.reason for d in letters]}"
        assert match[0].key == key.decode()


def test_two_workers_in_one_group_share_partitions_without_duplicates(fb_settings):
    """...and one source's counterexample budget: the two together spend it exactly
    once (the drifted traffic's errors want many times more)."""
    budget = 40
    s = fb_settings.model_copy(update={"counterexample_budget": budget})
    traffic = Traffic(s)
    events = traffic.predictions(300, drifted=True, seed=4)
    w1, stop1, t1 = start(s, "w1")
    w2, stop2, t2 = start(s, "w2")
    try:
        # traffic only once the group has settled: a member that joins late would find
        # its share already stored by the other one (a rebalance takes seconds)
        everything = {
            (t, p)
            for t in (s.topic_predictions, s.topic_corrections, s.topic_scores)
            for p in range(s.topic_partitions)
        }
        wait_for(
            lambda: (
                w1.assignment
                and w2.assignment
                and w1.assignment | w2.assignment == everything
                and not w1.assignment & w2.assignment
            ),
            timeout_s=deadline(90),
            what="both members own partitions",
        )
        traffic.send_predictions(events)
        traffic.send_corrections(events)
        wait_for(lambda: joined(s) == 300, timeout_s=90, what="all joins")
        time.sleep(1.0)  # would a duplicate show up?
    finally:
        stop1.set()
        stop2.set()
        t1.join(30)
        t2.join(30)
    assert w1.stats.joined + w2.stats.joined == 300
    assert w1.stats.predictions > 0 and w2.stats.predictions > 0, "both got partitions"
    assert w1.stats.predictions + w2.stats.predictions == 300
    assert (
        count(s, select(func.count()).select_from(Example).where(Example.origin == "correction"))
        == 300
    )
    assert (
        count(
            s, select(func.count()).select_from(Example).where(Example.origin == "counterexample")
        )
        == budget
    )


def test_replayed_batches_change_nothing(fb_settings):
    """Kafka redelivers after a crash: the same records twice must leave one copy."""
    s = fb_settings
    traffic = Traffic(s)
    events = traffic.predictions(50, drifted=True, seed=5)
    traffic.send_predictions(events)
    traffic.send_corrections(events)
    snapshots = []
    for _ in range(2):  # a fresh group each time reads everything from the beginning again
        s = s.model_copy(update={"feedback_group": f"fb-{uuid.uuid4().hex[:6]}"})
        worker, stop, thread = start(s)
        wait_for(lambda w=worker: w.stats.records >= 100, what="every record consumed")
        stop.set()
        thread.join(30)
        assert worker.stats.dead_letters == 0  # the same content again: no conflict
        engine = make_engine(s.resolved_database_url)
        with session_factory(engine)() as session:
            snapshots.append(
                sorted(
                    session.execute(
                        select(
                            Example.dedup_key,
                            Example.label,
                            Example.split,
                            Example.error_type,
                            Example.features,
                        )
                    ).all()
                )
            )
        engine.dispose()
    assert snapshots[0] == snapshots[1]
    assert np.isfinite(np.asarray([r.features for r in snapshots[0]], dtype=float)).all()


def test_error_report_from_the_store_and_the_cli(fb_settings):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from flywheel.feedback import error_report

    s = fb_settings
    traffic = Traffic(s)
    events = traffic.predictions(60, seed=7) + traffic.predictions(60, drifted=True, seed=8)
    worker, stop, thread = start(s)
    try:
        traffic.send_predictions(events)
        traffic.send_corrections(events)
        wait_for(lambda: joined(s) == 120, what="joins")
    finally:
        stop.set()
        thread.join(30)
    truth_wrong = sum(1 for e, t in events if e.label != t)
    engine = make_engine(s.resolved_database_url)
    with session_factory(engine)() as session:
        report = error_report(session, s.model_name)
        by_type = dict(
            session.execute(
                select(Example.error_type, func.count())
                .where(Example.origin == "correction")
                .group_by(Example.error_type)
            ).all()
        )
    engine.dispose()
    [version] = report["versions"]
    assert version["corrections"] == 120 and version["errors"] == truth_wrong
    assert version["error_rate"] == pytest.approx(truth_wrong / 120)
    assert version["error_types"] == {k: v for k, v in by_type.items() if k is not None}
    assert sum(c["count"] for c in version["confusions"]) <= truth_wrong
    assert version["confusions"][0]["predicted"] != version["confusions"][0]["actual"]

    from flywheel.broker import free_port
    from flywheel.feedback.metrics import FeedbackCollector, serve_metrics

    engine = make_engine(s.resolved_database_url)
    port = free_port()
    server, _ = serve_metrics(port, FeedbackCollector(worker, engine, s.model_name))
    try:
        import httpx

        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.shutdown()
        engine.dispose()
    assert "flywheel_feedback_joined_total 120.0" in text
    assert (
        f'flywheel_feedback_error_rate{{model_version="{version["model_version"]}"}} '
        f"{truth_wrong / 120}"
    ) in text
    for error_type, n in version["error_types"].items():
        assert (
            f'flywheel_feedback_errors{{error_type="{error_type}",'
            f'model_version="{version["model_version"]}"}} {float(n)}'
        ) in text

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {"FLYWHEEL_HOME": str(s.home_dir), "FLYWHEEL_DATABASE_URL": s.database_url}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "flywheel"), "feedback", "report", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=deadline(120),
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["versions"] == report["versions"]


def test_an_observer_sees_the_assignment_and_every_step(fb_settings):
    """The public hook `bench feedback` times the worker with: the group's assignment,
    then each step, on the thread that ran it."""
    from flywheel.feedback import WorkerObserver, WorkerStep

    seen: list[tuple[str, str]] = []
    assigned: list[list] = []

    class Recorder(WorkerObserver):
        def on_assigned(self, partitions):
            assigned.append(sorted(partitions))

        def timed(self, name, seconds):
            seen.append((WorkerStep(name).value, threading.current_thread().name))

    s = fb_settings
    traffic = Traffic(s)
    events = traffic.predictions(20, drifted=True, seed=6)
    traffic.send_predictions(events)
    traffic.send_corrections(events)
    worker = build_worker(s, client_id="observed", observer=Recorder())
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="consumer", daemon=True)
    thread.start()
    try:
        wait_for(lambda: worker.stats.joined == 20, what="every correction joined")
    finally:
        stop.set()
        thread.join(30)
    assert assigned and {t for t, _ in assigned[0]} == {
        s.topic_predictions,
        s.topic_corrections,
        s.topic_scores,  # live attribution (issue 28)
    }
    steps = set(seen)
    for step in ("poll", "decode", "commit offsets"):
        assert (step, "consumer") in steps, step
    for step in (
        "store batch",
        "transaction",
        "store + join",
        "analysis",
        "example inserts",
        "sweep",
    ):
        assert (step, "feedback-store") in steps, step
    assert ("analysis", "consumer") in steps  # batches are prepared on the consumer thread


@pytest.mark.parametrize("revision", [None, "0001"])
def test_worker_refuses_an_unmigrated_or_older_store(settings, tmp_path, revision):
    import os
    import subprocess
    import sys
    from pathlib import Path

    url = f"sqlite:///{tmp_path / 'old.db'}"
    if revision:
        upgrade(url, revision)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {
        "FLYWHEEL_HOME": str(settings.home_dir),
        "FLYWHEEL_DATABASE_URL": url,
        "FLYWHEEL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
    }
    out = subprocess.run(
        [str(Path(sys.executable).parent / "flywheel"), "feedback"],
        env=env,
        capture_output=True,
        text=True,
        timeout=deadline(120),
    )
    assert out.returncode == 1
    assert "run `flywheel db upgrade`" in out.stderr and "Traceback" not in out.stderr


def test_a_record_the_store_path_refuses_is_dead_lettered_alone(fb_settings):
    """A valid-looking record whose write fails (here: analysis raises on it) must not
    stall the partition: it goes to the dead-letter topic, its batch-mates are stored."""
    s = fb_settings
    traffic = Traffic(s)
    events = traffic.predictions(12, drifted=True, seed=9)
    poison = events[4][0].id
    worker = build_worker(s, client_id="poison")
    analyze = worker.analysis.prepare

    def fails_on_poison(pairs):  # on either thread: preparing a batch, or in its transaction
        if any(p.prediction_id == poison for p in pairs):
            raise ValueError(f"cannot analyze {poison}")
        return analyze(pairs)

    worker.analysis.prepare = fails_on_poison
    traffic.send_predictions(events)
    traffic.send_corrections(events)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(
            lambda: worker.stats.dead_letters >= 1 and joined(s) == 11,
            what="the poison record dead-lettered, the rest joined",
        )
    finally:
        stop.set()
        thread.join(30)
    letters = [
        DeadLetter.model_validate_json(r.value)
        for r in read_topic(s.kafka_bootstrap, s.topic_deadletter, at_least=1)
    ]
    store_letters = [d for d in letters if d.reason.startswith("store: ValueError")]
    assert [d.key for d in store_letters] == [poison]
    assert poison in store_letters[0].reason
    assert (
        count(
            s,
            select(func.count()).select_from(Example).where(Example.parent_prediction_id == poison),
        )
        == 0
    )


@pytest.mark.slow
@pytest.mark.parametrize("hold_s", [60.0, 0.0])  # 60 s: more than a slow machine's read
def test_a_backlog_is_read_in_time_order_so_corrections_join_as_they_are_written(
    fb_settings, hold_s
):
    """A worker starting on a backlog of both topics reads corrections in step with the
    predictions, by record time: none waits as `pending` for a prediction that is in
    Kafka but not read yet. The backlog is larger than one fetch per partition (1 MB),
    so the client's queue holds corrections next to predictions it has not fetched yet;
    with alignment off, those corrections are read first and wait."""
    s = fb_settings.model_copy(
        update={
            "feedback_align_hold_s": hold_s,
            "feedback_max_records": 2000,
            "counterexample_budget": 0,
        }
    )
    traffic = Traffic(s)
    events = traffic.predictions(12_000, seed=13)
    traffic.send_predictions(events)
    traffic.send_corrections(events)
    worker, stop, thread = start(s)
    try:
        wait_for(lambda: joined(s) == 12_000, timeout_s=180, what="all joins")
    finally:
        stop.set()
        thread.join(30)
    assert worker.stats.joined == 12_000
    if hold_s:
        assert worker.stats.pending == 0
    else:
        assert worker.stats.pending > 0
