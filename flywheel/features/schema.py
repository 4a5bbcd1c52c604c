"""The feature schema: named columns, what kind each is, how a missing value is filled.

A schema turns a named row (`{"amount": 12.5, "country": "FR"}`) into the model's raw
input vector, one float per input column, and back. The raw vector keeps one slot per
column, not per one-hot bucket: numbers as they came (missing ones filled), booleans as
0/1, categories as integer codes (`vocabulary[i]` is code `i + 1`; code 0 is the unknown
bucket). Scaling, one-hot and embeddings happen inside the model (`flywheel.modelspec`),
so the stored examples, the Kafka events and the analyzer all see this one narrow form,
and every version of a lineage reads it the same way: the vocabulary is fixed at `init`.

Why fill before the model rather than carry NaN into it: the raw vector travels as JSON
(Kafka events, the store's `features` column), where NaN is not a number. The fill is
the schema's (the training mean, the most common boolean, or the unknown bucket), the
same everywhere the schema is used.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

FORMAT: Literal["flywheel-schema/1"] = "flywheel-schema/1"
UNKNOWN = 0  # the code of the unknown bucket; vocabulary[i] is code i + 1
MAX_VOCABULARY = 1000  # default cap: rarer categories share the unknown bucket
MAX_FEATURES = 10_000
FLOAT32_LIMIT = 3.4e38  # a larger number would not survive the cast to float32

Kind = Literal["numeric", "categorical", "boolean", "ignore"]


class FeatureError(ValueError):
    """A value that does not fit the schema: names the row and the field.

    >>> print(FeatureError("is missing", row=3, field="country"))
    instances[3].country: is missing
    """

    def __init__(
        self, message: str, *, row: int | None = None, field: str | None = None, where: str = ""
    ) -> None:
        self.message, self.row, self.field = message, row, field
        place = where or "instances"
        if row is not None:
            place += f"[{row}]"
        if field is not None:
            place += f".{field}"
        super().__init__(f"{place}: {message}")


class Feature(BaseModel):
    """One named column and how it becomes a raw input slot.

    `missing`: "fill" puts `fill` in a missing value's place; "error" refuses the row.
    `mean`/`std` (numeric) scale the column inside the model. `reason` says why `init`
    inferred this kind, for the person reviewing the schema file.

    >>> Feature(name="country", kind="categorical", vocabulary=["DE", "FR"]).code("FR")
    2
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    kind: Kind
    missing: Literal["fill", "error"] = "fill"
    fill: float | bool | str | None = None
    mean: float = 0.0
    std: float = Field(default=1.0, gt=0)
    vocabulary: list[str] = Field(default_factory=list)
    reason: str = ""

    @model_validator(mode="after")
    def _check(self) -> Feature:
        if self.kind == "categorical":
            if len(set(self.vocabulary)) != len(self.vocabulary):
                raise ValueError(f"feature {self.name!r}: vocabulary has duplicates")
            if self.fill is not None and self.fill not in self.vocabulary:
                raise ValueError(
                    f"feature {self.name!r}: fill {self.fill!r} is not in its vocabulary "
                    "(use null for the unknown bucket)"
                )
        elif self.vocabulary:
            raise ValueError(f"feature {self.name!r}: only a categorical has a vocabulary")
        if self.kind == "numeric":
            if isinstance(self.fill, (bool, str)):
                raise ValueError(f"feature {self.name!r}: a numeric fill must be a number")
            if not math.isfinite(self.mean) or (
                self.fill is not None and not math.isfinite(float(self.fill))
            ):
                raise ValueError(f"feature {self.name!r}: mean and fill must be finite")
        if self.kind == "boolean" and self.fill is not None and not isinstance(self.fill, bool):
            raise ValueError(f"feature {self.name!r}: a boolean fill must be true or false")
        return self

    def code(self, value: str) -> int:
        """The category code of `value` (0, the unknown bucket, if not in the vocabulary)."""
        try:
            return self.vocabulary.index(value) + 1
        except ValueError:
            return UNKNOWN

    def fill_value(self) -> float:
        """The raw slot a missing value becomes."""
        if self.kind == "categorical":
            return float(self.code(self.fill)) if isinstance(self.fill, str) else float(UNKNOWN)
        if self.kind == "boolean":
            return 1.0 if self.fill else 0.0
        return float(self.mean if self.fill is None else self.fill)


class FeatureSchema(BaseModel):
    """Named input columns, the label column and its classes: the contract of one lineage.

    >>> schema = FeatureSchema(
    ...     label="fraud",
    ...     labels=["no", "yes"],
    ...     features=[
    ...         Feature(name="amount", kind="numeric", mean=20.0, std=5.0),
    ...         Feature(name="country", kind="categorical", vocabulary=["DE", "FR"]),
    ...         Feature(name="mobile", kind="boolean", fill=False),
    ...     ],
    ... )
    >>> enc = schema.encode_rows([{"amount": 12.5, "country": "FR", "mobile": True},
    ...                           {"country": "JP"}])
    >>> enc.x.tolist(), enc.unknown
    ([[12.5, 2.0, 1.0], [20.0, 0.0, 0.0]], {'country': 1})
    >>> schema.decode(enc.x[0])
    {'amount': 12.5, 'country': 'FR', 'mobile': True}
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["flywheel-schema/1"] = FORMAT
    label: str = Field(min_length=1, max_length=200)
    labels: list[str] = Field(min_length=2)
    features: list[Feature] = Field(min_length=1, max_length=MAX_FEATURES)
    max_vocabulary: int = Field(default=MAX_VOCABULARY, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _check(self) -> FeatureSchema:
        names = [f.name for f in self.features]
        dup = sorted(n for n, c in Counter(names).items() if c > 1)
        if dup:
            raise ValueError(f"feature names must be unique; repeated: {dup}")
        if self.label in names:
            raise ValueError(f"the label column {self.label!r} cannot also be a feature")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, got {self.labels}")
        if not self.inputs:
            raise ValueError("every feature is ignored: the model would have no input")
        too_big = [f.name for f in self.features if len(f.vocabulary) > self.max_vocabulary]
        if too_big:
            raise ValueError(f"vocabulary over max_vocabulary={self.max_vocabulary}: {too_big}")
        return self

    # ---- shape -----------------------------------------------------------------------------
    @property
    def inputs(self) -> list[Feature]:
        """The features the model reads, in raw-vector order (ignored columns left out)."""
        return [f for f in self.features if f.kind != "ignore"]

    @property
    def input_dim(self) -> int:
        return len(self.inputs)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.inputs]

    @property
    def categorical(self) -> list[int]:
        """Raw-vector positions of the categorical inputs."""
        return [i for i, f in enumerate(self.inputs) if f.kind == "categorical"]

    @property
    def numeric_only(self) -> bool:
        """True when every input is a number, so a plain float vector is a valid row."""
        return all(f.kind == "numeric" for f in self.inputs)

    def fingerprint(self) -> str:
        """A short stable hash of the schema's JSON (what a version is tagged with)."""
        import hashlib

        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    # ---- rows ------------------------------------------------------------------------------
    def encode_rows(
        self, rows: Sequence[Mapping[str, Any]], *, where: str = "instances"
    ) -> Encoded:
        """Raw vectors for named rows; `FeatureError` names the first bad row and field.

        A key the schema does not know is refused (a typo would otherwise be a silently
        filled feature); an ignored column is accepted and dropped. An unseen category
        goes to the unknown bucket and is counted in `Encoded.unknown`. Callers that
        encode many small batches keep a `row_encoder()` instead.
        """
        return self.row_encoder()(rows, where=where)

    def row_encoder(self) -> RowEncoder:
        """`encode_rows`, compiled once: building the per-feature encoders (a category
        lookup table each) cost ~80 us for 8 numeric and 4 categorical features, ~40 % of
        a one-row predict request, so the service builds one per served version."""
        return RowEncoder(self)

    def encode_vectors(
        self, rows: Sequence[Sequence[float]], *, where: str = "instances"
    ) -> np.ndarray:
        """Plain float vectors, for an all-numeric schema (checked for width)."""
        import numpy as np

        if not self.numeric_only:
            raise FeatureError(
                f"this model has non-numeric features ({self._non_numeric()}): "
                "send named rows, not vectors",
                where=where,
            )
        for i, row in enumerate(rows):
            if len(row) != self.input_dim:
                raise FeatureError(
                    f"has {len(row)} values; expected {self.input_dim} ({self.names})",
                    row=i,
                    where=where,
                )
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), self.input_dim)

    def encode_table(self, table: pa.Table | pa.RecordBatch, *, first_row: int = 0) -> Encoded:
        """Raw vectors for a pyarrow table whose columns are named as the features.

        Vectorized (pyarrow compute), for data-set import and clients: a 1 M-row table of
        8 numeric and 4 categorical columns encodes in well under a second. A column of
        the wrong type raises `FeatureError` naming the column and its first bad row
        (counted from `first_row`).
        """
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        n = table.num_rows
        x = np.empty((n, self.input_dim), dtype=np.float32)
        unknown: dict[str, int] = {}
        present = set(table.schema.names)
        for j, f in enumerate(self.inputs):
            if f.name not in present:
                if f.missing == "error":
                    raise FeatureError("column is missing", field=f.name, where="data")
                x[:, j] = f.fill_value()
                continue
            col = table.column(f.name)
            if isinstance(col, pa.ChunkedArray):
                col = col.combine_chunks()
            nulls = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            if f.missing == "error" and nulls.any():
                raise FeatureError(
                    "is missing", row=first_row + int(nulls.argmax()), field=f.name, where="data"
                )
            if f.kind == "categorical":
                text = _as_text(col)
                codes = pc.index_in(text, value_set=pa.array(f.vocabulary, pa.string()))
                codes = np.array(
                    pc.fill_null(pc.add(codes, 1), UNKNOWN).to_numpy(zero_copy_only=False)
                )
                missed = (codes == UNKNOWN) & ~nulls
                if missed.any():
                    unknown[f.name] = int(missed.sum())
                x[:, j] = codes
                x[nulls, j] = f.fill_value()
                continue
            try:
                values = _as_bool(col) if f.kind == "boolean" else pc.cast(col, pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, _Bad) as exc:
                bad = _first_bad_row(col, f.kind)
                raise FeatureError(
                    f"expected {f.kind} values ({exc})".replace("\n", " "),
                    row=None if bad is None else first_row + bad,
                    field=f.name,
                    where="data",
                ) from None
            arr = np.array(values.to_numpy(zero_copy_only=False), dtype=np.float64)
            arr[nulls] = f.fill_value()
            if not np.isfinite(arr).all():
                raise FeatureError(
                    "is not a finite number",
                    row=first_row + int((~np.isfinite(arr)).argmax()),
                    field=f.name,
                    where="data",
                )
            x[:, j] = arr
        return Encoded(x, unknown)

    def labels_of(self, values: Sequence[Any]) -> list[int]:
        """Label indices for label values (compared as text)."""
        index = {name: i for i, name in enumerate(self.labels)}
        out = []
        for i, v in enumerate(values):
            key = label_text(v)
            if key not in index:
                raise FeatureError(
                    f"label {key!r} is not one of {self.labels}", row=i, field=self.label
                )
            out.append(index[key])
        return out

    def decode(self, vector: Sequence[float]) -> dict[str, Any]:
        """The named row a raw vector stands for (a filled value reads as its fill)."""
        row: dict[str, Any] = {}
        for f, v in zip(self.inputs, vector, strict=True):
            if f.kind == "categorical":
                code = int(round(float(v)))
                row[f.name] = f.vocabulary[code - 1] if 1 <= code <= len(f.vocabulary) else None
            elif f.kind == "boolean":
                row[f.name] = bool(float(v) >= 0.5)
            else:
                row[f.name] = float(v)
        return row

    # ---- helpers ---------------------------------------------------------------------------
    def _non_numeric(self) -> list[str]:
        return [f.name for f in self.inputs if f.kind != "numeric"]

    def _known(self) -> frozenset[str]:
        return frozenset(f.name for f in self.features)

    def _encoders(self) -> list[tuple[str, Callable[[Any], float]]]:
        return [(f.name, _encoder(f)) for f in self.inputs]


@dataclass(frozen=True)
class Encoded:
    """Raw input vectors and, per feature, how many values fell into the unknown bucket."""

    x: np.ndarray
    unknown: dict[str, int] = field(default_factory=dict)


class RowEncoder:
    """Named rows to raw vectors for one schema, with its encoders built once.

    >>> schema = FeatureSchema(label="y", labels=["a", "b"], features=[
    ...     Feature(name="n", kind="numeric", mean=1.0),
    ...     Feature(name="c", kind="categorical", vocabulary=["u"], missing="error")])
    >>> encode = schema.row_encoder()
    >>> encode([{"c": "u"}, {"n": 3, "c": "w"}]).x.tolist()
    [[1.0, 1.0], [3.0, 0.0]]
    >>> encode([{"n": 2}])
    Traceback (most recent call last):
    ...
    flywheel.features.schema.FeatureError: instances[0].c: is missing (this feature has no fill)
    """

    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self._known = schema._known()
        # (name, kind, category codes, the encoder): the common values (a finite float, a
        # known category, true/false) are taken inline, ~2x faster than calling the
        # encoder for each; any other value goes through the encoder, which decides
        self._plan = [
            (f.name, f.kind, _codes(f), encode)
            for f, (_, encode) in zip(schema.inputs, schema._encoders(), strict=True)
        ]

    def __call__(self, rows: Sequence[Mapping[str, Any]], *, where: str = "instances") -> Encoded:
        import numpy as np

        plan, known = self._plan, self._known
        out: list[list[float]] = []
        unknown: dict[str, int] = {}
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise FeatureError("must be an object of named features", row=i, where=where)
            if not known.issuperset(row):
                extra = next(k for k in row if k not in known)
                raise FeatureError(
                    f"unknown feature; the model's features are {self.schema.names}",
                    row=i,
                    field=str(extra),
                    where=where,
                )
            vector: list[float] = []
            append = vector.append
            for name, kind, codes, encode in plan:
                v = row.get(name)
                if kind == "numeric":
                    if type(v) is float and -FLOAT32_LIMIT <= v <= FLOAT32_LIMIT:  # not NaN
                        append(v)
                        continue
                elif kind == "categorical":
                    if type(v) is str:
                        code = codes.get(v)
                        if code is not None:
                            append(code)
                            continue
                elif v is True or v is False:
                    append(1.0 if v else 0.0)
                    continue
                try:
                    append(encode(v))
                except _Unknown:
                    append(UNKNOWN)
                    unknown[name] = unknown.get(name, 0) + 1
                except _Bad as exc:
                    raise FeatureError(str(exc), row=i, field=name, where=where) from None
            out.append(vector)
        x = np.array(out, dtype=np.float32).reshape(len(out), len(plan))
        return Encoded(x, unknown)


class _Bad(ValueError):
    pass


class _Unknown(Exception):
    pass


_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})


def label_text(value: Any) -> str:
    """A label value as the text the model names it by (`1.0` and `1` are both "1")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _codes(f: Feature) -> dict[str, float]:
    """A categorical feature's code per category (`vocabulary[i]` is code i + 1)."""
    return {name: float(i + 1) for i, name in enumerate(f.vocabulary)}


def _encoder(f: Feature) -> Callable[[Any], float]:
    fill = f.fill_value()
    required = f.missing == "error"

    def missing() -> float:
        if required:
            raise _Bad("is missing (this feature has no fill)")
        return fill

    if f.kind == "numeric":

        def numeric(v: Any) -> float:
            if v is None:
                return missing()
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _Bad(f"expected a number, got {type(v).__name__} {v!r:.40}")
            try:
                out = float(v)
            except OverflowError:  # an integer beyond float range
                out = math.inf
            if not math.isfinite(out) or abs(out) > FLOAT32_LIMIT:
                raise _Bad(f"{v!r} is not a finite float32 number")
            return out

        return numeric
    if f.kind == "boolean":

        def boolean(v: Any) -> float:
            if v is None:
                return missing()
            if not isinstance(v, bool):
                raise _Bad(f"expected true or false, got {type(v).__name__} {v!r:.40}")
            return 1.0 if v else 0.0

        return boolean
    codes = _codes(f)

    def categorical(v: Any) -> float:
        if v is None:
            return missing()
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise _Bad(f"expected a category (text), got {type(v).__name__} {v!r:.40}")
        code = codes.get(v if isinstance(v, str) else str(v))
        if code is None:
            raise _Unknown
        return code

    return categorical


def _as_text(col: pa.Array) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_floating(col.type):  # 3.0 reads as "3", as `label_text` does
        ints = pc.cast(col, pa.int64(), safe=False)
        whole = pc.equal(pc.cast(ints, pa.float64()), col)
        return pc.if_else(whole, pc.cast(ints, pa.string()), pc.cast(col, pa.string()))
    if pa.types.is_boolean(col.type):
        return pc.if_else(col, "true", "false")
    return pc.cast(col, pa.string())


def _as_bool(col: pa.Array) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_boolean(col.type):
        return col
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        if pc.all(pc.is_in(col, value_set=pa.array([0, 1], col.type))).as_py() not in (
            True,
            None,
        ):
            raise _Bad("numbers other than 0 and 1")
        return pc.cast(col, pa.bool_())
    text = pc.utf8_lower(pc.cast(col, pa.string()))
    true = pc.is_in(text, value_set=pa.array(sorted(_TRUE)))
    false = pc.is_in(text, value_set=pa.array(sorted(_FALSE)))
    if pc.all(pc.or_(pc.or_(true, false), pc.is_null(text))).as_py() not in (True, None):
        raise _Bad("text other than true/false/yes/no/1/0")
    return pc.if_else(pc.is_null(text), None, true)


def _first_bad_row(col: pa.Array, kind: Kind) -> int | None:
    """The first row whose value cannot be read as `kind` (None if none is found)."""
    import pyarrow as pa

    for i, v in enumerate(col.to_pylist()):
        if v is None:
            continue
        try:
            if kind == "boolean":
                _as_bool(pa.array([v]))
            else:
                float(v)
        except (ValueError, TypeError, _Bad, pa.ArrowInvalid):
            return i
    return None
