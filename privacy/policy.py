"""The budget policy: how long a privacy unit's ε budget lasts, and what that promises.

* `lifetime`: a unit (a data subject, else a prediction) spends its budget once per lineage;
  once spent, its new data is never trained on by that lineage.
* `renewing`: the budget holds for every window of `period_days`. Before an update, a unit's
  ε is composed over the ledger entries it took part in during the last `period_days`
  only; it may join if that stays within the budget. So ε over ANY window of that length
  is within the budget: the last update in a window checked every entry of the window.
  Over longer spans the windows compose (basic composition: ε and δ add): any 365 days are
  covered by ⌈365 / period⌉ windows, so at 3 per 30 days a unit may spend up to
  3 × 13 = 39 in a year (≈ 36.5 per 365 days in the long run), with δ × 13.

`statement` gives this in plain words for the report, the version tags and the docs.

>>> BudgetPolicy("renewing", 3.0, 1e-5, 30.0).year_epsilon()
39.0
>>> BudgetPolicy("lifetime", 3.0, 1e-5, 30.0).year_epsilon()
3.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

Policy = Literal["lifetime", "renewing"]
DAYS_A_YEAR = 365


@dataclass(frozen=True)
class BudgetPolicy:
    kind: Policy
    epsilon: float
    delta: float
    period_days: float

    def since(self, now: datetime) -> datetime | None:
        """The start of the window a unit's spending is counted over; None: all of it."""
        if self.kind == "lifetime":
            return None
        return now - timedelta(days=self.period_days)

    def windows_a_year(self) -> int:
        """How many windows cover any 365 days (1 for `lifetime`)."""
        if self.kind == "lifetime":
            return 1
        return math.ceil(DAYS_A_YEAR / self.period_days - 1e-9)

    def year_epsilon(self) -> float:
        """The most ε one unit can spend in any 365 days, by basic composition."""
        return self.epsilon * self.windows_a_year()

    def tags(self) -> dict[str, str]:
        """The policy as a version's tags (`dp_budget_policy`, `dp_budget_period_days`)."""
        out: dict[str, str] = {"dp_budget_policy": self.kind}
        if self.kind == "renewing":
            out["dp_budget_period_days"] = f"{self.period_days:g}"
        return out

    def statement(self) -> str:
        """What the policy guarantees one data subject, over a year, in plain words."""
        eps, delta = f"{self.epsilon:g}", f"{self.delta:g}"
        if self.kind == "lifetime":
            return (
                f"Lifetime budget: each data subject (else each corrected prediction) "
                f"may spend at most ε = {eps} (δ = {delta}) in this model lineage, over its "
                f"whole life - this year and every year after. Once spent, its new "
                f"corrections are no longer trained on. ε bounds how much more likely any "
                f"output is with the subject's data than without it: at most e^{eps} ≈ "
                f"{math.exp(self.epsilon):.3g} times, except with probability δ."
            )
        n = self.windows_a_year()
        return (
            f"Renewing budget: each data subject (else each corrected prediction) may "
            f"spend at most ε = {eps} (δ = {delta}) in any {self.period_days:g} days in "
            f"this model lineage; its data trains again once earlier spending leaves the "
            f"window. Over a year the windows add up: any 365 days span at most {n} windows, "
            f"so a subject who keeps sending data may spend up to ε = {self.year_epsilon():g}"
            f" (δ = {self.delta * n:g}) a year (about "
            f"{self.epsilon * DAYS_A_YEAR / self.period_days:.1f} per 365 days in the long "
            f"run) - a much weaker promise than ε = {eps}: at ε = {self.year_epsilon():g} "
            f"an output may be e^{self.year_epsilon():g} times more likely with the "
            f"subject's year of data than without it."
        )
