"""The learner's parts without the store: cursor bookkeeping, gate, elastic rate, trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flywheel.learner import (
    CursorState,
    ElasticRate,
    Holdout,
    OnlineTrainer,
    Reservoir,
    TrainerConfig,
    evaluate_gate,
)
from flywheel.modelspec import ModelSpec, build_model


def test_cursor_reads_ids_that_commit_late_and_moves_the_watermark_after_the_grace():
    c = CursorState()
    c.mark_read([1, 2, 4, 5], now=100.0)  # id 3 is not committed yet
    assert [c.consumed(i) for i in range(1, 7)] == [True, True, False, True, True, False]
    c.advance(grace_s=30, now=110.0)
    assert c.watermark == 0  # too soon: 3 may still commit
    c.mark_read([3], now=115.0)
    c.advance(grace_s=30, now=131.0)
    assert c.watermark == 5 and c.above == [] and c.marks == [[115.0, 3.0]]
    c.mark_read([7], now=140.0)  # 6 is late
    c.advance(grace_s=30, now=146.0)
    assert c.watermark == 5 and c.above == [[7, 7]] and not c.consumed(6)
    assert CursorState.from_dict(c.to_dict()) == c


def test_gate_passes_only_better_on_recent_and_within_tolerance_on_trusted():
    x = np.array([[1.0, 0.0], [0.0, 1.0]] * 20, dtype=np.float32)
    y = np.array([0, 1] * 20)
    good, bad = _Lookup(True), _Lookup(False)
    trusted = recent = Holdout(x, y)
    r = evaluate_gate(good, bad, trusted=trusted, recent=recent, tolerance=0.02, min_recent=10)
    assert r.passed and r.recent_candidate == 1.0 and r.recent_champion == 0.0
    r = evaluate_gate(bad, good, trusted=trusted, recent=recent, tolerance=0.02, min_recent=10)
    assert not r.passed and "recent" in r.reason
    # better on recent data but it forgot the trusted holdout
    r = evaluate_gate(good, bad, trusted=Holdout(x, 1 - y), recent=recent, tolerance=0.02,
                      min_recent=10)
    assert not r.passed and "trusted" in r.reason
    r = evaluate_gate(good, bad, trusted=trusted, recent=Holdout(x[:5], y[:5]),
                      tolerance=0.02, min_recent=10)
    assert not r.passed and "only 5" in r.reason
    assert r.summary().startswith("rejected:")


class _Lookup(torch.nn.Module):
    """Logits = the input (right for the test's data) or the input flipped (always wrong)."""

    def __init__(self, correct: bool) -> None:
        super().__init__()
        self.correct = correct

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.correct else x.flip(1)


def test_elastic_rate_rises_on_more_errors_not_on_fewer_and_decays():
    rate = ElasticRate(0.01, max_boost=4.0, half_life=1.0)
    assert rate.observe_errors([False] * 300) is False
    assert rate.observe_errors([True] * 200) is True
    assert rate.multiplier == 4.0
    assert rate.step() == pytest.approx(0.04)
    assert rate.multiplier == pytest.approx(2.5)  # half the excess per half-life
    calm = ElasticRate(0.01, max_boost=4.0)
    calm.observe_errors([True] * 300)
    assert calm.observe_errors([False] * 300) is False  # fewer errors is not a reason
    assert calm.multiplier == 1.0
    assert calm.observe_shift(0.01) is False and calm.multiplier == 1.0
    assert calm.observe_shift(0.6) is True and calm.multiplier == 4.0


def test_reservoir_keeps_a_uniform_sample_of_bounded_size():
    r = Reservoir(capacity=100, dim=1, seed=0)
    xs = np.arange(10_000, dtype=np.float32).reshape(-1, 1)
    r.add(xs, np.zeros(10_000, dtype=np.int64), np.ones(10_000, dtype=np.float32))
    assert r.size == 100 and r.seen == 10_000
    assert 3000 < r.x.mean() < 7000  # not just the first or the last ones


def test_trainer_respects_example_weights():
    spec = ModelSpec(input_dim=2, hidden=[8], labels=["a", "b"])
    x = np.array([[0.5, 0.5], [0.5, 0.5]], dtype=np.float32)
    y = np.array([0, 1])
    outcomes = []
    for w in ([10.0, 0.1], [0.1, 10.0]):
        torch.manual_seed(0)
        t = OnlineTrainer(build_model(spec), TrainerConfig(lr=0.05, steps=30, replay=0,
                                                           elastic=False), input_dim=2)
        t.update(x, y, np.array(w, dtype=np.float32))
        outcomes.append(int(t.predict(x[:1])[0]))
    assert outcomes == [0, 1]


def test_trainer_mixes_in_replay_and_rejects_mismatched_rows():
    spec = ModelSpec(input_dim=2, hidden=[8], labels=["a", "b"])
    t = OnlineTrainer(build_model(spec), TrainerConfig(replay=2.0, steps=1), input_dim=2)
    t.remember(np.zeros((50, 2), np.float32), np.zeros(50, np.int64))
    stats = t.update(np.ones((10, 2), np.float32), np.ones(10, np.int64))
    assert (stats.new, stats.replayed) == (10, 20)
    with pytest.raises(ValueError, match="equal"):
        t.update(np.ones((3, 2), np.float32), np.ones(2, np.int64))
