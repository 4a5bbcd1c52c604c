"""`flywheel demo`: the whole loop on embedded defaults, driven by a simulated production app.

The pieces (embedded broker, migrated store, registry with a seed-trained champion, feedback
worker, learner, HTTP service) are context managers here so the demo command, the freshness
benchmark and the closed-loop test start the same loop the same way; `simulate_app` streams
requests across an abrupt concept change and sends corrections for a fraction of them after
a delay, recording what it was served.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from flywheel.broker import EmbeddedBroker, ensure_topics, read_topic
from flywheel.settings import Settings
from flywheel.streams import drift_concept, seed_concept

if TYPE_CHECKING:
    from flywheel.feedback import FeedbackWorker
    from flywheel.learner import OnlineLearner
    from flywheel.registry import ModelVersion


@dataclass
class DemoConfig:
    requests: int = 6000
    rate: float = 60.0  # requests per second; 0 = as fast as the service answers
    batch: int = 6
    drift_at: float = 1 / 3
    correction_fraction: float = 0.3
    correction_delay_s: float = 1.0
    window: int = 300
    users: int = 5000  # end users who send corrections: the privacy unit (source)


@dataclass
class Trace:
    """What the simulated app saw, request by request, and when it sent each correction."""

    t: list[float] = field(default_factory=list)  # seconds since the stream started
    ok: list[int] = field(default_factory=list)  # served prediction was right
    ok_frozen: list[int] = field(default_factory=list)  # the initial model would be right
    version: list[str] = field(default_factory=list)
    corrected_at: dict[str, float] = field(default_factory=dict)  # prediction id -> t sent
    drift_index: int = 0
    drift_t: float = 0.0

    def first_served(self) -> dict[str, float]:
        """When each version answered its first request."""
        out: dict[str, float] = {}
        for t, v in zip(self.t, self.version, strict=True):
            out.setdefault(v, t)
        return out


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
    trace: Trace = field(default_factory=Trace)

    @property
    def loop_closed_for_logging(self) -> bool:
        return (
            self.events_on_topic == self.predictions
            and self.corrections_on_topic == self.corrections
            and self.corrections_joined == self.corrections
        )


@contextlib.contextmanager
def running_service(settings: Settings) -> Iterator[str]:
    """Serve the app from a background thread; yields its base URL."""
    import uvicorn

    from flywheel.broker import free_port
    from flywheel.service import GracefulServer, ServiceConfig, create_app

    port = settings.port or free_port()
    config = uvicorn.Config(
        create_app(ServiceConfig.of(settings)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
    )
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
    from flywheel.learner import ensure_champion
    from flywheel.registry import Registry
    from flywheel.store import upgrade

    with contextlib.ExitStack() as stack:
        bootstrap = settings.kafka_bootstrap
        if not bootstrap:
            broker = stack.enter_context(EmbeddedBroker(log_file=settings.home_dir / "broker.log"))
            bootstrap = broker.bootstrap
            settings = settings.model_copy(update={"kafka_bootstrap": bootstrap})
        ensure_topics(bootstrap, settings.topics, settings.topic_partitions)
        upgrade(settings.resolved_database_url)
        # on a new home: the synthetic problem imported by `flywheel init` (trusted set + v1)
        ensure_champion(settings.trusted, Registry.of(settings))
        yield settings


@contextlib.contextmanager
def _in_background(run: Callable[[threading.Event], object], name: str) -> Iterator[None]:
    """Run `run(stop)` on a daemon thread; set `stop` and join it on exit."""
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(stop,), name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


@contextlib.contextmanager
def running_feedback_worker(settings: Settings) -> Iterator[FeedbackWorker]:
    """One feedback worker in a background thread, stopped (and swept) on exit."""
    from flywheel.feedback import build_worker

    worker = build_worker(settings.model_copy(update={"feedback_session_timeout_ms": 4000}))
    with _in_background(worker.run, "flywheel-demo-feedback"):
        yield worker


@contextlib.contextmanager
def running_learner(settings: Settings) -> Iterator[OnlineLearner]:
    """The online learner in a background thread, stopped on exit."""
    from flywheel.learner import LearnerConfig, OnlineLearner
    from flywheel.registry import Registry

    # the learner's own registry, as in `flywheel learn`
    learner = OnlineLearner(LearnerConfig.of(settings), Registry.of(settings))
    learner.start()
    with _in_background(learner.run, "flywheel-demo-learner"):
        yield learner


@contextlib.contextmanager
def running_loop(
    settings: Settings, serve: Settings | None = None
) -> Iterator[tuple[FeedbackWorker, OnlineLearner, str]]:
    """Feedback worker, learner and service on a stack `embedded_stack` prepared; yields
    (worker, learner, service URL). `serve` overrides the service's settings only."""
    with (
        running_feedback_worker(settings) as worker,
        running_learner(settings) as learner,
        running_service(serve or settings) as url,
    ):
        yield worker, learner, url


def wait_joined(worker: FeedbackWorker, expected: int, timeout_s: float = 60.0) -> int:
    """Corrections the worker has joined, waiting up to `timeout_s` for `expected`."""
    deadline = time.monotonic() + timeout_s
    while worker.stats.joined < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return worker.stats.joined


def simulate_app(
    url: str,
    settings: Settings,
    config: DemoConfig,
    on_progress: Callable[[int, float, str], None] = lambda n, acc, version: None,
    frozen: Callable[[list[list[float]]], list[str]] | None = None,
) -> tuple[DemoResult, list[str]]:
    """Stream requests across an abrupt concept change; correct a fraction after a delay.

    `frozen` predicts labels with the initial model on the same rows, for comparison.
    """
    before = seed_concept(settings.seed).stream(sample_seed=settings.seed + 1000)
    after = drift_concept(settings.seed).stream(sample_seed=settings.seed + 2000)
    rng = random.Random(settings.seed)
    result, ids = DemoResult(), []
    trace = result.trace
    window: deque[int] = deque(maxlen=config.window)
    pending: deque[tuple[float, str, str, str]] = deque()  # (due, prediction id, label, user)
    hits = {"before": [0, 0], "after": [0, 0]}
    drift_at = int(config.requests * config.drift_at)
    trace.drift_index = drift_at
    start = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as client:
        while result.predictions < config.requests:
            if config.rate > 0:  # keep the pace of a real app, so the loop has time to turn
                lag = start + result.predictions / config.rate - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
            phase = "before" if result.predictions < drift_at else "after"
            if phase == "after" and not trace.drift_t:
                trace.drift_t = time.monotonic() - start
            stream = before if phase == "before" else after
            rows = [
                next(stream) for _ in range(min(config.batch, config.requests - result.predictions))
            ]
            r = client.post("/v1/predict", json={"instances": [x for x, _ in rows]})
            r.raise_for_status()
            body = r.json()
            version = body["model"]["version"]
            now = time.monotonic() - start
            result.versions_served.add(version)
            frozen_labels = frozen([x for x, _ in rows]) if frozen else [None] * len(rows)
            for (_, truth), pred, f in zip(rows, body["predictions"], frozen_labels, strict=True):
                ok = int(pred["label"] == truth)
                window.append(ok)
                hits[phase][0] += ok
                hits[phase][1] += 1
                ids.append(pred["id"])
                trace.t.append(now)
                trace.ok.append(ok)
                trace.ok_frozen.append(int(f == truth))
                trace.version.append(version)
                if rng.random() < config.correction_fraction:
                    pending.append(
                        (
                            time.monotonic() + config.correction_delay_s,
                            pred["id"],
                            truth,
                            f"user-{rng.randrange(config.users)}",
                        )
                    )
            result.predictions += len(rows)
            result.corrections += _send_due(client, pending, time.monotonic(), trace, start)
            on_progress(result.predictions, sum(window) / len(window), version)
        result.corrections += _send_due(client, pending, float("inf"), trace, start)
    result.accuracy_before_drift = hits["before"][0] / max(1, hits["before"][1])
    result.accuracy_after_drift = hits["after"][0] / max(1, hits["after"][1])
    result.elapsed_s = time.monotonic() - start
    return result, ids


def _send_due(
    client: httpx.Client,
    pending: deque[tuple[float, str, str, str]],
    now: float,
    trace: Trace,
    start: float,
) -> int:
    due = []
    while pending and pending[0][0] <= now:
        _, pid, label, user = pending.popleft()
        due.append({"prediction_id": pid, "label": label, "source": user})
    if due:
        client.post("/v1/corrections", json={"corrections": due}).raise_for_status()
        sent = time.monotonic() - start
        for c in due:
            trace.corrected_at[c["prediction_id"]] = sent
    return len(due)


def frozen_predictor(
    settings: Settings, version: ModelVersion
) -> Callable[[list[list[float]]], list[str]]:
    """Labels the given registry version would predict: the "no flywheel" baseline."""
    import numpy as np
    import torch

    from flywheel.registry import Registry

    loaded = Registry.of(settings).load(version)
    loaded.module.eval()

    def predict(rows: list[list[float]]) -> list[str]:
        with torch.inference_mode():
            out = loaded.module(torch.from_numpy(np.asarray(rows, dtype=np.float32)))
        return [loaded.spec.labels[i] for i in out.argmax(1).tolist()]

    return predict


def learned_examples(settings: Settings) -> dict[str, int]:
    """Corrected prediction id -> id of the training example it became (train split)."""
    from sqlalchemy import select

    from flywheel.store import Example, Origin, Split, make_engine, session_factory

    engine = make_engine(settings.resolved_database_url)
    try:
        with session_factory(engine)() as session:
            rows = session.execute(
                select(Example.parent_prediction_id, Example.id).where(
                    Example.origin == Origin.CORRECTION.value, Example.split == Split.TRAIN.value
                )
            ).all()
    finally:
        engine.dispose()
    return {pid: eid for pid, eid in rows if pid}


def count_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> int:
    """Records on `topic`, waiting up to `timeout_s` for `expected` to arrive."""
    return len(read_topic(bootstrap, topic, at_least=expected, timeout_s=timeout_s))
