"""Turning what an app has into the JSON rows and corrections the service takes.

Instances may be a list of dicts (named features), a list of number lists (vectors), a
2-D numpy array, a pandas DataFrame or a pyarrow Table / RecordBatch (rows as dicts).
pandas, pyarrow and numpy are never imported here: an object is recognised only if its
library is already imported, which it is whenever the caller holds such an object.

A missing value -- None, NaN, pandas' NA or NaT -- in a named row leaves the feature out
(the service fills in what the schema says for a missing feature); in a vector it is an
error, since a vector has no way to say "missing". Rows are converted a request at a
time, so a million-row Table is never a million dicts at once.
"""

from __future__ import annotations

import decimal
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flywheel.client.errors import InvalidInput
from flywheel.client.types import Correction

JSONRow = dict[str, Any] | list[float]
_NA_TYPES = ("NAType", "NaTType")  # pandas.NA, pandas.NaT (without importing pandas)
CORRECTION_FIELDS = ("prediction_id", "label", "source", "subject")


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return type(value).__name__ in _NA_TYPES


def _scalar(value: Any) -> Any:
    """numpy scalars and Decimals as plain Python values."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


def _instance_of(obj: Any, module: str, *names: str) -> bool:
    lib = sys.modules.get(module)
    return lib is not None and any(
        isinstance(obj, t) for t in (getattr(lib, n, None) for n in names) if isinstance(t, type)
    )


class Rows:
    """Instances of any accepted kind, converted to JSON rows a slice at a time.

    >>> rows = Rows.of([{"amount": 12.5, "country": "FR", "age": None}, [0.5, 1]])
    >>> len(rows), rows.slice(0, 2)
    (2, [{'amount': 12.5, 'country': 'FR'}, [0.5, 1]])
    >>> Rows.of([[1.0, float("nan")]]).slice(0, 1)
    Traceback (most recent call last):
    ...
    flywheel.client.errors.InvalidInput: instances[0][1]: nan is not a finite number \
(a vector cannot leave a feature out; send a dict of named features instead)
    """

    def __init__(self, length: int, take: Any) -> None:
        self._length, self._take = length, take

    def __len__(self) -> int:
        return self._length

    def slice(self, start: int, stop: int) -> list[JSONRow]:
        """Rows `start` to `stop` (exclusive), validated, as JSON-ready values."""
        return [to_json_row(row, start + i) for i, row in enumerate(self._take(start, stop))]

    @classmethod
    def of(cls, instances: Any) -> Rows:
        if _instance_of(instances, "pandas", "DataFrame"):
            return cls._dataframe(instances)
        if _instance_of(instances, "pyarrow", "Table", "RecordBatch"):
            names = list(instances.schema.names)
            return cls(
                instances.num_rows, lambda a, b: instances.slice(a, b - a).to_pylist()
            ).checked(names)
        if _instance_of(instances, "numpy", "ndarray"):
            if instances.ndim != 2:
                raise InvalidInput(
                    f"instances: a numpy array of shape {instances.shape}; expected 2-D "
                    "(one row per instance)"
                )
            return cls(len(instances), lambda a, b: instances[a:b].tolist())
        if isinstance(instances, str | bytes | Mapping) or not isinstance(instances, Iterable):
            raise InvalidInput(
                f"instances must be a list of rows (dicts or number lists), a DataFrame or an "
                f"Arrow table; got {type(instances).__name__}"
                + (" (wrap a single row in a list)" if isinstance(instances, Mapping) else "")
            )
        items = instances if isinstance(instances, Sequence) else list(instances)
        return cls(len(items), lambda a, b: items[a:b])

    @classmethod
    def _dataframe(cls, df: Any) -> Rows:
        names = list(df.columns)
        if not df.columns.is_unique:
            raise InvalidInput(f"instances: the DataFrame has repeated column names: {names}")
        return cls(len(df), lambda a, b: df.iloc[a:b].to_dict("records")).checked(names)

    def checked(self, names: list[Any]) -> Rows:
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise InvalidInput(
                f"instances: column names must be strings (feature names); got {bad[:5]!r}. "
                "For vectors, pass the values as a list of lists (`.to_numpy().tolist()`)"
            )
        return self


def to_json_row(row: Any, index: int) -> JSONRow:
    """One instance as the service's JSON: a dict of features, or a list of numbers."""
    if type(row).__module__ == "numpy" and hasattr(row, "tolist"):  # a row of a matrix
        row = row.tolist()
    if isinstance(row, Mapping):
        out: dict[str, Any] = {}
        for key, value in row.items():
            if not isinstance(key, str):
                raise InvalidInput(f"instances[{index}]: feature name {key!r} is not a string")
            value = _scalar(value)
            if _is_missing(value):
                continue  # left out: the service treats it as missing
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidInput(f"instances[{index}].{key}: {value} is not a finite number")
            if not isinstance(value, str | int | float):  # bool is an int
                raise InvalidInput(
                    f"instances[{index}].{key}: {type(value).__name__} {value!r} is not a "
                    "number, a string or a boolean"
                )
            out[key] = value
        return out
    if isinstance(row, str | bytes) or not isinstance(row, Sequence):
        raise InvalidInput(
            f"instances[{index}] must be a dict of named features or a list of numbers; "
            f"got {type(row).__name__}"
        )
    vector: list[Any] = []
    for j, value in enumerate(row):
        value = _scalar(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(f"instances[{index}][{j}]: {value!r} is not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(
                f"instances[{index}][{j}]: {value} is not a finite number (a vector cannot "
                "leave a feature out; send a dict of named features instead)"
            )
        vector.append(value)
    return vector


def as_corrections(items: Any) -> list[Correction]:
    """`(prediction_id, label[, source[, subject]])` tuples, dicts or `Correction`s, checked.

    >>> as_corrections([("p1", "cat"), {"prediction_id": "p2", "label": "dog", "source": "a"}])
    [Correction(prediction_id='p1', label='cat', source=None, subject=None), \
Correction(prediction_id='p2', label='dog', source='a', subject=None)]
    >>> as_corrections([{"prediction_id": "p1", "label": "cat", "subject": "u-9"}])[0].subject
    'u-9'
    >>> as_corrections([{"prediction_id": "p1", "label": "cat", "user": "u-9"}])
    Traceback (most recent call last):
    ...
    flywheel.client.errors.InvalidInput: corrections[0]: unknown field 'user' \
(known: prediction_id, label, source, subject)
    """
    if isinstance(items, str | bytes | Mapping | Correction) or not isinstance(items, Iterable):
        raise InvalidInput(
            "corrections must be a list of (prediction_id, label) pairs, dicts or "
            f"Correction objects; got {type(items).__name__} (wrap a single one in a list)"
        )
    out = [_correction(item, i) for i, item in enumerate(items)]
    if not out:
        raise InvalidInput("no corrections to send")
    return out


def _correction(item: Any, i: int) -> Correction:
    if isinstance(item, Correction):
        c = item
    elif isinstance(item, Mapping):
        unknown = [k for k in item if k not in CORRECTION_FIELDS]
        if unknown:
            raise InvalidInput(
                f"corrections[{i}]: unknown field {unknown[0]!r} "
                f"(known: {', '.join(CORRECTION_FIELDS)})"
            )
        for name in ("prediction_id", "label"):
            if name not in item:
                raise InvalidInput(f"corrections[{i}].{name}: field required")
        c = Correction(
            item["prediction_id"], item["label"], item.get("source"), item.get("subject")
        )
    elif isinstance(item, tuple | list) and len(item) in (2, 3, 4):
        c = Correction(*item)
    else:
        raise InvalidInput(
            f"corrections[{i}] must be a (prediction_id, label) pair, a dict or a Correction; "
            f"got {item!r}"
        )
    for name in CORRECTION_FIELDS:
        value = getattr(c, name)
        if name in ("source", "subject") and value is None:
            continue
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"corrections[{i}].{name}: {value!r} is not a non-empty string")
    return c


def correction_json(c: Correction) -> dict[str, str]:
    doc = {"prediction_id": c.prediction_id, "label": c.label}
    if c.source is not None:
        doc["source"] = c.source
    if c.subject is not None:
        doc["subject"] = c.subject
    return doc
