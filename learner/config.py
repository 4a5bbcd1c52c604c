"""The settings groups the online learner reads, gathered once where its process starts.

The learner reads seven groups (its own, the gate's, privacy, the trusted seed data, the
registered model's name, where the store lives, the broker for promotion events) and the
precision the service serves at (the gate reports the candidate's accuracy at it). Seven
parameters would hide which one a call site forgot; one frozen record built by
`LearnerConfig.of(settings)` at the edge keeps the whole `Settings` out of the learner, and
a test builds just the groups it changes (`LearnerConfig(learner=LearnerSettings(...))`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flywheel.settings import (
    GateSettings,
    KafkaSettings,
    LearnerSettings,
    PrivacySettings,
    RegistrySettings,
    Settings,
    StateSettings,
    TrustedSettings,
)


@dataclass(frozen=True)
class LearnerConfig:
    """What `OnlineLearner` reads; every group defaults to its own defaults."""

    learner: LearnerSettings = field(default_factory=LearnerSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    trusted: TrustedSettings = field(default_factory=TrustedSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    state: StateSettings = field(default_factory=StateSettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    serve_precision: str = "fp32"  # FLYWHEEL_SERVE_PRECISION, a service setting

    @classmethod
    def of(cls, settings: Settings) -> LearnerConfig:
        """The groups of a whole `Settings`: for the wiring (CLI, demo, tests)."""
        return cls(learner=settings.learner, gate=settings.gate, privacy=settings.privacy,
                   trusted=settings.trusted, registry=settings.registry, state=settings.state,
                   kafka=settings.kafka, serve_precision=settings.service.serve_precision)
