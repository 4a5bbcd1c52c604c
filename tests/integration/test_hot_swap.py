"""Hot swap on real parts: the service (uvicorn in a thread) follows a SQLite MLflow registry
through model events on the real broker, or by polling when no event comes, and swaps
under concurrent load without failing a request or mislabelling a response."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import torch

from flywheel import promotion
from flywheel.events import PredictionEvent
from flywheel.learner import default_spec
from flywheel.modelspec import build_model
from flywheel.registry import Registry
from flywheel.service import ModelFollower, ServiceConfig, create_app
from flywheel.settings import Settings
from flywheel.store import upgrade
from tests.conftest import make_app_key
from tests.deadlines import deadline
from tests.serving import uvicorn_serving

from .conftest import consume

pytestmark = pytest.mark.integration
ROWS = np.random.default_rng(3).normal(0.5, 0.4, size=(16, 8)).round(4).tolist()
TAGS = {
    "source": "manual",
    "examples": "seed[0,800)",
    "epsilon": "none",
    "delta": "none",
    "gate": "test: no gate",
}


@dataclass
class Service:
    url: str
    follower: ModelFollower
    app: object
    headers: dict[str, str]  # app `tests`'s key


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[Service]:
    """The production app (`create_app(ServiceConfig.of(settings))`) under uvicorn in a
    thread, so that client threads really run concurrently with the follower's swaps."""
    upgrade(settings.resolved_database_url)
    headers = make_app_key(settings.resolved_database_url).headers
    app = create_app(ServiceConfig.of(settings))
    with uvicorn_serving(app, "test-hot-swap-service") as url:
        follower = app.state.service.follower
        assert follower is not None, "the production app must follow the registry"
        yield Service(url, follower, app, headers)


# A swap is an event (or a poll), an MLflow load and a warm-up: well under a second here,
# but a stalled CI machine must not fail a correct swap. Still less than the 60 s poll of
# the tests that prove the event, not the poll, did it.
SWAP_S = 40.0


def wait_for(cond: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> bool:
    until = time.monotonic() + deadline(timeout_s)
    while not cond():
        if time.monotonic() > until:
            return False
        time.sleep(step_s)
    return True


def served_version(url: str) -> str | None:
    """The version `/v1/model` names; None for a call that timed out (a stalled machine):
    the callers poll."""
    try:
        return httpx.get(f"{url}/v1/model", timeout=5).json()["version"]
    except httpx.TimeoutException:
        return None


def publish_variant(registry: Registry, base: str, seed: int) -> str:
    """A new version whose predictions visibly differ from `base`'s."""
    loaded = registry.load(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loaded.module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return registry.publish(loaded.spec, loaded.module, tags={"parent_version": base, **TAGS})


@pytest.fixture()
def registry(settings: Settings) -> Registry:
    """A registry whose champion is an untrained model: training one (as `ensure_champion`
    would) costs seconds and these tests only need versions that predict differently."""
    reg = Registry.of(settings)
    torch.manual_seed(0)
    spec = default_spec()
    reg.set_champion(reg.publish(spec, build_model(spec), tags={"parent_version": "", **TAGS}))
    return reg


def start_listening(service: Service) -> None:
    """Wait until the consumer sits at the topic's end and the startup checks are done, so
    that only the coming event can explain a swap."""
    assert service.follower.wait_listening(30), "model-events consumer never got ready"
    assert service.follower.wait_idle(30)


def swaps_metric(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("flywheel_model_swaps_total "):
            return float(line.split()[1])
    raise AssertionError("flywheel_model_swaps_total missing from /metrics")


def test_a_promotion_event_is_followed_long_before_the_poll(settings, registry):
    settings = settings.model_copy(update={"registry_poll_s": 60.0})
    v1 = registry.champion_version()
    v2 = publish_variant(registry, v1, seed=1)
    with serving(settings) as svc:
        assert served_version(svc.url) == v1
        start_listening(svc)
        t0 = time.monotonic()
        promotion.promote(settings.kafka, v2, reason="test", actor="pytest", registry=registry)
        assert wait_for(lambda: served_version(svc.url) == v2, SWAP_S), "promotion not followed"
        elapsed = time.monotonic() - t0
        r = httpx.post(
            f"{svc.url}/v1/predict",
            json={"instances": ROWS[:2]},
            timeout=deadline(5),
            headers=svc.headers,
        )
        assert r.status_code == 200 and r.json()["model"]["version"] == v2
        assert svc.follower.stats.events_followed == 1
        assert svc.follower.stats.swaps == 1 and swaps_metric(svc.url) == 1.0
    assert elapsed < SWAP_S  # the poll (60 s) cannot have done it


def test_without_an_event_the_poll_finds_the_new_champion(settings, registry):
    settings = settings.model_copy(update={"registry_poll_s": 0.5})
    v1 = registry.champion_version()
    v2 = publish_variant(registry, v1, seed=2)
    with serving(settings) as svc:
        start_listening(svc)
        registry.promote(v2, reason="test, no announcement", actor="pytest")  # alias only
        assert wait_for(lambda: served_version(svc.url) == v2, SWAP_S), "poll did not follow"
        assert svc.follower.stats.events_followed == 0 and svc.follower.stats.swaps == 1


def test_a_rollback_is_followed_like_a_promotion(settings, registry):
    settings = settings.model_copy(update={"registry_poll_s": 60.0})
    v1 = registry.champion_version()
    v2 = publish_variant(registry, v1, seed=3)
    with serving(settings) as svc:
        start_listening(svc)
        promotion.promote(settings.kafka, v2, reason="test", actor="pytest", registry=registry)
        assert wait_for(lambda: served_version(svc.url) == v2, SWAP_S)
        event = promotion.rollback(
            settings.kafka, reason="test rollback", actor="pytest", registry=registry
        )
        assert (event.kind, event.version) == ("rolled_back", v1)
        assert wait_for(lambda: served_version(svc.url) == v1, SWAP_S), "rollback not followed"
        assert svc.follower.stats.events_followed == 2 and svc.follower.stats.swaps == 2


@dataclass
class Hammer:
    """Client threads posting one known row per request until stopped."""

    url: str
    headers: dict[str, str]
    threads: int = 4
    stop: threading.Event = field(default_factory=threading.Event)
    responses: list[tuple[int, dict]] = field(default_factory=list)  # (row index, body)
    failures: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self, k: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10, headers=self.headers) as client:
            i = k
            while not self.stop.is_set():
                row = i % len(ROWS)
                i += self.threads
                try:
                    r = client.post("/v1/predict", json={"instances": [ROWS[row]]})
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failures.append(repr(exc))
                    continue
                with self._lock:
                    if r.status_code == 200:
                        self.responses.append((row, r.json()))
                    else:
                        self.failures.append(f"{r.status_code}: {r.text[:200]}")

    @contextlib.contextmanager
    def running(self) -> Iterator[Hammer]:
        workers = [
            threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.threads)
        ]
        for w in workers:
            w.start()
        try:
            yield self
        finally:
            self.stop.set()
            for w in workers:
                w.join(30)


def expected_probabilities(registry: Registry, versions: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for v in versions:
        module = registry.load(v).module.eval()
        with torch.inference_mode():
            out[v] = torch.softmax(module(torch.tensor(ROWS, dtype=torch.float32)), 1).numpy()
    return out


def test_hot_swaps_under_concurrent_load_fail_nothing_and_label_every_response(settings, registry):
    settings = settings.model_copy(update={"registry_poll_s": 60.0})
    v1 = registry.champion_version()
    v2, v3 = publish_variant(registry, v1, seed=4), publish_variant(registry, v1, seed=5)
    registered = {v.version for v in registry.versions()}
    assert registered == {v1, v2, v3}
    plan = [v2, v3, v1, v2]
    with serving(settings) as svc:
        start_listening(svc)
        with Hammer(svc.url, svc.headers).running() as load:
            assert wait_for(lambda: len(load.responses) >= 20, 30)
            for version in plan:
                promotion.promote(
                    settings.kafka,
                    version,
                    reason="swap under load",
                    actor="pytest",
                    registry=registry,
                )
                assert wait_for(lambda v=version: served_version(svc.url) == v, SWAP_S)
                n = len(load.responses)
                assert wait_for(lambda n=n: len(load.responses) >= n + 20, 30)
        assert svc.app.state.service.event_log.wait_idle(30)
        assert svc.follower.stats.swaps == len(plan)
        assert svc.follower.stats.failures == 0

    assert load.failures == [], load.failures[:5]
    seen = [body["model"]["version"] for _, body in load.responses]
    assert set(seen) <= registered, f"unregistered versions served: {set(seen) - registered}"
    assert set(seen) == registered  # every promoted version served some of the load
    # each response is what the version it names computes: no mixing inside a request
    expected = expected_probabilities(registry, sorted(registered))
    labels = list(load.responses[0][1]["predictions"][0]["probabilities"])
    by_id: dict[str, str] = {}
    for row, body in load.responses:
        (pred,) = body["predictions"]
        got = np.array([pred["probabilities"][label] for label in labels])
        np.testing.assert_allclose(got, expected[body["model"]["version"]][row], atol=1e-5)
        by_id[pred["id"]] = body["model"]["version"]
    # ...and its prediction event names the same version
    records = consume(settings.kafka_bootstrap, settings.topic_predictions, len(by_id))
    logged = {}
    for _, value in records:
        event = PredictionEvent.model_validate_json(value)
        logged[event.id] = event.model_version
    assert logged == by_id
