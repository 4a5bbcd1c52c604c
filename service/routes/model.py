"""`GET /v1/model`: the version being served, its input width, labels, precision, family
and feature schema (what a named row may hold), and what the service runs beside it
(`roles`: the shadow, canary and guard held, with their shares; docs/serving.md)."""

from __future__ import annotations

from fastapi import APIRouter

from flywheel.service.model_holder import ServedSet
from flywheel.service.schemas import NOT_READY, ModelInfo
from flywheel.service.state import State

router = APIRouter()


@router.get("/v1/model", response_model=ModelInfo, responses=NOT_READY)
async def model_info(state: State) -> dict:
    served = state.served_set()
    m = served.champion
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
        "roles": _roles(state, served),
    }


def _roles(state: State, served: ServedSet) -> dict[str, dict]:
    """champion and each live role held: version, share, loaded_at."""
    gate = state.config.gate
    canary = served.canary is not None
    share = {
        "canary": gate.live_canary_share,
        "shadow": gate.live_shadow_share,
        "guard": gate.live_shadow_share,
    }
    champion = served.champion
    out = {
        "champion": {
            "version": champion.version,
            "share": 1.0 - gate.live_canary_share if canary else 1.0,
            "loaded_at": champion.loaded_at,
        }
    }
    for role, model in served.roles().items():
        out[role] = {"version": model.version, "share": share[role], "loaded_at": model.loaded_at}
    return out
