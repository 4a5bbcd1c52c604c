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

Categorical codes and booleans are not quantities to move along: a code of 3.5 is no
category, and 0.3 is not a boolean. Jitter and the gradient step leave them as the input
has them; an interpolated variant takes each of them from the endpoint its weight is
nearer to (the input for the default weights, 0.1-0.35 of the way), so every variant is
a row the schema could have produced. Distances count a differing category as 1
(`ReferenceStats.pair_distance`); when the categories and booleans an interpolation
took already spend the radius, the variant keeps the input's instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from flywheel.feedback.reference import ReferenceStats
from flywheel.store import ERROR_TYPES, ErrorType

DEFAULT_K: Mapping[str, int] = MappingProxyType(
    {
        ErrorType.CONFIDENT.value: 6,
        ErrorType.BOUNDARY.value: 4,
        ErrorType.NOVEL.value: 6,
        ErrorType.SUSPECT.value: 0,  # quarantined: amplifying a doubtful label is the worst case
    }
)
STRATEGIES: tuple[str, ...] = ("gradient_sign", "interpolate", "jitter")
# Further gradient_sign variants jitter the one FGSM point by this share of jitter_scale,
# so they stay in its hard region instead of drifting back toward the input.
GRADIENT_JITTER_SHARE = 0.5
# A request's strategies, as indices into STRATEGIES, by (has an FGSM point) * 2 + (has
# true-class examples); padded with jitter, which is always available.
_GRADIENT, _INTERPOLATE, _JITTER = range(3)
_AVAILABLE = np.array(
    [
        [_JITTER] * 3,
        [_INTERPOLATE, _JITTER, _JITTER],
        [_GRADIENT, _JITTER, _JITTER],
        [_GRADIENT, _INTERPOLATE, _JITTER],
    ]
)
# Float32 rounding can push a variant just past max_distance; shrink the step and retry,
# by a millionth first (rounding is that small), more each time (for inputs so large that
# float32's spacing is not).
_SHRINK = tuple(1.0 - min(0.5, 1e-6 * 4.0**i) for i in range(20))
_SHRINK_TRIES = len(_SHRINK)


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
            raise ValueError(
                f"k must give a count for exactly {list(ERROR_TYPES)}; "
                f"unknown: {unknown}, missing: {missing}"
            )
        for name, count in k.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"k[{name!r}] must be a non-negative int, got {count!r}")
        object.__setattr__(self, "k", k)
        lo, hi = (float(v) for v in self.interpolation)
        if not 0 <= lo <= hi <= 1:
            raise ValueError(
                f"interpolation must be (low, high) with 0 <= low <= high <= 1, "
                f"got {self.interpolation}"
            )
        object.__setattr__(self, "interpolation", (lo, hi))
        for name in ("jitter_scale", "fgsm_step", "max_distance", "weight"):
            value = float(getattr(self, name))
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")


class Counterexample(NamedTuple):
    """One synthetic example; `distance` is from the corrected input, in standardized units.

    (A named tuple: a batch makes thousands, and a frozen dataclass costs 4x to create.)"""

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
    x: np.ndarray,
    target: int,
    n_labels: int,
    model: nn.Module,
    reference: ReferenceStats,
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
                raise ValueError(
                    f"model returned logits of shape {tuple(logits.shape)}, "
                    f"expected (1, {n_labels}) for {n_labels} labels"
                )
            loss = F.cross_entropy(logits, torch.tensor([target], device=device))
            (grad,) = torch.autograd.grad(loss, xt)
    finally:
        model.train(was_training)
    g = grad[0].detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(g).all() or not g.any():
        return None
    return x + step * _scale(reference) * np.sign(g)


def _scale(reference: ReferenceStats) -> np.ndarray:
    """Per-feature step scale: the std, 0 for categorical and boolean inputs (never moved)."""
    if reference.continuous.all():
        return reference.std
    return np.where(reference.continuous, reference.std, 0.0)


def _within_radius(
    x: np.ndarray, v: np.ndarray, std: np.ndarray, radius: float
) -> tuple[np.ndarray, float] | None:
    """`v` moved back onto the ball of `radius` around x, as float32; None if impossible."""
    delta = v - x
    norm = float(np.linalg.norm(delta / std))
    if norm > radius:
        delta = delta * (radius / norm)
    for shrink in _SHRINK:
        with np.errstate(over="ignore"):
            v32 = (x + delta).astype(np.float32)
        if np.isfinite(v32).all():
            dist = float(np.linalg.norm((v32.astype(np.float64) - x) / std))
            if dist <= radius:
                return v32, dist
        delta = delta * shrink
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


@dataclass(frozen=True)
class Request:
    """One corrected input to make variants of (the arguments of `generate`)."""

    x: Sequence[float] | np.ndarray
    true_label: str
    error_type: str
    labels: Sequence[str]
    true_class_examples: np.ndarray | None
    model: nn.Module | None
    seed: int  # all of the request's randomness comes from it (see `_uniforms`)


def generate(
    x: Sequence[float] | np.ndarray,
    true_label: str,
    error_type: str,
    *,
    labels: Sequence[str],
    reference: ReferenceStats,
    true_class_examples: np.ndarray | None,
    model: nn.Module | None,
    seed: int,
    config: CounterexampleConfig | None = None,
) -> list[Counterexample]:
    """`config.k[error_type]` variants of `x`, all labelled `true_label`.

    Strategies take turns (gradient_sign, interpolate, jitter), skipping those without
    their input: no model, no true-class examples, or a flat gradient. All randomness
    comes from `seed`, so the same seed gives the same variants.
    """
    request = Request(x, true_label, error_type, labels, true_class_examples, model, seed)
    return generate_many([request], reference=reference, config=config)[0]


def generate_many(
    requests: Sequence[Request],
    *,
    reference: ReferenceStats,
    config: CounterexampleConfig | None = None,
) -> list[list[Counterexample]]:
    """`generate` for each request, with the costly steps done once for the whole batch.

    The gradient step is one forward and backward pass per model for all requests (rows
    of a classifier in eval mode do not interact, so each row's gradient sign is its
    own), and the radius fit is vectorized. Each request still draws from its own `rng`
    in the same order, so its variants do not depend on the rest of the batch. Refuses
    what `generate` refuses, with the same message, for the first bad request.
    """
    config = config or CounterexampleConfig()
    prepared: list[tuple[np.ndarray, np.ndarray, list[str], int]] = []
    refusal: ValueError | None = None
    pools: dict[int, np.ndarray] = {}  # requests often share one true-class pool object
    for r in requests:
        try:
            prepared.append(_prepare(r, reference, config, pools))
        except ValueError as exc:  # raised after the gradients of the requests before it
            refusal = exc
            break
    fgsm = _gradient_points(requests[: len(prepared)], prepared, reference, config)
    if refusal is not None:
        raise refusal
    std, dim = _scale(reference), reference.input_dim
    lo, hi = config.interpolation
    # One row per variant: its request, its index among the request's variants, and its
    # strategy (the request's available ones in turn), as arrays for the whole batch.
    ks = np.asarray([p[3] for p in prepared], dtype=np.int64)
    owners = np.repeat(np.arange(len(prepared)), ks)
    out: list[list[Counterexample]] = [[] for _ in prepared]
    if not len(owners):
        return out
    index = np.arange(len(owners)) - np.repeat(np.cumsum(ks) - ks, ks)
    has = np.asarray(
        [(hard is not None, len(p[1]) > 0) for p, hard in zip(prepared, fgsm, strict=True)],
        dtype=bool,
    )
    available = _AVAILABLE[has[:, 0] * 2 + has[:, 1]][owners]
    codes = available[np.arange(len(owners)), index % (1 + has.sum(axis=1))[owners]]
    seeds = np.asarray([r.seed for r in requests[: len(prepared)]], dtype=np.uint64)
    # each variant its own block of the request's stream: 2 uniforms a normal, plus 2
    u = _uniforms(seeds[owners], index.astype(np.uint64), 2 * dim + 2)
    normal = np.sqrt(-2.0 * np.log1p(-u[:, :dim])) * np.cos(2.0 * np.pi * u[:, dim : 2 * dim])
    points = np.stack([p[0] for p in prepared])[owners]
    candidates = points + normal * config.jitter_scale * std  # jitter, unless replaced
    gradient = np.flatnonzero(codes == _GRADIENT)
    if len(gradient):
        hard = np.stack([fgsm[n] for n in owners[gradient]])
        shake = normal[gradient] * (config.jitter_scale * GRADIENT_JITTER_SHARE) * std
        first = (index[gradient] == 0)[:, None]  # the FGSM point itself
        candidates[gradient] = np.where(first, hard, hard + shake)
    for rows in _by_pool(np.flatnonzero(codes == _INTERPOLATE), owners, prepared):
        pool = prepared[owners[rows[0]]][1]
        picks = np.minimum((u[rows, 2 * dim] * len(pool)).astype(np.int64), len(pool) - 1)
        t = (lo + u[rows, 2 * dim + 1] * (hi - lo))[:, None]
        candidates[rows] = points[rows] + t * (pool[picks] - points[rows])
        discrete = ~reference.continuous
        if discrete.any():  # a category or boolean from the endpoint t is nearer to
            snapped = np.where(t > 0.5, pool[picks], points[rows])
            candidates[np.ix_(rows, discrete)] = snapped[:, discrete]
    if reference.continuous.all():
        fitted = _within_radius_many(points, candidates, reference.std, config.max_distance)
    else:
        fitted = _within_radius_mixed(points, candidates, reference, config.max_distance)
    strategy_of = [STRATEGIES[c] for c in codes.tolist()]
    for n, strategy, fit in zip(owners.tolist(), strategy_of, fitted, strict=True):
        if fit is None:  # only for inputs at the edge of float32's range
            continue
        features, distance = fit
        out[n].append(
            Counterexample(
                features=features,
                label=requests[n].true_label,
                weight=config.weight,
                strategy=strategy,
                distance=distance,
            )
        )
    return out


def _by_pool(
    rows: np.ndarray,
    owners: np.ndarray,
    prepared: Sequence[tuple[np.ndarray, np.ndarray, list[str], int]],
) -> list[np.ndarray]:
    """`rows` grouped by the true-class pool (array object) their request draws from."""
    groups: dict[int, list[int]] = {}
    for row in rows.tolist():
        groups.setdefault(id(prepared[owners[row]][1]), []).append(row)
    return [np.asarray(g) for g in groups.values()]


_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _uniforms(
    seeds: npt.NDArray[np.uint64], blocks: npt.NDArray[np.uint64], width: int
) -> np.ndarray:
    """Uniforms in [0, 1): row r is block `blocks[r]` (`width` numbers) of the stream of
    `seeds[r]` -- SplitMix64 (Steele et al., 2014), a counter-based generator, computed
    for every row at once. Why not a numpy Generator per request: constructing one costs
    ~12 us, more than all the arithmetic of a request's variants; this gives each
    correction its own reproducible stream, independent of the batch it arrives in, for
    well under a microsecond."""
    # uint64 throughout; numpy's stubs type `uint64 array * uint64` as float64, hence the cast
    counters = cast(
        npt.NDArray[np.uint64],
        blocks[:, None] * np.uint64(width) + np.arange(1, width + 1, dtype=np.uint64),
    )
    with np.errstate(over="ignore"):
        z = seeds[:, None] + counters * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _prepare(
    r: Request,
    reference: ReferenceStats,
    config: CounterexampleConfig,
    pools: dict[int, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """(point, true-class pool, labels, k) after the checks `generate` makes, in its order.

    `pools` remembers the pools already checked in this batch, by object: the caller
    keeps them alive, so an id cannot be reused meanwhile.
    """
    if r.error_type not in ERROR_TYPES:
        raise ValueError(f"unknown error type {r.error_type!r}; known: {list(ERROR_TYPES)}")
    labels = list(r.labels)
    if r.true_label not in labels:
        raise ValueError(f"true label {r.true_label!r} is not a known label; known: {labels}")
    point = np.asarray(r.x, dtype=np.float64)
    if point.ndim != 1:
        raise ValueError(f"x must be a 1-D vector, got shape {point.shape}")
    if point.shape != reference.mean.shape or not np.isfinite(point).all():
        reference.standardize(point)  # refuses the width or a non-finite value, in its words
    key = id(r.true_class_examples)
    pool = pools.get(key)
    if pool is None or r.true_class_examples is None:
        pool = pools[key] = _true_class_pool(r.true_class_examples, reference)
    return point, pool, labels, config.k[r.error_type]


def _gradient_points(
    requests: Sequence[Request],
    prepared: Sequence[tuple[np.ndarray, np.ndarray, list[str], int]],
    reference: ReferenceStats,
    config: CounterexampleConfig,
) -> list[np.ndarray | None]:
    """The FGSM point of every request that has a model and wants variants, else None;
    one `gradient_sign_point` computation per model for all its requests at once."""
    out: list[np.ndarray | None] = [None] * len(prepared)
    groups: dict[tuple[int, int], list[int]] = {}
    for n, (r, (_, _, labels, k)) in enumerate(zip(requests, prepared, strict=True)):
        if r.model is not None and k > 0:
            groups.setdefault((id(r.model), len(labels)), []).append(n)
    for members in groups.values():
        model = requests[members[0]].model
        assert model is not None
        n_labels = len(prepared[members[0]][2])
        x = np.stack([prepared[n][0] for n in members])
        targets = [prepared[n][2].index(requests[n].true_label) for n in members]
        grads = _input_gradients(x, targets, n_labels, model)
        if grads is None:  # unexpected logits: one at a time, as `generate` (and its refusal)
            for row, n in enumerate(members):
                out[n] = gradient_sign_point(
                    x[row], targets[row], n_labels, model, reference, config.fgsm_step
                )
            continue
        usable = np.isfinite(grads).all(axis=1) & grads.any(axis=1)
        steps = x + config.fgsm_step * _scale(reference) * np.sign(grads)
        for row, n in enumerate(members):
            out[n] = steps[row] if usable[row] else None
    return out


def _input_gradients(
    x: np.ndarray, targets: list[int], n_labels: int, model: nn.Module
) -> np.ndarray | None:
    """d loss_i / d x_i for every row (the summed loss; rows are independent), or None
    when the logits do not have one column per label. The model is left as it was."""
    was_training = model.training
    device, dtype = _model_placement(model)
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            xt = torch.tensor(x, dtype=dtype, device=device).requires_grad_(True)
            logits = model(xt)
            if logits.shape != (len(x), n_labels):
                return None
            loss = F.cross_entropy(logits, torch.tensor(targets, device=device), reduction="sum")
            (grad,) = torch.autograd.grad(loss, xt)
    finally:
        model.train(was_training)
    return grad.detach().to("cpu", torch.float64).numpy()


def _within_radius_many(
    x: np.ndarray, v: np.ndarray, std: np.ndarray, radius: float
) -> list[tuple[list[float], float] | None]:
    """`_within_radius` for every row at once: the same steps (pull back onto the ball,
    round to float32, shrink and retry while rounding lands outside), vectorized."""
    delta = v - x
    norm = np.linalg.norm(delta / std, axis=1)
    over = norm > radius
    delta[over] *= (radius / norm[over])[:, None]
    return _round_within(
        x, delta, radius, lambda a, b: np.linalg.norm((a - b) / std, axis=1), slice(None)
    )


def _within_radius_mixed(
    x: np.ndarray, v: np.ndarray, reference: ReferenceStats, radius: float
) -> list[tuple[list[float], float] | None]:
    """`_within_radius_many` for inputs with categorical or boolean features: those keep
    the value the variant has (the input's, or the snapped endpoint's; the input's where
    that alone is farther than `radius`), and only the continuous part is pulled back
    and shrunk. Distances are `ReferenceStats.pair_distance`."""
    std, cont = reference.std, reference.continuous
    cats, bools = list(reference.categorical), list(reference.boolean)
    delta = v - x
    fixed = (delta[:, cats] != 0).sum(axis=1) + ((delta[:, bools] / std[bools]) ** 2).sum(axis=1)
    too_far = fixed > radius**2
    delta[np.ix_(too_far, ~cont)] = 0.0
    fixed[too_far] = 0.0
    room = np.sqrt(np.maximum(radius**2 - fixed, 0.0))
    norm = np.linalg.norm(delta[:, cont] / std[cont], axis=1)
    over = norm > room
    scale = np.ones(len(v))
    scale[over] = np.where(norm[over] > 0, room[over] / np.maximum(norm[over], 1e-300), 0.0)
    delta[:, cont] *= scale[:, None]
    return _round_within(x, delta, radius, reference.pair_distance, cont)


def _round_within(
    x: np.ndarray,
    delta: np.ndarray,
    radius: float,
    distance: Callable[[np.ndarray, np.ndarray], np.ndarray],
    shrinkable: slice | np.ndarray,
) -> list[tuple[list[float], float] | None]:
    """`x + delta` rounded to float32 per row, with the `shrinkable` columns of `delta`
    shrunk and retried while the rounded point lands outside `radius` (or is not finite);
    (features, distance) per row, None where no shrink fits. `delta` is changed in place."""
    found32 = np.zeros((len(delta), delta.shape[1]), dtype=np.float32)
    found = np.zeros(len(delta), dtype=bool)
    dist = np.zeros(len(delta))
    todo = np.arange(len(delta))
    for shrink in _SHRINK:
        with np.errstate(over="ignore", invalid="ignore"):
            v32 = (x[todo] + delta[todo]).astype(np.float32)
            d = distance(v32.astype(np.float64), x[todo])
        ok = np.isfinite(v32).all(axis=1) & (d <= radius)
        done = todo[ok]
        found32[done], dist[done], found[done] = v32[ok], d[ok], True
        todo = todo[~ok]
        if not len(todo):
            break
        delta[np.ix_(todo, np.arange(delta.shape[1])[shrinkable])] *= shrink
    features = found32.astype(np.float64).tolist()
    return [(features[i], float(dist[i])) if found[i] else None for i in range(len(delta))]


__all__ = [
    "DEFAULT_K",
    "STRATEGIES",
    "Counterexample",
    "CounterexampleConfig",
    "Request",
    "generate",
    "generate_many",
    "gradient_sign_point",
]
