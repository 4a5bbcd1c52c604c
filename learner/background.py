"""A background line: on a drift warning, a second model learns only what came since, and
replaces the line when it is better on the rows that came after.

The idea is Adaptive Random Forest's (Gomes et al., 2017): a detector with a looser
threshold than the drift detector raises a *warning*; a background learner starts then,
trained only on data since the warning, and takes the foreground's place when it wins.
After a label reversal the foreground model has to unlearn the old concept through the
boosted rate; a model that never knew it only has to learn the new one.

Here the background starts as the foreground model with its hidden layers re-initialised
(the input scaling layer and the architecture are kept) and is trained at the capped boosted
rate on every row since the warning (at most `window`). Before each update both models
score the new batch, which neither has trained on yet; the background replaces the line
once it has been scored on at least `min_rows` rows and wins the paired comparison at
McNemar z >= `z` (only rows where the two disagree count). A background that has not won
after `max_rows` rows is dropped; a new warning can start another. The gate still decides
what is served: this only changes what the next candidates grow from.

Measured (`python -m bench elastic --background`, see docs/benchmarks.md): the figures
are in the benchmark's table; the background helps most on label reversals, where the
foreground must unlearn, and costs nothing on stationary data (no warning, no second
model).

>>> import numpy as np, torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> line = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
>>> bg = BackgroundLine(BackgroundConfig(min_rows=50), input_dim=2, lr=0.05, steps=20)
>>> bg.running
False
>>> bg.start(line)
>>> bg.running
True
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(100, 2)).astype(np.float32)
>>> y = (x[:, 0] > 0).astype(np.int64)
>>> for _ in range(5):
...     _ = bg.score(x, y, np.zeros(100, dtype=bool))  # the foreground got all wrong
...     bg.train(x, y, np.ones(100, np.float32))
>>> bg.wins()
True
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flywheel.modelspec import Blend, training_losses

__all__ = ["BackgroundConfig", "BackgroundLine"]


@dataclass(frozen=True)
class BackgroundConfig:
    """When a background line starts, how long it may try, and what counts as a win."""

    warning_delta: float = 0.01  # ADWIN delta of the warning detector (ARF's default)
    min_rows: int = 200  # scored on at least this many new rows before it may replace
    max_rows: int = 3000  # dropped if it has not won after this many
    z: float = 2.0  # McNemar z the background must reach on the paired rows
    window: int = 1000  # trains on at most this many rows since the warning
    head_only: bool = False  # start from the line with only its output layer fresh

    def __post_init__(self) -> None:
        checks = {
            "0 < warning_delta < 1": 0 < self.warning_delta < 1,
            "min_rows >= 1": self.min_rows >= 1,
            "max_rows >= min_rows": self.max_rows >= self.min_rows,
            "z > 0": self.z > 0,
            "window >= 1": self.window >= 1,
        }
        bad = [rule for rule, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"BackgroundConfig needs {', '.join(bad)}: got {self}")


def _fresh_head(module: nn.Module) -> nn.Module:
    """A copy of `module` with only its last layer that has parameters re-initialised (a
    `Blend`: each head's, and its mixture weights start over)."""
    clone = copy.deepcopy(module)
    nets = [clone.mlp, clone.linear] if isinstance(clone, Blend) else [clone]
    for net in nets:
        last = [m for m in net.modules() if callable(getattr(m, "reset_parameters", None))]
        if last:
            last[-1].reset_parameters()  # type: ignore[operator]
    if isinstance(clone, Blend):
        clone.errors.zero_()
    return clone


def _fresh(module: nn.Module) -> nn.Module:
    """A copy of `module` with every layer that has parameters re-initialised, except the
    first (input scaling: `Standardize` has buffers only, `Encode` keeps its embeddings);
    a `Blend`: each head so, and its mixture weights start over."""
    clone = copy.deepcopy(module)
    for net in [clone.mlp, clone.linear] if isinstance(clone, Blend) else [clone]:
        children = list(net.children())
        for layer in net.modules():
            if children and layer is children[0]:
                continue
            reset = getattr(layer, "reset_parameters", None)
            if callable(reset) and layer is not net:
                reset()
    if isinstance(clone, Blend):
        clone.errors.zero_()
    return clone


class BackgroundLine:
    """One background model at a time, its training window and its paired score."""

    def __init__(
        self, config: BackgroundConfig, *, input_dim: int, lr: float, steps: int, seed: int = 0
    ) -> None:
        from river.drift import ADWIN

        self.config = config
        # fresh weights come from the line's own generator, not torch's global one: two
        # learners in one process (a benchmark's arms) stay independent of each other
        self._seeds = np.random.default_rng(seed)
        self.input_dim = input_dim
        self.lr = lr
        self.steps = steps
        self.module: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._warning = ADWIN(delta=config.warning_delta)
        self.started = 0  # background lines started so far
        self.replaced = 0  # of which replaced the foreground
        self.last_win: tuple[int, float] | None = None  # (rows scored, z) of the last take
        self._reset_window()

    def _reset_window(self) -> None:
        self.x = np.empty((0, self.input_dim), np.float32)
        self.y = np.empty(0, np.int64)
        self.w = np.empty(0, np.float32)
        self.rows = 0  # rows scored since it started
        self.only_bg = 0  # rows the background got right and the foreground wrong
        self.only_fg = 0  # and the other way round

    @property
    def running(self) -> bool:
        return self.module is not None

    def warn(self, errors: list[bool]) -> bool:
        """Feed the served model's errors; True when a warning (a rise) was seen now."""
        warned = False
        for err in errors:
            before = self._warning.estimation
            self._warning.update(float(bool(err)))
            if self._warning.drift_detected and self._warning.estimation > before:
                warned = True
        return warned

    def start(self, foreground: nn.Module) -> None:
        """Start a background line from `foreground`'s architecture (fresh weights)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self._seeds.integers(0, 2**31 - 1)))
            self.module = (_fresh_head if self.config.head_only else _fresh)(foreground)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=self.lr)
        self.started += 1
        self._reset_window()

    def stop(self) -> None:
        self.module = None
        self.optimizer = None
        self._reset_window()

    def score(self, x: np.ndarray, y: np.ndarray, foreground_right: np.ndarray) -> int:
        """Score the background on new rows neither model trained on; returns its hits."""
        assert self.module is not None
        with torch.inference_mode():
            pred = self.module(torch.from_numpy(np.asarray(x, np.float32))).argmax(1).numpy()
        right = pred == np.asarray(y)
        fg = np.asarray(foreground_right, bool)
        self.rows += len(y)
        self.only_bg += int(np.sum(right & ~fg))
        self.only_fg += int(np.sum(fg & ~right))
        return int(right.sum())

    def z_score(self) -> float:
        """McNemar's z of background over foreground on the rows scored so far."""
        n = self.only_bg + self.only_fg
        return (self.only_bg - self.only_fg) / math.sqrt(n) if n else 0.0

    def wins(self) -> bool:
        return self.rows >= self.config.min_rows and self.z_score() >= self.config.z

    def expired(self) -> bool:
        return self.rows >= self.config.max_rows and not self.wins()

    def remember(self, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        """Add rows to the window since the warning without fitting it (under DP the line
        trains in the private update's own steps; the window is what it hands over)."""
        keep = self.config.window
        self.x = np.concatenate([self.x, np.asarray(x, np.float32)])[-keep:]
        self.y = np.concatenate([self.y, np.asarray(y, np.int64)])[-keep:]
        self.w = np.concatenate([self.w, np.asarray(w, np.float32)])[-keep:]

    def train(self, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        """Add the new rows to the window since the warning and fit it for `steps` steps."""
        assert self.module is not None and self.optimizer is not None
        self.remember(x, y, w)
        bx, by, bw = (torch.from_numpy(a) for a in (self.x, self.y, self.w))
        self.module.train()
        for _ in range(self.steps):
            self.optimizer.zero_grad(set_to_none=True)
            losses = training_losses(self.module, bx, by)
            ((losses * bw).sum() / bw.sum()).backward()
            self.optimizer.step()
        self.module.eval()

    def take(self) -> tuple[nn.Module, torch.optim.Optimizer, tuple[np.ndarray, ...]]:
        """Hand the background over to replace the foreground (and stop running it)."""
        assert self.module is not None and self.optimizer is not None
        taken = (self.module, self.optimizer, (self.x, self.y, self.w))
        self.replaced += 1
        self.last_win = (self.rows, self.z_score())
        self.module = None
        self.optimizer = None
        self._reset_window()
        return taken
