"""The settings groups the service reads, and nothing else.

The service reads eight groups (its own limits, app keys, the event log, the broker, the registry it
follows, where state lives, the trusted seed it bootstraps a first model from, and whether
the gate promotes by itself, which the review page shows), so it takes them as one frozen
value instead of the whole `Settings`: what the service depends on is written here, and a
type checker refuses a `Settings` (or a wrong group) where the service expects its groups.
Process start-up and tests build it with `ServiceConfig.of(settings)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.settings import (
    AccessSettings,
    EventLogSettings,
    GateSettings,
    KafkaSettings,
    RegistrySettings,
    RetrySettings,
    ServiceSettings,
    Settings,
    StateSettings,
    TrustedSettings,
    gather,
)


@dataclass(frozen=True)
class ServiceConfig:
    """What `create_app` reads."""

    service: ServiceSettings
    event_log: EventLogSettings
    kafka: KafkaSettings
    registry: RegistrySettings
    state: StateSettings
    trusted: TrustedSettings
    gate: GateSettings
    access: AccessSettings
    retry: RetrySettings  # how a first load waits out the registry (flywheel.retry)

    @classmethod
    def of(cls, settings: Settings) -> ServiceConfig:
        """The service's groups of a whole configuration (for the wiring at a process's edge)."""
        return gather(cls, settings)
