"""Reference statistics: what "normal" inputs look like, so novel ones can be recognised.

A corrected input far from the data the model was trained on is wrong for a different
reason than one in the middle of it: the model never saw anything like it, and the
labelled examples nearby (if any) say little. The reference is deliberately simple --
a per-feature mean and std and one distance cut-off -- so it is cheap to compute, easy
to explain in a verdict, and stores as a small JSON document next to the model version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT_VERSION = 1
# Relative std floor: a constant feature still gets a finite scale, and float32 rounding
# of a large constant value does not register as a huge standardized deviation.
STD_FLOOR_RELATIVE = 1e-6
STD_FLOOR_ABSOLUTE = 1e-6


def _floor_std(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    floor = np.maximum(STD_FLOOR_ABSOLUTE, STD_FLOOR_RELATIVE * np.abs(mean))
    return np.maximum(std, floor)


def _check_quantile_margin(quantile: float, margin: float) -> None:
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if not (np.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a positive number, got {margin}")


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
        cls, x: np.ndarray, quantile: float = 0.995, margin: float = 1.1
    ) -> ReferenceStats:
        """Fit on reference examples (rows); the threshold admits ~`quantile` of them, x margin.

        Needs 2 x input_dim rows: with fewer, the std and the tail quantile are noise.
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
        )

    @property
    def input_dim(self) -> int:
        return int(self.mean.size)

    def standardize(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std with the input's shape (1-D or 2-D); validates width and finiteness."""
        arr = _as_matrix(x, self.input_dim, "input")
        z = (arr - self.mean) / self.std
        return z[0] if np.ndim(x) == 1 else z

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
        return {
            "version": FORMAT_VERSION,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "count": self.count,
            "distance_threshold": self.distance_threshold,
            "quantile": self.quantile,
            "margin": self.margin,
        }

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
        )

    __hash__ = None  # type: ignore[assignment]


__all__ = ["FORMAT_VERSION", "ReferenceStats"]
