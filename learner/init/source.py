"""A data set file read in chunks: CSV (comma or tab, optionally gzip) and Parquet.

Memory is bounded by the chunk, not the file: CSV goes through pyarrow's streaming
reader (`pyarrow.csv.open_csv`, blocks of `BLOCK_SIZE` bytes), Parquet through
`ParquetFile.iter_batches` (a row group's compressed column chunks at a time), and each
batch is cut into chunks of at most `rows` rows. So a file larger than RAM is read like
a small one, once per pass.

CSV values are read as text, every column, and typed by the caller (`columns.py`):
pyarrow's streaming reader infers each column's type from the first block and raises
`ArrowInvalid`, without a row number, when a later block does not fit ("CSV conversion
error to int64: invalid value 'x1'"). Reading text and converting ourselves is what lets
an error name its row; the conversion (`pyarrow.compute.cast`) is the same C++ pyarrow
would run. Text is trimmed of surrounding blanks, and `NULL_VALUES` (and blank fields)
read as missing. What still fails inside the reader (a row with the wrong number of
fields, bytes that are not UTF-8) is located by re-reading the file with Python's `csv`
module, on the error path only.

Rows are counted as `Chunk.first_row` + position: data rows from 0 after the header, in
the order the file holds them (a quoted newline does not start a row). Errors add 1.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from flywheel.learner.init.errors import InitError

if TYPE_CHECKING:
    import pyarrow as pa

BLOCK_SIZE = 4 << 20  # CSV bytes pyarrow parses at a time (its default is 1 MiB)
NULL_VALUES = ["", "NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "#N/A"]
# suffix -> (format, delimiter, gzip)
SUFFIXES: dict[str, tuple[Literal["csv", "parquet"], str, bool]] = {
    ".csv": ("csv", ",", False),
    ".tsv": ("csv", "\t", False),
    ".csv.gz": ("csv", ",", True),
    ".tsv.gz": ("csv", "\t", True),
    ".parquet": ("parquet", "", False),
    ".pq": ("parquet", "", False),
}
Progress = Callable[[int], None]  # called with the work done so far (see `progress_total`)


@dataclass(frozen=True)
class Chunk:
    """Consecutive rows of the file: `batch` holds rows `first_row` ... (0-based)."""

    first_row: int
    batch: pa.RecordBatch


def suffix_of(path: Path) -> str:
    """The suffix `SUFFIXES` knows `path` by ("" if none): `.csv.gz` counts as one."""
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


class DataFile:
    """One data set file: its columns, its chunks, its fingerprint.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "d.csv"
    >>> _ = path.write_text("amount,country,y\\n1.5, FR ,a\\n,DE,b\\n")
    >>> data = DataFile.open(path)
    >>> data.columns, data.format
    (['amount', 'country', 'y'], 'csv')
    >>> [c.batch.to_pydict() for c in data.chunks(["amount", "country", "y"], rows=10)]
    [{'amount': ['1.5', None], 'country': ['FR', 'DE'], 'y': ['a', 'b']}]
    """

    def __init__(
        self,
        path: Path,
        fmt: Literal["csv", "parquet"],
        delimiter: str,
        compressed: bool,
        columns: list[str],
        total_rows: int | None,
    ) -> None:
        self.path = path
        self.format = fmt
        self.delimiter = delimiter
        self.compressed = compressed
        self.columns = columns
        self.total_rows = total_rows  # Parquet: from the footer; CSV: unknown before reading
        self._stamp = self.stamp()

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path) -> DataFile:
        """Check the file exists, has a known suffix and a header; InitError otherwise."""
        if not path.exists():
            raise InitError("no such file", path=path)
        if not path.is_file():
            raise InitError("is not a file", path=path)
        suffix = suffix_of(path)
        if suffix not in SUFFIXES:
            known = ", ".join(sorted(SUFFIXES))
            raise InitError(
                f"unknown file type {''.join(path.suffixes) or '(no suffix)'!r}; "
                f"expected one of {known}",
                path=path,
            )
        if path.stat().st_size == 0:
            raise InitError("is empty (0 bytes)", path=path)
        fmt, delimiter, compressed = SUFFIXES[suffix]
        if fmt == "parquet":
            return cls._open_parquet(path)
        columns = _csv_header(path, delimiter, compressed)
        return cls(path, fmt, delimiter, compressed, columns, None)

    @classmethod
    def _open_parquet(cls, path: Path) -> DataFile:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InitError(f"not a readable Parquet file ({_one_line(exc)})", path=path) from None
        columns = list(meta.schema_arrow.names)
        if not columns:
            raise InitError("has no columns", path=path)
        _check_names(columns, path)
        return cls(path, "parquet", "", False, columns, int(meta.metadata.num_rows))

    # ---- identity --------------------------------------------------------------------------
    def stamp(self) -> tuple[int, int]:
        """(size, modification time): what tells a file changed between two passes."""
        st = self.path.stat()
        return st.st_size, st.st_mtime_ns

    def check_unchanged(self) -> None:
        if self.stamp() != self._stamp:
            raise InitError(
                "changed while it was being read; import a file nobody is writing", path=self.path
            )

    def fingerprint(self) -> str:
        """SHA-256 of the file's bytes as stored (compressed ones included), hex.

        Streamed in 1 MiB reads (~1 GB/s here: a second per GB); `hashlib` releases the
        GIL, so this runs beside the import on another thread.
        """
        digest = hashlib.sha256()
        with self.path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()

    @property
    def progress_total(self) -> int:
        """What `Progress` counts to: bytes of the file (CSV) or rows (Parquet)."""
        if self.format == "parquet":
            return self.total_rows or 0
        return self._stamp[0]

    @property
    def rows_word(self) -> str:
        """How the errors count rows, for the docs and the CLI."""
        if self.format == "csv":
            return "data rows counted from 1 after the header"
        return "rows counted from 1"

    # ---- chunks ----------------------------------------------------------------------------
    def chunks(
        self, columns: Sequence[str], *, rows: int, progress: Progress | None = None
    ) -> Iterator[Chunk]:
        """`columns` (in that order) in chunks of at most `rows` rows; CSV as trimmed text."""
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise InitError(
                f"no column {missing[0]!r}; the columns are {self.columns}", path=self.path
            )
        if self.format == "parquet":
            yield from self._parquet_chunks(columns, rows, progress)
        else:
            yield from self._csv_chunks(columns, rows, progress)

    def _parquet_chunks(
        self, columns: Sequence[str], rows: int, progress: Progress | None
    ) -> Iterator[Chunk]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        first = 0
        try:
            with pq.ParquetFile(self.path) as f:
                for batch in f.iter_batches(batch_size=rows, columns=list(columns)):
                    yield Chunk(first, batch)
                    first += batch.num_rows
                    if progress:
                        progress(first)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InitError(
                f"cannot be read past row {first} ({_one_line(exc)})", path=self.path
            ) from None

    def _csv_chunks(
        self, columns: Sequence[str], rows: int, progress: Progress | None
    ) -> Iterator[Chunk]:
        import pyarrow as pa
        import pyarrow.csv as pcsv

        raw = pa.OSFile(str(self.path), "rb")
        stream: pa.NativeFile = pa.CompressedInputStream(raw, "gzip") if self.compressed else raw
        first = 0
        try:
            try:
                reader = pcsv.open_csv(
                    stream,
                    read_options=pcsv.ReadOptions(block_size=BLOCK_SIZE),
                    parse_options=pcsv.ParseOptions(delimiter=self.delimiter),
                    convert_options=pcsv.ConvertOptions(
                        column_types={name: pa.string() for name in columns},
                        include_columns=list(columns),
                        null_values=NULL_VALUES,
                        strings_can_be_null=True,
                        quoted_strings_can_be_null=True,
                    ),
                )
                for batch in reader:
                    batch = _trimmed(batch)
                    for start in range(0, batch.num_rows, rows):
                        part = batch.slice(start, rows)
                        yield Chunk(first, part)
                        first += part.num_rows
                    if progress:
                        progress(raw.tell())
            except pa.ArrowInvalid as exc:
                raise self._located(exc, first) from None
        finally:
            stream.close()

    def _located(self, exc: Exception, after: int) -> InitError:
        """The reader failed in the block after row `after`: find the row and column."""
        found = _first_bad_record(self.path, self.delimiter, self.compressed, len(self.columns))
        if found is not None:
            row, column, why = found
            name = self.columns[column] if column is not None else None
            return InitError(why, path=self.path, row=row, column=name)
        return InitError(
            f"cannot be read after row {after} ({_one_line(exc)})", path=self.path, row=None
        )


def _trimmed(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Text with surrounding blanks removed; a blank field is missing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arrays = []
    for col in batch.columns:
        text = pc.utf8_trim_whitespace(col)
        arrays.append(pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text))
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _text_stream(path: Path, compressed: bool) -> io.TextIOBase:
    """The file as text; bytes that are not UTF-8 become lone surrogates, to be found."""
    raw = gzip.open(path, "rb") if compressed else path.open("rb")  # noqa: SIM115 (wrapped)
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _csv_header(path: Path, delimiter: str, compressed: bool) -> list[str]:
    try:
        with _text_stream(path, compressed) as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except (OSError, EOFError, csv.Error) as exc:
        raise InitError(f"cannot be read ({_one_line(exc)})", path=path) from None
    if header is None or not [h for h in header if h.strip()]:
        raise InitError("has no header row (it is empty or blank)", path=path)
    names = [h.strip() for h in header]
    bad = [i for i, n in enumerate(names) if not n]
    if bad:
        raise InitError(f"header field {bad[0] + 1} has no column name", path=path, row=0)
    if any("\udc80" <= ch <= "\udcff" for n in names for ch in n):
        raise InitError("the header is not UTF-8 text", path=path)
    _check_names(names, path)
    return names


def _check_names(names: list[str], path: Path) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InitError(f"the column name {name!r} appears twice in the header", path=path)
        seen.add(name)


def _first_bad_record(
    path: Path, delimiter: str, compressed: bool, width: int
) -> tuple[int, int | None, str] | None:
    """(row from 1, column index or None, why) of the first record pyarrow cannot read:
    a wrong number of fields, or bytes that are not UTF-8. Python's `csv`, so slow
    (~50 MB/s): only ever on the error path."""
    with _text_stream(path, compressed) as f:
        records = csv.reader(f, delimiter=delimiter)
        next(records, None)  # the header
        row = 0
        for record in records:
            if not record:
                continue  # a blank line is not a row (pyarrow skips them too)
            row += 1
            if len(record) != width:
                return row, None, f"has {len(record)} fields, the header has {width}"
            for i, value in enumerate(record):
                if any("\udc80" <= ch <= "\udcff" for ch in value):
                    return row, i, "is not UTF-8 text"
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
