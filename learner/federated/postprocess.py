"""Server-side post-processing of the DP-released aggregates: server momentum and
iterate averaging.

Everything here reads only what the DP wrapper released (the noised aggregate of each
round) and the platform's own earlier outputs, so it is post-processing and costs no ε,
per source or per site. That is why it lives outside the wrapper: Flower's `FedAvgM` /
`FedAdam` inside `DifferentialPrivacy*FixedClipping` would keep their momentum from the
*un-noised* FedAvg aggregates (the wrapper adds noise after the inner strategy), so each
release would carry earlier rounds' updates without their noise, which the per-round
accounting does not cover.

Why it helps: each round's release carries fresh, independent noise (the sites' DP-SGD
noise and the wrapper's central noise) while the signal points the same way round after
round; the mean of the last m global models keeps the signal and divides the noise's
variance by up to m (Polyak–Ruppert tail averaging).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

import torch


class ServerOptimizer:
    """Global model ← global + lr·m, m ← β·m + (release − global); served = mean of the
    last `average_last` global models. Only `keys` (the trained parameters) are touched."""

    def __init__(
        self, keys: Iterable[str], *, lr: float = 1.0, momentum: float = 0.0, average_last: int = 1
    ) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or average_last < 1:
            raise ValueError("need lr > 0, 0 <= momentum < 1 and average_last >= 1")
        self.keys = tuple(keys)
        self.lr, self.momentum = lr, momentum
        self.velocity: dict[str, torch.Tensor] | None = None
        self.history: deque[dict[str, torch.Tensor]] = deque(maxlen=average_last)

    def reset(self) -> None:
        """Forget momentum and history: the run continues from another model (the
        champion moved), whose weights must not be averaged with the old line's."""
        self.velocity = None
        self.history.clear()

    def step(
        self, current: Mapping[str, torch.Tensor], released: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The next global model from the current one and this round's release."""
        delta = {k: released[k].double() - current[k].double() for k in self.keys}
        if self.velocity is None or self.momentum == 0:
            self.velocity = delta
        else:
            self.velocity = {k: self.momentum * self.velocity[k] + delta[k] for k in self.keys}
        new = dict(released)
        for k in self.keys:
            new[k] = (current[k].double() + self.lr * self.velocity[k]).to(current[k].dtype)
        self.history.append({k: new[k].detach().clone() for k in self.keys})
        return new

    def served(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` with its parameters replaced by the mean of the last global models."""
        out = dict(state)
        if len(self.history) > 1:
            for k in self.keys:
                out[k] = (
                    torch.stack([h[k].double() for h in self.history]).mean(0).to(state[k].dtype)
                )
        return out
