"""What one site does in one round, without Flower: read its store, train, clip the update.

Kept free of Flower so the same code runs inside the ClientApp, in the tests' local-only
baselines and in `bench fedaccuracy`. Nothing here returns rows: `LocalResult` holds the
new weights and aggregate numbers only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy.engine import Engine
from torch import nn

from flywheel.learner.trainer import dp_engine
from flywheel.modelspec import Blend, training_losses
from flywheel.privacy import Mechanism, PrivateBatch, dp_update


@dataclass(frozen=True)
class SiteData:
    """A site's trainable rows as arrays; `sources` are small ints, one per contributor."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    sources: np.ndarray
    contributors: tuple[str, ...]  # index -> contributor id (stays on the site)

    def __len__(self) -> int:
        return len(self.y)


def read_site_data(
    engine: Engine, labels: Mapping[str, int], *, limit: int, max_per_source: int | None = None
) -> SiteData:
    """The newest `limit` trainable examples of this site's store (seed rows excluded),
    at most `max_per_source` per contributor (the DP bound), as arrays."""
    from flywheel.learner.example_source import ExampleSource, bound_per_contributor

    rows = [r for r in ExampleSource(engine).newest_trainable(limit) if r.label in labels]
    groups, _ = bound_per_contributor(rows, max_per_source)
    keep = sorted((r for g in groups.values() for r in g), key=lambda r: r.id)
    contributors = tuple(sorted({r.contributor for r in keep}))
    index = {c: i for i, c in enumerate(contributors)}
    if not keep:
        return SiteData(
            np.empty((0, 0), np.float32),
            np.empty(0, np.int64),
            np.empty(0, np.float32),
            np.empty(0, np.int64),
            (),
        )
    return SiteData(
        np.asarray([r.features for r in keep], np.float32),
        np.asarray([labels[r.label] for r in keep], np.int64),
        np.minimum(np.asarray([r.weight for r in keep], np.float32), 1.0),
        np.asarray([index[r.contributor] for r in keep], np.int64),
        contributors,
    )


@dataclass(frozen=True)
class LocalResult:
    """One site's contribution to one round: weights and aggregate numbers, nothing else."""

    state: dict[str, torch.Tensor]
    examples: int
    sources: int
    loss: float
    accuracy: float
    update_norm: float  # before clipping (stays on the site; only `clipped` is reported)
    clipped: bool
    seconds: float


def update_norm(new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> float:
    total = sum(
        (((new[k].double() - base[k].double()) ** 2).sum() for k in base),
        torch.zeros((), dtype=torch.float64),
    )
    return float(torch.sqrt(total))


def clip_update(
    new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], max_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """base + (new − base)·min(1, C/‖new − base‖): the update, clipped to L2 norm C."""
    norm = update_norm(new, base)
    scale = min(1.0, max_norm / max(norm, 1e-12))
    return {k: (base[k] + (new[k] - base[k]) * scale).to(base[k].dtype) for k in base}, norm


def train_locally(
    module: nn.Module,
    data: SiteData,
    *,
    steps: int,
    lr: float,
    clip: float,
    mechanism: Mechanism | None,
    max_grad_norm: float,
    seed: int,
    engine: str = "auto",
    public: tuple[np.ndarray, np.ndarray] | None = None,
) -> LocalResult:
    """Train `module` (a copy of the global model) on the site's data and clip the update.

    With `mechanism`, DP-SGD from flywheel.privacy (per-source clipping to
    `max_grad_norm`, Gaussian noise, Poisson sampling of sources); without it, plain
    full-batch Adam steps (a site that turned privacy off). `public` rows (the platform's
    seed data, sent with the model) join every step unaccounted, as the online learner's
    public replay does: they keep the model from forgetting what the trusted holdout checks.
    """
    started = time.perf_counter()
    base = {k: v.detach().clone() for k, v in module.state_dict().items()}
    # Under DP a Blend trains only the head it favours (`Blend.favoured`), as central DP
    # updates do (`Blend.commit`): all of the per-example clip, and of the update's clip
    # below, goes to that head and none of the noise to the other. Its mixture weights
    # stay as they came (they are part of the update the server averages).
    trained = module.favoured() if mechanism is not None and isinstance(module, Blend) else module
    # plain SGD: Adam would scale DP noise up to full-size steps on every coordinate, and
    # the server clips the update's norm, so noise would crowd the signal out
    optimizer = torch.optim.SGD(
        [p for p in trained.parameters() if p.requires_grad], lr=lr, momentum=0.9
    )
    generator = torch.Generator().manual_seed(seed)
    px, py = (
        public
        if public is not None
        else (np.empty((0, data.x.shape[1]), np.float32), np.empty(0, np.int64))
    )
    if mechanism is not None:
        batch = PrivateBatch(
            x=np.concatenate([data.x, px]),
            y=np.concatenate([data.y, py]),
            weight=np.concatenate([data.w, np.ones(len(py), np.float32)]),
            sources=np.concatenate([data.sources, np.full(len(py), -1, np.int64)]),
            public=np.concatenate([np.zeros(len(data), bool), np.ones(len(py), bool)]),
        )
        stats = dp_update(
            trained,
            optimizer,
            batch,
            steps=mechanism.steps,
            sample_rate=mechanism.sample_rate,
            noise_multiplier=mechanism.noise_multiplier,
            max_grad_norm=max_grad_norm,
            generator=generator,
            engine=dp_engine(engine),
        )
        loss = stats.loss
    else:
        x = torch.from_numpy(np.concatenate([data.x, px]))
        y = torch.from_numpy(np.concatenate([data.y, py]))
        w = torch.from_numpy(np.concatenate([data.w, np.ones(len(py), np.float32)]))
        module.train()
        loss = 0.0
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            out = (training_losses(module, x, y) * w).sum() / w.sum()
            out.backward()
            optimizer.step()
            loss = float(out.detach())
        module.eval()
    new = {k: v.detach().clone() for k, v in module.state_dict().items()}
    state, norm = clip_update(new, base, clip)
    module.load_state_dict(state)
    with torch.inference_mode():
        acc = float((module(torch.from_numpy(data.x)).argmax(1).numpy() == data.y).mean())
    return LocalResult(
        state,
        len(data),
        len(data.contributors),
        float(loss),
        acc,
        norm,
        norm > clip,
        time.perf_counter() - started,
    )
