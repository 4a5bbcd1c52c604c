"""A feedback worker SIGKILLed mid-run and restarted leaves the store exactly as an
uninterrupted run over the same records does (the CLI process, real broker, both DBs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from flywheel.learner import ensure_champion
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
from flywheel.store.models import ErrorCount
from tests.deadlines import deadline
from tests.processes import ProcessGroup
from tests.trusted import write_synthetic_trusted

from .test_feedback_worker import Traffic

# 600 s, not the default 300: these start and wait for processes (fixture set-up counts)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


def env_for(s: Settings, url: str, group: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {
        "FLYWHEEL_HOME": str(s.home_dir),
        "FLYWHEEL_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "FLYWHEEL_DATABASE_URL": url,
        "FLYWHEEL_FEEDBACK_GROUP": group,
        "FLYWHEEL_TOPIC_PREDICTIONS": s.topic_predictions,
        "FLYWHEEL_TOPIC_CORRECTIONS": s.topic_corrections,
        "FLYWHEEL_TOPIC_MODEL_EVENTS": s.topic_model_events,
        "FLYWHEEL_TOPIC_DEADLETTER": s.topic_deadletter,
        "FLYWHEEL_TOPIC_SCORES": s.topic_scores,
        "FLYWHEEL_SEED_EXAMPLES": str(s.seed_examples),
        "FLYWHEEL_FEEDBACK_SESSION_TIMEOUT_MS": "6000",
        "FLYWHEEL_FEEDBACK_MAX_RECORDS": "10",  # many small transactions to die inside
        "FLYWHEEL_AUTH": "off",  # Traffic sends unsigned corrections
        # out of reach: which errors get variants under a binding budget depends on the
        # order batches were cut in, which a crash changes by design
        "FLYWHEEL_COUNTEREXAMPLE_BUDGET": "100000",
    }
    return env


def second_schema(pg_url: str, name: str) -> str:
    """A fresh schema in the test database, as its own store (via search_path)."""
    from sqlalchemy import text

    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS store_{name} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA store_{name}"))
    engine.dispose()
    return f"{pg_url}?options=-csearch_path%3Dstore_{name}"


def joined(url: str) -> int:
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            return session.scalar(
                select(func.count()).select_from(Correction).where(Correction.status == "joined")
            )
    finally:
        engine.dispose()


def wait_joined(
    url: str, n: int, proc: subprocess.Popen, log: Path, timeout_s: float = 120
) -> None:
    engine = make_engine(url)
    count = select(func.count()).select_from(Correction).where(Correction.status == "joined")
    until = time.monotonic() + deadline(timeout_s)
    try:
        while True:
            with engine.connect() as conn:
                done = conn.scalar(count)
            if done >= n:
                return
            assert proc.poll() is None, f"worker exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < until, f"only {done} of {n} joined"
            time.sleep(0.01)
    finally:
        engine.dispose()


def snapshot(url: str) -> dict[str, list]:
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            return {
                "predictions": sorted(session.scalars(select(Prediction.id))),
                "corrections": sorted(
                    session.execute(select(Correction.id, Correction.status)).all()
                ),
                "examples": sorted(
                    session.execute(
                        select(
                            Example.dedup_key,
                            Example.origin,
                            Example.label,
                            Example.split,
                            Example.error_type,
                            Example.parent_prediction_id,
                            Example.features,
                            Example.weight,
                        )
                    ).all()
                ),
                "error_counts": sorted(
                    session.execute(
                        select(
                            ErrorCount.model_version,
                            ErrorCount.hour,
                            ErrorCount.predicted,
                            ErrorCount.actual,
                            ErrorCount.outcome,
                            ErrorCount.count,
                        )
                    ).all()
                ),
            }
    finally:
        engine.dispose()


def run_worker(processes: ProcessGroup, env: dict, log: Path) -> subprocess.Popen:
    """`flywheel feedback` in its own process group (stopped by `processes` even when the
    test fails), its output appended to `log` (a pipe nobody reads could fill and stall it)."""
    with log.open("ab") as out:
        return processes.start([FLYWHEEL, "feedback"], env=env, stdout=out, stderr=out)


def stop(processes: ProcessGroup, proc: subprocess.Popen, log: Path) -> None:
    assert processes.stop(proc, timeout_s=60) == 0, log.read_text()[-3000:]


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_sigkill_mid_run_then_restart_equals_an_uninterrupted_run(
    db, request, settings, tmp_path, processes
):
    if db == "sqlite":
        urls = [f"sqlite:///{tmp_path / f'store{i}.db'}" for i in range(2)]
    else:
        urls = [second_schema(request.getfixturevalue("pg_url"), name) for name in ("a", "b")]
    for url in urls:
        upgrade(url)
        write_synthetic_trusted(settings, database_url=url)
    ensure_champion(settings.trusted, Registry.of(settings))
    traffic = Traffic(settings)
    events = traffic.predictions(800, seed=11) + traffic.predictions(400, drifted=True, seed=12)
    traffic.send_corrections(events[:300])  # some corrections before their predictions
    traffic.send_predictions(events)
    traffic.send_corrections(events[300:])

    crashed, clean = urls
    group = f"crash-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "worker.log"
    proc = run_worker(processes, env_for(settings, crashed, group), log)
    # early: a stalled test process must still catch it mid-run
    wait_joined(crashed, 100, proc, log)
    proc.send_signal(signal.SIGKILL)  # no shutdown, no offset commit, maybe mid-transaction
    proc.wait(deadline(10))
    assert joined(crashed) < 1200, "the crash should interrupt the run"
    # resumes at the committed offsets
    proc = run_worker(processes, env_for(settings, crashed, group), log)
    wait_joined(crashed, 1200, proc, log)
    time.sleep(2)  # let any duplicate work surface before comparing
    stop(processes, proc, log)

    log = tmp_path / "clean.log"
    proc = run_worker(processes, env_for(settings, clean, f"clean-{uuid.uuid4().hex[:6]}"), log)
    wait_joined(clean, 1200, proc, log)
    time.sleep(2)
    stop(processes, proc, log)
    a, b = snapshot(crashed), snapshot(clean)
    assert len(a["predictions"]) == 1200 and len(a["corrections"]) == 1200
    for table in a:
        assert a[table] == b[table], f"{table} differs after the crash"
