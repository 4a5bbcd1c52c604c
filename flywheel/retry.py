"""Waiting out a dependency that is down: one backoff policy for every process.

`flywheel serve`, `flywheel feedback` and `flywheel learn` meet PostgreSQL (the store),
Kafka and MLflow (the registry). Before this module, each failed in its own way: the
feedback worker gave up after 1.5 s of store retries and exited (measured: PostgreSQL down
22 s, both workers gone until something restarted them, a 25-30 s boot under load), while
the learner retried at a fixed pace. Now each retries with the same policy for as long as
the dependency is down, says so on its health endpoint and in the gauge
`flywheel_dependency_up{dependency=...}`, and resumes by itself; it exits only on what no
retry can fix (a store schema too old or too new, bad configuration, refused credentials),
with a message that says which.

The pause before retry n (0-based) is drawn from the upper half of
`min(cap, initial * 2**n)`: capped, so an outage of an hour costs one attempt every
`cap` seconds, and jittered, so a fleet of workers that lost the store together does not
reconnect in lock-step.

>>> policy = Backoff(initial_s=0.5, cap_s=4.0)
>>> [policy.ceiling(n) for n in range(5)]
[0.5, 1.0, 2.0, 4.0, 4.0]
>>> import random
>>> 2.0 <= policy.delay(9, random.Random(1)) <= 4.0
True
>>> status = DependencyStatus()
>>> status.down("store", ConnectionRefusedError(111, "connection refused"))
>>> status.ready, status.reasons()
(False, {'store': 'ConnectionRefusedError: [Errno 111] connection refused'})
>>> status.up("store")
>>> status.ready
True
"""

from __future__ import annotations

import logging
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from flywheel.chatter import outage_over

__all__ = [
    "DEPENDENCIES",
    "Backoff",
    "DependencyStatus",
    "Fatal",
    "dependency_of",
    "fatal_reason",
    "retry_call",
    "transient",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
DEPENDENCIES = ("store", "kafka", "registry")  # PostgreSQL/SQLite, the broker, MLflow

# PostgreSQL SQLSTATE classes no retry fixes: 28 refused credentials, 3D no such database,
# 42 a statement the schema does not fit (an un-migrated store reaches the worker as this)
_FATAL_SQLSTATE_CLASSES = ("28", "3D", "42")
_FATAL_TEXT = (
    "password authentication failed",
    "no pg_hba.conf entry",
    'role "',  # role "x" does not exist
    "authentication failed",
    "permission denied",
)
# librdkafka error names no retry fixes (confluent_kafka.KafkaError.name())
_FATAL_KAFKA = {
    "SASL_AUTHENTICATION_FAILED",
    "_AUTHENTICATION",
    "TOPIC_AUTHORIZATION_FAILED",
    "GROUP_AUTHORIZATION_FAILED",
    "CLUSTER_AUTHORIZATION_FAILED",
    "_SSL",
    "_INVALID_ARG",
    "_UNKNOWN_GROUP",
}
_KAFKA_PYTHON_FATAL = (
    "AuthenticationFailedError",
    "SaslAuthenticationFailedError",
    "AuthorizationError",
    "TopicAuthorizationFailedError",
    "GroupAuthorizationFailedError",
    "ClusterAuthorizationFailedError",
    "UnsupportedSaslMechanismError",
)
_KAFKA_PYTHON_DOWN = ("NoBrokersAvailable", "KafkaConnectionError", "KafkaTimeoutError")
_TRANSIENT_MLFLOW = {
    "TEMPORARILY_UNAVAILABLE",
    "INTERNAL_ERROR",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
    "ABORTED",
}
_TRANSIENT_TEXT = (
    "connection refused",
    "connection reset",
    "could not connect",
    "failed to establish a new connection",
    "max retries exceeded",
    "timed out",
    "temporarily unavailable",
    "server closed the connection",
    "terminating connection",
    "the database system is starting up",
    "the database system is shutting down",
    "database is locked",
    "connection is closed",
    "connection is lost",
    "broker transport failure",
    "all broker connections are down",
)


class Fatal(RuntimeError):
    """A dependency refused in a way no retry fixes; the message says what to change."""


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: pause n is in [ceiling(n)/2, ceiling(n)].

    `initial_s`, `cap_s`: FLYWHEEL_RETRY_INITIAL_S and FLYWHEEL_RETRY_MAX_S
    (`Backoff.of(settings.retry)`)."""

    initial_s: float = 0.2
    cap_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.cap_s:
            raise ValueError(f"need 0 < initial_s <= cap_s, got {self.initial_s}, {self.cap_s}")

    @classmethod
    def of(cls, retry: Any) -> Backoff:
        """From a `RetrySettings` group (typed Any: contracts name no settings group here)."""
        return cls(retry.retry_initial_s, retry.retry_max_s)

    def ceiling(self, attempt: int) -> float:
        """The longest pause before retry `attempt` (0-based): doubling, then capped."""
        if attempt >= 64:  # 2**64 times any positive initial is past every cap
            return self.cap_s
        return min(self.cap_s, self.initial_s * 2 ** max(0, attempt))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """A pause for retry `attempt`, drawn from the upper half of its ceiling: never
        longer than the cap, never shorter than half of it once there."""
        top = self.ceiling(attempt)
        return top * (0.5 + 0.5 * (rng or random).random())

    def pauses(self, rng: random.Random | None = None) -> Iterator[float]:
        """Endless pauses, one per retry."""
        attempt = 0
        while True:
            yield self.delay(attempt, rng)
            attempt += 1


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)  # SQLAlchemy's DBAPI error
        if isinstance(orig, BaseException) and id(orig) not in seen:
            yield orig
            seen.add(id(orig))
        current = current.__cause__ or current.__context__


def fatal_reason(exc: BaseException) -> str | None:
    """Why `exc` is one no retry fixes (refused credentials, no such database, a schema this
    code does not fit, a broker refusing the client), or None."""
    for e in _chain(exc):
        if isinstance(e, Fatal):
            return str(e)
        sqlstate = getattr(e, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in _FATAL_SQLSTATE_CLASSES:
            return f"the database refused: {_first_line(e)} (SQLSTATE {sqlstate})"
        kafka_error = _kafka_error(e)
        if kafka_error is not None and (kafka_error.fatal() or kafka_error.name() in _FATAL_KAFKA):
            return f"Kafka refused: {kafka_error.str()} ({kafka_error.name()})"
        if isinstance(e, _kafka_python_errors(_KAFKA_PYTHON_FATAL)):
            return f"Kafka refused: {_first_line(e)}"
        code = getattr(e, "error_code", None)
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            return f"MLflow refused: {_first_line(e)} ({code})"
        text = _first_line(e).lower()
        if any(t in text for t in _FATAL_TEXT):
            return f"refused: {_first_line(e)}"
    return None


def transient(exc: BaseException) -> bool:
    """Whether `exc` says a dependency is down or busy (retry it), as opposed to a refusal
    (`fatal_reason`) or a bug (neither: it propagates as it is)."""
    if fatal_reason(exc) is not None:
        return False
    sa = sys.modules.get("sqlalchemy.exc")
    kafka_errors = sys.modules.get("kafka.errors")
    psycopg = sys.modules.get("psycopg")
    kafka_down = _kafka_python_errors(_KAFKA_PYTHON_DOWN)
    for e in _chain(exc):
        if isinstance(e, ConnectionError | TimeoutError | socket.gaierror):
            return True
        if sa is not None and isinstance(
            e, sa.OperationalError | sa.InterfaceError | sa.DisconnectionError | sa.TimeoutError
        ):
            return True
        if sa is not None and isinstance(e, sa.DBAPIError) and e.connection_invalidated:
            return True
        if psycopg is not None and isinstance(e, psycopg.OperationalError | psycopg.InterfaceError):
            return True  # raised directly on the COPY path (the driver connection)
        if _kafka_error(e) is not None:
            return True  # not fatal (checked above): librdkafka says retriable or transport
        if kafka_errors is not None and isinstance(e, kafka_errors.KafkaError):
            return bool(getattr(e, "retriable", False)) or isinstance(e, kafka_down)
        code = getattr(e, "error_code", None)
        if code in _TRANSIENT_MLFLOW:
            return True
        text = _first_line(e).lower()
        if any(t in text for t in _TRANSIENT_TEXT):
            return True
    return False


def dependency_of(exc: BaseException, default: str = "store") -> str:
    """Which dependency `exc` came from, by its library: "kafka" (confluent-kafka,
    kafka-python), "registry" (MLflow), "store" (SQLAlchemy); else `default`. MLflow on a
    SQL store raises SQLAlchemy's errors too: those count as "store"."""
    for e in _chain(exc):
        module = type(e).__module__
        if _kafka_error(e) is not None or module.startswith(("confluent_kafka", "kafka")):
            return "kafka"
        if module.startswith("mlflow"):
            return "registry"
        if module.startswith(("sqlalchemy", "psycopg", "sqlite3")):
            return "store"
    return default


def _kafka_python_errors(names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    """The kafka-python exception classes of `names` that its installed version has (their
    names moved between releases); none if kafka-python was never imported."""
    module = sys.modules.get("kafka.errors")
    if module is None:
        return ()
    return tuple(c for n in names if isinstance(c := getattr(module, n, None), type))


def _kafka_error(e: BaseException) -> Any:
    """The confluent_kafka.KafkaError inside a KafkaException, if `e` is one."""
    confluent = sys.modules.get("confluent_kafka")
    if confluent is None or not isinstance(e, confluent.KafkaException):
        return None
    err = e.args[0] if e.args else None
    return err if isinstance(err, confluent.KafkaError) else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class DependencyStatus:
    """Which dependencies a process reached last time it tried: for its readiness answer
    and the gauge `flywheel_dependency_up{dependency=...}` (register it as a Prometheus
    collector). Thread-safe; a dependency never reported counts as up."""

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._down: dict[str, str] = {}
        self._names: list[str] = list(names)

    def up(self, name: str) -> None:
        with self._lock:
            self._note(name)
            if self._down.pop(name, None) is not None:
                log.info("%s is back", name)
                if name == "kafka":
                    outage_over()  # ends the count of the clients' chatter

    def down(self, name: str, exc: BaseException | str) -> None:
        why = exc if isinstance(exc, str) else f"{type(exc).__name__}: {_first_line(exc)}"
        with self._lock:
            self._note(name)
            self._down[name] = why

    def _note(self, name: str) -> None:
        if name not in self._names:
            self._names.append(name)

    def is_up(self, name: str) -> bool:
        return name not in self._down

    @property
    def ready(self) -> bool:
        return not self._down

    def reasons(self) -> dict[str, str]:
        """The dependencies that are down, each with the last error seen."""
        with self._lock:
            return dict(self._down)

    def states(self) -> dict[str, bool]:
        """Every dependency reported so far, up (True) or down."""
        with self._lock:
            return {n: n not in self._down for n in self._names}

    def collect(self) -> Iterator[Any]:
        """Prometheus collector protocol: one gauge sample per dependency (1 up, 0 down)."""
        from prometheus_client.core import GaugeMetricFamily

        gauge = GaugeMetricFamily(
            "flywheel_dependency_up",
            "1 while the process reaches the dependency, 0 while it retries it",
            labels=["dependency"],
        )
        for name, up in self.states().items():
            gauge.add_metric([name], 1.0 if up else 0.0)
        yield gauge


def retry_call(
    fn: Callable[[], T],
    *,
    dependency: str | Callable[[BaseException], str],
    policy: Backoff,
    status: DependencyStatus | None = None,
    stop: threading.Event | None = None,
    what: str = "",
    sleep: Callable[[float], Any] | None = None,
    rng: random.Random | None = None,
) -> T:
    """`fn()`, retried after each transient failure (`transient`) with `policy`'s pauses
    until it succeeds; `status` says `dependency` is down meanwhile and up again after
    (`dependency` may be a function of the error, e.g. `dependency_of`).

    A refusal no retry fixes raises `Fatal` (with the reason); any other exception (a bug)
    propagates at once. If `stop` is set while waiting, the last error is raised.
    """
    attempt = 0
    first_failure = 0.0
    down: set[str] = set()
    last = dependency if isinstance(dependency, str) else ""
    while True:
        try:
            result = fn()
        except Exception as exc:
            name = last = dependency if isinstance(dependency, str) else dependency(exc)
            reason = fatal_reason(exc)
            if reason is not None:
                raise Fatal(f"{name}: {reason}") from exc
            if not transient(exc):
                raise
            if status is not None:
                status.down(name, exc)
                down.add(name)
            if attempt == 0:
                first_failure = time.monotonic()
            pause = policy.delay(attempt, rng)
            log.warning(
                "%s%s unavailable (%s); retry %d in %.1f s",
                name,
                f" ({what})" if what else "",
                _first_line(exc),
                attempt + 1,
                pause,
            )
            attempt += 1
            if stop is not None:
                if stop.wait(pause):
                    raise
            else:
                (sleep or time.sleep)(pause)
            continue
        if status is not None:
            for name in down or ({last} if last else set()):
                status.up(name)
        if attempt:
            log.info(
                "%s reached again after %.1f s and %d retries",
                ", ".join(sorted(down)) or last,
                time.monotonic() - first_failure,
                attempt,
            )
        return result
