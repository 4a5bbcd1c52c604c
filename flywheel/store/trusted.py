"""The trusted data set: what the initial model learns, the gate's frozen holdout, the
analyzer's reference distribution and the public replay of DP updates all come from here.

It lives with the store, not the learner, because every component reads it (the learner,
the gate, review, the feedback worker and the federated server), and none of them may
import another for it. `flywheel init` writes it once per registered model: a
`trusted_sets` row (schema, fingerprint, split rule, whether it is public) and its rows
as `examples` of origin `seed`, split `train` or `holdout`, in one transaction.

Every reader goes through `trusted_data` (or `require_trusted`, which raises
`NoTrustedData` naming the command that fills it), never through the synthetic problem.

`seed_data` is the synthetic demo problem (`flywheel.streams`), regenerated from the
settings' seed: what the demo writes to a CSV and imports like a user's file.
The demo, the federated demo and every process that bootstraps an empty deployment go
through `flywheel init` (`ensure_champion`); `write_seed_trusted` stores the problem as a
lineage's trusted set directly, for stores no champion bootstraps (a benchmark's worker
store, tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from flywheel.features import FeatureSchema
from flywheel.settings import TrustedSettings
from flywheel.store.bulk import copy_all_new, encode_columns, insert_ignoring_duplicates
from flywheel.store.models import Example, Origin, ReferenceStats, Split, TrustedSet

if TYPE_CHECKING:
    import numpy as np

HOLDOUT_FRACTION = 0.2  # of the trusted examples: the trusted (frozen) holdout
SEED_SOURCE = "synthetic:flywheel.streams"  # `source` of the synthetic problem's trusted set


class NoTrustedData(LookupError):
    """A lineage without a trusted data set: nothing to gate, replay or compare against.

    >>> print(str(NoTrustedData("fraud")).replace(": ", ":\\n"))
    no trusted data set for model 'fraud' in the training store:
    run `flywheel init --data FILE --label COLUMN` first
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        super().__init__(
            f"no trusted data set for model {model_name!r} in the training store: "
            "run `flywheel init --data FILE --label COLUMN` first"
        )


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
    many were new (a replayed chunk stores nothing twice).

    A column at a time, not a dict per row: the features as one orjson call over the
    whole (finite) matrix, each value the float64 text of the float32 it is (as
    `x.tolist()` would write it: a float64 reader, the analyzer, sees the same number);
    on PostgreSQL one COPY (`encode_columns`, falling back to
    the duplicate-skipping INSERT for a replay), on SQLite one `INSERT OR IGNORE`
    executemany. `flywheel init` writes millions of rows through here: the ORM's
    general insert took ~140 us a row on SQLite.
    """
    import numpy as np
    import orjson

    n = len(labels)
    if n == 0:
        return 0
    if x.shape[0] != n:
        raise ValueError(f"{x.shape[0]} rows of features for {n} labels")
    if not np.isfinite(x).all():
        raise ValueError("trusted rows must be finite")
    matrix = np.ascontiguousarray(np.asarray(x, dtype=np.float32), dtype=np.float64)
    text = orjson.dumps(matrix, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    if matrix.shape[1] == 0:
        features = ["[]"] * n
    else:  # "[[a,b],[c,d]]": rows split at "],[" (a number never holds a bracket)
        features = [f"[{row}]" for row in text[2:-2].split("],[")]
    keys = [seed_key(model_name, split, first_index + i) for i in range(n)]
    now = datetime.now(UTC)
    if session.get_bind().dialect.name == "sqlite":
        stamp = now.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")  # UTCDateTime's form
        result = session.connection().exec_driver_sql(
            "INSERT OR IGNORE INTO examples"
            " (dedup_key, origin, features, label, weight, split, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (key, Origin.SEED.value, feats, label, 1.0, split.value, stamp)
                for key, feats, label in zip(keys, features, labels, strict=True)
            ],
        )
        return int(result.rowcount)
    encoded = encode_columns(
        Example,
        {
            "dedup_key": keys,
            "origin": [Origin.SEED.value] * n,
            "features": [orjson.Fragment(f) for f in features],
            "label": list(labels),
            "weight": [1.0] * n,
            "split": [split.value] * n,
            "created_at": [now] * n,
        },
    )
    if encoded is not None and copy_all_new(session, encoded):
        return n
    rows: list[dict[str, Any]] = [
        {
            "dedup_key": key,
            "origin": Origin.SEED.value,
            "features": orjson.loads(feats),
            "label": label,
            "weight": 1.0,
            "split": split.value,
        }
        for key, feats, label in zip(keys, features, labels, strict=True)
    ]
    return insert_ignoring_duplicates(session, Example, rows)


def delete_trusted(session: Session, model_name: str) -> None:
    """Forget a lineage's trusted set, its rows and its reference statistics (for a new
    lineage under the same name; the caller commits)."""
    prefix = f"seed:{model_name}:"
    session.execute(
        delete(Example).where(
            Example.origin == Origin.SEED.value,
            Example.dedup_key.startswith(prefix, autoescape=True),
        )
    )
    session.execute(delete(ReferenceStats).where(ReferenceStats.model_name == model_name))
    session.execute(delete(TrustedSet).where(TrustedSet.model_name == model_name))


def trusted_data(
    session: Session, model_name: str, *, max_train: int | None = None
) -> TrustedData | None:
    """The trusted rows of `model_name` (None before `init`), the holdout whole and at
    most `max_train` training rows (evenly spaced through the set, so a bounded reader
    still sees all of it; 0 reads none, for a reader of the holdout only)."""
    import numpy as np

    info = trusted_info(session, model_name)
    if info is None:
        return None
    index = {name: i for i, name in enumerate(info.schema.labels)}
    out: dict[Split, tuple[np.ndarray, np.ndarray]] = {}
    for split, total in ((Split.TRAIN, info.rows_train), (Split.HOLDOUT, info.rows_holdout)):
        limit = total if split is Split.HOLDOUT or max_train is None else max_train
        if limit <= 0:
            out[split] = (
                np.empty((0, info.schema.input_dim), np.float32),
                np.empty(0, np.int64),
            )
            continue
        stride = max(1, -(-total // max(limit, 1)))
        query = (
            select(Example.features, Example.label)
            .where(
                Example.origin == Origin.SEED.value,
                Example.split == split.value,
                Example.dedup_key.startswith(f"seed:{model_name}:{split.value}:", autoescape=True),
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


def require_trusted(
    session: Session, model_name: str, *, max_train: int | None = None
) -> TrustedData:
    """`trusted_data`, or `NoTrustedData` when `model_name` has no trusted set."""
    data = trusted_data(session, model_name, max_train=max_train)
    if data is None:
        raise NoTrustedData(model_name)
    return data


def positions(schema: FeatureSchema, kind: str) -> list[int]:
    """Raw-vector positions of the inputs of one kind ("categorical", "boolean", ...).

    >>> from flywheel.features import Feature
    >>> s = FeatureSchema(label="y", labels=["a", "b"], features=[
    ...     Feature(name="n", kind="numeric"), Feature(name="on", kind="boolean"),
    ...     Feature(name="c", kind="categorical", vocabulary=["u"])])
    >>> positions(s, "boolean"), positions(s, "categorical")
    ([1], [2])
    """
    return [i for i, f in enumerate(schema.inputs) if f.kind == kind]


def seed_schema(x_train: np.ndarray, labels: Sequence[str]) -> FeatureSchema:
    """The synthetic problem's schema: numeric `x0...` (mean and std of `x_train`)."""
    from flywheel.features import Feature

    mean, std = x_train.mean(axis=0), x_train.std(axis=0, ddof=1)
    return FeatureSchema(
        label="label",
        labels=list(labels),
        features=[
            Feature(
                name=f"x{i}",
                kind="numeric",
                mean=float(mean[i]),
                std=max(float(std[i]), 1e-6),
                reason="synthetic demo problem (flywheel.streams)",
            )
            for i in range(x_train.shape[1])
        ],
    )


def write_seed_trusted(
    session: Session, model_name: str, trusted: TrustedSettings, *, public: bool = True
) -> bool:
    """Store the synthetic demo problem (`seed_data`) as `model_name`'s trusted set, if it
    has none; True if it wrote it. The caller commits.

    For the demo's embedded stack, the benchmarks and the tests: they start from the
    synthetic problem the way `ensure_champion` trains the first model on it, and need
    its trusted set in the store like any deployment `flywheel init` started.
    """
    import hashlib

    from flywheel.streams import LABELS

    if session.get(TrustedSet, model_name) is not None:
        return False
    x_tr, y_tr, x_ho, y_ho = seed_data(trusted)
    names = {split: [LABELS[int(i)] for i in y] for split, y in ((0, y_tr), (1, y_ho))}
    digest = hashlib.sha256()
    for part in (x_tr, y_tr, x_ho, y_ho):
        digest.update(part.tobytes())
    write_trusted_info(
        session,
        TrustedInfo(
            model_name=model_name,
            fingerprint=digest.hexdigest(),
            schema=seed_schema(x_tr, LABELS),
            public=public,
            rows_train=len(x_tr),
            rows_holdout=len(x_ho),
            split_rule=f"the last {HOLDOUT_FRACTION:.0%} of the rows (in stream order)",
            label_counts={n: names[0].count(n) + names[1].count(n) for n in LABELS},
            source=f"{SEED_SOURCE}?seed={trusted.seed}&examples={trusted.seed_examples}",
        ),
    )
    session.flush()  # the trusted_sets row before its rows, as `init` writes them
    write_trusted_rows(session, model_name, Split.TRAIN, 0, x_tr, names[0])
    write_trusted_rows(session, model_name, Split.HOLDOUT, 0, x_ho, names[1])
    return True


def ensure_seed_trusted(
    database_url: str, model_name: str, trusted: TrustedSettings, *, public: bool = True
) -> bool:
    """`write_seed_trusted` in its own transaction on the (migrated) store at
    `database_url`; True if it wrote the set."""
    from flywheel.store.database import make_engine, session_factory

    engine = make_engine(database_url)
    try:
        with session_factory(engine).begin() as session:
            return write_seed_trusted(session, model_name, trusted, public=public)
    finally:
        engine.dispose()


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
