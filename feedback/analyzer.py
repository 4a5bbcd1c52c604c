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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from flywheel.feedback.reference import ReferenceStats
from flywheel.feedback.store.models import ErrorType, Split

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
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) \
                or self.neighbours < 1:
            raise ValueError(f"neighbours must be a positive int, got {self.neighbours!r}")
        if not (math.isfinite(self.suspect_max_distance) and self.suspect_max_distance > 0):
            raise ValueError(f"suspect_max_distance must be a positive number, "
                             f"got {self.suspect_max_distance}")


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
        raise ValueError(f"probabilities must be finite numbers in [0, 1], "
                         f"got {dict(probabilities)}")
    total = float(values.sum())
    if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise ValueError(f"probabilities must sum to 1 (+/- {PROBABILITY_SUM_TOLERANCE}), "
                         f"they sum to {total:.6f}")
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
        raise ValueError(f"neighbours must be (matrix of rows, one label per row); got shape "
                         f"{pts.shape} and {len(labels)} labels")
    for label in set(labels):
        _check_label(label, probabilities, "neighbour label")
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
        raise ValueError(f"predicted label {predicted!r} (p={probabilities[predicted]:.4f}) is "
                         f"not the most probable one (p={confidence:.4f})")
    distance = reference.distance(x)  # validates width and finiteness
    near = neighbour_labels(x, neighbours, probabilities, reference, config)
    agreement = sum(label == predicted for label in near) / len(near) if near else None
    numbers = (f"confidence {confidence:.3f}, margin {margin:.3f}, reference distance "
               f"{distance:.2f} vs novelty cut-off {reference.distance_threshold:.2f}")
    if agreement is not None:
        numbers += f", {agreement:.0%} of {len(near)} close neighbours labelled {predicted!r}"

    if predicted == true_label:
        return Verdict(correct=True, error_type=None, trainable=True, confidence=confidence,
                       margin=margin, distance=distance, neighbour_agreement=agreement,
                       reason=f"correct: predicted {predicted!r} with {numbers}.")

    def wrong(error_type: ErrorType, trainable: bool, why: str) -> Verdict:
        return Verdict(correct=False, error_type=error_type.value, trainable=trainable,
                       confidence=confidence, margin=margin, distance=distance,
                       neighbour_agreement=agreement,
                       reason=f"{error_type.value}: predicted {predicted!r} but the true label "
                       f"is {true_label!r}; {why} ({numbers}).")

    if reference.is_novel(x):
        return wrong(ErrorType.NOVEL, True, "the input is far from the reference data, so "
                     "the model had nothing like it to learn from")
    if (confidence >= config.confident_threshold and len(near) >= config.neighbours
            and agreement is not None and agreement >= config.suspect_agreement):
        return wrong(ErrorType.SUSPECT, False,
                     f"the correction contradicts a confident model and {agreement:.0%} of "
                     f"its {len(near)} nearest labelled neighbours, so it is quarantined "
                     f"until corroborated")
    if margin < config.boundary_margin:
        return wrong(ErrorType.BOUNDARY, True, f"the top two labels are within "
                     f"{config.boundary_margin} of each other, near the decision boundary")
    return wrong(ErrorType.CONFIDENT, True, "the model was wrong well away from the "
                 "decision boundary")


def assign_split(prediction_id: str, holdout_fraction: float) -> str:
    """"holdout" for a stable `holdout_fraction` of ids, else "train".

    A hash of the id (not a random draw) means a retried or replayed correction, or
    another worker process, always puts the same prediction in the same split, so a
    holdout example can never leak into training.
    """
    if not isinstance(prediction_id, str) or not prediction_id:
        raise ValueError(f"prediction_id must be a non-empty string, got {prediction_id!r}")
    if not (math.isfinite(holdout_fraction) and 0 <= holdout_fraction <= 1):
        raise ValueError(f"holdout_fraction must be in [0, 1], got {holdout_fraction}")
    digest = hashlib.sha256(prediction_id.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return Split.HOLDOUT.value if position < holdout_fraction else Split.TRAIN.value


__all__ = ["AnalyzerConfig", "Verdict", "analyze", "assign_split", "neighbour_labels"]
