"""Reference statistics: what "normal" inputs look like, so novel ones can be recognised.

A corrected input far from the data the model was trained on is wrong for a different
reason than one in the middle of it: the model never saw anything like it, and the
labelled examples nearby (if any) say little. The reference is deliberately simple --
a per-feature mean and std and one distance cut-off -- so it is cheap to compute, easy
to explain in a verdict, and stores as a small JSON document next to the model version.

Categorical inputs (their positions in the raw vector, from the lineage's schema) are
codes, not quantities: code 3 is no nearer code 4 than code 1. Between two rows each
categorical feature whose codes differ counts one standardized unit (neighbours,
counterexample radii). From the reference, a code its rows never had counts twice the
novelty cut-off, so it makes the input novel on its own: the model never learned anything
for that category, which is what "novel" tells the reader of a verdict. Boolean inputs
(0/1) stay numbers in units of their std; their positions are kept so counterexamples
can leave them 0 or 1 (`feedback/counterexamples.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = 1
# Relative std floor: a constant feature still gets a finite scale, and float32 rounding
# of a large constant value does not register as a huge standardized deviation.
STD_FLOOR_RELATIVE = 1e-6
STD_FLOOR_ABSOLUTE = 1e-6
# A category the reference never had counts this many novelty cut-offs (see module doc).
UNSEEN = 2.0


def _floor_std(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    floor = np.maximum(STD_FLOOR_ABSOLUTE, STD_FLOOR_RELATIVE * np.abs(mean))
    return np.maximum(std, floor)


def _check_quantile_margin(quantile: float, margin: float) -> None:
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if not (np.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a positive number, got {margin}")


def _positions(values: Sequence[int], what: str) -> tuple[int, ...]:
    """Sorted, distinct, non-negative int positions; ValueError naming `what` otherwise."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{what} positions must be non-negative ints, got {v!r}")
        out.append(int(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{what} positions repeat: {out}")
    return tuple(sorted(out))


def _as_matrix(x: Any, dim: int | None, what: str) -> np.ndarray:
    """`x` as a finite float64 matrix (a 1-D input becomes one row); ValueError otherwise."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 1-D vector or 2-D matrix, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what} has {arr.shape[1]} features, the reference has {dim}")
    if not np.isfinite(arr).all():
        row, col = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{what} must be finite; row {row}, feature {col} is {arr[row, col]}")
    return arr


@dataclass(frozen=True, eq=False)
class ReferenceStats:
    """Per-feature mean/std of reference data and the distance beyond which inputs are novel.

    Distances are Euclidean in standardized space, ||(x - mean) / std||, so every
    feature counts in units of its own spread. Arrays are read-only copies.
    """

    mean: np.ndarray
    std: np.ndarray
    count: int
    distance_threshold: float
    quantile: float = 0.995
    margin: float = 1.1
    categorical: tuple[int, ...] = ()  # raw-vector positions of categorical codes
    boolean: tuple[int, ...] = ()  # raw-vector positions of 0/1 inputs
    seen_codes: tuple[tuple[int, ...], ...] = ()  # per categorical position, codes seen
    # derived: True where an input is a quantity (neither categorical nor boolean)
    continuous: np.ndarray = field(init=False, repr=False)
    _seen: list[np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        mean = np.array(self.mean, dtype=np.float64)
        std = np.array(self.std, dtype=np.float64)
        if mean.ndim != 1 or mean.size == 0 or mean.shape != std.shape:
            raise ValueError(
                f"mean and std must be equal-length 1-D vectors, got shapes "
                f"{mean.shape} and {std.shape}"
            )
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            raise ValueError("reference mean and std must be finite")
        if (std <= 0).any():
            raise ValueError("reference std must be positive (floored) for every feature")
        if int(self.count) < 2 * mean.size:
            raise ValueError(
                f"reference needs at least {2 * mean.size} examples "
                f"(2 x {mean.size} features), got count={self.count}"
            )
        threshold = float(self.distance_threshold)
        if not (np.isfinite(threshold) and threshold > 0):
            raise ValueError(f"distance_threshold must be a positive number, got {threshold}")
        _check_quantile_margin(float(self.quantile), float(self.margin))
        cats = _positions(self.categorical, "categorical")
        bools = _positions(self.boolean, "boolean")
        out_of_range = [p for p in (*cats, *bools) if p >= mean.size]
        if out_of_range:
            raise ValueError(f"positions {out_of_range} are beyond the {mean.size} features")
        if set(cats) & set(bools):
            raise ValueError(f"positions {sorted(set(cats) & set(bools))} are listed twice")
        seen = tuple(tuple(sorted({int(c) for c in codes})) for codes in self.seen_codes)
        if len(seen) != len(cats):
            raise ValueError(
                f"seen_codes needs one list per categorical position ({len(cats)}), got {len(seen)}"
            )
        object.__setattr__(self, "categorical", cats)
        object.__setattr__(self, "boolean", bools)
        object.__setattr__(self, "seen_codes", seen)
        continuous = np.ones(mean.size, dtype=bool)
        continuous[[*cats, *bools]] = False
        continuous.setflags(write=False)
        object.__setattr__(self, "continuous", continuous)
        object.__setattr__(self, "_seen", [np.asarray(c, dtype=np.float64) for c in seen])
        mean.setflags(write=False)
        std.setflags(write=False)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "count", int(self.count))
        object.__setattr__(self, "distance_threshold", threshold)
        object.__setattr__(self, "quantile", float(self.quantile))
        object.__setattr__(self, "margin", float(self.margin))

    @classmethod
    def from_examples(
        cls,
        x: np.ndarray,
        quantile: float = 0.995,
        margin: float = 1.1,
        *,
        categorical: Sequence[int] = (),
        boolean: Sequence[int] = (),
    ) -> ReferenceStats:
        """Fit on reference examples (rows); the threshold admits ~`quantile` of them, x margin.

        Needs 2 x input_dim rows: with fewer, the std and the tail quantile are noise.
        `categorical` and `boolean` are the raw-vector positions of those inputs (from the
        schema: `flywheel.store.positions`); a categorical column must hold integer codes.

        >>> import numpy as np
        >>> rows = np.array([[0.0, 1], [1.0, 1], [2.0, 2], [3.0, 2]] * 3)
        >>> ref = ReferenceStats.from_examples(rows, categorical=[1])
        >>> ref.seen_codes, round(ref.distance(np.array([1.5, 1.0])), 3)
        (((1, 2),), 0.0)
        >>> ref.is_novel(np.array([1.5, 7.0]))  # a code the reference never had
        True
        """
        _check_quantile_margin(quantile, margin)
        if np.ndim(x) != 2:
            raise ValueError(
                f"reference examples must be a 2-D matrix (rows are examples), "
                f"got shape {np.shape(x)}"
            )
        arr = _as_matrix(x, None, "reference examples")
        n, dim = arr.shape
        if dim == 0 or n < 2 * dim:
            raise ValueError(
                f"reference needs at least {2 * max(dim, 1)} examples (2 x {dim} features), got {n}"
            )
        mean = arr.mean(axis=0)
        std = _floor_std(mean, arr.std(axis=0, ddof=1))
        cats = _positions(categorical, "categorical")
        if any(p >= dim for p in cats):
            raise ValueError(f"categorical positions {list(cats)} are beyond the {dim} features")
        codes = arr[:, list(cats)]
        if (codes != np.round(codes)).any() or (codes < 0).any():
            raise ValueError("categorical columns must hold integer codes >= 0")
        seen = tuple(tuple(np.unique(codes[:, k]).astype(int).tolist()) for k in range(len(cats)))
        if cats:  # measured as `distance` will: categorical positions are all "seen" here
            z = (arr - mean) / std
            z[:, list(cats)] = 0.0
            dist = np.linalg.norm(z, axis=1)
        else:
            dist = np.linalg.norm((arr - mean) / std, axis=1)
        threshold = float(np.quantile(dist, quantile)) * margin
        # All-identical rows give distance 0 everywhere; any positive cut-off then works.
        threshold = max(threshold, np.finfo(np.float64).eps)
        return cls(
            mean=mean,
            std=std,
            count=n,
            distance_threshold=threshold,
            quantile=quantile,
            margin=margin,
            categorical=cats,
            boolean=tuple(boolean),
            seen_codes=seen,
        )

    @property
    def input_dim(self) -> int:
        return int(self.mean.size)

    def standardize(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std with the input's shape (1-D or 2-D); validates width and finiteness.

        A categorical position reads twice the novelty cut-off where its code is one the
        reference never had, else 0 (see the module docstring); `distance` is the norm of
        this vector."""
        arr = _as_matrix(x, self.input_dim, "input")
        z = self.z_scores(arr)
        return z[0] if np.ndim(x) == 1 else z

    def z_scores(self, x: np.ndarray) -> np.ndarray:
        """`standardize` for a float matrix of the right width, without its checks."""
        z = (x - self.mean) / self.std
        for k, p in enumerate(self.categorical):
            z[:, p] = np.where(
                np.isin(x[:, p], self._seen[k]), 0.0, UNSEEN * self.distance_threshold
            )
        return z

    def pair_distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Distances between rows of `a` and `b` (broadcast; features on the last axis):
        numeric and boolean differences in units of std, 1 per categorical feature whose
        codes differ. No checks: for arrays of the right width the caller validated.

        >>> import numpy as np
        >>> ref = ReferenceStats(np.zeros(2), np.array([2.0, 1.0]), 4, 1.0, categorical=(1,),
        ...                      seen_codes=((1, 2),))
        >>> ref.pair_distance(np.array([[4.0, 1.0], [0.0, 2.0]]), np.array([0.0, 1.0])).tolist()
        [2.0, 1.0]
        """
        d = (a - b) / self.std
        if self.categorical:
            cats = list(self.categorical)
            d[..., cats] = a[..., cats] != b[..., cats]
        return np.linalg.norm(d, axis=-1)

    def distance(self, x: np.ndarray) -> Any:
        """Standardized distance from the mean: a float for a vector, an array for rows."""
        z = self.standardize(x)
        if z.ndim == 1:
            return float(np.linalg.norm(z))
        return np.linalg.norm(z, axis=1)

    def is_novel(self, x: np.ndarray) -> Any:
        """True where the input is beyond the cut-off: a bool for a vector, an array for rows."""
        return self.distance(x) > self.distance_threshold

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able document (plain floats and ints) that `from_dict` reads back exactly."""
        out: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "count": self.count,
            "distance_threshold": self.distance_threshold,
            "quantile": self.quantile,
            "margin": self.margin,
        }
        if self.categorical or self.boolean:  # an all-numeric reference reads as before
            out["categorical"] = list(self.categorical)
            out["boolean"] = list(self.boolean)
            out["seen_codes"] = [list(c) for c in self.seen_codes]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReferenceStats:
        if not isinstance(data, dict):
            raise ValueError(f"reference stats must be a dict, got {type(data).__name__}")
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported reference stats version {version!r} "
                f"(this code reads version {FORMAT_VERSION})"
            )
        missing = sorted({"mean", "std", "count", "distance_threshold"} - data.keys())
        if missing:
            raise ValueError(f"reference stats lack {', '.join(missing)}")
        return cls(
            mean=np.asarray(data["mean"], dtype=np.float64),
            std=np.asarray(data["std"], dtype=np.float64),
            count=data["count"],
            distance_threshold=data["distance_threshold"],
            quantile=data.get("quantile", 0.995),
            margin=data.get("margin", 1.1),
            categorical=tuple(data.get("categorical", ())),
            boolean=tuple(data.get("boolean", ())),
            seen_codes=tuple(tuple(c) for c in data.get("seen_codes", ())),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReferenceStats):
            return NotImplemented
        return (
            np.array_equal(self.mean, other.mean)
            and np.array_equal(self.std, other.std)
            and self.count == other.count
            and self.distance_threshold == other.distance_threshold
            and self.quantile == other.quantile
            and self.margin == other.margin
            and self.categorical == other.categorical
            and self.boolean == other.boolean
            and self.seen_codes == other.seen_codes
        )

    __hash__ = None  # type: ignore[assignment]


__all__ = ["FORMAT_VERSION", "ReferenceStats"]
