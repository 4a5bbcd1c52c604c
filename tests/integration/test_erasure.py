"""Erasure of a data subject end to end, on SQLite and PostgreSQL: the real broker, a real
feedback worker filling the store from two subjects' corrections and subject-less ones,
`flywheel privacy forget` as a process, then a second worker replaying both topics from
the beginning. Erasure removes exactly the subject's rows (every table compared row by row
before and after), is idempotent, its receipt holds no raw id, and a replayed correction of
the erased subject is not stored again while everyone else's replay changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from flywheel.events import CorrectionEvent, new_id, utcnow
from flywheel.settings import Settings
from flywheel.store import make_engine
from flywheel.subjects import privacy_unit, subject_key
from tests.integration.worker_settings import worker_settings

from .test_feedback_worker import Traffic, start, wait_for

pytestmark = pytest.mark.integration
KEY = "erasure-platform-secret-" + "k" * 32
ALICE, BOB = "alice@example.com", "bob-4711"
KEPT_BY_DESIGN = {"erasure_receipts", "learner_leases"}  # the receipt; the worker's upkeep lease


@pytest.fixture(params=["sqlite", "postgresql"])
def erasure_settings(request, settings: Settings) -> Settings:
    return worker_settings(
        request,
        settings,
        auth="off",  # unsigned records straight onto the topics
        subject_key=SecretStr(KEY),
    )


def _rows(url: str) -> dict[str, set[tuple]]:
    """Every row of every table, by table (JSON columns as text, so rows are hashable)."""
    engine = make_engine(url)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return {
                t.name: {
                    tuple(json.dumps(v, sort_keys=True, default=str) for v in row)
                    for row in conn.execute(t.select())
                }
                for t in meta.sorted_tables
                if not t.name.startswith("predictions_p")  # PostgreSQL's day partitions
                and t.name != "alembic_version"
            }
    finally:
        engine.dispose()


def _select(url: str, stmt: str, **params: object) -> list[tuple]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(stmt), params)]
    finally:
        engine.dispose()


def _send(traffic: Traffic, events, subject: str | None, source: str) -> list[CorrectionEvent]:
    out = []
    for e, truth in events:
        c = CorrectionEvent(
            id=new_id(),
            prediction_id=e.id,
            label=truth,
            source=source,
            timestamp=utcnow(),
            subject=subject,
        )
        traffic.producer.send(traffic.s.topic_corrections, key=e.id.encode(), value=c.to_json())
        out.append(c)
    traffic.producer.flush()
    return out


def _forget(s: Settings, raw: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(
        FLYWHEEL_HOME=str(s.home),
        FLYWHEEL_DATABASE_URL=str(s.database_url),
        FLYWHEEL_KAFKA_BOOTSTRAP=str(s.kafka_bootstrap),
        FLYWHEEL_SUBJECT_KEY=KEY,
    )
    done = subprocess.run(
        [sys.executable, "-m", "flywheel", "privacy", "forget", "--subject", raw, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _run_worker(s: Settings, records: int) -> None:
    """A worker of a fresh group (it reads both topics from the beginning) until it has
    consumed `records`; stopped even when the wait fails."""
    s = s.model_copy(update={"feedback_group": f"fb-{uuid.uuid4().hex[:6]}"})
    worker, stop, thread = start(s)
    try:
        wait_for(lambda: worker.stats.records >= records, 120, f"{records} records consumed")
        wait_for(lambda: worker.stats.batches > 0, 60, "a stored batch")
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive(), "the worker did not stop"
    assert worker.stats.dead_letters == 0


@pytest.fixture()
def filled(erasure_settings: Settings) -> Iterator[tuple[Settings, int]]:
    """The store after a worker took 3 x 40 predictions and their corrections: Alice's
    (from two apps), Bob's and subject-less ones; drifted, so counterexamples are made."""
    s = erasure_settings
    traffic = Traffic(s)
    try:
        batches = [traffic.predictions(40, drifted=True, seed=k) for k in range(3)]
        for events in batches:
            traffic.send_predictions(events)
        alice = subject_key(ALICE, KEY)
        _send(traffic, batches[0][:20], alice, "shop")
        _send(traffic, batches[0][20:], alice, "crm")
        _send(traffic, batches[1], subject_key(BOB, KEY), "shop")
        _send(traffic, batches[2], None, "shop")
    finally:
        traffic.producer.close()
    _run_worker(s, 240)
    yield s, 240


def test_forget_removes_every_row_of_one_subject_and_no_other(filled):
    s, records = filled
    url = s.resolved_database_url
    alice, unit = subject_key(ALICE, KEY), privacy_unit(subject_key(ALICE, KEY), "")
    wait_for(
        lambda: (
            _select(url, "SELECT count(*) FROM corrections WHERE status = 'joined'")[0][0] == 120
        ),
        60,
        "every correction joined",
    )
    before = _rows(url)
    pids = {
        r[0]
        for r in _select(url, "SELECT prediction_id FROM corrections WHERE subject = :s", s=alice)
    }
    assert len(pids) == 40
    # the subject's examples: those of its corrections and the counterexamples derived
    # from them, found here by the prediction they come from, not by the unit erasure uses
    derived = _select(url, "SELECT id, origin, privacy_unit, parent_prediction_id FROM examples")
    alices = {r[0] for r in derived if r[3] in pids}
    assert {r[1] for r in derived if r[3] in pids} >= {"correction", "counterexample"}
    assert alices == {r[0] for r in derived if r[2] == unit}

    receipt = _forget(s, ALICE)
    assert receipt["subject"] == alice and receipt["repeated"] is False
    assert receipt["deleted"] == {
        "corrections": 40,
        "predictions": 40,
        "examples": len(alices),
        "scores": 0,
        "outcomes": 40,  # the answering version's, one per labelled prediction (issue 28)
    }
    assert receipt["first_example_id"] == min(alices)
    assert receipt["non_dp_versions"] == []  # only the seed champion: not trained on traffic

    after = _rows(url)
    gone = {t: before[t] - after.get(t, set()) for t in before}
    assert {t for t, rows in gone.items() if rows} == {
        "corrections",
        "predictions",
        "examples",
        "outcomes",
    }
    assert {json.loads(r[0]) for r in gone["outcomes"]} == pids
    assert all(not (after[t] - before[t]) for t in before if t not in KEPT_BY_DESIGN)
    assert len(gone["corrections"]) == 40 and len(gone["predictions"]) == 40
    assert len(gone["examples"]) == len(alices)
    assert not _select(
        url, "SELECT id FROM predictions WHERE id IN (" + ",".join(f"'{p}'" for p in pids) + ")"
    )
    assert not _select(url, "SELECT id FROM examples WHERE privacy_unit = :u", u=unit)
    assert len(_select(url, "SELECT id FROM corrections")) == 80  # Bob's and the subject-less

    # the receipt: the keyed hash, never the raw id (nor anything else of hers)
    stored = "\n".join(repr(r) for r in after["erasure_receipts"])
    assert ALICE not in stored and alice in stored and "cli:" in stored

    # idempotent: a second request deletes nothing and says so, with a receipt of its own
    again = _forget(s, ALICE)
    assert again["deleted"] == {
        "corrections": 0,
        "predictions": 0,
        "examples": 0,
        "scores": 0,
        "outcomes": 0,
    }
    assert again["repeated"] is True and again["first_example_id"] == min(alices)
    assert len(_rows(url)["erasure_receipts"]) == 2

    # a replay of both topics: Alice's corrections are not stored again; nothing else changes
    _run_worker(s, records)
    assert not _select(url, "SELECT id FROM corrections WHERE subject = :s", s=alice)
    assert not _select(url, "SELECT id FROM examples WHERE privacy_unit = :u", u=unit)
    replayed = _rows(url)
    for table in ("corrections", "examples", "counterexample_usage", "error_counts", "outcomes"):
        assert replayed[table] == after[table], table
    # her predictions' features are on the predictions topic until its retention drops
    # them (docs/privacy.md): the replay stores them again, linked to no subject
    assert replayed["predictions"] >= after["predictions"]
