"""What `POST /v1/predict` and the Open Inference Protocol's `infer` share: named rows or
vectors to the model's raw input, one forward pass (batched with concurrent requests),
and a prediction with its own id per row, every one of them logged to Kafka.

The two routes differ only in how a request body becomes rows and how the answer is
written; everything a prediction is (its id, label, probabilities, event and metrics)
is made here, once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import Any

import numpy as np

from flywheel.events import new_id, prediction_payload, utcnow
from flywheel.features import FeatureError
from flywheel.service.backpressure import admit
from flywheel.service.durability import store_durably
from flywheel.service.errors import BadRequest
from flywheel.service.model_holder import ServedModel
from flywheel.service.spool import Record
from flywheel.service.state import ServiceState

Row = Mapping[str, Any]


def check_batch(n: int, state: ServiceState) -> None:
    limit = state.config.service.max_batch
    if n > limit:
        raise BadRequest(
            f"batch of {n} instances exceeds the limit of {limit} (FLYWHEEL_MAX_BATCH)", 413
        )


def encode_rows(
    state: ServiceState, model: ServedModel, rows: Sequence[Row], where: str = "instances"
) -> np.ndarray:
    """The raw input vectors of named rows, by the model's schema; an unseen category
    goes to its feature's unknown bucket and is counted in /metrics. `BadRequest` (422)
    names the row and field of the first value the schema refuses."""
    encoder = model.row_encoder
    if encoder is None:
        raise BadRequest(
            f"{where}[0]: model {model.name} v{model.version} has no feature schema; it takes "
            f"vectors of {model.spec.input_dim} numbers, not named features"
        )
    try:
        encoded = encoder(rows, where=where)
    except FeatureError as exc:
        raise BadRequest(str(exc)) from None
    if encoded.unknown:
        counter = state.metrics.unknown_categories
        for feature, n in encoded.unknown.items():
            counter.labels(model.name, feature).inc(n)
    return encoded.x


def encode_vectors(
    model: ServedModel, rows: Sequence[Sequence[float]], where: str = "instances"
) -> np.ndarray:
    """Plain float vectors as the model's raw input: each exactly its input width, finite
    in float32; refused (422) for a model with categorical or boolean features."""
    if not model.takes_vectors:
        raise BadRequest(
            f"{where}: model {model.name} v{model.version} has non-numeric features "
            f"({', '.join(model.non_numeric)}): send named rows "
            '({"feature": value, ...}), not vectors'
        )
    width = model.spec.input_dim
    for i, row in enumerate(rows):
        if len(row) != width:
            raise BadRequest(
                f"{where}[{i}] has {len(row)} features; model {model.name} "
                f"v{model.version} expects {width}"
            )
    with np.errstate(over="ignore"):
        x = np.asarray(rows, dtype=np.float32)
    if not np.isfinite(x).all():
        i, j = np.argwhere(~np.isfinite(x))[0]
        raise BadRequest(f"{where}[{i}][{j}]: {rows[i][j]!r} is outside float32 range")
    return x


def logged_rows(model: ServedModel, rows: Sequence[Row]) -> Sequence[Row]:
    """The named rows as a prediction event carries them: as sent, ignored columns left
    out (a column the schema ignores is often an identifier the model must not see)."""
    ignored = model.ignored
    if not ignored:
        return rows
    return [{k: v for k, v in row.items() if k not in ignored} for row in rows]


async def predict_and_log(
    state: ServiceState,
    model: ServedModel,
    x: np.ndarray,
    *,
    start: float,
    vectors: Sequence[Sequence[float]] | None = None,
    rows: Sequence[Row] | None = None,
    where: str = "instances",
) -> list[dict[str, Any]]:
    """`{"id", "label", "probabilities"}` per row of `x` (raw input vectors), each logged
    to Kafka with the vector (`vectors` as sent, else `x`) and the named `rows` if any.

    `start` is when the request began (`time.perf_counter()`): the events' `latency_ms`.
    With FLYWHEEL_PREDICTION_DURABILITY=durable it returns once the events are
    acknowledged by Kafka or fsynced into the spool; with `fast` (the default), once
    queued (docs/serving.md#durable-answers-what-a-202-means). A full spool refuses
    it first (503, `flywheel.service.backpressure`)."""
    logging = state.config.event_log
    admit(state.event_log, logging, state.metrics.spool_refused, "predictions")
    if state.batcher is not None:
        probs, paths = await state.batcher.predict(model, x)
    else:
        probs, paths = model.predict(x)
    broken = ~np.isfinite(probs).all(axis=1)
    if broken.any():  # finite in float32, yet too large for the model's own scaling
        i = int(np.argmax(broken))
        raise BadRequest(
            f"{where}[{i}]: the model's output is not finite for these "
            "features (values too large for its input scaling)"
        )
    latency_ms = (time.perf_counter() - start) * 1000.0
    now, labels, topic = utcnow(), model.spec.labels, state.config.kafka.topic_predictions
    features = x.tolist() if vectors is None else vectors
    predictions, records = [], []
    for vector, row, p, path in zip(
        features, repeat(None) if rows is None else rows, probs.tolist(), paths, strict=False
    ):
        pid = new_id()
        probabilities = dict(zip(labels, p, strict=True))
        label = labels[max(range(len(p)), key=p.__getitem__)]
        predictions.append({"id": pid, "label": label, "probabilities": probabilities})
        payload = prediction_payload(
            id=pid,
            model_name=model.name,
            model_version=model.version,
            features=vector,
            probabilities=probabilities,
            label=label,
            timestamp=now,
            latency_ms=latency_ms,
            path=path,
            row=row,
        )
        records.append(Record(topic, pid.encode(), payload))
    if logging.prediction_durability == "durable":
        await store_durably(state.event_log, records, logging.durable_wait_ms / 1000.0)  # type: ignore[arg-type]
    else:
        state.event_log.log_many(records)  # type: ignore[union-attr]
    state.metrics.predictions.labels(model.version).inc(len(predictions))
    return predictions
