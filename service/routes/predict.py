"""`POST /v1/predict`: a label per instance; every returned id is logged to Kafka."""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Request

from flywheel.events import new_id, prediction_payload, utcnow
from flywheel.service.errors import BadRequest
from flywheel.service.schemas import ERROR_RESPONSES, PredictRequest, PredictResponse
from flywheel.service.spool import Record
from flywheel.service.state import state_of

router = APIRouter(strict_content_type=False)  # as the app: JSON without a Content-Type


@router.post("/v1/predict", response_model=PredictResponse, responses=ERROR_RESPONSES)
async def predict(body: PredictRequest, request: Request) -> dict:
    """Predict a label per instance; every returned id is logged to Kafka."""
    state = state_of(request)
    start = time.perf_counter()
    limits, kafka = state.config.service, state.config.kafka
    model = state.served()
    rows = body.instances
    if len(rows) > limits.max_batch:
        raise BadRequest(
            f"batch of {len(rows)} instances exceeds the limit of "
            f"{limits.max_batch} (FLYWHEEL_MAX_BATCH)",
            413,
        )
    width = model.spec.input_dim
    for i, row in enumerate(rows):
        if len(row) != width:
            raise BadRequest(
                f"instances[{i}] has {len(row)} features; model {model.name} "
                f"v{model.version} expects {width}"
            )
    with np.errstate(over="ignore"):
        x = np.asarray(rows, dtype=np.float32)
    if not np.isfinite(x).all():
        i, j = np.argwhere(~np.isfinite(x))[0]
        raise BadRequest(f"instances[{i}][{j}]: {rows[i][j]!r} is outside float32 range")
    if state.batcher is not None:
        probs, paths = await state.batcher.predict(model, x)
    else:
        probs, paths = model.predict(x)
    broken = ~np.isfinite(probs).all(axis=1)
    if broken.any():  # finite in float32, yet too large for the model's own scaling
        i = int(np.argmax(broken))
        raise BadRequest(
            f"instances[{i}]: the model's output is not finite for these "
            "features (values too large for its input scaling)"
        )
    latency_ms = (time.perf_counter() - start) * 1000.0
    now, labels, topic = utcnow(), model.spec.labels, kafka.topic_predictions
    predictions, records = [], []
    for row, p, path in zip(rows, probs.tolist(), paths, strict=True):
        pid = new_id()
        probabilities = dict(zip(labels, p, strict=True))
        label = labels[max(range(len(p)), key=p.__getitem__)]
        predictions.append({"id": pid, "label": label, "probabilities": probabilities})
        records.append(
            Record(
                topic,
                pid.encode(),
                prediction_payload(
                    id=pid,
                    model_name=model.name,
                    model_version=model.version,
                    features=row,
                    probabilities=probabilities,
                    label=label,
                    timestamp=now,
                    latency_ms=latency_ms,
                    path=path,
                ),
            )
        )
    state.event_log.log_many(records)  # type: ignore[union-attr]
    state.metrics.predictions.labels(model.version).inc(len(rows))
    return {"model": {"name": model.name, "version": model.version}, "predictions": predictions}
