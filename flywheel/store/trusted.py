"""The trusted data set: what the initial model learns, the gate's frozen holdout, the
analyzer's reference distribution and the public replay of DP updates all come from here.

It lives with the store, not the learner, because every component reads it (the learner,
the gate, review, the feedback worker and the federated server), and none of them may
import another for it. `flywheel init` writes it once per registered model: a
`trusted_sets` row (schema, fingerprint, split rule, whether it is public) and its rows
as `examples` of origin `seed`, split `train` or `holdout`, in one transaction.

`seed_data` is the synthetic demo problem (`flywheel.streams`), regenerated from the
settings' seed: what the demo writes to a CSV and imports like a user's file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from flywheel.features import FeatureSchema
from flywheel.settings import TrustedSettings
from flywheel.store.bulk import insert_ignoring_duplicates
from flywheel.store.models import Example, Origin, ReferenceStats, Split, TrustedSet

if TYPE_CHECKING:
    import numpy as np

HOLDOUT_FRACTION = 0.2  # of the trusted examples: the trusted (frozen) holdout


@dataclass(frozen=True)
class TrustedInfo:
    """What a lineage's trusted data set is (a `trusted_sets` row, typed)."""

    model_name: str
    fingerprint: str
    schema: FeatureSchema
    public: bool  # may be replayed without privacy accounting (public or consented)
    rows_train: int
    rows_holdout: int
    split_rule: str
    label_counts: dict[str, int]
    source: str


@dataclass(frozen=True)
class TrustedData:
    """The trusted rows as raw input vectors; labels as indices into `info.schema.labels`."""

    info: TrustedInfo
    x_train: np.ndarray
    y_train: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray


def seed_key(model_name: str, split: Split, index: int) -> str:
    """The `dedup_key` of trusted row `index` of a split (a replayed write stores nothing)."""
    return f"seed:{model_name}:{split.value}:{index}"


def trusted_info(session: Session, model_name: str) -> TrustedInfo | None:
    """The trusted set of `model_name`, or None before `flywheel init`."""
    row = session.get(TrustedSet, model_name)
    if row is None:
        return None
    return TrustedInfo(
        model_name=row.model_name,
        fingerprint=row.fingerprint,
        schema=FeatureSchema.model_validate(row.schema),
        public=bool(row.public),
        rows_train=int(row.rows_train),
        rows_holdout=int(row.rows_holdout),
        split_rule=row.split_rule,
        label_counts={str(k): int(v) for k, v in row.label_counts.items()},
        source=row.source,
    )


def write_trusted_info(session: Session, info: TrustedInfo) -> None:
    """Add the `trusted_sets` row (the caller commits, with the rows)."""
    session.add(
        TrustedSet(
            model_name=info.model_name,
            fingerprint=info.fingerprint,
            schema=info.schema.model_dump(mode="json"),
            public=info.public,
            rows_train=info.rows_train,
            rows_holdout=info.rows_holdout,
            split_rule=info.split_rule,
            label_counts=dict(info.label_counts),
            source=info.source,
        )
    )


def write_trusted_rows(
    session: Session,
    model_name: str,
    split: Split,
    first_index: int,
    x: np.ndarray,
    labels: Sequence[str],
) -> int:
    """Store trusted rows `first_index...` of a split as `seed` examples; returns how
    many were new (a replayed chunk stores nothing twice)."""
    rows: list[dict[str, Any]] = [
        {
            "dedup_key": seed_key(model_name, split, first_index + i),
            "origin": Origin.SEED.value,
            "features": vector,
            "label": label,
            "weight": 1.0,
            "split": split.value,
        }
        for i, (vector, label) in enumerate(zip(x.tolist(), labels, strict=True))
    ]
    return insert_ignoring_duplicates(session, Example, rows)


def delete_trusted(session: Session, model_name: str) -> None:
    """Forget a lineage's trusted set, its rows and its reference statistics (for a new
    lineage under the same name; the caller commits)."""
    prefix = f"seed:{model_name}:"
    session.execute(
        delete(Example).where(
            Example.origin == Origin.SEED.value, Example.dedup_key.startswith(prefix)
        )
    )
    session.execute(delete(ReferenceStats).where(ReferenceStats.model_name == model_name))
    session.execute(delete(TrustedSet).where(TrustedSet.model_name == model_name))


def trusted_data(
    session: Session, model_name: str, *, max_train: int | None = None
) -> TrustedData | None:
    """The trusted rows of `model_name` (None before `init`), the holdout whole and at
    most `max_train` training rows (evenly spaced through the set, so a bounded reader
    still sees all of it)."""
    import numpy as np

    info = trusted_info(session, model_name)
    if info is None:
        return None
    index = {name: i for i, name in enumerate(info.schema.labels)}
    out: dict[Split, tuple[np.ndarray, np.ndarray]] = {}
    for split, total in ((Split.TRAIN, info.rows_train), (Split.HOLDOUT, info.rows_holdout)):
        limit = total if split is Split.HOLDOUT or max_train is None else max_train
        stride = max(1, -(-total // max(limit, 1)))
        query = (
            select(Example.features, Example.label)
            .where(
                Example.origin == Origin.SEED.value,
                Example.split == split.value,
                Example.dedup_key.startswith(f"seed:{model_name}:{split.value}:"),
            )
            .order_by(Example.id)
        )
        xs, ys = [], []
        for i, (features, label) in enumerate(session.execute(query)):
            if i % stride == 0 and label in index:
                xs.append(features)
                ys.append(index[label])
        width = info.schema.input_dim
        out[split] = (
            np.asarray(xs, dtype=np.float32).reshape(len(xs), width),
            np.asarray(ys, dtype=np.int64),
        )
    return TrustedData(info, *out[Split.TRAIN], *out[Split.HOLDOUT])


def seed_data(trusted: TrustedSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_holdout, y_holdout) of the synthetic demo problem, as label
    indices; deterministic per seed.

    >>> from flywheel.settings import TrustedSettings
    >>> x_tr, y_tr, x_ho, y_ho = seed_data(TrustedSettings(seed=1, seed_examples=100))
    >>> x_tr.shape, x_ho.shape, sorted(set(y_tr.tolist()) | set(y_ho.tolist()))
    ((80, 8), (20, 8), [0, 1, 2])
    """
    import numpy as np  # here, not at import: `flywheel db` and other store-only callers

    from flywheel.streams import LABELS, seed_concept  # never need it (~50 ms of numpy)

    x, names = seed_concept(trusted.seed).sample(trusted.seed_examples, trusted.seed)
    y = np.asarray([LABELS.index(n) for n in names], dtype=np.int64)
    cut = int(len(x) * (1 - HOLDOUT_FRACTION))
    return x[:cut], y[:cut], x[cut:], y[cut:]
