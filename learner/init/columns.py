"""Typing a CSV's text columns: numbers or text, decided once per column, errors row-exact.

`DataFile` hands CSV values over as text (see source.py for why). Pass 1 decides each
column from the first chunk in which it has a value:
- every value there reads as a number → numeric, and from then on every value must
  (a later one that does not is "a column whose type changes mid-file": an error naming
  its row, since the schema would otherwise change under the data already read);
- at least `NUMERIC_SHARE` (90 %) of them read as numbers, but not all → an error
  naming the first one that does not ("unparseable value"): a column of amounts with one
  typo must not silently become a column of categories;
- otherwise → text (categorical or boolean, as `infer_schema` decides).
A column that really is text with mostly numeric-looking values (zip codes, product codes)
is declared `categorical` in a reviewed schema (`--schema`), which pass 2 reads as text.

Numbers are what pyarrow's cast from text to float64 accepts ("12", "-1.5e3", "inf");
"1,5" or "1 000" are not numbers.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.learner.init.errors import InitError
from flywheel.learner.init.source import Chunk

if TYPE_CHECKING:
    import pyarrow as pa

NUMERIC_SHARE = 0.9
# what a number looks like, for finding the first value that is not one (the error path)
_NUMBER = r"^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|infinity|nan)$"


class NotNumbers(ValueError):
    """A text column that is not all numbers: where the first non-number is, and how
    many of the values are numbers."""

    def __init__(self, index: int, value: str, share: float) -> None:
        super().__init__(f"{value!r} is not a number")
        self.index, self.value, self.share = index, value, share


def to_numbers(col: pa.Array) -> pa.Array:
    """`col` (text) as float64; NotNumbers names the first value that is not a number."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return pc.cast(col, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    looks = pc.match_substring_regex(col, _NUMBER, ignore_case=True)
    numeric = np.asarray(pc.fill_null(looks, False).to_numpy(zero_copy_only=False), dtype=bool)
    bad = valid & ~numeric
    if not bad.any():  # the regex and the cast disagree: ask the cast, value by value
        for i, value in enumerate(col.to_pylist()):
            try:
                pc.cast(pa.array([value], pa.string()), pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                bad[i] = True
                break
    index = int(bad.argmax())
    share = float((valid & ~bad).sum()) / max(int(valid.sum()), 1)
    raise NotNumbers(index, str(col[index].as_py()), share)


class CsvTypes:
    """Pass 1 over a CSV: each chunk's columns typed as `infer_schema` should see them.

    >>> import pyarrow as pa
    >>> from flywheel.learner.init.source import Chunk
    >>> types = CsvTypes("d.csv", label="y")
    >>> batch = pa.record_batch({"n": ["1", "2.5"], "c": ["FR", "7"], "y": ["a", "b"]})
    >>> types.typed(Chunk(0, batch)).to_pydict()
    {'n': [1.0, 2.5], 'c': ['FR', '7'], 'y': ['a', 'b']}
    >>> types.typed(Chunk(2, pa.record_batch({"n": ["x"], "c": ["DE"], "y": ["a"]})))
    Traceback (most recent call last):
    ...
    flywheel.learner.init.errors.InitError: d.csv: row 3, column 'n': the column held numbers \
up to here (from row 1), then 'x', which is not a number; fix the value, or declare the \
column categorical in a schema file (--schema)
    """

    def __init__(self, path: str | Path, *, label: str, ignore: Collection[str] = ()) -> None:
        self.path = path
        self.label = label
        self.ignore = frozenset(ignore)
        self.kinds: dict[str, tuple[str, int]] = {}  # column -> (numeric | text, first row)

    def typed(self, chunk: Chunk) -> pa.RecordBatch:
        import pyarrow as pa

        batch = chunk.batch
        arrays = []
        for name in batch.schema.names:
            col = batch.column(name)
            if name == self.label:
                arrays.append(col)
            elif name in self.ignore:
                arrays.append(pa.nulls(len(col), pa.string()))
            else:
                arrays.append(self._column(name, col, chunk.first_row))
        return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)

    def _column(self, name: str, col: pa.Array, first_row: int) -> pa.Array:
        known = self.kinds.get(name)
        if known is None:
            if col.null_count == len(col):
                return col  # nothing to decide from yet
            try:
                numbers = to_numbers(col)
            except NotNumbers as exc:
                if exc.share >= NUMERIC_SHARE:
                    raise InitError(
                        f"{exc.value!r} is not a number, but {exc.share:.0%} of this column's "
                        "values are; fix the value, or declare the column categorical in a "
                        "schema file (--schema)",
                        path=self.path,
                        row=first_row + exc.index + 1,
                        column=name,
                    ) from None
                self.kinds[name] = ("text", first_row)
                return col
            self.kinds[name] = ("numeric", first_row)
            return numbers
        kind, since = known
        if kind == "text":
            return col
        try:
            return to_numbers(col)
        except NotNumbers as exc:
            raise InitError(
                f"the column held numbers up to here (from row {since + 1}), then "
                f"{exc.value!r}, which is not a number; fix the value, or declare the column "
                "categorical in a schema file (--schema)",
                path=self.path,
                row=first_row + exc.index + 1,
                column=name,
            ) from None


def numeric_columns(chunk: Chunk, numeric: Sequence[str], path: str | Path) -> pa.RecordBatch:
    """Pass 2 over a CSV: the schema's numeric columns as float64 (others stay text);
    InitError names the first value that is not a number."""
    import pyarrow as pa

    batch = chunk.batch
    wanted = set(numeric)
    arrays = []
    for name in batch.schema.names:
        col = batch.column(name)
        if name in wanted:
            try:
                col = to_numbers(col)
            except NotNumbers as exc:
                raise InitError(
                    f"{exc.value!r} is not a number (the schema says this column is numeric)",
                    path=path,
                    row=chunk.first_row + exc.index + 1,
                    column=name,
                ) from None
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)
