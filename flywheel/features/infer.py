"""Inferring a feature schema from a data set, one pyarrow batch at a time.

Memory is bounded by the number of columns and the category cap, not the file: numbers
keep a running count, mean and sum of squares (Chan's parallel update per batch); text
columns keep counts of at most `track` distinct values each (past that, new values are
only counted as "more"). So a file larger than RAM is inferred in one pass.

The rules, in order, for each column other than the label (the reason is written into
the schema for the person who reviews it):
- all values missing → ignore;
- pyarrow boolean, or text that is only true/false/yes/no (any case) → boolean;
- integer or float → numeric (missing filled with the mean);
- text (or dictionary) → categorical with the `max_vocabulary` most frequent values;
  the rest share the unknown bucket. Text whose values are nearly all distinct (over
  90 % of at least 50 rows) looks like an identifier → ignore (as a category it would
  be a bucket per row: nothing to learn, and nothing an unseen row could match);
- anything else (dates, lists, binary) → ignore, with its type named.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flywheel.features.schema import (
    MAX_VOCABULARY,
    Feature,
    FeatureError,
    FeatureSchema,
    _as_text,
    label_text,
)

if TYPE_CHECKING:
    import pyarrow as pa

MAX_LABELS = 1000
ID_SHARE = 0.9  # distinct/non-missing above this, over at least ID_ROWS rows: an identifier
ID_ROWS = 50


@dataclass
class _Column:
    name: str
    family: str = ""  # "numeric", "boolean", "text", "null", or a pyarrow type name
    first_row: int = 0  # where `family` was first seen
    count: int = 0
    missing: int = 0
    mean: float = 0.0
    m2: float = 0.0
    values: Counter[str] = field(default_factory=Counter)
    overflow: int = 0  # non-missing values not tracked in `values`

    def add(self, col: pa.Array, first_row: int, track: int) -> None:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        family = _family(col.type)
        nulls = col.null_count
        self.missing += nulls
        if family == "null" or nulls == len(col):
            return
        if self.family in ("", "null"):
            self.family, self.first_row = family, first_row
        elif family != self.family:
            bad = first_row + _first_valid(col)
            raise FeatureError(
                f"the column's type changes: {self.family} from row {self.first_row}, "
                f"{family} at row {bad}",
                row=bad,
                field=self.name,
                where="data",
            )
        if family == "numeric":
            arr = np.asarray(
                pc.drop_null(pc.cast(col, pa.float64())).to_numpy(zero_copy_only=False)
            )
            if not np.isfinite(arr).all():
                at = _first_nonfinite(col)
                raise FeatureError(
                    "is not a finite number", row=first_row + at, field=self.name, where="data"
                )
            n, mean = len(arr), float(arr.mean())
            m2 = float(((arr - mean) ** 2).sum())
            total = self.count + n
            delta = mean - self.mean
            self.mean += delta * n / total
            self.m2 += m2 + delta * delta * self.count * n / total
            self.count = total
            return
        text = pc.if_else(col, "true", "false") if family == "boolean" else _as_text(col)
        counts = pc.value_counts(pc.drop_null(text))
        for value, n in zip(
            counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
        ):
            if value in self.values or len(self.values) < track:
                self.values[value] += n
            else:
                self.overflow += n
        self.count += len(col) - nulls

    def feature(self, max_vocabulary: int) -> Feature:
        name = self.name
        if self.family in ("", "null") or self.count == 0:
            return Feature(name=name, kind="ignore", reason="every value is missing")
        if self.family == "numeric":
            std = math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0
            return Feature(
                name=name,
                kind="numeric",
                mean=self.mean,
                std=std if std > 1e-12 else 1.0,
                reason=f"numbers; missing ({self.missing}) filled with the mean",
            )
        if self.family not in ("boolean", "text"):
            return Feature(name=name, kind="ignore", reason=f"type {self.family} is not a feature")
        lowered = {v.lower() for v in self.values}
        if not self.overflow and lowered and lowered <= {"true", "false", "yes", "no"}:
            truthy = sum(n for v, n in self.values.items() if v.lower() in ("true", "yes"))
            return Feature(
                name=name,
                kind="boolean",
                fill=truthy * 2 >= self.count,
                reason=f"true/false values; missing ({self.missing}) filled with the commoner",
            )
        if self.count >= ID_ROWS and (len(self.values) + self.overflow) / self.count > ID_SHARE:
            return Feature(
                name=name,
                kind="ignore",
                reason=f"nearly every value is distinct ({len(self.values)}+ of "
                f"{self.count}): looks like an identifier",
            )
        ranked = sorted(self.values.items(), key=lambda kv: (-kv[1], kv[0]))
        vocab = [v for v, _ in ranked[:max_vocabulary]]
        rest = self.count - sum(n for _, n in ranked[:max_vocabulary])
        return Feature(
            name=name,
            kind="categorical",
            vocabulary=vocab,
            reason=f"text, {len(ranked)}{'+' if self.overflow else ''} distinct values; "
            f"{len(vocab)} kept, {rest} rarer values and {self.missing} missing go to "
            "the unknown bucket",
        )


def infer_schema(
    batches: Iterable[pa.RecordBatch | pa.Table],
    label: str,
    *,
    max_vocabulary: int = MAX_VOCABULARY,
    ignore: Iterable[str] = (),
) -> tuple[FeatureSchema, dict[str, int]]:
    """(schema, rows per label) from the batches of a data set, in one pass.

    Refuses, with `FeatureError` naming the row and column: no rows, no label column, a
    missing label, a single class, a label with one example, a column whose type
    changes. `ignore`: columns to leave out whatever they hold.

    >>> import pyarrow as pa
    >>> t = pa.table({"amount": [1.0, 2.0, None, 4.0], "country": ["FR", "DE", "FR", None],
    ...               "y": ["a", "b", "a", "b"]})
    >>> schema, counts = infer_schema([t], label="y")
    >>> [(f.name, f.kind) for f in schema.features], schema.labels, counts
    ([('amount', 'numeric'), ('country', 'categorical')], ['a', 'b'], {'a': 2, 'b': 2})
    >>> schema.features[1].vocabulary
    ['FR', 'DE']
    """
    skip = set(ignore)
    columns: dict[str, _Column] = {}
    order: list[str] = []
    labels: Counter[str] = Counter()
    rows = 0
    track = max(10 * max_vocabulary, 10_000)
    for batch in batches:
        names = batch.schema.names
        if label not in names:
            raise FeatureError(
                f"no label column {label!r}; the columns are {names}", field=label, where="data"
            )
        if not order:
            order = [n for n in names if n != label]
            dup = sorted(n for n, c in Counter(names).items() if c > 1)
            if dup:
                raise FeatureError(f"repeated column names {dup}", where="data")
        elif [n for n in names if n != label] != order:
            raise FeatureError(f"the columns change at row {rows}: {names}", row=rows, where="data")
        y = batch.column(label)
        if y.null_count:
            at = int(y.is_null().to_numpy(zero_copy_only=False).argmax())
            raise FeatureError("the label is missing", row=rows + at, field=label, where="data")
        labels.update(label_text(v) for v in y.to_pylist())
        if len(labels) > MAX_LABELS:
            raise FeatureError(
                f"more than {MAX_LABELS} distinct labels: is {label!r} the label column?",
                field=label,
                where="data",
            )
        for name in order:
            if name in skip:
                continue
            col = batch.column(name)
            if hasattr(col, "combine_chunks"):
                col = col.combine_chunks()
            columns.setdefault(name, _Column(name)).add(col, rows, track)
        rows += batch.num_rows
    if rows == 0:
        raise FeatureError("the data set has no rows", where="data")
    if len(labels) < 2:
        raise FeatureError(
            f"only one class ({next(iter(labels))!r}): a classifier needs at least two",
            field=label,
            where="data",
        )
    single = sorted(name for name, n in labels.items() if n < 2)
    if single:
        raise FeatureError(
            f"label(s) {single} have a single example; each needs at least two "
            "(one to train on, one for the holdout): remove or merge them",
            field=label,
            where="data",
        )
    features = [
        Feature(name=n, kind="ignore", reason="ignored as asked")
        if n in skip
        else columns[n].feature(max_vocabulary)
        for n in order
    ]
    schema = FeatureSchema(
        label=label,
        labels=sorted(labels),
        features=features,
        max_vocabulary=max_vocabulary,
    )
    return schema, {name: labels[name] for name in schema.labels}


def _family(t: pa.DataType) -> str:
    import pyarrow as pa

    if pa.types.is_null(t):
        return "null"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "numeric"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return "text"
    return str(t)


def _first_valid(col: pa.Array) -> int:
    return int(col.is_valid().to_numpy(zero_copy_only=False).argmax())


def _first_nonfinite(col: pa.Array) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=float)
    bad = ~np.isfinite(arr) & ~np.asarray(col.is_null().to_numpy(zero_copy_only=False))
    return int(bad.argmax())
