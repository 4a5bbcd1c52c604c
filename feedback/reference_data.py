"""The labelled data the analyzer compares against: the lineage's trusted set (written by
`flywheel init`), its reference statistics, and an in-memory pool of trusted labelled
examples for neighbours and interpolation targets."""

from __future__ import annotations

import logging

import numpy as np
from scipy.spatial import cKDTree
from sqlalchemy import select
from sqlalchemy.orm import Session

from flywheel.feedback.reference import ReferenceStats
from flywheel.settings import RegistrySettings
from flywheel.store import (
    Example,
    NoTrustedData,
    Origin,
    ReferenceStatsRow,
    Split,
    positions,
    require_trusted,
    trusted_info,
)

log = logging.getLogger(__name__)

# Extra candidates per row in `near_many`, beyond k, re-measured exactly: enough to see a
# tie at the k-th place (the tree's own choice is exact, up to its rounding).
_SPARE = 2


REFERENCE_ROWS = 20_000  # trusted training rows a reference is computed from, at most


def ensure_reference(session: Session, registry: RegistrySettings) -> ReferenceStats:
    """The lineage's reference statistics, for the trusted set `flywheel init` stored.

    `init` writes the trusted rows and the reference row in one transaction; this reads
    them. A reference row that is missing or does not fit the trusted set's schema (its
    width or its categorical and boolean positions: a row written before they were
    kept) is recomputed here from the trusted training rows, in memory, the same way:
    deterministic, so every worker gets the same one. Raises `NoTrustedData` when the
    lineage has no trusted set.
    """
    name = registry.model_name
    info = trusted_info(session, name)
    if info is None:
        raise NoTrustedData(name)
    cats, bools = positions(info.schema, "categorical"), positions(info.schema, "boolean")
    row = session.get(ReferenceStatsRow, name)
    if row is not None:
        reference = ReferenceStats.from_dict(row.stats)
        if (reference.input_dim, list(reference.categorical), list(reference.boolean)) == (
            info.schema.input_dim,
            cats,
            bools,
        ):
            return reference
        log.warning(
            "the reference statistics of %s do not fit its trusted set's schema; "
            "recomputed from the trusted rows",
            name,
        )
    data = require_trusted(session, name, max_train=REFERENCE_ROWS)
    return ReferenceStats.from_examples(
        data.x_train.astype(np.float64), categorical=cats, boolean=bools
    )


class LabelledPool:
    """Trusted labelled examples in memory, for neighbours and interpolation targets.

    Only seed examples, loaded once: analysis must not depend on which corrections a worker
    happened to see first, or a crashed-and-replayed batch would be judged differently
    from an uninterrupted run. (Releasing quarantined corrections that other corrections
    corroborate is a store-level step, not a change to this pool.)
    """

    def __init__(self, reference: ReferenceStats, capacity: int = 20_000) -> None:
        self.reference = reference
        self.capacity = capacity
        self._x = np.empty((0, reference.input_dim), dtype=np.float64)
        self._labels: list[str] = []
        self._derived: dict[str, object] = {}  # per-label rows, scaled copies; reset by add

    @classmethod
    def load(
        cls, session: Session, reference: ReferenceStats, model_name: str, capacity: int = 20_000
    ) -> LabelledPool:
        """The newest `capacity` trusted training rows of `model_name`'s trusted set."""
        pool = cls(reference, capacity)
        rows = session.execute(
            select(Example.features, Example.label)
            .where(
                Example.split == Split.TRAIN.value,
                Example.origin == Origin.SEED.value,
                Example.dedup_key.startswith(
                    f"seed:{model_name}:{Split.TRAIN.value}:", autoescape=True
                ),
            )
            .order_by(Example.id.desc())
            .limit(capacity)
        ).all()
        pool.add([r[0] for r in reversed(rows)], [r[1] for r in reversed(rows)])
        return pool

    def __len__(self) -> int:
        return len(self._labels)

    def add(self, features: list[list[float]], labels: list[str]) -> None:
        if not labels:
            return
        self._x = np.vstack([self._x, np.asarray(features, dtype=np.float64)])[-self.capacity :]
        self._labels = (self._labels + list(labels))[-self.capacity :]
        self._derived = {}

    @property
    def points(self) -> np.ndarray:
        return self._x

    def labels(self) -> frozenset[str]:
        """Every label in the pool."""
        if "labels" not in self._derived:
            self._derived["labels"] = frozenset(self._labels)
        return self._derived["labels"]  # type: ignore[return-value]

    def near(self, x: np.ndarray, k: int) -> tuple[np.ndarray, list[str]]:
        """The `k` nearest examples in standardized space (the analyzer applies its radius;
        a categorical feature counts 1 where the codes differ, `ReferenceStats.pair_distance`)."""
        if not self._labels:
            return self._x, []
        if self.reference.categorical:
            d = self.reference.pair_distance(self._x, np.asarray(x, dtype=np.float64))
        else:
            d = np.linalg.norm((self._x - x) / self.reference.std, axis=1)
        idx = np.argsort(d)[:k]
        return self._x[idx], [self._labels[i] for i in idx]

    def near_many(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`near` for each row of `x` at once: (points (rows, k, dim), labels (rows, k)).

        Candidates come from a k-d tree over the standardized pool (scipy's cKDTree: exact
        nearest points, but its arithmetic rounds differently), then the k nearest are
        chosen among them by the distances `near` computes; a row whose choice that
        rounding (or a tie) could change is answered by `near` itself. So every row gets
        the same neighbours as from `near`. Why a tree: the (rows x pool) distance matrix
        and its partial sort it replaces took ~3x as long (`bench feedback`: 0.20 s of the
        consumer thread's 1.9 s for 50,000 corrections). With categorical features (whose
        mismatch distance is no Euclidean one over the codes) each row is `near` itself.
        """
        x = np.asarray(x, dtype=np.float64)
        size = len(self._labels)
        labels = self._label_array()
        if size <= k:  # all of them, for every row
            idx = np.broadcast_to(np.arange(size), (len(x), size))
        elif self.reference.categorical:
            idx = np.empty((len(x), k), dtype=np.intp)
            for i, row in enumerate(x):
                idx[i] = np.argsort(self.reference.pair_distance(self._x, row))[:k]
        else:
            idx = self._nearest(x, k) if len(x) else np.empty((0, k), dtype=np.intp)
        return self._x[idx], labels[idx]

    def _nearest(self, x: np.ndarray, k: int) -> np.ndarray:
        """Indices of the k nearest pool rows for each row of `x` (see `near_many`)."""
        size = len(self._labels)
        std = self.reference.std
        spare = min(size - k, _SPARE)
        xs = x / std
        finite = np.isfinite(xs).all(axis=1)
        cand = np.zeros((len(x), k + spare), dtype=np.intp)
        found = np.full((len(x), k + spare), np.inf)
        if finite.any():
            found[finite], cand[finite] = self._tree().query(xs[finite], k=k + spare)
        missing = cand >= size  # the tree's "no neighbour" (its distances overflowed)
        found[missing], cand[missing] = np.inf, 0
        # `near`'s own distance for the candidates (same operations, so the same values)
        exact = np.linalg.norm((self._x[cand] - x[:, None, :]) / std, axis=2)
        order = np.argsort(exact, axis=1, kind="stable")
        rows = np.arange(len(x))[:, None]
        chosen = cand[rows, order[:, :k]]
        ranked = exact[rows, order]
        # Unsure rows: a candidate list that may miss a nearer point (every point left out
        # is at least the tree's farthest candidate away, up to rounding), a tie at the
        # k-th place, or numbers too large (or not finite) to trust.
        outside = found[:, -1] if k + spare < size else np.full(len(x), np.inf)
        unsure = ranked[:, k - 1] >= outside * (1.0 - 1e-9)
        unsure |= ranked[:, k - 1] == ranked[:, k]
        unsure |= ~np.isfinite(found).all(axis=1) | ~np.isfinite(exact).all(axis=1)
        for i in np.flatnonzero(unsure):
            d = np.linalg.norm((self._x - x[i]) / std, axis=1)
            chosen[i] = np.argsort(d)[:k]
        return chosen

    def _tree(self) -> cKDTree:
        if "tree" not in self._derived:
            # leaves of 32: ~20 % faster queries than the default 16 for this 8-d pool
            self._derived["tree"] = cKDTree(self._x / self.reference.std, leafsize=32)
        return self._derived["tree"]

    def _label_array(self) -> np.ndarray:
        if "label_array" not in self._derived:
            self._derived["label_array"] = np.asarray(self._labels, dtype=object)
        return self._derived["label_array"]  # type: ignore[return-value]

    def of_class(self, label: str, limit: int = 256) -> np.ndarray:
        key = f"class:{label}:{limit}"
        if key not in self._derived:  # the same rows as before, found once per label
            idx = [i for i, lab in enumerate(self._labels) if lab == label][-limit:]
            rows = self._x[idx]
            rows.setflags(write=False)
            self._derived[key] = rows
        return self._derived[key]  # type: ignore[return-value]
