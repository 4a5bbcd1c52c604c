"""The settings groups the online learner reads, gathered once where its process starts.

The learner reads seven groups (its own, the gate's, privacy, the trusted seed data, the
registered model's name, where the store lives, the broker for promotion events) and the
precision the service serves at (the gate reports the candidate's accuracy at it). Seven
positional groups would invite swapping two; one frozen record built by
`LearnerConfig.of(settings)` at the edge keeps the whole `Settings` out of the learner, and
a test changes one group with `dataclasses.replace(config, learner=LearnerSettings(...))`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.settings import (
    GateSettings,
    KafkaSettings,
    LearnerSettings,
    PrivacySettings,
    RegistrySettings,
    RetrySettings,
    Settings,
    StateSettings,
    TrustedSettings,
    gather,
)


@dataclass(frozen=True)
class LearnerConfig:
    """What `OnlineLearner` reads."""

    learner: LearnerSettings
    gate: GateSettings
    privacy: PrivacySettings
    trusted: TrustedSettings
    registry: RegistrySettings
    state: StateSettings
    kafka: KafkaSettings
    retry: RetrySettings  # how failed steps wait out the store or registry
    serve_precision: str  # FLYWHEEL_SERVE_PRECISION, a service setting

    @classmethod
    def of(cls, settings: Settings) -> LearnerConfig:
        """The groups of a whole `Settings`: for the wiring (CLI, demo, tests)."""
        return gather(cls, settings, serve_precision=settings.service.serve_precision)
