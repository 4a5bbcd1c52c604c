"""Counterexample generation: labels, radius, counts, strategies and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flywheel.feedback.counterexamples import (
    DEFAULT_K,
    Counterexample,
    CounterexampleConfig,
    generate,
)
from flywheel.feedback.reference import ReferenceStats
from flywheel.store.models import ERROR_TYPES


@pytest.fixture(scope="module")
def seed(seed_model):
    s = seed_model
    return s.spec, s.module, s.x_tr, s.y_tr, s.x_ho, s.y_ho


@pytest.fixture(scope="module")
def ref(seed) -> ReferenceStats:
    return ReferenceStats.from_examples(seed[2])


def standardized_distance(ref: ReferenceStats, a, b) -> float:
    return float(np.linalg.norm((np.asarray(a, np.float64) - np.asarray(b, np.float64)) / ref.std))


def loss(module: torch.nn.Module, x, target: int) -> float:
    with torch.no_grad():
        logits = module(torch.tensor(np.asarray(x), dtype=torch.float32)[None])
        return F.cross_entropy(logits, torch.tensor([target])).item()


def make(
    seed,
    ref,
    index: int = 0,
    error_type: str = "confident",
    *,
    model=True,
    pool=True,
    rng_seed: int = 0,
    config: CounterexampleConfig | None = None,
) -> list[Counterexample]:
    spec, module, x_tr, y_tr, x_ho, y_ho = seed
    y = int(y_ho[index])
    return generate(
        x_ho[index],
        spec.labels[y],
        error_type,
        labels=spec.labels,
        reference=ref,
        true_class_examples=x_tr[y_tr == y] if pool else np.empty((0, ref.input_dim)),
        model=module if model else None,
        seed=rng_seed,
        config=config,
    )


@pytest.mark.parametrize("error_type", ERROR_TYPES)
def test_count_label_and_radius_per_error_type(seed, ref, error_type):
    spec, _, _, _, x_ho, y_ho = seed
    for index in range(10):
        out = make(seed, ref, index, error_type)
        assert len(out) == DEFAULT_K[error_type]
        for ce in out:
            assert ce.label == spec.labels[y_ho[index]]
            assert ce.weight == 0.5
            assert 0 < ce.distance <= 1.0
            assert ce.distance == pytest.approx(
                standardized_distance(ref, ce.features, x_ho[index])
            )
            assert len(ce.features) == ref.input_dim
            assert all(np.isfinite(ce.features))
            assert np.array_equal(np.float32(ce.features), ce.features)  # float32-exact


def test_suspect_gets_no_counterexamples(seed, ref):
    assert DEFAULT_K["suspect"] == 0
    assert make(seed, ref, error_type="suspect") == []


def test_strategies_take_turns_and_skip_what_is_missing(seed, ref):
    strategies = [ce.strategy for ce in make(seed, ref)]
    assert strategies == ["gradient_sign", "interpolate", "jitter"] * 2
    strategies = [ce.strategy for ce in make(seed, ref, model=False)]
    assert strategies == ["interpolate", "jitter"] * 3
    strategies = [ce.strategy for ce in make(seed, ref, model=False, pool=False)]
    assert strategies == ["jitter"] * 6
    strategies = [ce.strategy for ce in make(seed, ref, pool=False, error_type="boundary")]
    assert strategies == ["gradient_sign", "jitter"] * 2


def test_gradient_sign_makes_the_served_model_more_wrong(seed, ref):
    spec, module, _, _, x_ho, y_ho = seed
    checked = 0
    for index in range(len(x_ho)):
        y = int(y_ho[index])
        before = loss(module, x_ho[index], y)
        if before < 1e-4:  # saturated softmax: float32 loss is 0 either side of the step
            continue
        hard = [ce for ce in make(seed, ref, index) if ce.strategy == "gradient_sign"]
        assert loss(module, hard[0].features, y) > before
        # The first variant is the pure step: step x std per feature, in the gradient's sign.
        steps = (np.asarray(hard[0].features) - x_ho[index]) / ref.std
        np.testing.assert_allclose(np.abs(steps), 0.25, rtol=1e-3)
        checked += 1
    assert checked >= 20


def test_gradient_leaves_the_model_as_it_was(seed, ref):
    module = seed[1]
    before = {name: p.detach().clone() for name, p in module.state_dict().items()}
    flags = [p.requires_grad for p in module.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in module.parameters()]
    module.train()
    try:
        make(seed, ref)
        assert module.training  # mode restored
    finally:
        module.eval()
    assert [p.requires_grad for p in module.parameters()] == flags
    # .grad is untouched (train_seed_model leaves its last batch's gradients behind).
    for p, g in zip(module.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    after = module.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_works_inside_inference_mode(seed, ref):
    with torch.inference_mode():
        out = make(seed, ref)
    assert [ce.strategy for ce in out][0] == "gradient_sign"


def test_interpolation_moves_toward_the_true_class_example(seed, ref):
    spec, module, _, _, x_ho, y_ho = seed
    x = x_ho[0].astype(np.float64)
    # Close enough (0.8 std units) that even alpha = 0.35 stays inside max_distance.
    direction = np.array([1.0, -1.0, 0.5, 0, 0, 0, 0.5, -0.5])
    direction /= np.linalg.norm(direction)
    other = x + 0.8 * direction * ref.std
    out = generate(
        x,
        spec.labels[y_ho[0]],
        "novel",
        labels=spec.labels,
        reference=ref,
        true_class_examples=other[None, :],
        model=None,
        seed=5,
    )
    moved = [ce for ce in out if ce.strategy == "interpolate"]
    assert len(moved) == 3
    for ce in moved:
        step = np.asarray(ce.features) - x
        alpha = np.dot(step, other - x) / np.dot(other - x, other - x)
        assert 0.1 - 1e-5 <= alpha <= 0.35 + 1e-5
        np.testing.assert_allclose(step, alpha * (other - x), atol=1e-6)
        assert standardized_distance(ref, ce.features, other) < standardized_distance(ref, x, other)


def test_far_targets_and_big_steps_are_pulled_back_onto_the_radius(seed, ref):
    spec, module, _, _, x_ho, y_ho = seed
    x = x_ho[1].astype(np.float64)
    far = x + 10 * ref.std
    config = CounterexampleConfig(
        jitter_scale=5.0, fgsm_step=3.0, max_distance=0.5, interpolation=(0.5, 0.9)
    )
    out = generate(
        x,
        spec.labels[y_ho[1]],
        "confident",
        labels=spec.labels,
        reference=ref,
        true_class_examples=far[None, :],
        model=module,
        seed=1,
        config=config,
    )
    assert len(out) == 6
    for ce in out:
        assert ce.distance <= 0.5
        assert ce.distance == pytest.approx(0.5, rel=1e-3)
    interpolated = [ce for ce in out if ce.strategy == "interpolate"][0]
    step = (np.asarray(interpolated.features) - x) / ref.std
    np.testing.assert_allclose(step / np.linalg.norm(step), np.ones(8) / np.sqrt(8), atol=1e-4)


def test_same_seed_same_variants(seed, ref):
    assert make(seed, ref, rng_seed=3) == make(seed, ref, rng_seed=3)
    assert make(seed, ref, rng_seed=3) != make(seed, ref, rng_seed=4)


def test_k_is_configurable(seed, ref):
    config = CounterexampleConfig(k={**DEFAULT_K, "boundary": 9, "novel": 0})
    assert len(make(seed, ref, error_type="boundary", config=config)) == 9
    assert make(seed, ref, error_type="novel", config=config) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"error_type": "weird"}, "unknown error type"),
        ({"true_label": "class_9"}, "not a known label"),
        ({"x": np.zeros(3)}, "3 features"),
        ({"x": np.full(8, np.nan)}, "finite"),
        ({"true_class_examples": np.zeros((2, 3))}, "3 features"),
        ({"true_class_examples": np.zeros(8)}, "2-D"),
        ({"labels": ["class_0", "class_1"], "true_label": "class_0"}, "logits of shape"),
    ],
)
def test_generate_refuses_bad_input(seed, ref, kwargs, match):
    spec, module, x_tr, _, x_ho, _ = seed
    args = {
        "x": x_ho[0],
        "true_label": spec.labels[0],
        "error_type": "confident",
        "labels": spec.labels,
        "reference": ref,
        "true_class_examples": x_tr[:5],
        "model": module,
        "seed": 0,
    } | kwargs
    with pytest.raises(ValueError, match=match):
        generate(**args)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": {"confident": 1}},
        {"k": {**DEFAULT_K, "other": 1}},
        {"k": {**DEFAULT_K, "novel": -1}},
        {"interpolation": (0.5, 0.2)},
        {"interpolation": (0.1, 1.5)},
        {"weight": 0.0},
        {"max_distance": float("inf")},
        {"jitter_scale": -1.0},
        {"fgsm_step": 0.0},
    ],
)
def test_config_is_validated(kwargs):
    with pytest.raises(ValueError):
        CounterexampleConfig(**kwargs)
