"""`GET /healthz` (the process answers) and `GET /readyz` (a model is loaded and the
prediction log runs, so a prediction can be served and logged)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from flywheel.service.state import State

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    holder, el = state.holder, state.event_log
    ready = holder.ready and el is not None and el.running
    body = {
        "ready": ready,
        "model_version": holder.current().version if holder.ready else None,
        "kafka_connected": bool(el and el.connected),
        "spooled_records": el.spool.pending if el else 0,
    }
    return JSONResponse(body, status_code=200 if ready else 503)
