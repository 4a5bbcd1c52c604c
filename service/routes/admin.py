"""`POST /v1/admin/forget`: erase a data subject (issue 30), as `flywheel privacy forget`.

Needs an app key with the `admin` scope (`flywheel.service.auth.WRITE_PATHS`; the
`review` scope is not enough: erasure deletes data), or with FLYWHEEL_AUTH=off the
FLYWHEEL_ADMIN_TOKEN. The body is JSON (`{"subject": "..."}`, a raw subject id as apps send
it in corrections); the service hashes it under FLYWHEEL_SUBJECT_KEY and the raw id goes no
further than this request. Without the key the call is refused with 409: the store holds
subjects only by that key's hash, so nothing could be found.

The erasure (`flywheel.store.erase_subject`) is one transaction; the receipt is the answer.
The versions trained without DP that may hold the subject's data come from the registry
after the commit; if it cannot be read the erasure still stands and `versions_note` says so.
A plain `def`: the store and MLflow are blocking, FastAPI runs it in its thread pool.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, ConfigDict, Field

from flywheel.service.auth import app_of
from flywheel.service.errors import BadRequest
from flywheel.service.routes.review import require_admin
from flywheel.service.schemas import ErrorBody
from flywheel.service.state import State
from flywheel.store import erase_subject, non_dp_versions, session_factory
from flywheel.subjects import SubjectId, subject_key

__all__ = ["ForgetRequest", "Receipt", "router"]

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/admin", tags=["admin"])
# every answer besides 200, as sent (`{"detail"}`): malformed JSON 400, no or a bad key 401,
# a key without the admin scope 403, a body over FLYWHEEL_MAX_BODY_BYTES 413, not JSON 415,
# no FLYWHEEL_SUBJECT_KEY 409, a bad body 422, the store unreachable 503
FORGET_ERRORS: dict[int | str, dict] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 409, 413, 415, 422, 503)
}


class ForgetRequest(BaseModel):
    """Whom to erase: the raw subject id, as apps send it in a correction's `subject`."""

    model_config = ConfigDict(extra="forbid")

    subject: SubjectId = Field(description="The data subject's raw id (hashed here, never kept).")


class Receipt(BaseModel):
    """The erasure receipt: rows deleted per table, under the subject's keyed hash."""

    receipt: int
    subject: str = Field(description="The keyed hash (HMAC-SHA256 under FLYWHEEL_SUBJECT_KEY).")
    erased_at: str
    requested_by: str
    deleted: dict[str, int] = Field(description="Rows deleted per table.")
    deleted_total: int
    repeated: bool = Field(description="An earlier erasure of this subject exists.")
    first_example_id: int | None
    non_dp_versions: list[str] | None = Field(
        description="Versions trained without DP that may hold the subject's data "
        "(null: the registry could not be read, see versions_note)."
    )
    versions_note: str


@router.post("/forget", response_model=Receipt, responses=FORGET_ERRORS)
def forget(
    body: ForgetRequest,
    state: State,
    request: Request,
    authorization: str | None = Header(None),
) -> dict[str, Any]:
    """Delete every stored row about a data subject and answer the erasure receipt."""
    require_admin(state, authorization)
    key = state.config.access.subject_key
    if key is None:
        raise BadRequest(
            "FLYWHEEL_SUBJECT_KEY is unset on this service: subjects are stored by their "
            "keyed hash under it, so none can be found to erase",
            409,
        )
    engine, why = state.store()
    if engine is None:
        raise BadRequest(f"the training store is unavailable: {why}", 503)
    app = app_of(request)
    by = f"app:{app.name}" if app is not None else "admin-token"
    hashed = subject_key(body.subject, key.get_secret_value())
    with session_factory(engine).begin() as session:
        done = erase_subject(session, hashed, by, datetime.now(UTC))
    log.info("erased subject %s…: %s (receipt %d)", hashed[:12], done.deleted, done.receipt_id)
    try:
        versions = state.registry().versions()
        done = dataclasses.replace(
            done, non_dp_versions=non_dp_versions(versions, done.first_example_id)
        )
    except Exception as exc:  # committed already; the listing is advice to the operator
        done = dataclasses.replace(
            done, versions_note=f"the registry could not be read ({type(exc).__name__})"
        )
    return done.doc()
