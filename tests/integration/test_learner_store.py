"""The learner against a real store (PostgreSQL) and MLflow: cursor, restarts, late commits."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text, update

from flywheel.learner import LearnerConfig, OnlineLearner, ensure_champion
from flywheel.registry import Registry
from flywheel.settings import Settings
from flywheel.store import Example, make_engine, session_factory
from flywheel.store import upgrade as upgrade_store
from tests.deadlines import deadline
from tests.examples import add_drift_examples, learner_env
from tests.trusted import write_synthetic_trusted

pytestmark = pytest.mark.integration
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


@pytest.fixture()
def s(settings: Settings, pg_url: str) -> Settings:
    s = settings.model_copy(
        update={
            "database_url": pg_url,
            "learn_batch": 50,
            "learn_cursor_grace_s": 0.0,
            "gate_min_holdout": 5,
        }
    )
    upgrade_store(pg_url)
    ensure_champion(s.trusted, Registry.of(s))
    write_synthetic_trusted(s)
    return s


def trained_ranges(s: Settings) -> list[tuple[int, int]]:
    """(first, last) example id of every online candidate, oldest first."""
    out = []
    for v in sorted(Registry.of(s).versions(with_runs=True), key=lambda v: int(v.version)):
        if v.tags.get("source") == "online":
            out.append((int(v.params["first_example_id"]), int(v.params["last_example_id"])))
    return out


def test_killed_learner_resumes_at_its_cursor_without_retraining(s):
    add_drift_examples(s.database_url, 120, 0)
    add_drift_examples(s.database_url, 30, 10_000, split="holdout")
    proc = subprocess.Popen(
        [FLYWHEEL, "learn"], env=learner_env(s), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        until = time.monotonic() + deadline(90)
        while not trained_ranges(s):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < until, "no candidate in 90 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(deadline(10))
    finally:
        if proc.poll() is None:
            proc.kill()
    add_drift_examples(s.database_url, 100, 20_000)
    r = subprocess.run(
        [FLYWHEEL, "learn", "--once"],
        env=learner_env(s),
        capture_output=True,
        text=True,
        timeout=deadline(120),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ranges = trained_ranges(s)
    assert len(ranges) == 2, ranges
    (a0, a1), (b0, b1) = ranges
    assert a1 < b0  # the second update starts after the first: nothing trained twice
    # everything trainable was used by one of them, up to the leftover below one batch
    train_ids = _ids(s.database_url, "train")
    used = [i for i in train_ids if a0 <= i <= a1 or b0 <= i <= b1]
    assert len(used) == 200 and len(train_ids) - len(used) == 20


def _ids(url: str, split: str) -> list[int]:
    engine = make_engine(url)
    with engine.connect() as c:
        ids = [
            r[0]
            for r in c.execute(
                text(
                    "SELECT id FROM examples WHERE origin = 'correction' AND split = :s ORDER BY id"
                ),
                {"s": split},
            )
        ]
    engine.dispose()
    return ids


def test_a_crash_between_registering_and_saving_the_cursor_adopts_the_version(s, monkeypatch):
    add_drift_examples(s.database_url, 50, 0)
    learner = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    learner.start()

    def die(*_a, **_k):
        raise RuntimeError("killed before saving")

    monkeypatch.setattr(learner.source, "save_state", die)
    with pytest.raises(RuntimeError):
        learner.step()
    [registered] = trained_ranges(s)
    monkeypatch.undo()
    add_drift_examples(s.database_url, 50, 5000)
    again = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    candidate = again.step()
    assert candidate is not None and candidate.first_id > registered[1]
    assert candidate.parent_version == str(int(candidate.version) - 1)  # continued its line


def test_examples_committed_late_and_released_from_quarantine_are_not_skipped(s):
    s = s.model_copy(update={"learn_batch": 1, "learn_cursor_grace_s": 60.0})
    learner = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    learner.start()
    engine = make_engine(s.database_url)
    slow = engine.connect()
    tx = slow.begin()  # takes an id now, commits after a later id is read
    slow.execute(
        text(
            "INSERT INTO examples (dedup_key, origin, features, label, weight, split) "
            "VALUES ('late', 'correction', '[0,0,0,0,0,0,0,0]', 'class_0', 1.0, 'train')"
        )
    )
    add_drift_examples(s.database_url, 1, 0)
    add_drift_examples(s.database_url, 1, 1, split="quarantine")
    first = learner.step()
    tx.commit()
    slow.close()
    assert first is not None and first.examples == 1
    late = learner.step()
    assert late is not None and late.last_id < first.last_id  # the late id, read after all
    assert learner.step() is None  # nothing new; the quarantined one is held
    with session_factory(engine).begin() as session:
        session.execute(update(Example).where(Example.split == "quarantine").values(split="train"))
    released = learner.step()
    assert released is not None and released.examples == 1
    assert learner.step() is None
    engine.dispose()
    assert np.isfinite(first.lr)


def test_released_examples_beyond_one_batch_wait_for_the_next_update(s):
    s = s.model_copy(update={"learn_batch": 2, "learn_cursor_grace_s": 60.0})
    learner = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    learner.start()
    add_drift_examples(s.database_url, 3, 0, split="quarantine")
    add_drift_examples(s.database_url, 2, 100)
    first = learner.step()
    assert first.examples == 2  # the two train rows; the three are held
    engine = make_engine(s.database_url)
    with session_factory(engine).begin() as session:
        session.execute(update(Example).where(Example.split == "quarantine").values(split="train"))
    engine.dispose()
    two_released = learner.step()
    assert two_released.examples == 2 and learner.step() is None  # one released left over
    add_drift_examples(s.database_url, 1, 200)
    last = learner.step()
    assert last is not None and last.examples == 2
    # the left-over released example (ids below the first train rows') is in it
    assert two_released.last_id < last.first_id < first.first_id


def _features(url: str, ids: list[int]) -> np.ndarray:
    engine = make_engine(url)
    with engine.connect() as c:
        rows = c.execute(text("SELECT id, features FROM examples WHERE origin = 'correction'"))
        wanted = set(ids)
        out = np.asarray([f for i, f in rows if i in wanted], dtype=np.float32)
    engine.dispose()
    return out


def _found(rows: np.ndarray, among: np.ndarray) -> np.ndarray:
    """For each row, whether it is (up to float32 rounding) one of `among`."""
    if not len(rows):
        return np.zeros(0, dtype=bool)
    gaps = np.abs(rows[:, None, :] - among[None, :, :]).max(axis=2)
    return gaps.min(axis=1) < 1e-5


@pytest.mark.parametrize("error_drift", [True, False])
def test_a_restart_after_an_error_drift_replays_only_examples_since_it(s, error_drift):
    """The replay pool and the window "since the change" survive a restart as they were."""
    from flywheel.learner.cursor import CursorState

    s = s.model_copy(update={"privacy_enabled": False})
    add_drift_examples(s.database_url, 100, 0)
    add_drift_examples(s.database_url, 100, 30_000)
    ids = _ids(s.database_url, "train")
    cut = ids[100]
    learner = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    state = {
        "update": 0,
        "cursor": CursorState(watermark=ids[-1]).to_dict(),
        "change_at_id": cut,
        "elastic": {"multiplier": 3.0, "drifts": 1},
    }
    if error_drift:
        state["replay_from_id"] = cut
    learner.source.save_state(learner.lineage, state, ids[-1])
    learner.start()
    trainer = learner._trainer
    assert trainer is not None
    pool = trainer.reservoir.x[: trainer.reservoir.size]
    before, since = _features(s.database_url, ids[:100]), _features(s.database_url, ids[100:])
    # the window: exactly the 100 examples since the change
    assert len(trainer.since_change) == 100 and _found(trainer.since_change.x, since).all()
    assert _found(since, pool).all()
    # an error drift drops the old pool (seed data included); an input shift alone keeps it
    assert _found(pool, before).any() != error_drift
    assert (len(pool) == 100) == error_drift and trainer.replay_reset == error_drift
