"""Wiring the event log to Kafka and the spool from the broker, event-log and state groups."""

from __future__ import annotations

from functools import partial

from flywheel.kafka_security import confluent_options
from flywheel.service.event_log import EventLog
from flywheel.service.kafka_sink import KafkaSink
from flywheel.service.spool import Spool
from flywheel.settings import EventLogSettings, KafkaSettings, StateSettings


def kafka_event_log(
    kafka: KafkaSettings, event_log: EventLogSettings, state: StateSettings
) -> EventLog:
    """Sends to `kafka`, batched and bounded as `event_log` says, spooled under `state`'s home."""
    if not kafka.kafka_bootstrap:
        raise ValueError(
            "FLYWHEEL_KAFKA_BOOTSTRAP is not set (the serve command starts an "
            "embedded broker when it is unset)"
        )
    return EventLog(
        partial(
            KafkaSink, kafka.kafka_bootstrap, kafka.kafka_timeout_s, **confluent_options(kafka)
        ),
        Spool(state.spool_path, fsync=event_log.spool_fsync),
        queue_size=event_log.log_queue_size,
        batch_size=event_log.log_batch_size,
        send_timeout_s=kafka.kafka_timeout_s,
        retry_s=event_log.spool_retry_s,
        linger_s=event_log.log_linger_ms / 1000.0,
        durable_linger_s=event_log.durable_linger_ms / 1000.0,
    )
