"""`POST /v1/predict`: a label per instance; every returned id is logged to Kafka.

Instances are named rows (`{"amount": 12.5, "country": "FR"}`), checked and encoded by
the served version's feature schema, or, for a model whose inputs are all numbers,
vectors in its input order; one request holds one form (`schemas.instances_form`).

With a canary held, the request's routing key (header `X-Flywheel-Routing-Key`, else a
draw) may send it to the canary, and the response names the canary's version; shadows
and guards score a share of the rows off the path (`flywheel.service.live`).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from flywheel.service.prediction import (
    check_batch,
    encode_rows,
    encode_vectors,
    logged_rows,
    predict_and_log,
)
from flywheel.service.schemas import ERROR_RESPONSES, PredictRequest, PredictResponse
from flywheel.service.state import state_of

# JSON without a Content-Type too (docs/contracts.md): a prediction changes no state
# that another request reads, so a cross-site post gains nothing; corrections and the
# admin POSTs are strict
router = APIRouter(strict_content_type=False)


@router.post("/v1/predict", response_model=PredictResponse, responses=ERROR_RESPONSES)
async def predict(body: PredictRequest, request: Request) -> dict:
    """Predict a label per instance; every returned id is logged to Kafka."""
    state = state_of(request)
    start = time.perf_counter()
    served = state.served_set()
    live = state.live
    plan = None if served.plain or live is None else live.route(served, request.headers)
    model = served.champion if plan is None else plan.answering
    instances = body.instances
    check_batch(len(instances), state)
    if isinstance(instances[0], dict):  # one form per request, validated as such
        x = encode_rows(state, model, instances)
        predictions = await predict_and_log(
            state, model, x, start=start, rows=logged_rows(model, instances)
        )
    else:
        x = encode_vectors(model, instances)
        predictions = await predict_and_log(state, model, x, start=start, vectors=instances)
    if plan is not None:  # shadows and the paired champion score off the path
        live.after(plan, x, predictions)  # type: ignore[union-attr]
    return {"model": {"name": model.name, "version": model.version}, "predictions": predictions}
