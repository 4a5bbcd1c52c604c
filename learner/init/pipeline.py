"""`flywheel init`: a data set file becomes the trusted set, the reference statistics and v1.

Two streaming passes over the file (`DataFile`), so memory is bounded by the chunk and
the samples, never the file:
1. infer the feature schema (`infer_schema`), unless a reviewed one is given (`--schema`:
   then checked against the file's header, and its values in pass 2);
2. encode each chunk (`FeatureSchema.encode_table`), split it (`split.SPLIT_RULE`), write
   its rows as the trusted set (`write_trusted_rows`), and keep bounded uniform samples
   (`Reservoir`) of train rows (what the model trains on and the reference statistics
   are computed from, at most `MAX_TRAIN`) and holdout rows (the accuracy reported on
   the version, at most `MAX_EVAL`).
Meanwhile another thread hashes the file (SHA-256 of its bytes: the data fingerprint).

Atomic: the store's writes (the trusted set and its rows, the reference statistics, on
a new lineage the learner's reset) are one transaction, committed only after the model
was registered; if the commit fails, the version is deleted again. The alias moves last.
So a failed init leaves no trusted set, no rows, no statistics and no version. A crash
between the commit and the alias leaves a registered, unaliased version of a committed
trusted set: `ensure_champion` (or `flywheel models promote V`) makes it champion.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from flywheel.features import (
    MAX_VOCABULARY,
    FeatureError,
    FeatureSchema,
    infer_schema,
    label_text,
)
from flywheel.learner.cursor import CursorState
from flywheel.learner.evaluation import Holdout, accuracy
from flywheel.learner.init import train as training
from flywheel.learner.init.columns import CsvTypes, numeric_columns
from flywheel.learner.init.errors import ChampionExists, InitError
from flywheel.learner.init.progress import Meter
from flywheel.learner.init.sample import Reservoir
from flywheel.learner.init.source import DataFile
from flywheel.learner.init.split import SPLIT_RULE, Splitter
from flywheel.modelspec import AnySpec, Blend, default_spec, parse_model_arg
from flywheel.registry import ModelVersion, Registry
from flywheel.settings import PrivacySettings, Settings, StateSettings, TrustedSettings, gather
from flywheel.signing import Approval
from flywheel.store import (
    Example,
    LearnerState,
    ReferenceStatsRow,
    Split,
    TrustedInfo,
    check_schema,
    delete_trusted,
    make_engine,
    positions,
    schema_revision,
    session_factory,
    trusted_info,
    upgrade,
    write_trusted_info,
    write_trusted_rows,
)

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)
INIT_APPROVAL = Approval("flywheel init", "trained on the trusted data set it names")

CHUNK_ROWS = 50_000  # rows encoded and written at a time (~30 MB of Python rows at most)
MAX_TRAIN = 200_000  # sampled train rows the model trains on (~10 MB for 12 features)
MAX_EVAL = 100_000  # sampled holdout rows the version's holdout accuracy is measured on
PRIVATE_REFUSAL = (
    "--private while FLYWHEEL_PRIVACY_ENABLED is on: the initial model trains on the "
    "data set without DP, which the privacy ledger cannot account for. Pass --public if "
    "the data may be used without privacy accounting (public, or consented), or set "
    "FLYWHEEL_PRIVACY_ENABLED=false for a deployment without DP"
)


def online_lineage(model_name: str) -> str:
    """The online learner's lineage name (`OnlineLearner.lineage`), whose state a new
    lineage resets."""
    return f"{model_name}:online"


@dataclass(frozen=True)
class InitConfig:
    """The settings groups `init` reads: where the store and home are, the seed (for the
    sample and the initial weights), and whether DP is on."""

    state: StateSettings
    trusted: TrustedSettings
    privacy: PrivacySettings

    @classmethod
    def of(cls, settings: Settings) -> InitConfig:
        return gather(cls, settings)


@dataclass(frozen=True)
class InitOptions:
    """One `flywheel init` run (the CLI's flags)."""

    data: Path
    label: str
    public: bool  # may be used without privacy accounting (public or consented data)
    schema: FeatureSchema | None = None  # reviewed (`--schema`); None: inferred
    model: str | None = None  # `--model` text; None: `default_spec(schema)`
    new_lineage: bool = False
    max_vocabulary: int = MAX_VOCABULARY
    ignore: tuple[str, ...] = ()
    chunk_rows: int = CHUNK_ROWS
    max_train: int = MAX_TRAIN
    max_eval: int = MAX_EVAL
    meter: Meter = field(default_factory=lambda: Meter(enabled=False))


@dataclass(frozen=True)
class InitResult:
    """What `init` registered and stored."""

    version: ModelVersion
    replaced: ModelVersion | None  # the champion of the lineage it replaced
    model_family: str
    schema_fingerprint: str
    data_fingerprint: str
    public: bool
    rows_train: int
    rows_holdout: int
    label_counts: dict[str, int]
    trained_on: int  # sampled train rows
    epochs: int
    train_accuracy: float
    holdout_accuracy: float
    unknown: dict[str, int]  # values that fell into a category's unknown bucket
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- schema ---------------------------------------------------------------------------------
def load_schema_file(path: Path, label: str) -> FeatureSchema:
    """A reviewed schema (`--schema FILE`): FeatureSchema JSON whose label is `label`."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise InitError(f"cannot be read ({exc.strerror or exc})", path=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InitError(f"is not JSON ({exc})", path=path) from None
    try:
        schema = FeatureSchema.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'schema'}: {e['msg']}" for e in exc.errors()
        )
        raise InitError(f"is not a valid feature schema: {problems}", path=path) from None
    if schema.label != label:
        raise InitError(
            f"its label column is {schema.label!r}, but --label is {label!r}", path=path
        )
    return schema


def infer_file_schema(
    data: Path,
    label: str,
    *,
    max_vocabulary: int = MAX_VOCABULARY,
    ignore: tuple[str, ...] = (),
    chunk_rows: int = CHUNK_ROWS,
    meter: Meter | None = None,
) -> tuple[FeatureSchema, dict[str, int]]:
    """Pass 1 alone (`--schema-only`, `--write-schema`): (schema, rows per label)."""
    file = DataFile.open(data)
    return _infer(file, label, max_vocabulary, ignore, chunk_rows, meter or Meter(enabled=False))


def _check_columns(file: DataFile, label: str, ignore: tuple[str, ...]) -> None:
    if label not in file.columns:
        raise InitError(
            f"no label column; the columns are {file.columns}", path=file.path, column=label
        )
    if label in ignore:
        raise InitError("--ignore names the label column", column=label)
    for name in ignore:
        if name not in file.columns:
            raise InitError(
                f"--ignore names no column of the file; the columns are {file.columns}",
                path=file.path,
                column=name,
            )


def _infer(
    file: DataFile,
    label: str,
    max_vocabulary: int,
    ignore: tuple[str, ...],
    chunk_rows: int,
    meter: Meter,
) -> tuple[FeatureSchema, dict[str, int]]:
    import pyarrow as pa

    _check_columns(file, label, ignore)
    read = [c for c in file.columns if c not in ignore]
    types = CsvTypes(file.path, label=label) if file.format == "csv" else None

    def batches() -> Iterator[pa.RecordBatch]:
        unit = "bytes" if file.format == "csv" else "rows"
        with meter.task("pass 1/2: schema", total=file.progress_total, unit=unit) as done:
            for chunk in file.chunks(read, rows=chunk_rows, progress=done):
                batch = types.typed(chunk) if types is not None else chunk.batch
                if ignore:  # present (so the schema lists them as ignored), never read
                    arrays = [
                        pa.nulls(batch.num_rows, pa.string())
                        if name in ignore
                        else batch.column(name)
                        for name in file.columns
                    ]
                    batch = pa.RecordBatch.from_arrays(arrays, names=file.columns)
                yield batch

    try:
        return infer_schema(batches(), label, max_vocabulary=max_vocabulary, ignore=ignore)
    except FeatureError as exc:
        if exc.message.startswith("the data set has no rows"):
            what = "has a header but no data rows" if file.format == "csv" else "has no rows"
            raise InitError(what, path=file.path) from None
        raise InitError.of_feature(exc, file.path) from None


def _check_schema_against(file: DataFile, schema: FeatureSchema) -> None:
    if schema.label not in file.columns:
        raise InitError(
            f"no label column; the columns are {file.columns}",
            path=file.path,
            column=schema.label,
        )
    for name in schema.names:
        if name not in file.columns:
            raise InitError(
                f"the schema's feature is not a column of the file; the columns are "
                f'{file.columns} (mark it "kind": "ignore" or remove it)',
                path=file.path,
                column=name,
            )


def _spec(model: str | None, schema: FeatureSchema, factories: tuple[str, ...]) -> AnySpec:
    try:
        spec = default_spec(schema) if model is None else parse_model_arg(model, schema)
        training.build(spec, factories)  # refused now, before anything is read or written
    except ValueError as exc:
        text = str(exc)
        raise InitError(text if text.startswith("--model") else f"--model: {text}") from None
    return spec


# ---- the store ------------------------------------------------------------------------------
def open_or_create_store(url: str) -> Engine:
    """The store at `url`; one with no Flywheel schema at all (a new deployment) is
    migrated first. One at an older revision is refused (`SchemaNotCurrent`): upgrading
    a store in use is `flywheel db upgrade`'s job, not a side effect of `init`."""
    engine = make_engine(url)
    try:
        if schema_revision(engine) is None:
            upgrade(url)
        check_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


@contextlib.contextmanager
def one_at_a_time(home: Path) -> Iterator[None]:
    """Inits sharing a home (a CLI init, a service and a learner bootstrapping the demo,
    each creating the store) run one after another; inits on other machines meet at the
    store's unique key on `trusted_sets`. Not re-entrant (`run_init(..., locked=True)`
    runs inside a caller's lock)."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / "init.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- the run --------------------------------------------------------------------------------
def run_init(
    options: InitOptions, config: InitConfig, registry: Registry, *, locked: bool = False
) -> InitResult:
    """Import `options.data`, train and register the first version; see the module doc.

    Raises InitError (bad input; nothing written), ChampionExists (a deployment that
    already has a lineage, without `new_lineage`), SchemaNotCurrent (an old store).
    `locked`: the caller holds `one_at_a_time` for this home already.
    """
    file = DataFile.open(options.data)
    if not options.public and config.privacy.privacy_enabled:
        raise InitError(PRIVATE_REFUSAL)
    with contextlib.nullcontext() if locked else one_at_a_time(config.state.home_dir):
        engine = open_or_create_store(config.state.resolved_database_url)
        try:
            return _Run(file, options, config, registry, engine).run()
        finally:
            engine.dispose()


@dataclass
class _Imported:
    rows_train: int = 0
    rows_holdout: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    unknown: Counter[str] = field(default_factory=Counter)


class _Run:
    def __init__(
        self,
        file: DataFile,
        options: InitOptions,
        config: InitConfig,
        registry: Registry,
        engine: Engine,
    ) -> None:
        self.file, self.options, self.config = file, options, config
        self.registry, self.engine = registry, engine
        self.name = registry.name
        self.seconds: dict[str, float] = {}

    def _lap(self, what: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[what] = round(now - since, 3)
        return now

    def run(self) -> InitResult:
        o = self.options
        t = time.perf_counter()
        replaced = self._check_lineage()
        if o.schema is None:
            schema, _ = _infer(
                self.file, o.label, o.max_vocabulary, o.ignore, o.chunk_rows, o.meter
            )
            t = self._lap("schema", t)
        else:
            schema = o.schema
            _check_schema_against(self.file, schema)
        spec = _spec(o.model, schema, self.registry.factories)
        with ThreadPoolExecutor(1, thread_name_prefix="flywheel-init-sha256") as pool:
            digest = pool.submit(self.file.fingerprint)
            session = session_factory(self.engine)()
            try:
                result = self._write_train_publish(session, schema, spec, digest, replaced, t)
            finally:
                session.close()  # without a commit: rolled back
        # signed as the approval of whoever runs init: the model is trained on the data set
        # they name as trusted, and there is no champion to gate it against
        self.registry.set_champion(result.version, approval=INIT_APPROVAL)
        log.info(
            "init: v%s of %s is champion (%d train / %d holdout rows, holdout accuracy %.3f)",
            result.version,
            self.name,
            result.rows_train,
            result.rows_holdout,
            result.holdout_accuracy,
        )
        return result

    def _check_lineage(self) -> ModelVersion | None:
        champion = self.registry.champion_version()
        with session_factory(self.engine)() as session:
            existing = trusted_info(session, self.name)
        if (champion is None and existing is None) or self.options.new_lineage:
            return champion
        if champion is not None:
            what = f"already has a champion (v{champion})"
        else:
            assert existing is not None
            what = (
                f"already has a trusted data set (from {existing.source}, sha256 "
                f"{existing.fingerprint[:12]}...) but no champion"
            )
        raise ChampionExists(
            f"{self.name} {what}; pass --new-lineage to start a new lineage from this data "
            "set (it replaces the trusted set, and the online learner skips every example "
            "stored before it)",
            version=champion,
        )

    def _write_train_publish(
        self,
        session: Session,
        schema: FeatureSchema,
        spec: AnySpec,
        digest: Any,
        replaced: ModelVersion | None,
        t: float,
    ) -> InitResult:
        o, seed = self.options, self.config.trusted.seed
        delete_trusted(session, self.name)  # a new lineage's old set, or leftovers of none
        train_sample = Reservoir(o.max_train, seed=seed)
        eval_sample = Reservoir(o.max_eval, seed=seed + 1)
        imported = self._import(session, schema, train_sample, eval_sample)
        self._check_counts(schema, imported)
        self.file.check_unchanged()
        fingerprint = digest.result()
        x_train, y_train = train_sample.arrays()
        x_eval, y_eval = eval_sample.arrays()
        reference = self._reference(x_train, schema)
        write_trusted_info(
            session,
            TrustedInfo(
                model_name=self.name,
                fingerprint=fingerprint,
                schema=schema,
                public=o.public,
                rows_train=imported.rows_train,
                rows_holdout=imported.rows_holdout,
                split_rule=SPLIT_RULE,
                label_counts={k: imported.counts[k] for k in schema.labels},
                source=str(self.file.path)[-1000:],
            ),
        )
        session.add(
            ReferenceStatsRow(
                model_name=self.name, stats=reference.to_dict(), example_count=len(x_train)
            )
        )
        session.flush()  # a constraint the rows break shows now, before a version exists
        t = self._lap("import", t)

        module, epochs = training.train(
            spec, x_train, y_train, seed=seed, factories=self.registry.factories
        )
        if isinstance(module, Blend) and len(y_eval):
            # the mixture's first weights: each head's mistakes on rows it never saw
            module.score(torch.from_numpy(x_eval), torch.from_numpy(np.asarray(y_eval, np.int64)))
        train_acc = accuracy(module, Holdout(x_train, y_train))
        holdout_acc = accuracy(module, Holdout(x_eval, y_eval))
        t = self._lap("train", t)

        tags = {
            "parent_version": "",
            "source": "init",
            "examples": f"trusted[0,{imported.rows_train})",
            "epsilon": "none",
            "delta": "none",
            "gate": "initial: no champion to compare"
            + (f" (new lineage, replaces v{replaced})" if replaced else ""),
            "schema_fingerprint": schema.fingerprint(),
            "data_fingerprint": fingerprint,
            "trusted_public": "yes" if o.public else "no",
            "model_family": spec.family,
            "data_file": self.file.path.name[-250:],
            "trusted_rows": f"{imported.rows_train} train, {imported.rows_holdout} holdout",
            "split_rule": SPLIT_RULE,
            "lineage_start": f"replaces v{replaced}" if replaced else "first",
        }
        params = {
            "data_file": self.file.path.name[-250:],
            "label": o.label,
            "model": o.model or "default",
            "rows": imported.rows_train + imported.rows_holdout,
            "trained_on": len(x_train),
            "epochs": epochs,
            "lr": training.LR,
            "batch": training.BATCH,
            "seed": seed,
            "max_vocabulary": schema.max_vocabulary,
        }
        metrics = {
            "train_accuracy": train_acc,
            "holdout_accuracy": holdout_acc,
            "holdout_rows_scored": float(len(y_eval)),
            "rows_train": float(imported.rows_train),
            "rows_holdout": float(imported.rows_holdout),
        }
        version = self.registry.publish(spec, module, tags=tags, params=params, metrics=metrics)
        try:
            self._log_schema(version, schema)
            self._reset_online_learner(session, version)
            session.commit()
        except BaseException:
            session.rollback()
            self._withdraw(version)
            raise
        self._lap("publish", t)
        return InitResult(
            version=version,
            replaced=replaced,
            model_family=spec.family,
            schema_fingerprint=schema.fingerprint(),
            data_fingerprint=fingerprint,
            public=o.public,
            rows_train=imported.rows_train,
            rows_holdout=imported.rows_holdout,
            label_counts={k: imported.counts[k] for k in schema.labels},
            trained_on=len(x_train),
            epochs=epochs,
            train_accuracy=train_acc,
            holdout_accuracy=holdout_acc,
            unknown=dict(imported.unknown),
            seconds=dict(self.seconds),
        )

    # ---- pass 2 -----------------------------------------------------------------------------
    def _import(
        self,
        session: Session,
        schema: FeatureSchema,
        train_sample: Reservoir,
        eval_sample: Reservoir,
    ) -> _Imported:
        o, file = self.options, self.file
        read = [*schema.names, schema.label]
        numeric = [f.name for f in schema.inputs if f.kind == "numeric"]
        labels = np.asarray(schema.labels, dtype=object)
        splitter = Splitter()
        out = _Imported()
        unit = "bytes" if file.format == "csv" else "rows"
        with o.meter.task("pass 2/2: import", total=file.progress_total, unit=unit) as done:
            for chunk in file.chunks(read, rows=o.chunk_rows, progress=done):
                batch = (
                    numeric_columns(chunk, numeric, file.path)
                    if file.format == "csv"
                    else chunk.batch
                )
                y = _label_indices(batch.column(schema.label), schema, chunk.first_row, file)
                try:
                    encoded = schema.encode_table(batch, first_row=chunk.first_row)
                except FeatureError as exc:
                    raise InitError.of_feature(exc, file.path) from None
                out.unknown.update(encoded.unknown)
                hold = splitter.holdout(y)
                for split, mask in ((Split.TRAIN, ~hold), (Split.HOLDOUT, hold)):
                    first = out.rows_train if split is Split.TRAIN else out.rows_holdout
                    x = encoded.x[mask]
                    stored = write_trusted_rows(
                        session, self.name, split, first, x, labels[y[mask]].tolist()
                    )
                    if stored != len(x):
                        raise RuntimeError(
                            f"{len(x) - stored} trusted rows of {self.name} were already "
                            "stored although the set was deleted in this transaction"
                        )
                train_sample.add(encoded.x[~hold], y[~hold])
                eval_sample.add(encoded.x[hold], y[hold])
                out.rows_holdout += int(hold.sum())
                out.rows_train += int((~hold).sum())
                for index, n in zip(*np.unique(y, return_counts=True), strict=True):
                    out.counts[str(labels[index])] += int(n)
        return out

    def _check_counts(self, schema: FeatureSchema, imported: _Imported) -> None:
        """What pass 1 checks when it infers the schema, for a given one."""
        path = self.file.path
        if imported.rows_train + imported.rows_holdout == 0:
            what = "has a header but no data rows" if self.file.format == "csv" else "has no rows"
            raise InitError(what, path=path)
        absent = [name for name in schema.labels if imported.counts[name] == 0]
        if absent:
            raise InitError(
                f"the schema's label(s) {absent} have no rows in the file; every label needs "
                "rows to train on (remove them from the schema's labels, or add rows)",
                path=path,
                column=schema.label,
            )
        single = [name for name in schema.labels if imported.counts[name] == 1]
        if single:
            raise InitError(
                f"label(s) {single} have a single example; each needs at least two (one to "
                "train on, one for the holdout): remove or merge them",
                path=path,
                column=schema.label,
            )

    def _reference(self, x_train: np.ndarray, schema: FeatureSchema) -> Any:
        from flywheel.feedback import ReferenceStats

        try:  # categories as codes, booleans as 0/1: the analyzer's distance treats them so
            return ReferenceStats.from_examples(
                x_train.astype(np.float64),
                categorical=positions(schema, "categorical"),
                boolean=positions(schema, "boolean"),
            )
        except ValueError as exc:
            raise InitError(
                f"too few train rows for the analyzer's reference statistics ({exc}); "
                f"{schema.input_dim} features need at least {2 * schema.input_dim}",
                path=self.file.path,
            ) from None

    # ---- registry and learner ---------------------------------------------------------------
    def _log_schema(self, version: ModelVersion, schema: FeatureSchema) -> None:
        """The schema as its own artifact of the run (it is in spec.json too)."""
        run_id = self.registry.client.get_model_version(self.name, version).run_id
        if run_id is None:  # publish always logs a run; a version without one has no place
            return
        self.registry.client.log_dict(run_id, schema.model_dump(mode="json"), "schema.json")

    def _reset_online_learner(self, session: Session, version: ModelVersion) -> None:
        """A new lineage: the online learner's cursor moves past every stored example.

        Examples stored before (the old schema's) are never read again; replay and the
        "since the change" window start after them (`replay_from_id`, `change_at_id`);
        the learner continues from the new champion. `update` keeps counting, so the old
        lineage's versions are not mistaken for this learner's unsaved ones.
        """
        row = session.get(LearnerState, online_lineage(self.name))
        if row is None:
            return
        last = int(session.scalar(select(func.max(Example.id))) or 0)
        old = dict(row.state or {})
        row.state = {
            "update": int(old.get("update", 0)),
            "cursor": CursorState(watermark=last).to_dict(),
            "working_version": version,
            "champion_seen": version,
            "change_at_id": last + 1,
            "replay_from_id": last + 1,
            "lineage_start": version,
        }
        row.cursor = last

    def _withdraw(self, version: ModelVersion) -> None:
        try:
            self.registry.delete_version(version)
        except Exception:
            log.exception(
                "init: the store was not written, and v%s of %s could not be deleted: "
                "delete it by hand (it has no trusted set)",
                version,
                self.name,
            )


def _label_indices(
    col: pa.Array, schema: FeatureSchema, first_row: int, file: DataFile
) -> np.ndarray:
    """The label index of each row; InitError at the first missing or unknown label."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = label_texts(col)
    if text.null_count:
        at = int(np.asarray(text.is_null().to_numpy(zero_copy_only=False)).argmax())
        raise InitError(
            "the label is missing", path=file.path, row=first_row + at + 1, column=schema.label
        )
    codes = pc.index_in(text, value_set=pa.array(schema.labels, pa.string()))
    if codes.null_count:
        at = int(np.asarray(codes.is_null().to_numpy(zero_copy_only=False)).argmax())
        raise InitError(
            f"label {text[at].as_py()!r} is not one of the schema's labels {schema.labels}",
            path=file.path,
            row=first_row + at + 1,
            column=schema.label,
        )
    return np.asarray(codes.to_numpy(zero_copy_only=False), dtype=np.int64)


def label_texts(col: pa.Array) -> pa.Array:
    """Label values as text, as `flywheel.features.label_text` writes each one (3.0 and 3
    are both "3", True is "true").

    >>> import pyarrow as pa
    >>> [label_texts(pa.array(v)).to_pylist() for v in ([1.0, 2.5], [True], [3], ["a"])]
    [['1', '2.5'], ['true'], ['3'], ['a']]
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_boolean(col.type):
        return pc.if_else(col, "true", "false")
    if pa.types.is_floating(col.type):  # rare for a label: Python's text, value by value
        return pa.array([None if v is None else label_text(v) for v in col.to_pylist()])
    return pc.cast(col, pa.string())
