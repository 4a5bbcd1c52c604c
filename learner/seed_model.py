"""The initial model of the synthetic problem, and the bootstrap of an empty deployment.

`ensure_champion` bootstraps through `flywheel init` (`flywheel.learner.init`);
`train_seed_model` trains the synthetic problem in memory, for tests that need a model of
it without a store or a registry.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flywheel.learner.evaluation import Holdout
from flywheel.learner.evaluation import accuracy as holdout_accuracy
from flywheel.modelspec import ModelSpec, Standardize, build_sequential
from flywheel.registry import ModelVersion, Registry
from flywheel.settings import TrustedSettings
from flywheel.store import seed_data
from flywheel.streams import LABELS, N_FEATURES


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
    module = build_sequential(spec)
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
    """The champion version; on a new deployment (no champion, no trusted data set), the
    synthetic demo problem is written to a CSV under FLYWHEEL_HOME and imported by the
    same `init` path a user's file takes (`flywheel.learner.init.bootstrap_champion`).

    The store is the registry's deployment's (`registry.state`); a store with no schema
    yet is created, an older one refused (`SchemaNotCurrent`).
    """
    from flywheel.learner.init import bootstrap_champion

    return bootstrap_champion(trusted, registry)
