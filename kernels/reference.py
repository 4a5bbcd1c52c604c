"""Plain-PyTorch references for the kernels: obviously right, not fast.

`per_sample_clip_reference` materialises every per-sample gradient with torch.func
(`vmap` over `grad` of one sample's loss), then clips and sums them exactly as Opacus'
`DPOptimizer.clip_and_accumulate` does. It works for any module without batch-mixing
layers, so it also checks the layer types the fused kernel refuses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from flywheel.kernels.per_sample_clip import CLIP_EPS

__all__ = ["per_sample_clip_reference", "per_sample_grads"]


def per_sample_grads(module: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """{name: [batch, *param.shape]} gradients of each sample's cross-entropy loss."""
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in module.named_buffers()}

    def sample_loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(module, (p, frozen, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)


def per_sample_clip_reference(
    module: nn.Module,
    x: Tensor,
    y: Tensor,
    max_grad_norm: float,
    *,
    weights: Tensor | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """({name: Σ_i weight_i · clip_C(∇ℓ_i)}, per-sample norms before clipping)."""
    grads = per_sample_grads(module, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1)
    norms = flat.norm(2, dim=1)
    scale = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    if weights is not None:
        scale = scale * weights.to(scale.dtype)
    summed = {n: torch.einsum("i,i...->...", scale, g) for n, g in grads.items()}
    return summed, norms
