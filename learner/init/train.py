"""Training the initial model: any built-in spec or a trusted factory, on the sampled rows.

The recipe is the seed model's (Adam at 1e-2, cross-entropy, mini-batches of 256, a
seeded shuffle), so the synthetic demo trains as it did before `init` existed. The
number of epochs is what gives about `TARGET_STEPS` steps, between 1 and `MAX_EPOCHS`:
60 epochs of the demo's 2,400 rows (600 steps, as before), 4 epochs of a 200,000-row
sample (3,128 steps; ~10 s for the default embedding MLP on 2 cores).

Training runs on one intra-op thread: these networks are too small for a thread pool to
pay, and on a busy machine its spinning threads cost far more than they give (measured
on the 2-core VM under load 6: 2 ms a step of the default embedding MLP on one thread,
25-100 ms on two).

Layer 0 (`Encode`) already holds the schema's mean and std, computed over every row
in pass 1, so no scaling is fitted here. A cascade is refused before anything is read
(see `refusal`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from flywheel.modelspec import AnySpec, CascadeSpec, FactoryError, build_module, training_losses

LR = 1e-2
BATCH = 256
TARGET_STEPS = 3000
MAX_EPOCHS = 60


def epochs_for(rows: int) -> int:
    """Epochs for about `TARGET_STEPS` steps over `rows` rows (1 to `MAX_EPOCHS`).

    >>> epochs_for(2400), epochs_for(200_000), epochs_for(10_000_000)
    (60, 4, 1)
    """
    batches = max(1, math.ceil(rows / BATCH))
    return max(1, min(MAX_EPOCHS, math.ceil(TARGET_STEPS / batches)))


def refusal(spec: AnySpec) -> str | None:
    """Why `init` will not train `spec` (None: it will)."""
    if isinstance(spec, CascadeSpec):
        return (
            "init does not train a cascade: the online learner continues only single "
            "networks (mlp, logistic, embed_mlp), so the lineage would stop at v1, and a "
            "cascade's threshold is calibrated on a holdout it must not train on; init an "
            "mlp and build the cascade from it (docs/serving.md)"
        )
    return None


def build(spec: AnySpec, factories: tuple[str, ...]) -> nn.Module:
    """A fresh module for `spec`; ValueError (FactoryError) if a factory is not trusted."""
    why = refusal(spec)
    if why:
        raise ValueError(why)
    try:
        return build_module(spec, factories=factories)
    except FactoryError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise FactoryError(f"the model cannot be built: {exc}") from exc


def train(
    spec: AnySpec,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    factories: tuple[str, ...] = (),
    epochs: int | None = None,
) -> tuple[nn.Module, int]:
    """(trained module in eval mode, epochs run) on raw rows `x` and label indices `y`.

    Deterministic for a seed: the initial weights, the shuffle and dropout all draw from
    generators seeded with it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(spec, x, y, seed=seed, factories=factories, epochs=epochs)
    finally:
        torch.set_num_threads(threads)


def _train(
    spec: AnySpec,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    factories: tuple[str, ...],
    epochs: int | None,
) -> tuple[nn.Module, int]:
    torch.manual_seed(seed)
    module = build(spec, factories)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    epochs = epochs_for(len(xt)) if epochs is None else epochs
    opt = torch.optim.Adam(module.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    module.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(BATCH):
            opt.zero_grad()
            training_losses(module, xt[idx], yt[idx]).mean().backward()
            opt.step()
    module.eval()
    return module, epochs
