"""Fused per-sample clipping (`flywheel.kernels.clip_and_accumulate`) against Opacus 1.6
hooks mode and the torch.func reference, over many random models, batches and clip norms.

hypothesis is not installed, so the property tests draw their cases from seeded
generators: every activation, depths 0-3, widths 1-40, batch sizes 1-64, clip norms that
clip every sample, some of them, or none. Opacus is set up with loss_reduction="sum" (and
noise 0), so its `p.grad` after `pre_step()` is the sum of the clipped per-sample
gradients, the same quantity the kernel produces; one test checks the "mean" set-up too.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flywheel.kernels import clip_and_accumulate, supports
from flywheel.kernels.per_sample_clip import unsupported_layer
from flywheel.kernels.reference import per_sample_clip_reference, per_sample_grads
from flywheel.modelspec import ModelSpec, build_model

ACTIVATIONS = ("relu", "tanh", "gelu")
CLIP_MODES = ("all", "some", "none")


@dataclass(frozen=True)
class Case:
    seed: int
    input_dim: int
    hidden: tuple[int, ...]
    n_labels: int
    activation: str
    batch: int
    clip: str  # all | some | none: which samples the clip norm scales down

    def build(self, dtype: torch.dtype = torch.float32
              ) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
        torch.manual_seed(self.seed)
        spec = ModelSpec(input_dim=self.input_dim, hidden=list(self.hidden),
                         labels=[f"c{i}" for i in range(self.n_labels)],
                         activation=self.activation)  # type: ignore[arg-type]
        module = build_model(spec).to(dtype)
        x = (torch.randn(self.batch, self.input_dim) * 3 + 1).to(dtype)
        y = torch.randint(0, self.n_labels, (self.batch,))
        if self.batch > 1:
            module[0].fit(x)  # non-trivial Standardize buffers
        return module, x, y


def cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        depth = rng.choice((0, 1, 1, 2, 2, 3))
        out.append(Case(
            seed=rng.randrange(10**6), input_dim=rng.choice((1, 3, 8, 20)),
            hidden=tuple(rng.choice((1, 4, 16, 40)) for _ in range(depth)),
            n_labels=rng.choice((2, 3, 5)), activation=ACTIVATIONS[i % 3],
            batch=rng.choice((1, 1, 2, 7, 33, 64)), clip=CLIP_MODES[(i // 3) % 3]))
    return out


def clip_norm(norms: torch.Tensor, mode: str) -> float:
    if mode == "all":
        return float(norms.min()) * 0.5
    if mode == "none":
        return float(norms.max()) * 2.0 + 1e-3
    return float(norms.median()) if len(norms) > 1 else float(norms[0]) * 0.5


def opacus_hooks_grads(module: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float,
                       reduction: str = "sum") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Opacus 1.6 `make_private(grad_sample_mode="hooks")`, noise 0: ({name: p.grad}, the
    per-sample norms Opacus clips by, from its own grad samples)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure RNG and accountant notices
        gsm, dp_opt, _ = PrivacyEngine().make_private(
            module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=c, loss_reduction=reduction, poisson_sampling=False,
            grad_sample_mode="hooks")
    dp_opt.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full backward hook on a first layer without input grad
        F.cross_entropy(gsm(x), y, reduction=reduction).backward()
    samples = [p.grad_sample.reshape(len(x), -1) for p in module.parameters()
               if p.requires_grad]
    norms = torch.cat(samples, dim=1).norm(2, dim=1)
    assert dp_opt.pre_step()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters()
             if p.requires_grad}
    gsm._close()
    return grads, norms


def ours(module: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float,
         weights: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    for p in module.parameters():
        p.grad = None
    norms = clip_and_accumulate(module, x, y, c, weights=weights)
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()
            if p.requires_grad}, norms


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                       tol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# -- equal to Opacus hooks mode and to the reference -------------------------------------
@pytest.mark.parametrize("case", cases(48, seed=1), ids=repr)
def test_clipped_sum_equals_opacus_hooks_float32(case: Case):
    module, x, y = case.build()
    _, ref_norms = per_sample_clip_reference(module, x, y, 1.0)
    c = clip_norm(ref_norms, case.clip)
    want, opacus_norms = opacus_hooks_grads(build_copy(module), x, y, c)
    got, norms = ours(module, x, y, c)
    assert_grads_close(got, want, 1e-5)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norms, opacus_norms, rtol=1e-5, atol=1e-5)
    clipped = norms > c
    assert {"all": clipped.all(), "none": ~clipped.any(),
            "some": clipped.any() & ~clipped.all() if case.batch > 2 else clipped.any()
            }[case.clip]


@pytest.mark.parametrize("case", cases(24, seed=2), ids=repr)
def test_clipped_sum_and_norms_equal_reference_float64(case: Case):
    module, x, y = case.build(torch.float64)
    _, ref_norms = per_sample_clip_reference(module, x, y, 1.0)
    c = clip_norm(ref_norms, case.clip)
    want, want_norms = per_sample_clip_reference(module, x, y, c)
    got, norms = ours(module, x, y, c)
    assert_grads_close(got, want, 1e-10)
    torch.testing.assert_close(norms, want_norms, rtol=1e-12, atol=1e-12)
    opacus, _ = opacus_hooks_grads(build_copy(module), x, y, c)
    assert_grads_close(got, opacus, 1e-10)


def build_copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def test_opacus_mean_reduction_is_the_sum_over_the_batch_size():
    module, x, y = Case(3, 8, (16, 16), 3, "relu", 32, "some").build()
    c = 0.5
    mean, _ = opacus_hooks_grads(build_copy(module), x, y, c, reduction="mean")
    got, _ = ours(module, x, y, c)
    assert_grads_close({n: g / len(x) for n, g in got.items()}, mean, 1e-6)


def test_the_demo_model_at_batch_256():
    from flywheel.learner.seed_model import default_spec

    torch.manual_seed(0)
    module = build_model(default_spec())
    x, y = torch.randn(256, default_spec().input_dim), torch.randint(0, 3, (256,))
    for c in (0.01, 1.0, 1e3):
        want, _ = opacus_hooks_grads(build_copy(module), x, y, c)
        got, _ = ours(module, x, y, c)
        assert_grads_close(got, want, 1e-5)


def test_sets_rather_than_accumulates_grads():
    module, x, y = Case(4, 8, (16,), 3, "tanh", 16, "some").build()
    first, _ = ours(module, x, y, 0.3)
    clip_and_accumulate(module, x, y, 0.3)  # p.grad already set: overwritten
    assert_grads_close({n: p.grad for n, p in module.named_parameters()}, first, 0.0)


def test_every_sample_contributes_at_most_c():
    module, x, y = Case(5, 8, (16, 16), 3, "gelu", 20, "all").build()
    for i in range(3):
        grads, norms = ours(module, x[i:i + 1], y[i:i + 1], 0.05)
        total = torch.cat([g.flatten() for g in grads.values()]).norm()
        assert norms[0] > 0.05 and abs(float(total) - 0.05) < 1e-6


def test_empty_batch_gives_zero_grads():
    module, x, y = Case(6, 8, (4,), 3, "relu", 4, "some").build()
    grads, norms = ours(module, x[:0], y[:0], 1.0)
    assert norms.shape == (0,)
    assert all(float(g.abs().sum()) == 0.0 for g in grads.values())


# -- example weights ---------------------------------------------------------------------
@pytest.mark.parametrize("case", cases(12, seed=3), ids=repr)
def test_weights_multiply_the_clipped_gradients(case: Case):
    module, x, y = case.build(torch.float64)
    weights = torch.rand(case.batch, generator=torch.Generator().manual_seed(case.seed),
                         dtype=torch.float64)
    weights[0] = 0.0
    _, ref_norms = per_sample_clip_reference(module, x, y, 1.0)
    c = clip_norm(ref_norms, case.clip)
    want, _ = per_sample_clip_reference(module, x, y, c, weights=weights)
    got, norms = ours(module, x, y, c, weights)
    assert_grads_close(got, want, 1e-10)
    torch.testing.assert_close(norms, ref_norms)  # norms: before clipping and weighting
    # by hand: Σ_i w_i · clip(g_i), from the per-sample gradients
    per = per_sample_grads(module, x, y)
    scale = (c / (ref_norms + 1e-6)).clamp(max=1.0) * weights
    for name, g in per.items():
        torch.testing.assert_close(got[name], torch.einsum("i,i...->...", scale, g))


def test_weights_apply_after_clipping():
    """Half weight halves a clipped contribution; weighting the loss instead would not."""
    module, x, y = Case(7, 8, (16,), 3, "relu", 8, "all").build(torch.float64)
    full, _ = ours(module, x, y, 1e-3)
    half, _ = ours(module, x, y, 1e-3, torch.full((8,), 0.5, dtype=torch.float64))
    assert_grads_close(half, {n: g / 2 for n, g in full.items()}, 1e-12)
    zero, _ = ours(module, x, y, 1e-3, torch.zeros(8, dtype=torch.float64))
    assert all(float(g.abs().max()) == 0.0 for g in zero.values())


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_weights_outside_0_1_are_refused(bad: float):
    module, x, y = Case(8, 8, (4,), 3, "relu", 4, "some").build()
    weights = torch.tensor([1.0, 0.5, bad, 0.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clip_and_accumulate(module, x, y, 1.0, weights=weights)
    with pytest.raises(ValueError, match="one weight per row"):
        clip_and_accumulate(module, x, y, 1.0, weights=torch.ones(3))


# -- other supported structures ----------------------------------------------------------
class Residual(nn.Module):
    """Not a Sequential: the kernel's forward-hook path."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.block = nn.Sequential(nn.Tanh(), nn.Linear(12, 12, bias=False))
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(torch.relu(h + self.block(h)))


@pytest.mark.parametrize("clip", [0.01, 0.5, 100.0])
def test_non_sequential_module_equals_reference(clip: float):
    torch.manual_seed(9)
    module = Residual().double()
    x, y = torch.randn(17, 6, dtype=torch.float64), torch.randint(0, 4, (17,))
    want, want_norms = per_sample_clip_reference(module, x, y, clip)
    got, norms = ours(module, x, y, clip)
    assert_grads_close(got, want, 1e-10)
    torch.testing.assert_close(norms, want_norms)


def test_frozen_parameters_are_left_alone_and_excluded_from_the_norm():
    module, x, y = Case(10, 8, (16, 16), 3, "relu", 12, "some").build(torch.float64)
    module[1].weight.requires_grad_(False)  # frozen weight, trainable bias
    module[3].requires_grad_(False)  # a whole frozen layer
    want, want_norms = per_sample_clip_reference(module, x, y, 0.2)
    got, norms = ours(module, x, y, 0.2)
    assert_grads_close(got, want, 1e-10)
    torch.testing.assert_close(norms, want_norms)
    assert module[1].weight.grad is None and module[3].weight.grad is None


def test_nested_sequential_with_dropout_in_eval_mode():
    torch.manual_seed(11)
    module = nn.Sequential(nn.Sequential(nn.Linear(5, 7), nn.GELU()), nn.Dropout(0.5),
                           nn.Linear(7, 3)).double().eval()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    want, want_norms = per_sample_clip_reference(module, x, y, 0.3)
    got, norms = ours(module, x, y, 0.3)
    assert_grads_close(got, want, 1e-10)
    torch.testing.assert_close(norms, want_norms)


# -- what it refuses ---------------------------------------------------------------------
@pytest.mark.parametrize("layer,name", [
    (nn.LayerNorm(8), "LayerNorm"), (nn.BatchNorm1d(8, affine=False), "BatchNorm1d"),
    (nn.PReLU(), "PReLU"), (nn.Bilinear(8, 8, 8), "Bilinear"),
])
def test_unsupported_layer_is_a_clear_value_error(layer: nn.Module, name: str):
    module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), layer, nn.Linear(8, 3))
    if isinstance(layer, nn.Bilinear):
        module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        module.add_module("extra", layer)
    assert not supports(module)
    bad = unsupported_layer(module)
    assert bad is not None and bad[0] in {"2", "extra"}
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match=rf"layer '{bad[0]}'.*{name}.*Opacus"):
        clip_and_accumulate(module, x, y, 1.0)


def test_the_models_build_model_makes_are_supported():
    for act in ACTIVATIONS:
        spec = ModelSpec(input_dim=8, hidden=[64, 64], labels=["a", "b"],
                         activation=act)  # type: ignore[arg-type]
        assert supports(build_model(spec))
    assert supports(Residual())


def test_a_frozen_unsupported_layer_is_fine():
    torch.manual_seed(12)
    norm = nn.LayerNorm(8).double()
    norm.requires_grad_(False)
    module = nn.Sequential(nn.Linear(4, 8), norm, nn.Linear(8, 3)).double()
    assert supports(module)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    want, _ = per_sample_clip_reference(module, x, y, 0.1)
    got, _ = ours(module, x, y, 0.1)
    assert_grads_close(got, want, 1e-10)


def test_shared_linear_is_refused():
    shared = nn.Linear(6, 6)
    module = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"layer '2'.*more than once"):
        clip_and_accumulate(module, torch.randn(3, 6), torch.randint(0, 2, (3,)), 1.0)


def test_sequence_input_is_refused():
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x.view(len(x), 2, 4)).mean(1)

    with pytest.raises(ValueError, match=r"layer 'proj'.*2-D"):
        clip_and_accumulate(Seq(), torch.randn(5, 8), torch.randint(0, 3, (5,)), 1.0)


def test_bad_arguments():
    module, x, y = Case(13, 8, (4,), 3, "relu", 4, "some").build()
    with pytest.raises(ValueError, match="loss 'mse'"):
        clip_and_accumulate(module, x, y, 1.0, loss="mse")
    with pytest.raises(ValueError, match="max_grad_norm"):
        clip_and_accumulate(module, x, y, 0.0)
    with pytest.raises(ValueError, match="one label per row"):
        clip_and_accumulate(module, x, y[:2], 1.0)


def test_linear_whose_output_gradient_is_an_expanded_view():
    class SumHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(5, 3)
            self.aux = nn.Linear(5, 4)  # its output is summed: gradient is a stride-0 view

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x) + self.aux(x).sum(1, keepdim=True)

    torch.manual_seed(14)
    module = SumHead().double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    want, want_norms = per_sample_clip_reference(module, x, y, 0.5)
    got, norms = ours(module, x, y, 0.5)
    assert_grads_close(got, want, 1e-10)
    torch.testing.assert_close(norms, want_norms)


def test_a_linear_the_forward_skips_gets_a_zero_gradient():
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.unused = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    module = Skips()
    module.unused.weight.grad = torch.ones_like(module.unused.weight)  # stale
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    clip_and_accumulate(module, x, y, 1.0)
    assert float(module.unused.weight.grad.abs().sum()) == 0.0
    assert float(module.unused.bias.grad.abs().sum()) == 0.0
    assert float(module.used.weight.grad.abs().sum()) > 0.0
