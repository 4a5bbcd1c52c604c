"""One holdout scorer: the gate and the review page count right and wrong the same way.

A holdout row whose true label the model cannot output (a label missing from its spec)
counts as **wrong** for accuracy and is left out of the mean log-loss (its probability is
zero: the loss would be infinite). `Score.unknown` says how many such rows there were.

Why wrong rather than left out: two models compared on one holdout are then scored on the
same rows, with the same `n`, so their accuracies compare; a model that lacks a label that
today's traffic carries is in fact wrong on those rows, and leaving them out would reward it
for not knowing the label. (Before, the gate dropped such rows when it built its holdout
and the review left them out per model, so two models with different label sets were
scored on different rows.) When every label is known, as on the trusted seed holdout and
in every test, the numbers are the ones both scorers gave before.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from flywheel.learner.example_source import StoredExample

UNKNOWN = -1  # the label index of a row whose true label the model cannot output


@dataclass(frozen=True)
class Holdout:
    """Inputs `x` and their true labels `y`, as indices into the scored model's labels;
    `UNKNOWN` (-1) marks a label the model does not have.

    >>> import numpy as np
    >>> h = Holdout.of_names(np.zeros((3, 2), np.float32), ["b", "z", "a"], ["a", "b"])
    >>> h.y.tolist(), len(h), h.unknown
    ([1, -1, 0], 3, 1)
    """

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    @property
    def unknown(self) -> int:
        """Rows whose label the model lacks (they count as wrong)."""
        return int((np.asarray(self.y) < 0).sum())

    @classmethod
    def of_names(cls, x: np.ndarray, names: Sequence[str], labels: Sequence[str]) -> Holdout:
        """The holdout for a model with `labels`, from true label names."""
        index = {name: i for i, name in enumerate(labels)}
        y = np.asarray([index.get(n, UNKNOWN) for n in names], dtype=np.int64)
        return cls(np.asarray(x, dtype=np.float32), y)


@dataclass(frozen=True)
class Score:
    """How a model did on a holdout: accuracy over all `n` rows (unknown labels wrong),
    mean log-loss over the `n - unknown` rows whose label it knows; NaN when undefined.
    `predicted` holds the predicted label indices, `logp` the log-probabilities."""

    n: int
    correct: int
    unknown: int
    accuracy: float
    log_loss: float
    predicted: np.ndarray
    logp: np.ndarray


def score(module: nn.Module, holdout: Holdout) -> Score:
    """Score `module` on `holdout` (see the module docstring for unknown labels).

    >>> import numpy as np, torch
    >>> m = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = m.weight.copy_(torch.eye(2)); _ = m.bias.zero_()
    >>> h = Holdout(np.array([[1, 0], [0, 1], [1, 0]], np.float32), np.array([0, 0, -1]))
    >>> s = score(m, h)
    >>> s.n, s.correct, s.unknown, round(s.accuracy, 3)
    (3, 1, 1, 0.333)
    """
    import torch
    from torch import nn

    n = len(holdout)
    if n == 0:
        empty = np.empty(0, np.int64)
        return Score(0, 0, 0, math.nan, math.nan, empty, np.empty((0, 0), np.float32))
    module.eval()
    with torch.inference_mode():
        logp = torch.log_softmax(module(torch.from_numpy(np.asarray(holdout.x, np.float32))), dim=1)
        y = torch.from_numpy(np.asarray(holdout.y, np.int64))
        predicted = logp.argmax(1)
        known = y >= 0
        correct = int((predicted == y).sum())  # UNKNOWN never equals a prediction
        loss = (
            float(nn.functional.nll_loss(logp[known], y[known])) if bool(known.any()) else math.nan
        )
    return Score(
        n, correct, n - int(known.sum()), correct / n, loss, predicted.numpy(), logp.numpy()
    )


def accuracy(module: nn.Module, holdout: Holdout) -> float:
    """`score(module, holdout).accuracy`: NaN on an empty holdout."""
    return score(module, holdout).accuracy


def same_width(rows: Sequence[StoredExample]) -> list[StoredExample]:
    """The rows of the most common feature width: after a width change a holdout is scored
    on one width, rather than failing on a ragged array."""
    widths = Counter(len(r.features) for r in rows)
    if len(widths) > 1:
        width = widths.most_common(1)[0][0]
        return [r for r in rows if len(r.features) == width]
    return list(rows)


def holdout_of(rows: Sequence[StoredExample], labels: Sequence[str]) -> Holdout:
    """Stored holdout rows as a `Holdout` for a model with `labels`: every row of the most
    common width (`same_width`) is kept, a label the model lacks as `UNKNOWN`."""
    rows = same_width(rows)
    if not rows:
        return Holdout(np.empty((0, 0), np.float32), np.empty(0, np.int64))
    x = np.asarray([r.features for r in rows], dtype=np.float32)
    return Holdout.of_names(x, [r.label for r in rows], labels)
