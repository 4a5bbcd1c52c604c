"""Delayed-label monitoring (issue 28, part 4): how each served version does on live
traffic, read from the training store only (no Kafka consumer of its own).

Per version, over a window (default the last 24 h, `FLYWHEEL_LIVE_MONITOR_WINDOW_S`):

* **live accuracy** on the labelled predictions (`outcomes` labelled in the window) with a
  Wilson 95 % interval, and their mean log-loss;
* **label delay** (`labelled_at - predicted_at`): p50 / p90 / p99 over the newest labelled
  outcomes (at most `sample` of them) and the exact maximum;
* **served as**: "answered" when it answered predictions, and the roles it scored under
  (shadow, guard, champion beside a canary), from the `scores` of the window;
* **unlabelled share** of what the version served or scored in the window (`predictions`
  it answered plus `scores` it gave), and the **missing share**: the same among the
  predictions old enough that a label was due (older than the window's p90 label delay);
  a prediction younger than that is "pending", not missing;
* **CBPE** (confidence-based performance estimation): with calibrated probabilities the
  expected accuracy is the mean of the largest probability, so the mean confidence of the
  *unlabelled* sampled predictions estimates their accuracy before any label comes; the
  same mean on the *labelled* ones sits next to the realised accuracy (`calibration_gap`
  = CBPE - accuracy): near 0 the estimate can be trusted, far from 0 the model is over-
  (positive) or under-confident (negative) and so is its CBPE;
* **input drift**: per feature, the PSI of the version's recent inputs (its newest
  `sample` predictions in the window) against the trusted data set, over the trusted
  data's decile bins (numeric) or over categories (categorical, boolean); read as stable
  (< 0.1), moderate (< 0.25) or major, and not read at all ("few rows") on fewer than
  `MIN_PSI_ROWS` rows, where sampling noise alone reaches the first threshold;
* **segments** (`segment=FEATURE`): the same numbers per value of a categorical feature or
  per quartile (of the trusted data) of a numeric one, on the sampled rows.

Cost, per report: four grouped aggregates (outcomes by version over the
`(model_version, labelled_at)` index; predictions and scores of the window by version,
each left-joined to `outcomes` on its key; scores over `ix_scores_created_at`), and per
version three reads of at most `sample` rows (newest outcomes for the delays, newest
predictions and scores for CBPE, drift and segments), plus the trusted reference (at most
`sample` training rows, evenly spaced). On PostgreSQL the window prunes `predictions` to
the days it covers (the table is partitioned by day); on SQLite (the embedded default) the
predictions of the window are found by a scan of the table, which has no time index.
Measured with 100,000 predictions of the last day, 59,564 outcomes and 3 versions,
`sample`=5,000, on the shared 2-core development machine at load average 5-6: SQLite
1.7-2.5 s per report (half of it decoding the 30,000 sampled JSON rows), PostgreSQL 2.8-3.1 s;
`live_timeline` 0.4 s and 0.2 s. On the same data CBPE on the unlabelled predictions said
0.746-0.755 where the realised accuracy was 0.753 (the fake model is calibrated by
construction). So it runs in a background thread or a CLI, never on a request path.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

    from flywheel.features import FeatureSchema

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
PSI_FLOOR = 1e-4  # a bin's share below this counts as this (an empty bin is not infinite)
PSI_WATCH = 0.1  # PSI at or above: a moderate shift, worth a look
PSI_ALERT = 0.25  # PSI at or above: a major shift, the model sees inputs it was not fit on
# PSI of n recent rows over k bins is biased up by about (k - 1) / n even without drift
# (40 rows over 10 deciles: ~0.22, "moderate"); below this many rows it gets no reading
MIN_PSI_ROWS = 200
MAX_SEGMENTS = 20  # categories shown per segment feature; the rest are "(other)"
DEFAULT_SAMPLE = 5000
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_WINDOW_S = 366 * 86400


# ---- the numbers ---------------------------------------------------------------------------


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """The Wilson score interval of a proportion (95 % by default): unlike p ± z·se it
    stays in [0, 1] and is not degenerate at 0 or n successes.

    >>> [round(b, 4) for b in wilson(8, 10)]
    [0.4902, 0.9433]
    >>> wilson(0, 0)
    (None, None)
    """
    if n < 0 or not 0 <= correct <= n:
        raise ValueError(f"wilson: {correct} successes of {n} trials")
    if n == 0:
        return None, None
    p = correct / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def nearest_rank(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q` quantile: the smallest value with at least a share `q` of the
    values at or below it (always one of the values; None for none).

    >>> nearest_rank([5, 1, 4, 2, 3], 0.5), nearest_rank([5, 1, 4, 2, 3], 0.9)
    (3, 5)
    """
    if not 0 < q <= 1:
        raise ValueError(f"quantile {q} is not in (0, 1]")
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def delay_stats(delays_s: Sequence[float], max_s: float | None = None) -> dict[str, Any]:
    """p50 / p90 / p99 and max of label delays in seconds (max: the exact one if given,
    else the sample's).

    >>> delay_stats([10.0, 20.0, 30.0, 40.0])
    {'n': 4, 'p50_s': 20.0, 'p90_s': 40.0, 'p99_s': 40.0, 'max_s': 40.0}
    """
    return {
        "n": len(delays_s),
        "p50_s": nearest_rank(delays_s, 0.5),
        "p90_s": nearest_rank(delays_s, 0.9),
        "p99_s": nearest_rank(delays_s, 0.99),
        "max_s": max_s if max_s is not None else (max(delays_s) if delays_s else None),
    }


def cbpe(confidences: Iterable[float]) -> float | None:
    """Confidence-based performance estimate: the expected accuracy of predictions whose
    largest probability is calibrated is the mean of those probabilities.

    >>> cbpe([0.9, 0.6, 0.75]), cbpe([])
    (0.75, None)
    """
    values = list(confidences)
    return sum(values) / len(values) if values else None


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two distributions over the same bins (shares; each
    floored at `PSI_FLOOR`): Σ (a - e) · ln(a / e). Read it as: < 0.1 stable, 0.1-0.25 a
    moderate shift, ≥ 0.25 a major one.

    >>> psi([0.5, 0.5], [0.5, 0.5]), round(psi([0.5, 0.5], [0.9, 0.1]), 3)
    (0.0, 0.879)
    """
    if len(expected) != len(actual):
        raise ValueError(f"psi: {len(expected)} expected bins, {len(actual)} actual")
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, PSI_FLOOR), max(a, PSI_FLOOR)
        total += (a - e) * math.log(a / e)
    return total


def decile_edges(reference: np.ndarray) -> list[float]:
    """The inner edges of a numeric column's deciles (duplicates merged: a column with few
    values gets fewer bins).

    >>> import numpy as np
    >>> decile_edges(np.arange(1.0, 11.0))
    [1.9, 2.8, 3.7, 4.6, 5.5, 6.4, 7.3, 8.2, 9.1]
    """
    import numpy as np

    if len(reference) == 0:
        return []
    edges = np.quantile(np.asarray(reference, dtype=np.float64), np.linspace(0.1, 0.9, 9))
    return sorted({round(float(e), 12) for e in edges})


def binned_shares(values: np.ndarray, edges: Sequence[float]) -> list[float]:
    """Shares of `values` in the bins (-inf, e1], (e1, e2], ..., (ek, inf)."""
    import numpy as np

    if len(values) == 0:
        return [0.0] * (len(edges) + 1)
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left")
    counts = np.bincount(index, minlength=len(edges) + 1)
    return (counts / len(values)).tolist()


def category_shares(reference: np.ndarray, recent: np.ndarray) -> tuple[list[float], list[float]]:
    """Shares of each category (value) in the reference and the recent column, over the
    union of the categories either holds."""
    import numpy as np

    cats = sorted(set(np.unique(reference).tolist()) | set(np.unique(recent).tolist()))

    def shares(x: np.ndarray) -> list[float]:
        if len(x) == 0:
            return [0.0] * len(cats)
        return [float(np.count_nonzero(x == c)) / len(x) for c in cats]

    return shares(reference), shares(recent)


def feature_psi(reference: np.ndarray, recent: np.ndarray, kind: str) -> float | None:
    """PSI of one feature's recent values against its reference (None without either):
    numeric over the reference's decile bins, any other kind over its categories.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ref = rng.normal(size=5000)
    >>> feature_psi(ref, ref, "numeric")
    0.0
    >>> feature_psi(ref, ref + 1.0, "numeric") > 0.25
    True
    """
    if len(reference) == 0 or len(recent) == 0:
        return None
    if kind == "numeric":
        edges = decile_edges(reference)
        return psi(binned_shares(reference, edges), binned_shares(recent, edges))
    expected, actual = category_shares(reference, recent)
    return psi(expected, actual)


def drift_level(value: float | None) -> str:
    """The PSI reading: "stable", "moderate" (≥ 0.1) or "major" (≥ 0.25)."""
    if value is None:
        return "unknown"
    return "major" if value >= PSI_ALERT else "moderate" if value >= PSI_WATCH else "stable"


def parse_window(text: str | float | int) -> float:
    """A window as seconds: `90s`, `30m`, `24h`, `7d`, `2w`, or a plain number of seconds;
    between 1 s and 366 days.

    >>> parse_window("24h"), parse_window("90m"), parse_window("3600")
    (86400.0, 5400.0, 3600.0)
    """
    raw = str(text).strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", raw)
    if match is None:
        raise ValueError(f"window {text!r}: expected a number and a unit, like 30m, 24h or 7d")
    seconds = float(match.group(1)) * WINDOW_UNITS[match.group(2) or "s"]
    if not 1 <= seconds <= MAX_WINDOW_S:
        raise ValueError(f"window {text!r}: must be between 1 s and 366 days")
    return seconds


# ---- the reference: the trusted data set ------------------------------------------------------


@dataclass(frozen=True)
class FeatureInfo:
    """One raw input slot: its name, kind, and (categorical) vocabulary."""

    name: str
    kind: str  # numeric | categorical | boolean
    vocabulary: tuple[str, ...] = ()

    def value_name(self, value: float) -> str:
        """How a raw slot value reads in a segment's name."""
        if self.kind == "boolean":
            return "true" if value >= 0.5 else "false"
        if self.kind == "categorical":
            code = int(round(value))
            return self.vocabulary[code - 1] if 1 <= code <= len(self.vocabulary) else "(unknown)"
        return f"{value:g}"


@dataclass(frozen=True)
class Reference:
    """What recent inputs are compared with: the trusted data's training rows (at most
    `sample`, evenly spaced) and the feature names and kinds from its schema; without a
    trusted set, no rows (no PSI) and names `f0..fn` (numeric)."""

    features: tuple[FeatureInfo, ...] = ()
    x: np.ndarray | None = None
    note: str | None = None
    # numeric segments' quartile edges, per feature index (from the reference rows)
    quartiles: dict[int, list[float]] = field(default_factory=dict)

    @classmethod
    def of_schema(cls, schema: FeatureSchema, x: np.ndarray | None) -> Reference:
        """A reference from a feature schema and its rows (rows may be None).

        >>> from flywheel.features import Feature, FeatureSchema
        >>> s = FeatureSchema(label="y", labels=["a", "b"], features=[
        ...     Feature(name="amount", kind="numeric"),
        ...     Feature(name="country", kind="categorical", vocabulary=["DE", "FR"])])
        >>> [(f.name, f.kind) for f in Reference.of_schema(s, None).features]
        [('amount', 'numeric'), ('country', 'categorical')]
        """
        import numpy as np

        features = tuple(FeatureInfo(f.name, f.kind, tuple(f.vocabulary)) for f in schema.inputs)
        quartiles: dict[int, list[float]] = {}
        if x is not None and len(x):
            for i, f in enumerate(features):
                if f.kind == "numeric":
                    qs = np.quantile(x[:, i].astype(np.float64), [0.25, 0.5, 0.75])
                    quartiles[i] = sorted({float(q) for q in qs})
        return cls(features, x, None, quartiles)

    def names_for(self, width: int) -> tuple[FeatureInfo, ...]:
        """The features of a `width`-wide input vector (f0.. when the schema does not fit)."""
        if len(self.features) == width:
            return self.features
        return tuple(FeatureInfo(f"f{i}", "numeric") for i in range(width))


def load_reference(session: Session, model_name: str, sample: int = DEFAULT_SAMPLE) -> Reference:
    """The trusted set of `model_name` as a drift reference (at most `sample` training
    rows, evenly spaced through the set); an empty reference, with a note, without one."""
    from flywheel.store import trusted_data

    data = trusted_data(session, model_name, max_train=sample)
    if data is None:
        return Reference(note=f"no trusted data set for {model_name!r}: no drift reference")
    return Reference.of_schema(data.info.schema, data.x_train)


# ---- reading the store ----------------------------------------------------------------------


def _epoch(column: Any, dialect: str) -> Any:
    """SQL for a UTC timestamp column as seconds since the epoch (SQLite keeps text)."""
    from sqlalchemy import func

    if dialect == "sqlite":
        return (func.julianday(column) - 2440587.5) * 86400.0
    return func.extract("epoch", column)


@dataclass
class _Served:
    served: int = 0
    labelled: int = 0
    due: int = 0
    due_labelled: int = 0
    # how it met traffic: "answered" (its own predictions), and the roles of its scores
    served_as: set[str] = field(default_factory=set)


@dataclass
class _Row:
    """One sampled served row of a version: inputs, its confidence, its outcome if any."""

    features: list[float] | None
    confidence: float
    correct: bool | None
    log_loss: float | None


def _served_counts(
    session: Session,
    model_name: str,
    since: datetime,
    now: datetime,
    cutoff: datetime | None,
) -> dict[str, _Served]:
    """Per version: predictions answered and scores given in the window, those with an
    outcome, and both again among those predicted before `cutoff` (a label is due)."""
    from sqlalchemy import and_, case, func, select

    from flywheel.store import Outcome, Prediction, Score

    out: dict[str, _Served] = defaultdict(_Served)
    for table, pid, version, created in (
        (Prediction, Prediction.id, Prediction.model_version, Prediction.created_at),
        (Score, Score.prediction_id, Score.model_version, Score.created_at),
    ):
        labelled = Outcome.prediction_id.is_not(None)
        due = created < cutoff if cutoff is not None else created < since  # none due
        query = (
            select(
                version,
                func.count(),
                func.count(Outcome.prediction_id),
                func.coalesce(func.sum(case((due, 1), else_=0)), 0),
                func.coalesce(func.sum(case((and_(due, labelled), 1), else_=0)), 0),
            )
            .select_from(table)
            .outerjoin(
                Outcome,
                and_(Outcome.prediction_id == pid, Outcome.model_version == version),
            )
            .where(table.model_name == model_name, created >= since, created <= now)
            .group_by(version)
        )
        for v, n, lab, d, dl in session.execute(query):
            acc = out[str(v)]
            acc.served += int(n)
            acc.labelled += int(lab)
            acc.due += int(d)
            acc.due_labelled += int(dl)
            if table is Prediction:
                acc.served_as.add("answered")
    roles = (
        select(Score.model_version, Score.role)
        .where(Score.model_name == model_name, Score.created_at >= since, Score.created_at <= now)
        .group_by(Score.model_version, Score.role)
    )
    for v, role in session.execute(roles):
        out[str(v)].served_as.add(str(role))
    return out


def _sample_rows(
    session: Session, model_name: str, version: str, since: datetime, now: datetime, limit: int
) -> list[_Row]:
    """The newest (at most `limit`) predictions the version answered or scored in the
    window, with their inputs and their outcome if one came."""
    from sqlalchemy import and_, select

    from flywheel.store import Outcome, Prediction, Score

    answered = (
        select(
            Prediction.created_at,
            Prediction.features,
            Prediction.probabilities,
            Outcome.correct,
            Outcome.log_loss,
        )
        .outerjoin(
            Outcome,
            and_(
                Outcome.prediction_id == Prediction.id,
                Outcome.model_version == Prediction.model_version,
            ),
        )
        .where(
            Prediction.model_name == model_name,
            Prediction.model_version == version,
            Prediction.created_at >= since,
            Prediction.created_at <= now,
        )
        .order_by(Prediction.created_at.desc())
        .limit(limit)
    )
    scored = (
        select(
            Score.created_at,
            Prediction.features,
            Score.probabilities,
            Outcome.correct,
            Outcome.log_loss,
        )
        .outerjoin(Prediction, Prediction.id == Score.prediction_id)
        .outerjoin(
            Outcome,
            and_(
                Outcome.prediction_id == Score.prediction_id,
                Outcome.model_version == Score.model_version,
            ),
        )
        .where(
            Score.model_name == model_name,
            Score.model_version == version,
            Score.created_at >= since,
            Score.created_at <= now,
        )
        .order_by(Score.created_at.desc())
        .limit(limit)
    )
    rows = list(session.execute(answered)) + list(session.execute(scored))
    rows.sort(key=lambda r: r[0], reverse=True)
    out = []
    for _, features, probabilities, correct, log_loss in rows[:limit]:
        probs = [float(p) for p in (probabilities or {}).values()]
        out.append(
            _Row(
                features=list(features) if isinstance(features, list) else None,
                confidence=max(probs) if probs else float("nan"),
                correct=None if correct is None else bool(correct),
                log_loss=None if log_loss is None else float(log_loss),
            )
        )
    return out


def _delays(
    session: Session,
    model_name: str,
    version: str | None,
    since: datetime,
    now: datetime,
    limit: int,
) -> list[float]:
    """Label delays (s) of the newest `limit` outcomes labelled in the window: of one
    version, or (None) of the answered predictions (each labelled prediction once)."""
    from sqlalchemy import select

    from flywheel.store import Outcome

    query = select(Outcome.predicted_at, Outcome.labelled_at).where(
        Outcome.model_name == model_name,
        Outcome.labelled_at >= since,
        Outcome.labelled_at <= now,
    )
    if version is None:
        query = query.where(Outcome.answered.is_(True))
    else:
        query = query.where(Outcome.model_version == version)
    query = query.order_by(Outcome.labelled_at.desc()).limit(limit)
    return [max(0.0, (lab - pred).total_seconds()) for pred, lab in session.execute(query)]


def _segment_rows(
    rows: list[_Row], index: int, info: FeatureInfo, reference: Reference
) -> dict[str, list[_Row]]:
    """Sampled rows by segment: per value of a categorical or boolean feature (the
    `MAX_SEGMENTS` most common, the rest as "(other)"), per quartile of a numeric one."""
    groups: dict[str, list[_Row]] = defaultdict(list)
    usable = [r for r in rows if r.features is not None and len(r.features) > index]
    if info.kind == "numeric":
        edges = reference.quartiles.get(index)
        if not edges:
            import numpy as np

            values = np.asarray([r.features[index] for r in usable if r.features], np.float64)
            edges = (
                sorted({float(q) for q in np.quantile(values, [0.25, 0.5, 0.75])})
                if len(values)
                else []
            )
        for r in usable:
            assert r.features is not None
            value = r.features[index]
            k = sum(1 for e in edges if value > e)
            lo = f"{edges[k - 1]:.4g}" if k > 0 else "-inf"
            hi = f"{edges[k]:.4g}" if k < len(edges) else "inf"
            groups[f"Q{k + 1} ({lo}, {hi}]"].append(r)
        return dict(sorted(groups.items()))
    for r in usable:
        assert r.features is not None
        groups[info.value_name(r.features[index])].append(r)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    kept = dict(ranked[:MAX_SEGMENTS])
    rest = [r for _, rs in ranked[MAX_SEGMENTS:] for r in rs]
    if rest:
        kept["(other)"] = rest
    return kept


def row_summary(rows: Sequence[_Row]) -> dict[str, Any]:
    """Accuracy (Wilson 95 %), log-loss, CBPE on labelled and unlabelled sampled rows."""
    labelled = [r for r in rows if r.correct is not None]
    unlabelled = [r for r in rows if r.correct is None and not math.isnan(r.confidence)]
    right = sum(1 for r in labelled if r.correct)
    low, high = wilson(right, len(labelled))
    losses = [r.log_loss for r in labelled if r.log_loss is not None]
    accuracy = right / len(labelled) if labelled else None
    cbpe_labelled = cbpe(r.confidence for r in labelled if not math.isnan(r.confidence))
    return {
        "rows": len(rows),
        "labelled": len(labelled),
        "accuracy": accuracy,
        "accuracy_low": low,
        "accuracy_high": high,
        "log_loss": sum(losses) / len(losses) if losses else None,
        "cbpe_labelled": cbpe_labelled,
        "cbpe_unlabelled": cbpe(r.confidence for r in unlabelled),
        "unlabelled_share": (len(rows) - len(labelled)) / len(rows) if rows else None,
    }


def _drift(rows: Sequence[_Row], reference: Reference) -> dict[str, Any]:
    import numpy as np

    vectors = [r.features for r in rows if r.features]
    out: dict[str, Any] = {
        "rows": len(vectors),
        "features": [],
        "max_psi": None,
        "max_feature": None,
        "level": "unknown",
        "note": reference.note,
    }
    if not vectors:
        return out
    width = len(vectors[0])
    x = np.asarray([v for v in vectors if len(v) == width], dtype=np.float64)
    infos = reference.names_for(width)
    ref = reference.x
    usable = ref is not None and len(ref) > 0 and ref.shape[1] == width
    if ref is not None and not usable and out["note"] is None:
        out["note"] = "the trusted data's width differs from the served inputs': no PSI"
    few = len(x) < MIN_PSI_ROWS

    def level(value: float | None) -> str:
        return "few rows" if few and value is not None else drift_level(value)

    for i, info in enumerate(infos):
        value = feature_psi(ref[:, i], x[:, i], info.kind) if usable and ref is not None else None
        out["features"].append(
            {"name": info.name, "kind": info.kind, "psi": value, "level": level(value)}
        )
    scored = [f for f in out["features"] if f["psi"] is not None]
    if scored:
        top = max(scored, key=lambda f: f["psi"])
        out["max_psi"], out["max_feature"] = top["psi"], top["name"]
        out["level"] = level(top["psi"])
    return out


def live_report(
    engine: Engine,
    model_name: str,
    *,
    window_s: float = 86400.0,
    segment: str | None = None,
    sample: int = DEFAULT_SAMPLE,
    now: datetime | None = None,
    reference: Reference | None = None,
) -> dict[str, Any]:
    """The monitoring report of `model_name` over the last `window_s` seconds (see the
    module docstring for each number and the cost); `reference` (the trusted data as
    `load_reference` reads it) is read here when not given. `segment` names a feature;
    an unknown one is a `ValueError` listing the names.

    >>> import tempfile
    >>> from flywheel.store import make_engine, upgrade
    >>> url = f"sqlite:///{tempfile.mkdtemp()}/monitor.db"
    >>> upgrade(url)
    >>> doc = live_report(make_engine(url), "flywheel")
    >>> doc["versions"], doc["label_delay"]["n"]
    ([], 0)
    """
    from sqlalchemy import case, func, select

    from flywheel.store import Outcome, session_factory

    if not math.isfinite(window_s) or not 1 <= window_s <= MAX_WINDOW_S:
        raise ValueError(f"window_s={window_s}: must be between 1 s and 366 days")
    if not 1 <= sample <= 1_000_000:
        raise ValueError(f"sample={sample}: must be between 1 and 1,000,000 rows")
    now = (now or datetime.now(UTC)).astimezone(UTC)
    since = now - timedelta(seconds=window_s)
    dialect = engine.dialect.name
    with session_factory(engine)() as session:
        if reference is None:
            reference = load_reference(session, model_name, sample)
        seg_index: int | None = None
        seg_info: FeatureInfo | None = None
        if segment is not None:
            names = [f.name for f in reference.features]
            if segment in names:
                seg_index = names.index(segment)
            elif re.fullmatch(r"f\d+", segment) and not names:
                seg_index = int(segment[1:])
            else:
                known = ", ".join(names) if names else "f0, f1, ... (no schema)"
                raise ValueError(f"segment {segment!r}: no such feature; the features: {known}")
            seg_info = (
                reference.features[seg_index]
                if reference.features
                else FeatureInfo(segment, "numeric")
            )

        overall = _delays(session, model_name, None, since, now, sample)
        p90 = nearest_rank(overall, 0.9)
        cutoff = now - timedelta(seconds=p90) if p90 is not None else None
        delay = _epoch(Outcome.labelled_at, dialect) - _epoch(Outcome.predicted_at, dialect)
        outcome_rows = session.execute(
            select(
                Outcome.model_version,
                func.count(),
                func.coalesce(func.sum(case((Outcome.answered, 1), else_=0)), 0),
                func.coalesce(func.sum(case((Outcome.correct, 1), else_=0)), 0),
                func.coalesce(func.sum(Outcome.log_loss), 0.0),
                func.coalesce(func.sum(Outcome.confidence), 0.0),
                func.max(delay),
            )
            .where(
                Outcome.model_name == model_name,
                Outcome.labelled_at >= since,
                Outcome.labelled_at <= now,
            )
            .group_by(Outcome.model_version)
        ).all()
        served = _served_counts(session, model_name, since, now, cutoff)
        labelled = {str(r[0]): r for r in outcome_rows}
        versions = sorted(set(labelled) | set(served), key=_version_key)
        docs = []
        for v in versions:
            _, n, answered, right, loss, conf, max_delay = labelled.get(
                v, (v, 0, 0, 0, 0.0, 0.0, None)
            )
            n, right = int(n), int(right)
            low, high = wilson(right, n)
            accuracy = right / n if n else None
            cbpe_labelled = float(conf) / n if n else None
            s = served.get(v, _Served())
            rows = _sample_rows(session, model_name, v, since, now, sample)
            sampled = row_summary(rows)
            doc: dict[str, Any] = {
                "version": v,
                "labelled": n,
                "answered_labelled": int(answered),
                "correct": right,
                "accuracy": accuracy,
                "accuracy_low": low,
                "accuracy_high": high,
                "log_loss": float(loss) / n if n else None,
                "cbpe_labelled": cbpe_labelled,
                "calibration_gap": (
                    cbpe_labelled - accuracy
                    if cbpe_labelled is not None and accuracy is not None
                    else None
                ),
                "label_delay": delay_stats(
                    _delays(session, model_name, v, since, now, sample),
                    # to the ms: SQLite's julianday() is a double of days (~50 us off)
                    None if max_delay is None else max(0.0, round(float(max_delay), 3)),
                ),
                "served_as": sorted(s.served_as),
                "served": s.served,
                "served_labelled": s.labelled,
                "unlabelled_share": (s.served - s.labelled) / s.served if s.served else None,
                "due": s.due if cutoff is not None else None,
                "due_labelled": s.due_labelled if cutoff is not None else None,
                "pending": s.served - s.due if cutoff is not None else None,
                "missing_share": (
                    (s.due - s.due_labelled) / s.due if cutoff is not None and s.due else None
                ),
                "sampled": sampled["rows"],
                "cbpe_unlabelled": sampled["cbpe_unlabelled"],
                "drift": _drift(rows, reference),
            }
            if seg_index is not None and seg_info is not None:
                doc["segments"] = [
                    {"segment": name} | row_summary(group)
                    for name, group in _segment_rows(rows, seg_index, seg_info, reference).items()
                ]
            docs.append(doc)
    return {
        "model_name": model_name,
        "now": now.isoformat(),
        "since": since.isoformat(),
        "window_s": window_s,
        "sample": sample,
        "segment": segment,
        "label_delay": delay_stats(overall),
        "due_before": cutoff.isoformat() if cutoff is not None else None,
        "psi_thresholds": {"moderate": PSI_WATCH, "major": PSI_ALERT},
        "versions": docs,
    }


def live_timeline(
    engine: Engine,
    model_name: str,
    *,
    window_s: float = 86400.0,
    buckets: int = 24,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Live accuracy per version over time: the window cut in `buckets` equal spans by
    `labelled_at`, each with its labels, accuracy, Wilson 95 % bounds and CBPE (mean
    confidence) -- the `/ui` chart. One grouped aggregate over the outcomes' time index.

    >>> import tempfile
    >>> from flywheel.store import make_engine, upgrade
    >>> url = f"sqlite:///{tempfile.mkdtemp()}/timeline.db"
    >>> upgrade(url)
    >>> live_timeline(make_engine(url), "flywheel", window_s=3600, buckets=6)["points"]
    []
    """
    from sqlalchemy import Integer, case, cast, func, select

    from flywheel.store import Outcome, session_factory

    if not math.isfinite(window_s) or not 1 <= window_s <= MAX_WINDOW_S:
        raise ValueError(f"window_s={window_s}: must be between 1 s and 366 days")
    if not 1 <= buckets <= 1000:
        raise ValueError(f"buckets={buckets}: must be between 1 and 1000")
    now = (now or datetime.now(UTC)).astimezone(UTC)
    since = now - timedelta(seconds=window_s)
    span = window_s / buckets
    start = since.timestamp()
    offset = (_epoch(Outcome.labelled_at, engine.dialect.name) - start) / span
    # labelled_at >= since, so the offset is not negative: SQLite's CAST truncates it (its
    # floor() needs a build with the math functions); PostgreSQL's CAST would round
    bucket = cast(offset, Integer) if engine.dialect.name == "sqlite" else func.floor(offset)
    with session_factory(engine)() as session:
        rows = session.execute(
            select(
                Outcome.model_version,
                bucket,
                func.count(),
                func.coalesce(func.sum(case((Outcome.correct, 1), else_=0)), 0),
                func.coalesce(func.sum(Outcome.confidence), 0.0),
            )
            .where(
                Outcome.model_name == model_name,
                Outcome.labelled_at >= since,
                Outcome.labelled_at <= now,
            )
            .group_by(Outcome.model_version, bucket)
        ).all()
    cells: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for v, b, n, right, conf in rows:
        k = min(buckets - 1, max(0, int(b)))  # `now` itself falls in the last bucket
        cell = cells[(str(v), k)]
        cell[0] += int(n)
        cell[1] += int(right)
        cell[2] += float(conf)
    points = []
    for (v, k), (n, right, conf) in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        low, high = wilson(int(right), int(n))
        points.append(
            {
                "version": v,
                "start": datetime.fromtimestamp(start + k * span, UTC).isoformat(),
                "end": datetime.fromtimestamp(start + (k + 1) * span, UTC).isoformat(),
                "labelled": int(n),
                "accuracy": right / n,
                "accuracy_low": low,
                "accuracy_high": high,
                "cbpe": conf / n,
            }
        )
    return {
        "model_name": model_name,
        "since": since.isoformat(),
        "now": now.isoformat(),
        "window_s": window_s,
        "bucket_s": span,
        "points": points,
    }


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (1 << 62, version)
