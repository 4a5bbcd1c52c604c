"""`flywheel demo`: the whole stack on embedded defaults, driven by a simulated production app.

What runs today: embedded broker, migrated SQLite store, MLflow registry with a seed-trained
champion, the HTTP service, and an app that streams requests across an abrupt concept change
and sends corrections for a fraction of them after a delay. At the end every prediction id
and correction is checked on its Kafka topic.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx

from flywheel.broker import EmbeddedBroker, ensure_topics, read_topic
from flywheel.feedback import FeedbackWorker
from flywheel.settings import Settings
from flywheel.streams import Concept, seed_concept


@dataclass
class DemoConfig:
    requests: int = 3000
    batch: int = 10
    drift_at: float = 0.5
    correction_fraction: float = 0.3
    correction_delay_s: float = 1.0
    window: int = 300


@dataclass
class DemoResult:
    predictions: int = 0
    corrections: int = 0
    accuracy_before_drift: float = 0.0
    accuracy_after_drift: float = 0.0
    versions_served: set[str] = field(default_factory=set)
    events_on_topic: int = 0
    corrections_on_topic: int = 0
    corrections_joined: int = 0
    elapsed_s: float = 0.0

    @property
    def loop_closed_for_logging(self) -> bool:
        return (self.events_on_topic == self.predictions
                and self.corrections_on_topic == self.corrections
                and self.corrections_joined == self.corrections)


@contextlib.contextmanager
def running_service(settings: Settings) -> Iterator[str]:
    """Serve `create_app(settings)` from a background thread; yields its base URL."""
    import uvicorn

    from flywheel.broker import free_port
    from flywheel.service import GracefulServer, create_app

    port = settings.port or free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                            log_level="warning", access_log=False)
    server = GracefulServer(config)
    thread = threading.Thread(target=server.run, name="flywheel-demo-service", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the service did not start; see the log above")
        time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def embedded_stack(settings: Settings) -> Iterator[Settings]:
    """Start what the settings leave unset (the broker), migrate the store, bootstrap a model."""
    from flywheel.feedback import upgrade
    from flywheel.learner import ensure_champion

    with contextlib.ExitStack() as stack:
        if not settings.kafka_bootstrap:
            broker = stack.enter_context(
                EmbeddedBroker(log_file=settings.home_dir / "broker.log"))
            settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
        ensure_topics(settings.kafka_bootstrap, settings.topics, settings.topic_partitions)
        upgrade(settings.resolved_database_url)
        ensure_champion(settings)
        yield settings


@contextlib.contextmanager
def running_feedback_worker(settings: Settings) -> Iterator[FeedbackWorker]:
    """One feedback worker in a background thread, stopped (and swept) on exit."""
    from flywheel.feedback import build_worker

    worker = build_worker(settings.model_copy(update={"feedback_session_timeout_ms": 4000}))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="flywheel-demo-feedback",
                              daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(60)


def wait_joined(worker: FeedbackWorker, expected: int, timeout_s: float = 60.0) -> int:
    """Corrections the worker has joined, waiting up to `timeout_s` for `expected`."""
    deadline = time.monotonic() + timeout_s
    while worker.stats.joined < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return worker.stats.joined


def simulate_app(
    url: str, settings: Settings, config: DemoConfig,
    on_progress: Callable[[int, float, str], None] = lambda n, acc, version: None,
) -> tuple[DemoResult, list[str]]:
    """Stream requests across an abrupt concept change; correct a fraction after a delay."""
    before = seed_concept(settings.seed).stream(sample_seed=settings.seed + 1000)
    after = Concept(model_seed=settings.seed + 1).stream(sample_seed=settings.seed + 2000)
    rng = random.Random(settings.seed)
    result, ids = DemoResult(), []
    window: deque[int] = deque(maxlen=config.window)
    pending: deque[tuple[float, str, str]] = deque()
    hits = {"before": [0, 0], "after": [0, 0]}
    drift_at = int(config.requests * config.drift_at)
    start = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as client:
        while result.predictions < config.requests:
            phase = "before" if result.predictions < drift_at else "after"
            stream = before if phase == "before" else after
            rows = [next(stream) for _ in range(min(config.batch,
                                                    config.requests - result.predictions))]
            r = client.post("/v1/predict", json={"instances": [x for x, _ in rows]})
            r.raise_for_status()
            body = r.json()
            result.versions_served.add(body["model"]["version"])
            for (_, truth), pred in zip(rows, body["predictions"], strict=True):
                ok = int(pred["label"] == truth)
                window.append(ok)
                hits[phase][0] += ok
                hits[phase][1] += 1
                ids.append(pred["id"])
                if rng.random() < config.correction_fraction:
                    pending.append((time.monotonic() + config.correction_delay_s, pred["id"],
                                    truth))
            result.predictions += len(rows)
            result.corrections += _send_due(client, pending, time.monotonic())
            on_progress(result.predictions, sum(window) / len(window),
                        body["model"]["version"])
        result.corrections += _send_due(client, pending, float("inf"))
    result.accuracy_before_drift = hits["before"][0] / max(1, hits["before"][1])
    result.accuracy_after_drift = hits["after"][0] / max(1, hits["after"][1])
    result.elapsed_s = time.monotonic() - start
    return result, ids


def _send_due(client: httpx.Client, pending: deque, now: float) -> int:
    due = []
    while pending and pending[0][0] <= now:
        _, pid, label = pending.popleft()
        due.append({"prediction_id": pid, "label": label, "source": "demo-app"})
    if due:
        client.post("/v1/corrections", json={"corrections": due}).raise_for_status()
    return len(due)


def count_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> int:
    """Records on `topic`, waiting up to `timeout_s` for `expected` to arrive."""
    return len(read_topic(bootstrap, topic, at_least=expected, timeout_s=timeout_s))
