"""Shadows, guards and canaries on the request path (issue 28), and their scoring off it.

A request takes one `ServedSet`. With only a champion (the usual case) nothing here runs.
Otherwise `LiveRouter.route` decides who answers:

- a **canary** answers when the request's routing key hashes into `live_canary_share`
  (FLYWHEEL_LIVE_CANARY_SHARE). The key is the `X-Flywheel-Routing-Key` header, so the
  same key gets the same version while the shares and roles stay (sticky); without the
  header each request draws at random. On those requests the champion scores every row
  off the path (ScoreEvent role `champion`), so canary and champion are paired.
- a **shadow** and a **guard** score the rows whose prediction id hashes into
  `live_shadow_share` (FLYWHEEL_LIVE_SHADOW_SHARE), whoever answered them.

Scoring is off the request path: `LiveRouter.after` hands the rows to one background
thread through a bounded queue (`SCORE_QUEUE` requests) and returns; when the queue is
full the rows are dropped and counted, never waited for. The thread writes one
`ScoreEvent` per row and scorer to `flywheel.scores` through the service's event log
(the spool covers a broker outage), keyed by prediction id. Nothing of it reaches the
client.

The decisions are hashes, not draws, so a test (or an operator) can tell which requests
a share selects: `in_share(text, share)` is blake2b of the text, read as a number in
[0, 1): about 1 us per row on the path. At the default 10 % share a shadow cost 0.96x
throughput and 0.98x p99 against the champion alone (`bench serve --compare shadow`,
docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter

from flywheel.events import SCHEMA_VERSION, utcnow
from flywheel.service.event_log import EventLog
from flywheel.service.model_holder import ServedModel, ServedSet
from flywheel.service.spool import Record
from flywheel.settings import GateSettings

__all__ = [
    "ROUTING_HEADER",
    "SCORE_LINGER_S",
    "SCORE_QUEUE",
    "LivePlan",
    "LiveRouter",
    "in_share",
    "score_payload",
]

log = logging.getLogger(__name__)
ROUTING_HEADER = "x-flywheel-routing-key"  # HTTP headers are case-insensitive
# requests waiting to be scored off the path; beyond it their rows are dropped (counted):
# ~1 s of sampled traffic at 10,000 requests/s and the default 10 % share
SCORE_QUEUE = 1024
# how long the scoring thread waits for more requests' rows before a forward pass: one pass
# (and one wake-up taking the GIL from the request loop) per ~20 per second instead of one
# per sampled request; the event log's sender lingers for the same reason
SCORE_LINGER_S = 0.05
_SCALE = float(2**64)


def _merged(jobs: list[_Job]) -> list[_Job]:
    """Jobs with the same scorers (the same models in the same roles) as one job."""
    groups: dict[tuple[tuple[str, int], ...], list[_Job]] = {}
    for job in jobs:
        groups.setdefault(tuple((r, id(m)) for r, m in job.scorers), []).append(job)
    out = []
    for same in groups.values():
        if len(same) == 1:
            out.append(same[0])
        else:
            ids = [i for job in same for i in job.ids]
            out.append(_Job(np.concatenate([job.x for job in same]), ids, same[0].scorers))
    return out


def in_share(text: str, share: float) -> bool:
    """Whether `text` falls in the first `share` of the hash space: the same text always
    gives the same answer for the same share, and a larger share keeps every text a
    smaller one took (sticky as a share grows).

    >>> in_share("key-1", 0.0), in_share("key-1", 1.0)
    (False, True)
    >>> in_share("key-1", 0.3) == in_share("key-1", 0.3)
    True
    """
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE < share


def score_payload(
    prediction_id: str, model: ServedModel, role: str, probabilities: Sequence[float]
) -> bytes:
    """One `flywheel.events.ScoreEvent`, encoded without a pydantic round trip (the
    consumers validate it).

    >>> from flywheel.events import ScoreEvent
    >>> from flywheel.modelspec import ModelSpec, build_model
    >>> spec = ModelSpec(input_dim=2, hidden=[2], labels=["no", "yes"])
    >>> m = ServedModel.prepare("m", "4", spec, build_model(spec))
    >>> ScoreEvent.model_validate_json(score_payload("p1", m, "shadow", [0.2, 0.8])).label
    'yes'
    """
    labels = model.spec.labels
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return orjson.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "prediction_id": prediction_id,
            "model_name": model.name,
            "model_version": model.version,
            "role": role,
            "probabilities": dict(zip(labels, probabilities, strict=True)),
            "label": labels[best],
            "timestamp": utcnow(),
        }
    )


@dataclass(frozen=True)
class LivePlan:
    """What `route` decided for one request: who answers, and who scores beside it."""

    answering: ServedModel
    scorers: list[tuple[str, ServedModel]]  # shadow, guard: the sampled rows
    paired: ServedModel | None = None  # the champion, when the canary answered: every row

    @property
    def canary(self) -> bool:
        return self.paired is not None


@dataclass(frozen=True)
class _Job:
    x: np.ndarray
    ids: list[str]
    scorers: list[tuple[str, ServedModel]]


class LiveRouter:
    """Routes requests between champion and canary and scores shadows off the path.

    >>> from prometheus_client import CollectorRegistry
    >>> from flywheel.modelspec import ModelSpec, build_model
    >>> from flywheel.settings import GateSettings
    >>> spec = ModelSpec(input_dim=2, hidden=[2], labels=["a", "b"])
    >>> one, two = (ServedModel.prepare("m", v, spec, build_model(spec)) for v in "12")
    >>> router = LiveRouter(GateSettings(live_canary_share=1.0), "flywheel.scores",
    ...                     CollectorRegistry(), lambda: None)
    >>> router.route(ServedSet(one, canary=two), {}).answering.version
    '2'
    """

    def __init__(
        self,
        gate: GateSettings,
        topic: str,
        registry: CollectorRegistry,
        event_log: Callable[[], EventLog | None],
        *,
        max_pending: int = SCORE_QUEUE,
        linger_s: float = SCORE_LINGER_S,
    ) -> None:
        self.shadow_share = gate.live_shadow_share
        self.canary_share = gate.live_canary_share
        self.topic = topic
        self._event_log = event_log
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self.linger_s = linger_s
        self.scores = Counter(
            "flywheel_scores_logged",
            "Scores logged to the scores topic by versions that did not answer, by role "
            "(shadow, guard; champion beside a canary)",
            ["model_version", "role"],
            registry=registry,
        )
        self.dropped = Counter(
            "flywheel_scores_dropped",
            "Rows a shadow, guard or paired champion did not score: the scoring queue was "
            "full (queue_full), its output was not finite, or it failed (error)",
            ["model_version", "role", "reason"],
            registry=registry,
        )
        self.canary_answers = Counter(
            "flywheel_canary_answers",
            "Predictions answered by the canary",
            ["model_version"],
            registry=registry,
        )

    # -- request path ----------------------------------------------------------------------
    def route(self, served: ServedSet, headers: Mapping[str, str]) -> LivePlan:
        """Who answers this request (the champion or the canary) and who scores beside it."""
        canary = served.canary
        if canary is not None and self.canary_share > 0.0:
            key = headers.get(ROUTING_HEADER)
            hit = (
                in_share(key, self.canary_share)
                if key is not None
                else random.random() < self.canary_share
            )
            if hit:  # a version never scores a prediction it answered itself
                scorers = [(r, m) for r, m in served.scorers() if m.version != canary.version]
                return LivePlan(canary, scorers, served.champion)
        return LivePlan(served.champion, served.scorers())

    def after(self, plan: LivePlan, x: np.ndarray, predictions: list[dict[str, Any]]) -> None:
        """Hand the rows to score to the background thread; never waits. `predictions`
        are what the answering version returned for `x`, row for row (their ids)."""
        ids = [p["id"] for p in predictions]
        if plan.paired is not None:
            self.canary_answers.labels(plan.answering.version).inc(len(ids))
            self._submit(_Job(x, ids, [("champion", plan.paired)]))
        if plan.scorers and self.shadow_share > 0.0:
            rows = [i for i, pid in enumerate(ids) if in_share(pid, self.shadow_share)]
            if rows:
                self._submit(_Job(x[rows], [ids[i] for i in rows], plan.scorers))

    def _submit(self, job: _Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            for role, model in job.scorers:
                self.dropped.labels(model.version, role, "queue_full").inc(len(job.ids))

    # -- the scoring thread ------------------------------------------------------------------
    def start(self) -> LiveRouter:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flywheel-live", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Score what is queued, then stop (before the event log closes, so it is logged)."""
        if self._thread is None:
            return
        self._closing.set()  # no more lingering: score what is queued now
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            log.warning("live scoring queue still full at shutdown; its rows are dropped")
        self._thread.join(timeout_s)
        self._thread = None

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """True once every queued job was scored and logged (tests, benchmarks)."""
        done = threading.Event()

        def waiter() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout_s)

    def _run(self) -> None:
        """Take a job, linger `linger_s` so the jobs of the next requests join it, then
        score them all in one forward pass per scorer."""
        while True:
            jobs = [self._queue.get()]
            if jobs[0] is not None and self.linger_s:
                self._closing.wait(self.linger_s)
            while True:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                for job in _merged([j for j in jobs if j is not None]):
                    self.score(job)
            except Exception:  # never let the thread die: these jobs' rows are lost
                log.exception("live scoring failed")
            finally:
                for _ in jobs:
                    self._queue.task_done()
            if any(j is None for j in jobs):
                return

    def score(self, job: _Job) -> None:
        """Each scorer's probabilities for the job's rows, logged as ScoreEvents."""
        event_log = self._event_log()
        records: list[Record] = []
        n = len(job.ids)
        for role, model in job.scorers:
            if event_log is None:  # not started yet (never after start-up)
                self.dropped.labels(model.version, role, "error").inc(n)
                continue
            try:
                probs = model.predict_proba(job.x)
            except Exception as exc:
                self.dropped.labels(model.version, role, "error").inc(n)
                log.warning("%s v%s could not score %d rows: %s", role, model.version, n, exc)
                continue
            finite = np.isfinite(probs).all(axis=1)
            for pid, p, ok in zip(job.ids, probs.tolist(), finite.tolist(), strict=True):
                if ok:
                    value = score_payload(pid, model, role, p)
                    records.append(Record(self.topic, pid.encode(), value))
            n_ok = int(finite.sum())
            if n_ok:
                self.scores.labels(model.version, role).inc(n_ok)
            if n_ok < n:
                self.dropped.labels(model.version, role, "not_finite").inc(n - n_ok)
        if records and event_log is not None:
            # as a durable write, not `log_many`: a record nobody waits for, first in the
            # sender's queue, makes the sender linger (50 ms) before its flush, and every
            # durable prediction that arrived meanwhile waited with it (p99 ~60 ms, 0.53x
            # throughput in `bench serve --compare shadow`; since fixed in the event log,
            # `EventLog._linger`, not re-measured with `log_many`). Nobody waits on the future.
            event_log.log_durable(records)
