"""The trusted data set: what the initial model learns, the gate's frozen holdout, the
analyzer's reference distribution and the public replay of DP updates all come from here.

It lives with the store, not the learner, because every component reads it (the feedback
worker writes it into the store once as `seed` examples; the learner, the gate, review and
the federated server read it back), and none of them may import another for it.
Today it is the synthetic seed problem (`flywheel.streams`), regenerated deterministically
from the settings' seed so that every process agrees on it without a copy.
"""

from __future__ import annotations

import numpy as np

from flywheel.settings import Settings
from flywheel.streams import LABELS, seed_concept

HOLDOUT_FRACTION = 0.2  # of the seed examples: the trusted (frozen) holdout


def seed_data(settings: Settings) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_holdout, y_holdout) as label indices; deterministic per seed."""
    x, names = seed_concept(settings.seed).sample(settings.seed_examples, settings.seed)
    y = np.asarray([LABELS.index(n) for n in names], dtype=np.int64)
    cut = int(len(x) * (1 - HOLDOUT_FRACTION))
    return x[:cut], y[:cut], x[cut:], y[cut:]
