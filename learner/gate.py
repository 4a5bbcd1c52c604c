"""The promotion gate: better on what the world looks like now, not worse on what we trust.

Two holdouts, two questions. The recent `holdout` split of corrections (never trained on)
asks "is the candidate better for today's traffic?"; the frozen holdout of the lineage's
trusted set (`flywheel init`, in the store) asks "did it forget what we know to be true?".
Both numbers are kept with the decision, so a reviewer sees why a version was or was not
promoted.

Both holdouts are scored by `flywheel.learner.evaluation.score`, the scorer the review page
uses too: a row whose label the model cannot output counts as wrong.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from torch import nn

from flywheel.learner.evaluation import Holdout, accuracy, score


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    recent_candidate: float | None
    recent_champion: float | None
    recent_n: int
    recent_loss_candidate: float | None
    recent_loss_champion: float | None
    trusted_candidate: float
    trusted_champion: float
    trusted_n: int
    tolerance: float
    # FLYWHEEL_SERVE_PRECISION other than fp32: the candidate's trusted-holdout accuracy
    # at that precision minus in float32 (flywheel.kernels.quantize.precision_delta)
    quant_precision: str | None = None
    quant_accuracy_delta: float | None = None

    def summary(self) -> str:
        """One line for the `gate` tag: the decision and the numbers behind it."""
        verdict = "passed" if self.passed else "rejected"
        recent = (
            f"recent {self.recent_candidate:.3f} vs {self.recent_champion:.3f}, "
            f"log-loss {self.recent_loss_candidate:.3f} vs "
            f"{self.recent_loss_champion:.3f} (n={self.recent_n})"
            if self.recent_candidate is not None
            else f"recent n={self.recent_n}"
        )
        quant = (
            f"; {self.quant_precision} vs fp32 {self.quant_accuracy_delta:+.3f}"
            if self.quant_accuracy_delta is not None
            else ""
        )
        return (
            f"{verdict}: {self.reason}; {recent}; trusted {self.trusted_candidate:.3f} "
            f"vs {self.trusted_champion:.3f} (n={self.trusted_n}, tol {self.tolerance})" + quant
        )

    def metrics(self) -> dict[str, float]:
        out = {
            f"gate_{k}": float(v)
            for k, v in asdict(self).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }  # None: not run
        out["gate_passed"] = float(self.passed)
        return out


def scores(module: nn.Module, holdout: Holdout) -> tuple[float, float]:
    """(accuracy, mean log-loss) on the holdout (`evaluation.score`)."""
    result = score(module, holdout)
    return result.accuracy, result.log_loss


def _quant_fields(candidate: nn.Module, trusted: Holdout, precision: str) -> dict:
    """The low-precision accuracy delta on the trusted holdout; nothing for fp32."""
    if precision == "fp32" or len(trusted) == 0:
        return {}
    from flywheel.kernels import precision_delta

    try:
        delta = precision_delta(candidate, trusted.x, trusted.y, precision)
    except Exception as exc:  # a module that cannot be copied or quantized: never block
        logging.getLogger(__name__).warning("no %s accuracy delta: %s", precision, exc)
        return {}
    return {"quant_precision": precision, "quant_accuracy_delta": delta}


def evaluate_gate(
    candidate: nn.Module,
    champion: nn.Module,
    *,
    trusted: Holdout,
    recent: Holdout,
    tolerance: float,
    min_recent: int,
    serve_precision: str = "fp32",
) -> GateResult:
    """Pass iff better on recent data and at most `tolerance` less accurate on the trusted one.

    "Better" is: no less accurate, and either more accurate or lower log-loss. Accuracy
    on a few hundred rows ties often; log-loss breaks the tie with the confidence that
    the extra data bought, so a model that learned something is not held back by a tie.
    """
    t_cand, t_champ = accuracy(candidate, trusted), accuracy(champion, trusted)
    quant = _quant_fields(candidate, trusted, serve_precision)  # reported, never decides
    if len(recent) < min_recent:
        return GateResult(
            False,
            f"only {len(recent)} recent holdout corrections (need {min_recent})",
            None,
            None,
            len(recent),
            None,
            None,
            t_cand,
            t_champ,
            len(trusted),
            tolerance,
            **quant,
        )
    (r_cand, l_cand), (r_champ, l_champ) = scores(candidate, recent), scores(champion, recent)
    if r_cand < r_champ or (r_cand == r_champ and not l_cand < l_champ):
        reason = "not better on recent data"
        passed = False
    elif t_cand < t_champ - tolerance:
        reason = "worse on the trusted holdout beyond tolerance"
        passed = False
    else:
        reason, passed = "better on recent data, trusted holdout within tolerance", True
    return GateResult(
        passed,
        reason,
        r_cand,
        r_champ,
        len(recent),
        l_cand,
        l_champ,
        t_cand,
        t_champ,
        len(trusted),
        tolerance,
        **quant,
    )
