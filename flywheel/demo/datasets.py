"""Real labelled data sets that ship inside installed packages, each with a stated drift.

Nothing here reaches the network: every file is package data of river (already a
dependency) or palmerpenguins (an 85 kB wheel, MIT licence, the data CC0). They feed
`python -m bench prequential --datasets ...` and `flywheel demo --dataset NAME`, which
start from a CSV the way a user would (`write_csv`).

| name | package | rows | label (classes) | categorical | drift |
| --- | --- | --- | --- | --- | --- |
| phishing | river | 1,250 | is_phishing (2) | - | labels 0 <-> 1 |
| image_segments | river | 2,310 | category (7) | - | labels sky <-> grass |
| shuttle | river | 49,097 | anomaly (2, 7 % yes) | - | f1 + 3 std |
| solar_flare | river | 1,066 | flare (2, 19 % yes) | 3 of 10 | zurich-class H <-> E |
| penguins | palmerpenguins | 344 | species (3) | island, sex | Adelie <-> Chinstrap |

`load` keeps the file's column names and types (strings stay strings, missing values are
nulls) and a fixed row order: the file's own, or a shuffle with `SHUFFLE_SEED` where the
file is sorted by class (penguins), since a prequential run over a sorted file measures
how fast a learner forgets, not how well it learns. Each `Drift` changes the rows after a
fraction of the stream in one documented way: two labels trade places (the world's
answer changes), two values of a categorical feature trade places, or a numeric feature
moves by k standard deviations (the inputs change, so what the model learned no longer
fits them).

>>> sorted(DATASETS)
['image_segments', 'penguins', 'phishing', 'shuttle', 'solar_flare']
>>> DATASETS["penguins"].categorical
('island', 'sex')
>>> print(DATASETS["penguins"].drift.describe())
after the change, labels 'Adelie' and 'Chinstrap' of species trade places
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import pyarrow as pa

SHUFFLE_SEED = 24  # the fixed order of a data set whose file is sorted by class
NULLS = ["", "NA", "NaN", "nan", "?"]  # what the files write for a missing value

DriftKind = Literal["swap_labels", "swap_categories", "shift_numeric"]
Value = str | int | bool


@dataclass(frozen=True)
class Drift:
    """A stated change of the world, applied to every row after a fraction of the stream.

    * `swap_labels`: the label values `values[0]` and `values[1]` trade places (a
      concept change: the same inputs now mean another class);
    * `swap_categories`: two values of the categorical feature `column` trade places
      (what a category stands for changes);
    * `shift_numeric`: `k` standard deviations (of the rows before the change, nulls
      left out) are added to the numeric feature `column` (the inputs move).

    >>> import pyarrow as pa
    >>> t = pa.table({"y": ["a", "b", "a", "b"], "x": [1.0, 2.0, None, 4.0]})
    >>> Drift("swap_labels", "y", ("a", "b")).apply(t, at=0.5)["y"].to_pylist()
    ['a', 'b', 'b', 'a']
    >>> Drift("shift_numeric", "x", k=2.0).apply(t, at=0.5)["x"].to_pylist()
    [1.0, 2.0, None, 5.414213562373095]
    """

    kind: DriftKind
    column: str
    values: tuple[Value, Value] | None = None
    k: float = 0.0

    def __post_init__(self) -> None:
        swap = self.kind in ("swap_labels", "swap_categories")
        if swap and (self.values is None or len(self.values) != 2):
            raise ValueError(f"a {self.kind} drift needs two values, got {self.values!r}")
        if self.kind == "shift_numeric" and self.k == 0:
            raise ValueError("a shift_numeric drift needs k != 0")

    def describe(self) -> str:
        """One sentence for reports and docs."""
        if self.kind == "shift_numeric":
            return (
                f"after the change, {self.column} moves by {self.k:+g} standard deviations "
                "(of the rows before it)"
            )
        a, b = self.values or ("", "")
        what = "labels" if self.kind == "swap_labels" else "values"
        return f"after the change, {what} {a!r} and {b!r} of {self.column} trade places"

    def start(self, rows: int, at: float) -> int:
        """The first changed row of a stream of `rows` changed after fraction `at`."""
        if not 0.0 < at < 1.0:
            raise ValueError(f"the drift point must be a fraction between 0 and 1, got {at}")
        return round(rows * at)

    def apply(self, table: pa.Table, at: float) -> pa.Table:
        """`table` with rows from `start(len(table), at)` on changed; the rows before are
        untouched and the column keeps its name and place."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.column not in table.column_names:
            raise ValueError(
                f"drift column {self.column!r} is not in the table "
                f"(columns: {', '.join(table.column_names)})"
            )
        first = self.start(table.num_rows, at)
        col = table[self.column].combine_chunks()
        after = pa.array(np.arange(table.num_rows) >= first)
        if self.kind == "shift_numeric":
            if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
                raise ValueError(f"cannot shift {self.column!r}: its type is {col.type}")
            col = col.cast(pa.float64())
            std = pc.stddev(col.slice(0, first), ddof=1).as_py()
            if std is None or std == 0:
                raise ValueError(f"{self.column!r} does not vary before the drift point")
            new = pc.if_else(after, pc.add(col, self.k * std), col)
        else:
            a, b = (pa.scalar(v).cast(col.type) for v in self.values or ())
            is_a = pc.and_(after, pc.fill_null(pc.equal(col, a), False))
            is_b = pc.and_(after, pc.fill_null(pc.equal(col, b), False))
            new = pc.if_else(is_a, b, pc.if_else(is_b, a, col))
        where = table.column_names.index(self.column)
        return table.set_column(where, self.column, new)


@dataclass(frozen=True)
class DatasetInfo:
    """One data set: where its file ships, its label, its categorical columns, its drift.

    `rows` and `classes` are what `load` returns (a test checks them against the file).

    >>> info = DATASETS["solar_flare"]
    >>> info.package, info.label, info.rows, info.classes
    ('river', 'flare', 1066, 2)
    """

    name: str
    label: str
    description: str
    package: str  # the installed package whose data file this is
    source: str  # where the data comes from, and its licence
    rows: int
    classes: int
    categorical: tuple[str, ...]
    drift: Drift
    shuffled: bool  # the file is sorted by class, so `load` shuffles it with SHUFFLE_SEED
    reader: Callable[[], pa.Table] = field(repr=False, compare=False)


def _package_file(package: str, name: str) -> Path:
    """A data file shipped inside an installed package; a clear error if it is missing."""
    try:
        path = Path(str(resources.files(package).joinpath(name)))
    except ModuleNotFoundError:
        raise RuntimeError(
            f"the package {package!r} is not installed; it ships the data file {name!r} "
            f"(pip install {package})"
        ) from None
    if not path.is_file():
        raise RuntimeError(f"{package} does not ship {name!r} (looked for {path})")
    return path


def _read_csv(
    package: str, name: str, types: dict[str, pa.DataType] | None = None, member: str = ""
) -> pa.Table:
    """A CSV (plain, .gz, or `member` of a .zip) from package data, with pyarrow."""
    import pyarrow.csv as pcsv

    path = _package_file(package, name)
    convert = pcsv.ConvertOptions(
        column_types=types or {}, null_values=NULLS, strings_can_be_null=True
    )
    if name.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            data = z.read(member or z.namelist()[0])
        return pcsv.read_csv(io.BytesIO(data), convert_options=convert)
    return pcsv.read_csv(path, convert_options=convert)


def _phishing() -> pa.Table:
    import pyarrow as pa

    floats = [
        "empty_server_form_handler",
        "popup_window",
        "https",
        "request_from_other_domain",
        "anchor_from_other_domain",
        "is_popular",
        "long_url",
    ]
    types = {c: pa.float64() for c in floats}
    types |= {"age_of_domain": pa.int64(), "ip_in_url": pa.int64(), "is_phishing": pa.int64()}
    return _read_csv("river.datasets", "phishing.csv.gz", types)


def _image_segments() -> pa.Table:
    return _read_csv("river.datasets", "segment.csv.zip")


def _shuttle() -> pa.Table:
    return _read_csv("river.datasets", "shuttle.csv.gz")


def _solar_flare() -> pa.Table:
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _read_csv(
        "river.datasets",
        "solar-flare.csv.zip",
        {c: pa.string() for c in ("zurich-class", "largest-spot-size", "spot-distribution")},
    )
    counts = ["c-class-flares", "m-class-flares", "x-class-flares"]
    total = pc.add(pc.add(table[counts[0]], table[counts[1]]), table[counts[2]])
    flare = pc.if_else(pc.greater(total, 0), "yes", "no")
    return table.drop_columns(counts).append_column("flare", flare)


def _penguins() -> pa.Table:
    return _read_csv("palmerpenguins", "data/penguins.csv")


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo(
            name="phishing",
            label="is_phishing",
            description="web pages, phishing or not, from 9 page features (7 graded 0/0.5/1, "
            "2 integers)",
            package="river",
            source="UCI Website Phishing (CC BY 4.0), river.datasets.Phishing",
            rows=1250,
            classes=2,
            categorical=(),
            drift=Drift("swap_labels", "is_phishing", (0, 1)),
            shuffled=False,
            reader=_phishing,
        ),
        DatasetInfo(
            name="image_segments",
            label="category",
            description="3x3 image regions of outdoor pictures, 7 classes from 18 numeric "
            "features, 330 rows each",
            package="river",
            source="UCI Statlog Image Segmentation (CC BY 4.0), river.datasets.ImageSegments",
            rows=2310,
            classes=7,
            categorical=(),
            drift=Drift("swap_labels", "category", ("sky", "grass")),
            shuffled=False,
            reader=_image_segments,
        ),
        DatasetInfo(
            name="shuttle",
            label="anomaly",
            description="NASA space shuttle sensor readings (9 integers); the rare classes "
            "are anomalies (7 %)",
            package="river",
            source="UCI Statlog Shuttle as in the ODDS benchmark (CC BY 4.0), "
            "river.datasets.Shuttle",
            rows=49097,
            classes=2,
            categorical=(),
            drift=Drift("shift_numeric", "f1", k=3.0),
            shuffled=False,
            reader=_shuttle,
        ),
        DatasetInfo(
            name="solar_flare",
            label="flare",
            description="sunspot groups (3 categorical and 7 integer-coded features); label: "
            "any C, M or X class flare in the next 24 h (19 % yes), from the three counts "
            "the file has, which are dropped",
            package="river",
            source="UCI Solar Flare (CC BY 4.0), river.datasets.SolarFlare",
            rows=1066,
            classes=2,
            categorical=("zurich-class", "largest-spot-size", "spot-distribution"),
            drift=Drift("swap_categories", "zurich-class", ("H", "E")),
            shuffled=False,
            reader=_solar_flare,
        ),
        DatasetInfo(
            name="penguins",
            label="species",
            description="Palmer Station penguins: species from island, sex, year and 4 body "
            "measurements (11 rows with missing values)",
            package="palmerpenguins",
            source="Gorman, Williams and Fraser 2014, Palmer Station LTER (CC0); "
            "palmerpenguins (MIT)",
            rows=344,
            classes=3,
            categorical=("island", "sex"),
            drift=Drift("swap_labels", "species", ("Adelie", "Chinstrap")),
            shuffled=True,
            reader=_penguins,
        ),
    )
}


def info(name: str) -> DatasetInfo:
    """The registry entry for `name`; ValueError naming the choices for an unknown one."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown data set {name!r}; choose from {', '.join(sorted(DATASETS))}"
        ) from None


def load(name: str) -> pa.Table:
    """The data set as one table in its fixed order: the features under their own names
    and the label column `DATASETS[name].label` (where the file has it).

    >>> t = load("penguins")
    >>> t.num_rows, t.column_names
    (344, ['species', 'island', 'bill_length_mm', 'bill_depth_mm', 'flipper_length_mm',
           'body_mass_g', 'sex', 'year'])
    >>> t["sex"].null_count, str(t["island"].type)
    (11, 'string')
    """
    d = info(name)
    table = d.reader()
    if d.shuffled:
        import numpy as np

        order = np.random.default_rng(SHUFFLE_SEED).permutation(table.num_rows)
        table = table.take(order)
    return table.combine_chunks()


def write_csv(name: str, path: str | Path, drift_at: float | None = None) -> Path:
    """Write the data set's stream (its fixed order, with its drift applied after fraction
    `drift_at` if given) to the CSV file `path`; a null is an empty field.

    >>> import pyarrow.csv as pcsv
    >>> out = write_csv("penguins", "penguins.csv", drift_at=0.5)
    >>> back = pcsv.read_csv(out)
    >>> back.num_rows, back["species"][:172].equals(load("penguins")["species"][:172])
    (344, True)
    """
    import pyarrow.csv as pcsv

    table = load(name)
    if drift_at is not None:
        table = DATASETS[name].drift.apply(table, drift_at)
    path = Path(path)
    pcsv.write_csv(table, path)
    return path
