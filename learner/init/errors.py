"""What `flywheel init` says about a bad input: one line naming the file, row and column.

Rows are counted the way a person reads the file: data rows from 1, after the header
(a CSV record that spans lines, because of a quoted newline, is one row; blank lines are
not rows). `FeatureError` (the schema's own errors) counts from 0; `of_feature` converts.
"""

from __future__ import annotations

from pathlib import Path

from flywheel.features import FeatureError


class InitError(ValueError):
    """Bad input to `flywheel init` (a file, a schema, an option): nothing was written.

    >>> print(InitError("is not a number: 'abc'", path="data.csv", row=17, column="amount"))
    data.csv: row 17, column 'amount': is not a number: 'abc'
    >>> print(InitError("is empty", path="data.csv"))
    data.csv: is empty
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.message, self.row, self.column = message, row, column
        self.path = None if path is None else str(path)
        place = [p for p in (self.path,) if p]
        where = []
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        if where:
            place.append(", ".join(where))
        super().__init__(": ".join([*place, message]))

    @classmethod
    def of_feature(cls, exc: FeatureError, path: str | Path | None) -> InitError:
        """The same error with the row counted from 1 (`FeatureError` counts from 0)."""
        row = None if exc.row is None else exc.row + 1
        return cls(exc.message, path=path, row=row, column=exc.field)


class ChampionExists(InitError):
    """The deployment already has a champion (or a trusted set) and no new lineage was asked."""

    def __init__(self, message: str, *, version: str | None) -> None:
        super().__init__(message)
        self.version = version
