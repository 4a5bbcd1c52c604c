"""A bounded spool: while Kafka is unreachable the spool grows, up to
FLYWHEEL_SPOOL_MAX_BYTES; then predictions and corrections are refused with 503 and
`Retry-After`, never accepted and lost, and `/readyz` is not ready from the high-water
mark (FLYWHEEL_SPOOL_HIGH_WATER of it) on, so a load balancer sends traffic elsewhere
before the refusals start, and back once replay brings it under the mark.

The bound is checked when a request is admitted: records admitted before the spool
filled are still spooled (nothing acknowledged is dropped), so the file may pass the
bound by what was already queued in memory (at most FLYWHEEL_LOG_QUEUE_SIZE records)
plus the requests in flight. The check is two attribute reads a request.
"""

from __future__ import annotations

from fastapi import HTTPException
from prometheus_client import Counter

from flywheel.service.event_log import EventLog
from flywheel.settings import EventLogSettings

__all__ = ["SPOOL_RETRY_AFTER_S", "above_high_water", "admit", "spool_full"]

# what a 503 for a full spool tells the client: replay drains the spool only once the
# broker is back, which no retry of the client's hastens; 5 s keeps retries cheap
SPOOL_RETRY_AFTER_S = 5


def spool_full(event_log: EventLog | None, settings: EventLogSettings) -> bool:
    return event_log is not None and event_log.spool.pending_bytes >= settings.spool_max_bytes


def admit(
    event_log: EventLog | None, settings: EventLogSettings, refused: Counter, kind: str
) -> None:
    """Raise a 503 (with Retry-After) if the spool is full: the records of this request
    could not be stored within the bound; counted in `refused` under `kind`."""
    if spool_full(event_log, settings):
        refused.labels(kind).inc()
        raise HTTPException(
            503,
            f"the spool of records Kafka has not acknowledged is full "
            f"(FLYWHEEL_SPOOL_MAX_BYTES={settings.spool_max_bytes}); retry later",
            headers={"Retry-After": str(SPOOL_RETRY_AFTER_S)},
        )


def above_high_water(event_log: EventLog | None, settings: EventLogSettings) -> bool:
    """Whether the spool holds more than FLYWHEEL_SPOOL_HIGH_WATER of its bound."""
    if event_log is None:
        return False
    return event_log.spool.pending_bytes > settings.spool_high_water * settings.spool_max_bytes
