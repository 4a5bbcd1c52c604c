"""An elastic learning rate: high when the world changes, back to the base as it settles.

Two signals raise it. River's ADWIN watches the served model's error stream (one bit per
correction) and fires when its recent mean departs from the older window's; a shift score
(the share of recent inputs outside the reference distribution) reacts to covariate shift
before enough corrections have come back. The boost then decays geometrically per update,
so a one-off spike costs a few noisy updates, not a permanently jumpy model. The boosted
rate is capped (`max_lr`): a boost on an already large base is what blows an MLP up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

# Novel share that counts as "no shift" (the reference admits ~0.5 % by construction)
# and the share at which the boost is full.
SHIFT_FLOOR = 0.05
SHIFT_FULL = 0.5
# The boost "lasts" while the multiplier's excess over 1 is above this share of the most it
# can be (3x boost: above 1.2, i.e. about 10 updates after a change at half-life 3).
BOOSTED_SHARE = 0.1


@dataclass
class ElasticRate:
    """Learning-rate multiplier in [1, max_boost]; `rate()` is base x multiplier."""

    base_lr: float
    max_boost: float = 5.0
    half_life: float = 3.0  # updates for the excess over 1 to halve
    adwin_delta: float = 0.002
    max_lr: float | None = None  # cap on the boosted rate; None: base x max_boost
    multiplier: float = 1.0
    drifts: int = 0
    last_shift: float = 0.0
    shifted: bool = False  # the shift score is above the "change" level right now
    _adwin: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.base_lr <= 0 or self.max_boost < 1 or self.half_life <= 0:
            raise ValueError("need base_lr > 0, max_boost >= 1, half_life > 0")
        if self.max_lr is not None and not self.max_lr > 0:
            raise ValueError(f"max_lr must be > 0 (or None), got {self.max_lr}")
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
        True when the shift becomes large enough to call it a change (half the full boost).

        Only the rise counts as a change: a shift that persists (the new inputs stay out of
        the old reference) is one change, not one per update, so the examples "since the
        change" are not cut back to the newest batch every time.
        """
        if not np.isfinite(novel_share):
            raise ValueError(f"novel share must be finite, got {novel_share}")
        self.last_shift = float(novel_share)
        scale = (novel_share - SHIFT_FLOOR) / (SHIFT_FULL - SHIFT_FLOOR)
        target = 1.0 + (self.max_boost - 1.0) * float(np.clip(scale, 0.0, 1.0))
        self.multiplier = max(self.multiplier, target)
        was, self.shifted = self.shifted, bool(scale >= 0.5)
        return self.shifted and not was

    @property
    def boosted(self) -> bool:
        """The boost after a change still lasts (the model has not settled yet)."""
        return self.multiplier - 1.0 > BOOSTED_SHARE * (self.max_boost - 1.0)

    def rate(self) -> float:
        """base x multiplier, at most `max_lr` (never below the base: the cap limits the
        boost, it does not overrule the configured rate)."""
        lr = self.base_lr * self.multiplier
        if self.max_lr is not None:
            lr = min(lr, max(self.base_lr, self.max_lr))
        return lr

    def step(self) -> float:
        """The rate for this update, then decay the boost for the next one."""
        lr = self.rate()
        self.multiplier = 1.0 + (self.multiplier - 1.0) * 0.5 ** (1.0 / self.half_life)
        return lr

    def state(self) -> dict[str, float]:
        return {
            "multiplier": self.multiplier,
            "drifts": self.drifts,
            "shifted": float(self.shifted),
        }

    def restore(self, state: dict[str, float]) -> None:
        """Resume the boost after a restart; ADWIN's window is rebuilt from new errors."""
        self.multiplier = float(np.clip(state.get("multiplier", 1.0), 1.0, self.max_boost))
        self.drifts = int(state.get("drifts", 0))
        self.shifted = bool(state.get("shifted", 0.0))
