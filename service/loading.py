"""Getting the champion from the registry into a servable, warmed model."""

from __future__ import annotations

from flywheel.learner import ensure_champion
from flywheel.registry import Registry
from flywheel.service.model_holder import ServedModel
from flywheel.settings import ServiceSettings, TrustedSettings


def load_champion(
    registry: Registry, trusted: TrustedSettings, service: ServiceSettings
) -> ServedModel:
    """Load the version behind alias `champion`, bootstrapping one from the `trusted` seed
    data if the registry is empty; served at `service`'s `serve_precision`."""
    version = ensure_champion(trusted, registry)
    loaded = registry.load(version)
    return ServedModel.prepare(
        loaded.name, loaded.version, loaded.spec, loaded.module, service.serve_precision
    )
