"""DP drift response: private rows since a change are reused only as the budget allows,
each reuse in the ledger before anything trains."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from flywheel.learner.dp_window import ChangeWindow
from flywheel.learner.private_step import PrivateStep
from flywheel.learner.trainer import (
    DRIFT_PUBLIC_SHARE,
    SETTLED_PUBLIC_SHARE,
    OnlineTrainer,
    TrainerConfig,
)
from flywheel.settings import PrivacySettings
from flywheel.store import StoredExample, make_engine, upgrade

LABELS = {"a": 0, "b": 1}


def rows(first: int, n: int, source: str | None = None) -> list[StoredExample]:
    rng = np.random.default_rng(first)
    return [
        StoredExample(
            i,
            "correction",
            "train",
            rng.normal(size=4).tolist(),
            "ab"[i % 2],
            1.0,
            "wrong",
            source,
            f"p{i}",
        )
        for i in range(first, first + n)
    ]


@pytest.fixture
def step(sqlite_url: str):
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    # the defaults: ε = 3 per source, σ calibrated for 2 updates of 8 steps at q = 0.5
    yield PrivateStep(PrivacySettings(), 8, engine, "m:online", window=1000)
    engine.dispose()


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_the_window_holds_trained_rows_and_a_change_opens_it_from_its_id():
    window = ChangeWindow(capacity=8)
    window.add(rows(0, 10))
    assert len(window) == 8  # the newest 8
    assert window.reusable() == []  # no change: nothing to reuse
    window.open(5)
    assert [r.id for r in window.reusable()] == [5, 6, 7, 8, 9]
    assert [r.id for r in window.reusable(exclude={6, 8})] == [5, 7, 9]
    window.add(rows(3, 4))  # older than the change: not reusable
    assert [r.id for r in window.reusable()] == [5, 6, 7, 8, 9]
    assert window.drop(["prediction:p5", "prediction:p9"]) == 2
    assert [r.id for r in window.reusable()] == [6, 7, 8]
    window.close()
    assert window.reusable() == []
    with pytest.raises(ValueError, match="capacity"):
        ChangeWindow(-1)


def test_no_reuse_before_a_change_nor_when_not_asked(step: PrivateStep):
    module = model()
    step.plan(rows(0, 10), 1, module)
    second = step.plan(rows(10, 10), 2, module, reuse=True)  # boosted, but no change seen
    assert second is not None and second.reused == 0
    step.change(0)
    third = step.plan(rows(20, 10), 3, module, reuse=False)  # change seen, boost over
    assert third is not None and third.reused == 0


def test_a_reuse_is_in_the_ledger_before_training(step: PrivateStep):
    module = model()
    before = copy.deepcopy(module.state_dict())
    first = step.plan(rows(0, 10), 1, module)
    assert first is not None and first.reused == 0
    step.change(0)  # the drift was seen on update 1's rows
    second = step.plan(rows(10, 10), 2, module, reuse=True)
    assert second is not None
    assert second.reused == 10 and sorted(r.id for r in second.rows) == list(range(20))
    assert second.reused_ids == frozenset(range(10))
    # planned, not trained: the model is untouched, the ledger already has every use
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    ledger = step.ledger
    entry = ledger.entries("m:online")[-1]
    assert (entry.update_no, entry.sources, entry.examples) == (2, 20, 20)
    spends = {s.source: s for s in ledger.sources("m:online")}
    assert spends["prediction:p0"].updates == 2  # used in update 1, reused in update 2
    assert spends["prediction:p15"].updates == 1
    assert spends["prediction:p0"].epsilon == pytest.approx(second.plan.epsilon_lineage)
    assert second.metrics(module, *_holdouts())["dp_reused_examples"] == 10


def test_a_reuse_the_budget_cannot_afford_is_refused_and_not_an_exclusion(step: PrivateStep):
    module = model()
    step.plan(rows(0, 10), 1, module)
    step.change(0)
    step.plan(rows(10, 10), 2, module, reuse=True)  # rows 0..9: their second mechanism
    third = step.plan(rows(20, 10), 3, module, reuse=True)
    assert third is not None and third.plan is not None
    # a third mechanism would pass ε = 3 for rows 0..9: not reused; rows 10..19 are
    assert third.reused_ids == frozenset(range(10, 20))
    assert set(third.plan.excluded) == {f"prediction:p{i}" for i in range(10)}
    assert third.excluded == 0  # every new row trains: no new source was left out
    spends = {s.source: s for s in step.ledger.sources("m:online")}
    assert spends["prediction:p0"].updates == 2
    assert max(s.epsilon for s in spends.values()) <= 3.0
    # their rows are forgotten: the next update does not ask the planner about them again
    assert all(r.id >= 10 for r in step.window.reusable())


def test_a_source_in_new_and_reused_rows_joins_the_update_once_within_its_cap(
    step: PrivateStep,
):
    module = model()
    step.plan(rows(0, 10, source="s1"), 1, module)
    step.change(0)
    second = step.plan(rows(10, 10, source="s1"), 2, module, reuse=True)
    assert second is not None and second.sources == {"source:s1": 16}  # the cap: new first
    assert second.reused == 6 and second.capped == 0  # a reused row over the cap: not reused
    assert step.ledger.sources("m:online")[0].updates == 2


def _holdouts():
    from flywheel.learner.evaluation import Holdout

    held = Holdout.of_names(np.zeros((4, 4), np.float32), ["a", "b", "a", "b"], ["a", "b"])
    return held, held


def test_public_replay_is_cut_after_an_error_drift_and_counts_new_rows_only():
    from flywheel.privacy import Mechanism

    trainer = OnlineTrainer(model(), TrainerConfig(replay=2.0), input_dim=4, seed=0)
    rng = np.random.default_rng(0)
    trainer.remember_public(rng.normal(size=(500, 4)), rng.integers(0, 2, 500))
    x, y = rng.normal(size=(20, 4)).astype(np.float32), rng.integers(0, 2, 20)
    args = (x, y, np.ones(20, np.float32), np.arange(20), Mechanism(0.5, 1.0, 2))

    def replayed(new: int | None = None) -> int:
        return trainer.update_private(*args, max_grad_norm=1.0, new=new).replayed

    assert replayed() == 40 and replayed(new=5) == 10  # reused rows bring no replay
    trainer.start_change(labels_changed=True)
    trainer.elastic.multiplier = trainer.elastic.max_boost  # the boost after the drift
    assert replayed(new=10) == round(20 * DRIFT_PUBLIC_SHARE)
    trainer.elastic.multiplier = 1.0  # settled
    assert replayed(new=10) == round(20 * SETTLED_PUBLIC_SHARE)
    with pytest.raises(ValueError, match="new must be"):
        replayed(new=21)


def test_a_restarted_step_resumes_the_window_and_the_planner_still_decides(
    sqlite_url: str, step: PrivateStep
):
    module = model()
    step.plan(rows(0, 10), 1, module)
    step.change(0)
    step.plan(rows(10, 10), 2, module, reuse=True)  # rows 0..9 reused: their budget is spent
    engine = make_engine(sqlite_url)
    try:
        again = PrivateStep(PrivacySettings(), 8, engine, "m:online", window=1000)
        again.resume(0, rows(0, 20))  # what the learner reads back: every row since the change
        third = again.plan(rows(20, 10), 3, module, reuse=True)
        assert third is not None and third.reused_ids == frozenset(range(10, 20))
    finally:
        engine.dispose()
