"""`POST /v1/corrections`: true labels for earlier predictions, logged to Kafka; the 202
comes once they are durable (acknowledged by Kafka or fsynced into the spool)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from flywheel.events import CorrectionEvent, correction_id, utcnow
from flywheel.service.durability import store_durably
from flywheel.service.errors import BadRequest
from flywheel.service.schemas import ERROR_RESPONSES, CorrectionsAccepted, CorrectionsRequest
from flywheel.service.spool import Record
from flywheel.service.state import state_of

# strict (FastAPI's default): a body without a JSON Content-Type is refused with 415, so
# a web page cannot post corrections cross-site (a no-cors fetch with a Blob body sends
# none and needs no preflight); see flywheel.service.errors
router = APIRouter()


@router.post(
    "/v1/corrections",
    status_code=202,
    response_model=CorrectionsAccepted,
    responses=ERROR_RESPONSES,
)
async def corrections(body: CorrectionsRequest, request: Request) -> JSONResponse:
    """Accept true labels for earlier predictions; all or none of a call is accepted, and
    the 202 means they are stored (acknowledged by Kafka or fsynced into the spool)."""
    state = state_of(request)
    limits, kafka = state.config.service, state.config.kafka
    items = body.corrections
    if len(items) > limits.max_corrections:
        raise BadRequest(
            f"{len(items)} corrections exceed the limit of "
            f"{limits.max_corrections} (FLYWHEEL_MAX_CORRECTIONS)",
            413,
        )
    known = set(state.served().spec.labels)
    for i, c in enumerate(items):
        if c.label not in known:
            raise BadRequest(
                f"corrections[{i}].label: unknown label {c.label!r}; known labels: {sorted(known)}"
            )
    now, topic = utcnow(), kafka.topic_corrections
    records = [
        Record(
            topic,
            c.prediction_id.encode(),
            CorrectionEvent(
                # the same correction sent again is the same event (the store skips it)
                id=correction_id(c.prediction_id, c.label, c.source),
                prediction_id=c.prediction_id,
                label=c.label,
                source=c.source,
                timestamp=now,
            ).to_json(),
        )
        for c in items
    ]
    wait_s = state.config.event_log.durable_wait_ms / 1000.0
    await store_durably(state.event_log, records, wait_s)  # type: ignore[arg-type]
    state.metrics.corrections.inc(len(records))
    return JSONResponse({"accepted": len(records)}, status_code=202)
