"""Reviewing model versions: what a reviewer sees, and the decisions they record.

One package for the terminal (`flywheel models diff | card | pending | approve | reject`)
and the browser (`/ui` and `/v1/review/...` in the service), so both show the same facts:

* `versions`: versions as plain data (status, source, parent, examples, ε/δ, gate), their
  lineage, and the tags they carry;
* `compare`: a diff of two versions on both holdouts (`holdouts`: the holdout of the
  lineage's trusted set and the recent `holdout` corrections, both from the store, scored
  by the gate's own scorer, `flywheel.learner.score`), where they disagree and the
  distance between their weights;
* `store_views`: what the training store says (the data behind a version, the error mix,
  hourly accuracy, ε per source from the privacy ledger);
* `decisions`: approve / reject with auto-promotion off;
* `card`: a model card (markdown and plots);
* `monitoring`: delayed-label monitoring of live traffic (`flywheel monitor`, `/metrics`,
  `/ui`): live accuracy with its interval, label delay, unlabelled share, CBPE, input
  drift (PSI against the trusted data) per version and segment, from the store only.

Functions that read the registry take the process's one `Registry` (built where the process
starts: the CLI command, the service), never build their own. Importing this package is cheap
(no torch, no MLflow): the CLI imports it for `--help`.
"""

from flywheel.review.card import ALL_TIME_HOURS, Card, card
from flywheel.review.compare import diff, disagreement, parameter_distance
from flywheel.review.decisions import (
    MAX_REASON,
    ReviewError,
    approve,
    check_reason,
    pending,
    reject,
)
from flywheel.review.holdouts import LabelledSet, recent_holdout, score_doc, trusted_holdout
from flywheel.review.monitoring import (
    MIN_PSI_ROWS,
    PSI_ALERT,
    PSI_WATCH,
    Reference,
    cbpe,
    delay_stats,
    drift_level,
    feature_psi,
    live_report,
    live_timeline,
    load_reference,
    nearest_rank,
    parse_window,
    psi,
    wilson,
)
from flywheel.review.store_views import (
    accuracy_timeline,
    data_counts,
    error_mix,
    open_store_or_reason,
    privacy_ledger,
    version_data,
)
from flywheel.review.versions import (
    APPROVED,
    LINEAGE_KEYS,
    PENDING,
    REJECTED,
    REVIEW_AT,
    REVIEW_BY,
    REVIEW_REASON,
    REVIEW_TAG,
    epsilon_value,
    example_range,
    finite,
    gate_numbers,
    gate_passed,
    lineage,
    parent_of,
    registry_docs,
    review_of,
    status,
    version_doc,
)

__all__ = [
    "MIN_PSI_ROWS",
    "PSI_ALERT",
    "PSI_WATCH",
    "Reference",
    "cbpe",
    "delay_stats",
    "drift_level",
    "feature_psi",
    "live_report",
    "live_timeline",
    "load_reference",
    "nearest_rank",
    "parse_window",
    "psi",
    "wilson",
    "ALL_TIME_HOURS",
    "APPROVED",
    "LINEAGE_KEYS",
    "MAX_REASON",
    "PENDING",
    "REJECTED",
    "REVIEW_AT",
    "REVIEW_BY",
    "REVIEW_REASON",
    "REVIEW_TAG",
    "Card",
    "LabelledSet",
    "ReviewError",
    "accuracy_timeline",
    "approve",
    "card",
    "check_reason",
    "data_counts",
    "diff",
    "disagreement",
    "epsilon_value",
    "error_mix",
    "example_range",
    "finite",
    "gate_numbers",
    "gate_passed",
    "lineage",
    "open_store_or_reason",
    "parameter_distance",
    "parent_of",
    "pending",
    "privacy_ledger",
    "recent_holdout",
    "registry_docs",
    "reject",
    "review_of",
    "score_doc",
    "status",
    "trusted_holdout",
    "version_data",
    "version_doc",
]
