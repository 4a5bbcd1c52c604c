"""The learner's side of differential privacy: bound, budget, record, then train.

Order matters: contributions are bounded and the budget is checked and written to the
ledger before a single gradient is taken, so a refused update leaves the model untouched
and a crash can over-count ε but never under-count it.

Drift response: while the rate is boosted after a change, an update may also train on
the private examples since the change (`ChangeWindow`), as the non-private learner does.
Each reused row is planned and recorded exactly like a new one: its source takes part
in this update's mechanism, so the planner counts one more mechanism for it, and a
source that cannot afford that is left out of the reuse (and its rows forgotten).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy.engine import Engine
from torch import nn

from flywheel.events import utcnow
from flywheel.learner.dp_window import ChangeWindow
from flywheel.learner.evaluation import Holdout, accuracy
from flywheel.learner.example_source import StoredExample, as_arrays, bound_per_contributor
from flywheel.learner.exclusion import ExcludedData
from flywheel.learner.trainer import OnlineTrainer
from flywheel.privacy import (
    EPSILON,
    REFUSALS,
    BudgetPlan,
    BudgetRefused,
    DPConfig,
    PrivacyLedger,
    plan_update,
    resolve_engine,
)
from flywheel.settings import PrivacySettings
from flywheel.store import Lease

log = logging.getLogger(__name__)
REFUSAL_LOG_EVERY_S = 60.0
# A DP update waits for FLYWHEEL_LEARN_BATCH privacy units, but for no more than this many
# times FLYWHEEL_LEARN_BATCH rows: a few busy units cannot hold the learner back for good.
UNIT_WAIT_ROWS = 4


def unit_prefix(rows: Sequence[StoredExample], units: int, max_rows: int, most: int) -> int:
    """How many of `rows` (in order) one DP update takes: up to `most` consecutive parts,
    each the shortest run of rows holding `units` distinct privacy units, or `max_rows`
    rows where fewer units fill that many; 0 while not even one part is complete (wait).

    Why units, not rows: DP-SGD clips one gradient per unit and adds noise of the same
    size whatever the batch, so a step's signal-to-noise grows with its units, not its
    rows. In `flywheel demo` a wrong answer's correction brings ~6 derived counterexamples
    with its unit, and 100 rows held only 38-87 units after the drift (docs/privacy.md).

    >>> from types import SimpleNamespace as R
    >>> rows = [R(contributor=c) for c in "aabbbcdd"]
    >>> unit_prefix(rows, 2, 100, 1), unit_prefix(rows, 2, 100, 10)  # parts aab, bbc
    (3, 6)
    >>> unit_prefix(rows, 5, 100, 10), unit_prefix(rows, 5, 8, 10)  # capped wait: 8 rows
    (0, 8)
    >>> unit_prefix(rows, 1, 100, 3)  # three parts of one unit each: a, a, b
    3
    """
    if units < 1 or max_rows < 1:
        raise ValueError(f"need units >= 1 and max_rows >= 1, got {units}, {max_rows}")
    end = 0
    for _ in range(most):
        seen: set[str] = set()
        stop = 0
        for i in range(end, min(len(rows), end + max_rows)):
            seen.add(rows[i].contributor)
            if len(seen) >= units:
                stop = i + 1
                break
        else:
            stop = end + max_rows if len(rows) >= end + max_rows else 0
        if not stop:
            break
        end = stop
    return end


@dataclass
class PrivacyOutcome:
    """What one private update may train on, and what it spends."""

    rows: list[StoredExample]
    plan: BudgetPlan | None
    config: DPConfig
    engine: str
    capped: int = 0
    excluded: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    ledger_id: int | None = None  # the ledger row `plan` wrote: the version is named on it
    reused_ids: frozenset[int] = frozenset()  # rows trained on before (since a change)

    @property
    def reused(self) -> int:
        return len(self.reused_ids)

    @property
    def epsilon_tag(self) -> str:
        return f"{self.plan.epsilon_lineage:.4f}" if self.plan else "none"

    @property
    def delta_tag(self) -> str:
        return f"{self.config.delta:g}"

    def policy_tags(self) -> dict[str, str]:
        """The budget policy on the version (`dp_budget_policy`, its period, and the most
        ε one privacy unit may spend in a year under it)."""
        policy = self.config.policy
        return {**policy.tags(), "dp_budget_year_epsilon": f"{policy.year_epsilon():g}"}

    def params(self) -> dict[str, object]:
        assert self.plan is not None
        m = self.plan.mechanism
        return {
            "dp": True,
            "dp_mechanism": m.kind,
            "dp_noise_multiplier": m.noise_multiplier,
            "dp_sample_rate": m.sample_rate,
            "dp_steps": m.steps,
            "dp_max_grad_norm": self.config.max_grad_norm,
            "dp_accountant": "rdp" if m.kind == "tree" else self.config.accountant,
            "dp_engine": self.engine,
            "dp_budget_epsilon": self.config.epsilon,
            "dp_delta": self.config.delta,
            "dp_max_per_source": self.config.max_per_source,
            "dp_budget_policy": self.config.budget_policy,
            "dp_budget_period_days": self.config.budget_period_days,
        }

    def metrics(self, shadow: nn.Module, trusted: Holdout, recent: Holdout) -> dict[str, float]:
        """ε numbers, and the same run without DP on both holdouts: the cost of privacy."""
        assert self.plan is not None
        out = {
            "epsilon_update": self.plan.epsilon_update,
            "epsilon_lineage": self.plan.epsilon_lineage,
            "dp_sources": float(len(self.plan.allowed)),
            "dp_excluded_examples": float(self.excluded),
            "dp_capped_examples": float(self.capped),
            "dp_reused_examples": float(self.reused),
            "nonprivate_trusted_accuracy": accuracy(shadow, trusted),
            "nonprivate_recent_accuracy": accuracy(shadow, recent) if len(recent) else math.nan,
        }
        return out

    def comparison_tags(
        self, recent: float | None, trusted: float, metrics: dict[str, float]
    ) -> dict[str, str]:
        """Version tags: the mechanism, and this candidate against the same run without DP
        (the learner's non-private shadow, same examples and drift response) on the gate's
        own holdouts: the cost of privacy, version by version."""
        assert self.plan is not None
        tags = {"dp_mechanism": "dp-ftrl" if self.plan.mechanism.kind == "tree" else "dp-sgd"}
        plain_trusted = metrics.get("nonprivate_trusted_accuracy")
        if plain_trusted is None:
            return tags
        parts = []
        plain_recent = metrics.get("nonprivate_recent_accuracy", math.nan)
        if recent is not None and not math.isnan(plain_recent):
            parts.append(
                f"recent {recent:.3f} with DP vs {plain_recent:.3f} without "
                f"({100 * (recent - plain_recent):+.1f} points)"
            )
        parts.append(
            f"trusted {trusted:.3f} with DP vs {plain_trusted:.3f} without "
            f"({100 * (trusted - plain_trusted):+.1f} points)"
        )
        tags["privacy_cost"] = "; ".join(parts)
        return tags


class PrivateStep:
    """Bounds, budgets and records each update of one lineage."""

    def __init__(
        self,
        privacy: PrivacySettings,
        steps: int,
        engine: Engine,
        lineage: str,
        *,
        window: int = 0,
    ) -> None:
        """`steps`: gradient steps per update (FLYWHEEL_LEARN_STEPS), what one update costs;
        `window`: most private rows since a change kept for reuse (FLYWHEEL_LEARN_BOOST_WINDOW;
        0: every private example is used once)."""
        self.config = DPConfig.from_settings(privacy)
        self.window = ChangeWindow(window)
        self.ledger = PrivacyLedger(engine)
        self.lineage = lineage
        self.mechanism = self.config.mechanism(steps)
        self.excluded = ExcludedData(lineage)  # totals: the learner saves and restores them
        self._last_refusal: tuple[str | None, float] = (None, 0.0)
        log.info(
            "%s for %s: σ=%.3f, q=%g, %d %s/update, C=%g, budget ε=%g δ=%g (%s)",
            "DP-FTRL (tree aggregation)" if self.mechanism.kind == "tree" else "DP-SGD",
            lineage,
            self.mechanism.noise_multiplier,
            self.mechanism.sample_rate,
            self.mechanism.steps,
            "tree leaves" if self.mechanism.kind == "tree" else "steps",
            self.config.max_grad_norm,
            self.config.epsilon,
            self.config.delta,
            self.config.accountant,
        )

    @staticmethod
    def adopt(
        engine: Engine,
        lineage: str,
        update: int,
        version: str,
        ledger_id: int | None,
        *,
        fence: Lease | None = None,
    ) -> None:
        """A version registered by a learner that died: its ledger entry names it now. The
        entry is the row id the version carries; a version from before row ids were tagged
        names the newest unversioned entry of its update number."""
        ledger = PrivacyLedger(engine)
        if ledger_id is not None:
            ledger.set_version(ledger_id, version, fence=fence)
        elif ledger.set_version_of_update(lineage, update, version, fence=fence) is None:
            log.warning("v%s (update %d) has no unversioned ledger entry to name", version, update)

    def change(self, since_id: int) -> None:
        """A change was detected at example `since_id` (the learner's `change_at_id`): the
        private rows from it on may be reused while the boost lasts."""
        self.window.open(since_id)

    def resume(self, since_id: int, rows: list[StoredExample]) -> None:
        """After a restart: the change seen at `since_id` and the rows read since it (the
        learner's newest trained rows); whether each may be reused is still the planner's."""
        self.window.open(since_id)
        self.window.add(rows)

    def plan(
        self,
        used: list[StoredExample],
        update: int,
        module: nn.Module,
        *,
        fence: Lease | None = None,
        reuse: bool = False,
    ) -> PrivacyOutcome | None:
        """The rows this update may train on, recorded in the ledger; None if refused and the
        rows should wait (a configuration that can never fit the budget). `fence`: the
        lineage's lease; the ledger refuses the entry (LeaseLost) once a newer learner holds
        it, so a learner that lost its lineage trains nothing.

        `reuse` (the boost after a change lasts): the window's rows since the change join
        the update, after the new rows (the per-source cap keeps new rows first), and are
        planned and recorded like them: every reuse is in the ledger before training.
        """
        new_ids = {r.id for r in used}
        again = self.window.reusable(exclude=new_ids) if reuse else []
        per_source, capped = bound_per_contributor(used + again, self.config.max_per_source)
        capped -= len(again) - sum(
            1 for rows in per_source.values() for r in rows if r.id not in new_ids
        )  # a reused row over the cap is simply not reused: not a capped new example
        counts = {s: len(rows) for s, rows in per_source.items()}
        new_sources = {r.contributor for r in used}
        engine = resolve_engine(self.config.engine, module)  # type: ignore[arg-type]
        try:
            plan = plan_update(
                self.ledger,
                self.lineage,
                counts,
                self.mechanism,
                budget=self.config.epsilon,
                delta=self.config.delta,
                accountant=self.config.accountant,
                since=self.config.policy.since(utcnow()),
            )
        except BudgetRefused as exc:
            if exc.kind == "mechanism":
                self._log_refusal(str(exc))  # logged before counted: a scrape sees both
                REFUSALS.labels(exc.kind).inc()
                return None
            REFUSALS.labels(exc.kind).inc()
            self.window.drop(per_source)  # nothing of theirs can be reused either
            excluded_new = sum(1 for g in per_source.values() for r in g if r.id in new_ids)
            units = len({r.contributor for r in used})
            self.excluded.add(incoming=len(used), excluded=excluded_new, units=units)
            return PrivacyOutcome([], None, self.config, engine, capped, excluded_new)
        # a source in the window only, out of budget, is not reused: not an exclusion
        self.window.drop(s for s in plan.excluded)
        left_out = [s for s in plan.excluded if s in new_sources]
        rows = [r for s in plan.allowed for r in per_source[s]]
        rows.sort(key=lambda r: r.id)
        reused = frozenset(r.id for r in rows if r.id not in new_ids)
        excluded = sum(1 for s in left_out for r in per_source[s] if r.id in new_ids)
        # counted (and told at most hourly) once the ledger has the entry: a refused write
        # (a lost lease) plans again, and must not count its rows twice
        counted = (len(used), excluded, len(left_out))
        m = plan.mechanism
        ledger_id = self.ledger.record(
            {
                "lineage": self.lineage,
                "update_no": update,
                # a tree is accounted by dp-accounting's RDP whatever the setting says
                "accountant": "rdp" if m.kind == "tree" else self.config.accountant,
                "engine": engine,
                "sample_rate": m.sample_rate,
                "noise_multiplier": m.noise_multiplier,
                "max_grad_norm": self.config.max_grad_norm,
                "steps": m.steps,
                "delta": self.config.delta,
                "epsilon_update": plan.epsilon_update,
                "epsilon_lineage": plan.epsilon_lineage,
                "sources": len(plan.allowed),
                "examples": len(rows),
                "public_examples": 0,
                "capped_examples": capped,
                "excluded_examples": excluded,
                "mechanism_kind": m.kind,
            },
            {s: (counts[s], eps) for s, eps in plan.allowed.items()},
            fence=fence,
        )
        self.excluded.add(incoming=counted[0], excluded=counted[1], units=counted[2])
        self.window.add(rows)  # accounted: reusable after a change, as the budget allows
        return PrivacyOutcome(
            rows,
            plan,
            self.config,
            engine,
            capped,
            excluded,
            {s: counts[s] for s in plan.allowed},
            ledger_id,
            reused,
        )

    def train(
        self, trainer: OnlineTrainer, outcome: PrivacyOutcome, labels: dict[str, int]
    ) -> float:
        rows = [r for r in outcome.rows if r.label in labels]
        if not rows:
            return 0.0
        x, y, w = as_arrays(rows, labels)
        index = {s: i for i, s in enumerate(sorted({r.contributor for r in rows}))}
        sources = np.asarray([index[r.contributor] for r in rows], np.int64)
        assert outcome.plan is not None
        stats = trainer.update_private(
            x,
            y,
            w,
            sources,
            outcome.plan.mechanism,
            max_grad_norm=self.config.max_grad_norm,
            engine=outcome.engine,
            ftrl_lr=self.config.ftrl_lr,
            fresh=np.asarray([r.id not in outcome.reused_ids for r in rows], bool),
        )
        trainer.log_replacement(stats, private=True)
        return stats.lr

    def published(
        self, outcome: PrivacyOutcome, version: str, *, fence: Lease | None = None
    ) -> None:
        """Name `version` on the ledger entry this update's `plan` wrote (that entry only)."""
        assert outcome.ledger_id is not None
        self.ledger.set_version(outcome.ledger_id, version, fence=fence)
        EPSILON.labels(self.lineage).set(self.ledger.lineage_epsilon(self.lineage))

    def _log_refusal(self, message: str) -> None:
        last, at = self._last_refusal
        now = time.monotonic()
        if message != last or now - at > REFUSAL_LOG_EVERY_S:
            log.error("privacy budget: %s", message)
            self._last_refusal = (message, now)
