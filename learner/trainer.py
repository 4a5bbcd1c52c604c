"""One mini-batch online update: new examples, a replay sample of older ones, weights.

Kept free of the store and the registry so the same update runs in the learner process,
the benchmarks (river streams, prequential) and, later, inside a federated client.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flywheel.learner.elastic import ElasticRate
from flywheel.privacy import Mechanism, PrivateBatch, dp_update
from flywheel.settings import Settings


@dataclass(frozen=True)
class TrainerConfig:
    lr: float = 0.003
    steps: int = 8
    replay: float = 2.0  # replayed examples per new one
    max_boost: float = 3.0
    half_life: float = 3.0
    reservoir: int = 5000
    elastic: bool = True  # False: a fixed learning rate (the benchmarks' baseline)

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainerConfig:
        return cls(lr=settings.learn_lr, steps=settings.learn_steps,
                   replay=settings.learn_replay, max_boost=settings.learn_max_boost,
                   half_life=settings.learn_boost_half_life)


@dataclass(frozen=True)
class UpdateStats:
    lr: float
    multiplier: float
    new: int
    replayed: int
    loss_before: float
    loss_after: float


class Reservoir:
    """A uniform sample of everything seen so far (Vitter's algorithm R), in arrays."""

    def __init__(self, capacity: int, dim: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.x = np.empty((capacity, dim), dtype=np.float32)
        self.y = np.empty(capacity, dtype=np.int64)
        self.w = np.empty(capacity, dtype=np.float32)
        self.size = 0
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def add(self, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        for i in range(len(y)):
            self.seen += 1
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                slot = int(self.rng.integers(0, self.seen))
                if slot >= self.capacity:
                    continue
            self.x[slot], self.y[slot], self.w[slot] = x[i], y[i], w[i]

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = min(k, self.size)
        idx = self.rng.choice(self.size, size=k, replace=False) if k else np.empty(0, int)
        return self.x[idx], self.y[idx], self.w[idx]


class OnlineTrainer:
    """Updates a module in place, one mini-batch at a time, with an elastic step size."""

    def __init__(self, module: nn.Module, config: TrainerConfig, *, input_dim: int,
                 seed: int = 0, novelty: object | None = None) -> None:
        self.module = module
        self.config = config
        self.elastic = ElasticRate(config.lr, config.max_boost, config.half_life)
        self.reservoir = Reservoir(config.reservoir, input_dim, seed)
        self.optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
        self.novelty = novelty  # anything with is_novel(rows) -> bool array (ReferenceStats)
        self.generator = torch.Generator().manual_seed(seed)
        self.public = Reservoir(config.reservoir, input_dim, seed + 1)
        self.updates = 0

    def reset_module(self, module: nn.Module) -> None:
        """Continue from another model (a champion chosen elsewhere); keeps the replay pool."""
        self.module = module
        self.optimizer = torch.optim.Adam(module.parameters(), lr=self.config.lr)

    def observe_errors(self, errors: list[bool]) -> bool:
        return self.elastic.observe_errors(errors) if self.config.elastic else False

    def observe_inputs(self, x: np.ndarray) -> bool:
        """Feed recent inputs to the shift score; True if they look like a change."""
        if self.config.elastic and self.novelty is not None and len(x):
            share = float(np.mean(self.novelty.is_novel(np.asarray(x, dtype=np.float64))))  # type: ignore[attr-defined]
            return self.elastic.observe_shift(share)
        return False

    def remember(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> None:
        """Add examples to the replay pool without training on them (seed data, restarts)."""
        w = np.ones(len(y), dtype=np.float32) if w is None else w
        self.reservoir.add(np.asarray(x, np.float32), np.asarray(y, np.int64),
                           np.asarray(w, np.float32))

    def remember_public(self, x: np.ndarray, y: np.ndarray) -> None:
        """The platform's own (seed) data: the only replay a private update may use."""
        self.public.add(np.asarray(x, np.float32), np.asarray(y, np.int64),
                        np.ones(len(y), np.float32))

    def update_private(self, x: np.ndarray, y: np.ndarray, w: np.ndarray,
                       sources: np.ndarray, mechanism: Mechanism, *, max_grad_norm: float,
                       engine: str = "auto") -> UpdateStats:
        """One DP-SGD update (see flywheel.privacy.dp_sgd); the caller has accounted for it.

        Replay comes only from the public pool: replaying private examples would put their
        sources into later updates the budget did not plan for.
        """
        x = np.asarray(x, np.float32)
        y = np.asarray(y, np.int64)
        if not (len(x) == len(y) == len(w) == len(sources)) or len(y) == 0:
            raise ValueError("need equal, non-zero numbers of rows, labels, weights, sources")
        px, py, pw = self.public.sample(int(round(self.config.replay * len(y))))
        batch = PrivateBatch(
            x=np.concatenate([x, px]), y=np.concatenate([y, py]),
            weight=np.concatenate([np.minimum(np.asarray(w, np.float32), 1.0), pw]),
            sources=np.concatenate([np.asarray(sources, np.int64),
                                    np.full(len(py), -1, np.int64)]),
            public=np.concatenate([np.zeros(len(y), bool), np.ones(len(py), bool)]))
        multiplier = self.elastic.multiplier if self.config.elastic else 1.0
        lr = self.elastic.step() if self.config.elastic else self.config.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats = dp_update(self.module, self.optimizer, batch, steps=mechanism.steps,
                          sample_rate=mechanism.sample_rate,
                          noise_multiplier=mechanism.noise_multiplier,
                          max_grad_norm=max_grad_norm, generator=self.generator, engine=engine)
        self.updates += 1
        return UpdateStats(lr, multiplier, len(y), len(py), stats.loss, stats.loss)

    def update(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> UpdateStats:
        """Several gradient steps on the new examples plus a replay sample; weights respected."""
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        w = np.ones(len(y), dtype=np.float32) if w is None else np.asarray(w, np.float32)
        if not (len(x) == len(y) == len(w)) or len(y) == 0:
            raise ValueError(f"need equal, non-zero numbers of rows, labels and weights, "
                             f"got {len(x)}, {len(y)}, {len(w)}")
        rx, ry, rw = self.reservoir.sample(int(round(self.config.replay * len(y))))
        bx = torch.from_numpy(np.concatenate([x, rx]))
        by = torch.from_numpy(np.concatenate([y, ry]))
        bw = torch.from_numpy(np.concatenate([w, rw]))
        multiplier = self.elastic.multiplier if self.config.elastic else 1.0
        lr = self.elastic.step() if self.config.elastic else self.config.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.module.train()
        loss_before = loss_after = 0.0
        for step in range(self.config.steps):
            self.optimizer.zero_grad(set_to_none=True)
            losses = nn.functional.cross_entropy(self.module(bx), by, reduction="none")
            loss = (losses * bw).sum() / bw.sum()
            loss.backward()
            self.optimizer.step()
            if step == 0:
                loss_before = float(loss.detach())
            loss_after = float(loss.detach())
        self.module.eval()
        self.reservoir.add(x, y, w)
        self.updates += 1
        return UpdateStats(lr, multiplier, len(y), len(ry), loss_before, loss_after)

    def predict(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(np.asarray(x, np.float32))).argmax(1).numpy()
