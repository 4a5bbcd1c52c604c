"""One holdout scorer (`flywheel.learner.evaluation`) for the gate and the review page: a row
whose label the model cannot output counts as wrong, and is left out of the log-loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flywheel.learner import UNKNOWN, Holdout, score
from flywheel.learner.gate import scores
from flywheel.modelspec import ModelSpec, build_model
from flywheel.review import LabelledSet, score_doc
from flywheel.review.holdouts import score_on


def _identity() -> torch.nn.Module:
    m = torch.nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.eye(2))
        m.bias.zero_()
    return m


def test_an_unknown_label_counts_as_wrong_and_is_left_out_of_the_log_loss():
    x = np.array([[2, 0], [0, 2], [2, 0], [0, 2]], np.float32)
    h = Holdout.of_names(x, ["a", "b", "zz", "zz"], ["a", "b"])
    assert h.y.tolist() == [0, 1, UNKNOWN, UNKNOWN] and h.unknown == 2
    s = score(_identity(), h)
    assert (s.n, s.correct, s.unknown, s.accuracy) == (4, 2, 2, 0.5)
    known = torch.log_softmax(torch.from_numpy(x[:2]), 1)
    assert s.log_loss == pytest.approx(-float(known[0, 0] + known[1, 1]) / 2)
    assert scores(_identity(), h) == (s.accuracy, s.log_loss)  # the gate's numbers


def test_all_known_labels_give_the_old_cross_entropy_and_accuracy():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, generator=gen)
    y = torch.randint(0, 2, (50,), generator=gen)
    m = _identity()
    s = score(m, Holdout(x.numpy(), y.numpy()))
    with torch.no_grad():
        logits = m(x)
    assert s.unknown == 0
    assert s.log_loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)))
    assert s.accuracy == pytest.approx(float((logits.argmax(1) == y).float().mean()))


def test_an_empty_holdout_scores_nan():
    s = score(_identity(), Holdout(np.empty((0, 2), np.float32), np.empty(0, np.int64)))
    assert s.n == 0 and math.isnan(s.accuracy) and math.isnan(s.log_loss)


def test_review_scores_each_version_on_every_row_with_its_own_labels():
    spec = ModelSpec(input_dim=2, hidden=[4], labels=["a", "b"])
    module = build_model(spec)
    hs = LabelledSet("recent", np.zeros((3, 2), np.float32), ["a", "b", "c"], "test")
    doc = score_doc(score_on(module, spec, hs), hs.labels)
    assert doc["n"] == 3 and doc["accuracy"] <= 2 / 3
    assert "1 rows with labels this model lacks count as wrong" in doc["note"]
    wide = LabelledSet("recent", np.zeros((3, 5), np.float32), ["a", "b", "c"], "test")
    assert score_doc(score_on(module, spec, wide), wide.labels)["note"].startswith("input width")
