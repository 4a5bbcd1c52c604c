"""Why was the model wrong? Classifies a corrected prediction so the worker knows what to do.

The error type decides what the correction becomes: novel, boundary and confident errors
are trainable (and get counterexamples), while a *suspect* correction -- one that
contradicts both a confident model and the labelled examples around the input -- is
quarantined until something corroborates it, because training on a wrong label is worse
than not training at all. Pure functions: the worker supplies the data, nothing here
touches Kafka or the database.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Protocol

import numpy as np

from flywheel.feedback.reference import ReferenceStats
from flywheel.store import ErrorType, Split

_HOLDOUT, _TRAIN = Split.HOLDOUT.value, Split.TRAIN.value  # plain strings: called per row
PROBABILITY_SUM_TOLERANCE = 1e-3
# The served label is the first argmax of float32 probabilities; allow for that rounding.
ARGMAX_TOLERANCE = 1e-6


@dataclass(frozen=True)
class AnalyzerConfig:
    """Thresholds for the error rules; the defaults suit a softmax classifier."""

    confident_threshold: float = 0.8
    boundary_margin: float = 0.2
    neighbours: int = 7
    suspect_agreement: float = 0.7
    suspect_max_distance: float = 1.5

    def __post_init__(self) -> None:
        for name in ("confident_threshold", "boundary_margin", "suspect_agreement"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if (
            isinstance(self.neighbours, bool)
            or not isinstance(self.neighbours, int)
            or self.neighbours < 1
        ):
            raise ValueError(f"neighbours must be a positive int, got {self.neighbours!r}")
        if not (math.isfinite(self.suspect_max_distance) and self.suspect_max_distance > 0):
            raise ValueError(
                f"suspect_max_distance must be a positive number, got {self.suspect_max_distance}"
            )


@dataclass(frozen=True)
class Verdict:
    """The analysis of one labelled prediction, with the numbers behind it."""

    correct: bool
    error_type: str | None
    trainable: bool
    confidence: float
    margin: float
    distance: float
    neighbour_agreement: float | None
    reason: str


def _check_probabilities(probabilities: Mapping[str, float]) -> tuple[float, float]:
    """(top probability, top1 - top2) after checking it is a distribution over >= 2 labels."""
    if len(probabilities) < 2:
        raise ValueError(f"probabilities must cover at least 2 labels, got {len(probabilities)}")
    try:
        values = np.asarray([float(p) for p in probabilities.values()], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"probabilities must be numbers, got {dict(probabilities)}") from exc
    if not np.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise ValueError(
            f"probabilities must be finite numbers in [0, 1], got {dict(probabilities)}"
        )
    total = float(values.sum())
    if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise ValueError(
            f"probabilities must sum to 1 (+/- {PROBABILITY_SUM_TOLERANCE}), "
            f"they sum to {total:.6f}"
        )
    top2 = np.sort(values)[-2:]
    return float(top2[1]), float(top2[1] - top2[0])


def _check_label(label: str, probabilities: Mapping[str, float], what: str) -> None:
    if label not in probabilities:
        raise ValueError(f"{what} {label!r} is not a known label; known: {sorted(probabilities)}")


def neighbour_labels(
    x: np.ndarray,
    neighbours: tuple[np.ndarray, Sequence[str]] | None,
    probabilities: Mapping[str, float],
    reference: ReferenceStats,
    config: AnalyzerConfig,
) -> list[str]:
    """Labels of the k nearest candidates within `suspect_max_distance`, nearest first.

    Candidates farther than the radius are dropped rather than counted: a far labelled
    example is no evidence about this input's label.
    """
    if neighbours is None:
        return []
    points, labels = neighbours
    labels = list(labels)
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0 and not labels:
        return []
    if pts.ndim != 2 or pts.shape[0] != len(labels):
        raise ValueError(
            f"neighbours must be (matrix of rows, one label per row); got shape "
            f"{pts.shape} and {len(labels)} labels"
        )
    for label in set(labels):
        _check_label(label, probabilities, "neighbour label")
    if reference.categorical:  # codes differ or not (`ReferenceStats.pair_distance`)
        reference.standardize(pts), reference.standardize(x)  # validates, as below
        dist = reference.pair_distance(pts, np.asarray(x, dtype=np.float64))
    else:
        z = reference.standardize(pts) - reference.standardize(x)
        dist = np.linalg.norm(z, axis=1)
    # Stable sort: equally distant candidates keep the caller's order, so results repeat.
    order = np.argsort(dist, kind="stable")
    near = [i for i in order[: config.neighbours] if dist[i] <= config.suspect_max_distance]
    return [labels[i] for i in near]


def analyze(
    features: Sequence[float] | np.ndarray,
    probabilities: Mapping[str, float],
    predicted: str,
    true_label: str,
    reference: ReferenceStats,
    neighbours: tuple[np.ndarray, Sequence[str]] | None = None,
    config: AnalyzerConfig | None = None,
) -> Verdict:
    """Classify one prediction given its true label.

    `neighbours` are candidate labelled examples (rows, labels) near the input -- the
    caller should leave out the example born from this very correction. Rules for a wrong
    prediction, first match wins: novel (far from the reference data, so neighbours mean
    nothing), suspect (confident model and >= k close neighbours mostly agreeing with the
    model, not the correction; not trainable), boundary (small top1 - top2 margin),
    confident (everything else).
    """
    config = config or AnalyzerConfig()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"features must be a 1-D vector, got shape {x.shape}")
    confidence, margin = _check_probabilities(probabilities)
    _check_label(predicted, probabilities, "predicted label")
    _check_label(true_label, probabilities, "true label")
    if float(probabilities[predicted]) < confidence - ARGMAX_TOLERANCE:
        raise ValueError(
            f"predicted label {predicted!r} (p={probabilities[predicted]:.4f}) is "
            f"not the most probable one (p={confidence:.4f})"
        )
    distance = reference.distance(x)  # validates width and finiteness
    near = neighbour_labels(x, neighbours, probabilities, reference, config)
    agreement = sum(label == predicted for label in near) / len(near) if near else None
    numbers = (
        f"confidence {confidence:.3f}, margin {margin:.3f}, reference distance "
        f"{distance:.2f} vs novelty cut-off {reference.distance_threshold:.2f}"
    )
    if agreement is not None:
        numbers += f", {agreement:.0%} of {len(near)} close neighbours labelled {predicted!r}"

    if predicted == true_label:
        return Verdict(
            correct=True,
            error_type=None,
            trainable=True,
            confidence=confidence,
            margin=margin,
            distance=distance,
            neighbour_agreement=agreement,
            reason=f"correct: predicted {predicted!r} with {numbers}.",
        )

    error_type = _error_type(
        bool(reference.is_novel(x)), confidence, margin, len(near), agreement, config
    )
    if error_type is ErrorType.NOVEL:
        why = (
            "the input is far from the reference data, so the model had nothing like it "
            "to learn from"
        )
    elif error_type is ErrorType.SUSPECT:
        why = (
            f"the correction contradicts a confident model and {agreement:.0%} of its "
            f"{len(near)} nearest labelled neighbours, so it is quarantined until "
            f"corroborated"
        )
    elif error_type is ErrorType.BOUNDARY:
        why = (
            f"the top two labels are within {config.boundary_margin} of each other, near "
            f"the decision boundary"
        )
    else:
        why = "the model was wrong well away from the decision boundary"
    return Verdict(
        correct=False,
        error_type=error_type.value,
        trainable=error_type is not ErrorType.SUSPECT,
        confidence=confidence,
        margin=margin,
        distance=distance,
        neighbour_agreement=agreement,
        reason=f"{error_type.value}: predicted {predicted!r} but the true label "
        f"is {true_label!r}; {why} ({numbers}).",
    )


def _error_type(
    novel: bool,
    confidence: float,
    margin: float,
    near: int,
    agreement: float | None,
    config: AnalyzerConfig,
) -> ErrorType:
    """The rules for a wrong prediction, first match wins (see `analyze`); one copy of them
    for the one-at-a-time and the batch paths."""
    if novel:
        return ErrorType.NOVEL
    if (
        confidence >= config.confident_threshold
        and near >= config.neighbours
        and agreement is not None
        and agreement >= config.suspect_agreement
    ):
        return ErrorType.SUSPECT
    if margin < config.boundary_margin:
        return ErrorType.BOUNDARY
    return ErrorType.CONFIDENT


class NeighbourSource(Protocol):
    """Labelled examples to look up neighbours in (`LabelledPool`)."""

    reference: ReferenceStats

    def near(self, x: np.ndarray, k: int) -> tuple[np.ndarray, list[str]]: ...

    def near_many(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def labels(self) -> frozenset[str]: ...

    @property
    def points(self) -> np.ndarray: ...


# Within this (relative) distance of a cut-off, a batch result is recomputed exactly as
# `analyze` computes it: vectorized sums may differ from it in the last bits.
_EXACT_BAND = 1e-9


def analyze_many(
    features: Sequence[Sequence[float]],
    probabilities: Sequence[Mapping[str, float]],
    predicted: Sequence[str],
    true_labels: Sequence[str],
    pool: NeighbourSource,
    config: AnalyzerConfig | None = None,
) -> list[tuple[str | None, bool]]:
    """(error_type, trainable) per prediction: what `analyze` decides for each of them,
    given `pool.near(x, config.neighbours)` as neighbours, computed for a whole batch.

    The common case is vectorized: novelty for all rows at once, and a neighbour search
    only where it can change the answer (a wrong, confident, not novel prediction: the
    suspect rule). Anything unusual -- a value `analyze` would refuse, a distance within
    rounding of a cut-off -- goes through `analyze` itself, so errors and edge cases are
    exactly its own.
    """
    config = config or AnalyzerConfig()
    reference = pool.reference
    n = len(features)
    out: list[tuple[str | None, bool] | None] = [None] * n
    exact: list[int] = []  # rows for `analyze` itself
    try:
        x = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError):  # ragged or not numbers
        x = np.empty((0, 0))
    points = pool.points
    if (
        x.ndim != 2
        or x.shape != (n, reference.input_dim)
        or points.ndim != 2
        or points.shape[1] != reference.input_dim
        or not np.isfinite(points).all()
    ):
        return [
            _one(i, features, probabilities, predicted, true_labels, pool, config) for i in range(n)
        ]
    z = reference.z_scores(x)  # as `reference.distance` measures each row
    distance = np.linalg.norm(z, axis=1)
    threshold = reference.distance_threshold
    near_cut = np.abs(distance - threshold) <= _EXACT_BAND * threshold
    ok, confidences, margins, correct = _quick_checks(
        probabilities, predicted, true_labels, np.asarray(np.isfinite(x).all(axis=1)), pool.labels()
    )
    exact.extend(np.flatnonzero(~ok).tolist())
    for i in np.flatnonzero(ok & correct).tolist():
        out[i] = (None, True)
    searches: list[tuple[int, float, float]] = []  # (row, confidence, margin)
    for i in np.flatnonzero(ok & ~correct).tolist():
        # Within rounding of the cut-off, decide it exactly as `analyze` does.
        novel = bool(reference.is_novel(x[i]) if near_cut[i] else distance[i] > threshold)
        confidence, margin = float(confidences[i]), float(margins[i])
        if not novel and confidence >= config.confident_threshold:
            searches.append((i, confidence, margin))  # the suspect rule needs neighbours
            continue
        error_type = _error_type(novel, confidence, margin, 0, None, config)
        out[i] = (error_type.value, error_type is not ErrorType.SUSPECT)
    if searches:
        rows = np.asarray([r for r, _, _ in searches])
        points, labels = pool.near_many(x[rows], config.neighbours)
        radius = config.suspect_max_distance
        # As `neighbour_labels`: standardize the candidates and the input, then measure.
        dist: np.ndarray
        if reference.categorical:
            dist = reference.pair_distance(points, x[rows][:, None, :])
        else:
            dist = np.linalg.norm(
                (points - reference.mean) / reference.std - z[rows][:, None, :], axis=2
            )
        close = dist <= radius
        unsure = np.asarray((np.abs(dist - radius) <= _EXACT_BAND * radius).any(axis=1))
        for j, (i, confidence, margin) in enumerate(searches):
            if unsure[j]:
                exact.append(i)
                continue
            votes = labels[j][close[j]]
            count = len(votes)
            agreement = (sum(v == predicted[i] for v in votes) / count) if count else None
            error_type = _error_type(False, confidence, margin, count, agreement, config)
            out[i] = (error_type.value, error_type is not ErrorType.SUSPECT)
    for i in sorted(exact):
        out[i] = _one(i, features, probabilities, predicted, true_labels, pool, config)
    return out  # type: ignore[return-value]


def _one(
    i: int,
    features: Sequence[Sequence[float]],
    probabilities: Sequence[Mapping[str, float]],
    predicted: Sequence[str],
    true_labels: Sequence[str],
    pool: NeighbourSource,
    config: AnalyzerConfig,
) -> tuple[str | None, bool]:
    """Row `i` exactly as one call of `analyze` judges it (and refuses it)."""
    x = np.asarray(features[i], dtype=np.float64)
    verdict = analyze(
        features[i],
        probabilities[i],
        predicted[i],
        true_labels[i],
        pool.reference,
        pool.near(x, config.neighbours),
        config,
    )
    return verdict.error_type, verdict.trainable


_MATRIX_MIN_ROWS = 24  # fewer rows: per-row checks are faster (crossover measured at ~24)


def _quick_checks(
    probabilities: Sequence[Mapping[str, float]],
    predicted: Sequence[str],
    true_labels: Sequence[str],
    finite: np.ndarray,
    pool_labels: frozenset[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`_quick_check` for every row at once: (accepted, confidence, margin, predicted the
    true label). A row is not accepted when `analyze` might refuse it, its features are
    not `finite`, or a neighbour's label could be one its probabilities lack: `analyze`
    itself takes those. Rows are grouped by their labels (in order; one group in
    practice), and each group's values checked as one matrix."""
    n = len(probabilities)
    ok, correct = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    confidence, margin = np.zeros(n), np.zeros(n)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, labels in enumerate(map(tuple, probabilities)):
        groups.setdefault(labels, []).append(i)
    for labels, rows in groups.items():
        if len(labels) < 2 or not pool_labels <= set(labels):
            continue  # refused by analyze, or a neighbour label it would refuse
        values = list(chain.from_iterable(probabilities[i].values() for i in rows))
        # ints, bools, strings -- or too few rows for numpy to pay off: one at a time
        if len(rows) < _MATRIX_MIN_ROWS or set(map(type, values)) != {float}:
            for i in rows:
                checked = (
                    _quick_check(probabilities[i], predicted[i], true_labels[i])
                    if finite[i]
                    else None
                )
                if checked is not None:
                    ok[i] = True
                    confidence[i], margin[i] = checked
                    correct[i] = predicted[i] == true_labels[i]
            continue
        column = {label: j for j, label in enumerate(labels)}
        index = np.asarray(rows)
        p = np.asarray([column.get(predicted[i], -1) for i in rows])
        t = np.asarray([column.get(true_labels[i], -1) for i in rows])
        v = np.asarray(values, dtype=np.float64).reshape(len(rows), len(labels))
        ordered = np.sort(v, axis=1)
        top, second = ordered[:, -1], ordered[:, -2]
        # NaN fails the range check, as in `_quick_check`; numpy's row sums differ from
        # `analyze`'s in the last bits at most, far inside the band kept from the tolerance
        accepted = (
            finite[index]
            & (p >= 0)
            & (t >= 0)
            & ((v >= 0) & (v <= 1)).all(axis=1)
            & (np.abs(v.sum(axis=1) - 1.0) <= PROBABILITY_SUM_TOLERANCE * (1 - _EXACT_BAND))
        )
        accepted &= ~(v[np.arange(len(rows)), p] < top - ARGMAX_TOLERANCE)
        ok[index] = accepted
        confidence[index], margin[index] = top, top - second
        correct[index] = p == t
    return ok, confidence, margin, correct


def _quick_check(
    probabilities: Mapping[str, float], predicted: str, true_label: str
) -> tuple[float, float] | None:
    """(confidence, margin) as `analyze` computes them if it would accept these values;
    None when it might not (then `analyze` itself decides, and words the refusal)."""
    if len(probabilities) < 2 or predicted not in probabilities or true_label not in probabilities:
        return None
    values = list(probabilities.values())
    for v in values:
        if type(v) is not float or not 0.0 <= v <= 1.0:  # NaN fails the comparison too
            return None
    total = math.fsum(values)
    # analyze sums in numpy's order; near the tolerance the two may round differently.
    if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE * (1 - _EXACT_BAND):
        return None
    top = max(values)
    second = sorted(values)[-2]
    if float(probabilities[predicted]) < top - ARGMAX_TOLERANCE:
        return None
    return top, top - second


def assign_split(prediction_id: str, holdout_fraction: float) -> str:
    """ "holdout" for a stable `holdout_fraction` of ids, else "train".

    A hash of the id (not a random draw) means a retried or replayed correction, or
    another worker process, always puts the same prediction in the same split, so a
    holdout example can never leak into training.
    """
    if not isinstance(prediction_id, str) or not prediction_id:
        raise ValueError(f"prediction_id must be a non-empty string, got {prediction_id!r}")
    return split_assigner(holdout_fraction)(prediction_id)


def split_assigner(holdout_fraction: float) -> Callable[[str], str]:
    """`assign_split` for one `holdout_fraction`, checked once: for a batch of ids (the
    caller vouches they are non-empty strings, as validated events' ids are)."""
    if not (math.isfinite(holdout_fraction) and 0 <= holdout_fraction <= 1):
        raise ValueError(f"holdout_fraction must be in [0, 1], got {holdout_fraction}")
    sha256 = hashlib.sha256

    def assign(prediction_id: str) -> str:
        digest = sha256(prediction_id.encode("utf-8")).digest()
        position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
        return _HOLDOUT if position < holdout_fraction else _TRAIN

    return assign


__all__ = [
    "AnalyzerConfig",
    "NeighbourSource",
    "Verdict",
    "analyze",
    "analyze_many",
    "assign_split",
    "neighbour_labels",
    "split_assigner",
]
