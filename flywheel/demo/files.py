"""The demo's files: a trusted CSV that `init` imports and a live stream CSV the app reads.

`flywheel demo` starts the way a user starts: with files. It writes them under
`FLYWHEEL_HOME/demo/`, imports the trusted one with the same `run_init` that
`flywheel init --public` runs, and the simulated app reads the stream one row by row and
sends each row by its column names through `flywheel.client.Client`.

* default (synthetic): the trusted file is the synthetic seed data (river's RandomRBF,
  x0..x7, labels class_0..2; the file `ensure_champion` writes); the stream is
  `requests` rows, the seed concept up to the drift point and the drifted concept after
  it (`flywheel.streams`);
* `--dataset NAME`: the data set in its fixed order (`datasets.load`) is cut at
  `TRUSTED_SHARE` (30 %): the first part is the trusted file, the rest is the stream,
  repeated from its start until it holds `requests` rows when it is shorter (penguins:
  241 live rows, so a 6000-request run sends each about 25 times) and cut when longer;
  the data set's stated drift is applied to the stream from the drift point on.

>>> TRUSTED_SHARE
0.3
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.settings import Settings

if TYPE_CHECKING:
    import pyarrow as pa

    from flywheel.features import FeatureSchema
    from flywheel.registry import ModelVersion

TRUSTED_SHARE = 0.3  # of a data set, in its fixed order, imported by init; the rest is live
SYNTHETIC_LABEL = "label"


@dataclass(frozen=True)
class DemoData:
    """Where the demo's two files are and how to read them.

    `drift_index`: the first stream row after the change (the report's drift point).
    """

    name: str  # "synthetic" or the data set's name
    trusted: Path
    stream: Path
    label: str
    drift_index: int
    drift: str  # one sentence: what changes at the drift point
    stream_rows: int  # rows in the stream file
    source_rows: int  # distinct live rows it was made of (repeated when fewer than requests)

    def describe(self) -> dict[str, Any]:
        return {
            "data": self.name,
            "trusted_file": str(self.trusted),
            "stream_file": str(self.stream),
            "label": self.label,
            "drift": self.drift,
            "stream_rows": self.stream_rows,
            "live_rows": self.source_rows,
        }


def _write(table: pa.Table, path: Path) -> Path:
    import pyarrow.csv as pcsv

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pcsv.write_csv(table, tmp)
    tmp.replace(path)
    return path


def synthetic_files(settings: Settings, requests: int, drift_at: float) -> DemoData:
    """The synthetic seed data and a drifting stream of `requests` rows, as CSV files."""
    import pyarrow as pa

    from flywheel.learner import write_demo_csv
    from flywheel.streams import drift_concept, seed_concept

    folder = settings.home_dir / "demo"
    trusted = write_demo_csv(settings.trusted, folder)
    first = int(requests * drift_at)
    before = seed_concept(settings.seed).stream(sample_seed=settings.seed + 1000)
    after = drift_concept(settings.seed).stream(sample_seed=settings.seed + 2000)
    rows = list(itertools.islice(before, first)) + list(itertools.islice(after, requests - first))
    width = len(rows[0][0])
    columns: dict[str, Any] = {f"x{i}": pa.array([x[i] for x, _ in rows]) for i in range(width)}
    columns[SYNTHETIC_LABEL] = pa.array([y for _, y in rows])
    stream = _write(pa.table(columns), folder / f"stream-seed{settings.seed}-{requests}.csv")
    return DemoData(
        name="synthetic",
        trusted=trusted,
        stream=stream,
        label=SYNTHETIC_LABEL,
        drift_index=first,
        drift="the RandomRBF concept is replaced by another, half-overlapping one",
        stream_rows=requests,
        source_rows=requests,
    )


def dataset_files(settings: Settings, name: str, requests: int, drift_at: float) -> DemoData:
    """Data set `name` cut at TRUSTED_SHARE into a trusted and a stream CSV (module doc).

    ValueError naming the choices for an unknown `name`.
    """
    import pyarrow as pa

    from flywheel.demo.datasets import info, load

    d = info(name)
    table = load(name)
    cut = round(table.num_rows * TRUSTED_SHARE)
    live = table.slice(cut)
    if live.num_rows == 0 or cut == 0:
        raise ValueError(f"data set {name!r} has too few rows ({table.num_rows}) to split")
    repeats = -(-requests // live.num_rows)
    stream = pa.concat_tables([live] * repeats).slice(0, requests).combine_chunks()
    stream = d.drift.apply(stream, drift_at)
    folder = settings.home_dir / "demo"
    return DemoData(
        name=name,
        trusted=_write(table.slice(0, cut), folder / f"{name}-trusted.csv"),
        stream=_write(stream, folder / f"{name}-stream-{requests}.csv"),
        label=d.label,
        drift_index=d.drift.start(stream.num_rows, drift_at),
        drift=d.drift.describe(),
        stream_rows=stream.num_rows,
        source_rows=live.num_rows,
    )


def init_trusted(settings: Settings, data: DemoData) -> ModelVersion:
    """Import the trusted file as public data with `run_init` (what `flywheel init --data
    FILE --label COLUMN --public` runs); on a home that already has a champion, that one.
    """
    from flywheel.learner import InitConfig, InitOptions, run_init
    from flywheel.registry import Registry

    registry = Registry.of(settings)
    current = registry.champion_version()
    if current is not None:
        schema = registry.load(current).spec.schema
        if schema is None or schema.label != data.label or not _same_columns(schema, data):
            raise ValueError(
                f"{settings.home_dir} already serves a model (v{current}) that was not made "
                f"from {data.trusted.name}: run the demo with a fresh FLYWHEEL_HOME"
            )
        return current
    options = InitOptions(data=data.trusted, label=data.label, public=True)
    return run_init(options, InitConfig.of(settings), registry).version


def _same_columns(schema: FeatureSchema, data: DemoData) -> bool:
    """Whether the stream file's columns are the schema's features and label."""
    import pyarrow.csv as pcsv

    with pcsv.open_csv(data.stream) as reader:
        header = set(reader.schema.names)
    return header == {f.name for f in schema.features} | {schema.label}


def read_stream(data: DemoData, schema: FeatureSchema) -> tuple[list[dict[str, Any]], list[str]]:
    """The stream file's rows as named instances (typed as the model's schema types them:
    categories as text, numbers as numbers, an empty field as missing) and their labels."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from flywheel.demo.datasets import NULLS

    types: dict[str, pa.DataType] = {data.label: pa.string()}
    for f in schema.features:
        if f.kind == "categorical":
            types[f.name] = pa.string()
        elif f.kind == "numeric":
            types[f.name] = pa.float64()
    table = pcsv.read_csv(
        data.stream,
        convert_options=pcsv.ConvertOptions(
            column_types=types, null_values=NULLS, strings_can_be_null=True
        ),
    )
    labels = [str(v) for v in table[data.label].to_pylist()]
    rows = table.drop_columns([data.label]).to_pylist()
    return rows, labels
