"""Real parts for integration tests: the embedded Kafka-protocol broker and MLflow stores.

The broker fixture uses the same `EmbeddedBroker` code as `flywheel broker`.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from flywheel.broker import EmbeddedBroker, ensure_topics, read_topic
from flywheel.settings import Settings, prepare_home
from tests.conftest import AppKey, make_app_key
from tests.deadlines import deadline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_file=log) as b:
        yield b


@pytest.fixture()
def topics_suffix() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture()
def settings(tmp_path: Path, broker: EmbeddedBroker, topics_suffix: str) -> Settings:
    """Settings on a fresh home, the session broker and topics of this test only."""
    s = Settings(
        home=tmp_path / "home",
        kafka_bootstrap=broker.bootstrap,
        topic_predictions=f"predictions-{topics_suffix}",
        topic_corrections=f"corrections-{topics_suffix}",
        topic_model_events=f"model-events-{topics_suffix}",
        topic_deadletter=f"deadletter-{topics_suffix}",
        topic_scores=f"scores-{topics_suffix}",
        seed_examples=1000,
        spool_retry_s=0.2,
        spool_fsync=False,
        # the default delivery timeout (5 s) and more: a stalled CI machine must not turn
        # a slow acknowledgement into a spooled, resent (duplicate) record
        kafka_timeout_s=10.0,
        # a learner that stopped without letting its lineage's lease go (a test's crash) is
        # taken over after 3 s, not 15
        learn_lease_s=3.0,
        learn_lease_renew_s=1.0,
    )
    prepare_home(s)
    ensure_topics(broker.bootstrap, s.topics, s.topic_partitions)
    return s


@pytest.fixture()
def use_insert_path(monkeypatch) -> Callable[[str], None]:
    """`use_insert_path(path)`: PostgreSQL's bulk inserts take only `path` -- "copy"
    (COPY even for one row), "columnar" or "general" -- the other fast paths turned off."""
    import flywheel.store.bulk as bulk

    def use(path: str) -> None:
        if path not in ("copy", "columnar", "general"):
            raise ValueError(f"unknown insert path {path!r}")
        if path == "copy":
            monkeypatch.setattr(bulk, "COPY_MIN_ROWS", 1)
        monkeypatch.setattr(bulk, "INSERT_PATHS", frozenset({path, "general"}))

    return use


def consume(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0
) -> list[tuple[bytes, bytes]]:
    """(key, value) of every record on `topic`, waiting up to `timeout_s` for `expected`."""
    return [
        (r.key, r.value)
        for r in read_topic(bootstrap, topic, at_least=expected, timeout_s=deadline(timeout_s))
    ]


@pytest.fixture()
def wait_for_lock_wait() -> Callable[..., None]:
    """`wait_for_lock_wait(sessions)`: return once another backend of the sessions'
    PostgreSQL database waits for a lock (a row's, or an advisory one); fail after
    `timeout_s`. How a test knows its second transaction is blocked by its first."""

    def wait(sessions: Any, timeout_s: float = 10.0) -> None:
        until = time.monotonic() + deadline(timeout_s)
        with sessions() as probe:
            while time.monotonic() < until:
                waiting = probe.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                ).scalar_one()
                probe.rollback()  # a fresh snapshot next time
                if waiting:
                    return
                time.sleep(0.02)
        raise AssertionError("the second transaction never waited for the first")

    return wait


@pytest.fixture()
def own_postgres() -> Iterator[Any]:
    """A PostgreSQL server of this test's own (`bench._pg_server.PgServer`),
    started; the test may kill and restart it. Stopped and deleted after the test. Without
    initdb: skipped locally, a failure under CI=true."""
    from bench._pg_server import PgServer, find_pg_bin

    bin_dir = find_pg_bin()
    if bin_dir is None:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail("initdb/pg_ctl not found: this test starts its own PostgreSQL")
        pytest.skip("initdb/pg_ctl not found: this test starts its own PostgreSQL")
    server = PgServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture()
def service_key(settings: Settings) -> AppKey:
    """App `tests` (every scope) in the store of `settings`, migrated first: a service on
    these settings accepts `headers=service_key.headers`."""
    from flywheel.store import upgrade

    upgrade(settings.resolved_database_url)
    return make_app_key(settings.resolved_database_url)
