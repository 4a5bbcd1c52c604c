"""DP settings of one lineage, and the noise they imply.

`DPConfig` has no defaults of its own: it is always built from `PrivacySettings`, where
every privacy default lives, so the learner, a federated site and the benchmarks cannot
drift apart. A caller that trains at another sampling rate (a federated site) replaces
that one field (`dataclasses.replace`).
"""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.privacy.accounting import (
    Accountant,
    Mechanism,
    noise_for_budget,
    tree_noise_for_budget,
)
from flywheel.privacy.policy import BudgetPolicy, Policy
from flywheel.settings import PrivacySettings


@dataclass(frozen=True)
class DPConfig:
    epsilon: float  # budget per privacy unit and lineage (for life, or per period)
    delta: float
    noise_multiplier: float | None  # None: calibrated from the budget
    max_grad_norm: float
    sample_rate: float  # each source's chance to be in one step
    source_updates: int  # updates one source may join within the budget
    max_per_source: int
    accountant: Accountant
    engine: str
    mechanism_kind: str  # "dp-sgd" or "dp-ftrl"
    ftrl_lr: float
    budget_policy: Policy = "lifetime"
    budget_period_days: float = 30.0

    @classmethod
    def from_settings(cls, privacy: PrivacySettings) -> DPConfig:
        return cls(
            epsilon=privacy.privacy_epsilon,
            delta=privacy.privacy_delta,
            noise_multiplier=privacy.privacy_noise_multiplier,
            max_grad_norm=privacy.privacy_max_grad_norm,
            sample_rate=privacy.privacy_sample_rate,
            source_updates=privacy.privacy_source_updates,
            max_per_source=privacy.privacy_max_per_source,
            accountant=privacy.privacy_accountant,
            engine=privacy.privacy_engine,
            mechanism_kind=privacy.privacy_mechanism,
            ftrl_lr=privacy.privacy_ftrl_lr,
            budget_policy=privacy.privacy_budget_policy,
            budget_period_days=privacy.privacy_budget_period_days,
        )

    @property
    def policy(self) -> BudgetPolicy:
        """How long the budget lasts (FLYWHEEL_PRIVACY_BUDGET_POLICY)."""
        return BudgetPolicy(self.budget_policy, self.epsilon, self.delta, self.budget_period_days)

    def mechanism(self, steps: int) -> Mechanism:
        """The update's mechanism: explicit σ, or the σ that lets a source join
        `source_updates` updates of `steps` steps within the budget. DP-FTRL: one tree of
        `steps` leaves per update (no sampling), σ per tree node."""
        sigma = self.noise_multiplier
        if self.mechanism_kind == "dp-ftrl":
            if sigma is None:
                sigma = tree_noise_for_budget(self.epsilon, self.delta, steps, self.source_updates)
            return Mechanism(1.0, round(float(sigma), 6), steps, "tree")
        if sigma is None:
            sigma = noise_for_budget(
                self.epsilon,
                self.delta,
                self.sample_rate,
                steps * self.source_updates,
                self.accountant,
            )
        return Mechanism(self.sample_rate, round(float(sigma), 6), steps)
