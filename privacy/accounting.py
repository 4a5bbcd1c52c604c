"""How much ε a sequence of DP-SGD updates spends: Opacus accountants, dp-accounting check.

Each update is recorded as a `Mechanism`: `steps` applications of the Poisson-subsampled
Gaussian mechanism with sampling rate `sample_rate` and noise multiplier `noise_multiplier`.
A source's ε is the composition of the mechanisms of the updates it took part in, so the
same function serves a whole lineage and a single source.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

Accountant = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
PRV_EPS_ERROR = 1e-3


@dataclass(frozen=True, order=True)
class Mechanism:
    """`steps` Poisson-subsampled Gaussian steps; hashable so results can be cached."""

    sample_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.noise_multiplier <= 0:
            raise ValueError(
                f"noise_multiplier must be > 0 for a finite ε, got {self.noise_multiplier}"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def epsilon(mechanisms: Iterable[Mechanism], delta: float, accountant: Accountant = "rdp") -> float:
    """ε of the composition of `mechanisms` at `delta`, by the Opacus accountant named."""
    steps: dict[tuple[float, float], int] = {}
    for m in mechanisms:  # same (q, σ): steps add, so merge them (and cache better)
        steps[(m.sample_rate, m.noise_multiplier)] = (
            steps.get((m.sample_rate, m.noise_multiplier), 0) + m.steps
        )
    key = tuple(sorted(Mechanism(q, sigma, n) for (q, sigma), n in steps.items()))
    if not key:
        return 0.0
    return _epsilon(key, float(delta), accountant)


@lru_cache(maxsize=4096)
def _epsilon(mechanisms: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    acc.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in mechanisms]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha" is expected
        if accountant == "prv":  # Opacus' default error (0.01) is ~1 % off the exact PLD
            return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
        return float(acc.get_epsilon(delta=delta))


def dp_accounting_epsilon(
    mechanisms: Sequence[Mechanism], delta: float, accountant: Accountant = "rdp"
) -> float:
    """The same ε by Google's dp-accounting (RDP, or PLD for "prv"): the cross-check."""
    from dp_accounting import (
        ComposedDpEvent,
        GaussianDpEvent,
        PoissonSampledDpEvent,
        SelfComposedDpEvent,
    )
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    event = ComposedDpEvent(
        [
            SelfComposedDpEvent(
                PoissonSampledDpEvent(m.sample_rate, GaussianDpEvent(m.noise_multiplier)), m.steps
            )
            for m in mechanisms
        ]
    )
    acc = RdpAccountant() if accountant == "rdp" else PLDAccountant()
    absl = logging.getLogger("absl")  # warns about orders it skips, as Opacus does
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        return float(acc.compose(event).get_epsilon(delta))
    finally:
        absl.setLevel(level)


def noise_for_budget(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
) -> float:
    """The smallest noise multiplier for which `steps` steps stay within `target_epsilon`."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.005,
            )
        )
