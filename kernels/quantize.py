"""Low-precision copies of a model for serving, and what they cost in accuracy.

* `int8`: PyTorch dynamic quantization of every `nn.Linear`
  (`torch.ao.quantization.quantize_dynamic`: weights int8 per output channel, activations
  quantized on the fly per batch, int8 matmul, float32 output).
* `bf16`: every `nn.Linear` keeps its weights in bfloat16 and computes in bfloat16; its
  input is cast down and its output back to float32, so everything between the linear
  layers (feature scaling, activations, a cascade's routing) stays float32.

Both work on any module built from a spec (`flywheel.modelspec.build_module`): only the
linear layers are replaced, on a copy; the original module is never changed. The
reference is the float32 module itself: `precision_delta` is the accuracy of the copy
minus the accuracy of the original on the same rows.
"""

from __future__ import annotations

import copy
import warnings
from typing import Literal

import numpy as np
import torch
from torch import nn

Precision = Literal["fp32", "int8", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "int8", "bf16")


class BF16Linear(nn.Module):
    """`nn.Linear` in bfloat16 with float32 input and output."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = (
            nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
            if linear.bias is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).float()


def _replace_linear_bf16(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, BF16Linear(child))
        else:
            _replace_linear_bf16(child)


def to_precision(module: nn.Module, precision: str) -> nn.Module:
    """A copy of `module` (in eval mode, no gradients) that computes at `precision`;
    `fp32` returns `module` itself."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return module
    was_training = module.training
    module.eval()
    try:
        if precision == "int8":
            with warnings.catch_warnings():  # torch.ao.quantization announces its move to
                warnings.simplefilter("ignore", DeprecationWarning)  # torchao, and its
                warnings.simplefilter("ignore", UserWarning)  # quantized tensor types too
                qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
                out = torch.ao.quantization.quantize_dynamic(
                    module, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=False
                )
        else:
            out = copy.deepcopy(module)
            _replace_linear_bf16(out)
    finally:
        module.train(was_training)
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def accuracy(module: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose arg-max logit is the label (module in eval mode, no grad)."""
    if len(y) == 0:
        return float("nan")
    with torch.inference_mode():
        pred = module(torch.from_numpy(np.asarray(x, np.float32))).argmax(dim=1).numpy()
    return float((pred == np.asarray(y)).mean())


def precision_accuracies(
    module: nn.Module, x: np.ndarray, y: np.ndarray, precision: str
) -> tuple[float, float]:
    """(accuracy in float32, accuracy of the `precision` copy) on the same rows."""
    was_training = module.training
    module.eval()
    try:
        full = accuracy(module, x, y)
        low = full if precision == "fp32" else accuracy(to_precision(module, precision), x, y)
    finally:
        module.train(was_training)
    return full, low


def precision_delta(module: nn.Module, x: np.ndarray, y: np.ndarray, precision: str) -> float:
    """Accuracy at `precision` minus accuracy in float32 (negative: the copy is worse)."""
    full, low = precision_accuracies(module, x, y, precision)
    return low - full
