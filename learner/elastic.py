"""An elastic learning rate: high when the world changes, back to the base as it settles.

Two signals raise it. River's ADWIN watches the served model's error stream (one bit per
correction) and fires when its recent mean departs from the older window's; a shift score
(the share of recent inputs outside the reference distribution) reacts to covariate shift
before enough corrections have come back. The boost then decays geometrically per update,
so a one-off spike costs a few noisy updates, not a permanently jumpy model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

# Novel share that counts as "no shift" (the reference admits ~0.5 % by construction)
# and the share at which the boost is full.
SHIFT_FLOOR = 0.05
SHIFT_FULL = 0.5


@dataclass
class ElasticRate:
    """Learning-rate multiplier in [1, max_boost]; `rate()` is base x multiplier."""

    base_lr: float
    max_boost: float = 5.0
    half_life: float = 3.0  # updates for the excess over 1 to halve
    adwin_delta: float = 0.002
    multiplier: float = 1.0
    drifts: int = 0
    last_shift: float = 0.0
    _adwin: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.base_lr <= 0 or self.max_boost < 1 or self.half_life <= 0:
            raise ValueError("need base_lr > 0, max_boost >= 1, half_life > 0")
        from river.drift import ADWIN

        self._adwin = ADWIN(delta=self.adwin_delta)

    def observe_errors(self, errors: Iterable[bool]) -> bool:
        """Feed the served model's right/wrong outcomes; True if a drift was detected."""
        detected = False
        adwin = self._adwin
        for err in errors:
            before = adwin.estimation  # type: ignore[attr-defined]
            adwin.update(float(bool(err)))  # type: ignore[attr-defined]
            # ADWIN flags any change of the mean; only a rise in errors is a reason to learn
            # faster (a fall means the model caught up).
            if adwin.drift_detected and adwin.estimation > before:  # type: ignore[attr-defined]
                detected = True
        if detected:
            self.drifts += 1
            self.multiplier = self.max_boost
        return detected

    def observe_shift(self, novel_share: float) -> bool:
        """Raise the multiplier in proportion to how much of the input is out of reference;
        True when the shift is large enough to call it a change (half the full boost)."""
        if not np.isfinite(novel_share):
            raise ValueError(f"novel share must be finite, got {novel_share}")
        self.last_shift = float(novel_share)
        scale = (novel_share - SHIFT_FLOOR) / (SHIFT_FULL - SHIFT_FLOOR)
        target = 1.0 + (self.max_boost - 1.0) * float(np.clip(scale, 0.0, 1.0))
        self.multiplier = max(self.multiplier, target)
        return bool(scale >= 0.5)

    def rate(self) -> float:
        return self.base_lr * self.multiplier

    def step(self) -> float:
        """The rate for this update, then decay the boost for the next one."""
        lr = self.rate()
        self.multiplier = 1.0 + (self.multiplier - 1.0) * 0.5 ** (1.0 / self.half_life)
        return lr

    def state(self) -> dict[str, float]:
        return {"multiplier": self.multiplier, "drifts": self.drifts}

    def restore(self, state: dict[str, float]) -> None:
        """Resume the boost after a restart; ADWIN's window is rebuilt from new errors."""
        self.multiplier = float(np.clip(state.get("multiplier", 1.0), 1.0, self.max_boost))
        self.drifts = int(state.get("drifts", 0))
