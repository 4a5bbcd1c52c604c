"""The review page (`/ui`) and its JSON endpoints (`/v1/review/...`).

Reading is open to anyone who can reach the service, as `/v1/model` is; approve, reject
and rollback need an app key with the `review` or `admin` scope (or
`FLYWHEEL_ADMIN_TOKEN`, the bootstrap admin key), checked by `flywheel.service.auth`.
With FLYWHEEL_AUTH=off they need the admin token: without one they are refused with 403
(the page is read-only), a missing or wrong one gets 401.
The facts come from `flywheel.review`, the same code as `flywheel models diff|card|...`.

Handlers are plain `def`: MLflow and the store are blocking, so FastAPI runs them in its
thread pool, off the event loop that serves predictions.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Header, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import Receive, Scope, Send

from flywheel.promotion import rollback as rollback_champion
from flywheel.registry import ModelVersion, RegistryError, parse_version
from flywheel.review import (
    LINEAGE_KEYS,
    REVIEW_BY,
    ReviewError,
    accuracy_timeline,
    check_reason,
    epsilon_value,
    error_mix,
    gate_numbers,
    gate_passed,
    live_report,
    live_timeline,
    privacy_ledger,
    registry_docs,
    review_of,
    version_doc,
)
from flywheel.review import approve as approve_version
from flywheel.review import pending as pending_versions
from flywheel.review import reject as reject_version
from flywheel.service.errors import BadRequest
from flywheel.service.schemas import ErrorBody
from flywheel.service.state import State
from flywheel.signing import SigningKeyError

log = logging.getLogger(__name__)
UI_DIR = Path(__file__).parent.parent / "ui"  # service/ui
VERSION_PATTERN = r"^[vV]?[1-9][0-9]{0,17}$"
MAX_REASON = 1000
MAX_ACTOR = 100
UI_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]
# what an admin POST answers besides 200: no or a wrong token, no token configured, a body
# that is not sent as JSON (the app's strict content type), an unknown version, one that is
# not pending, a bad reason or version
# every answer these routes give besides 200, as it is sent (`{"detail"}`): malformed
# JSON is 400, a body over FLYWHEEL_MAX_BODY_BYTES 413, an unreachable registry 503
ADMIN_ERRORS: dict[int | str, dict] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 415, 422, 503)
}
ROLLBACK_ERRORS = {k: v for k, v in ADMIN_ERRORS.items() if k != 404}  # names no version
REGISTRY_DOWN: dict[int | str, dict] = {503: {"model": ErrorBody}}


class Decision(BaseModel):
    """An approve or reject: why (required, recorded on the version) and who (optional)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(
        min_length=1,
        max_length=MAX_REASON,
        description="Why; recorded on the version as `review_reason`.",
    )
    by: str | None = Field(
        None, max_length=MAX_ACTOR, description="Who decides; default `review-ui`."
    )

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        """Blank, too long or with control characters: refused, as by the CLI."""
        return check_reason(value)

    @field_validator("by")
    @classmethod
    def _by(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not re.fullmatch(r"[\w .@+-]+", value.strip()):
            raise ValueError("may hold letters, digits, spaces and . @ + - _ only")
        return value.strip()


class _UI(StaticFiles):
    """The page's files, with headers that keep it self-contained (no inline or remote code)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + UI_HEADERS
            await send(message)

        await super().__call__(scope, receive, with_headers)


def _version(value: str) -> ModelVersion:
    """A version from the URL path ("3" or "v3", `VERSION_PATTERN`), checked."""
    try:
        return parse_version(value.strip().lstrip("vV"))
    except RegistryError as exc:
        raise BadRequest(str(exc), 422) from None


def require_admin(state: State, authorization: str | None) -> None:
    """With FLYWHEEL_AUTH=off, an admin action needs FLYWHEEL_ADMIN_TOKEN (the review
    actions here, erasure in `flywheel.service.routes.admin`); with it on, the app-key
    middleware checked the scope already."""
    if state.config.access.auth == "on":
        return  # the app-key middleware checked the key and its scope (flywheel.service.auth)
    token = state.config.service.admin_token
    if token is None:
        raise BadRequest(
            "admin actions are disabled on this service: set "
            "FLYWHEEL_ADMIN_TOKEN to allow approve, reject, rollback and forget "
            "(the review page is read-only without it)",
            403,
        )
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise HTTPException(
            401,
            "send the admin token as `Authorization: Bearer <token>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise HTTPException(
            401, "wrong admin token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )


def _registry_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Registry problems as 4xx/503 with a message, never a 500."""
    from mlflow.exceptions import MlflowException  # heavy: only once the registry is used

    try:
        return fn(*args, **kwargs)
    except ReviewError as exc:
        raise BadRequest(str(exc), 409) from None
    except RegistryError as exc:
        status = 404 if "has no version" in str(exc) else 409
        raise BadRequest(str(exc), status) from None
    except SigningKeyError as exc:  # this service holds no (readable) promotion key
        log.error("review: cannot sign a promotion: %s", exc)
        raise BadRequest(
            "this service cannot sign promotions (FLYWHEEL_SIGNING_KEY); approve with "
            "`flywheel models approve` where the key is",
            409,
        ) from None
    except MlflowException as exc:
        log.warning("review: MLflow registry unavailable: %s", exc.message)
        raise BadRequest(f"the model registry is unavailable: {exc.message}", 503) from None


def _known(state: State, version: str) -> ModelVersion:
    v = _version(version)
    if not _registry_call(state.registry().exists, v):
        raise BadRequest(f"{state.config.registry.model_name} has no version {v!r}", 404)
    return v


router = APIRouter(prefix="/v1/review", tags=["review"])


@router.get("/config")
def config(state: State) -> dict[str, Any]:
    """What the page needs to know first: model name and whether admin actions exist."""
    config = state.config
    return {
        "model_name": config.registry.model_name,
        "admin_enabled": config.access.auth == "on" or config.service.admin_token is not None,
        "auto_promote": config.gate.auto_promote,
        "registry_poll_s": config.registry.registry_poll_s,
    }


@router.get("/versions", responses=REGISTRY_DOWN)
def versions(state: State, limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
    """The newest versions, newest first, with gate results, review and ε."""
    registry = state.registry()
    docs = _registry_call(registry_docs, registry, with_runs=True, limit=limit)
    total = len(_registry_call(registry.versions, with_runs=False))
    out = []
    for d in docs:
        out.append(
            {k: d[k] for k in LINEAGE_KEYS}
            | {
                "gate_passed": gate_passed(d),
                "gate_numbers": gate_numbers(d),
                "holdout_accuracy": d["metrics"].get("holdout_accuracy"),
                "review": review_of(d),
                "epsilon_value": epsilon_value(d["epsilon"]),
                "promoted_at": d["tags"].get("promoted_at"),
                "promoted_by": d["tags"].get("promoted_by"),
                "promotion_reason": d["tags"].get("promotion_reason"),
            }
        )
    champion = next((d["version"] for d in docs if d["champion"]), None)
    if champion is None:
        champion = _registry_call(registry.champion_version)
    return {"model_name": registry.name, "champion": champion, "total": total, "versions": out}


@router.get("/pending", responses=REGISTRY_DOWN)
def pending(state: State) -> dict[str, Any]:
    """Candidates that passed their gate and wait for a reviewer, oldest first."""
    registry = state.registry()
    docs = _registry_call(pending_versions, registry)
    detailed = [version_doc(_registry_call(registry.info, d["version"]), set()) for d in docs]
    return {
        "model_name": registry.name,
        "pending": [
            {k: d[k] for k in LINEAGE_KEYS}
            | {"status": "pending review", "gate_numbers": gate_numbers(d)}
            for d in detailed
        ],
    }


@router.get("/errors")
def errors(state: State, hours: float = Query(24.0, gt=0, le=24 * 366)) -> dict[str, Any]:
    """Rolling accuracy and error-type mix per version, from the feedback error reports."""
    engine, why = state.store()
    if engine is None:
        return {
            "available": False,
            "note": why,
            "window_hours": hours,
            "versions": [],
            "points": [],
        }
    name = state.config.registry.model_name
    report = error_mix(engine, name, hours)
    timeline = accuracy_timeline(engine, name, hours)
    return {
        "available": True,
        "note": None,
        "window_hours": hours,
        "versions": report["versions"],
        "points": timeline["points"],
    }


@router.get("/monitor")
def monitor(
    state: State,
    hours: float = Query(24.0, gt=0, le=24 * 366),
    buckets: int = Query(24, ge=1, le=200),
    segment: str | None = Query(None, max_length=200),
) -> dict[str, Any]:
    """Live monitoring from the store (`flywheel.review.live_report`): per version live
    accuracy with its 95 % interval, label delay, unlabelled share, CBPE and input drift,
    and the accuracy timeline in `buckets` spans (docs/monitoring.md). Bounded: at most
    FLYWHEEL_LIVE_MONITOR_SAMPLE rows read per version."""
    engine, why = state.store()
    window_s = max(1.0, hours * 3600)
    if engine is None:
        return {"available": False, "note": why, "report": None, "timeline": None}
    name = state.config.registry.model_name
    sample = state.config.gate.live_monitor_sample
    try:
        report = live_report(engine, name, window_s=window_s, segment=segment, sample=sample)
    except ValueError as exc:  # an unknown segment feature
        raise BadRequest(str(exc), 422) from None
    timeline = live_timeline(engine, name, window_s=window_s, buckets=buckets)
    return {"available": True, "note": None, "report": report, "timeline": timeline}


@router.get("/privacy", responses=REGISTRY_DOWN)
def privacy(state: State) -> dict[str, Any]:
    """ε and δ per version (version tags), and per source when the privacy ledger exists."""
    docs = _registry_call(registry_docs, state.registry(), with_runs=False)
    return {
        "versions": [
            {
                "version": d["version"],
                "source": d["source"],
                "epsilon": d["epsilon"],
                "delta": d["delta"],
                "epsilon_value": epsilon_value(d["epsilon"]),
            }
            for d in reversed(docs)
        ],
        "ledger": privacy_ledger(*state.store()),
    }


@router.post("/versions/{version}/approve", responses=ADMIN_ERRORS)
def approve(
    body: Decision,
    state: State,
    version: str = PathParam(..., pattern=VERSION_PATTERN, description="3 or v3"),
    authorization: str | None = Header(None),
) -> dict[str, Any]:
    """Promote a pending candidate (announced on the model-events topic); admin only."""
    require_admin(state, authorization)
    v = _known(state, version)
    event = _registry_call(
        approve_version,
        v,
        reason=body.reason,
        actor=body.by or "review-ui",
        registry=state.registry(),
        kafka=state.config.kafka,
    )
    return {
        "approved": v,
        "champion": event.version,
        "previous": event.previous_version,
        "by": event.actor,
        "reason": body.reason,
    }


@router.post("/versions/{version}/reject", responses=ADMIN_ERRORS)
def reject(
    body: Decision,
    state: State,
    version: str = PathParam(..., pattern=VERSION_PATTERN, description="3 or v3"),
    authorization: str | None = Header(None),
) -> dict[str, Any]:
    """Reject a pending candidate; the champion stays. Admin only."""
    require_admin(state, authorization)
    v = _known(state, version)
    tags = _registry_call(
        reject_version,
        v,
        reason=body.reason,
        actor=body.by or "review-ui",
        registry=state.registry(),
    )
    return {"rejected": v, "by": tags[REVIEW_BY], "reason": body.reason}


@router.post("/rollback", responses=ROLLBACK_ERRORS)
def rollback(
    body: Decision, state: State, authorization: str | None = Header(None)
) -> dict[str, Any]:
    """Move the champion back to the one before it (announced). Admin only."""
    require_admin(state, authorization)
    event = _registry_call(
        rollback_champion,
        state.config.kafka,
        reason=body.reason,
        actor=body.by or "review-ui",
        registry=state.registry(),
    )
    return {
        "rolled_back": event.previous_version,
        "champion": event.version,
        "by": event.actor,
        "reason": body.reason,
    }


ui_router = APIRouter(include_in_schema=False)


@ui_router.get("/ui")
async def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


def mount_ui(app: FastAPI) -> None:
    """Serve the page's files under `/ui/` (a mount: an `APIRouter` cannot carry one)."""
    app.mount("/ui", _UI(directory=UI_DIR, html=True), name="ui")
