"""DP settings of one lineage, and the noise they imply."""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.privacy.accounting import Accountant, Mechanism, noise_for_budget
from flywheel.settings import Settings


@dataclass(frozen=True)
class DPConfig:
    epsilon: float = 3.0  # budget per source and lineage
    delta: float = 1e-5
    noise_multiplier: float | None = None  # None: calibrated from the budget
    max_grad_norm: float = 1.0
    sample_rate: float = 0.5  # each source's chance to be in one step
    source_updates: int = 2  # updates one source may join within the budget
    max_per_source: int = 16
    accountant: Accountant = "rdp"
    engine: str = "auto"

    @classmethod
    def from_settings(cls, settings: Settings) -> DPConfig:
        return cls(epsilon=settings.privacy_epsilon, delta=settings.privacy_delta,
                   noise_multiplier=settings.privacy_noise_multiplier,
                   max_grad_norm=settings.privacy_max_grad_norm,
                   sample_rate=settings.privacy_sample_rate,
                   source_updates=settings.privacy_source_updates,
                   max_per_source=settings.privacy_max_per_source,
                   accountant=settings.privacy_accountant, engine=settings.privacy_engine)

    def mechanism(self, steps: int) -> Mechanism:
        """The update's mechanism: explicit σ, or the σ that lets a source join
        `source_updates` updates of `steps` steps within the budget."""
        sigma = self.noise_multiplier
        if sigma is None:
            sigma = noise_for_budget(self.epsilon, self.delta, self.sample_rate,
                                     steps * self.source_updates, self.accountant)
        return Mechanism(self.sample_rate, round(float(sigma), 6), steps)
