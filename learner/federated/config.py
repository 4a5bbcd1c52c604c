"""The settings groups a federated run's platform side reads, gathered once at its edge.

`FederatedRun` reads eight groups (rounds and timeouts, the gate, δ and the accountant, the
trusted seed holdout, the model's name, the store, the broker for promotion events) and the
precision the service serves at; one frozen record built by `FederatedConfig.of(settings)`
where the ServerApp starts keeps the whole `Settings` out of the run.
"""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.settings import (
    FederatedSettings,
    GateSettings,
    KafkaSettings,
    PrivacySettings,
    RegistrySettings,
    Settings,
    StateSettings,
    TrustedSettings,
    gather,
)


@dataclass(frozen=True)
class FederatedConfig:
    """What `FederatedRun` reads."""

    federated: FederatedSettings
    gate: GateSettings
    privacy: PrivacySettings
    trusted: TrustedSettings
    registry: RegistrySettings
    state: StateSettings
    kafka: KafkaSettings
    serve_precision: str  # FLYWHEEL_SERVE_PRECISION, a service setting

    @classmethod
    def of(cls, settings: Settings) -> FederatedConfig:
        """The groups of a whole `Settings`: for the wiring (ServerApp, CLI, tests)."""
        return gather(cls, settings, serve_precision=settings.service.serve_precision)
