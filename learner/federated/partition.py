"""Non-IID sites for the demo, the tests and the benchmarks: Dirichlet label skew.

Site k gets, of every class c, a share p_k,c drawn from Dirichlet(α) over the sites
(the usual label-skew partition of Hsu et al., 2019): α=0.5 leaves most sites with one or
two dominant classes, α→∞ is IID. The data are the demo's changed world
(`flywheel.streams.drift_concept`): the seed champion is poor there, so what a
federation learns shows. Labels travel by name (`Partition.labels`), as a site's
corrections carry them: the synthetic problem's here, a lineage's own schema elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flywheel.streams import LABELS, drift_concept


@dataclass(frozen=True)
class Partition:
    """Rows of each site (train) and the union's holdout (the platform's recent holdout)."""

    sites: list[tuple[np.ndarray, np.ndarray]]  # (x, label index) per site
    holdout: tuple[np.ndarray, np.ndarray]
    labels: list[str] = field(default_factory=lambda: list(LABELS))  # label index -> name

    @property
    def union(self) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.concatenate([x for x, _ in self.sites]),
            np.concatenate([y for _, y in self.sites]),
        )


def dirichlet_split(
    y: np.ndarray, n_sites: int, alpha: float, rng: np.random.Generator, min_size: int = 10
) -> list[np.ndarray]:
    """Row indices per site; redrawn until every site has at least `min_size` rows."""
    classes = np.unique(y)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(n_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"could not give {n_sites} sites {min_size} rows each with α={alpha}")


def make_partition(
    n_sites: int, *, per_site: int = 400, holdout: int = 600, alpha: float = 0.5, seed: int = 7
) -> Partition:
    """Dirichlet(α) label-skewed sites of the drift concept, plus an IID union holdout."""
    concept = drift_concept(seed)
    x, names = concept.sample(n_sites * per_site + holdout, sample_seed=1000 + seed)
    y = np.asarray([LABELS.index(n) for n in names], np.int64)
    x_tr, y_tr, x_ho, y_ho = x[holdout:], y[holdout:], x[:holdout], y[:holdout]
    rng = np.random.default_rng(seed)
    parts = dirichlet_split(y_tr, n_sites, alpha, rng)
    return Partition([(x_tr[p], y_tr[p]) for p in parts], (x_ho, y_ho))


def fill_site_store(
    url: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    site: str,
    split: str = "train",
    flip_labels: bool = False,
    names: Sequence[str] = tuple(LABELS),
) -> int:
    """Write rows into a (migrated) training store as corrections of this site's users;
    label index i is stored as `names[i]` (`Partition.labels`).

    `flip_labels` writes label (y+1) mod C instead: a poisoned site for robustness tests.
    """
    from flywheel.store import Example, insert_ignoring_duplicates, make_engine, session_factory

    labels = (y + 1) % len(names) if flip_labels else y
    engine = make_engine(url)
    try:
        with session_factory(engine).begin() as session:
            return insert_ignoring_duplicates(
                session,
                Example,
                [
                    {
                        "dedup_key": f"{site}:{split}:{i}",
                        "origin": "correction",
                        "features": row.tolist(),
                        "label": names[int(label)],
                        "weight": 1.0,
                        "split": split,
                        "source": f"{site}-user-{i}",
                        "parent_prediction_id": f"{site}-p{split[0]}{i}",
                        "error_type": "confident",
                    }
                    for i, (row, label) in enumerate(zip(x, labels, strict=True))
                ],
            )
    finally:
        engine.dispose()


def root_set(n: int, *, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """`n` rows of the same drift concept as `make_partition(seed=seed)`'s sites, drawn
    with their own sample seed (no row shared with a site or the holdout): the small
    trusted "root data set" a platform labels itself in the FLTrust paper's setting
    (Cao et al. 2021 use 100 rows), for a trusted set from the sites' current world."""
    if n < 1:
        raise ValueError(f"a root set needs at least one row, got {n}")
    x, names = drift_concept(seed).sample(n, sample_seed=5000 + seed)
    return x, np.asarray([LABELS.index(name) for name in names], np.int64)
