"""The promotion gate: better on what the world looks like now, not worse on what we trust.

Two holdouts, two questions. The recent `holdout` split of corrections (never trained on)
asks "is the candidate better for today's traffic?"; the frozen holdout of the lineage's
trusted set (`flywheel init`, in the store) asks "did it forget what we know to be true?".
Both numbers are kept with the decision, so a reviewer sees why a version was or was not
promoted.

Both holdouts are scored by `flywheel.learner.evaluation.score`, the scorer the review page
uses too: a row whose label the model cannot output counts as wrong.

When the two questions contradict each other, the world has changed where the trusted set
lives (a label reversal, a remap): no model can be right on both, and a gate that always
binds on the trusted holdout keeps the old concept served for good. `weigh_concept_change` says
when the evidence for that is strong — the champion is worse on recent data than on the
trusted holdout by more than the tolerance, at `CONCEPT_Z` standard errors (a two-proportion
z-test); the candidate beats it on the same recent rows at `CONCEPT_Z` too (McNemar's test:
only the rows where the two disagree count); and the candidate loses on the trusted holdout
no more than the champion lost on recent data (a candidate that merely forgot is still
refused) — and under the `follow` policy
(`FLYWHEEL_GATE_CONCEPT_CHANGE`, the default) the trusted check is then waived, said in the
decision's reason and flagged (`concept_change`) for the reviewer. `hold` keeps the trusted
holdout binding whatever recent data says (an operator re-seeds it with `flywheel init`).
At z = 3 a chance result passes about once in 700 decisions per test; on penguins'
Adelie/Chinstrap swap (trusted n = 21) it fired within the first few candidates after the
swap, and never before it (seen in the penguins demo when the waiver was written; no test
times it: `tests/unit/test_learner_parts.py` checks each rule on constructed tables). A
rejection on the trusted holdout names the waiver's test that failed, with its numbers
(`weigh_concept_change`).

z stays 3, not 2.5 (2026-12-07, `flywheel demo --requests 3000 --rate 100`, 10 runs, 38
waiver checks): right after the drift the recent holdout is 22-59 rows, mostly from before
it, so early candidates fix 0-14 of the champion's recent errors for 0-8 new ones (the new
concept costs old rows in the same window): McNemar z 0-2.2, none in 2.5-3, in the 20
checks that passed the drop test (z 3.3-11.5) and the forgetting test. At 2.5 the waiver
fired on the same candidates as at 3 (3 DP and 3 non-DP runs: 80.5 % and 92.2 % settled,
against 80.1 % and 89.4 % at 3 over 7 runs each); it fires once the window holds mostly new
rows (McNemar z 3.0-4.4: 14-25 fixed for 2).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from torch import nn

from flywheel.learner.evaluation import Holdout, Score, score

ConceptPolicy = Literal["follow", "hold"]
CONCEPT_Z = 3.0  # standard errors on both tests before a concept change waives the trusted check


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
    # the trusted check was waived: recent data contradicts the trusted set (`concept_change`)
    concept_change: bool = False

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
        out["gate_concept_change"] = float(self.concept_change)
        return out


def scores(module: nn.Module, holdout: Holdout) -> tuple[float, float]:
    """(accuracy, mean log-loss) on the holdout (`evaluation.score`)."""
    result = score(module, holdout)
    return result.accuracy, result.log_loss


def weigh_concept_change(
    champion_trusted: Score,
    champion_recent: Score,
    candidate_recent: Score,
    recent_y: np.ndarray,
    tolerance: float,
    z: float = CONCEPT_Z,
    candidate_trusted: Score | None = None,
) -> tuple[bool, str]:
    """(holds, why): whether recent data contradicts the trusted set, and in words either
    the evidence for a change of concept or the first condition that failed, with its
    numbers (the gate puts it in a rejection's reason, so a reviewer sees which test held
    the waiver back).

    All must hold: the champion is less accurate on recent rows than on the trusted
    holdout by more than `tolerance`, at `z` standard errors of the difference (pooled
    two-proportion test); the candidate beats the champion on the same recent rows at
    `z` (McNemar: (b - c) / sqrt(b + c) over the rows only one of them gets right); and,
    given `candidate_trusted`, the candidate loses on the trusted holdout no more than the
    champion lost on recent data (within `tolerance` and two standard errors): what a
    change of concept costs on old rows, and not a candidate that merely forgot them.

    >>> import numpy as np
    >>> def s(right, n):
    ...     return Score(n, right, 0, right / n, 0.0, np.zeros(n, np.int64), np.zeros((n, 2)))
    >>> y = np.zeros(100, np.int64)
    >>> champ, cand = s(40, 100), s(90, 100)
    >>> champ.predicted[40:] = 1  # the champion misses 60 rows; the candidate misses 10
    >>> cand.predicted[90:] = 1
    >>> holds, why = weigh_concept_change(s(50, 50), champ, cand, y, tolerance=0.02)
    >>> holds
    True
    >>> for part in why.split(" and "):
    ...     print(part)
    the champion is right on 0.400 of recent rows against 1.000 of trusted ones (z=7.1)
    the candidate fixes 50 of its recent errors for 0 new ones (z=7.1)
    >>> weigh_concept_change(s(21, 50), champ, cand, y, tolerance=0.02)[0]  # no gap
    False
    >>> y = np.zeros(40, np.int64)
    >>> champ, cand = s(30, 40), s(34, 40)
    >>> champ.predicted[30:] = 1  # the champion misses 10 recent rows; the candidate 6 of them
    >>> cand.predicted[34:] = 1
    >>> weigh_concept_change(s(590, 600), champ, cand, y, tolerance=0.02)
    (False, 'the candidate fixes 4 of its recent errors for 0 new ones: z=2.0 < 3')
    """
    t, r = champion_trusted, champion_recent
    if t.n == 0 or r.n == 0 or not r.accuracy < t.accuracy - tolerance:
        return False, (
            f"the champion is right on {r.accuracy:.3f} of recent rows against "
            f"{t.accuracy:.3f} of trusted ones, within the tolerance"
        )
    pooled = (t.correct + r.correct) / (t.n + r.n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / t.n + 1 / r.n))
    drop_z = (t.accuracy - r.accuracy) / se if se > 0 else math.inf
    drop = (
        f"the champion is right on {r.accuracy:.3f} of recent rows against {t.accuracy:.3f} "
        f"of trusted ones (z={drop_z:.1f})"
    )
    if drop_z < z:
        return False, f"{drop}: z < {z:g}"
    champ_right = r.predicted == recent_y
    cand_right = candidate_recent.predicted == recent_y
    b = int((cand_right & ~champ_right).sum())
    c = int((champ_right & ~cand_right).sum())
    mcnemar_z = (b - c) / math.sqrt(b + c) if b + c else 0.0
    fixes = f"the candidate fixes {b} of its recent errors for {c} new ones"
    if mcnemar_z < z:
        return False, f"{fixes}: z={mcnemar_z:.1f} < {z:g}"
    if candidate_trusted is not None and candidate_trusted.n:
        a = candidate_trusted.accuracy
        slack = 2 * math.sqrt(a * (1 - a) / candidate_trusted.n)
        if a + slack < r.accuracy - tolerance:
            return False, (
                f"the candidate is right on {a:.3f} of trusted rows, below the champion's "
                f"{r.accuracy:.3f} on recent ones beyond the tolerance: it forgot"
            )
    return True, f"{drop} and {fixes} (z={mcnemar_z:.1f})"


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
    concept_policy: ConceptPolicy = "follow",
) -> GateResult:
    """Pass iff better on recent data and at most `tolerance` less accurate on the trusted
    one — or, under `concept_policy="follow"`, decisively better on recent data that
    contradicts the trusted set (`concept_change`; the result says so).

    "Better" is: no less accurate, and either more accurate or lower log-loss. Accuracy
    on a few hundred rows ties often; log-loss breaks the tie with the confidence that
    the extra data bought, so a model that learned something is not held back by a tie.
    """
    cand_trusted, champ_trusted = score(candidate, trusted), score(champion, trusted)
    t_cand, t_champ = cand_trusted.accuracy, champ_trusted.accuracy
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
    cand_recent, champ_recent = score(candidate, recent), score(champion, recent)
    r_cand, l_cand = cand_recent.accuracy, cand_recent.log_loss
    r_champ, l_champ = champ_recent.accuracy, champ_recent.log_loss
    changed = False
    if r_cand < r_champ or (r_cand == r_champ and not l_cand < l_champ):
        reason = "not better on recent data"
        passed = False
    elif t_cand < t_champ - tolerance:
        holds, why = weigh_concept_change(
            champ_trusted,
            champ_recent,
            cand_recent,
            np.asarray(recent.y),
            tolerance,
            candidate_trusted=cand_trusted,
        )
        if holds and concept_policy == "follow":
            reason = f"concept change, trusted holdout waived: {why}"
            passed = changed = True
        else:
            reason = "worse on the trusted holdout beyond tolerance"
            if holds:
                reason += f" (FLYWHEEL_GATE_CONCEPT_CHANGE=hold; {why})"
            else:  # which test held the waiver back, with its numbers
                reason += f" (no concept change: {why})"
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
        concept_change=changed,
    )
