"""Wiring the event log to Kafka and the spool from settings."""

from __future__ import annotations

from functools import partial

from flywheel.service.event_log import EventLog
from flywheel.service.kafka_sink import KafkaSink
from flywheel.service.spool import Spool
from flywheel.settings import Settings


def kafka_event_log(settings: Settings) -> EventLog:
    if not settings.kafka_bootstrap:
        raise ValueError("FLYWHEEL_KAFKA_BOOTSTRAP is not set (the serve command starts an "
                         "embedded broker when it is unset)")
    return EventLog(
        partial(KafkaSink, settings.kafka_bootstrap, settings.kafka_timeout_s),
        Spool(settings.spool_path, fsync=settings.spool_fsync),
        queue_size=settings.log_queue_size, batch_size=settings.log_batch_size,
        send_timeout_s=settings.kafka_timeout_s, retry_s=settings.spool_retry_s,
        linger_s=settings.log_linger_ms / 1000.0,
    )
