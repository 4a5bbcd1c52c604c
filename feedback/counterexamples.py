"""Counterexamples: a few labelled variants around a corrected input, so one correction counts.

A single corrected example barely moves a model trained on thousands. Variants close to
the input -- where the true label almost surely still holds -- give the learner a small
neighbourhood to fix instead of a point. Three strategies, mixed round-robin:

* gradient_sign: one step that makes the served model *more* wrong on the true label
  (FGSM); the hardest nearby example, so the most informative one to train on.
* interpolate: part of the way toward a known example of the true class, filling the
  gap the model got wrong.
* jitter: Gaussian noise scaled per feature; always available.

Every variant stays within `max_distance` (standardized units) of the input, carries
the true label, and a weight below 1 because it is synthetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flywheel.feedback.reference import ReferenceStats
from flywheel.feedback.store.models import ERROR_TYPES, ErrorType

DEFAULT_K: Mapping[str, int] = MappingProxyType({
    ErrorType.CONFIDENT.value: 6,
    ErrorType.BOUNDARY.value: 4,
    ErrorType.NOVEL.value: 6,
    ErrorType.SUSPECT.value: 0,  # quarantined: amplifying a doubtful label is the worst case
})
STRATEGIES: tuple[str, ...] = ("gradient_sign", "interpolate", "jitter")
# Further gradient_sign variants jitter the one FGSM point by this share of jitter_scale,
# so they stay in its hard region instead of drifting back toward the input.
GRADIENT_JITTER_SHARE = 0.5
# Float32 rounding can push a variant just past max_distance; shrink the step and retry.
_SHRINK = 0.9
_SHRINK_TRIES = 20


@dataclass(frozen=True)
class CounterexampleConfig:
    """How many variants per error type and how far they may go."""

    k: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_K))
    jitter_scale: float = 0.15
    interpolation: tuple[float, float] = (0.1, 0.35)
    fgsm_step: float = 0.25
    max_distance: float = 1.0
    weight: float = 0.5

    def __post_init__(self) -> None:
        k = dict(self.k)
        unknown = sorted(set(k) - set(ERROR_TYPES))
        missing = sorted(set(ERROR_TYPES) - set(k))
        if unknown or missing:
            raise ValueError(f"k must give a count for exactly {list(ERROR_TYPES)}; "
                             f"unknown: {unknown}, missing: {missing}")
        for name, count in k.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"k[{name!r}] must be a non-negative int, got {count!r}")
        object.__setattr__(self, "k", k)
        lo, hi = (float(v) for v in self.interpolation)
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"interpolation must be (low, high) with 0 <= low <= high <= 1, "
                             f"got {self.interpolation}")
        object.__setattr__(self, "interpolation", (lo, hi))
        for name in ("jitter_scale", "fgsm_step", "max_distance", "weight"):
            value = float(getattr(self, name))
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")


@dataclass(frozen=True)
class Counterexample:
    """One synthetic example; `distance` is from the corrected input, in standardized units."""

    features: list[float]
    label: str
    weight: float
    strategy: str
    distance: float


def _model_placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def gradient_sign_point(
    x: np.ndarray, target: int, n_labels: int, model: nn.Module, reference: ReferenceStats,
    step: float,
) -> np.ndarray | None:
    """x + step * std * sign(d loss / d x) for the true label, or None if the gradient is flat.

    The gradient is taken w.r.t. the input only: the model's parameters, their `.grad`
    and its train/eval mode are left exactly as they were.
    """
    was_training = model.training
    device, dtype = _model_placement(model)
    model.eval()
    try:
        # inference_mode(False): the worker may call this from inside inference_mode.
        with torch.inference_mode(False), torch.enable_grad():
            xt = torch.tensor(x, dtype=dtype, device=device).unsqueeze(0).requires_grad_(True)
            logits = model(xt)
            if logits.shape != (1, n_labels):
                raise ValueError(f"model returned logits of shape {tuple(logits.shape)}, "
                                 f"expected (1, {n_labels}) for {n_labels} labels")
            loss = F.cross_entropy(logits, torch.tensor([target], device=device))
            (grad,) = torch.autograd.grad(loss, xt)
    finally:
        model.train(was_training)
    g = grad[0].detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(g).all() or not g.any():
        return None
    return x + step * reference.std * np.sign(g)


def _within_radius(
    x: np.ndarray, v: np.ndarray, std: np.ndarray, radius: float
) -> tuple[np.ndarray, float] | None:
    """`v` moved back onto the ball of `radius` around x, as float32; None if impossible."""
    delta = v - x
    norm = float(np.linalg.norm(delta / std))
    if norm > radius:
        delta = delta * (radius / norm)
    for _ in range(_SHRINK_TRIES):
        with np.errstate(over="ignore"):
            v32 = (x + delta).astype(np.float32)
        if np.isfinite(v32).all():
            dist = float(np.linalg.norm((v32.astype(np.float64) - x) / std))
            if dist <= radius:
                return v32, dist
        delta = delta * _SHRINK
    return None


def _true_class_pool(examples: np.ndarray | None, reference: ReferenceStats) -> np.ndarray:
    if examples is None:
        return np.empty((0, reference.input_dim))
    pool = np.asarray(examples, dtype=np.float64)
    if pool.size == 0:
        return np.empty((0, reference.input_dim))
    if pool.ndim != 2:
        raise ValueError(f"true_class_examples must be a 2-D matrix, got shape {pool.shape}")
    reference.standardize(pool)  # validates width and finiteness
    return pool


def generate(
    x: Sequence[float] | np.ndarray,
    true_label: str,
    error_type: str,
    *,
    labels: Sequence[str],
    reference: ReferenceStats,
    true_class_examples: np.ndarray | None,
    model: nn.Module | None,
    rng: np.random.Generator,
    config: CounterexampleConfig | None = None,
) -> list[Counterexample]:
    """`config.k[error_type]` variants of `x`, all labelled `true_label`.

    Strategies take turns (gradient_sign, interpolate, jitter), skipping those without
    their input: no model, no true-class examples, or a flat gradient. All randomness
    comes from `rng`, so the same seed gives the same variants.
    """
    config = config or CounterexampleConfig()
    if error_type not in ERROR_TYPES:
        raise ValueError(f"unknown error type {error_type!r}; known: {list(ERROR_TYPES)}")
    labels = list(labels)
    if true_label not in labels:
        raise ValueError(f"true label {true_label!r} is not a known label; known: {labels}")
    point = np.asarray(x, dtype=np.float64)
    if point.ndim != 1:
        raise ValueError(f"x must be a 1-D vector, got shape {point.shape}")
    reference.standardize(point)  # validates width and finiteness
    pool = _true_class_pool(true_class_examples, reference)
    k = config.k[error_type]
    if k == 0:
        return []

    fgsm = None
    if model is not None:
        fgsm = gradient_sign_point(point, labels.index(true_label), len(labels), model,
                                   reference, config.fgsm_step)
    available = [s for s, ok in zip(STRATEGIES, (fgsm is not None, len(pool) > 0, True),
                                    strict=True) if ok]
    std, dim = reference.std, reference.input_dim
    lo, hi = config.interpolation
    out: list[Counterexample] = []
    gradient_variants = 0
    for i in range(k):
        strategy = available[i % len(available)]
        if strategy == "gradient_sign":
            assert fgsm is not None
            v = fgsm if gradient_variants == 0 else (
                fgsm + rng.normal(0.0, config.jitter_scale * GRADIENT_JITTER_SHARE, dim) * std)
            gradient_variants += 1
        elif strategy == "interpolate":
            other = pool[rng.integers(len(pool))]
            v = point + rng.uniform(lo, hi) * (other - point)
        else:
            v = point + rng.normal(0.0, config.jitter_scale, dim) * std
        fitted = _within_radius(point, v, std, config.max_distance)
        if fitted is None:  # only for inputs at the edge of float32's range
            continue
        features, distance = fitted
        out.append(Counterexample(features=[float(f) for f in features], label=true_label,
                                  weight=config.weight, strategy=strategy, distance=distance))
    return out


__all__ = [
    "DEFAULT_K", "STRATEGIES", "Counterexample", "CounterexampleConfig", "generate",
    "gradient_sign_point",
]
