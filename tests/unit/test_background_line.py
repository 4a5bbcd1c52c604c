"""The background line (learner/background.py) and how the trainer uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flywheel.learner import BackgroundConfig, BackgroundLine, OnlineTrainer, TrainerConfig
from flywheel.modelspec import ModelSpec, build_model


def _rows(n: int, rng: np.random.Generator, flipped: bool) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    return x, (1 - y) if flipped else y


def _trainer(background: BackgroundConfig | None) -> OnlineTrainer:
    torch.manual_seed(0)
    module = build_model(ModelSpec(input_dim=2, hidden=[16], labels=["a", "b"]))
    return OnlineTrainer(
        module, TrainerConfig(lr=0.003, steps=4, replay=1.0, background=background), input_dim=2
    )


def _run(trainer: OnlineTrainer, batches: int, rng: np.random.Generator, flipped: bool) -> list:
    stats = []
    for _ in range(batches):
        x, y = _rows(100, rng, flipped)
        trainer.observe_errors((trainer.predict(x) != y).tolist())
        stats.append(trainer.update(x, y))
    return stats


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="max_rows >= min_rows"):
        BackgroundConfig(min_rows=500, max_rows=100)
    with pytest.raises(ValueError, match="0 < warning_delta < 1"):
        BackgroundConfig(warning_delta=0.0)


def test_the_warning_detector_fires_on_a_rise_in_errors_only():
    line = BackgroundLine(BackgroundConfig(), input_dim=2, lr=0.01, steps=1)
    assert not line.warn([False] * 300)
    assert line.warn([True] * 300)
    falling = BackgroundLine(BackgroundConfig(), input_dim=2, lr=0.01, steps=1)
    falling.warn([True] * 300)
    assert not falling.warn([False] * 300)  # the model caught up: no warning


def test_the_background_starts_fresh_but_keeps_the_input_scaling():
    module = build_model(ModelSpec(input_dim=2, hidden=[8], labels=["a", "b"]))
    first = module[0]
    first.mean.fill_(3.0)  # type: ignore[operator]
    line = BackgroundLine(BackgroundConfig(), input_dim=2, lr=0.01, steps=1)
    line.start(module)
    assert line.module is not module and line.running and line.started == 1
    assert torch.equal(line.module[0].mean, first.mean)  # type: ignore[index]
    old = [p for p in module.parameters()]
    new = [p for p in line.module.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(old, new, strict=True))


def test_a_background_that_never_wins_is_dropped_after_max_rows():
    line = BackgroundLine(
        BackgroundConfig(min_rows=100, max_rows=300), input_dim=2, lr=0.01, steps=1
    )
    line.start(build_model(ModelSpec(input_dim=2, hidden=[4], labels=["a", "b"])))
    x, y = _rows(100, np.random.default_rng(0), False)
    for _ in range(3):
        line.score(x, y, np.ones(100, dtype=bool))  # the foreground is always right
    assert line.z_score() <= 0 and not line.wins() and line.expired()


def test_after_a_label_reversal_the_background_replaces_the_line():
    rng = np.random.default_rng(1)
    trainer = _trainer(BackgroundConfig())
    before = _run(trainer, 20, rng, flipped=False)
    assert trainer.background is not None and trainer.background.started == 0
    assert not any(s.replaced for s in before)
    foreground = trainer.module
    after = _run(trainer, 25, rng, flipped=True)
    assert trainer.background.started >= 1
    assert any(s.replaced for s in after) and trainer.background.replaced >= 1
    assert trainer.module is not foreground
    x, y = _rows(2000, np.random.default_rng(99), flipped=True)
    assert float((trainer.predict(x) == y).mean()) > 0.9


def test_without_a_background_config_nothing_runs_beside_the_line():
    rng = np.random.default_rng(1)
    trainer = _trainer(None)
    _run(trainer, 10, rng, flipped=False)
    stats = _run(trainer, 10, rng, flipped=True)
    assert trainer.background is None and not any(s.replaced for s in stats)


def test_the_setting_turns_the_background_line_on_and_off():
    from flywheel.settings import load_settings

    on = TrainerConfig.from_settings(load_settings().learner)
    off = TrainerConfig.from_settings(load_settings(learn_background=False).learner)
    assert on.background == BackgroundConfig() and off.background is None
