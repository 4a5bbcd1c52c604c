"""Triton version of the fused per-sample clipping kernel, for GPUs.

Same contract and the same arithmetic as `flywheel.kernels.clip_and_accumulate` (see that
module for the ‖g_i‖·‖a_i‖ identity): one forward that keeps every Linear's input A and
output, one `autograd.grad` to the outputs G, then two Triton kernels per layer instead of
a chain of small torch ops:

* `row_norms`: for each sample i, adds ‖g_i‖²·(‖a_i‖² + 1 if the bias trains) to a running
  per-sample total, reading A and G once, in blocks of rows;
* `clipped_matmul`: W.grad = Gᵀ diag(s) A as a tiled matmul over the batch, with the
  per-sample factor s_i = min(1, C / (norm_i + 1e-6)) · weight_i applied to G's tile as it
  is loaded (no scaled copy of G is written), and b.grad = Gᵀ s from the same tiles.

The CPU path (`clip_and_accumulate`) is the default and never needs Triton. Tensors on CPU
run here only under Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests
check this kernel against the plain-PyTorch reference on a machine without a GPU; on CUDA
tensors it compiles for the device. Install with `pip install triton`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flywheel.kernels.per_sample_clip import (
    CLIP_EPS,
    check_batch,
    forward_with_linear_taps,
    unsupported_layer,
)

# Imported on first use only (`_import_triton`): importing Triton takes time and loads
# native code that no CPU process of Flywheel needs.
triton: Any = None
tl: Any = None

__all__ = ["clip_and_accumulate_triton", "triton_available", "triton_interpreting"]

BLOCK_ROWS = 32  # rows per program in row_norms, batch tile of clipped_matmul
BLOCK_COLS = 32  # feature tile (tl.dot wants every dimension ≥ 16)


def triton_available() -> bool:
    """True if the `triton` package is installed (optional: CPU serving never needs it)."""
    return triton is not None or importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True if Triton runs (or, not yet imported, will run) kernels in its CPU interpreter:
    `TRITON_INTERPRET=1` when `triton` is first imported."""
    if triton is not None:
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "on", "yes"}


def _import_triton() -> None:
    """Import Triton into this module's globals, where the kernels (and the interpreter,
    which patches `tl` there) look it up."""
    global triton, tl
    if triton is None:
        import triton as triton_module
        import triton.language as language

        triton, tl = triton_module, language


# Plain functions, jitted on first use by `_kernels`: importing this module needs no Triton.
# Whether Triton compiles or interprets them is fixed when `triton` is first imported
# (TRITON_INTERPRET), so the tests run the interpreter in a process of its own.
# Triton reads these signatures (an annotation is a type to specialise on, tl.constexpr a
# compile-time argument), so the pointer and size arguments stay unannotated on purpose.
def _row_norms(  # type: ignore[no-untyped-def]
    a_ptr,
    g_ptr,
    sq_ptr,
    rows,
    a_cols,
    g_cols,
    stride_a,
    stride_g,
    with_bias: tl.constexpr,
    with_weight: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    g_sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, g_cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        g = tl.load(
            g_ptr + r[:, None] * stride_g + c[None, :],
            mask=live[:, None] & (c[None, :] < g_cols),
            other=0.0,
        )
        g_sq += tl.sum(g * g, axis=1)
    a_sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if with_weight:
        for c0 in range(0, a_cols, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            a = tl.load(
                a_ptr + r[:, None] * stride_a + c[None, :],
                mask=live[:, None] & (c[None, :] < a_cols),
                other=0.0,
            )
            a_sq += tl.sum(a * a, axis=1)
    if with_bias:
        a_sq += 1.0
    total = tl.load(sq_ptr + r, mask=live, other=0.0)
    tl.store(sq_ptr + r, total + g_sq * a_sq, mask=live)


def _clipped_matmul(  # type: ignore[no-untyped-def]  # Triton reads the signature (above)
    g_ptr,
    a_ptr,
    s_ptr,
    w_ptr,
    b_ptr,
    rows,
    g_cols,
    a_cols,
    stride_g,
    stride_a,
    stride_w,
    with_bias: tl.constexpr,
    with_weight: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        live = r < rows
        s = tl.load(s_ptr + r, mask=live, other=0.0)
        g = tl.load(
            g_ptr + r[:, None] * stride_g + n[None, :],
            mask=live[:, None] & (n[None, :] < g_cols),
            other=0.0,
        )
        g = g * s[:, None]
        if with_weight:
            a = tl.load(
                a_ptr + r[:, None] * stride_a + k[None, :],
                mask=live[:, None] & (k[None, :] < a_cols),
                other=0.0,
            )
            acc += tl.dot(tl.trans(g), a, input_precision="ieee")
        if with_bias:
            bias += tl.sum(g, axis=0)
    if with_weight:
        tl.store(
            w_ptr + n[:, None] * stride_w + k[None, :],
            acc,
            mask=(n[:, None] < g_cols) & (k[None, :] < a_cols),
        )
    if with_bias:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if tl.program_id(1) == 0:
            tl.store(b_ptr + n, bias, mask=n < g_cols)


@functools.cache
def _kernels() -> SimpleNamespace:
    _import_triton()
    return SimpleNamespace(
        row_norms=triton.jit(_row_norms), clipped_matmul=triton.jit(_clipped_matmul)
    )


def _check(
    module: nn.Module, x: Tensor, y: Tensor, max_grad_norm: float, weights: Tensor | None
) -> None:
    """Validate like `clip_and_accumulate`."""
    if not triton_available():
        raise RuntimeError(
            "the Triton clipping kernel needs the `triton` package "
            "(pip install triton); the CPU path is flywheel.kernels."
            "clip_and_accumulate"
        )
    if x.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError(
            "CPU tensors run the Triton kernel only in Triton's interpreter "
            "(TRITON_INTERPRET=1, for tests); use flywheel.kernels."
            "clip_and_accumulate on CPU"
        )
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
    bad = unsupported_layer(module)
    if bad is not None:
        raise ValueError(f"the Triton kernel cannot handle layer {bad[0]!r}: {bad[1]}")
    if x.dtype != torch.float32:
        raise ValueError(f"the Triton kernel computes in float32, got {x.dtype}")
    check_batch(x, y, weights)


def clip_and_accumulate_triton(
    module: nn.Module, x: Tensor, y: Tensor, max_grad_norm: float, *, weights: Tensor | None = None
) -> Tensor:
    """`clip_and_accumulate` with Triton kernels for the norms and the clipped sums.

    Sets `p.grad` of every trainable parameter to Σ_i weight_i · clip_C(∇ℓ_i) of the
    per-sample cross-entropy losses; returns the per-sample norms before clipping.
    """
    _check(module, x, y, max_grad_norm, weights)
    k = _kernels()
    batch = x.shape[0]
    with torch.enable_grad():
        out, taps = forward_with_linear_taps(module, x)
        if not taps:
            raise ValueError("module has no trainable nn.Linear parameters to clip")
        total = F.cross_entropy(out, y, reduction="sum")
        grads = torch.autograd.grad(total, [z for _, _, z in taps], allow_unused=True)

    with torch.no_grad():
        parts: list[tuple[nn.Linear, Tensor, Tensor]] = []
        sq = torch.zeros(batch, dtype=torch.float32, device=x.device)
        rows_grid = (triton.cdiv(max(batch, 1), BLOCK_ROWS),)
        for (layer, a, z), g in zip(taps, grads, strict=True):
            g = torch.zeros_like(z) if g is None else g.contiguous()
            a = a.contiguous()
            parts.append((layer, a, g))
            if batch:
                k.row_norms[rows_grid](
                    a,
                    g,
                    sq,
                    batch,
                    a.shape[1],
                    g.shape[1],
                    a.stride(0),
                    g.stride(0),
                    with_bias=_bias_trains(layer),
                    with_weight=layer.weight.requires_grad,
                    BLOCK_R=BLOCK_ROWS,
                    BLOCK_C=BLOCK_COLS,
                )
        norms = sq.sqrt()
        scale = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        if weights is not None:
            scale = scale * weights.to(scale.dtype)
        scale = scale.contiguous()
        for layer, a, g in parts:
            out_dim, in_dim = layer.weight.shape
            w_grad = torch.zeros(out_dim, in_dim, dtype=torch.float32, device=x.device)
            b_grad = torch.zeros(out_dim, dtype=torch.float32, device=x.device)
            grid = (triton.cdiv(out_dim, BLOCK_COLS), triton.cdiv(in_dim, BLOCK_COLS))
            if batch:
                k.clipped_matmul[grid](
                    g,
                    a,
                    scale,
                    w_grad,
                    b_grad,
                    batch,
                    out_dim,
                    in_dim,
                    g.stride(0),
                    a.stride(0),
                    w_grad.stride(0),
                    with_bias=_bias_trains(layer),
                    with_weight=layer.weight.requires_grad,
                    BLOCK_R=BLOCK_ROWS,
                    BLOCK_N=BLOCK_COLS,
                    BLOCK_K=BLOCK_COLS,
                )
            if layer.weight.requires_grad:
                layer.weight.grad = w_grad
            if _bias_trains(layer):
                layer.bias.grad = b_grad
        called = {id(layer) for layer, _, _ in taps}
        for sub in module.modules():  # a Linear the forward never called: zero gradient
            if type(sub) is nn.Linear and id(sub) not in called:
                for p in sub.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
    return norms


def _bias_trains(layer: nn.Linear) -> bool:
    return layer.bias is not None and layer.bias.requires_grad
