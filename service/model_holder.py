"""The served model and its atomic swap.

A request takes one `ServedModel` snapshot and uses it to the end, so a swap never
mixes versions inside a request, and the response names the version that produced it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import torch
from torch import nn

from flywheel.events import utcnow
from flywheel.modelspec import ModelSpec


class ModelNotReady(RuntimeError):
    """No model has been loaded yet."""


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    spec: ModelSpec
    module: nn.Module
    loaded_at: datetime

    @classmethod
    def prepare(cls, name: str, version: str, spec: ModelSpec, module: nn.Module) -> ServedModel:
        """Freeze and warm a module before it can be swapped in."""
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        served = cls(name, version, spec, module, utcnow())
        served.predict_proba(np.zeros((1, spec.input_dim), dtype=np.float32))
        return served

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(self.module(torch.from_numpy(x)), dim=1).numpy()


class ModelHolder:
    def __init__(self) -> None:
        self._current: ServedModel | None = None
        self._lock = threading.Lock()

    def current(self) -> ServedModel:
        model = self._current
        if model is None:
            raise ModelNotReady("no model loaded yet")
        return model

    @property
    def ready(self) -> bool:
        return self._current is not None

    def swap(self, model: ServedModel) -> ServedModel | None:
        """Make `model` the one new requests use; returns the one it replaced."""
        with self._lock:
            previous, self._current = self._current, model
        return previous
