"""Each router in `flywheel.service.routes` stands on its own: mounted on a bare FastAPI app
with a state of the test's making (no lifespan, no Kafka, no registry), it serves its paths
with the same status codes and error bodies as in the full app."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from flywheel.modelspec import ModelSpec, build_model
from flywheel.service import ModelHolder, ServedModel, ServiceConfig
from flywheel.service.backends import SharedRegistry, SharedStore
from flywheel.service.errors import install_error_handlers
from flywheel.service.metrics import ServiceMetrics
from flywheel.service.routes import health, model, predict
from flywheel.service.state import ServiceState
from flywheel.settings import Settings

SPEC = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"])


class FakeSpool:
    pending = pending_bytes = 0


class FakeEventLog:
    """Keeps what the handlers log; always running and connected."""

    running = connected = True
    spool = FakeSpool()

    def __init__(self) -> None:
        self.records: list = []

    def log_many(self, records) -> None:
        self.records += records

    def log_durable(self, records) -> Future:
        """Kept at once: what a sink that acknowledges instantly would do."""
        self.records += records
        done: Future = Future()
        done.set_result(None)
        return done

    def log_durable_async(self, records) -> asyncio.Future:
        self.records += records
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def bare_app(state: ServiceState, *routers) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    for router in routers:
        app.include_router(router)
    app.state.service = state  # where `state_of` and the `State` dependency find it
    return app


def fake_state(tmp_path) -> ServiceState:
    settings = Settings(home=tmp_path, max_batch=2)
    return ServiceState(
        config=ServiceConfig.of(settings),
        holder=ModelHolder(),
        metrics=ServiceMetrics.create(),
        registry=SharedRegistry(settings.state, settings.registry),
        store=SharedStore(settings.state),
        event_log=FakeEventLog(),
    )  # type: ignore[arg-type]


def test_the_model_router_alone_answers_503_then_the_model_it_is_given(tmp_path):
    state = fake_state(tmp_path)
    client = TestClient(bare_app(state, model.router))
    r = client.get("/v1/model")
    assert r.status_code == 503
    assert r.json()["detail"] == "no model loaded yet; retry shortly"
    torch.manual_seed(0)
    state.holder.swap(ServedModel.prepare("m", "7", SPEC, build_model(SPEC)))
    r = client.get("/v1/model")
    assert r.status_code == 200
    assert (r.json()["name"], r.json()["version"], r.json()["labels"]) == ("m", "7", SPEC.labels)


def test_the_predict_router_logs_to_the_state_it_is_given(tmp_path):
    state = fake_state(tmp_path)
    torch.manual_seed(0)
    state.holder.swap(ServedModel.prepare("m", "7", SPEC, build_model(SPEC)))
    client = TestClient(bare_app(state, predict.router, health.router))
    r = client.post("/v1/predict", json={"instances": [[0.1, 0.2, 0.3], [1, 2, 3]]})
    assert r.status_code == 200
    ids = [p["id"] for p in r.json()["predictions"]]
    assert [rec.key.decode() for rec in state.event_log.records] == ids  # type: ignore[union-attr]
    assert (
        state.metrics.registry.get_sample_value(
            "flywheel_predictions_total", {"model_version": "7"}
        )
        == 2
    )
    too_many = client.post("/v1/predict", json={"instances": [[0, 0, 0]] * 3})
    assert too_many.status_code == 413
    assert "FLYWHEEL_MAX_BATCH" in too_many.json()["detail"]
    assert client.get("/readyz").json() == {
        "ready": True,
        "model_version": "7",
        "kafka_connected": True,
        "spooled_records": 0,
        "spool_bytes": 0,
        "spool_high_water": False,
        "dependencies": {"registry": True, "kafka": True},
        "down": {},
    }
