"""`GET /metrics`: the app's Prometheus registry, with the served version as a gauge."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flywheel.service.state import State

router = APIRouter()


# documented as Prometheus' text format, which it is (FastAPI's default said JSON)
@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus(state: State) -> Response:
    metrics, holder = state.metrics, state.holder
    m = holder.current() if holder.ready else None
    if m is not None:
        metrics.model_version.clear()
        metrics.model_version.labels(m.name, m.version).set(1)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
