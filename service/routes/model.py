"""`GET /v1/model`: the version being served, its input width, labels, precision, family
and feature schema (what a named row may hold)."""

from __future__ import annotations

from fastapi import APIRouter

from flywheel.service.schemas import NOT_READY, ModelInfo
from flywheel.service.state import State

router = APIRouter()


@router.get("/v1/model", response_model=ModelInfo, responses=NOT_READY)
async def model_info(state: State) -> dict:
    m = state.served()
    return {
        "name": m.name,
        "version": m.version,
        "loaded_at": m.loaded_at,
        "input_dim": m.spec.input_dim,
        "labels": m.spec.labels,
        "kind": m.spec.kind,
        "family": m.spec.family,
        "precision": m.precision,
        "features": m.spec.schema,
    }
