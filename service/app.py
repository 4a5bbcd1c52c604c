"""The FastAPI app: predict, corrections, model info, health, metrics, review and the Open
Inference Protocol (`/v2`), assembled from the routers in `flywheel.service.routes` around
one `ServiceState`; its OpenAPI document describes the served champion's features.

Start-up never waits on the registry: if the first load of the champion fails because
MLflow or the store is down, the app starts anyway, answers 503 on /readyz (naming what is
down) and on predictions, and keeps loading in the background with `flywheel.retry`'s
backoff (FLYWHEEL_RETRY_*) until it succeeds; the follower starts after that load. A
refusal no retry fixes (credentials, a store schema this code does not fit) still ends
start-up with its reason."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from flywheel.retry import Backoff, Fatal, fatal_reason, retry_call, transient
from flywheel.service.auth import AppKeys, auth_openapi, engine_of
from flywheel.service.backends import SharedRegistry, SharedStore
from flywheel.service.batching import BatchCollector, PredictBatcher
from flywheel.service.config import ServiceConfig
from flywheel.service.errors import BodySizeLimit, install_error_handlers
from flywheel.service.event_log import EventLog
from flywheel.service.live import LiveRouter
from flywheel.service.loading import load_champion
from flywheel.service.metrics import (
    DependencyCollector,
    EventLogCollector,
    FollowerCollector,
    RequestMetrics,
    ServiceMetrics,
)
from flywheel.service.model_follower import ModelFollower
from flywheel.service.model_holder import ModelHolder, ServedModel
from flywheel.service.monitor_metrics import LiveMonitor, MonitorCollector
from flywheel.service.openapi import install_champion_openapi
from flywheel.service.ratelimit import RateLimit, RateLimits
from flywheel.service.routes import admin, corrections, health, metrics, model, predict, review, v2
from flywheel.service.state import ServiceState
from flywheel.service.trust import PromotionTrust, TrustCollector

if TYPE_CHECKING:
    from flywheel.registry import Registry

log = logging.getLogger(__name__)
# the paths counted by their own name in the request metrics; every other one is "other"
ROUTES = {"/v1/predict", "/v1/corrections", "/v1/model", "/healthz", "/readyz", "/metrics"}


def create_app(
    config: ServiceConfig,
    *,
    holder: ModelHolder | None = None,
    event_log: EventLog | None = None,
    load_model: Callable[[ServiceConfig], ServedModel] | None = None,
    follow_registry: bool | None = None,
    registry: Registry | None = None,
) -> FastAPI:
    """Build the app from the service's settings groups (`ServiceConfig.of(settings)`).
    Missing parts (model, event log) are created at startup from them; `load_model`
    replaces loading the registry champion (tests, benchmarks).

    `follow_registry` runs a `ModelFollower` that hot-swaps to each new champion. By default
    it runs when the app loads its model from the registry itself (no `load_model`, no
    pre-loaded `holder`): a model from elsewhere must not be replaced behind its caller.

    `registry` is the process's one `Registry` (the serve command builds it); without one,
    the app builds it on first use. The first load, the follower and the review endpoints
    all share it."""
    state = ServiceState(
        config=config,
        holder=holder or ModelHolder(),
        metrics=ServiceMetrics.create(),
        registry=SharedRegistry(config.state, config.registry, registry),
        store=SharedStore(config.state),
        event_log=event_log,
    )

    stopping = threading.Event()  # ends a background first load at shutdown
    trust = PromotionTrust(config.registry, config.state)  # signed promotions only

    def start_following() -> None:
        state.follower = ModelFollower(
            config.kafka,
            config.registry,
            config.service,
            state.holder,
            registry=state.registry,
            status=state.dependencies,
            trust=trust,
        ).start()

    def load_in_background(follow: bool) -> threading.Thread:
        """Retry the first load until the registry answers; then follow it."""

        def run() -> None:
            try:
                served = retry_call(
                    lambda: load_champion(state.registry(), config.trusted, config.service, trust),
                    dependency="registry",
                    policy=Backoff.of(config.retry),
                    status=state.dependencies,
                    stop=stopping,
                    what="loading the champion",
                )
            except Exception as exc:
                if not stopping.is_set():
                    log.critical("no model can be loaded (%s); /readyz stays 503", exc)
                return
            state.holder.swap(served)
            log.info("serving %s v%s", served.name, served.version)
            if follow and not stopping.is_set():
                start_following()

        thread = threading.Thread(target=run, name="flywheel-first-load", daemon=True)
        thread.start()
        return thread

    # live-monitoring gauges, refreshed off the scrape path (docs/monitoring.md)
    monitor = LiveMonitor(state.store, config.registry.model_name, config.gate)
    keys = None
    if config.access.auth == "on":
        from flywheel.store import KeyBook

        keys = KeyBook(engine_of(state.store), config.access.auth_cache_ttl_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        trust.check_keys()  # configured keys that cannot be read end start-up, by name
        if not trust.enabled:
            log.warning(
                "FLYWHEEL_MODEL_TRUST=off: any version the champion alias names is served, "
                "signed or not; for local experiments only (docs/security.md)"
            )
        if keys is None:
            log.warning(
                "FLYWHEEL_AUTH=off: predictions and corrections are accepted without an app "
                "key and corrections keep the source their caller names; for local "
                "experiments only (docs/security.md)"
            )
        else:
            keys.start()  # writes the keys' last use, off the request path
            # the key store opened now, before the GC freeze below: opening it on the first
            # request left its imports and engine to every later full GC pass
            if state.store()[0] is None:
                log.warning("app keys cannot be checked yet: %s", state.store()[1])
        from_registry = not state.holder.ready and load_model is None
        follow = from_registry if follow_registry is None else follow_registry
        loader: threading.Thread | None = None
        if from_registry:
            try:
                served = load_champion(state.registry(), config.trusted, config.service, trust)
            except Exception as exc:
                reason = fatal_reason(exc)
                if reason is not None:
                    raise Fatal(f"registry: {reason}") from exc
                if not transient(exc):
                    raise
                log.warning(
                    "the champion cannot be loaded yet (%s); answering 503 until it can",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
                state.dependencies.down("registry", exc)
                loader = load_in_background(follow)
            else:
                state.dependencies.up("registry")
                state.holder.swap(served)
                log.info("serving %s v%s", served.name, served.version)
        elif not state.holder.ready:
            assert load_model is not None
            served = load_model(config)
            state.holder.swap(served)
            log.info("serving %s v%s", served.name, served.version)
        if state.event_log is None:
            from flywheel.service.logging_setup import kafka_event_log

            state.event_log = kafka_event_log(config.kafka, config.event_log, config.state)
        el = state.event_log
        if not el.running:
            el.start()
        live.start()
        if follow and loader is None:  # after the first load, so startup never races it
            start_following()
        from flywheel.gc_freeze import freeze_after_startup

        freeze_after_startup()  # full GC passes skip startup objects (docs/serving.md)
        monitor.start()
        try:
            yield
        finally:
            stopping.set()
            monitor.stop()
            if loader is not None:
                loader.join(10.0)
            if state.follower is not None:
                state.follower.stop()
            if keys is not None:
                keys.close()
            live.close()  # what it holds is scored and logged before the log closes
            el.close()
            log.info("event log closed: %s", el.stats)

    # A body must say it is JSON (FastAPI's strict content type): a page in a browser can
    # post a body with no Content-Type cross-site without a CORS preflight, and read as
    # JSON it made corrections (issue 26). Only /v1/predict and /v2 infer opt out (theirs).
    # No /docs or /redoc: FastAPI's pages load Swagger UI and ReDoc from a CDN and run inline
    # script, which the review page's CSP (script-src 'self') forbids for good reason, and
    # the bundles (~1.5 MB) are not in the stack. /openapi.json stays; any viewer reads it.
    app = FastAPI(
        title="Flywheel",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        summary="Online-learning inference service with a feedback loop.",
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=config.service.max_body_bytes)
    limits = RateLimits(config.access)
    if limits.any:  # inside AppKeys: it reads the app the key check verified
        app.add_middleware(RateLimit, limits=limits, refused=state.metrics.rate_limited)
    if keys is not None:  # every write path needs an app key (flywheel.service.auth)
        app.add_middleware(AppKeys, book=keys, admin_token=config.service.admin_token)
        _with_auth_openapi(app)
    app.add_middleware(RequestMetrics, metrics=state.metrics, routes=ROUTES)
    m = state.metrics
    m.queue_depth.set_function(lambda: state.event_log.queue_depth if state.event_log else 0)
    m.spooled.set_function(lambda: state.event_log.spool.pending if state.event_log else 0)
    m.spool_bytes.set_function(
        lambda: state.event_log.spool.pending_bytes if state.event_log else 0
    )
    m.registry.register(EventLogCollector(lambda: state.event_log))
    m.registry.register(FollowerCollector(lambda: state.follower.stats if state.follower else None))
    m.registry.register(DependencyCollector(state.dependencies, lambda: state.event_log))
    m.registry.register(TrustCollector(trust))
    m.registry.register(MonitorCollector(monitor))
    # dynamic batching (docs/serving.md): one forward pass for concurrent requests
    if config.service.dynamic_batching:
        state.batcher = PredictBatcher(config.service)
        m.registry.register(BatchCollector(state.batcher))
    # shadows, canaries and guards beside the champion (docs/serving.md#shadows-and-canaries)
    live = state.live = LiveRouter(
        config.gate, config.kafka.topic_scores, m.registry, lambda: state.event_log
    )
    app.state.service = state
    # the hot routes' own route objects go straight into the app's routing table: an
    # included router is matched through one more level (FastAPI 0.138), ~7 us a request
    for router in (predict.router, corrections.router, v2.router):
        app.router.routes.extend(router.routes)
    for router in (
        model.router,
        health.router,
        metrics.router,
        v2.meta_router,
        review.router,
        review.ui_router,
        admin.router,
    ):
        app.include_router(router)
    review.mount_ui(app)  # /ui and /v1/review (docs/review.md)
    install_champion_openapi(app, state.holder)  # /openapi.json shows the served features
    return app


def _with_auth_openapi(app: FastAPI) -> None:
    """FastAPI's document plus the app-key scheme on every write path (built once)."""
    generate = app.openapi
    built: list[dict] = []

    def openapi() -> dict:
        if not built:
            built.append(auth_openapi(generate()))
        return built[0]

    app.openapi = openapi  # type: ignore[method-assign]
