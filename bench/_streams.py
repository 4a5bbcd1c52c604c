"""Shared pieces of the learner benchmarks: river drift streams, real data sets, and our
learner's loop.

`prequential` and `elastic` must feed every learner exactly the same examples in the same
order, so a stream is drawn once into memory (river's dicts for river's models, a
fixed-width float matrix for our MLP) and every learner replays it. A real data set
(`flywheel.demo.DATASETS`) becomes a stream the way `flywheel init` sees a user's file:
its feature schema is inferred from the warm-up rows alone, the rows are encoded by that
schema into raw vectors (categorical codes, booleans 0/1, missing values filled), and
our model is the schema's `default_spec`, which scales, one-hot encodes or embeds inside
the network. Heavy imports (torch, river) stay inside functions, so
`python -m bench --help` stays fast.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STREAMS = ("sea", "hyperplane", "agrawal")

# Agrawal's categorical attributes and their value ranges (river's generator draws
# elevel in 0..4, car in 1..20, zipcode in 0..8); one-hot for the MLP.
AGRAWAL_NUMERIC = ("salary", "commission", "age", "hvalue", "hyears", "loan")
AGRAWAL_CATEGORICAL = {"elevel": range(0, 5), "car": range(1, 21), "zipcode": range(0, 9)}
AGRAWAL_FUNCTIONS = (0, 2, 5, 8)  # the classification function of each quarter
SEA_VARIANTS = (0, 1, 2, 3)  # thresholds 8, 9, 7, 9.5 on x0 + x1, one per quarter
DRIFT_WIDTH = 50  # samples over which an "abrupt" switch happens (see _chain)
SEA_NOISE = 0.1  # the usual 10 % label noise of SEA benchmarks (river's default is 0)
HYPERPLANE_MAG_CHANGE = 0.001  # per-sample weight change of the 2 drifting features


@dataclass
class Stream:
    """One drawn stream: river's rows for river, the same rows encoded for the MLP."""

    name: str
    description: str
    rows: list[dict[Any, Any]]
    x: np.ndarray  # float32, (n, dim)
    y: np.ndarray  # int64 labels 0..k-1
    n_labels: int
    drifts: list[int] = field(default_factory=list)  # sample index where a new concept starts
    # real data sets only: river's LogisticRegression one-hot encodes `categorical` and
    # scales `numeric`; our model is `spec` (None: an MLP of OurSetup.hidden over `x`)
    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    spec: Any = None
    facts: dict[str, Any] = field(default_factory=dict)  # what the JSON says of the data set

    def __len__(self) -> int:
        return len(self.rows)


def _chain(
    make: Callable[[int], Any], concepts: Iterable[int], positions: list[int], seed: int
) -> Any:
    """Abrupt switches from concept to concept at absolute `positions`.

    ConceptDriftStream counts its drift stream's samples only once it draws from it, so a
    nested stream's position is relative to where its parent switched to it. Its sigmoid
    overflows `math.exp` (OverflowError) when position > ~177 x width, so width 1 is not
    possible: the width is 50 samples (half a mini-batch; the new concept's share goes
    from 12 % to 88 % within it), more only for concepts longer than 8500 samples.
    """
    from river.datasets import synth

    concepts = list(concepts)
    stream = make(concepts[-1])
    for i in range(len(concepts) - 2, -1, -1):
        start = positions[i - 1] if i else 0
        stream = synth.ConceptDriftStream(
            stream=make(concepts[i]),
            drift_stream=stream,
            position=positions[i] - start,
            width=drift_width(positions[i] - start),
            seed=seed + i,
        )
    return stream


def drift_width(position: int) -> int:
    return max(DRIFT_WIDTH, math.ceil(position / 170))


def _quarters(samples: int) -> list[int]:
    return [samples * k // 4 for k in (1, 2, 3)]


def sea_rows(
    samples: int,
    seed: int,
    variants: Iterable[int] = SEA_VARIANTS,
    positions: list[int] | None = None,
) -> Any:
    from river.datasets import synth

    positions = _quarters(samples) if positions is None else positions
    return _chain(
        lambda v: synth.SEA(variant=v, noise=SEA_NOISE, seed=seed + 100 * v),
        variants,
        positions,
        seed,
    )


def agrawal_rows(
    samples: int,
    seed: int,
    functions: Iterable[int] = AGRAWAL_FUNCTIONS,
    positions: list[int] | None = None,
) -> Any:
    from river.datasets import synth

    positions = _quarters(samples) if positions is None else positions
    return _chain(
        lambda f: synth.Agrawal(classification_function=f, seed=seed + 100 * f),
        functions,
        positions,
        seed,
    )


def encode_agrawal(rows: list[dict[str, Any]]) -> np.ndarray:
    """6 numeric columns plus one-hot elevel (5), car (20) and zipcode (9): 40 floats."""
    cols: list[np.ndarray] = [
        np.asarray([[r[k] for k in AGRAWAL_NUMERIC] for r in rows], dtype=np.float64)
    ]
    for key, values in AGRAWAL_CATEGORICAL.items():
        codes = np.asarray([r[key] for r in rows]) - values.start
        if codes.min() < 0 or codes.max() >= len(values):
            raise ValueError(f"agrawal {key} outside {values}")
        cols.append(np.eye(len(values))[codes])
    return np.concatenate(cols, axis=1).astype(np.float32)


def encode_indexed(rows: list[dict[Any, Any]]) -> np.ndarray:
    """Rows keyed 0..d-1 (SEA, Hyperplane) as a float matrix."""
    dim = len(rows[0])
    return np.asarray([[r[i] for i in range(dim)] for r in rows], dtype=np.float32)


def take_rows(stream: Any, samples: int) -> tuple[list[dict[Any, Any]], np.ndarray]:
    rows, labels = [], []
    """The first `samples` (dict, label) pairs of a river stream; labels as int64."""
    for x, y in stream.take(samples):
        rows.append(x)
        labels.append(int(y))
    return rows, np.asarray(labels, dtype=np.int64)


def make_stream(name: str, samples: int, seed: int) -> Stream:
    """The named stream, `samples` long, identical for the same (name, samples, seed)."""
    from river.datasets import synth

    if name == "sea":
        rows, y = take_rows(sea_rows(samples, seed), samples)
        return Stream(
            name,
            f"SEA variants {'->'.join(map(str, SEA_VARIANTS))} (abrupt, at "
            f"each quarter), {SEA_NOISE:.0%} label noise, 3 features",
            rows,
            encode_indexed(rows),
            y,
            2,
            _quarters(samples),
        )
    if name == "hyperplane":
        gen = synth.Hyperplane(
            seed=seed,
            n_features=10,
            n_drift_features=2,
            mag_change=HYPERPLANE_MAG_CHANGE,
            noise_percentage=0.05,
            sigma=0.1,
        )
        rows, y = take_rows(gen, samples)
        return Stream(
            name,
            f"Hyperplane, 10 features, 2 drifting (gradual, mag_change "
            f"{HYPERPLANE_MAG_CHANGE}), 5% noise",
            rows,
            encode_indexed(rows),
            y,
            2,
            [],
        )
    if name == "agrawal":
        rows, y = take_rows(agrawal_rows(samples, seed), samples)
        return Stream(
            name,
            f"Agrawal functions {'->'.join(map(str, AGRAWAL_FUNCTIONS))} "
            f"(abrupt, at each quarter), 9 attributes (40 floats one-hot)",
            rows,
            encode_agrawal(rows),
            y,
            2,
            _quarters(samples),
        )
    raise ValueError(f"unknown stream {name!r}; choose from {', '.join(STREAMS)}")


def dataset_warmup(rows: int, warmup: int) -> int:
    """The warm-up of a real data set: `warmup` rows, at most a fifth of the set (the
    penguins have 344 rows; the trusted share `flywheel init` holds out is also 20 %)."""
    return max(1, min(warmup, rows // 5))


def make_dataset_stream(
    name: str,
    seed: int,
    warmup: int,
    *,
    samples: int | None = None,
    shuffle: bool = True,
    drift_at: float | None = None,
    hidden: tuple[int, ...] | None = None,
    linear_head: bool = True,
) -> Stream:
    """A real data set as a stream: in the order of `seed` (a permutation of the set's
    fixed order; `shuffle=False` keeps that order), its first `samples` rows, with its
    stated drift after fraction `drift_at`. Our model's schema is inferred from the first
    `warmup` rows (as `flywheel init` infers it from the user's file), the class list from
    all rows; `hidden` overrides the default spec's hidden layers; `linear_head` False
    drops the default spec's logistic head (`flywheel.modelspec.Blend`)."""
    import pyarrow as pa

    from flywheel.demo import DATASETS, load
    from flywheel.features import infer_schema, label_text
    from flywheel.modelspec import default_spec

    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(sorted(DATASETS))}")
    info = DATASETS[name]
    table = load(name)
    if shuffle:
        table = table.take(np.random.default_rng(seed).permutation(table.num_rows))
    if samples is not None:
        table = table.slice(0, samples)
    if drift_at is not None:
        table = info.drift.apply(table, drift_at)
    table = table.combine_chunks()
    classes = sorted({label_text(v) for v in table[info.label].to_pylist()})
    schema, _ = infer_schema([table.slice(0, warmup)], label=info.label)
    schema = schema.model_copy(update={"labels": classes})  # a class the warm-up lacks
    spec = default_spec(schema)  # what `flywheel init` makes
    spec = spec.model_copy(update={"linear_head": linear_head})
    if hidden is not None:
        spec = spec.model_copy(update={"hidden": list(hidden)})
    x = schema.encode_table(table).x
    y = np.asarray(schema.labels_of(table[info.label].to_pylist()), dtype=np.int64)
    features = [c for c in table.column_names if c != info.label]
    categorical = tuple(
        c for c in features if pa.types.is_string(table[c].type) or c in info.categorical
    )
    numeric = tuple(c for c in features if c not in categorical)
    rows = [
        {k: v for k, v in r.items() if v is not None and k != info.label} for r in table.to_pylist()
    ]
    drifts = [info.drift.start(table.num_rows, drift_at)] if drift_at is not None else []
    return Stream(
        name,
        f"{info.description} [{info.package}: {info.source}]",
        rows,
        x,
        y,
        len(classes),
        drifts,
        numeric=numeric,
        categorical=categorical,
        spec=spec,
        facts={
            "package": info.package,
            "rows": table.num_rows,
            "classes": classes,
            "categorical": list(categorical),
            "order": "a permutation of its rows per seed" if shuffle else "its fixed order",
            "drift": info.drift.describe() if drift_at is not None else None,
            "ours_spec": {
                "family": spec.family,
                "hidden": list(spec.hidden),
                "embedding_dim": spec.embedding_dim,
                "inputs": [f"{f.name}:{f.kind}" for f in schema.inputs],
            },
        },
    )


# -- our learner ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OurSetup:
    """Everything about our learner the benchmarks set besides TrainerConfig.

    Defaults: the configuration both benchmarks report (tuned on seeds 1-3, see
    docs/benchmarks.md). Warm start: fit the Standardize layer on the warm-up rows, then
    a few epochs of Adam over them, as the seed model is made (shorter: 1000 rows, not
    a seed set, and 60 epochs overfit a 64-wide MLP).
    """

    hidden: tuple[int, ...] = (32, 32)
    batch: int = 100  # N: new examples per update, as the production learner
    warm_epochs: int = 10
    warm_lr: float = 1e-2
    warm_batch: int = 32


# TrainerConfig fields the benchmarks use unless told otherwise (the rest: its defaults).
# replay=0: the replay pool is a uniform sample of all history, so after a real concept
# change it keeps teaching the old labels (see docs/benchmarks.md).
BENCH_TRAINER = {"lr": 0.001, "steps": 16, "replay": 0.0}


def trainer_config(**overrides: Any) -> Any:
    """A TrainerConfig with the benchmark defaults and `overrides` (None = keep)."""
    from flywheel.learner.trainer import TrainerConfig

    fields = {**BENCH_TRAINER, **{k: v for k, v in overrides.items() if v is not None}}
    return TrainerConfig(**fields)


def parse_ints(text: str) -> tuple[int, ...]:
    """ "32,32" -> (32, 32); "" -> () (a linear model)."""
    return tuple(int(v) for v in text.split(",") if v.strip())


def warm_model(
    x: np.ndarray, y: np.ndarray, n_labels: int, setup: OurSetup, seed: int, spec: Any = None
) -> Any:
    """A fresh model fitted on the warm-up rows, as `train_seed_model` fits the seed model:
    `spec`'s (a schema's default spec, over raw vectors), else an MLP of `setup.hidden`."""
    import torch

    from flywheel.modelspec import ModelSpec, build_module, fit_input_scaling, training_losses

    torch.manual_seed(seed)
    if spec is None:
        spec = ModelSpec(
            input_dim=x.shape[1],
            hidden=list(setup.hidden),
            labels=[f"class_{i}" for i in range(n_labels)],
        )
    module = build_module(spec)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y)
    fit_input_scaling(module, xt)
    opt = torch.optim.Adam(module.parameters(), lr=setup.warm_lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(setup.warm_epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(setup.warm_batch):
            opt.zero_grad()
            training_losses(module, xt[idx], yt[idx]).mean().backward()
            opt.step()
    module.eval()
    return module


def run_ours(
    x: np.ndarray,
    y: np.ndarray,
    n_labels: int,
    config: Any,
    setup: OurSetup,
    warmup: int,
    seed: int,
    after_update: Callable[[int, Any, Any], None] | None = None,
    spec: Any = None,
) -> np.ndarray:
    """Prequential run of our learner, as `learner/online.py` drives it, per batch of N.

    Test: predict the batch with the current model. Train: `observe_errors` (the served
    model's mistakes), `observe_inputs`, `update`. Returns one bool per sample after the
    warm-up (True = predicted right). `after_update(end, trainer, stats)` runs after each
    update, `end` being the index of the first sample not yet trained on. `spec`: the
    model (see `warm_model`), over the raw vectors `x`.
    """
    import torch

    from flywheel.feedback import ReferenceStats
    from flywheel.learner.trainer import OnlineTrainer

    module = warm_model(x[:warmup], y[:warmup], n_labels, setup, seed, spec)
    trainer = OnlineTrainer(
        module,
        config,
        input_dim=x.shape[1],
        seed=seed,
        novelty=ReferenceStats.from_examples(x[:warmup].astype(np.float64)),
    )
    trainer.remember(x[:warmup], y[:warmup])
    torch.manual_seed(seed)
    correct = np.zeros(len(y) - warmup, dtype=bool)
    for start in range(warmup, len(y), setup.batch):
        end = min(start + setup.batch, len(y))
        xb, yb = x[start:end], y[start:end]
        hit = trainer.predict(xb) == yb
        correct[start - warmup : end - warmup] = hit
        trainer.observe_errors((~hit).tolist())
        trainer.observe_inputs(xb)
        stats = trainer.update(xb, yb)
        if after_update is not None:
            after_update(end, trainer, stats)
    return correct


def config_dict(config: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(config)


# -- reporting -----------------------------------------------------------------------------
@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread while the benchmark runs: a 32x32 MLP on 100 rows gains nothing
    from two, and the threads wait for each other on a shared 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def progress(enabled: bool) -> Any:
    """A rich progress bar on stderr (stdout stays clean for --json)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )
