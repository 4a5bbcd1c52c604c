"""Model specs: an architecture described as data, so a version loads without pickles.

Two kinds: `ModelSpec` (`kind: "mlp"`, what the learner trains) and `CascadeSpec`
(`kind: "cascade"`: a light and a heavy MLP, see docs/serving.md). `parse_spec` and
`build_module` take either.
"""

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

    mean: torch.Tensor  # registered buffers: typed here because nn.Module.__getattr__ is not
    scale: torch.Tensor

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


ALWAYS_HEAVY = 2.0  # a cascade threshold above 1: no row is ever answered by the light net


class CascadeSpec(BaseModel):
    """Adaptive compute: a light MLP answers a row when its top probability is at least
    `threshold`; every other row escalates to the heavy MLP.

    `threshold` 0 answers everything with the light net, anything above 1 (`ALWAYS_HEAVY`)
    sends everything to the heavy one. `calibration` keeps the numbers the threshold was
    chosen from (holdout accuracies, light share), for reviewers.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["cascade"] = "cascade"
    input_dim: int = Field(ge=1, le=100_000)
    labels: list[str] = Field(min_length=2)
    light: list[int] = Field(default_factory=lambda: [16])
    heavy: list[int] = Field(default_factory=lambda: [256, 256])
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    threshold: float = Field(default=ALWAYS_HEAVY, ge=0.0, le=ALWAYS_HEAVY)
    calibration: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> CascadeSpec:
        for which in ("light", "heavy"):
            self.part(which)  # raises as a plain MLP spec would
        return self

    def part(self, which: Literal["light", "heavy"]) -> ModelSpec:
        """The plain MLP spec of one of the two networks."""
        return ModelSpec(
            input_dim=self.input_dim,
            labels=self.labels,
            hidden=self.light if which == "light" else self.heavy,
            activation=self.activation,
        )

    def label_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}


AnySpec = ModelSpec | CascadeSpec


class Cascade(nn.Module):
    """The light and heavy networks of a `CascadeSpec`; `forward` returns the logits of
    whichever network answered each row, and computes the heavy net only for the rows
    that escalate."""

    def __init__(self, spec: CascadeSpec) -> None:
        super().__init__()
        self.light = build_model(spec.part("light"))
        self.heavy = build_model(spec.part("heavy"))
        self.threshold = float(spec.threshold)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, escalated): `escalated[i]` is True where the heavy net answered row i."""
        logits = self.light(x)
        escalated = torch.softmax(logits.float(), dim=1).amax(dim=1) < self.threshold
        rows = escalated.nonzero().squeeze(1)
        if rows.numel():
            heavy = self.heavy(x.index_select(0, rows)).to(logits.dtype)
            logits = logits.index_copy(0, rows, heavy)
        return logits, escalated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(x)[0]


def parse_spec(doc: dict) -> AnySpec:
    """A spec from its JSON form, by `kind` (a missing kind is an MLP, as before cascades)."""
    cascade = isinstance(doc, dict) and doc.get("kind") == "cascade"
    return (CascadeSpec if cascade else ModelSpec).model_validate(doc)


def build_module(spec: AnySpec) -> nn.Module:
    """A fresh module for either kind of spec."""
    return Cascade(spec) if isinstance(spec, CascadeSpec) else build_model(spec)
