"""Flywheel's shared contracts: settings, event schemas, model specs, registry conventions.

Every component may import this package; components talk to each other only through
Kafka, the training store, the registry and each other's public API.
"""

from flywheel.events import CorrectionEvent, DeadLetter, PredictionEvent
from flywheel.modelspec import ModelSpec, build_model
from flywheel.settings import Settings, SettingsError, load_settings

__all__ = [
    "CorrectionEvent", "DeadLetter", "ModelSpec", "PredictionEvent", "Settings",
    "SettingsError", "build_model", "load_settings",
]
