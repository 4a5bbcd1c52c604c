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


# -- under DP-SGD: the background trains in the line's own steps, jointly clipped ---------


def _private_batch(n: int, rng: np.random.Generator):
    from flywheel.privacy import PrivateBatch

    x, y = _rows(n, rng, flipped=False)
    x *= 50  # big inputs: every per-example gradient is far over the clip norm
    return PrivateBatch(
        x=x, y=y, weight=np.ones(n, np.float32), sources=np.arange(n), public=np.zeros(n, bool)
    )


def _moves(before: list[torch.Tensor], module: torch.nn.Module) -> torch.Tensor:
    return torch.cat(
        [(p.detach() - b).flatten() for b, p in zip(before, module.parameters(), strict=True)]
    )


def test_a_companion_is_clipped_with_the_line_as_one_vector():
    """One example, no noise, plain SGD at rate 1: the step is its clipped gradient. The two
    models' moves together have norm C (the privacy bound), each alone less."""
    from flywheel.privacy import Companion, dp_update

    torch.manual_seed(0)
    line = build_model(ModelSpec(input_dim=2, hidden=[8], labels=["a", "b"]))
    second = build_model(ModelSpec(input_dim=2, hidden=[8], labels=["a", "b"]))
    batch = _private_batch(1, np.random.default_rng(0))
    before = [[p.detach().clone() for p in m.parameters()] for m in (line, second)]
    dp_update(
        line,
        torch.optim.SGD(line.parameters(), lr=1.0),
        batch,
        steps=1,
        sample_rate=1.0,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(0),
        companion=Companion(second, torch.optim.SGD(second.parameters(), lr=1.0), np.ones(1, bool)),
    )
    a, b = _moves(before[0], line), _moves(before[1], second)
    assert float(torch.cat([a, b]).norm()) == pytest.approx(1.0, rel=1e-3)
    assert 0.05 < float(a.norm()) < 0.999 and 0.05 < float(b.norm()) < 0.999


def test_a_companion_learns_only_the_rows_it_is_given():
    from flywheel.privacy import Companion, dp_update

    line = build_model(ModelSpec(input_dim=2, hidden=[8], labels=["a", "b"]))
    second = build_model(ModelSpec(input_dim=2, hidden=[8], labels=["a", "b"]))
    batch = _private_batch(8, np.random.default_rng(1))
    before = [p.detach().clone() for p in second.parameters()]
    common = {
        "steps": 2,
        "sample_rate": 1.0,
        "noise_multiplier": 0.0,
        "max_grad_norm": 1.0,
        "generator": torch.Generator().manual_seed(0),
    }
    opt = torch.optim.SGD(second.parameters(), lr=1.0)
    dp_update(
        line, torch.optim.SGD(line.parameters(), lr=1.0), batch, **common,
        companion=Companion(second, opt, np.zeros(8, bool)),
    )  # fmt: skip
    assert float(_moves(before, second).norm()) == 0.0
    with pytest.raises(ValueError, match="mark every row"):
        dp_update(
            line, torch.optim.SGD(line.parameters(), lr=1.0), batch, **common,
            companion=Companion(second, opt, np.zeros(3, bool)),
        )  # fmt: skip


def test_under_dp_sgd_a_background_replaces_the_line_after_a_label_reversal():
    """The learner's DP path (`update_private`) with the background line: it starts on the
    warning, learns in the private steps, and takes over; the window it hands over is the
    new rows it was scored on."""
    from flywheel.privacy import Mechanism

    rng = np.random.default_rng(1)
    trainer = _trainer(BackgroundConfig())
    mechanism = Mechanism(1.0, 0.3, 4)  # a little noise: the test is about the wiring

    def run(batches: int, flipped: bool) -> list:
        stats = []
        for _ in range(batches):
            x, y = _rows(100, rng, flipped)
            trainer.observe_errors((trainer.predict(x) != y).tolist())
            stats.append(
                trainer.update_private(
                    x, y, np.ones(100, np.float32), np.arange(100), mechanism, max_grad_norm=1.0
                )
            )
        return stats

    assert not any(s.replaced for s in run(15, flipped=False))
    assert trainer.background is not None and trainer.background.started == 0
    foreground = trainer.module
    after = run(30, flipped=True)
    assert trainer.background.started >= 1
    assert any(s.replaced for s in after) and trainer.module is not foreground
    x, y = _rows(2000, np.random.default_rng(99), flipped=True)
    assert float((trainer.predict(x) == y).mean()) > 0.85


def test_under_dp_a_background_is_scored_only_on_rows_no_model_has_seen():
    from flywheel.privacy import Mechanism

    rng = np.random.default_rng(2)
    trainer = _trainer(BackgroundConfig())
    assert trainer.background is not None
    trainer.background.start(trainer.module)
    x, y = _rows(100, rng, flipped=False)
    fresh = np.zeros(100, bool)
    fresh[:30] = True  # 70 rows are reused from an earlier update
    trainer.update_private(
        x, y, np.ones(100, np.float32), np.arange(100), Mechanism(1.0, 0.5, 2),
        max_grad_norm=1.0, fresh=fresh,
    )  # fmt: skip
    assert trainer.background.rows == 30 and len(trainer.background.y) == 30
