"""`GET /healthz` (the process answers) and `GET /readyz` (a model is loaded and the
prediction log runs, so a prediction can be served and logged; `dependencies` says which of
the registry and Kafka are reachable now, `down` why not: while the first load waits for
the registry, /readyz is 503 and names it)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from flywheel.service.metrics import refresh_kafka
from flywheel.service.state import State

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    holder, el = state.holder, state.event_log
    ready = holder.ready and el is not None and el.running
    deps = state.dependencies
    refresh_kafka(deps, el)
    body = {
        "ready": ready,
        "model_version": holder.current().version if holder.ready else None,
        "kafka_connected": bool(el and el.connected),
        "spooled_records": el.spool.pending if el else 0,
        "dependencies": deps.states(),
        "down": deps.reasons(),
    }
    return JSONResponse(body, status_code=200 if ready else 503)
