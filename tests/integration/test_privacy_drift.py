"""A DP learner on a real store follows a label reversal (issue 25: the drift response
under DP), and every reuse of a private example is in the ledger."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flywheel.learner import LearnerConfig, OnlineLearner, ensure_champion
from flywheel.privacy import PrivacyLedger
from flywheel.registry import Registry
from flywheel.store import Example, insert_ignoring_duplicates, make_engine, session_factory
from flywheel.store import upgrade as upgrade_store
from flywheel.streams import LABELS, seed_concept
from tests.trusted import write_synthetic_trusted

pytestmark = pytest.mark.integration
# the reversal: every class becomes the next one (the same inputs, every label wrong)
REVERSED = {name: LABELS[(i + 1) % len(LABELS)] for i, name in enumerate(LABELS)}
BATCH = 100  # the product's default update size
BEFORE, AFTER = 2, 12  # updates on the seed concept, then on its reversal
RESTART = BEFORE + 3  # the learner restarts after this update, while the boost lasts
# Accuracy on the reversed concept after AFTER updates, chance 1/3. Measured (this test,
# the product's DP defaults, 2-core machine): 0.29 with the drift response under DP (0.41
# with a tenth of the public replay while boosted, 0.71 with none); 0.03
# with the code before it (each private example used once, the public seed replayed at 2
# rows per new one): it kept the old concept. The public seed rows, replayed at 0.25 of
# the usual while boosted (trainer.DRIFT_PUBLIC_SHARE), are this reversal's old labels
# in the same region: with none of them 0.71, but `flywheel demo`'s gate then rejects
# every candidate (docs/benchmarks.md#privacy---defaults).
RECOVERED = 0.25


def predict(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(np.asarray(x, np.float32))).argmax(1).numpy()


def add_batch(url: str, x: np.ndarray, labels: list[str], served: list[str], start: int) -> None:
    """Corrections, each its own source (its prediction), wrong where the served model was."""
    engine = make_engine(url)
    try:
        with session_factory(engine).begin() as session:
            insert_ignoring_duplicates(
                session,
                Example,
                [
                    {
                        "dedup_key": f"r:{start + i}",
                        "origin": "correction",
                        "features": row.tolist(),
                        "label": label,
                        "weight": 1.0,
                        "split": "train",
                        "parent_prediction_id": f"p{start + i}",
                        "error_type": None if guess == label else "confident",
                    }
                    for i, (row, label, guess) in enumerate(zip(x, labels, served, strict=True))
                ],
            )
    finally:
        engine.dispose()


def test_a_dp_learner_follows_a_label_reversal_within_its_budget(settings, sqlite_url):
    s = settings.model_copy(
        update={
            "database_url": sqlite_url,
            "learn_cursor_grace_s": 0.0,
            "gate_min_holdout": 5,
            "privacy_enabled": True,  # and every other learner and privacy default
        }
    )
    upgrade_store(sqlite_url)
    registry = Registry.of(s)
    champion = ensure_champion(s.trusted, registry)
    write_synthetic_trusted(s)
    served = registry.load(champion)  # the served model: its mistakes are the corrections'
    concept = seed_concept(s.trusted.seed)
    learner = OnlineLearner(LearnerConfig.of(s), registry)
    last = None
    for k in range(BEFORE + AFTER):
        x, names = concept.sample(BATCH, sample_seed=1000 + k)
        labels = [REVERSED[n] for n in names] if k >= BEFORE else names
        guesses = [served.spec.labels[i] for i in predict(served.module, x)]
        add_batch(sqlite_url, x, labels, guesses, k * BATCH)
        last = learner.step() or last
        if k + 1 == RESTART:  # a new process: state, window and replay cut from the store
            learner = OnlineLearner(LearnerConfig.of(s), registry)
    assert last is not None and last.update == BEFORE + AFTER
    x, names = concept.sample(1000, sample_seed=99)
    truth = np.asarray([served.spec.labels.index(REVERSED[n]) for n in names])
    model = registry.load(last.version).module
    accuracy = float((predict(model, x) == truth).mean())
    assert accuracy >= RECOVERED, f"accuracy on the reversed concept {accuracy:.3f}"

    # the reuse it took is in the ledger, per source, and within the budget
    ledger = PrivacyLedger(make_engine(sqlite_url))
    entries = ledger.entries(learner.lineage)
    assert len(entries) == BEFORE + AFTER
    assert sum(e.examples for e in entries) > (BEFORE + AFTER) * BATCH  # rows used again
    assert [e.examples for e in entries[:BEFORE]] == [BATCH] * BEFORE  # no change: once
    assert entries[RESTART].examples > BATCH  # the restarted learner reuses rows too
    spends = ledger.sources(learner.lineage)
    assert max(sp.updates for sp in spends) == 2  # the default policy: 2 updates a source
    assert sum(sp.updates for sp in spends) == sum(e.sources for e in entries)
    assert max(sp.epsilon for sp in spends) <= s.privacy_epsilon + 1e-9
