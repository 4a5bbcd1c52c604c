"""Live attribution end to end (issue 28): predictions, scores and corrections produced to
the real broker, the real feedback worker on PostgreSQL and SQLite, and the `outcomes`
table compared with what the events say it must hold -- one row per labelled prediction
and version, none missing, none twice -- including across a SIGKILL of the worker
process mid-stream and its restart ("attribution stays exact across a replica restart").
"""

from __future__ import annotations

import math
import signal
import time
from datetime import timedelta

import orjson
import pytest
from sqlalchemy import func, select

from flywheel.broker import read_topic
from flywheel.events import CorrectionEvent, DeadLetter, PredictionEvent, ScoreEvent, new_id
from flywheel.settings import Settings
from flywheel.store import Outcome, make_engine, session_factory
from tests.deadlines import deadline
from tests.integration.worker_settings import worker_settings

from .test_feedback_crash import env_for, run_worker, stop
from .test_feedback_worker import Traffic, start, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def fb_settings(request, settings: Settings) -> Settings:
    return worker_settings(request, settings, auth="off")


def shadow_scores(events, version: str = "900", role: str = "shadow") -> list[ScoreEvent]:
    """A version's scores of `events`' predictions: the answer's probabilities reversed,
    so it is right exactly where the champion is wrong (two classes)."""
    out = []
    for e, _truth in events:
        labels = sorted(e.probabilities)
        probs = dict(zip(labels, [e.probabilities[x] for x in reversed(labels)], strict=True))
        out.append(
            ScoreEvent(
                prediction_id=e.id,
                model_name=e.model_name,
                model_version=version,
                role=role,
                probabilities=probs,
                label=max(probs, key=probs.get),  # type: ignore[arg-type]
                timestamp=e.timestamp + timedelta(milliseconds=3),
            )
        )
    return out


def send_scores(traffic: Traffic, scores: list[ScoreEvent]) -> None:
    for s in scores:
        traffic.producer.send(
            traffic.s.topic_scores, key=s.prediction_id.encode(), value=s.to_json()
        )
    traffic.producer.flush()


def expected_outcomes(
    predictions: list[PredictionEvent],
    scores: list[ScoreEvent],
    corrections: list[CorrectionEvent],
) -> dict[tuple[str, str], tuple]:
    """What the outcomes table must hold: (prediction, version) -> (answered, true label,
    predicted, correct, log loss), from the first correction of each prediction."""
    first: dict[str, CorrectionEvent] = {}
    for c in sorted(corrections, key=lambda c: (c.timestamp, c.id)):
        first.setdefault(c.prediction_id, c)
    out = {}
    scorers = [(p.id, p.model_version, True, p.probabilities, p.label) for p in predictions]
    scorers += [(s.prediction_id, s.model_version, False, s.probabilities, s.label) for s in scores]
    for pid, version, answered, probs, predicted in scorers:
        c = first.get(pid)
        if c is None:
            continue
        loss = -math.log(max(probs.get(c.label, 0.0), 1e-15))
        out[pid, version] = (answered, c.label, predicted, predicted == c.label, round(loss, 9))
    return out


def stored_outcomes(url: str) -> dict[tuple[str, str], tuple]:
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            return {
                (o.prediction_id, o.model_version): (
                    o.answered,
                    o.label,
                    o.predicted,
                    o.correct,
                    round(o.log_loss, 9),
                )
                for o in session.scalars(select(Outcome))
            }
    finally:
        engine.dispose()


def outcome_count(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(Outcome))
    finally:
        engine.dispose()


def test_the_worker_credits_outcomes_exactly_from_kafka(fb_settings):
    s = fb_settings
    traffic = Traffic(s)
    events = traffic.predictions(120, seed=3)
    scores = shadow_scores(events[:80]) + shadow_scores(events[40:], "901", "guard")
    early = traffic.send_corrections(events[:30])  # before their predictions and scores
    send_scores(traffic, scores[:50])  # some scores before their predictions too
    traffic.send_predictions(events)
    late = traffic.send_corrections(events[30:100])  # 100..119 stay unlabelled
    send_scores(traffic, scores[50:])
    # a second correction of a labelled prediction, with the other label: no new outcome
    p0, truth0 = events[0]
    other = next(label for label in p0.probabilities if label != truth0)
    traffic.send_raw(
        s.topic_corrections,
        p0.id.encode(),
        CorrectionEvent(
            id=new_id(),
            prediction_id=p0.id,
            label=other,
            source="app",
            timestamp=early[0].timestamp + timedelta(seconds=1),
        ).to_json(),
    )
    # a bad score (label not among its probabilities), a conflicting redelivery, a wrong key
    bad = orjson.loads(scores[0].to_json())
    bad["label"] = "nope"
    traffic.send_raw(s.topic_scores, p0.id.encode(), orjson.dumps(bad))
    conflicting = scores[1].model_copy(update={"role": "canary"})
    traffic.send_raw(s.topic_scores, conflicting.prediction_id.encode(), conflicting.to_json())
    traffic.send_raw(s.topic_scores, b"wrong-key", scores[2].to_json())
    send_scores(traffic, scores[:10])  # plain redeliveries: skipped, silently

    predictions = [e for e, _ in events]
    want = expected_outcomes(predictions, scores, early + late)
    assert len(want) == 100 + 80 + 60  # answered, shadow (0..79), guard (40..99)
    worker, stop_event, thread = start(s)
    try:
        wait_for(
            lambda: (
                outcome_count(s.resolved_database_url) >= len(want)
                and worker.stats.dead_letters >= 3
            ),
            what="every outcome and the dead letters",
        )
        time.sleep(1.5)  # anything extra would show up now
    finally:
        stop_event.set()
        thread.join(30)
    assert stored_outcomes(s.resolved_database_url) == want
    # the dead-letter topic also holds letters of other topics (the worker's count above
    # includes them), and the three scores' letters come from different partitions: read
    # until all three are there
    until = time.monotonic() + deadline(30)
    while True:
        letters = [
            DeadLetter.model_validate_json(r.value)
            for r in read_topic(s.kafka_bootstrap, s.topic_deadletter, at_least=3)
        ]
        reasons = sorted(d.reason for d in letters if d.topic == s.topic_scores)
        if len(reasons) >= 3 or time.monotonic() > until:
            break
        time.sleep(0.5)
    assert len(reasons) == 3, reasons
    assert any("is not one of the probabilities' labels" in r for r in reasons)
    assert any(r.startswith("duplicate: score of prediction") and "role" in r for r in reasons)
    assert any("does not match the prediction id" in r for r in reasons)
    assert worker.stats.scores == len(scores)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_attribution_stays_exact_across_a_replica_restart(fb_settings, processes, tmp_path):
    """`flywheel feedback` SIGKILLed mid-stream (no shutdown, no offset commit, maybe
    inside a transaction) and started again: it resumes at the committed offsets, replays
    what was not committed, and the outcomes end exactly as the events say."""
    s = fb_settings
    url = s.resolved_database_url
    traffic = Traffic(s)
    events = traffic.predictions(600, seed=21) + traffic.predictions(300, drifted=True, seed=22)
    scores = shadow_scores(events[::2]) + shadow_scores(events[::3], "901", "guard")
    corrections = traffic.send_corrections(events[:200])  # before their predictions
    send_scores(traffic, scores[: len(scores) // 2])
    traffic.send_predictions(events)
    corrections += traffic.send_corrections(events[200:])
    send_scores(traffic, scores[len(scores) // 2 :])
    want = expected_outcomes([e for e, _ in events], scores, corrections)
    assert len(want) == 900 + 450 + 300

    env = env_for(s, url, s.feedback_group)
    env["FLYWHEEL_TOPIC_SCORES"] = s.topic_scores
    log = tmp_path / "worker.log"
    proc = run_worker(processes, env, log)
    until = time.monotonic() + deadline(120)
    while outcome_count(url) < 150:  # early: a stalled test process must still catch it
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < until, log.read_text()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(deadline(10))
    assert outcome_count(url) < len(want), "the kill should interrupt the run"

    proc = run_worker(processes, env, log)  # the same group: from the committed offsets
    until = time.monotonic() + deadline(180)
    while outcome_count(url) < len(want):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < until, f"{outcome_count(url)} of {len(want)} outcomes"
        time.sleep(0.1)
    time.sleep(2)  # let any duplicate work surface before comparing
    stop(processes, proc, log)
    assert stored_outcomes(url) == want
    assert "Traceback" not in log.read_text()


def test_a_group_of_one_reads_the_scores_topic(fb_settings):
    """The worker subscribes to the scores topic beside the other two (and a scores
    record with no prediction anywhere is stored and waits, crediting nothing)."""
    s = fb_settings
    traffic = Traffic(s)
    [(e, _)] = traffic.predictions(1, seed=9)
    send_scores(traffic, shadow_scores([(e, None)]))
    worker, stop_event, thread = start(s)
    try:
        wait_for(lambda: worker.stats.scores == 1, what="the score stored")
        assert s.topic_scores in {t for t, _ in worker.assignment}
    finally:
        stop_event.set()
        thread.join(30)
    assert outcome_count(s.resolved_database_url) == 0
