"""The shared backoff policy (`flywheel.retry`): caps, jitter bounds, which errors are
retried, which are fatal, and what a retried call reports while it waits."""

from __future__ import annotations

import random
import threading

import confluent_kafka
import pytest
from sqlalchemy.exc import OperationalError, ProgrammingError

from flywheel.retry import Backoff, DependencyStatus, Fatal, fatal_reason, retry_call, transient
from flywheel.settings import RetrySettings, Settings


class _PgError(Exception):
    """A DBAPI error as psycopg raises it: the server's SQLSTATE on `.sqlstate`."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _operational(message: str, sqlstate: str | None = None) -> OperationalError:
    return OperationalError("SELECT 1", {}, _PgError(message, sqlstate))


def test_ceilings_double_then_stay_at_the_cap():
    policy = Backoff(initial_s=0.25, cap_s=3.0)
    assert [policy.ceiling(n) for n in range(6)] == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.ceiling(10_000) == 3.0  # no overflow, however long the outage


@pytest.mark.parametrize("attempt", [0, 1, 2, 5, 40, 500])
def test_every_pause_lies_in_the_upper_half_of_its_ceiling(attempt):
    policy = Backoff(initial_s=0.1, cap_s=30.0)
    rng = random.Random(attempt)
    pauses = [policy.delay(attempt, rng) for _ in range(2000)]
    top = policy.ceiling(attempt)
    assert all(top / 2 <= p <= top for p in pauses)
    assert max(pauses) <= 30.0
    # jittered: workers that failed together spread out over the whole half
    assert max(pauses) - min(pauses) > 0.4 * top


def test_pauses_are_endless_and_capped():
    pauses = Backoff(0.5, 2.0).pauses(random.Random(0))
    first = [next(pauses) for _ in range(50)]
    assert 0.25 <= first[0] <= 0.5 and all(1.0 <= p <= 2.0 for p in first[3:])


def test_policy_refuses_an_initial_pause_above_its_cap():
    with pytest.raises(ValueError):
        Backoff(initial_s=5, cap_s=1)
    with pytest.raises(ValueError, match="FLYWHEEL_RETRY_INITIAL_S"):
        Settings(retry_initial_s=5, retry_max_s=1)


def test_policy_of_the_settings_group():
    policy = Backoff.of(RetrySettings(retry_initial_s=0.5, retry_max_s=7))
    assert (policy.initial_s, policy.cap_s) == (0.5, 7)
    assert Backoff.of(Settings().retry) == Backoff(0.2, 30.0)


@pytest.mark.parametrize(
    "exc",
    [
        _operational('connection to server at "127.0.0.1", port 5432 failed: Connection refused'),
        _operational("the database system is starting up", "57P03"),
        _operational("database is locked"),
        _operational("could not serialize access", "40001"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
        confluent_kafka.KafkaException(
            confluent_kafka.KafkaError(confluent_kafka.KafkaError._ALL_BROKERS_DOWN)
        ),
    ],
    ids=["pg-down", "pg-starting", "sqlite-busy", "serialization", "refused", "timeout", "kafka"],
)
def test_outages_are_retried(exc):
    assert fatal_reason(exc) is None
    assert transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        _operational('password authentication failed for user "flywheel"', "28P01"),
        _operational('database "nope" does not exist', "3D000"),
        ProgrammingError("SELECT", {}, _PgError('relation "examples" does not exist', "42P01")),
        confluent_kafka.KafkaException(
            confluent_kafka.KafkaError(confluent_kafka.KafkaError.SASL_AUTHENTICATION_FAILED)
        ),
        Fatal("store: schema too old"),
        PermissionError(13, "Permission denied"),
    ],
    ids=["bad-password", "no-database", "schema", "kafka-sasl", "fatal", "permission"],
)
def test_refusals_are_fatal_and_never_retried(exc):
    assert fatal_reason(exc) is not None
    assert not transient(exc)


def test_a_bug_is_neither_retried_nor_called_fatal():
    for exc in (ValueError("bad value"), KeyError("x"), ZeroDivisionError()):
        assert fatal_reason(exc) is None and not transient(exc)


def test_an_outage_behind_a_wrapping_exception_is_still_an_outage():
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError as inner:
            raise RuntimeError("loading the champion failed") from inner
    except RuntimeError as outer:
        assert transient(outer)


def test_retry_call_waits_out_an_outage_and_reports_it():
    status = DependencyStatus(("store",))
    seen: list[bool] = []
    pauses: list[float] = []
    calls = iter([ConnectionRefusedError(111, "refused")] * 4 + [None])

    def attempt() -> str:
        seen.append(status.is_up("store"))
        error = next(calls)
        if error is not None:
            raise error
        return "ok"

    result = retry_call(
        attempt,
        dependency="store",
        policy=Backoff(0.1, 0.4),
        status=status,
        sleep=pauses.append,
        rng=random.Random(3),
    )
    assert result == "ok"
    assert seen == [True, False, False, False, False]  # down from the first failure on
    assert status.ready and status.states() == {"store": True}
    assert len(pauses) == 4 and all(0.05 <= p <= 0.4 for p in pauses)
    assert pauses[3] >= 0.2  # the later pauses reach the cap's upper half


def test_retry_call_raises_fatal_at_once_with_the_reason():
    calls = []

    def refused() -> None:
        calls.append(1)
        raise _operational('password authentication failed for user "x"', "28P01")

    with pytest.raises(Fatal, match="store: .*password authentication failed"):
        retry_call(refused, dependency="store", policy=Backoff(), sleep=lambda _: None)
    assert calls == [1]


def test_retry_call_lets_a_bug_through_at_once():
    def bug() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError):
        retry_call(bug, dependency="store", policy=Backoff(), sleep=lambda _: None)


def test_retry_call_gives_up_when_stopped():
    stop = threading.Event()
    stop.set()

    def down() -> None:
        raise ConnectionRefusedError(111, "refused")

    with pytest.raises(ConnectionRefusedError):
        retry_call(down, dependency="kafka", policy=Backoff(), stop=stop)


def test_dependency_status_is_a_prometheus_gauge():
    from prometheus_client import CollectorRegistry, generate_latest

    status = DependencyStatus(("store", "kafka"))
    status.down("kafka", "all brokers down")
    registry = CollectorRegistry()
    registry.register(status)
    text = generate_latest(registry).decode()
    assert 'flywheel_dependency_up{dependency="store"} 1.0' in text
    assert 'flywheel_dependency_up{dependency="kafka"} 0.0' in text
    assert not status.ready and status.reasons() == {"kafka": "all brokers down"}


def test_dependency_of_names_the_library_an_outage_came_from():
    from flywheel.retry import dependency_of

    kafka = confluent_kafka.KafkaException(
        confluent_kafka.KafkaError(confluent_kafka.KafkaError._TRANSPORT)
    )
    assert dependency_of(kafka) == "kafka"
    assert dependency_of(_operational("connection refused")) == "store"
    assert dependency_of(ConnectionRefusedError(111, "x"), default="registry") == "registry"


def test_retry_call_marks_the_dependency_the_error_names():
    from flywheel.retry import dependency_of

    status = DependencyStatus(("store", "kafka"))
    seen: list[dict[str, bool]] = []
    calls = iter([_operational("connection refused"), None])

    def attempt() -> None:
        seen.append(status.states())
        error = next(calls)
        if error is not None:
            raise error

    retry_call(attempt, dependency=dependency_of, policy=Backoff(0.01, 0.01), status=status)
    assert seen[1] == {"store": False, "kafka": True}
    assert status.ready


def test_the_learner_backs_off_between_failed_steps_and_stops_on_a_refusal(tmp_path):
    from types import SimpleNamespace

    from flywheel.learner import LearnerConfig, OnlineLearner
    from flywheel.store import make_engine

    config = LearnerConfig.of(Settings(home=tmp_path, retry_initial_s=0.5, retry_max_s=2.0))
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")  # the lease's; never used here
    learner = OnlineLearner(config, registry=None, source=SimpleNamespace(engine=engine))  # type: ignore[arg-type]
    outage = _operational('connection to server at "127.0.0.1" failed: Connection refused')
    pauses = [learner.failure_pause(outage) for _ in range(6)]
    assert 0.25 <= pauses[0] <= 0.5 and all(1.0 <= p <= 2.0 for p in pauses[2:])
    assert learner.dependencies.states() == {"store": False, "registry": True}
    learner.recovered()  # a step went through: everything answered, back to short pauses
    assert learner.dependencies.ready
    assert learner.failure_pause(outage) <= 0.5
    with pytest.raises(Fatal, match="password authentication failed"):
        learner.failure_pause(_operational('password authentication failed for "x"', "28P01"))
    engine.dispose()


def test_psycopg_errors_of_the_copy_path_are_outages_unless_refusals():
    import psycopg

    assert transient(psycopg.OperationalError("the connection is lost"))
    assert transient(psycopg.InterfaceError("the connection is closed"))
    assert not transient(psycopg.errors.InvalidPassword("password authentication failed"))
