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
    # better on recent data that contradicts the trusted holdout (every label reversed):
    # binding under "hold"; waived, and said so, under "follow" (the default)
    reversed_trusted = Holdout(x, 1 - y)
    r = evaluate_gate(
        good,
        bad,
        trusted=reversed_trusted,
        recent=recent,
        tolerance=0.02,
        min_recent=10,
        concept_policy="hold",
    )
    assert not r.passed and "trusted" in r.reason and not r.concept_change
    assert "FLYWHEEL_GATE_CONCEPT_CHANGE=hold" in r.reason
    r = evaluate_gate(
        good, bad, trusted=reversed_trusted, recent=recent, tolerance=0.02, min_recent=10
    )
    assert r.passed and r.concept_change and "concept change" in r.reason
    assert r.metrics()["gate_concept_change"] == 1.0
    r = evaluate_gate(
        good, bad, trusted=trusted, recent=Holdout(x[:5], y[:5]), tolerance=0.02, min_recent=10
    )
    assert not r.passed and "only 5" in r.reason
    assert r.summary().startswith("rejected:")


def test_gate_keeps_the_trusted_check_when_recent_data_does_not_contradict_it():
    """A candidate that forgot trusted rows is refused under "follow" too when it lost far
    more of them than the champion lost on recent data (forgetting, not a change), or when
    its win on recent rows is within chance (McNemar z < 3); the rejection's reason names
    the test that held the waiver back, with its numbers."""
    n = 200
    x = np.eye(n, dtype=np.float32)  # row i is the one-hot of i: a table lookup decides
    y = np.zeros(n, np.int64)
    trusted, recent = Holdout(x[:100], y[:100]), Holdout(x[100:], y[100:])

    def table(wrong: set[int]) -> torch.nn.Module:
        return _Table([1 if i in wrong else 0 for i in range(n)])

    # the champion: right on every trusted row, wrong on 10 % of recent ones
    champion = table(set(range(100, 120)))
    # the candidate: fixes them all but forgets half the trusted rows (far more than the
    # world changed: 10 %)
    forgetful = table(set(range(50)))
    r = evaluate_gate(forgetful, champion, trusted=trusted, recent=recent, tolerance=0.02,
                      min_recent=10)  # fmt: skip
    assert not r.passed and not r.concept_change and "trusted" in r.reason
    assert "no concept change: the candidate is right on 0.500 of trusted rows" in r.reason
    assert r.reason.endswith("it forgot)")  # the waiver's third test, named in the reason
    # a champion wrong on 40 % of recent rows: a change; a candidate that fixes 4 of them
    # (and breaks 1) is no evidence that it has learned the new concept
    champion = table(set(range(100, 180)))
    lucky = table(set(range(30)) | set(range(104, 180)) | {190})
    r = evaluate_gate(lucky, champion, trusted=trusted, recent=recent, tolerance=0.02,
                      min_recent=10)  # fmt: skip
    assert not r.passed and not r.concept_change
    # McNemar (4 - 1) / sqrt(5) = 1.3 held the waiver back, and the reason says so
    assert "no concept change: the candidate fixes 4 of its recent errors for 1 new" in r.reason
    assert "z=1.3 < 3" in r.reason
    # the same champion, and a candidate that learned the new concept: followed
    learned = table(set(range(30)) | {190})
    r = evaluate_gate(learned, champion, trusted=trusted, recent=recent, tolerance=0.02,
                      min_recent=10)  # fmt: skip
    assert r.passed and r.concept_change


class _Table(torch.nn.Module):
    """Predicts `labels[i]` for the one-hot input of row i (two classes)."""

    def __init__(self, labels: list[int]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(torch.tensor(labels), 2).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.logits


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
        t = OnlineTrainer(
            build_model(spec),
            TrainerConfig(lr=0.05, steps=30, replay=0, elastic=False),
            input_dim=2,
        )
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


# ---- the drift response ----------------------------------------------------------------
class _Recording(torch.nn.Module):
    """The model, plus every batch it was run on (what the trainer trained on)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.detach().clone())
        return self.inner(x)


class _AllNovel:
    def is_novel(self, x: np.ndarray) -> np.ndarray:
        return np.ones(len(x), dtype=bool)


OLD, NEW = -1.0, 1.0  # feature value marking examples from before / after the change


def _trainer(**config: object) -> tuple[OnlineTrainer, _Recording]:
    torch.manual_seed(0)
    model = _Recording(build_model(ModelSpec(input_dim=2, hidden=[8], labels=["a", "b"])))
    t = OnlineTrainer(model, TrainerConfig(**config), input_dim=2, novelty=_AllNovel())
    t.remember(np.full((300, 2), OLD, np.float32), np.zeros(300, np.int64))
    return t, model


def _new_rows(n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, 2), NEW, np.float32), np.ones(n, np.int64)


def _error_drift(t: OnlineTrainer) -> None:
    t.observe_errors([False] * 300)
    assert t.observe_errors([True] * 200) is True


@pytest.mark.parametrize("drift_replay", [True, False])
def test_after_an_error_drift_no_example_from_before_it_is_replayed(drift_replay):
    t, model = _trainer(replay=2.0, steps=1, half_life=0.5, drift_replay=drift_replay)
    _error_drift(t)
    boosted = []
    for _ in range(6):  # boosted, then settled (half-life 0.5): replay from the pool again
        boosted.append(t.elastic.boosted)
        t.update(*_new_rows())
    assert boosted[0] and not boosted[-1]
    trained = torch.cat(model.batches)
    assert (trained == NEW).all() == drift_replay  # the control replays the old pool
    assert t.replay_reset == drift_replay


def test_an_input_shift_alone_keeps_the_replay_pool():
    t, model = _trainer(replay=2.0, steps=1, half_life=0.5)
    assert t.observe_inputs(np.zeros((10, 2))) is True  # everything novel: a shift
    assert t.observe_inputs(np.zeros((10, 2))) is False  # the same shift is not a new change
    for _ in range(6):
        t.update(*_new_rows())
    assert (torch.cat(model.batches) == OLD).any() and not t.replay_reset


def test_while_boosted_updates_train_on_examples_since_the_change_with_more_steps():
    t, model = _trainer(
        replay=0.0, steps=2, max_boost=3.0, half_life=3.0, boost_window=250, max_lr=None
    )
    _error_drift(t)
    stats = [t.update(*_new_rows()) for _ in range(4)]
    # window: 0, 100, 200 then capped at 250 - the 100 new ones
    assert [s.replayed for s in stats] == [0, 100, 150, 150]
    assert [s.steps for s in stats] == [int(np.ceil(2 * s.multiplier)) for s in stats]
    assert stats[0].steps == 6 and stats[0].lr == pytest.approx(0.009)
    assert [len(b) for b in model.batches[:6]] == [100] * 6
    while t.elastic.boosted:
        t.update(*_new_rows())
    settled = t.update(*_new_rows())
    assert (settled.replayed, settled.steps) == (0, 2)  # replay=0: only the new rows


def test_without_an_example_boost_only_the_step_rises():
    t, _ = _trainer(replay=0.0, steps=2, boost_window=0, boost_steps=False)
    _error_drift(t)
    stats = [t.update(*_new_rows()) for _ in range(3)]
    assert [(s.replayed, s.steps) for s in stats] == [(0, 2)] * 3
    assert stats[0].multiplier == 3.0


def test_the_boosted_rate_never_exceeds_the_cap_nor_lowers_the_base():
    rate = ElasticRate(0.004, max_boost=5.0, half_life=2.0, max_lr=0.01)
    rate.observe_errors([False] * 300)
    assert rate.observe_errors([True] * 200)
    rates = [rate.step() for _ in range(20)]
    assert max(rates) == pytest.approx(0.01) and rates[-1] == pytest.approx(0.004, rel=0.1)
    assert all(0.004 <= r <= 0.01 + 1e-12 for r in rates)
    big = ElasticRate(0.03, max_boost=3.0, max_lr=0.01)
    big.observe_shift(1.0)
    assert big.multiplier == 3.0 and big.rate() == 0.03  # the cap limits the boost only
    t, _ = _trainer(lr=0.004, max_boost=5.0, max_lr=0.01, replay=0.0, steps=1)
    _error_drift(t)
    stats = [t.update(*_new_rows()) for _ in range(5)]
    assert all(s.lr <= 0.01 + 1e-12 for s in stats)
    assert stats[0].multiplier * 0.004 == pytest.approx(0.02)  # what it would be uncapped


def test_trainer_config_and_settings_reject_bad_drift_response_values():
    from flywheel.settings import SettingsError, load_settings

    with pytest.raises(ValueError, match="boost_window >= 0"):
        TrainerConfig(boost_window=-1)
    with pytest.raises(ValueError, match="max_lr > 0"):
        TrainerConfig(max_lr=0.0)
    with pytest.raises(SettingsError, match="FLYWHEEL_LEARN_MAX_LR .* below FLYWHEEL_LEARN_LR"):
        load_settings(learn_lr=0.05, learn_max_lr=0.01)
    cfg = TrainerConfig.from_settings(
        load_settings(
            learn_max_lr=0.02,
            learn_boost_window=300,
            learn_boost_steps=False,
            learn_drift_replay=False,
        ).learner
    )
    assert (cfg.max_lr, cfg.boost_window, cfg.boost_steps, cfg.drift_replay) == (
        0.02,
        300,
        False,
        False,
    )


def test_after_an_error_drift_half_the_replay_is_the_trusted_seed_data():
    t, model = _trainer(replay=2.0, steps=1, half_life=0.5)
    seed = 2.0  # the trusted (public) seed data: the gate checks every candidate on it
    t.remember_public(np.full((300, 2), seed, np.float32), np.zeros(300, np.int64))
    _error_drift(t)
    stats = [t.update(*_new_rows()) for _ in range(6)]
    first = model.batches[0]  # boosted, nothing since the change yet: new + seed
    assert (first[:100] == NEW).all() and (first[100:] == seed).all() and len(first) == 200
    trained = torch.cat(model.batches)
    assert not (trained == OLD).any() and (trained == seed).any()
    assert stats[-1].replayed == 200  # settled: 100 since the change + 100 seed rows
    last = model.batches[-1]
    assert int((last[:, 0] == seed).sum()) == 100
