"""The review page (`/ui`) and its JSON endpoints (`/v1/review/...`).

Reading is open to anyone who can reach the service, as `/v1/model` is; approve, reject
and rollback need `Authorization: Bearer <FLYWHEEL_ADMIN_TOKEN>`. Without a configured
token they are refused with 403 (the page is read-only), a missing or wrong one gets 401.
The facts come from `flywheel.review`, the same code as `flywheel models diff|card|...`.

Handlers are plain `def`: MLflow and the store are blocking, so FastAPI runs them in its
thread pool, off the event loop that serves predictions.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Header, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import Receive, Scope, Send

from flywheel.service.errors import BadRequest
from flywheel.settings import Settings

log = logging.getLogger(__name__)
UI_DIR = Path(__file__).with_name("ui")
VERSION_PATTERN = r"^[vV]?[1-9][0-9]{0,17}$"
MAX_REASON = 1000
MAX_ACTOR = 100
UI_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


class Decision(BaseModel):
    """An approve or reject: why (required, recorded on the version) and who (optional)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=MAX_REASON,
                        description="Why; recorded on the version as `review_reason`.")
    by: str | None = Field(None, max_length=MAX_ACTOR,
                           description="Who decides; default `review-ui`.")

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        """Blank, too long or with control characters: refused, as by the CLI."""
        from flywheel.review import check_reason

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


class _Backends:
    """The registry and the training store, opened on first use and kept (thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._registry = None
        self._engine = None

    def registry(self):  # -> flywheel.registry.Registry
        with self._lock:
            if self._registry is None:
                from flywheel.registry import Registry

                self._registry = Registry(self.settings)
            return self._registry

    def store(self) -> tuple[Any, str | None]:
        """(engine, None) or (None, why there is none); retried on every call until it works."""
        with self._lock:
            if self._engine is not None:
                return self._engine, None
            from flywheel.review import open_store_or_reason

            engine, why = open_store_or_reason(self.settings)
            self._engine = engine
            return engine, why


def _version(value: str) -> str:
    return value.strip().lstrip("vV")


def install_review(app: FastAPI, settings: Settings) -> None:
    """Add `/v1/review/...` and the `/ui` page to `app`."""
    from flywheel import review

    backends = _Backends(settings)
    router = APIRouter(prefix="/v1/review", tags=["review"])

    def require_admin(authorization: str | None) -> None:
        token = settings.admin_token
        if token is None:
            raise BadRequest("admin actions are disabled on this service: set "
                             "FLYWHEEL_ADMIN_TOKEN to allow approve, reject and rollback "
                             "(the review page is read-only without it)", 403)
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(401, "send the admin token as `Authorization: Bearer <token>`",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(given.strip().encode(),
                                      token.get_secret_value().encode()):
            raise HTTPException(401, "wrong admin token",
                                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    def registry_call(fn, *args, **kwargs):
        """Registry problems as 4xx/503 with a message, never a 500."""
        from mlflow.exceptions import MlflowException

        from flywheel.registry import RegistryError

        try:
            return fn(*args, **kwargs)
        except review.ReviewError as exc:
            raise BadRequest(str(exc), 409) from None
        except RegistryError as exc:
            status = 404 if "has no version" in str(exc) else 409
            raise BadRequest(str(exc), status) from None
        except MlflowException as exc:
            log.warning("review: MLflow registry unavailable: %s", exc.message)
            raise BadRequest(f"the model registry is unavailable: {exc.message}", 503) from None

    def known(version: str) -> str:
        v = _version(version)
        if not registry_call(backends.registry().exists, v):
            raise BadRequest(f"{settings.model_name} has no version {v!r}", 404)
        return v

    @router.get("/config")
    def config() -> dict[str, Any]:
        """What the page needs to know first: model name and whether admin actions exist."""
        return {"model_name": settings.model_name,
                "admin_enabled": settings.admin_token is not None,
                "auto_promote": settings.auto_promote,
                "registry_poll_s": settings.registry_poll_s}

    @router.get("/versions")
    def versions(limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        """The newest versions, newest first, with gate results, review and ε."""
        registry = backends.registry()
        docs = registry_call(review.registry_docs, registry, with_runs=True, limit=limit)
        total = len(registry_call(registry.versions, with_runs=False))
        out = []
        for d in docs:
            out.append({k: d[k] for k in review.LINEAGE_KEYS} | {
                "gate_passed": review.gate_passed(d), "gate_numbers": review.gate_numbers(d),
                "holdout_accuracy": d["metrics"].get("holdout_accuracy"),
                "review": review.review_of(d), "epsilon_value": review.epsilon_value(
                    d["epsilon"]),
                "promoted_at": d["tags"].get("promoted_at"),
                "promoted_by": d["tags"].get("promoted_by"),
                "promotion_reason": d["tags"].get("promotion_reason"),
            })
        champion = next((d["version"] for d in docs if d["champion"]), None)
        if champion is None:
            champion = registry_call(registry.champion_version)
        return {"model_name": registry.name, "champion": champion, "total": total,
                "versions": out}

    @router.get("/pending")
    def pending() -> dict[str, Any]:
        """Candidates that passed their gate and wait for a reviewer, oldest first."""
        registry = backends.registry()
        docs = registry_call(review.pending, registry)
        detailed = [review.version_doc(registry_call(registry.info, d["version"]), set())
                    for d in docs]
        return {"model_name": registry.name, "pending": [
            {k: d[k] for k in review.LINEAGE_KEYS} | {
                "status": "pending review", "gate_numbers": review.gate_numbers(d)}
            for d in detailed]}

    @router.get("/errors")
    def errors(hours: float = Query(24.0, gt=0, le=24 * 366)) -> dict[str, Any]:
        """Rolling accuracy and error-type mix per version, from the feedback error reports."""
        engine, why = backends.store()
        if engine is None:
            return {"available": False, "note": why, "window_hours": hours, "versions": [],
                    "points": []}
        report = review.error_mix(engine, settings.model_name, hours)
        timeline = review.accuracy_timeline(engine, settings.model_name, hours)
        return {"available": True, "note": None, "window_hours": hours,
                "versions": report["versions"], "points": timeline["points"]}

    @router.get("/privacy")
    def privacy() -> dict[str, Any]:
        """ε and δ per version (version tags), and per source when the privacy ledger exists."""
        registry = backends.registry()
        docs = registry_call(review.registry_docs, registry, with_runs=False)
        return {"versions": [{"version": d["version"], "source": d["source"],
                              "epsilon": d["epsilon"], "delta": d["delta"],
                              "epsilon_value": review.epsilon_value(d["epsilon"])}
                             for d in reversed(docs)],
                "ledger": review.privacy_ledger(*backends.store())}

    @router.post("/versions/{version}/approve")
    def approve(body: Decision,
                version: str = PathParam(..., pattern=VERSION_PATTERN, description="3 or v3"),
                authorization: str | None = Header(None)) -> dict[str, Any]:
        """Promote a pending candidate (announced on the model-events topic); admin only."""
        require_admin(authorization)
        v = known(version)
        event = registry_call(review.approve, settings, v, reason=body.reason,
                              actor=body.by or "review-ui", registry=backends.registry())
        return {"approved": v, "champion": event.version, "previous": event.previous_version,
                "by": event.actor, "reason": body.reason}

    @router.post("/versions/{version}/reject")
    def reject(body: Decision,
               version: str = PathParam(..., pattern=VERSION_PATTERN, description="3 or v3"),
               authorization: str | None = Header(None)) -> dict[str, Any]:
        """Reject a pending candidate; the champion stays. Admin only."""
        require_admin(authorization)
        v = known(version)
        tags = registry_call(review.reject, settings, v, reason=body.reason,
                             actor=body.by or "review-ui", registry=backends.registry())
        return {"rejected": v, "by": tags[review.REVIEW_BY], "reason": body.reason}

    @router.post("/rollback")
    def rollback(body: Decision, authorization: str | None = Header(None)) -> dict[str, Any]:
        """Move the champion back to the one before it (announced). Admin only."""
        from flywheel import promotion

        require_admin(authorization)
        event = registry_call(promotion.rollback, settings, reason=body.reason,
                              actor=body.by or "review-ui", registry=backends.registry())
        return {"rolled_back": event.previous_version, "champion": event.version,
                "by": event.actor, "reason": body.reason}

    app.include_router(router)

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    app.mount("/ui", _UI(directory=UI_DIR, html=True), name="ui")
