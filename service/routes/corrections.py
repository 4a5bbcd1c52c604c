"""`POST /v1/corrections`: true labels for earlier predictions, logged to Kafka; the 202
comes once they are durable (acknowledged by Kafka or fsynced into the spool).

The source is the calling app (`flywheel.service.auth`): a body `source` is a sub-source
in its namespace (`eu` from app `shop` is stored as `shop/eu`), and one naming another
app's namespace is refused with 403 (`flywheel.appkeys.source_for`). With
FLYWHEEL_AUTH=off the body's source is used as sent.

A correction's `subject` (the end user the label is about, the privacy unit) is replaced
here by its keyed hash (`flywheel.subjects.subject_key`, FLYWHEEL_SUBJECT_KEY): the raw id
goes no further than this request. Without the key, a subject is refused with 422 rather
than dropped (its corrections would be accounted per prediction, a weaker promise than the
caller asked for) or hashed without a key (re-identifiable by hashing guesses)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from flywheel.appkeys import KEY_ID_HEADER, SIGNATURE_HEADER, ForeignSource, sign, source_for
from flywheel.events import CorrectionEvent, correction_id, utcnow
from flywheel.service.auth import app_of
from flywheel.service.backpressure import admit
from flywheel.service.durability import store_durably
from flywheel.service.errors import BadRequest
from flywheel.service.schemas import ERROR_RESPONSES, CorrectionsAccepted, CorrectionsRequest
from flywheel.service.spool import Record
from flywheel.service.state import state_of
from flywheel.subjects import subject_key

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
    the 202 means they are stored (acknowledged by Kafka or fsynced into the spool); a
    full spool refuses them all with 503 and Retry-After."""
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
    key = state.config.access.subject_key
    for i, c in enumerate(items):
        if c.subject is not None and key is None:
            raise BadRequest(
                f"corrections[{i}].subject: this deployment takes no data subjects "
                "(FLYWHEEL_SUBJECT_KEY is unset); send the correction without one",
                422,
            )
    sources = [c.source for c in items]
    app = app_of(request)
    signer: tuple[bytes, str] | None = None  # (key id, signing secret)
    if app is not None:
        sources = [_bound_source(app.name, s, i) for i, s in enumerate(sources)]
        # signed as the app's own Kafka records are; the `correct` scope means an app key
        assert app.key_id is not None and app.signing_key is not None
        signer = (app.key_id.encode(), app.signing_key)
    now, topic = utcnow(), kafka.topic_corrections
    records = []
    for c, source in zip(items, sources, strict=True):
        value = CorrectionEvent(
            # the same correction sent again is the same event (the store skips it)
            id=correction_id(c.prediction_id, c.label, source),
            prediction_id=c.prediction_id,
            label=c.label,
            source=source,
            timestamp=now,
            subject=None
            if c.subject is None or key is None
            else subject_key(c.subject, key.get_secret_value()),
        ).to_json()
        headers: tuple[tuple[str, bytes], ...] = ()
        if signer is not None:
            headers = (
                (KEY_ID_HEADER, signer[0]),
                (SIGNATURE_HEADER, sign(value, signer[1]).encode()),
            )
        records.append(Record(topic, c.prediction_id.encode(), value, headers))
    admit(state.event_log, state.config.event_log, state.metrics.spool_refused, "corrections")
    wait_s = state.config.event_log.durable_wait_ms / 1000.0
    await store_durably(state.event_log, records, wait_s)  # type: ignore[arg-type]
    state.metrics.corrections.inc(len(records))
    return JSONResponse({"accepted": len(records)}, status_code=202)


def _bound_source(app: str, given: str | None, i: int) -> str:
    try:
        return source_for(app, given)
    except ForeignSource as exc:
        raise BadRequest(f"corrections[{i}].source: {exc}", 403) from None
    except ValueError as exc:
        raise BadRequest(f"corrections[{i}].source: {exc}", 422) from None
