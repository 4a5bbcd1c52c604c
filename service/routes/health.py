"""`GET /healthz` (the process answers) and `GET /readyz` (a model is loaded and the
prediction log runs, so a prediction can be served and logged; `dependencies` says which of
the registry and Kafka are reachable now, `down` why not: while the first load waits for
the registry, /readyz is 503 and names it). It is 503 too while the spool holds more than
its high-water mark (FLYWHEEL_SPOOL_HIGH_WATER of FLYWHEEL_SPOOL_MAX_BYTES,
`flywheel.service.backpressure`), ready again once replay brings it under."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from flywheel.service.backpressure import above_high_water
from flywheel.service.metrics import refresh_kafka
from flywheel.service.state import State

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    holder, el = state.holder, state.event_log
    logging = state.config.event_log
    spool_high = above_high_water(el, logging)
    ready = holder.ready and el is not None and el.running and not spool_high
    deps = state.dependencies
    refresh_kafka(deps, el)
    body = {
        "ready": ready,
        "model_version": holder.current().version if holder.ready else None,
        "kafka_connected": bool(el and el.connected),
        "spooled_records": el.spool.pending if el else 0,
        "spool_bytes": el.spool.pending_bytes if el else 0,
        "spool_high_water": spool_high,
        "dependencies": deps.states(),
        "down": deps.reasons(),
    }
    if spool_high:
        body["down"] = {
            **deps.reasons(),
            "spool": f"the spool holds {el.spool.pending_bytes if el else 0} bytes, over "
            f"{logging.spool_high_water:.0%} of FLYWHEEL_SPOOL_MAX_BYTES "
            f"({logging.spool_max_bytes}); Kafka is behind",
        }
    return JSONResponse(body, status_code=200 if ready else 503)
