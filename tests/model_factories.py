"""A model factory for tests (`FLYWHEEL_MODEL_FACTORIES=tests`), as a team's package has."""

from __future__ import annotations

from torch import nn


def two_layers(in_features: int, n_classes: int, hidden: int = 16) -> nn.Module:
    """A small MLP over the encoded input."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
