"""From joined corrections to training rows: the correction itself, its verdict, its
counterexamples (bounded per source), and the error counters behind the reports."""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
from sqlalchemy import func, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from torch import nn

from flywheel.appkeys import app_of
from flywheel.events import utcnow
from flywheel.feedback.analyzer import AnalyzerConfig, analyze_many, split_assigner
from flywheel.feedback.counterexamples import (
    Counterexample,
    CounterexampleConfig,
    Request,
    generate_many,
)
from flywheel.feedback.join import JoinedPair
from flywheel.feedback.messages import Rejected
from flywheel.feedback.reference_data import LabelledPool
from flywheel.settings import FeedbackSettings
from flywheel.store import NO_SOURCE, CounterexampleUsage, ErrorCount, Origin, Split
from flywheel.subjects import privacy_unit

log = logging.getLogger(__name__)
# Plain strings, looked up once: a batch builds tens of thousands of rows.
_CORRECTION, _COUNTEREXAMPLE = Origin.CORRECTION.value, Origin.COUNTEREXAMPLE.value
_TRAIN, _QUARANTINE = Split.TRAIN.value, Split.QUARANTINE.value
ModelLoader = Callable[[str], "tuple[list[str], nn.Module] | None"]
# PostgreSQL advisory locks of the per-source budget: (this class, a hash of the source).
_BUDGET_LOCK_CLASS = zlib.crc32(b"flywheel.counterexample_budget") & 0x7FFFFFFF
_LOCK_SOURCES = text(
    "SELECT pg_advisory_xact_lock(:cls, k)"
    " FROM unnest(CAST(:keys AS integer[])) WITH ORDINALITY AS t(k, i) ORDER BY i"
)


def _seed_of(key: str) -> int:
    """A per-correction seed: a replayed batch makes exactly the same counterexamples."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


@dataclass(slots=True)
class PreparedPair:
    """A joined pair, analyzed: what the store transaction writes for it."""

    pair: JoinedPair
    row: dict | None  # its correction example (None: unusable)
    outcome: tuple | None  # its error-counter key
    variants: list[dict] | None = None  # every counterexample it may get, in order
    rejected: Rejected | None = None  # unusable: a dead letter instead of rows


class ExampleBuilder:
    """Called by the worker inside its store transaction with the pairs it just joined."""

    def __init__(
        self,
        feedback: FeedbackSettings,
        pool: LabelledPool,
        load_model: ModelLoader,
        analyzer: AnalyzerConfig | None = None,
        counterexamples: CounterexampleConfig | None = None,
    ) -> None:
        self.feedback = feedback
        self.pool = pool
        self.load_model = load_model
        self.analyzer = analyzer or AnalyzerConfig()
        self.counterexamples = counterexamples or CounterexampleConfig()
        self._models: dict[str, tuple[list[str], nn.Module] | None] = {}

    def _model(self, version: str) -> tuple[list[str], nn.Module] | None:
        if version not in self._models:
            try:
                self._models[version] = self.load_model(version)
            except Exception as exc:  # the gradient-sign strategy is skipped, not the join
                log.warning(
                    "model version %s unavailable (%s); no gradient-sign variants", version, exc
                )
                self._models[version] = None
        return self._models[version]

    def __call__(
        self, session: Session, pairs: list[JoinedPair]
    ) -> tuple[list[dict], list[Rejected]]:
        """Example rows for the usable pairs, and a dead letter for each unusable one
        (their error counts added in the store)."""
        rows, rejected, outcomes = self.finish(session, self.prepare(pairs))
        self.count(session, outcomes)
        return rows, rejected

    def prepare(self, pairs: list[JoinedPair]) -> list[PreparedPair]:
        """Everything about `pairs` that needs no store: whether each is usable, its
        verdict and split, its correction row, its error-count key, and all the variants
        it could get (a function of the pair alone, seeded by its correction id). The
        worker runs it on the consumer thread while the store writes the batch before.

        A pair whose correction names a label the model does not have, or whose stored
        prediction does not fit the reference, cannot be analyzed or trained on; refusing
        it here keeps one bad pair from failing (and forever replaying) the whole batch.
        """
        out: list[PreparedPair] = []
        usable = []
        dim = self.pool.reference.input_dim
        for p in pairs:
            probabilities = p.probabilities
            if (
                p.true_label in probabilities
                and len(p.features) == dim
                and abs(sum(probabilities.values()) - 1.0) <= 1e-3
            ):
                usable.append(p)
                continue
            reason = self._unusable(p)
            if reason is None:  # a NaN sum: for the analysis to refuse, in its words
                usable.append(p)
                continue
            value = orjson.dumps(
                {
                    "correction_id": p.correction_id,
                    "prediction_id": p.prediction_id,
                    "label": p.true_label,
                    "source": p.source,
                }
            )
            out.append(
                PreparedPair(
                    p,
                    None,
                    None,
                    rejected=Rejected(
                        "joined-pair",
                        -1,
                        -1,
                        p.prediction_id.encode(),
                        value,
                        f"unusable pair: {reason}",
                    ),
                )
            )
        if not usable:
            return out
        now = utcnow()
        verdicts = analyze_many(
            [p.features for p in usable],
            [p.probabilities for p in usable],
            [p.predicted for p in usable],
            [p.true_label for p in usable],
            self.pool,
            self.analyzer,
        )
        hours: dict[datetime, datetime] = {}
        assign = split_assigner(self.feedback.holdout_fraction)
        wanting: list[tuple[PreparedPair, str]] = []
        for p, (error_type, trainable) in zip(usable, verdicts, strict=True):
            split = assign(p.prediction_id) if trainable else _QUARANTINE
            row = {
                "dedup_key": f"correction:{p.correction_id}",
                "origin": _CORRECTION,
                "error_type": error_type,
                "parent_prediction_id": p.prediction_id,
                "features": p.features,
                "label": p.true_label,
                "weight": 1.0,
                "split": split,
                "source": p.source,
                "privacy_unit": privacy_unit(p.subject, p.prediction_id),
                "created_at": now,
            }
            hour = hours.get(p.corrected_at)
            if hour is None:
                hour = hours[p.corrected_at] = p.corrected_at.replace(
                    minute=0, second=0, microsecond=0
                )
            prepared = PreparedPair(
                p,
                row,
                (
                    p.model_name,
                    p.model_version,
                    hour,
                    p.predicted,
                    p.true_label,
                    error_type or "correct",
                ),
            )
            out.append(prepared)
            # holdout and quarantine never leak into training via variants
            if split == _TRAIN and error_type is not None:
                wanting.append((prepared, error_type))
        for (prepared, error_type), variants in zip(
            wanting, self._generate([(pp.pair, e) for pp, e in wanting]), strict=True
        ):
            p = prepared.pair
            assert prepared.row is not None
            prediction_unit = prepared.row["privacy_unit"]
            prepared.variants = [
                {
                    "dedup_key": f"counterexample:{p.correction_id}:{i}",
                    "origin": _COUNTEREXAMPLE,
                    "error_type": error_type,
                    "parent_prediction_id": p.prediction_id,
                    "features": v.features,
                    "label": v.label,
                    "weight": v.weight,
                    "split": _TRAIN,
                    "source": p.source,
                    # derived from the correction: the same subject's data, the same unit
                    "privacy_unit": prediction_unit,
                    "created_at": now,
                }
                for i, v in enumerate(variants)
            ]
        return out

    def finish(
        self, session: Session, prepared: list[PreparedPair]
    ) -> tuple[list[dict], list[Rejected], Counter]:
        """The rows to write for prepared pairs, in their order, each source's variants
        within its budget for the window (handed out in pair order); and their error
        counts, for `count` once the rows are written. Reads the store (and on PostgreSQL
        locks the budgets it spends: `_lock_budgets`), writes nothing."""
        rows: list[dict] = []
        rejected: list[Rejected] = []
        wanting = [pp for pp in prepared if pp.variants]
        # the budget query only when some pair could use it
        budget = (
            self.budget_left(session, {app_of(pp.pair.source) for pp in wanting}, utcnow())
            if wanting
            else {}
        )
        default = self.feedback.counterexample_budget
        outcomes: Counter[tuple[str, str, datetime, str, str, str]] = Counter()
        for pp in prepared:
            if pp.rejected is not None:
                rejected.append(pp.rejected)
                continue
            # a pair that is not rejected has both (PreparedPair's contract)
            assert pp.row is not None and pp.outcome is not None
            rows.append(pp.row)
            outcomes[pp.outcome] += 1
            if pp.variants:
                source = app_of(pp.pair.source)  # sub-sources spend their app's budget
                room = budget.get(source, default)
                if room > 0:
                    taken = pp.variants[:room]
                    budget[source] = room - len(taken)
                    rows += taken
        return rows, rejected, outcomes

    def _unusable(self, p: JoinedPair) -> str | None:
        if p.true_label not in p.probabilities:
            return (
                f"correction label {p.true_label!r} is not one of the model's labels "
                f"{sorted(p.probabilities)}"
            )
        dim = self.pool.reference.input_dim
        if len(p.features) != dim:
            return f"prediction has {len(p.features)} features, the reference has {dim}"
        if abs(sum(p.probabilities.values()) - 1.0) > 1e-3:
            return "prediction probabilities do not sum to 1"
        return None

    def _generate(self, items: list[tuple[JoinedPair, str]]) -> list[list[Counterexample]]:
        if not items:
            return []
        requests = []
        for p, error_type in items:
            loaded = self._model(p.model_version)
            requests.append(
                Request(
                    np.asarray(p.features, dtype=np.float64),
                    p.true_label,
                    error_type,
                    labels=loaded[0] if loaded else sorted(p.probabilities),
                    true_class_examples=self.pool.of_class(p.true_label),
                    model=loaded[1] if loaded else None,
                    seed=_seed_of(p.correction_id),
                )
            )
        return generate_many(requests, reference=self.pool.reference, config=self.counterexamples)

    def budget_left(
        self, session: Session, sources: set[str | None], now: datetime
    ) -> dict[str | None, int]:
        """Counterexamples each source may still add in the current window (public so a
        test without a store can subclass the builder with budgets of its own).

        A source here is an app (`flywheel.appkeys.app_of`): its own counterexamples and
        those of every sub-source in its namespace (`shop/eu`) count against one budget, so
        an app that invents sub-sources gets no more than one honest source.

        Bounding amplification per source keeps one noisy (or hostile) client from
        flooding the training data with synthetic copies of its own corrections. The
        store counts them per minute (`counterexample_usage`), so the window is read in
        whole minutes: it starts at the beginning of the minute `window` seconds ago,
        which counts a little more than the window, never less.
        """
        since = now - timedelta(seconds=self.feedback.counterexample_window_s)
        start = since.astimezone(UTC).replace(second=0, microsecond=0)
        keys = {NO_SOURCE if s is None else s: s for s in sources}
        _lock_budgets(session, keys)
        named = [k for k in keys if k != NO_SOURCE]
        which = or_(
            CounterexampleUsage.source.in_(list(keys)),
            *(CounterexampleUsage.source.startswith(k + "/", autoescape=True) for k in named),
        )
        used: dict[str, int] = {}
        for source, n in session.execute(
            select(CounterexampleUsage.source, func.sum(CounterexampleUsage.count))
            .where(CounterexampleUsage.minute >= start, which)
            .group_by(CounterexampleUsage.source)
        ):
            unit = app_of(source) or NO_SOURCE
            used[unit] = used.get(unit, 0) + int(n)
        budget = self.feedback.counterexample_budget
        return {s: budget - int(used.get(key, 0)) for key, s in keys.items()}

    @staticmethod
    def count(session: Session, outcomes: Counter) -> None:
        """Add `outcomes` to the error counters: the transaction's last write.

        Every worker adds to the same few counter rows (a model version's hour), and an
        upsert holds its rows' locks until the transaction commits. So the counters come
        last, when nothing but the commit is left to wait for, and in key order: two
        transactions lock them in the same order and cannot deadlock (in key-less
        order, two workers of `bench feedback`'s traffic deadlocked on them in one of
        six rounds: a 1 s `deadlock_timeout`, then a retry).
        """
        if not outcomes:
            return
        rows = [
            {
                "model_name": k[0],
                "model_version": k[1],
                "hour": k[2],
                "predicted": k[3],
                "actual": k[4],
                "outcome": k[5],
                "count": outcomes[k],
            }
            for k in sorted(outcomes)
        ]
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = insert(ErrorCount)
        stmt = stmt.on_conflict_do_update(
            index_elements=[
                "model_name",
                "model_version",
                "hour",
                "predicted",
                "actual",
                "outcome",
            ],
            set_={"count": ErrorCount.count + stmt.excluded.count},
        )
        session.execute(stmt, rows)


def _lock_budgets(session: Session, sources: Iterable[str]) -> None:
    """On PostgreSQL, hold each source's budget until this transaction ends.

    The budget is read, spent and counted within one transaction, and a concurrent one
    cannot see what this one has spent until it commits: two workers writing for the
    same source at the same moment would each spend all that is left. With the lock, the
    second reads the source's usage only once the first has committed (or rolled back),
    so the bound holds for any number of workers. Taken in key order, so two
    transactions cannot deadlock on them; only transactions that want variants for the
    same source wait for each other, and they already did, at the counters the trigger
    upserts. SQLite needs none: a worker's transaction has written (its records, or its
    claims) before it reads the budget, and SQLite lets one transaction write at a time.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    keys = sorted({zlib.crc32(s.encode()) & 0x7FFFFFFF for s in sources})
    if keys:
        session.execute(_LOCK_SOURCES, {"cls": _BUDGET_LOCK_CLASS, "keys": keys})
