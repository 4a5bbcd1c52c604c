"""Flywheel's shared contracts: settings, event schemas, model specs, registry conventions.

Every component may import this package; components talk to each other only through
Kafka, the training store, the registry and each other's public API. Exports are loaded
lazily so that `flywheel <command>` does not pay for torch unless the command needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CorrectionEvent": "flywheel.events",
    "DeadLetter": "flywheel.events",
    "PredictionEvent": "flywheel.events",
    "ModelSpec": "flywheel.modelspec",
    "build_model": "flywheel.modelspec",
    "Settings": "flywheel.settings",
    "SettingsError": "flywheel.settings",
    "load_settings": "flywheel.settings",
}
__all__ = [
    "CorrectionEvent",
    "DeadLetter",
    "ModelSpec",
    "PredictionEvent",
    "Settings",
    "SettingsError",
    "build_model",
    "load_settings",
]

if TYPE_CHECKING:
    from flywheel.events import CorrectionEvent, DeadLetter, PredictionEvent
    from flywheel.modelspec import ModelSpec, build_model
    from flywheel.settings import Settings, SettingsError, load_settings


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flywheel' has no attribute {name!r}")
