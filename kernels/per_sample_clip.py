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
clipping runs two). The plain-PyTorch reference is `flywheel.kernels.reference`; see
docs/kernels.md.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["LOSSES", "clip_and_accumulate", "supports", "unsupported_layer"]

LOSSES = ("cross_entropy",)
CLIP_EPS = 1e-6  # as opacus.optimizers.optimizer.DPOptimizer.clip_and_accumulate

# Layers that mix samples in training mode: no per-sample gradient exists at all.
_BATCH_MIXING = (nn.modules.batchnorm._BatchNorm,)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def unsupported_layer(module: nn.Module) -> tuple[str, str] | None:
    """(name, reason) of the first layer this kernel cannot clip exactly, or None.

    Supported: any module whose trainable parameters all belong to plain `nn.Linear`
    layers (each called once per forward, on 2-D inputs: checked while running), with
    parameter-free (or frozen) layers in between: activations, `Standardize`, dropout.
    """
    for name, sub in module.named_modules():
        label = name or "<root>"
        if isinstance(sub, _BATCH_MIXING):
            return label, f"{type(sub).__name__} mixes the samples of a batch"
        if type(sub) is nn.Linear:
            continue
        if _trainable(sub):
            return label, (f"{type(sub).__name__} has trainable parameters and only "
                           f"nn.Linear is supported")
    return None


def supports(module: nn.Module) -> bool:
    """True if `clip_and_accumulate` can handle `module` (else fall back to Opacus).

    A Linear that turns out to be shared or applied to a sequence (3-D input) is only
    detected while running; `clip_and_accumulate` raises ValueError for it then.
    """
    return unsupported_layer(module) is None


def _flat_sequential(module: nn.Module, prefix: str = "",
                     ) -> tuple[list[nn.Module], list[str]] | None:
    """The layers of a (nested) nn.Sequential in call order, with their dotted names, if
    every one is either a plain Linear or free of Linear layers and trainable parameters;
    else None (then forward hooks find the Linear layers)."""
    if not isinstance(module, nn.Sequential):
        return None
    layers: list[nn.Module] = []
    names: list[str] = []
    for name, layer in module._modules.items():  # not named_children: keeps repeats
        if isinstance(layer, nn.Sequential):
            inner = _flat_sequential(layer, f"{prefix}{name}.")
            if inner is None:
                return None
            layers += inner[0]
            names += inner[1]
        elif type(layer) is nn.Linear or not any(
                type(m) is nn.Linear or _trainable(m) for m in layer.modules()):
            layers.append(layer)  # type: ignore[arg-type]
            names.append(f"{prefix}{name}")
        else:
            return None
    return layers, names


def _check_2d(name: str, a: Tensor, batch: int) -> None:
    if a.dim() != 2 or a.shape[0] != batch:
        raise ValueError(
            f"layer {name!r} (Linear) got input of shape {tuple(a.shape)}; the per-sample norm "
            f"identity needs 2-D [batch={batch}, features] inputs: use Opacus for this model")


def _shared(name: str) -> ValueError:
    return ValueError(f"layer {name!r} (Linear) is called more than once per forward; its "
                      f"per-sample gradient is a sum of outer products, not one: use Opacus "
                      f"for this model")


def _forward_sequential(layers: list[nn.Module], names: list[str], x: Tensor,
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


def _forward_hooked(module: nn.Module, x: Tensor,
                    ) -> tuple[Tensor, list[tuple[nn.Linear, Tensor, Tensor]]]:
    """Any module whose trainable layers are Linear: forward hooks keep (input, output)."""
    taps: list[tuple[nn.Linear, Tensor, Tensor]] = []
    seen: set[int] = set()
    handles = []

    def hook(name: str):
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


def clip_and_accumulate(module: nn.Module, x: Tensor, y: Tensor, max_grad_norm: float, *,
                        weights: Tensor | None = None, loss: str = "cross_entropy",
                        return_loss: bool = False) -> Tensor | tuple[Tensor, float]:
    """Set `p.grad` of every trainable parameter to Σ_i weight_i · clip_C(∇ℓ_i); return ‖∇ℓ_i‖.

    ℓ_i is sample i's cross-entropy loss, clip_C scales a gradient to norm ≤ C exactly
    as Opacus does (factor min(1, C / (‖∇ℓ_i‖ + 1e-6)), norm over all trainable
    parameters together). Grads are overwritten, not accumulated; no noise is added and
    nothing is averaged (the caller adds N(0, σ²C²) and divides by the batch size).

    `weights` (one per sample, in [0, 1]) multiply each clipped gradient AFTER clipping,
    so a sample's contribution stays ≤ weight_i · C ≤ C and the sensitivity the noise is
    calibrated to holds. (Weighting the loss before clipping would be undone by the clip
    for every sample whose gradient is clipped, and a weight > 1 would break the bound.)

    Returns the per-sample gradient norms before clipping (and before weighting),
    detached, shape [batch]. Raises ValueError naming the layer for a module this kernel
    cannot clip exactly (see `supports`); the caller can fall back to Opacus then.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r} is not supported; choose from {', '.join(LOSSES)}")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
    bad = unsupported_layer(module)
    if bad is not None:
        raise ValueError(f"clip_and_accumulate cannot handle layer {bad[0]!r}: {bad[1]}; "
                         f"use Opacus (grad_sample_mode='ghost' or 'hooks') for this model")
    batch = x.shape[0]
    if y.shape != (batch,):
        raise ValueError(f"need one label per row: x has {batch} rows, y has shape "
                         f"{tuple(y.shape)}")
    if weights is not None:
        if weights.shape != (batch,):
            raise ValueError(f"need one weight per row: x has {batch} rows, weights have "
                             f"shape {tuple(weights.shape)}")
        if batch and bool(((weights < 0) | (weights > 1) | weights.isnan()).any()):
            raise ValueError("weights must lie in [0, 1]: a larger weight would break the "
                             "per-sample bound C the noise is calibrated to")

    flat = _flat_sequential(module)
    with torch.enable_grad():
        if flat is not None:
            out, taps = _forward_sequential(*flat, x)
        else:
            out, taps = _forward_hooked(module, x)
        if not taps:
            raise ValueError("module has no trainable nn.Linear parameters to clip")
        total = F.cross_entropy(out, y, reduction="sum")
        outs = [z for _, _, z in taps]
        grads = torch.autograd.grad(total, outs, allow_unused=True)

    with torch.no_grad():
        # norm_i² = Σ_l ‖g_il‖² (‖a_il‖² + 1 if the bias trains), 3-4 small ops per layer
        sq: Tensor | None = None
        parts: list[tuple[nn.Linear, Tensor, Tensor]] = []
        for (layer, a, z), g in zip(taps, grads, strict=True):
            g = torch.zeros_like(z) if g is None else g  # output unused by the loss
            g_sq = torch.linalg.vecdot(g, g)
            if layer.weight.requires_grad:
                a_sq = torch.linalg.vecdot(a, a)
                if _bias_trains(layer):
                    a_sq.add_(1.0)
                sq = g_sq.mul_(a_sq) if sq is None else sq.addcmul_(g_sq, a_sq)
            else:  # a trainable bias alone
                sq = g_sq if sq is None else sq.add_(g_sq)
            parts.append((layer, a, g))
        assert sq is not None
        norms = sq.sqrt_()
        scale = (max_grad_norm / (norms + CLIP_EPS)).clamp_(max=1.0)
        if weights is not None:
            scale.mul_(weights.to(scale.dtype))
        # W.grad = Gᵀ diag(s) A: one matmul per layer, the scale applied to the narrower
        # of G and A; b.grad = Gᵀ s
        column = scale.unsqueeze(1)
        for layer, a, g in parts:
            if layer.weight.requires_grad:
                if a.shape[1] < g.shape[1]:
                    layer.weight.grad = torch.mm(g.t(), a * column)
                else:
                    layer.weight.grad = torch.mm((g * column).t(), a)
            if _bias_trains(layer):
                layer.bias.grad = torch.mv(g.t(), scale)
        if flat is None:  # a Linear the forward never called: its gradient is zero
            called = {id(layer) for layer, _, _ in taps}
            for sub in module.modules():
                if type(sub) is nn.Linear and id(sub) not in called:
                    for p in sub.parameters():
                        if p.requires_grad:
                            p.grad = torch.zeros_like(p)
    if return_loss:  # the mean loss the forward already computed (callers log it)
        return norms, float(total.detach()) / max(batch, 1)
    return norms


def _bias_trains(layer: nn.Linear) -> bool:
    return layer.bias is not None and layer.bias.requires_grad
