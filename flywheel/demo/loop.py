"""`flywheel demo`: the whole loop on embedded defaults, driven by a simulated production app.

The pieces (embedded broker, migrated store, registry with a champion that `init` trained on
the demo's trusted CSV, feedback worker, learner, HTTP service) are context managers here so
the demo command, the freshness benchmark and the closed-loop test start the same loop the
same way; `simulate_app` reads the demo's stream CSV (`flywheel.demo.files`), sends its rows
by name through `flywheel.client.Client` across an abrupt change and corrects a fraction of
them after a delay, recording what it was served.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from flywheel.broker import EmbeddedBroker, ensure_topics, read_topic, retention_configs
from flywheel.demo.files import DemoData, init_trusted, read_stream, synthetic_files
from flywheel.settings import Settings

if TYPE_CHECKING:
    from flywheel.client import Client
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
    fields: list[str] = field(default_factory=list)  # the names each instance was sent with

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
    from flywheel.service import (
        GracefulServer,
        ServiceConfig,
        create_app,
        header_timeout_protocol,
    )

    port = settings.port or free_port()
    config = uvicorn.Config(
        create_app(ServiceConfig.of(settings)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        http=header_timeout_protocol(settings.header_timeout_s),
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
def embedded_stack(settings: Settings, data: DemoData | None = None) -> Iterator[Settings]:
    """Start what the settings leave unset (the broker; a throwaway FLYWHEEL_SUBJECT_KEY,
    so the simulated users can be sent as data subjects), migrate the store, bootstrap a
    model: `init` on `data.trusted` when given (and the home has no champion yet), else the
    synthetic seed CSV through `ensure_champion` (the same file `synthetic_files` writes)."""
    from flywheel.learner import ensure_champion
    from flywheel.registry import Registry
    from flywheel.store import upgrade

    with contextlib.ExitStack() as stack:
        bootstrap = settings.kafka_bootstrap
        if not bootstrap:
            broker = stack.enter_context(EmbeddedBroker(log_file=settings.home_dir / "broker.log"))
            bootstrap = broker.bootstrap
            settings = settings.model_copy(update={"kafka_bootstrap": bootstrap})
        if settings.access.subject_key is None:  # this run's users are subjects of this run
            key = SecretStr(secrets.token_urlsafe(32))
            settings = settings.model_copy(update={"subject_key": key})
        ensure_topics(
            bootstrap,
            settings.topics,
            settings.topic_partitions,
            configs=retention_configs(settings.kafka, settings.feedback),
        )
        upgrade(settings.resolved_database_url)
        if data is not None:
            init_trusted(settings, data)
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


DEMO_APP = "demo"


def demo_api_key(settings: Settings) -> str | None:
    """The key the demo's app calls the service with: app `demo` (predict, correct) is
    created in the store, or given a new key if an earlier run made it (its old keys end
    now). None with FLYWHEEL_AUTH=off."""
    if settings.access.auth == "off":
        return None
    from flywheel.store import add_app, list_apps, open_store, rotate_key, session_factory

    engine = open_store(settings.resolved_database_url)
    try:
        with session_factory(engine).begin() as session:
            known = {a.name: a for a in list_apps(session)}
            if DEMO_APP in known and known[DEMO_APP].revoked_at is None:
                return rotate_key(session, DEMO_APP, grace_s=0)
            if DEMO_APP in known:
                raise ValueError(f"app {DEMO_APP!r} was revoked in this home: use a new home")
            return add_app(session, DEMO_APP, "predict,correct")
    finally:
        engine.dispose()


def simulate_app(
    url: str,
    settings: Settings,
    config: DemoConfig,
    on_progress: Callable[[int, float, str], None] = lambda n, acc, version: None,
    frozen: Callable[[list[dict[str, Any]]], list[str]] | None = None,
    data: DemoData | None = None,
) -> tuple[DemoResult, list[str]]:
    """Send the stream file's rows by name across an abrupt change; correct a fraction of
    them after a delay, through `flywheel.client.Client`, with the key of app `demo`
    (`demo_api_key`): each simulated user is a sub-source of it (`demo/user-7`) and the
    data subject of its corrections, the privacy unit (as the sub-source was before
    subjects, so the demo's DP accounting per user is unchanged).

    `data`: the demo's files (default: `synthetic_files` for `config`); the stream is read
    with the champion's schema. `frozen` predicts labels with the initial model on the same
    rows, for comparison.
    """
    from flywheel.client import Client
    from flywheel.registry import Registry

    if data is None:
        data = synthetic_files(settings, config.requests, config.drift_at)
    registry = Registry.of(settings)
    champion = registry.champion_version()
    assert champion is not None  # embedded_stack bootstrapped one
    schema = registry.load(champion).spec.schema
    if schema is None:
        raise ValueError(f"v{champion} has no feature schema: it cannot take named rows")
    instances, labels = read_stream(data, schema)
    requests = min(config.requests, len(instances))
    rng = random.Random(settings.seed)
    result, ids = DemoResult(), []
    trace = result.trace
    window: deque[int] = deque(maxlen=config.window)
    pending: deque[tuple[float, str, str, str]] = deque()  # (due, prediction id, label, user)
    hits = {"before": [0, 0], "after": [0, 0]}
    drift_at = min(data.drift_index, requests)
    trace.drift_index = drift_at
    start = time.monotonic()
    with Client(url, timeout=30, api_key=demo_api_key(settings)) as client:
        while result.predictions < requests:
            if config.rate > 0:  # keep the pace of a real app, so the loop has time to turn
                lag = start + result.predictions / config.rate - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
            phase = "before" if result.predictions < drift_at else "after"
            if phase == "after" and not trace.drift_t:
                trace.drift_t = time.monotonic() - start
            # a batch never spans the drift point, so each row's phase is its batch's
            end = min(result.predictions + config.batch, requests)
            if phase == "before":
                end = min(end, drift_at)
            rows = instances[result.predictions : end]
            truths = labels[result.predictions : end]
            if not result.fields:
                result.fields = sorted(rows[0])
            answer = client.predict(rows)
            version = answer.model.version
            now = time.monotonic() - start
            result.versions_served.add(version)
            frozen_labels = frozen(rows) if frozen else [None] * len(rows)
            for truth, pred, f in zip(truths, answer.predictions, frozen_labels, strict=True):
                ok = int(pred.label == truth)
                window.append(ok)
                hits[phase][0] += ok
                hits[phase][1] += 1
                ids.append(pred.id)
                trace.t.append(now)
                trace.ok.append(ok)
                trace.ok_frozen.append(int(f == truth))
                trace.version.append(version)
                if rng.random() < config.correction_fraction:
                    pending.append(
                        (
                            time.monotonic() + config.correction_delay_s,
                            pred.id,
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
    client: Client,
    pending: deque[tuple[float, str, str, str]],
    now: float,
    trace: Trace,
    start: float,
) -> int:
    from flywheel.client import Correction

    due = []
    while pending and pending[0][0] <= now:
        _, pid, label, user = pending.popleft()
        due.append(Correction(prediction_id=pid, label=label, source=user, subject=user))
    if due:
        client.correct(due)
        sent = time.monotonic() - start
        for c in due:
            trace.corrected_at[c.prediction_id] = sent
    return len(due)


def frozen_predictor(
    settings: Settings, version: ModelVersion
) -> Callable[[list[dict[str, Any]]], list[str]]:
    """Labels the given registry version would predict for named rows (encoded with the
    version's own schema, as the service encodes them): the "no flywheel" baseline."""
    import torch

    from flywheel.registry import Registry

    loaded = Registry.of(settings).load(version)
    loaded.module.eval()
    schema = loaded.spec.schema
    if schema is None:
        raise ValueError(f"v{version} has no feature schema: it cannot take named rows")
    encode = schema.row_encoder()

    def predict(rows: list[dict[str, Any]]) -> list[str]:
        x = encode(rows).x
        with torch.inference_mode():
            out = loaded.module(torch.from_numpy(x.astype("float32", copy=False)))
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
