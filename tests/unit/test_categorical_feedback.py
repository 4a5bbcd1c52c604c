"""Categorical and boolean inputs in the feedback worker's arithmetic.

A categorical input is a code (`vocabulary[i]` is code i + 1, 0 the unknown bucket): the
analyzer's distances count a differing code as 1 instead of the codes' difference, and
counterexamples never produce a code between two categories or a boolean between 0 and 1.
The batch paths (`analyze_many`, `near_many`, `generate_many`) must still decide exactly
what the one-row paths decide.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flywheel.features import Feature, FeatureSchema
from flywheel.feedback.analyzer import AnalyzerConfig, analyze, analyze_many
from flywheel.feedback.counterexamples import (
    CounterexampleConfig,
    Request,
    generate,
    generate_many,
)
from flywheel.feedback.reference import ReferenceStats
from flywheel.feedback.reference_data import LabelledPool
from flywheel.modelspec import ModelSpec, build_model, fit_input_scaling
from flywheel.store import positions

LABELS = ["low", "high"]
SCHEMA = FeatureSchema(
    label="risk",
    labels=LABELS,
    features=[
        Feature(name="amount", kind="numeric", mean=0.0, std=1.0),
        Feature(name="country", kind="categorical", vocabulary=["DE", "FR", "JP", "US"]),
        Feature(name="mobile", kind="boolean", fill=False),
        Feature(name="age", kind="numeric", mean=40.0, std=10.0),
    ],
)
CATS, BOOLS = positions(SCHEMA, "categorical"), positions(SCHEMA, "boolean")  # [1], [2]


def rows(n: int, seed: int, countries: tuple[int, ...] = (1, 2, 3)) -> tuple[np.ndarray, list]:
    """Raw vectors of SCHEMA and their labels: high for FR, or a large amount on mobile."""
    rng = np.random.default_rng(seed)
    x = np.column_stack(
        [
            rng.normal(0, 1, n),
            rng.choice(countries, n),
            rng.integers(0, 2, n),
            rng.normal(40, 10, n),
        ]
    ).astype(np.float32)
    high = (x[:, 1] == 2) | ((x[:, 0] > 0.5) & (x[:, 2] == 1))
    return x, [LABELS[int(h)] for h in high]


@pytest.fixture(scope="module")
def reference() -> ReferenceStats:
    x, _ = rows(600, 0)
    return ReferenceStats.from_examples(x.astype(np.float64), categorical=CATS, boolean=BOOLS)


# --- reference statistics --------------------------------------------------------------------


def test_a_differing_code_counts_one_whatever_the_codes(reference):
    a = np.array([0.0, 1.0, 1.0, 40.0])
    for code in (2.0, 3.0):  # FR and JP: the same distance from DE
        b = a.copy()
        b[1] = code
        assert reference.pair_distance(b[None, :], a)[0] == pytest.approx(1.0)
    # the numeric part is in units of std, as before
    b = a.copy()
    b[3] += reference.std[3]
    assert reference.pair_distance(b[None, :], a)[0] == pytest.approx(1.0)


def test_a_code_the_reference_never_had_is_novel(reference):
    assert reference.seen_codes == ((1, 2, 3),)
    typical = np.array([0.0, 2.0, 0.0, 40.0])
    unseen = typical.copy()
    unseen[1] = 4.0  # US: in the vocabulary, never in the trusted rows
    unknown = typical.copy()
    unknown[1] = 0.0  # the unknown bucket
    d = reference.distance(np.stack([typical, unseen, unknown]))
    # the model learned nothing for a category it never saw: novel on its own
    assert d[1] == pytest.approx(np.hypot(d[0], 2 * reference.distance_threshold))
    assert d[2] == pytest.approx(d[1])
    assert reference.is_novel(np.stack([typical, unseen, unknown])).tolist() == [
        False,
        True,
        True,
    ]
    # a code far from the others in number is no farther: codes have no order
    assert reference.distance(typical) == pytest.approx(
        reference.distance(np.array([0.0, 1.0, 0.0, 40.0]))
    )


def test_reference_round_trips_and_old_documents_load_as_all_numeric(reference):
    assert ReferenceStats.from_dict(reference.to_dict()) == reference
    old = reference.to_dict()
    for key in ("categorical", "boolean", "seen_codes"):
        del old[key]
    loaded = ReferenceStats.from_dict(old)
    assert loaded.categorical == () and loaded.boolean == () and loaded.continuous.all()
    numeric = ReferenceStats.from_examples(rows(50, 1)[0].astype(np.float64))
    assert set(numeric.to_dict()) == {
        "version",
        "mean",
        "std",
        "count",
        "distance_threshold",
        "quantile",
        "margin",
    }


@pytest.mark.parametrize(
    "kwargs,why",
    [
        ({"categorical": [9]}, "beyond the 4 features"),
        ({"categorical": [1], "boolean": [1]}, "listed twice"),
        ({"categorical": [1, 1]}, "repeat"),
        ({"categorical": [-1]}, "non-negative ints"),
    ],
)
def test_bad_positions_are_refused(kwargs, why):
    x = rows(50, 2)[0].astype(np.float64)
    with pytest.raises(ValueError, match=why):
        ReferenceStats.from_examples(x, **kwargs)


def test_a_categorical_column_must_hold_codes():
    x = rows(50, 2)[0].astype(np.float64)
    x[3, 1] = 1.5
    with pytest.raises(ValueError, match="integer codes"):
        ReferenceStats.from_examples(x, categorical=[1])


# --- neighbours and the analyzer ---------------------------------------------------------------


def test_near_many_and_analyze_many_decide_as_the_one_row_paths(reference):
    x, labels = rows(400, 3)
    pool = LabelledPool(reference)
    pool.add(x.tolist(), labels)
    queries, truth = rows(60, 4, countries=(1, 2, 3, 4, 0))
    points, got = pool.near_many(queries.astype(np.float64), 5)
    for i, q in enumerate(queries.astype(np.float64)):
        one_points, one_labels = pool.near(q, 5)
        assert np.array_equal(points[i], one_points) and list(got[i]) == one_labels
    # confident, wrong predictions: the analyzer needs neighbours for every one of them
    probabilities = [{"low": 0.97, "high": 0.03}] * len(queries)
    predicted = ["low"] * len(queries)
    config = AnalyzerConfig()
    batch = analyze_many(queries.tolist(), probabilities, predicted, truth, pool, config)
    for i, q in enumerate(queries.tolist()):
        verdict = analyze(
            q, probabilities[i], predicted[i], truth[i], reference, pool.near(np.array(q), 8)
        )
        assert batch[i] == (verdict.error_type, verdict.trainable)
    assert {e for e, _ in batch} >= {None, "novel"}


# --- counterexamples ---------------------------------------------------------------------------


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    spec = ModelSpec(input_dim=4, hidden=[16], labels=LABELS, schema=SCHEMA, embedding_dim=3)
    module = build_model(spec)
    fit_input_scaling(module, torch.from_numpy(rows(200, 5)[0]))
    return module.eval()


def test_variants_keep_categories_and_booleans_valid(reference):
    x, labels = rows(300, 6)
    targets = x[[lab == "high" for lab in labels]].astype(np.float64)
    model = _model()
    config = CounterexampleConfig(interpolation=(0.1, 0.9), max_distance=3.0)
    requests = [
        Request(row, "high", "confident", LABELS, targets, model, seed=i)
        for i, row in enumerate(rows(40, 7)[0].astype(np.float64))
    ]
    out = generate_many(requests, reference=reference, config=config)
    seen_strategies, took_target = set(), 0
    for request, variants in zip(requests, out, strict=True):
        assert len(variants) == 6
        for v in variants:
            f = np.asarray(v.features)
            seen_strategies.add(v.strategy)
            assert f[1] in (1.0, 2.0, 3.0) and f[2] in (0.0, 1.0), v
            assert v.distance <= config.max_distance + 1e-9
            assert v.distance == pytest.approx(
                reference.pair_distance(f[None, :], np.asarray(request.x))[0], rel=1e-6
            )
            if v.strategy in ("jitter", "gradient_sign"):  # never moved
                assert f[1] == request.x[1] and f[2] == request.x[2]
            else:
                took_target += f[1] != request.x[1] or f[2] != request.x[2]
        # the batch is the one-request path, row for row
        alone = generate(
            request.x,
            "high",
            "confident",
            labels=LABELS,
            reference=reference,
            true_class_examples=targets,
            model=model,
            seed=request.seed,
            config=config,
        )
        assert alone == variants
    assert seen_strategies == {"jitter", "gradient_sign", "interpolate"}
    assert took_target > 0, "past the half-way point, interpolation takes the target's values"


def test_default_interpolation_keeps_the_inputs_category(reference):
    """0.1-0.35 of the way: nearer the input, so its category and boolean stay."""
    x, labels = rows(300, 8)
    targets = x[[lab == "high" for lab in labels]].astype(np.float64)
    for i, row in enumerate(rows(20, 9)[0].astype(np.float64)):
        variants = generate(
            row,
            "high",
            "boundary",
            labels=LABELS,
            reference=reference,
            true_class_examples=targets,
            model=None,
            seed=i,
        )
        for v in variants:
            assert v.features[1] == row[1] and v.features[2] == row[2]
