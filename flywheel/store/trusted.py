"""The trusted data set: what the initial model learns, the gate's frozen holdout, the
analyzer's reference distribution and the public replay of DP updates all come from here.

It lives with the store, not the learner, because every component reads it (the feedback
worker writes it into the store once as `seed` examples; the learner, the gate, review and
the federated server read it back), and none of them may import another for it.
Today it is the synthetic seed problem (`flywheel.streams`), regenerated deterministically
from the settings' seed so that every process agrees on it without a copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flywheel.settings import TrustedSettings

if TYPE_CHECKING:
    import numpy as np

HOLDOUT_FRACTION = 0.2  # of the seed examples: the trusted (frozen) holdout


def seed_data(trusted: TrustedSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_holdout, y_holdout) as label indices; deterministic per seed.

    >>> from flywheel.settings import TrustedSettings
    >>> x_tr, y_tr, x_ho, y_ho = seed_data(TrustedSettings(seed=1, seed_examples=100))
    >>> x_tr.shape, x_ho.shape, sorted(set(y_tr.tolist()) | set(y_ho.tolist()))
    ((80, 8), (20, 8), [0, 1, 2])
    """
    import numpy as np  # here, not at import: `flywheel db` and other store-only callers

    from flywheel.streams import LABELS, seed_concept  # never need it (~50 ms of numpy)

    x, names = seed_concept(trusted.seed).sample(trusted.seed_examples, trusted.seed)
    y = np.asarray([LABELS.index(n) for n in names], dtype=np.int64)
    cut = int(len(x) * (1 - HOLDOUT_FRACTION))
    return x[:cut], y[:cut], x[cut:], y[cut:]
