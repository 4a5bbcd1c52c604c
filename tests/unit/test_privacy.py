"""DP-SGD and accounting without a store: the ε cross-check, noise, clipping, engines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flywheel.modelspec import ModelSpec, build_model
from flywheel.privacy import (
    DPConfig,
    Mechanism,
    PrivateBatch,
    dp_accounting_epsilon,
    dp_update,
    epsilon,
    noise_for_budget,
    tree_epsilon_independent,
)
from flywheel.settings import PrivacySettings

LEDGERS = [
    [Mechanism(0.5, 2.46, 8)],
    [Mechanism(256 / 60000, 1.1, 2343)],  # Opacus' MNIST example (STACK.md: ε 1.0986)
    [Mechanism(0.5, 3.25, 8), Mechanism(0.5, 3.25, 8), Mechanism(0.1, 1.0, 50)],
    [Mechanism(1.0, 5.0, 4), Mechanism(0.02, 0.9, 400)],
]


@pytest.mark.parametrize("mechanisms", LEDGERS)
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_our_epsilon_matches_dp_accounting_within_one_percent(mechanisms, accountant):
    ours = epsilon(mechanisms, 1e-5, accountant)
    google = dp_accounting_epsilon(mechanisms, 1e-5, accountant)
    assert ours > 0
    assert abs(ours - google) / google < 0.01, (ours, google)


def test_noise_is_calibrated_once_per_parameter_set_and_still_fits_the_budget():
    """Calibration is Opacus' bisection, seconds per call (5–9 s for the defaults):
    a second `DPConfig` with the same parameters (a learner restart, another benchmark arm)
    reuses it; a σ found once still spends at most the budget over `source_updates`."""
    config = DPConfig.from_settings(PrivacySettings(privacy_epsilon=2.75))  # unused elsewhere
    before = noise_for_budget.cache_info()
    first = config.mechanism(3)
    again = DPConfig.from_settings(PrivacySettings(privacy_epsilon=2.75)).mechanism(3)
    after = noise_for_budget.cache_info()
    assert first == again
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    spent = epsilon([first] * config.source_updates, config.delta)
    assert spent <= config.epsilon
    assert dp_accounting_epsilon([first] * config.source_updates, config.delta) <= 1.01 * 2.75


TREE_LEDGERS = [
    [Mechanism(1.0, 2.0, 1000, "tree")],  # STACK.md: ε ≈ 8.08
    [Mechanism(1.0, 4.224, 8, "tree")] * 2,  # the product's default: two updates, ε 3
    [Mechanism(1.0, 3.0, 5, "tree"), Mechanism(1.0, 1.5, 8, "tree")],
    [Mechanism(1.0, 10.0, 100, "tree")] * 7,
]


@pytest.mark.parametrize("mechanisms", TREE_LEDGERS)
def test_tree_epsilon_matches_an_independent_computation_within_one_percent(mechanisms):
    """dp-accounting's SingleEpochTreeAggregationDpEvent against our own: nodes counted by
    walking the tree, Gaussian RDP α·k/(2σ²), conversion over a continuous order."""
    ours = epsilon(mechanisms, 1e-5)
    independent = tree_epsilon_independent(mechanisms, 1e-5)
    assert ours > 0
    assert abs(ours - independent) / independent < 0.01, (ours, independent)


def test_tree_epsilon_is_the_known_value_and_not_dp_sgd_at_full_rate():
    assert epsilon(TREE_LEDGERS[0], 1e-5) == pytest.approx(8.08, abs=0.01)
    # the same numbers as DP-SGD steps (q = 1, every step a fresh Gaussian) spend far more:
    # the kind decides the accounting
    assert epsilon([Mechanism(1.0, 2.0, 1000)], 1e-5) > 3 * epsilon(TREE_LEDGERS[0], 1e-5)
    with pytest.raises(ValueError, match="tree_epsilon_independent"):
        dp_accounting_epsilon(TREE_LEDGERS[0], 1e-5)


def test_mnist_example_epsilon_is_the_known_value():
    assert epsilon(LEDGERS[1], 1e-5) == pytest.approx(1.0986, abs=5e-4)


def test_calibrated_noise_spends_the_budget_and_no_more():
    sigma = noise_for_budget(3.0, 1e-5, 0.5, 16)
    spent = epsilon([Mechanism(0.5, sigma, 16)], 1e-5)
    assert 2.9 < spent <= 3.0
    # the learner's config spreads the budget over `source_updates` updates
    privacy = PrivacySettings(privacy_epsilon=3.0, privacy_source_updates=2)
    m = DPConfig.from_settings(privacy).mechanism(8)
    assert epsilon([m, m], 1e-5) <= 3.0 + 1e-6 < epsilon([m, m, m], 1e-5)


def test_mechanism_rejects_values_without_a_finite_epsilon():
    with pytest.raises(ValueError, match="noise_multiplier"):
        Mechanism(0.5, 0.0, 1)
    with pytest.raises(ValueError, match="sample_rate"):
        Mechanism(1.5, 1.0, 1)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelSpec(input_dim=5, hidden=[8, 6], labels=["a", "b", "c"]))


def _batch(
    n: int = 24, seed: int = 0, sources: np.ndarray | None = None, public: int = 0
) -> PrivateBatch:
    rng = np.random.default_rng(seed)
    src = np.arange(n) if sources is None else sources
    pub = np.zeros(n, bool)
    if public:
        pub[-public:] = True
        src = np.where(pub, -1, src)
    return PrivateBatch(
        rng.normal(size=(n, 5)).astype(np.float32) * 3,
        rng.integers(0, 3, n),
        rng.uniform(0.2, 1.0, n).astype(np.float32),
        src,
        pub,
    )


def _params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _step(module, batch, sigma, seed, engine="opacus", lr=0.1):
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    return dp_update(
        module,
        opt,
        batch,
        steps=1,
        sample_rate=1.0,
        noise_multiplier=sigma,
        max_grad_norm=0.5,
        generator=torch.Generator().manual_seed(seed),
        engine=engine,
    )


def test_two_seeds_from_one_state_give_different_models():
    a, b = _model(), _model()
    _step(a, _batch(), 1.0, seed=1)
    _step(b, _batch(), 1.0, seed=2)
    assert not torch.allclose(_params(a), _params(b))


def _reference_clipped_sgd(module, batch, clip, lr):
    """Per-example gradients one by one, clipped, scaled by weight / max(1, the source's
    summed weights)."""
    x, y = torch.from_numpy(batch.x), torch.from_numpy(batch.y)
    total = [torch.zeros_like(p) for p in module.parameters()]
    counts = {
        s: max(1.0, float(batch.weight[batch.sources == s].sum()))
        for s in set(batch.sources.tolist())
    }
    for i in range(len(y)):
        module.zero_grad()
        nn.functional.cross_entropy(module(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        grads = [p.grad.clone() for p in module.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6)) * float(batch.weight[i])
        if not batch.public[i]:
            factor /= counts[int(batch.sources[i])]
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    expected = len({s for s, p in zip(batch.sources, batch.public, strict=True) if not p}) + int(
        batch.public.sum()
    )
    with torch.no_grad():
        for p, t in zip(module.parameters(), total, strict=True):
            p -= lr * t / expected


@pytest.mark.parametrize("engine", ["opacus", "fused"])
def test_sigma_zero_is_clipped_sgd_with_one_clip_norm_per_source(engine):
    sources = np.repeat(np.arange(8), 3)  # 8 sources with 3 examples each
    batch = _batch(sources=sources, public=4)
    ours, ref = _model(3), _model(3)
    stats = _step(ours, batch, 0.0, seed=0, engine=engine)
    _reference_clipped_sgd(ref, batch, clip=0.5, lr=0.1)
    assert stats.engine == engine
    assert torch.allclose(_params(ours), _params(ref), atol=1e-5)
    assert 0 < stats.clipped_share <= 1  # x*3 inputs: most gradients exceed C=0.5


@pytest.mark.parametrize("engine", ["opacus", "fused"])
def test_a_unit_with_derived_rows_moves_the_sum_by_its_full_clip_norm_and_no_more(engine):
    """A correction (weight 1) and six derived counterexamples (0.5 each) of one unit, all
    the same row so every clipped gradient is the same vector g, |g| = C: the unit adds
    (1 + 6·0.5)/max(1, 4)·g = g, its full C. Scaled by the row count (as before) it added
    4/7 of it; a sum would add 4·C, beyond what the unit is accounted for."""
    x = np.repeat(np.random.default_rng(0).normal(size=(1, 5)).astype(np.float32) * 3, 7, 0)
    batch = PrivateBatch(
        x,
        np.zeros(7, np.int64),
        np.asarray([1.0] + [0.5] * 6, np.float32),
        np.zeros(7, np.int64),
        np.zeros(7, bool),
    )
    one = PrivateBatch(x[:1], batch.y[:1], batch.weight[:1], batch.sources[:1], batch.public[:1])
    a, b, start = _model(), _model(), _params(_model())
    _step(a, batch, 0.0, seed=0, engine=engine)
    _step(b, one, 0.0, seed=0, engine=engine)  # one row, weight 1: exactly C·lr (clipped)
    moved, single = _params(a) - start, _params(b) - start
    assert float(single.norm()) == pytest.approx(0.1 * 0.5, rel=1e-3)
    torch.testing.assert_close(moved, single, atol=1e-6, rtol=1e-4)


def test_poisson_sampling_changes_the_batch_from_step_to_step():
    module = _model()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    stats = dp_update(
        module,
        opt,
        _batch(200),
        steps=20,
        sample_rate=0.3,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert 45 < stats.sampled_sources < 75  # about 0.3 * 200 per step


def test_weights_above_one_are_refused():
    b = _batch()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PrivateBatch(b.x, b.y, b.weight * 3, b.sources, b.public)


class _LinearTwice(nn.Module):
    """One Linear applied twice: only a run reveals it (the fused kernel then refuses)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_auto_falls_back_to_opacus_when_the_kernel_refuses_at_run_time(caplog):
    batch = _batch()
    torch.manual_seed(0)
    auto = _LinearTwice()
    opacus = _LinearTwice()
    opacus.load_state_dict(auto.state_dict())
    with pytest.raises(ValueError, match="more than once"):
        _step(_LinearTwice(), batch, 0.0, seed=0, engine="fused")  # asked for: no fallback
    with caplog.at_level("WARNING", logger="flywheel.privacy.dp_sgd"):
        stats = _step(auto, batch, 0.0, seed=0, engine="auto")
    assert stats.engine == "opacus" and "refused" in caplog.text
    _step(opacus, batch, 0.0, seed=0, engine="opacus")
    assert torch.allclose(_params(auto), _params(opacus), atol=1e-6)
