"""The two holdouts a review compares versions on, with label names (each model's own spec
maps them to its outputs).

Scored by `flywheel.learner.score`, the gate's own scorer, so a review shows the numbers
the gate decided on: a row whose label a model cannot output counts as wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flywheel.review.versions import finite

if TYPE_CHECKING:
    import numpy as np
    from sqlalchemy.engine import Engine
    from torch import nn

    from flywheel.learner import Score
    from flywheel.modelspec import AnySpec
    from flywheel.settings import GateSettings


@dataclass(frozen=True)
class LabelledSet:
    """Inputs and their true label names; each model maps the names to its own outputs.

    >>> import numpy as np
    >>> hs = LabelledSet("recent", np.zeros((2, 3), np.float32), ["class_0", "new"], "test")
    >>> len(hs), hs.labels[1]
    (2, 'new')
    """

    name: str
    x: np.ndarray
    labels: list[str]
    about: str

    def __len__(self) -> int:
        return len(self.labels)


def trusted_holdout(engine: Engine, model_name: str) -> LabelledSet:
    """The frozen holdout of the lineage's trusted set (`flywheel init`), where the gate's
    "trusted" numbers come from; empty, with `about` saying why, when there is none."""
    import numpy as np

    from flywheel.store import NoTrustedData, session_factory, trusted_data

    with session_factory(engine)() as session:
        data = trusted_data(session, model_name, max_train=0)
    if data is None:
        empty = np.empty((0, 0), np.float32)
        return LabelledSet("trusted", empty, [], str(NoTrustedData(model_name)))
    info = data.info
    names = info.schema.labels
    return LabelledSet(
        "trusted",
        data.x_holdout,
        [names[int(i)] for i in data.y_holdout],
        f"trusted holdout of {model_name}: {info.rows_holdout} of "
        f"{info.rows_train + info.rows_holdout} rows of {info.source} "
        f"({info.split_rule}; data set {info.fingerprint[:12]})",
    )


def recent_holdout(gate: GateSettings, engine: Engine) -> LabelledSet:
    """The newest `FLYWHEEL_GATE_RECENT_HOLDOUT` corrections of the `holdout` split (of the
    most common feature width, `flywheel.learner.same_width`)."""
    import numpy as np

    from flywheel.learner import same_width
    from flywheel.store import ExampleReader

    rows = same_width(ExampleReader(engine).recent_holdout(gate.gate_recent_holdout))
    x = (
        np.asarray([r.features for r in rows], dtype=np.float32)
        if rows
        else np.empty((0, 0), np.float32)
    )
    return LabelledSet(
        "recent",
        x,
        [r.label for r in rows],
        f"newest {len(rows)} holdout corrections in the training store "
        f"(at most FLYWHEEL_GATE_RECENT_HOLDOUT={gate.gate_recent_holdout})",
    )


def score_on(module: nn.Module, spec: AnySpec, holdout: LabelledSet) -> Score | None:
    """The model's `flywheel.learner.Score` on the set, or None if the widths do not match.

    A cascade is scored as served: its module answers each row with the light or the heavy
    net (`flywheel.modelspec.Cascade`), over the same `labels` as a plain MLP."""
    from flywheel.learner import Holdout, score

    x = holdout.x
    if len(x) == 0 or x.ndim != 2 or x.shape[1] != spec.input_dim:
        return None
    return score(module, Holdout.of_names(x, holdout.labels, spec.labels))


def predicted_names(spec: AnySpec, result: Score) -> list[str]:
    return [spec.labels[i] for i in result.predicted.tolist()]


def score_doc(result: Score | None, truth: list[str]) -> dict[str, Any]:
    """Accuracy over every row (a label the model lacks counts as wrong) and mean log-loss
    over the rows whose label it knows, as JSON-ready data."""
    if result is None:
        return {
            "n": 0,
            "accuracy": None,
            "log_loss": None,
            "note": "input width differs from this model's" if truth else "no rows",
        }
    out: dict[str, Any] = {
        "n": result.n,
        "accuracy": finite(result.accuracy),
        "log_loss": finite(result.log_loss),
    }
    if result.unknown:
        out["note"] = (
            f"{result.unknown} rows with labels this model lacks count as wrong "
            "(and are left out of the log-loss)"
        )
    return out
