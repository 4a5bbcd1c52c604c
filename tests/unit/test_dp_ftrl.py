"""DP-FTRL with tree aggregation: the tree's noise, the leaves, the update, the calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flywheel.learner.trainer import OnlineTrainer, TrainerConfig
from flywheel.modelspec import ModelSpec, build_model
from flywheel.privacy import (
    DPConfig,
    Mechanism,
    PrivateBatch,
    epsilon,
    ftrl_update,
    tree_nodes_touched,
)
from flywheel.privacy.dp_ftrl import TreeNoise, leaves_of
from flywheel.settings import PrivacySettings


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelSpec(input_dim=5, hidden=[8, 6], labels=["a", "b", "c"]))


def _params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _batch(sources: np.ndarray, public: int = 0, seed: int = 0, weight: float | None = None):
    rng = np.random.default_rng(seed)
    n = len(sources) + public
    pub = np.zeros(n, bool)
    pub[len(sources) :] = True
    w = rng.uniform(0.2, 1.0, n).astype(np.float32) if weight is None else np.full(n, weight)
    return PrivateBatch(
        rng.normal(size=(n, 5)).astype(np.float32) * 3,
        rng.integers(0, 3, n),
        w.astype(np.float32),
        np.concatenate([sources, np.full(public, -1)]).astype(np.int64),
        pub,
    )


@pytest.mark.parametrize("leaves", [1, 2, 3, 5, 8, 13, 16, 100])
def test_nodes_touched_is_the_number_of_complete_dyadic_blocks_over_a_leaf(leaves):
    assert tree_nodes_touched(leaves) <= math.ceil(math.log2(leaves)) + 1
    assert tree_nodes_touched(leaves) == math.floor(math.log2(leaves)) + 1
    if leaves & (leaves - 1) == 0:  # a full tree: the leaf-to-root path
        assert tree_nodes_touched(leaves) == int(math.log2(leaves)) + 1


def test_prefix_noise_is_one_draw_per_dyadic_block_and_shared_between_prefixes():
    noise = TreeNoise(200_000, 1.0, torch.Generator().manual_seed(0))
    prefixes = {t: noise.prefix(t) for t in range(1, 9)}
    # each prefix adds the one block that ends at it (binary-counter order): 8 draws for
    # 8 leaves, each drawn once however many later prefixes use it
    assert sorted(noise.blocks) == sorted((t - (t & -t), t & -t) for t in range(1, 9))
    for t, value in prefixes.items():  # variance = number of blocks = popcount(t)
        assert float(value.var()) == pytest.approx(bin(t).count("1"), rel=0.03)
    # S_8 carries the root's draw only, S_4 the left half's: DP-SGD's sum of 8 steps would
    # carry 8 independent draws
    assert torch.equal(prefixes[8], noise.blocks[(0, 8)])
    assert torch.allclose(prefixes[6] - prefixes[4], noise.blocks[(4, 2)], atol=1e-6)


def test_every_row_in_exactly_one_leaf_and_every_source_in_one_leaf():
    sources = np.repeat(np.arange(13), [1, 2, 3, 1, 1, 4, 2, 1, 1, 1, 3, 2, 1])
    rng = np.random.default_rng(0)
    batch = _batch(rng.permutation(sources), public=7)
    leaves = leaves_of(batch, 5)
    assert len(leaves) == 5
    allrows = np.concatenate(leaves)
    assert sorted(allrows.tolist()) == list(range(len(batch.y)))
    leaf_of_source: dict[int, int] = {}
    for k, rows in enumerate(leaves):
        for s in batch.sources[rows][~batch.public[rows]].tolist():
            assert leaf_of_source.setdefault(s, k) == k
    assert len(leaf_of_source) == 13
    # balanced in what each leaf's sum is made of: sources (each adds at most C) and public rows
    per_leaf = [len(set(batch.sources[r][~batch.public[r]].tolist())) for r in leaves]
    public = [int(batch.public[r].sum()) for r in leaves]
    assert max(per_leaf) - min(per_leaf) <= 1 and max(public) - min(public) <= 1


def _ftrl(module, batch, *, leaves, sigma, seed, lr=0.1, engine="opacus"):
    return ftrl_update(
        module,
        batch,
        leaves=leaves,
        noise_multiplier=sigma,
        max_grad_norm=0.5,
        lr=lr,
        generator=torch.Generator().manual_seed(seed),
        engine=engine,
    )


@pytest.mark.parametrize("engine", ["opacus", "fused"])
def test_one_leaf_without_noise_is_one_clipped_gradient_step_per_source(engine):
    """σ = 0, one leaf: θ_0 − lr·Σ_i (w_i/max(1, W_s))·clip(∇ℓ_i) / (sources + public rows),
    W_s the summed weights of row i's source."""
    batch = _batch(np.repeat(np.arange(6), 3), public=4)
    module, ref = _model(), _model()
    _ftrl(module, batch, leaves=1, sigma=0.0, seed=0, engine=engine)
    x, y = torch.from_numpy(batch.x), torch.from_numpy(batch.y)
    total = [torch.zeros_like(p) for p in ref.parameters()]
    for i in range(len(y)):
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        grads = [p.grad.clone() for p in ref.parameters()]
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        factor = min(1.0, 0.5 / (norm + 1e-6)) * float(batch.weight[i])
        if not batch.public[i]:
            factor /= max(1.0, float(batch.weight[batch.sources == batch.sources[i]].sum()))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    with torch.no_grad():
        for p, t in zip(ref.parameters(), total, strict=True):
            p -= 0.1 * t / (6 + 4)
    assert torch.allclose(_params(module), _params(ref), atol=1e-5)


@pytest.mark.parametrize(("leaves", "blocks"), [(8, 1), (7, 3), (1, 1)])
def test_the_final_model_carries_the_noise_of_the_last_prefix_only(leaves, blocks):
    """Zero-weight rows: no signal, so θ_T − θ_0 is −lr·(noise on S_T)/B, whose std is
    σC·√(blocks of T)·lr/B: one draw for a full tree of 8, where 8 DP-SGD steps add 8."""
    module = build_model(ModelSpec(input_dim=400, hidden=[64], labels=["a", "b"]))
    rng = np.random.default_rng(1)
    n = 16
    batch = PrivateBatch(
        rng.normal(size=(n, 400)).astype(np.float32),
        rng.integers(0, 2, n),
        np.zeros(n, np.float32),
        np.arange(n),
        np.zeros(n, bool),
    )
    before = _params(module)
    _ftrl(module, batch, leaves=leaves, sigma=2.0, seed=3, lr=0.1)
    moved = _params(module) - before
    expected = 2.0 * 0.5 * math.sqrt(blocks) * 0.1 / max(n / leaves, 1.0)
    assert float(moved.std()) == pytest.approx(expected, rel=0.05)


def test_noise_makes_two_seeds_differ_and_learning_happens_without_it():
    sources = np.arange(40)
    batch = _batch(sources, weight=1.0)
    a, b = _model(), _model()
    _ftrl(a, batch, leaves=4, sigma=1.0, seed=1)
    _ftrl(b, batch, leaves=4, sigma=1.0, seed=2)
    assert not torch.allclose(_params(a), _params(b))
    clean = _model()
    x, y = torch.from_numpy(batch.x), torch.from_numpy(batch.y)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(clean(x), y))
    for _ in range(20):
        _ftrl(clean, batch, leaves=4, sigma=0.0, seed=0, lr=0.5)
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(clean(x), y)) < loss - 0.1


def test_calibrated_tree_noise_lets_a_source_join_the_set_number_of_updates():
    privacy = PrivacySettings(
        privacy_epsilon=3.0, privacy_source_updates=2, privacy_mechanism="dp-ftrl"
    )
    m = DPConfig.from_settings(privacy).mechanism(8)
    assert m.kind == "tree" and m.sample_rate == 1.0 and m.steps == 8
    assert epsilon([m, m], 1e-5) <= 3.0 + 1e-6 < epsilon([m, m, m], 1e-5)
    assert epsilon([m, m], 1e-5) > 2.97  # and no more noise than the budget needs
    explicit = PrivacySettings(privacy_noise_multiplier=5.0, privacy_mechanism="dp-ftrl")
    assert DPConfig.from_settings(explicit).mechanism(4) == Mechanism(1.0, 5.0, 4, "tree")


def test_a_tree_mechanism_samples_nothing():
    with pytest.raises(ValueError, match="sample_rate must be 1"):
        Mechanism(0.5, 2.0, 8, "tree")
    with pytest.raises(ValueError, match="kind"):
        Mechanism(1.0, 2.0, 8, "ftrl")


def test_the_trainer_runs_a_tree_update_for_a_tree_mechanism():
    """`update_private` with a tree: FTRL sets the parameters (Adam's state untouched),
    and σ scales what it adds."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    moves = []
    for sigma in (0.5, 50.0):
        module = _model()
        trainer = OnlineTrainer(module, TrainerConfig(elastic=False), input_dim=5, seed=0)
        before = _params(module)
        stats = trainer.update_private(
            x,
            y,
            np.ones(40, np.float32),
            np.arange(40),
            Mechanism(1.0, sigma, 4, "tree"),
            max_grad_norm=1.0,
            engine="opacus",
            ftrl_lr=0.3,
        )
        assert stats.steps == 4 and trainer.updates == 1
        assert not trainer.optimizer.state  # Adam never stepped
        moves.append(float((_params(module) - before).norm()))
    assert moves[1] > 10 * moves[0]


def _rows(first: int, n: int, source: str) -> list:
    from flywheel.store import StoredExample

    rng = np.random.default_rng(first)
    return [
        StoredExample(
            i,
            "correction",
            "train",
            rng.normal(size=5).tolist(),
            "abc"[i % 3],
            1.0,
            None,
            source,
            f"p{i}",
        )
        for i in range(first, first + n)
    ]


def test_dp_ftrl_is_planned_recorded_and_capped_by_the_budget_like_dp_sgd(sqlite_url):
    """The ledger gets the tree (kind, σ, leaves, C, accountant) before anything trains;
    a source that spent its ε = 3 over two trees is left out of the third."""
    from flywheel.learner.private_step import PrivateStep
    from flywheel.privacy import PrivacyLedger, build_report, tree_epsilon_independent
    from flywheel.store import make_engine, upgrade

    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        privacy = PrivacySettings(privacy_mechanism="dp-ftrl", privacy_accountant="prv")
        step = PrivateStep(privacy, 8, engine, "m:online")
        module = _model()
        labels = {"a": 0, "b": 1, "c": 2}
        first = step.plan(_rows(0, 10, "app"), 1, module)
        assert first is not None and first.plan is not None
        entry = PrivacyLedger(engine).entries()[0]  # written before training
        assert (entry.mechanism_kind, entry.accountant, entry.steps, entry.sample_rate) == (
            "tree",
            "rdp",
            8,
            1.0,
        )
        assert entry.mechanism == step.mechanism
        assert entry.epsilon_update == pytest.approx(
            tree_epsilon_independent([step.mechanism], 1e-5), rel=0.01
        )
        assert first.params()["dp_mechanism"] == "tree"
        before = _params(module)
        step.train(OnlineTrainer(module, TrainerConfig(), input_dim=5), first, labels)
        assert not torch.equal(before, _params(module))
        second = step.plan(_rows(10, 10, "app"), 2, module)
        assert second is not None and second.plan is not None
        assert 2.97 < second.plan.epsilon_lineage <= 3.0
        third = step.plan(_rows(20, 10, "app") + _rows(30, 5, "other"), 3, module)
        assert third is not None and third.plan is not None
        assert set(third.plan.allowed) == {"source:other"}
        assert set(third.plan.excluded) == {"source:app"} and len(third.rows) == 5
        report = build_report(PrivacyLedger(engine), budget=3.0, delta=1e-5)
        assert {e["mechanism_kind"] for e in report["entries"]} == {"tree"}
    finally:
        engine.dispose()
