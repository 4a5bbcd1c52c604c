"""The initial model: trained on seed data when the registry has no champion yet."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from flywheel.learner.evaluation import Holdout
from flywheel.learner.evaluation import accuracy as holdout_accuracy
from flywheel.modelspec import ModelSpec, Standardize, build_model
from flywheel.registry import ModelVersion, Registry
from flywheel.settings import TrustedSettings
from flywheel.store import HOLDOUT_FRACTION, seed_data
from flywheel.streams import LABELS, N_FEATURES

log = logging.getLogger(__name__)


def default_spec() -> ModelSpec:
    return ModelSpec(input_dim=N_FEATURES, hidden=[64, 64], labels=list(LABELS))


def accuracy(module: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy on seed rows (labels index `LABELS`, the default spec's labels): the scorer
    the gate and the review use (`flywheel.learner.evaluation`)."""
    return holdout_accuracy(module, Holdout(x, y))


def train_seed_model(
    trusted: TrustedSettings, epochs: int = 60
) -> tuple[ModelSpec, nn.Module, dict]:
    torch.manual_seed(trusted.seed)
    x_tr, y_tr, x_ho, y_ho = seed_data(trusted)
    spec = default_spec()
    module = build_model(spec)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    standardize = module[0]
    assert isinstance(standardize, Standardize)  # build_model puts it first, always
    standardize.fit(xt)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(trusted.seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(256):
            opt.zero_grad()
            loss_fn(module(xt[idx]), yt[idx]).backward()
            opt.step()
    module.eval()
    metrics = {
        "train_accuracy": accuracy(module, x_tr, y_tr),
        "holdout_accuracy": accuracy(module, x_ho, y_ho),
    }
    return spec, module, metrics


def ensure_champion(trusted: TrustedSettings, registry: Registry) -> ModelVersion:
    """Return the champion version, registering a seed-trained one if the registry is empty."""
    current = registry.champion_version()
    if current is not None:
        return current
    spec, module, metrics = train_seed_model(trusted)
    n_train = int(trusted.seed_examples * (1 - HOLDOUT_FRACTION))
    version = registry.publish(
        spec,
        module,
        tags={
            "parent_version": "",
            "source": "manual",
            "examples": f"seed[0,{n_train})",
            "epsilon": "none",
            "delta": "none",
            "gate": "initial: no champion to compare",
        },
        params={"seed": trusted.seed, "seed_examples": trusted.seed_examples},
        metrics=metrics,
    )
    first = registry.champion_version()
    if first is not None:  # another process bootstrapped first
        return first
    registry.set_champion(version)
    log.info(
        "registered initial model %s v%s (holdout accuracy %.3f)",
        registry.name,
        version,
        metrics["holdout_accuracy"],
    )
    return version
