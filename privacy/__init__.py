"""Differential privacy: DP-SGD and DP-FTRL updates, accounting, ledger, budget enforcement.

The privacy unit is the data subject of an example (the keyed hash of a correction's
`subject`), else the prediction it corrects (`flywheel.subjects`); the budget lasts for
life or renews per period (`BudgetPolicy`). See docs/privacy.md for the mechanism, the
unit, and what the budget means.
"""

from flywheel.privacy.accounting import (
    ACCOUNTANTS,
    Mechanism,
    dp_accounting_epsilon,
    epsilon,
    noise_for_budget,
    tree_epsilon_independent,
    tree_nodes_touched,
    tree_noise_for_budget,
)
from flywheel.privacy.budget import BudgetPlan, BudgetRefused, plan_update
from flywheel.privacy.config import DPConfig
from flywheel.privacy.dp_ftrl import ftrl_update
from flywheel.privacy.dp_sgd import (
    Companion,
    DPStepStats,
    PrivateBatch,
    dp_update,
    resolve_engine,
)
from flywheel.privacy.ledger import EXCLUDED_STATE_KEY, LedgerEntry, PrivacyLedger, SourceSpend
from flywheel.privacy.metrics import (
    EPSILON,
    EXCLUDED_EXAMPLES,
    EXCLUDED_SOURCES,
    INCOMING_EXAMPLES,
    REFUSALS,
)
from flywheel.privacy.plain_words import epsilon_in_words, posterior_bound
from flywheel.privacy.policy import BudgetPolicy
from flywheel.privacy.report import build_report, plot_epsilon

__all__ = [
    "ACCOUNTANTS",
    "EPSILON",
    "EXCLUDED_STATE_KEY",
    "EXCLUDED_EXAMPLES",
    "EXCLUDED_SOURCES",
    "INCOMING_EXAMPLES",
    "REFUSALS",
    "BudgetPlan",
    "BudgetPolicy",
    "BudgetRefused",
    "Companion",
    "DPConfig",
    "DPStepStats",
    "LedgerEntry",
    "Mechanism",
    "PrivacyLedger",
    "PrivateBatch",
    "SourceSpend",
    "dp_accounting_epsilon",
    "build_report",
    "dp_update",
    "epsilon",
    "epsilon_in_words",
    "ftrl_update",
    "noise_for_budget",
    "plan_update",
    "plot_epsilon",
    "posterior_bound",
    "resolve_engine",
    "tree_epsilon_independent",
    "tree_nodes_touched",
    "tree_noise_for_budget",
]
