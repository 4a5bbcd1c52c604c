"""What the app's handlers share, handed to them as a FastAPI dependency.

`create_app` builds one `ServiceState` and stores it on `app.state.service`; a handler asks
for it with a `State` parameter, or, on the hot routes, `state_of(request)`. A test can
mount any router from `flywheel.service.routes` on a bare FastAPI app and give it its own
state by setting `app.state.service`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from flywheel.retry import DependencyStatus
from flywheel.service.backends import SharedRegistry, SharedStore
from flywheel.service.batching import PredictBatcher
from flywheel.service.config import ServiceConfig
from flywheel.service.errors import BadRequest
from flywheel.service.event_log import EventLog
from flywheel.service.live import LiveRouter
from flywheel.service.metrics import ServiceMetrics
from flywheel.service.model_follower import ModelFollower
from flywheel.service.model_holder import ModelHolder, ModelNotReady, ServedModel, ServedSet


@dataclass
class ServiceState:
    """The settings groups, the served model, the prediction log, the registry and the metrics.

    `event_log` and `follower` are filled in at startup (the app's lifespan); `batcher` is
    set when FLYWHEEL_DYNAMIC_BATCHING is on; `dependencies` says which of the registry and
    Kafka the service cannot reach now."""

    config: ServiceConfig
    holder: ModelHolder
    metrics: ServiceMetrics
    registry: SharedRegistry
    store: SharedStore
    event_log: EventLog | None = None
    follower: ModelFollower | None = None
    batcher: PredictBatcher | None = None
    # shadows, canaries and guards (flywheel.service.live); None: the champion answers all
    live: LiveRouter | None = None
    # what /readyz and flywheel_dependency_up report: the registry (first load, follower)
    dependencies: DependencyStatus = field(
        default_factory=lambda: DependencyStatus(("registry", "kafka"))
    )

    def served(self) -> ServedModel:
        """The model snapshot a request works with; 503 while none is loaded yet.

        A plain call inside the handler, not a dependency: a dependency would answer 503
        before the body is validated, and a bad body must stay a 4xx about the body."""
        try:
            return self.holder.current()
        except ModelNotReady as exc:
            raise BadRequest("no model loaded yet; retry shortly", 503) from exc

    def served_set(self) -> ServedSet:
        """The champion and the live roles held with it, as one snapshot (503 as `served`)."""
        try:
            return self.holder.served_set()
        except ModelNotReady as exc:
            raise BadRequest("no model loaded yet; retry shortly", 503) from exc


def state_of(request: Request) -> ServiceState:
    """The app's state, for the hot routes (predict, corrections), which take the request
    itself rather than the `State` dependency: solving even an async dependency cost
    ~25 us of a ~255 us request in `bench serve` (2-vCPU VM)."""
    return request.app.state.service


async def get_state(request: Request) -> ServiceState:
    """Async on purpose: FastAPI runs a plain-`def` dependency in its thread pool, a hop
    that cost `POST /v1/predict` ~25 % of its throughput in `bench serve` (3,000 vs 3,925
    requests/s on the same 2-vCPU VM); an async one is called in the event loop."""
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]
