"""One DP-SGD update: Poisson-sampled sources, per-example clipping, Gaussian noise.

The privacy unit is the *source* (the client id on a correction; an example without one
is its own source). Each step samples every source independently with probability q,
clips each sampled example's gradient to C and scales it by its weight (≤ 1) over
max(1, the sum of that source's weights in the update), so one source moves the summed
gradient by at most C; Gaussian noise of std σ·C is added to the sum. That is exactly the
Poisson-subsampled Gaussian mechanism per source, which `accounting` composes.

Public rows (the platform's own seed data, `public=True`) join every step unsampled and
are not accounted: they carry no one's private data.

A `Companion` (the learner's background line, learner/background.py) trains in the same
steps at no extra privacy cost: each example's gradient is taken for both models at once,
the concatenation is clipped to C as one vector and the one noise draw covers both, so a
source still moves the released sum by at most C and the step is the same
Poisson-subsampled Gaussian mechanism the accountant composes. The price is signal, not ε:
the two models share each example's norm C.

Two engines compute the clipped sum: "opacus" takes per-example gradients from Opacus'
`GradSampleModule` (hooks); "fused" uses `flywheel.kernels.clip_and_accumulate`, which
never materialises them. Noise is always added here, by one code path, so no engine can
train without it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

Engine = Literal["opacus", "fused", "auto"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivateBatch:
    """The examples one update may use. `sources` are small ints, one per distinct source."""

    x: np.ndarray
    y: np.ndarray
    weight: np.ndarray
    sources: np.ndarray  # int64, -1 for public rows
    public: np.ndarray  # bool

    def __post_init__(self) -> None:
        n = len(self.y)
        if not (len(self.x) == len(self.weight) == len(self.sources) == len(self.public) == n):
            raise ValueError("x, y, weight, sources and public must have the same length")
        if n and (self.weight.min() < 0 or self.weight.max() > 1):
            raise ValueError(
                "DP example weights must be in [0, 1]: a larger weight would let "
                "one example exceed the clip norm"
            )

    @property
    def n_sources(self) -> int:
        return int(len(np.unique(self.sources[~self.public])))


@dataclass(frozen=True)
class Companion:
    """A second model trained in the same DP steps, jointly clipped (see the module docstring).

    `rows` says which of the batch's rows it learns from (the background line: the private
    rows since its warning; public rows of the old concept are left out); its gradient on the
    others is zero, which the joint clip and the noise cover all the same.

    >>> import numpy as np, torch
    >>> from torch import nn
    >>> m, c = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> batch = PrivateBatch(
    ...     x=np.ones((4, 2), np.float32), y=np.array([0, 1, 0, 1]),
    ...     weight=np.ones(4, np.float32), sources=np.arange(4), public=np.zeros(4, bool))
    >>> before = c.weight.detach().clone()
    >>> _ = dp_update(
    ...     m, torch.optim.SGD(m.parameters(), lr=0.1), batch, steps=1, sample_rate=1.0,
    ...     noise_multiplier=0.0, max_grad_norm=1.0, generator=torch.Generator().manual_seed(0),
    ...     companion=Companion(c, torch.optim.SGD(c.parameters(), lr=0.1), np.ones(4, bool)))
    >>> bool((c.weight != before).any())
    True
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    rows: np.ndarray  # bool, one per batch row


class _Joint(nn.Module):
    """Both models' logits side by side, so one per-example gradient covers both."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first(x), self.second(x)], dim=1)


@dataclass(frozen=True)
class DPStepStats:
    steps: int
    sampled_sources: float  # mean per step
    clipped_share: float  # share of private example gradients that were clipped
    loss: float
    engine: str


def source_scale(w: torch.Tensor, src: torch.Tensor, public: torch.Tensor) -> torch.Tensor:
    """Each row's factor on its clipped gradient: a public row its weight; a private row
    its weight over max(1, the summed weights of its source's rows in the update), so one
    source's clipped contribution sums to at most C and keeps its rows' relative weights.

    Over the weight sum, not the row count: a correction (weight 1) with six derived
    counterexamples (0.5 each) used to add at most 4/7 C of the C its unit is accounted
    for; now the full C (the demo's units carry ~6 rows, `docs/privacy.md`). A source whose
    weights sum to under 1 is not scaled up.

    >>> w = torch.tensor([1.0, 0.5, 0.5, 1.0, 0.25, 1.0])
    >>> src = torch.tensor([0, 0, 0, 1, 2, -1])
    >>> pub = torch.tensor([False, False, False, False, False, True])
    >>> source_scale(w, src, pub).tolist()
    [0.5, 0.25, 0.25, 1.0, 0.25, 1.0]
    """
    private = ~public
    per_source = torch.zeros(int(src.max().item()) + 1 if len(src) else 0)
    if bool(private.any()):
        per_source.index_add_(0, src[private], w[private].to(per_source.dtype))
    return torch.where(public, w, w / per_source[src.clamp_min(0)].clamp_min(1.0))


def resolve_engine(engine: Engine, module: nn.Module) -> str:
    """ "auto" takes the fused kernel when it supports every layer, else Opacus."""
    if engine != "auto":
        return engine
    try:
        from flywheel.kernels import supports
    except ImportError:
        return "opacus"
    return "fused" if supports(module) else "opacus"


def dp_update(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: PrivateBatch,
    *,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator,
    engine: Engine = "auto",
    between_steps: Callable[[], None] | None = None,
    companion: Companion | None = None,
) -> DPStepStats:
    """`steps` DP-SGD steps on `batch`; the caller accounts (sample_rate, σ, steps).

    `between_steps` is called before each step; what it raises abandons the update (the
    learner's stop and lost lease: the module is then half-trained and must be thrown away).
    `companion` trains a second model in the same steps at the same privacy cost (jointly
    clipped; Opacus computes the per-example gradients then).
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if noise_multiplier < 0 or max_grad_norm <= 0:
        raise ValueError("noise_multiplier must be >= 0 and max_grad_norm > 0")
    outer = module
    mask: torch.Tensor | None = None
    if companion is not None:
        if len(companion.rows) != len(batch.y):
            raise ValueError("a companion's rows must mark every row of the batch")
        outer = _Joint(module, companion.module)
        mask = torch.from_numpy(np.asarray(companion.rows, bool))
        engine = "opacus"  # the fused kernel clips one plain model
    engine_name = resolve_engine(engine, outer)
    x = torch.from_numpy(np.asarray(batch.x, np.float32))
    y = torch.from_numpy(np.asarray(batch.y, np.int64))
    w = torch.from_numpy(np.asarray(batch.weight, np.float32))
    public = torch.from_numpy(np.asarray(batch.public, bool))
    src = torch.from_numpy(np.asarray(batch.sources, np.int64))
    private_ids = torch.unique(src[~public])
    scale = source_scale(w, src, public)
    expected = sample_rate * len(private_ids) + int(public.sum())
    params = [p for p in outer.parameters() if p.requires_grad]
    optimizers = [optimizer] if companion is None else [optimizer, companion.optimizer]
    # Every step: (Σ_i w_i·clip(∇ℓ_i) + N(0, σ²C²)) / E, computed as Σ_i (w_i/E)·clip(∇ℓ_i)
    # + N(0, σ²C²/E²): one draw for every parameter into one buffer, and the fused kernel
    # adds the clipped sum straight onto it (no further pass over the parameters).
    sizes = [p.numel() for p in params]
    noise = torch.empty(sum(sizes), dtype=params[0].dtype if params else None)
    noise_views = [v.view_as(p) for v, p in zip(noise.split(sizes), params, strict=True)]
    divisor = max(expected, 1.0)

    def draw_noise() -> None:  # noise is added on every step, sampled or not
        if noise_multiplier > 0:
            noise.normal_(0.0, noise_multiplier * max_grad_norm / divisor, generator=generator)
        else:
            noise.zero_()

    outer.train()
    sampled_total, clipped, counted, loss_sum = 0, 0, 0, 0.0
    for _ in range(steps):
        if between_steps is not None:
            between_steps()
        chosen = private_ids[torch.rand(len(private_ids), generator=generator) < sample_rate]
        take = public | torch.isin(src, chosen)
        sampled_total += len(chosen)
        rows = take.nonzero().squeeze(1)
        draw_noise()
        onto_noise = engine_name == "fused" or not len(rows)
        if onto_noise:
            for p, v in zip(params, noise_views, strict=True):
                p.grad = v
        if len(rows):
            try:
                norms, loss = clipped_sum(
                    outer,
                    params,
                    x[rows],
                    y[rows],
                    scale[rows] / divisor,
                    max_grad_norm,
                    engine_name,
                    second_rows=None if mask is None else mask[rows],
                )
            except ValueError as exc:
                # a refusal only the run can reveal (a Linear called twice, a sequence
                # input): under "auto", Opacus takes over for the rest of the update
                if engine != "auto" or engine_name != "fused":
                    raise
                log.warning(
                    "the fused clipping kernel refused this model (%s); "
                    "using Opacus for this update",
                    exc,
                )
                engine_name, onto_noise = "opacus", False
                draw_noise()  # fresh: the refused call may have touched the buffer
                for p in params:
                    p.grad = None
                norms, loss = clipped_sum(
                    module,
                    params,
                    x[rows],
                    y[rows],
                    scale[rows] / divisor,
                    max_grad_norm,
                    engine_name,
                )
            private_rows = ~public[rows]
            clipped += int((norms[private_rows] > max_grad_norm).sum())
            counted += int(private_rows.sum())
            loss_sum += loss
        if not onto_noise:  # Opacus set fresh grads
            torch._foreach_add_([_grad(p) for p in params], noise_views)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    outer.eval()
    return DPStepStats(
        steps, sampled_total / steps, clipped / max(counted, 1), loss_sum / steps, engine_name
    )


def clipped_sum(
    module: nn.Module,
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    max_grad_norm: float,
    engine: str,
    second_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Σ_i scale_i · clip_C(∇ℓ_i) into p.grad (fused: added to the grads there, the noise;
    opacus: set); returns per-example norms and the mean loss.

    `second_rows` (a `_Joint` module, Opacus only): ℓ_i is the first model's loss plus,
    where it is True, the second's; the norm clipped is that of both gradients together."""
    if engine == "fused":
        if second_rows is not None:
            raise ValueError("the fused kernel clips one model; a companion needs Opacus")
        from flywheel.kernels import clip_and_accumulate

        norms, loss = clip_and_accumulate(
            module, x, y, max_grad_norm, weights=scale, return_loss=True, accumulate=True
        )
        return norms, loss
    if engine != "opacus":
        raise ValueError(f"unknown DP engine {engine!r}; expected opacus, fused or auto")
    return _opacus_clipped_sum(module, params, x, y, scale, max_grad_norm, second_rows)


def _opacus_clipped_sum(
    module: nn.Module,
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    max_grad_norm: float,
    second_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    from opacus import GradSampleModule

    gsm = GradSampleModule(module, batch_first=True, loss_reduction="sum")
    try:
        for p in params:
            p.grad = None
            _drop_grad_sample(p)
        out = gsm(x)
        if second_rows is None:
            losses = nn.functional.cross_entropy(out, y, reduction="none")
            total = losses
        else:  # a _Joint: the first model's logits, then the second's
            k = out.shape[1] // 2
            losses = nn.functional.cross_entropy(out[:, :k], y, reduction="none")
            second = nn.functional.cross_entropy(out[:, k:], y, reduction="none")
            total = losses + second * second_rows.to(second.dtype)
        with warnings.catch_warnings():  # inputs need no grad: Opacus' hooks still fire right
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            total.sum().backward()
        grads = [_grad_sample(p).reshape(len(y), -1) for p in params]
        norms = torch.cat(grads, dim=1).norm(dim=1)
        factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * scale
        for p, g in zip(params, grads, strict=True):
            p.grad = (factor @ g).reshape(p.shape)
            _drop_grad_sample(p)
    finally:
        gsm.remove_hooks()  # the module is ours again
        for p in params:
            _drop_grad_sample(p)
    return norms.detach(), float(losses.mean().detach())


def _grad(p: nn.Parameter) -> torch.Tensor:
    """`p.grad`, which every step sets (the noise, or Opacus' clipped sum) before it is read."""
    if p.grad is None:
        raise RuntimeError("a parameter has no gradient after the clipped sum")
    return p.grad


_GRAD_SAMPLE = "grad_sample"  # the attribute Opacus adds to each parameter; torch's stubs lack it


def _grad_sample(p: nn.Parameter) -> torch.Tensor:
    """Opacus' per-example gradients of `p` (one row per example)."""
    sample = getattr(p, _GRAD_SAMPLE, None)
    if not isinstance(sample, torch.Tensor):
        raise RuntimeError("Opacus computed no per-example gradient for a parameter")
    return sample


def _drop_grad_sample(p: nn.Parameter) -> None:
    setattr(p, _GRAD_SAMPLE, None)
