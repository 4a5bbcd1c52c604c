"""Budget enforcement: decide, before an update trains, who may take part and at what ε.

A source whose ε would pass the lineage's budget is left out of the update (its examples
are never trained on by this lineage); an update whose mechanism alone would pass the
budget, or that has no source left, is refused. Nothing here ever lowers the noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from flywheel.privacy.accounting import Accountant, Mechanism, epsilon
from flywheel.privacy.ledger import PrivacyLedger


class BudgetRefused(RuntimeError):
    """An update that would exceed the privacy budget; raised before any training."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind  # metric label: "mechanism" or "exhausted"


@dataclass(frozen=True)
class BudgetPlan:
    mechanism: Mechanism
    epsilon_update: float  # a source taking part in this update only
    epsilon_lineage: float  # the worst source after this update
    allowed: dict[str, float] = field(default_factory=dict)  # source -> ε after
    excluded: dict[str, float] = field(default_factory=dict)  # source -> ε so far


def plan_update(
    ledger: PrivacyLedger,
    lineage: str,
    sources: Mapping[str, int],
    mechanism: Mechanism,
    *,
    budget: float,
    delta: float,
    accountant: Accountant,
    since: datetime | None = None,
) -> BudgetPlan:
    """Who of `sources` (privacy unit -> examples) can afford `mechanism` within `budget`;
    `since`: count only the spending from then on (a renewing budget's window,
    `BudgetPolicy.since`), else all of it."""
    alone = epsilon([mechanism], delta, accountant)
    if alone > budget:
        raise BudgetRefused(
            f"refused: one update (q={mechanism.sample_rate:g}, σ={mechanism.noise_multiplier:g}"
            f", {mechanism.steps} steps) spends ε={alone:.3f} > budget {budget:g} at "
            f"δ={delta:g}; raise FLYWHEEL_PRIVACY_NOISE_MULTIPLIER or lower the steps",
            "mechanism",
        )
    history = ledger.histories(lineage, sources, since)
    allowed, excluded = {}, {}
    # sources with the same past spend the same: one accounting per distinct past (in the
    # demo an update has 38-179 sources and 1-3 distinct pasts: 0.12 s a step before)
    after_of: dict[tuple[Mechanism, ...], tuple[float, float | None]] = {}
    for source in sources:
        past = tuple(history.get(source, []))
        if past not in after_of:
            after = epsilon([*past, mechanism], delta, accountant)
            after_of[past] = (after, None if after <= budget else epsilon(past, delta, accountant))
        after, before = after_of[past]
        if before is None:
            allowed[source] = after
        else:
            excluded[source] = before
    if not allowed:
        raise BudgetRefused(
            f"refused: all {len(sources)} sources of this update have spent their budget "
            f"ε={budget:g}; their examples are not trained on",
            "exhausted",
        )
    lineage_eps = max(ledger.lineage_epsilon(lineage), max(allowed.values()))
    return BudgetPlan(mechanism, alone, lineage_eps, allowed, excluded)
