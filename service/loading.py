"""Getting the champion from the registry into a servable, warmed model."""

from __future__ import annotations

from flywheel.learner import ensure_champion
from flywheel.registry import Registry
from flywheel.service.model_holder import ServedModel
from flywheel.settings import Settings


def load_champion(settings: Settings, registry: Registry) -> ServedModel:
    """Load the version behind alias `champion`, bootstrapping one if the registry is empty."""
    version = ensure_champion(settings, registry)
    loaded = registry.load(version)
    return ServedModel.prepare(loaded.name, loaded.version, loaded.spec, loaded.module,
                               settings.serve_precision)
