"""The FastAPI app: predict, corrections, model info, health and metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily
from starlette.types import ASGIApp, Receive, Scope, Send

from flywheel.events import CorrectionEvent, new_id, prediction_payload, utcnow
from flywheel.service.batching import BatchCollector, PredictBatcher
from flywheel.service.errors import BadRequest, BodySizeLimit, install_error_handlers
from flywheel.service.event_log import EventLog
from flywheel.service.metrics import FollowerCollector, ServiceMetrics
from flywheel.service.model_follower import ModelFollower
from flywheel.service.model_holder import ModelHolder, ModelNotReady, ServedModel
from flywheel.service.schemas import (
    CorrectionsAccepted,
    CorrectionsRequest,
    ErrorBody,
    ModelInfo,
    PredictRequest,
    PredictResponse,
)
from flywheel.service.spool import Record
from flywheel.settings import Settings

log = logging.getLogger(__name__)
BAD_INPUT = {400: {"model": ErrorBody}, 413: {"model": ErrorBody}, 422: {"model": ErrorBody},
             503: {"model": ErrorBody}}
ROUTES = {"/v1/predict", "/v1/corrections", "/v1/model", "/healthz", "/readyz", "/metrics"}


class _RequestMetrics:
    """Counts and times every request by route and status, in plain ASGI (cheap)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500
        start = time.perf_counter()

        async def capture(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status)).inc()


@dataclass
class _Runtime:
    """What the app creates at startup and its handlers share."""

    event_log: EventLog | None = None
    follower: ModelFollower | None = None


class _EventLogCollector:
    def __init__(self, event_log: Callable[[], EventLog | None]) -> None:
        self._event_log = event_log

    def collect(self):
        el = self._event_log()
        stats = el.stats if el else None
        for name, doc, attr in (
            ("flywheel_log_delivered", "Records acknowledged by Kafka", "delivered"),
            ("flywheel_log_spooled", "Records written to the spool", "spooled"),
            ("flywheel_log_replayed", "Spooled records replayed to Kafka", "replayed"),
            ("flywheel_log_send_failures", "Batches Kafka did not acknowledge", "send_failures"),
        ):
            yield CounterMetricFamily(name, doc, value=getattr(stats, attr, 0) if stats else 0)


def create_app(
    settings: Settings, *, holder: ModelHolder | None = None,
    event_log: EventLog | None = None,
    load_model: Callable[[Settings], ServedModel] | None = None,
    follow_registry: bool | None = None,
) -> FastAPI:
    """Build the app. Missing parts (model, event log) are created at startup from settings;
    `load_model` replaces loading the registry champion (tests, benchmarks).

    `follow_registry` runs a `ModelFollower` that hot-swaps to each new champion. By default
    it runs when the app loads its model from the registry itself (no `load_model`, no
    pre-loaded `holder`): a model from elsewhere must not be replaced behind its caller."""
    holder = holder or ModelHolder()
    metrics = ServiceMetrics.create()
    runtime = _Runtime(event_log)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        registry = None
        if not holder.ready:
            if load_model is None:
                from flywheel.registry import Registry
                from flywheel.service.loading import load_champion
                registry = Registry(settings)
                model = load_champion(settings, registry)
            else:
                model = load_model(settings)
            holder.swap(model)
            log.info("serving %s v%s", model.name, model.version)
        follow = registry is not None if follow_registry is None else follow_registry
        if runtime.event_log is None:
            from flywheel.service.logging_setup import kafka_event_log
            runtime.event_log = kafka_event_log(settings)
        el = runtime.event_log
        if not el.running:
            el.start()
        if follow:  # after the first load, so startup never races it
            runtime.follower = ModelFollower(
                settings, holder, registry=(lambda: registry) if registry else None).start()
        from flywheel.gc_freeze import freeze_after_startup

        freeze_after_startup()  # full GC passes skip startup objects (docs/serving.md)
        try:
            yield
        finally:
            if runtime.follower is not None:
                runtime.follower.stop()
            el.close()
            log.info("event log closed: %s", el.stats)

    # strict_content_type=False: a body sent without any Content-Type is read as JSON
    app = FastAPI(title="Flywheel", version="1", lifespan=lifespan, strict_content_type=False,
                  summary="Online-learning inference service with a feedback loop.")
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(_RequestMetrics, metrics=metrics)
    metrics.queue_depth.set_function(lambda: runtime.event_log.queue_depth
                                     if runtime.event_log else 0)
    metrics.spooled.set_function(lambda: runtime.event_log.spool.pending
                                 if runtime.event_log else 0)
    metrics.registry.register(_EventLogCollector(lambda: runtime.event_log))
    metrics.registry.register(FollowerCollector(
        lambda: runtime.follower.stats if runtime.follower else None))
    app.state.holder, app.state.metrics, app.state.runtime = holder, metrics, runtime
    # dynamic batching (docs/serving.md): one forward pass for concurrent requests
    batcher = PredictBatcher(settings) if settings.dynamic_batching else None
    app.state.batcher = batcher
    if batcher is not None:
        metrics.registry.register(BatchCollector(batcher))

    def served() -> ServedModel:
        try:
            return holder.current()
        except ModelNotReady as exc:
            raise BadRequest("no model loaded yet; retry shortly", 503) from exc

    @app.post("/v1/predict", response_model=PredictResponse, responses=BAD_INPUT)
    async def predict(body: PredictRequest) -> dict:
        """Predict a label per instance; every returned id is logged to Kafka."""
        start = time.perf_counter()
        model = served()
        rows = body.instances
        if len(rows) > settings.max_batch:
            raise BadRequest(f"batch of {len(rows)} instances exceeds the limit of "
                             f"{settings.max_batch} (FLYWHEEL_MAX_BATCH)", 413)
        width = model.spec.input_dim
        for i, row in enumerate(rows):
            if len(row) != width:
                raise BadRequest(f"instances[{i}] has {len(row)} features; model {model.name} "
                                 f"v{model.version} expects {width}")
        with np.errstate(over="ignore"):
            x = np.asarray(rows, dtype=np.float32)
        if not np.isfinite(x).all():
            i, j = np.argwhere(~np.isfinite(x))[0]
            raise BadRequest(f"instances[{i}][{j}]: {rows[i][j]!r} is outside float32 range")
        if batcher is not None:
            probs, paths = await batcher.predict(model, x)
        else:
            probs, paths = model.predict(x)
        broken = ~np.isfinite(probs).all(axis=1)
        if broken.any():  # finite in float32, yet too large for the model's own scaling
            i = int(np.argmax(broken))
            raise BadRequest(f"instances[{i}]: the model's output is not finite for these "
                             "features (values too large for its input scaling)")
        latency_ms = (time.perf_counter() - start) * 1000.0
        now, labels, topic = utcnow(), model.spec.labels, settings.topic_predictions
        predictions, records = [], []
        for row, p, path in zip(rows, probs.tolist(), paths, strict=True):
            pid = new_id()
            probabilities = dict(zip(labels, p, strict=True))
            label = labels[max(range(len(p)), key=p.__getitem__)]
            predictions.append({"id": pid, "label": label, "probabilities": probabilities})
            records.append(Record(topic, pid.encode(), prediction_payload(
                id=pid, model_name=model.name, model_version=model.version, features=row,
                probabilities=probabilities, label=label, timestamp=now, latency_ms=latency_ms,
                path=path)))
        runtime.event_log.log_many(records)  # type: ignore[union-attr]
        metrics.predictions.labels(model.version).inc(len(rows))
        return {"model": {"name": model.name, "version": model.version},
                "predictions": predictions}

    @app.post("/v1/corrections", status_code=202, response_model=CorrectionsAccepted,
              responses=BAD_INPUT)
    async def corrections(body: CorrectionsRequest) -> JSONResponse:
        """Accept true labels for earlier predictions; all or none of a call is accepted."""
        items = body.corrections
        if len(items) > settings.max_corrections:
            raise BadRequest(f"{len(items)} corrections exceed the limit of "
                             f"{settings.max_corrections} (FLYWHEEL_MAX_CORRECTIONS)", 413)
        known = set(served().spec.labels)
        for i, c in enumerate(items):
            if c.label not in known:
                raise BadRequest(f"corrections[{i}].label: unknown label {c.label!r}; "
                                 f"known labels: {sorted(known)}")
        now, topic = utcnow(), settings.topic_corrections
        records = [
            Record(topic, c.prediction_id.encode(), CorrectionEvent(
                id=new_id(), prediction_id=c.prediction_id, label=c.label, source=c.source,
                timestamp=now).to_json())
            for c in items
        ]
        runtime.event_log.log_many(records)  # type: ignore[union-attr]
        metrics.corrections.inc(len(records))
        return JSONResponse({"accepted": len(records)}, status_code=202)

    @app.get("/v1/model", response_model=ModelInfo, responses={503: {"model": ErrorBody}})
    async def model_info() -> dict:
        m = served()
        return {"name": m.name, "version": m.version, "loaded_at": m.loaded_at,
                "input_dim": m.spec.input_dim, "labels": m.spec.labels,
                "kind": m.spec.kind, "precision": m.precision}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        el = runtime.event_log
        ready = holder.ready and el is not None and el.running
        body = {
            "ready": ready,
            "model_version": holder.current().version if holder.ready else None,
            "kafka_connected": bool(el and el.connected),
            "spooled_records": el.spool.pending if el else 0,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        m = holder.current() if holder.ready else None
        if m is not None:
            metrics.model_version.clear()
            metrics.model_version.labels(m.name, m.version).set(1)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    from flywheel.service.review_api import install_review  # /ui and /v1/review (docs/review.md)

    install_review(app, settings)
    return app
