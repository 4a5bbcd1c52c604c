"""A 202 (or a prediction) only once its records are stored: acknowledged by Kafka or
fsynced into the spool.

Before this, `POST /v1/corrections` answered 202 once its records were on the event
log's in-memory queue: a `kill -9` within the sender's linger (50 ms) lost them. Now the
route awaits the event log's group commit (`EventLog.log_durable_async`): the sender's
next batch, acknowledged by Kafka or spooled, completes every request it held. The event
loop never blocks: it awaits an asyncio future the sender completes through
`call_soon_threadsafe`, once per batch for all the requests the batch held.

If the acknowledgement is later than FLYWHEEL_DURABLE_WAIT_MS (a slow or unreachable
broker: the sender waits up to FLYWHEEL_KAFKA_TIMEOUT_S before it spools), the request
appends its records to the spool itself, fsynced, in a worker thread, and answers then;
the sender may still deliver them, a duplicate by id that the store skips
(at-least-once, docs/contracts.md). Only if even that write fails is the answer 503 with
Retry-After: never a success for a record that is not stored.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import HTTPException

from flywheel.service.event_log import EventLog, NotDurable
from flywheel.service.spool import Record

__all__ = ["RETRY_AFTER_S", "store_durably"]

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1  # what a 503 tells the client: the spool's disk may recover quickly


async def store_durably(event_log: EventLog, records: list[Record], wait_s: float) -> None:
    """Return once every record is acknowledged by Kafka or in the spool; raise a 503
    `HTTPException` (with Retry-After) if they could not be stored."""
    try:
        future = event_log.log_durable_async(records)
    except OSError as exc:  # the full queue's overflow could not be spooled
        raise _unavailable(exc) from exc
    try:
        async with asyncio.timeout(wait_s):
            await future
        return
    except TimeoutError:
        why = f"no acknowledgement within {wait_s * 1000:.0f} ms"
    except NotDurable as exc:
        why = str(exc)
    log.info("%s: spooling %d record(s) from the request", why, len(records))
    try:
        await asyncio.get_running_loop().run_in_executor(None, event_log.spool_directly, records)
    except Exception as exc:
        log.exception("could not spool %d record(s) from the request", len(records))
        raise _unavailable(exc) from exc


def _unavailable(exc: BaseException) -> HTTPException:
    return HTTPException(
        503,
        f"could not store the records durably ({type(exc).__name__}: {exc}); retry later",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
