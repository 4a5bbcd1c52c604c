"""Reference statistics, the error-type rules and the holdout split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flywheel.feedback.analyzer import AnalyzerConfig, Verdict, analyze, assign_split
from flywheel.feedback.reference import ReferenceStats
from flywheel.store.models import ERROR_TYPES

LABELS = ("a", "b", "c")
DIM = 4


@pytest.fixture(scope="module")
def ref() -> ReferenceStats:
    """Standard-normal reference: mean ~0, std ~1, so standardized ~ raw units."""
    return ReferenceStats.from_examples(np.random.default_rng(0).normal(size=(4000, DIM)))


@pytest.fixture(scope="module")
def seed(seed_model):
    s = seed_model
    return s.spec, s.module, s.x_tr, s.y_tr, s.x_ho, s.y_ho


def probs(a: float, b: float, c: float) -> dict[str, float]:
    return dict(zip(LABELS, (a, b, c), strict=True))


def around(ref: ReferenceStats, x: np.ndarray, labels: list[str], dist: float = 0.5):
    """Neighbours at exactly `dist` standardized units from x, one per label."""
    directions = np.random.default_rng(len(labels)).normal(size=(len(labels), DIM))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return x + dist * directions * ref.std, labels


ORIGIN = np.zeros(DIM)
CONFIDENT_A = probs(0.9, 0.06, 0.04)


# --- reference ---------------------------------------------------------------------------


def test_threshold_is_margin_times_quantile_of_reference_distances():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(500, DIM))
    ref = ReferenceStats.from_examples(x, quantile=0.99, margin=1.2)
    dist = np.linalg.norm((x - x.mean(0)) / x.std(0, ddof=1), axis=1)
    assert ref.distance_threshold == pytest.approx(np.quantile(dist, 0.99) * 1.2)
    assert ref.count == 500 and ref.input_dim == DIM
    np.testing.assert_allclose(ref.distance(x), dist)
    assert ref.distance(x[3]) == pytest.approx(dist[3])
    assert isinstance(ref.distance(x[3]), float)


def test_seed_data_is_mostly_not_novel_and_a_far_point_is(seed):
    _, _, x_tr, _, x_ho, _ = seed
    ref = ReferenceStats.from_examples(x_tr)
    assert ref.is_novel(x_tr).mean() < 0.01
    assert ref.is_novel(x_ho).mean() < 0.01
    assert ref.is_novel(ref.mean) is False
    far = ref.mean + 20 * ref.std
    assert ref.is_novel(far) is True
    assert ref.distance(far) == pytest.approx(20 * np.sqrt(ref.input_dim))


def test_round_trip_through_json(ref):
    data = json.loads(json.dumps(ref.to_dict()))
    back = ReferenceStats.from_dict(data)
    assert back == ref
    probe = np.random.default_rng(2).normal(size=(10, DIM)) * 3
    np.testing.assert_array_equal(back.distance(probe), ref.distance(probe))


def test_arrays_are_read_only_copies():
    x = np.random.default_rng(3).normal(size=(100, DIM))
    ref = ReferenceStats.from_examples(x)
    with pytest.raises(ValueError):
        ref.mean[0] = 5.0
    x[:] = 0  # mutating the input afterwards must not matter
    assert ref.std.min() > 0.5


def test_constant_feature_gets_a_floor_not_a_division_by_zero():
    x = np.random.default_rng(4).normal(size=(100, DIM))
    x[:, 2] = 7.0
    ref = ReferenceStats.from_examples(x)
    assert np.isfinite(ref.std).all() and ref.std[2] > 0
    assert not ref.is_novel(x.mean(0))
    moved = x.mean(0)
    moved[2] += 0.01  # a feature that never varied now does: novel
    assert ref.is_novel(moved)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (np.ones((7, DIM)), "at least 8 examples"),
        (np.ones(DIM * 4), "2-D"),
        (np.full((20, DIM), np.nan), "finite"),
        (np.where(np.eye(20, DIM) > 0, np.inf, 0.0), "finite"),
    ],
)
def test_from_examples_refuses(rows, match):
    with pytest.raises(ValueError, match=match):
        ReferenceStats.from_examples(rows)


def test_bad_queries_and_documents_are_refused(ref):
    with pytest.raises(ValueError, match="3 features, the reference has 4"):
        ref.distance(np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        ref.is_novel(np.array([0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match="version"):
        ReferenceStats.from_dict({**ref.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="std"):
        ReferenceStats.from_dict({k: v for k, v in ref.to_dict().items() if k != "std"})
    with pytest.raises(ValueError, match="std must be positive"):
        ReferenceStats.from_dict({**ref.to_dict(), "std": [1.0, 0.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match="quantile"):
        ReferenceStats.from_examples(np.zeros((20, DIM)), quantile=1.5)


# --- analyze: the rules ------------------------------------------------------------------


def test_correct_prediction():
    ref = ReferenceStats.from_examples(np.random.default_rng(0).normal(size=(400, DIM)))
    v = analyze(ORIGIN, CONFIDENT_A, "a", "a", ref, around(ref, ORIGIN, ["b"] * 7))
    assert v == Verdict(
        correct=True,
        error_type=None,
        trainable=True,
        confidence=0.9,
        margin=pytest.approx(0.84),
        distance=v.distance,
        neighbour_agreement=0.0,
        reason=v.reason,
    )
    assert v.reason.startswith("correct")


def test_novel_far_from_the_reference(ref):
    far = ref.mean + 20 * ref.std
    v = analyze(far, probs(0.5, 0.45, 0.05), "a", "b", ref, None)
    assert (v.correct, v.error_type, v.trainable) == (False, "novel", True)
    assert v.distance > ref.distance_threshold
    assert "novel" in v.reason and f"{v.distance:.2f}" in v.reason


def test_novel_is_decided_before_suspect(ref):
    """Far from the data, a confident model and agreeing neighbours still mean novel."""
    far = ref.mean + 20 * ref.std
    neighbours = around(ref, far, ["a"] * 7, dist=0.1)
    v = analyze(far, CONFIDENT_A, "a", "b", ref, neighbours)
    assert v.error_type == "novel" and v.trainable
    assert v.neighbour_agreement == 1.0
    # The same case just inside the novelty cut-off is suspect.
    inside = ref.mean + (0.99 * ref.distance_threshold / np.sqrt(DIM)) * ref.std
    near_v = analyze(inside, CONFIDENT_A, "a", "b", ref, around(ref, inside, ["a"] * 7, 0.1))
    assert near_v.error_type == "suspect"


def test_just_beyond_the_novelty_cut_off(ref):
    unit = np.ones(DIM) / np.sqrt(DIM)
    over = ref.mean + 1.01 * ref.distance_threshold * unit * ref.std
    under = ref.mean + 0.99 * ref.distance_threshold * unit * ref.std
    assert analyze(over, CONFIDENT_A, "a", "b", ref).error_type == "novel"
    assert analyze(under, CONFIDENT_A, "a", "b", ref).error_type == "confident"


def test_suspect_when_confident_model_and_neighbours_contradict_the_correction(ref):
    v = analyze(ORIGIN, CONFIDENT_A, "a", "b", ref, around(ref, ORIGIN, ["a"] * 5 + ["b"] * 2))
    assert (v.correct, v.error_type, v.trainable) == (False, "suspect", False)
    assert v.neighbour_agreement == pytest.approx(5 / 7)  # just over 0.7
    assert "71% of 7" in v.reason
    # 4 of 7 (57 %) is under the agreement threshold: an ordinary confident error.
    v = analyze(ORIGIN, CONFIDENT_A, "a", "b", ref, around(ref, ORIGIN, ["a"] * 4 + ["b"] * 3))
    assert (v.error_type, v.trainable) == ("confident", True)


def test_suspect_agreement_threshold_is_inclusive(ref):
    config = AnalyzerConfig(neighbours=10)
    seven = around(ref, ORIGIN, ["a"] * 7 + ["c"] * 3)
    six = around(ref, ORIGIN, ["a"] * 6 + ["c"] * 4)
    assert analyze(ORIGIN, CONFIDENT_A, "a", "b", ref, seven, config).error_type == "suspect"
    assert analyze(ORIGIN, CONFIDENT_A, "a", "b", ref, six, config).error_type == "confident"


def test_suspect_needs_a_confident_model(ref):
    neighbours = around(ref, ORIGIN, ["a"] * 7)
    at = analyze(ORIGIN, probs(0.8, 0.1, 0.1), "a", "b", ref, neighbours)
    under = analyze(ORIGIN, probs(0.79, 0.11, 0.1), "a", "b", ref, neighbours)
    assert at.error_type == "suspect"
    assert under.error_type == "confident"  # margin 0.68: not a boundary case either


def test_suspect_needs_k_close_neighbours(ref):
    six = around(ref, ORIGIN, ["a"] * 6)
    seventh_inside = (ORIGIN + np.r_[1.49, 0, 0, 0] * ref.std)[None, :]
    seventh_outside = (ORIGIN + np.r_[1.51, 0, 0, 0] * ref.std)[None, :]
    inside = (np.vstack([six[0], seventh_inside]), six[1] + ["a"])
    outside = (np.vstack([six[0], seventh_outside]), six[1] + ["a"])
    assert analyze(ORIGIN, CONFIDENT_A, "a", "b", ref, inside).error_type == "suspect"
    v = analyze(ORIGIN, CONFIDENT_A, "a", "b", ref, outside)
    assert v.error_type == "confident" and v.neighbour_agreement == 1.0  # of 6, too few
    assert analyze(ORIGIN, CONFIDENT_A, "a", "b", ref, six).error_type == "confident"
    assert analyze(ORIGIN, CONFIDENT_A, "a", "b", ref, None).error_type == "confident"


def test_only_the_k_nearest_neighbours_vote(ref):
    nearest = around(ref, ORIGIN, ["b"] * 7, dist=0.2)
    farther = around(ref, ORIGIN, ["a"] * 30, dist=1.0)
    neighbours = (np.vstack([farther[0], nearest[0]]), farther[1] + nearest[1])
    v = analyze(ORIGIN, CONFIDENT_A, "a", "b", ref, neighbours)
    assert v.error_type == "confident" and v.neighbour_agreement == 0.0


def test_boundary_just_under_the_margin(ref):
    v = analyze(ORIGIN, probs(0.5, 0.31, 0.19), "a", "b", ref)
    assert (v.error_type, v.trainable) == ("boundary", True)
    assert v.margin == pytest.approx(0.19) and v.confidence == 0.5
    assert "boundary" in v.reason and "margin 0.190" in v.reason
    v = analyze(ORIGIN, probs(0.52, 0.31, 0.17), "a", "b", ref)
    assert (v.error_type, v.trainable) == ("confident", True)
    assert v.margin == pytest.approx(0.21)


def test_suspect_is_decided_before_boundary(ref):
    config = AnalyzerConfig(confident_threshold=0.5)
    neighbours = around(ref, ORIGIN, ["a"] * 7)
    close_call = probs(0.55, 0.4, 0.05)  # margin 0.15 < 0.2, confidence 0.55 >= 0.5
    assert analyze(ORIGIN, close_call, "a", "b", ref, neighbours, config).error_type == "suspect"
    assert analyze(ORIGIN, close_call, "a", "b", ref, neighbours).error_type == "boundary"


def test_seed_model_end_to_end(seed):
    """Real probabilities and neighbours: right answers are correct, relabelled ones suspect."""
    spec, module, x_tr, y_tr, x_ho, y_ho = seed
    ref = ReferenceStats.from_examples(x_tr)
    labels = spec.labels
    with torch.no_grad():
        p_ho = torch.softmax(module(torch.from_numpy(x_ho)), dim=1).numpy()
        p_tr = torch.softmax(module(torch.from_numpy(x_tr)), dim=1).numpy()
    train_labels = [labels[i] for i in y_tr]
    for x, p, y in zip(x_ho, p_ho, y_ho, strict=True):
        predicted = labels[int(p.argmax())]
        v = analyze(
            x,
            dict(zip(labels, p.tolist(), strict=True)),
            predicted,
            labels[y],
            ref,
            (x_tr, train_labels),
        )
        assert v.correct == (predicted == labels[y])
        assert (v.error_type is None) == v.correct
        assert v.error_type in (None, *ERROR_TYPES)
    # A confidently, correctly predicted training point "corrected" to another label, with
    # the rest of the training set as neighbours: the neighbourhood contradicts the label.
    confident = [
        i for i in range(len(x_tr)) if p_tr[i].max() > 0.95 and p_tr[i].argmax() == y_tr[i]
    ]
    suspects = 0
    for i in confident[:50]:
        others = np.arange(len(x_tr)) != i
        v = analyze(
            x_tr[i],
            dict(zip(labels, p_tr[i].tolist(), strict=True)),
            labels[y_tr[i]],
            labels[(y_tr[i] + 1) % 3],
            ref,
            (x_tr[others], [train_labels[j] for j in np.flatnonzero(others)]),
        )
        suspects += v.error_type == "suspect"
        assert v.error_type in ("suspect", "confident")
    assert suspects >= 25


# --- analyze: validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"predicted": "z"}, "predicted label 'z' is not a known label"),
        ({"true_label": "z"}, "true label 'z' is not a known label"),
        ({"probabilities": probs(0.5, 0.3, 0.1)}, "sum to 1"),
        ({"probabilities": probs(1.2, -0.1, -0.1)}, r"\[0, 1\]"),
        ({"probabilities": probs(float("nan"), 0.5, 0.5)}, r"\[0, 1\]"),
        ({"probabilities": {"a": 1.0}}, "at least 2 labels"),
        ({"predicted": "b"}, "not the most probable"),
        ({"features": [0.0, np.inf, 0.0, 0.0]}, "finite"),
        ({"features": [0.0, 0.0, 0.0]}, "3 features"),
        ({"features": np.zeros((2, DIM))}, "1-D"),
        ({"neighbours": (np.zeros((2, DIM)), ["a"])}, "one label per row"),
        ({"neighbours": (np.zeros((1, DIM)), ["z"])}, "neighbour label 'z'"),
        ({"neighbours": (np.full((1, DIM), np.nan), ["a"])}, "finite"),
    ],
)
def test_analyze_refuses_bad_input(ref, kwargs, match):
    args = {
        "features": ORIGIN,
        "probabilities": CONFIDENT_A,
        "predicted": "a",
        "true_label": "b",
        "reference": ref,
        "neighbours": None,
    } | kwargs
    with pytest.raises(ValueError, match=match):
        analyze(**args)


def test_empty_neighbours_are_no_evidence(ref):
    v = analyze(ORIGIN, CONFIDENT_A, "a", "b", ref, (np.empty((0, DIM)), []))
    assert v.error_type == "confident" and v.neighbour_agreement is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"confident_threshold": 1.5},
        {"boundary_margin": -0.1},
        {"neighbours": 0},
        {"neighbours": 2.5},
        {"suspect_agreement": 2},
        {"suspect_max_distance": 0},
    ],
)
def test_config_is_validated(kwargs):
    with pytest.raises(ValueError):
        AnalyzerConfig(**kwargs)


# --- assign_split ------------------------------------------------------------------------


def test_holdout_fraction_is_respected():
    ids = [f"pred-{i:06d}" for i in range(20_000)]
    splits = [assign_split(i, 0.2) for i in ids]
    assert set(splits) == {"train", "holdout"}
    assert abs(splits.count("holdout") / len(ids) - 0.2) < 0.02
    assert [assign_split(i, 0.2) for i in ids] == splits  # stable on retry
    # Raising the fraction only moves train ids into holdout, never back.
    assert all(
        assign_split(i, 0.3) == "holdout"
        for i, s in zip(ids, splits, strict=True)
        if s == "holdout"
    )
    assert {assign_split(i, 0.0) for i in ids[:500]} == {"train"}
    assert {assign_split(i, 1.0) for i in ids[:500]} == {"holdout"}


def test_split_is_stable_across_processes():
    ids = [f"p{i}" for i in range(200)]
    code = (
        "import json, sys; from flywheel.feedback.analyzer import assign_split; "
        "print(json.dumps([assign_split(i, 0.25) for i in json.loads(sys.argv[1])]))"
    )
    env = os.environ | {"PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(ids)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent,
    )
    assert json.loads(out.stdout) == [assign_split(i, 0.25) for i in ids]


@pytest.mark.parametrize(
    ("pid", "fraction"), [("", 0.2), ("p1", -0.1), ("p1", 1.1), ("p1", float("nan"))]
)
def test_split_refuses_bad_arguments(pid, fraction):
    with pytest.raises(ValueError):
        assign_split(pid, fraction)
