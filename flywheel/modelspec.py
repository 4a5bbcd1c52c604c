"""Model specs: an architecture described as data, so a version loads without pickles."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class ModelSpec(BaseModel):
    """An MLP classifier over a fixed-width float vector with a named label set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["mlp"] = "mlp"
    input_dim: int = Field(ge=1, le=100_000)
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    labels: list[str] = Field(min_length=2)
    activation: Literal["relu", "tanh", "gelu"] = "relu"

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, got {self.labels}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {self.hidden}")
        return self

    def label_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}


class Standardize(nn.Module):
    """Feature scaling that travels with the weights (buffers are in the state_dict)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def fit(self, x: torch.Tensor) -> None:
        self.mean.copy_(x.mean(dim=0))
        self.scale.copy_(x.std(dim=0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def build_model(spec: ModelSpec) -> nn.Sequential:
    """A fresh module for `spec`; layer 0 is always the `Standardize` step."""
    layers: list[nn.Module] = [Standardize(spec.input_dim)]
    width = spec.input_dim
    for h in spec.hidden:
        layers += [nn.Linear(width, h), _ACTIVATIONS[spec.activation]()]
        width = h
    layers.append(nn.Linear(width, len(spec.labels)))
    return nn.Sequential(*layers)
