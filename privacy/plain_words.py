"""What a privacy budget means for one person, in plain words (demo summary, docs).

(ε, δ)-DP bounds how much seeing every released model can move anyone's belief about one
privacy unit's data: the odds of any yes/no fact about it (that it sent a correction,
which label it gave) grow by at most e^ε, except with probability δ. Stated as a belief
that starts at `prior`, the most it can become is e^ε·p / (e^ε·p + 1 − p): at ε = 3 a 1 %
suspicion can become at most 16.9 %, a coin flip at most 95.3 %.
"""

from __future__ import annotations

import math


def posterior_bound(epsilon: float, prior: float) -> float:
    """The most a belief held at `prior` can become after every release, at `epsilon`."""
    if not 0 <= prior <= 1 or epsilon < 0:
        raise ValueError(f"need 0 <= prior <= 1 and epsilon >= 0, got {prior}, {epsilon}")
    grown = math.exp(epsilon) * prior
    return grown / (grown + 1 - prior)


def epsilon_in_words(epsilon: float, delta: float, unit: str = "source") -> str:
    """One paragraph for a person whose data is one `unit`, at a lifetime budget `epsilon`
    per model lineage (the budget never renews: a year or ten, the bound is the same)."""
    return (
        f"ε = {epsilon:g} (δ = {delta:g}) per {unit}, for the whole life of the model "
        f"lineage, not per update nor per year: whatever someone knew beforehand, every "
        f"model version ever released from your data (a year of them, or all of them) "
        f"changes the odds they can give any one fact about your {unit}'s data — that it "
        f"sent a correction, which label it gave — by at most e^{epsilon:g} ≈ "
        f"{math.exp(epsilon):.0f}×, except with probability {delta:g}. A 1 % suspicion can "
        f"rise to at most {100 * posterior_bound(epsilon, 0.01):.1f} %, a coin flip to at "
        f"most {100 * posterior_bound(epsilon, 0.5):.1f} %. Once your {unit} has spent it, its new "
        f"corrections are no longer trained on."
    )


__all__ = ["epsilon_in_words", "posterior_bound"]
