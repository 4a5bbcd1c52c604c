"""Fused per-sample clipping (`flywheel.kernels.clip_and_accumulate`) against Opacus 1.6
hooks mode and the torch.func reference, over many random models, batches and clip norms.

hypothesis is not installed, so the property tests draw their cases from seeded
generators: every activation, depths 0-3, widths 1-40, batch sizes 1-64, clip norms that
clip every sample, some of them, or none. Opacus is set up with loss_reduction="sum" (and
noise 0), so its `p.grad` after `pre_step()` is the sum of the clipped per-sample
gradients, the same quantity the kernel produces; one test checks the "mean" set-up too.
"""

from __future__ import annotations

import functools
import random
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flywheel.kernels import clip_and_accumulate, supports, uses_manual_backward
from flywheel.kernels.mlp_backward import ACTIVATIONS as MANUAL_ACTIVATIONS
from flywheel.kernels.per_sample_clip import unsupported_layer
from flywheel.kernels.reference import per_sample_clip_reference, per_sample_grads
from flywheel.modelspec import ModelSpec, Standardize, build_model

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

    def build(
        self, dtype: torch.dtype = torch.float32
    ) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
        torch.manual_seed(self.seed)
        spec = ModelSpec(
            input_dim=self.input_dim,
            hidden=list(self.hidden),
            labels=[f"c{i}" for i in range(self.n_labels)],
            activation=self.activation,
        )  # type: ignore[arg-type]
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
        out.append(
            Case(
                seed=rng.randrange(10**6),
                input_dim=rng.choice((1, 3, 8, 20)),
                hidden=tuple(rng.choice((1, 4, 16, 40)) for _ in range(depth)),
                n_labels=rng.choice((2, 3, 5)),
                activation=ACTIVATIONS[i % 3],
                batch=rng.choice((1, 1, 2, 7, 33, 64)),
                clip=CLIP_MODES[(i // 3) % 3],
            )
        )
    return out


def clip_norm(norms: torch.Tensor, mode: str) -> float:
    if mode == "all":
        return float(norms.min()) * 0.5
    if mode == "none":
        return float(norms.max()) * 2.0 + 1e-3
    return float(norms.median()) if len(norms) > 1 else float(norms[0]) * 0.5


def opacus_hooks_grads(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float, reduction: str = "sum"
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Opacus 1.6 `make_private(grad_sample_mode="hooks")`, noise 0: ({name: p.grad}, the
    per-sample norms Opacus clips by, from its own grad samples)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure RNG and accountant notices
        gsm, dp_opt, _ = PrivacyEngine().make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=c,
            loss_reduction=reduction,
            poisson_sampling=False,
            grad_sample_mode="hooks",
        )
    dp_opt.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full backward hook on a first layer without input grad
        F.cross_entropy(gsm(x), y, reduction=reduction).backward()
    samples = [p.grad_sample.reshape(len(x), -1) for p in module.parameters() if p.requires_grad]
    norms = torch.cat(samples, dim=1).norm(2, dim=1)
    assert dp_opt.pre_step()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    gsm._close()
    return grads, norms


def ours(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    c: float,
    weights: torch.Tensor | None = None,
    backward: str = "auto",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    for p in module.parameters():
        p.grad = None
    norms = clip_and_accumulate(module, x, y, c, weights=weights, backward=backward)  # type: ignore[arg-type]
    return {
        n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad
    }, norms


def assert_grads_close(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float
) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}"
        )


# -- equal to Opacus hooks mode and to the reference -------------------------------------
@pytest.mark.parametrize("backward", ["manual", "autograd"])
@pytest.mark.parametrize("case", cases(48, seed=1), ids=repr)
def test_clipped_sum_equals_opacus_hooks_float32(case: Case, backward: str):
    """Both ways of getting the output gradients: by hand (what "auto" picks for these
    models) and with autograd (the fallback for other modules)."""
    module, x, y = case.build()
    assert uses_manual_backward(module)
    _, ref_norms = per_sample_clip_reference(module, x, y, 1.0)
    c = clip_norm(ref_norms, case.clip)
    want, opacus_norms = opacus_hooks_grads(build_copy(module), x, y, c)
    got, norms = ours(module, x, y, c, backward=backward)
    assert_grads_close(got, want, 1e-5)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norms, opacus_norms, rtol=1e-5, atol=1e-5)
    clipped = norms > c
    assert {
        "all": clipped.all(),
        "none": ~clipped.any(),
        "some": clipped.any() & ~clipped.all() if case.batch > 2 else clipped.any(),
    }[case.clip]


@pytest.mark.parametrize("backward", ["manual", "autograd"])
@pytest.mark.parametrize("case", cases(24, seed=2), ids=repr)
def test_clipped_sum_and_norms_equal_reference_float64(case: Case, backward: str):
    module, x, y = case.build(torch.float64)
    _, ref_norms = per_sample_clip_reference(module, x, y, 1.0)
    c = clip_norm(ref_norms, case.clip)
    want, want_norms = per_sample_clip_reference(module, x, y, c)
    got, norms = ours(module, x, y, c, backward=backward)
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
        grads, norms = ours(module, x[i : i + 1], y[i : i + 1], 0.05)
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
    weights = torch.rand(
        case.batch, generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64
    )
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
    module = (
        nn.Sequential(nn.Sequential(nn.Linear(5, 7), nn.GELU()), nn.Dropout(0.5), nn.Linear(7, 3))
        .double()
        .eval()
    )
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    want, want_norms = per_sample_clip_reference(module, x, y, 0.3)
    got, norms = ours(module, x, y, 0.3)
    assert_grads_close(got, want, 1e-10)
    torch.testing.assert_close(norms, want_norms)


# -- what it refuses ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer,name",
    [
        (nn.LayerNorm(8), "LayerNorm"),
        (nn.BatchNorm1d(8, affine=False), "BatchNorm1d"),
        (nn.PReLU(), "PReLU"),
        (nn.Bilinear(8, 8, 8), "Bilinear"),
    ],
)
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
        spec = ModelSpec(input_dim=8, hidden=[64, 64], labels=["a", "b"], activation=act)  # type: ignore[arg-type]
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


# -- the hand-written MLP backward against the autograd one -------------------------------
# Every activation the hand-written path knows, each as a fresh-module factory.
MANUAL_ACTS: dict[str, type[nn.Module] | functools.partial[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "leaky_relu_0.3": functools.partial(nn.LeakyReLU, 0.3),
}


def test_every_known_activation_is_tested():
    assert {type(f()) for f in MANUAL_ACTS.values()} == set(MANUAL_ACTIVATIONS)


def random_mlp(
    seed: int, act: str, dtype: torch.dtype
) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """A random Sequential MLP the hand-written path accepts: Standardize or not, 1-4
    Linear layers (some without bias, some partly or wholly frozen), Identity and eval
    Dropout in between, a nested Sequential, sometimes an activation after the last Linear."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    make = MANUAL_ACTS[act]
    dim, classes, batch = rng.choice((1, 5, 12)), rng.choice((2, 3, 7)), rng.choice((1, 3, 40))
    widths = [dim, *(rng.choice((1, 6, 24)) for _ in range(rng.randrange(4))), classes]
    layers: list[nn.Module] = []
    if rng.random() < 0.5:
        std = Standardize(dim)
        std.scale.fill_(2.0)
        layers.append(std)
    last = len(widths) - 2
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        linear = nn.Linear(a, b, bias=rng.random() < 0.8)
        frozen = rng.random() if i < last else 1.0  # the last layer's weight trains
        if i and frozen < 0.15:
            linear.requires_grad_(False)
        elif frozen < 0.3:
            linear.weight.requires_grad_(False)
        block: list[nn.Module] = [linear]
        if i < last or rng.random() < 0.3:
            block.append(make())
        if rng.random() < 0.3:
            block.append(rng.choice((nn.Identity(), nn.Dropout(0.4).eval())))
        if rng.random() < 0.3:
            layers.append(nn.Sequential(*block))
        else:
            layers += block
    module = nn.Sequential(*layers).to(dtype)
    x = (torch.randn(batch, dim) * 2).to(dtype)
    return module, x, torch.randint(0, classes, (batch,))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("act", list(MANUAL_ACTS))
def test_manual_backward_equals_autograd_and_reference(act: str, seed: int):
    module, x, y = random_mlp(seed * 31 + len(act), act, torch.float64)
    assert uses_manual_backward(module)
    weights = torch.rand(len(x), dtype=torch.float64)
    _, ref_norms = per_sample_clip_reference(module, x, y, 1.0)
    c = max(float(ref_norms.median()), 1e-3)  # some samples clipped, some not
    manual, manual_norms = ours(module, x, y, c, weights, backward="manual")
    _, manual_loss = clip_and_accumulate(
        module, x, y, c, weights=weights, return_loss=True, backward="manual"
    )  # type: ignore[misc]
    auto, auto_norms = ours(module, x, y, c, weights, backward="autograd")
    _, auto_loss = clip_and_accumulate(
        module, x, y, c, weights=weights, return_loss=True, backward="autograd"
    )  # type: ignore[misc]
    want, want_norms = per_sample_clip_reference(module, x, y, c, weights=weights)
    assert_grads_close(manual, auto, 1e-12)
    assert_grads_close(manual, want, 1e-10)
    torch.testing.assert_close(manual_norms, auto_norms, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(manual_norms, want_norms, rtol=1e-10, atol=1e-10)
    assert manual_loss == pytest.approx(auto_loss, rel=1e-12)
    with torch.no_grad():
        assert manual_loss == pytest.approx(float(F.cross_entropy(module(x), y)), rel=1e-12)


@pytest.mark.parametrize("act", list(MANUAL_ACTS))
def test_manual_backward_float32_equals_opacus_hooks(act: str):
    """Activations beyond the specs' three, in float32, against Opacus hooks mode."""
    module, x, y = random_mlp(100 + len(act), act, torch.float32)
    assert uses_manual_backward(module)
    _, ref_norms = per_sample_clip_reference(module, x, y, 1.0)
    c = max(float(ref_norms.median()), 1e-3)
    want, _ = opacus_hooks_grads(build_copy(module), x, y, c)
    got, _ = ours(module, x, y, c, backward="manual")
    assert_grads_close(got, want, 1e-5)


class ReLUSubclass(nn.ReLU):
    """A subclass may change forward: the hand-written path must not assume it is ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2


class SequentialSubclass(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) * 0.5


class Wrapped(nn.Module):
    """A non-Sequential container around a Linear: the hand-written path does not look in."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _fallback_models() -> list[tuple[str, nn.Module]]:
    frozen_norm = nn.LayerNorm(6)
    frozen_norm.requires_grad_(False)
    return [
        ("not a Sequential", Residual()),
        ("Sequential subclass", SequentialSubclass(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4))),
        ("ReLU subclass", nn.Sequential(nn.Linear(6, 6), ReLUSubclass(), nn.Linear(6, 4))),
        ("unknown activation", nn.Sequential(nn.Linear(6, 6), nn.Softplus(), nn.Linear(6, 4))),
        ("frozen LayerNorm", nn.Sequential(nn.Linear(6, 6), frozen_norm, nn.Linear(6, 4))),
        (
            "Linear in a container",
            nn.Sequential(nn.Linear(6, 12), nn.Tanh(), Wrapped(), nn.Linear(12, 4)),
        ),
    ]


@pytest.mark.parametrize(
    "name,module", _fallback_models(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_unknown_modules_fall_back_to_autograd(name: str, module: nn.Module):
    module = module.double()
    torch.manual_seed(15)
    x, y = torch.randn(11, 6, dtype=torch.float64), torch.randint(0, 4, (11,))
    assert supports(module) and not uses_manual_backward(module)
    want, want_norms = per_sample_clip_reference(module, x, y, 0.4)
    got, norms = ours(module, x, y, 0.4)  # auto: the autograd path
    assert_grads_close(got, want, 1e-10)
    torch.testing.assert_close(norms, want_norms)
    with pytest.raises(ValueError, match="backward='manual' needs"):
        clip_and_accumulate(module, x, y, 0.4, backward="manual")


def test_dropout_in_training_mode_uses_autograd():
    module = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))
    assert not uses_manual_backward(module)
    assert uses_manual_backward(module.eval())
    module[2].p = 0.0
    assert uses_manual_backward(module.train())  # p = 0 is the identity


def test_shared_linear_in_a_sequential_is_left_to_autograd_which_refuses_it():
    shared = nn.Linear(6, 6)
    module = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(6, 2))
    assert not uses_manual_backward(module)
    frozen = nn.Linear(6, 6).requires_grad_(False)  # a shared frozen Linear is fine
    assert uses_manual_backward(
        nn.Sequential(nn.Linear(6, 6), frozen, nn.ReLU(), frozen, nn.Linear(6, 2))
    )


def test_tied_weights_are_refused_on_both_paths():
    """Two Linears sharing a trainable weight: its per-sample gradient is a sum of two
    outer products, so the norm identity does not hold; Opacus must do it."""
    first, second = nn.Linear(6, 6), nn.Linear(6, 6)
    second.weight = first.weight
    module = nn.Sequential(first, nn.Tanh(), second, nn.Linear(6, 2))
    assert not supports(module) and not uses_manual_backward(module)
    with pytest.raises(ValueError, match=r"layer '2'.*tied weights.*Opacus"):
        clip_and_accumulate(module, torch.randn(3, 6), torch.randint(0, 2, (3,)), 1.0)
    first.weight.requires_grad_(False)  # a tied frozen weight is only data
    assert supports(module) and uses_manual_backward(module)


def test_manual_path_refuses_inputs_that_are_not_2d():
    module = nn.Sequential(nn.Unflatten(1, (2, 4)), nn.Linear(4, 3))
    assert uses_manual_backward(module)
    with pytest.raises(ValueError, match=r"layer '1'.*2-D"):
        clip_and_accumulate(module, torch.randn(5, 8), torch.randint(0, 3, (5,)), 1.0)
    with pytest.raises(ValueError, match=r"layer '0'.*2-D"):
        clip_and_accumulate(
            nn.Sequential(nn.Linear(4, 3)), torch.randn(5, 2, 4), torch.randint(0, 3, (5,)), 1.0
        )


def test_unknown_backward_is_refused():
    module, x, y = Case(16, 8, (4,), 3, "relu", 4, "some").build()
    with pytest.raises(ValueError, match="backward 'fast'"):
        clip_and_accumulate(module, x, y, 1.0, backward="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("backward", ["manual", "autograd"])
def test_accumulate_adds_to_the_grads_already_there(backward: str):
    module, x, y = Case(17, 8, (16, 16), 3, "gelu", 20, "some").build(torch.float64)
    clipped, _ = ours(module, x, y, 0.3, backward=backward)
    start = {n: torch.randn_like(p) for n, p in module.named_parameters()}
    for n, p in module.named_parameters():
        p.grad = start[n].clone()
    module[1].bias.grad = None  # no grad yet: set, as without accumulate
    clip_and_accumulate(module, x, y, 0.3, accumulate=True, backward=backward)  # type: ignore[arg-type]
    for n, p in module.named_parameters():
        want = clipped[n] if n == "1.bias" else start[n] + clipped[n]
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-12)


def test_accumulate_through_the_hooked_path_keeps_unused_grads():
    module = Residual().double()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 4, (7,))
    clipped, _ = ours(module, x, y, 0.3)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    clip_and_accumulate(module, x, y, 0.3, accumulate=True)
    for n, p in module.named_parameters():
        torch.testing.assert_close(p.grad, clipped[n] + 1)


# -- privacy/dp_sgd.py's use of the kernel (noise drawn first, clipped sum added onto it) --
@pytest.mark.parametrize("engine", ["fused", "opacus"])
@pytest.mark.parametrize("sample_rate,divisor", [(0.5, 20.0), (1e-9, 1.0)])
def test_dp_update_gradient_noise_has_std_sigma_c_over_the_expected_batch(
    engine: str, sample_rate: float, divisor: float
):
    """Each step's gradient is (Σ clipped + N(0, σ²C²)) / max(E, 1), E = q · sources: with
    σ huge the update is the noise, whose std must be σC / max(E, 1) exactly as before the
    kernel started adding the clipped sum onto a pre-drawn noise buffer (sample_rate 1e-9:
    no row is sampled, the update is the noise alone)."""
    import numpy as np

    from flywheel.privacy.dp_sgd import PrivateBatch, dp_update

    torch.manual_seed(18)
    module = build_model(ModelSpec(input_dim=16, hidden=[640], labels=list("abcd")))
    before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    rng = np.random.default_rng(0)
    batch = PrivateBatch(
        x=rng.normal(size=(40, 16)).astype(np.float32),
        y=rng.integers(0, 4, 40),
        weight=np.ones(40, np.float32),
        sources=np.arange(40),
        public=np.zeros(40, bool),
    )
    sigma, clip = 1000.0, 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_update(
            module,
            torch.optim.SGD(module.parameters(), lr=1.0),
            batch,
            steps=1,
            sample_rate=sample_rate,
            noise_multiplier=sigma,
            max_grad_norm=clip,
            generator=torch.Generator().manual_seed(1),
            engine=engine,
        )  # type: ignore[arg-type]
    step = before - torch.cat([p.detach().flatten() for p in module.parameters()])
    want = sigma * clip / divisor
    assert float(step.std()) == pytest.approx(want, rel=0.03)  # 13,444 values: 0.6 % s.e.
    assert abs(float(step.mean())) < 4 * want / len(step) ** 0.5
