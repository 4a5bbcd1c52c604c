"""The batch paths of the feedback worker decide exactly what the one-at-a-time ones do.

`analyze_many`, `LabelledPool.near_many` and `generate_many` exist for speed only: every
test here compares them with `analyze`, `near` and `generate` on the same inputs.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
import torch

from flywheel.feedback.analyzer import AnalyzerConfig, analyze, analyze_many
from flywheel.feedback.counterexamples import (
    GRADIENT_JITTER_SHARE,
    STRATEGIES,
    Counterexample,
    CounterexampleConfig,
    Request,
    _uniforms,
    _within_radius,
    generate,
    generate_many,
    gradient_sign_point,
)
from flywheel.feedback.examples import ExampleBuilder
from flywheel.feedback.join import JoinedPair
from flywheel.feedback.reference import ReferenceStats
from flywheel.feedback.reference_data import LabelledPool
from flywheel.streams import Concept


class FixedBudget(ExampleBuilder):
    """A builder whose sources each have `left` counterexamples to spend: no store here
    (`finish` gets no session), so the budget is not read from one."""

    def __init__(self, left: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.left = left

    def budget_left(
        self, session: Any, sources: set[str | None], now: datetime
    ) -> dict[str | None, int]:
        return {s: self.left for s in sources}


@pytest.fixture(scope="module")
def seed(seed_model):
    s = seed_model
    ref = ReferenceStats.from_examples(s.x_tr.astype(np.float64))
    pool = LabelledPool(ref)
    pool.add(s.x_tr.astype(np.float64).tolist(), [s.spec.labels[i] for i in s.y_tr])
    return s.settings, s.spec, s.module, ref, pool


@pytest.fixture(scope="module")
def traffic(seed):
    """Predictions of the seed model on its own concept and a drifted one, with truths."""
    settings, spec, module, _, _ = seed
    x_a, y_a = Concept(settings.seed).sample(300, 21)
    x_b, y_b = Concept(settings.seed + 1).sample(300, 22)
    x = np.concatenate([x_a, x_b, x_a[:20] * 4 + 3])  # and a few far from everything
    truth = y_a + y_b + y_a[:20]
    with torch.inference_mode():
        probs = torch.softmax(module(torch.from_numpy(x)), 1).numpy().tolist()
    rows = []
    for features, p, t in zip(x.tolist(), probs, truth, strict=True):
        pd = dict(zip(spec.labels, p, strict=True))
        rows.append((features, pd, max(pd, key=pd.get), t))
    return rows


def one_at_a_time(rows, pool, config):
    out = []
    for features, probs, predicted, truth in rows:
        near = pool.near(np.asarray(features, dtype=np.float64), config.neighbours)
        v = analyze(features, probs, predicted, truth, pool.reference, near, config)
        out.append((v.error_type, v.trainable))
    return out


def batch(rows, pool, config):
    return analyze_many(*map(list, zip(*rows, strict=True)), pool, config)


@pytest.mark.parametrize(
    "config",
    [
        AnalyzerConfig(),
        AnalyzerConfig(confident_threshold=0.5, neighbours=3),
        AnalyzerConfig(suspect_max_distance=0.3),
    ],
)
def test_analyze_many_agrees_with_analyze(seed, traffic, config):
    pool = seed[4]
    expected = one_at_a_time(traffic, pool, config)
    assert batch(traffic, pool, config) == expected
    kinds = {e for e, _ in expected}
    assert {None, "confident", "novel"} <= kinds  # the data exercise several rules


def test_analyze_many_with_mixed_label_orders_and_value_types(seed, traffic):
    """Rows whose probabilities list the labels in another order, hold ints, name a
    predicted label that only ties the top one, or sum to 1 only within the tolerance:
    each decided as `analyze` decides it."""
    pool = seed[4]
    config = AnalyzerConfig(confident_threshold=0.5)
    rows = []
    for i, (features, probs, predicted, truth) in enumerate(traffic):
        labels = list(probs)
        if i % 3 == 0:  # the same labels, listed the other way round
            probs = dict(reversed(probs.items()))
        if i % 7 == 0:  # a one-hot prediction with int probabilities
            probs = {label: int(label == predicted) for label in labels}
        if i % 11 == 0:  # the predicted label is within the argmax tolerance of the top
            a, b, *rest = labels
            probs = {a: 0.5, b: 0.4999995, **{r: 0.0000005 / len(rest) for r in rest}}
            predicted = b
        if i % 13 == 0 and max(probs.values()) < 0.99:  # off by half the sum tolerance
            probs = {k: v * (1 + 5e-4) for k, v in probs.items()}
        if i % 97 == 0:  # a third order, on a few rows only: checked row by row
            items = list(probs.items())
            probs = dict(items[1:] + items[:1])
        rows.append((features, probs, predicted, truth))
    expected = one_at_a_time(rows, pool, config)
    assert batch(rows, pool, config) == expected
    assert {None, "confident", "boundary"} <= {e for e, _ in expected}


def test_analyze_many_with_small_and_empty_pools(seed, traffic):
    _, _, _, ref, pool = seed
    config = AnalyzerConfig(confident_threshold=0.5)
    tiny = LabelledPool(ref)
    tiny.add(pool.points[:5].tolist(), ["class_1"] * 5)
    for p in (tiny, LabelledPool(ref)):
        assert batch(traffic, p, config) == one_at_a_time(traffic, p, config)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: (r[0], {k: v / 2 for k, v in r[1].items()}, r[2], r[3]), "sum to 1"),
        (lambda r: (r[0], r[1], r[2], "class_9"), "true label 'class_9'"),
        (lambda r: (r[0][:3], r[1], r[2], r[3]), None),  # refused by `near`, as before
        (lambda r: (r[0], {**r[1], "class_0": "x"}, r[2], r[3]), "must be numbers"),
    ],
)
def test_analyze_many_refuses_what_analyze_refuses(seed, traffic, change, match):
    pool = seed[4]
    rows = list(traffic[:50])
    rows[17] = change(rows[17])
    with pytest.raises(ValueError, match=match) as expected:
        one_at_a_time(rows, pool, AnalyzerConfig())
    with pytest.raises(ValueError) as got:
        batch(rows, pool, AnalyzerConfig())
    assert str(got.value) == str(expected.value)


def test_analyze_many_takes_pool_labels_the_probabilities_lack_to_analyze(seed, traffic):
    _, _, _, ref, pool = seed
    odd = LabelledPool(ref)
    odd.add(pool.points.tolist(), ["class_0"] * (len(pool) - 1) + ["other"])
    config = AnalyzerConfig(confident_threshold=0.0)
    far = [
        r for r in traffic if np.linalg.norm((np.asarray(r[0]) - pool.points[-1]) / ref.std) > 5
    ][:40]
    assert batch(far, odd, config) == one_at_a_time(far, odd, config)


def test_near_many_finds_the_same_neighbours_as_near(seed):
    _, _, _, ref, pool = seed
    rng = np.random.default_rng(3)
    queries = np.concatenate(
        [
            pool.points[:50] + rng.normal(0, 0.01, (50, ref.input_dim)),
            pool.points[50:60],  # exactly on a pool point
            ref.mean + rng.normal(0, 3, (40, ref.input_dim)) * ref.std,
        ]
    )
    for k in (1, 7, 20):
        points, labels = pool.near_many(queries, k)
        assert points.shape == (len(queries), k, ref.input_dim) and labels.shape == points.shape[:2]
        for q, got, got_labels in zip(queries, points, labels, strict=True):
            want, want_labels = pool.near(q, k)
            assert sorted(map(tuple, got)) == sorted(map(tuple, want))
            assert sorted(got_labels) == sorted(want_labels)


def test_near_many_with_ties_everywhere(seed):
    _, _, _, ref, pool = seed
    twins = LabelledPool(ref)
    points = np.repeat(pool.points[:30], 2, axis=0)  # every point twice: ties everywhere
    twins.add(points.tolist(), ["a", "b"] * 30)
    queries = pool.points[:25] + 0.001
    got_points, got_labels = twins.near_many(queries, 5)
    for q, gp, gl in zip(queries, got_points, got_labels, strict=True):
        wp, wl = twins.near(q, 5)
        assert sorted(map(tuple, gp)) == sorted(map(tuple, wp)) and list(gl) == list(wl)


def test_near_many_answers_rows_the_tree_cannot_take_as_near_does(seed):
    _, _, _, ref, pool = seed
    queries = np.stack(
        [
            pool.points[0],
            np.full(ref.input_dim, np.inf),
            pool.points[1] * 1e200,
            np.where(np.arange(ref.input_dim) == 0, np.nan, pool.points[2]),
        ]
    )
    with np.errstate(all="ignore"):
        got_points, got_labels = pool.near_many(queries, 7)
        for q, gp, gl in zip(queries, got_points, got_labels, strict=True):
            wp, wl = pool.near(q, 7)
            np.testing.assert_array_equal(gp, wp)
            assert list(gl) == list(wl)


def test_near_many_with_fewer_spare_points_than_usual(seed):
    _, _, _, ref, pool = seed
    small = LabelledPool(ref)
    small.add(pool.points[:10].tolist(), [f"l{i}" for i in range(10)])  # k + spare > size
    queries = pool.points[10:40]
    for k in (3, 9):
        got_points, got_labels = small.near_many(queries, k)
        for q, gp, gl in zip(queries, got_points, got_labels, strict=True):
            wp, wl = small.near(q, k)
            assert sorted(map(tuple, gp)) == sorted(map(tuple, wp))
            assert sorted(gl) == sorted(wl)


def requests_for(seed, traffic, n=40, model=True):
    _, spec, module, _, pool = seed
    out = []
    for i, (features, _, _, truth) in enumerate(traffic[:n]):
        out.append(
            Request(
                np.asarray(features),
                truth,
                ("confident", "boundary", "novel")[i % 3],
                labels=spec.labels,
                true_class_examples=pool.of_class(truth),
                model=module if model else None,
                seed=1000 + i,
            )
        )
    return out


def one_by_one(r: Request, ref, config=CounterexampleConfig()) -> list:
    """The variants of one request, a variant at a time with the scalar helpers: what
    `generate_many` computes for whole batches."""
    dim = ref.input_dim
    x = np.asarray(r.x, dtype=np.float64)
    hard = None
    if r.model is not None:
        hard = gradient_sign_point(
            x, list(r.labels).index(r.true_label), len(r.labels), r.model, ref, config.fgsm_step
        )
    pool = np.asarray(r.true_class_examples, dtype=np.float64)
    available = [
        s for s, ok in zip(STRATEGIES, (hard is not None, len(pool) > 0, True), strict=True) if ok
    ]
    out = []
    for i in range(config.k[r.error_type]):
        strategy = available[i % len(available)]
        u = _uniforms(
            np.asarray([r.seed], dtype=np.uint64), np.asarray([i], dtype=np.uint64), 2 * dim + 2
        )[0]
        z = np.sqrt(-2.0 * np.log1p(-u[:dim])) * np.cos(2.0 * np.pi * u[dim : 2 * dim])
        if strategy == "gradient_sign":
            v = hard if i == 0 else hard + z * config.jitter_scale * GRADIENT_JITTER_SHARE * ref.std
        elif strategy == "interpolate":
            other = pool[min(int(u[2 * dim] * len(pool)), len(pool) - 1)]
            lo, hi = config.interpolation
            v = x + (lo + u[2 * dim + 1] * (hi - lo)) * (other - x)
        else:
            v = x + z * config.jitter_scale * ref.std
        v32, dist = _within_radius(x, v, ref.std, config.max_distance)
        out.append(
            Counterexample(
                features=v32.astype(np.float64).tolist(),
                label=r.true_label,
                weight=config.weight,
                strategy=strategy,
                distance=dist,
            )
        )
    return out


def test_generate_many_equals_one_variant_at_a_time(seed, traffic):
    ref = seed[3]
    for model in (True, False):
        reqs = requests_for(seed, traffic, model=model)
        singles = [one_by_one(r, ref) for r in reqs]
        got = generate_many(reqs, reference=ref)
        assert len(got) == len(singles)
        for g, s in zip(got, singles, strict=True):
            assert [c.strategy for c in g] == [c.strategy for c in s]
            for a, b in zip(g, s, strict=True):
                assert a.label == b.label and a.weight == b.weight
                np.testing.assert_allclose(a.features, b.features, rtol=1e-6, atol=1e-6)
                assert a.distance == pytest.approx(b.distance, abs=1e-6)
        assert sum(len(s) for s in singles) == sum((6, 4, 6)[i % 3] for i in range(len(reqs)))
        assert [
            generate(
                r.x,
                r.true_label,
                r.error_type,
                labels=r.labels,
                reference=ref,
                true_class_examples=r.true_class_examples,
                model=r.model,
                seed=r.seed,
            )
            for r in reqs
        ] == got
    # a request's variants do not depend on the rest of its batch
    reqs = requests_for(seed, traffic)
    alone = generate_many([reqs[7]], reference=ref)[0]
    assert generate_many(reqs[3:12], reference=ref)[4] == alone


def test_each_seed_draws_its_own_stream():
    u = _uniforms(np.arange(4, dtype=np.uint64), np.zeros(4, dtype=np.uint64), 1000)
    assert ((u >= 0) & (u < 1)).all()
    assert abs(u.mean() - 0.5) < 0.02 and abs(u.std() - np.sqrt(1 / 12)) < 0.01
    assert len({tuple(row[:5]) for row in u}) == 4  # different seeds, different streams
    again = _uniforms(np.asarray([2], dtype=np.uint64), np.asarray([1], dtype=np.uint64), 10)
    np.testing.assert_array_equal(
        again[0],
        _uniforms(np.asarray([2], dtype=np.uint64), np.zeros(1, dtype=np.uint64), 20)[0, 10:],
    )


def test_generate_many_refuses_the_first_bad_request_as_generate_does(seed, traffic):
    ref = seed[3]
    reqs = requests_for(seed, traffic, n=6)
    bad = Request(reqs[2].x, "class_9", "confident", reqs[2].labels, None, None, reqs[2].seed)
    with pytest.raises(ValueError, match="true label 'class_9' is not a known label"):
        generate_many(reqs[:2] + [bad] + reqs[3:], reference=ref)
    wrong = Request(np.zeros(3), "class_0", "confident", reqs[0].labels, None, None, reqs[0].seed)
    with pytest.raises(ValueError, match="3 features"):
        generate_many([wrong], reference=ref)


def pairs_from(seed, traffic, sources=("a", "b")):
    now = datetime(2026, 1, 1, 12, 30, tzinfo=UTC)
    return [
        JoinedPair(
            uuid.UUID(int=i).hex,
            uuid.UUID(int=10_000 + i).hex,
            truth,
            sources[i % len(sources)],
            now,
            "flywheel",
            "1",
            features,
            probs,
            predicted,
        )
        for i, (features, probs, predicted, truth) in enumerate(traffic)
    ]


@pytest.mark.parametrize("budget", [0, 7, 40, 100_000])
def test_builder_spends_each_source_budget_in_pair_order(seed, traffic, budget):
    settings, spec, module, _, pool = seed
    feedback = settings.feedback.model_copy(update={"counterexample_budget": budget})
    builder = FixedBudget(budget, feedback, pool, lambda version: (spec.labels, module))
    pairs = pairs_from(seed, traffic)
    rows, rejected, outcomes = builder.finish(None, builder.prepare(pairs))
    assert rejected == []
    assert sum(outcomes.values()) == len(pairs)  # counted by the store transaction later
    corrections = [r for r in rows if r["origin"] == "correction"]
    assert [r["dedup_key"] for r in corrections] == [f"correction:{p.correction_id}" for p in pairs]
    variants = [r for r in rows if r["origin"] == "counterexample"]
    wanted = {s: 0 for s in ("a", "b")}
    for r in corrections:
        if r["split"] == "train" and r["error_type"]:
            wanted[r["source"]] += {"confident": 6, "boundary": 4, "novel": 6}[r["error_type"]]
    for source, want in wanted.items():
        assert sum(r["source"] == source for r in variants) == min(budget, want)
    # variants follow their correction, and earlier corrections are served first
    parents = [r["parent_prediction_id"] for r in rows if r["origin"] == "counterexample"]
    order = {p.prediction_id: i for i, p in enumerate(pairs)}
    assert parents == sorted(parents, key=order.__getitem__)


def test_an_unusable_pair_is_dead_lettered_not_fatal(seed, traffic):
    settings, spec, module, _, pool = seed
    builder = FixedBudget(0, settings.feedback, pool, lambda version: (spec.labels, module))
    pairs = pairs_from(seed, traffic)[:5]
    bad_label = pairs[1]._replace(true_label="no-such-class")
    bad_width = pairs[3]._replace(features=pairs[3].features[:-1])
    rows, rejected, outcomes = builder.finish(
        None, builder.prepare([pairs[0], bad_label, pairs[2], bad_width, pairs[4]])
    )
    assert sum(outcomes.values()) == 3  # the unusable pairs are not counted
    assert [r["parent_prediction_id"] for r in rows if r["origin"] == "correction"] == [
        pairs[0].prediction_id,
        pairs[2].prediction_id,
        pairs[4].prediction_id,
    ]
    assert [r.key.decode() for r in rejected] == [pairs[1].prediction_id, pairs[3].prediction_id]
    assert "'no-such-class' is not one of the model's labels" in rejected[0].reason
    assert "features, the reference has" in rejected[1].reason
