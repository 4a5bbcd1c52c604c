"""Shared pieces of the learner benchmarks: river drift streams and our learner's loop.

`prequential` and `elastic` must feed every learner exactly the same examples in the same
order, so a stream is drawn once into memory (river's dicts for river's models, a
fixed-width float matrix for our MLP) and every learner replays it. Heavy imports (torch,
river) stay inside functions, so `python -m bench --help` stays fast.
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


def warm_model(x: np.ndarray, y: np.ndarray, n_labels: int, setup: OurSetup, seed: int) -> Any:
    """A fresh MLP fitted on the warm-up rows, as `train_seed_model` fits the seed model."""
    import torch
    from torch import nn

    from flywheel.modelspec import ModelSpec, build_model

    torch.manual_seed(seed)
    spec = ModelSpec(
        input_dim=x.shape[1],
        hidden=list(setup.hidden),
        labels=[f"class_{i}" for i in range(n_labels)],
    )
    module = build_model(spec)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y)
    module[0].fit(xt)
    opt = torch.optim.Adam(module.parameters(), lr=setup.warm_lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(setup.warm_epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(setup.warm_batch):
            opt.zero_grad()
            nn.functional.cross_entropy(module(xt[idx]), yt[idx]).backward()
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
) -> np.ndarray:
    """Prequential run of our learner, as `learner/online.py` drives it, per batch of N.

    Test: predict the batch with the current model. Train: `observe_errors` (the served
    model's mistakes), `observe_inputs`, `update`. Returns one bool per sample after the
    warm-up (True = predicted right). `after_update(end, trainer, stats)` runs after each
    update, `end` being the index of the first sample not yet trained on.
    """
    import torch

    from flywheel.feedback import ReferenceStats
    from flywheel.learner.trainer import OnlineTrainer

    module = warm_model(x[:warmup], y[:warmup], n_labels, setup, seed)
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
