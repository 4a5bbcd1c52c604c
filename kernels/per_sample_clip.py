"""Fused per-sample gradient clipping for DP-SGD, without per-sample gradients.

For a Linear layer on 2-D inputs, sample i's weight gradient is the outer product
g_i a_iᵀ of the gradient g_i of the loss w.r.t. the layer's output and the layer's input
a_i, so its Frobenius norm is ‖g_i‖·‖a_i‖ and its bias gradient is g_i. One forward that
keeps every Linear's input A_l, and ONE backward that returns the output gradients G_l of
all Linear layers (`torch.autograd.grad` of the summed per-sample loss w.r.t. the Linear
outputs, which never forms a weight gradient), give

    norm_i² = Σ_l ‖g_il‖² (‖a_il‖² + 1 if the layer has a trainable bias),
    c_i     = min(1, C / (norm_i + 1e-6))            (Opacus' formula, so results match),
    W_l.grad = (s ⊙ G_l)ᵀ A_l,   b_l.grad = Σ_i s_i g_il,   s_i = c_i · weight_i,

one extra matmul per layer ("book-keeping" clipping, Bu et al. 2023). Nothing of size
batch × parameters is ever allocated, and there is no second backward (Opacus' ghost
clipping runs two). For the Sequential MLPs the model specs build, the forward and the
backward to G_l are written out by hand instead (`flywheel.kernels.mlp_backward`, no
autograd graph), which is most of the speed on small models. The plain-PyTorch
reference is `flywheel.kernels.reference`; see docs/kernels.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flywheel.kernels.mlp_backward import BATCH_MIXING, forward_backward, mlp_plan

__all__ = [
    "BACKWARDS",
    "LOSSES",
    "check_batch",
    "clip_and_accumulate",
    "forward_with_linear_taps",
    "supports",
    "unsupported_layer",
    "uses_manual_backward",
]

LOSSES = ("cross_entropy",)
CLIP_EPS = 1e-6  # as opacus.optimizers.optimizer.DPOptimizer.clip_and_accumulate
_ONE = torch.ones(())


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def unsupported_layer(module: nn.Module) -> tuple[str, str] | None:
    """(name, reason) of the first layer this kernel cannot clip exactly, or None.

    Supported: any module whose trainable parameters all belong to plain `nn.Linear`
    layers (each called once per forward, on 2-D inputs: checked while running), with
    parameter-free (or frozen) layers in between: activations, `Standardize`, dropout.
    Two Linear layers sharing a trainable parameter (tied weights) are not: that
    parameter's per-sample gradient is a sum of outer products.
    """
    owners: dict[int, str] = {}
    for name, sub in module.named_modules():
        label = name or "<root>"
        if isinstance(sub, BATCH_MIXING):
            return label, f"{type(sub).__name__} mixes the samples of a batch"
        if type(sub) is nn.Linear:
            for p in sub.parameters(recurse=False):
                if p.requires_grad and owners.setdefault(id(p), label) != label:
                    return label, (
                        f"Linear shares a trainable parameter with layer "
                        f"{owners[id(p)]!r} (tied weights)"
                    )
            continue
        if _trainable(sub):
            return label, (
                f"{type(sub).__name__} has trainable parameters and only nn.Linear is supported"
            )
    return None


def supports(module: nn.Module) -> bool:
    """True if `clip_and_accumulate` can handle `module` (else fall back to Opacus).

    A Linear that turns out to be shared or applied to a sequence (3-D input) is only
    detected while running; `clip_and_accumulate` raises ValueError for it then.
    """
    return unsupported_layer(module) is None


def _flat_sequential(
    module: nn.Module,
    prefix: str = "",
) -> tuple[list[nn.Module], list[str]] | None:
    """The layers of a (nested) nn.Sequential in call order, with their dotted names, if
    every one is either a plain Linear or free of Linear layers and trainable parameters;
    else None (then forward hooks find the Linear layers)."""
    if type(module) is not nn.Sequential:  # a subclass may override forward
        return None
    layers: list[nn.Module] = []
    names: list[str] = []
    for name, layer in module._modules.items():  # not named_children: keeps repeats
        if type(layer) is nn.Sequential:
            inner = _flat_sequential(layer, f"{prefix}{name}.")
            if inner is None:
                return None
            layers += inner[0]
            names += inner[1]
        elif type(layer) is nn.Linear or not any(
            type(m) is nn.Linear or _trainable(m) for m in layer.modules()
        ):
            layers.append(layer)
            names.append(f"{prefix}{name}")
        else:
            return None
    return layers, names


def _check_2d(name: str, a: Tensor, batch: int) -> None:
    if a.dim() != 2 or a.shape[0] != batch:
        raise ValueError(
            f"layer {name!r} (Linear) got input of shape {tuple(a.shape)}; the per-sample norm "
            f"identity needs 2-D [batch={batch}, features] inputs: use Opacus for this model"
        )


def _shared(name: str) -> ValueError:
    return ValueError(
        f"layer {name!r} (Linear) is called more than once per forward; its "
        f"per-sample gradient is a sum of outer products, not one: use Opacus "
        f"for this model"
    )


def _forward_sequential(
    layers: list[nn.Module],
    names: list[str],
    x: Tensor,
) -> tuple[Tensor, list[tuple[nn.Linear, Tensor, Tensor]]]:
    """Run the layers; every trainable Linear is computed with detached parameters, so the
    autograd graph holds the activation path only, and its (input, output) are kept."""
    taps: list[tuple[nn.Linear, Tensor, Tensor]] = []
    h = x
    for layer, name in zip(layers, names, strict=True):
        if type(layer) is nn.Linear and _trainable(layer):
            if any(layer is t[0] for t in taps):
                raise _shared(name)
            _check_2d(name, h, x.shape[0])
            bias = None if layer.bias is None else layer.bias.detach()
            z = F.linear(h, layer.weight.detach(), bias)
            if not z.requires_grad:  # the first trainable layer: its input is data
                z.requires_grad_(True)
            taps.append((layer, h.detach(), z))
            h = z
        else:
            h = layer(h)
    return h, taps


def forward_with_linear_taps(
    module: nn.Module,
    x: Tensor,
) -> tuple[Tensor, list[tuple[nn.Linear, Tensor, Tensor]]]:
    """Any module whose trainable layers are Linear: forward hooks keep (input, output) of
    each; a Linear called twice or on non-2-D input raises ValueError (also for Triton)."""
    taps: list[tuple[nn.Linear, Tensor, Tensor]] = []
    seen: set[int] = set()
    handles = []

    def hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def fn(layer: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            if id(layer) in seen:
                raise _shared(name)
            seen.add(id(layer))
            _check_2d(name, inputs[0], x.shape[0])
            taps.append((layer, inputs[0].detach(), out))  # type: ignore[arg-type]

        return fn

    for name, sub in module.named_modules():
        if type(sub) is nn.Linear and _trainable(sub):
            handles.append(sub.register_forward_hook(hook(name)))
    try:
        out = module(x)
    finally:
        for h in handles:
            h.remove()
    return out, taps


Backward = Literal["auto", "manual", "autograd"]
BACKWARDS = ("auto", "manual", "autograd")


def uses_manual_backward(module: nn.Module) -> bool:
    """True if `clip_and_accumulate` computes `module`'s output gradients by hand
    (`flywheel.kernels.mlp_backward`) rather than with autograd: plain Sequential MLPs."""
    return mlp_plan(module) is not None


def check_batch(x: Tensor, y: Tensor, weights: Tensor | None) -> None:
    """One label per row, and weights (if any) one per row in [0, 1]: a larger weight
    would break the per-sample bound C the noise is calibrated to."""
    batch = x.shape[0]
    if y.shape != (batch,):
        raise ValueError(
            f"need one label per row: x has {batch} rows, y has shape {tuple(y.shape)}"
        )
    if weights is not None:
        if weights.shape != (batch,):
            raise ValueError(
                f"need one weight per row: x has {batch} rows, weights have "
                f"shape {tuple(weights.shape)}"
            )
        # min/max propagate NaN, which fails both comparisons
        if batch and not (float(weights.min()) >= 0 and float(weights.max()) <= 1):
            raise ValueError(
                "weights must lie in [0, 1]: a larger weight would break the "
                "per-sample bound C the noise is calibrated to"
            )


def clip_and_accumulate(
    module: nn.Module,
    x: Tensor,
    y: Tensor,
    max_grad_norm: float,
    *,
    weights: Tensor | None = None,
    loss: str = "cross_entropy",
    return_loss: bool = False,
    accumulate: bool = False,
    backward: Backward = "auto",
) -> Tensor | tuple[Tensor, float]:
    """Set `p.grad` of every trainable parameter to Σ_i weight_i · clip_C(∇ℓ_i); return ‖∇ℓ_i‖.

    ℓ_i is sample i's cross-entropy loss, clip_C scales a gradient to norm ≤ C exactly
    as Opacus does (factor min(1, C / (‖∇ℓ_i‖ + 1e-6)), norm over all trainable
    parameters together). Grads are overwritten, or with `accumulate=True` added to the
    `p.grad` already there (as `.backward()` does). No noise is added and nothing is
    averaged: the caller adds N(0, σ²C²) and divides by the batch size B, or, cheaper,
    draws N(0, σ²C²/B²) into the grads first and passes weights already divided by B
    with `accumulate=True` (no extra pass over the parameters).

    `weights` (one per sample, in [0, 1]) multiply each clipped gradient AFTER clipping,
    so a sample's contribution stays ≤ weight_i · C ≤ C and the sensitivity the noise is
    calibrated to holds. (Weighting the loss before clipping would be undone by the clip
    for every sample whose gradient is clipped, and a weight > 1 would break the bound.)

    `backward`: how the per-layer output gradients are obtained. "auto" (default) uses
    the hand-written MLP backward (`flywheel.kernels.mlp_backward`, no autograd graph:
    several times less overhead on small models) when `uses_manual_backward(module)`,
    else one `torch.autograd.grad`; "manual" insists on the former (ValueError if the
    module is not a plain MLP), "autograd" forces the latter. Both give the same result.

    Returns the per-sample gradient norms before clipping (and before weighting),
    detached, shape [batch]. Raises ValueError naming the layer for a module this kernel
    cannot clip exactly (see `supports`); the caller can fall back to Opacus then.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r} is not supported; choose from {', '.join(LOSSES)}")
    if backward not in BACKWARDS:
        raise ValueError(f"backward {backward!r} is not one of {', '.join(BACKWARDS)}")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
    plan = None if backward == "autograd" else mlp_plan(module)
    if plan is None:
        if backward == "manual":
            raise ValueError(
                "backward='manual' needs an nn.Sequential MLP of nn.Linear and "
                "the activations in flywheel.kernels.mlp_backward.ACTIVATIONS"
            )
        bad = unsupported_layer(module)  # a plan implies supports(module)
        if bad is not None:
            raise ValueError(
                f"clip_and_accumulate cannot handle layer {bad[0]!r}: {bad[1]}; "
                f"use Opacus (grad_sample_mode='ghost' or 'hooks') for this model"
            )
    check_batch(x, y, weights)
    batch = x.shape[0]

    flat = None
    if plan is not None:
        parts, total = forward_backward(plan, x, y, need_loss=return_loss)
    else:
        flat = _flat_sequential(module)
        parts, total = _autograd_taps(module, flat, x, y)

    with torch.no_grad():
        # norm_i² = Σ_l ‖g_il‖² (‖a_il‖² + 1 if the bias trains). Row norms by
        # vector_norm, which allocates no [batch, width] temporary (vecdot does).
        sq: Tensor | None = None
        for layer, a, g in parts:
            t = torch.linalg.vector_norm(g, dim=1)
            if layer.weight.requires_grad:
                a_norm = torch.linalg.vector_norm(a, dim=1)
                t.mul_(a_norm.hypot_(_ONE.to(a_norm.dtype)) if _bias_trains(layer) else a_norm)
            sq = t.mul_(t) if sq is None else sq.addcmul_(t, t)
        assert sq is not None
        norms = sq.sqrt_()
        scale = (norms + CLIP_EPS).reciprocal_().mul_(max_grad_norm).clamp_(max=1.0)
        if weights is not None:
            scale.mul_(weights.to(scale.dtype))
        # W.grad = Gᵀ diag(s) A: one matmul per layer; b.grad = Gᵀ s. The hand-written
        # backward's G are its own: scaled in place (no temporary); autograd's may be
        # views, so the scale goes on a copy of the narrower of G and A.
        column = scale.unsqueeze(1)
        for layer, a, g in parts:
            weight, bias = layer.weight, layer.bias
            if bias is not None and bias.requires_grad:
                if accumulate and bias.grad is not None:
                    bias.grad.addmv_(g.t(), scale)
                else:
                    bias.grad = torch.mv(g.t(), scale)
            if not weight.requires_grad:
                continue
            if plan is not None:
                lhs, rhs = g.mul_(column), a
            elif a.shape[1] < g.shape[1]:
                lhs, rhs = g, a * column
            else:
                lhs, rhs = g * column, a
            if accumulate and weight.grad is not None:
                weight.grad.addmm_(lhs.t(), rhs)
            else:
                weight.grad = torch.mm(lhs.t(), rhs)
        if plan is None and flat is None:  # a Linear the forward never called: zero grad
            called = {id(layer) for layer, _, _ in parts}
            for sub in module.modules():
                if type(sub) is nn.Linear and id(sub) not in called:
                    for p in sub.parameters():
                        if p.requires_grad and not (accumulate and p.grad is not None):
                            p.grad = torch.zeros_like(p)
    if return_loss:  # the mean loss the forward already computed (callers log it)
        assert total is not None
        return norms, float(total) / max(batch, 1)
    return norms


def _autograd_taps(
    module: nn.Module,
    flat: tuple[list[nn.Module], list[str]] | None,
    x: Tensor,
    y: Tensor,
) -> tuple[list[tuple[nn.Linear, Tensor, Tensor]], Tensor]:
    """One forward keeping each trainable Linear's (input, output), then ONE
    `torch.autograd.grad` of the summed loss w.r.t. those outputs: [(layer, A, G)]."""
    with torch.enable_grad():
        if flat is not None:
            out, taps = _forward_sequential(*flat, x)
        else:
            out, taps = forward_with_linear_taps(module, x)
        if not taps:
            raise ValueError("module has no trainable nn.Linear parameters to clip")
        total = F.cross_entropy(out, y, reduction="sum")
        grads = torch.autograd.grad(total, [z for _, _, z in taps], allow_unused=True)
    parts = [
        (layer, a, torch.zeros_like(z) if g is None else g)  # output unused by the loss
        for (layer, a, z), g in zip(taps, grads, strict=True)
    ]
    return parts, total.detach()


def _bias_trains(layer: nn.Linear) -> bool:
    return layer.bias is not None and layer.bias.requires_grad
