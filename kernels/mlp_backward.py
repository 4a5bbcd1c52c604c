"""Hand-written forward and backward for plain MLPs, without autograd.

`clip_and_accumulate` needs, for every trainable Linear l, its input A_l and the gradient
G_l of the summed per-sample loss w.r.t. its output. For the `nn.Sequential` MLPs
`flywheel.modelspec.build_model` builds (Standardize, Linear, ReLU/Tanh/GELU) those are a
few lines of algebra:

    G_last  = softmax(Z) - onehot(y)                     (cross-entropy, summed)
    G_{l-1} = act'(Z_{l-1}) ⊙ (G_l W_l)                  (one matmul, one elementwise op)

Computing them by hand, one ATen op per step, skips what autograd costs on top of the
arithmetic (graph nodes, saved tensors, the engine's dispatch), which on a small model
outweighs the matmuls: on the 8-64-64-3 demo model at batch 256 it is the difference
between ~0.55x and ~0.85x the speed of non-private SGD (docs/benchmarks.md#dpclip).

`mlp_plan(module)` returns None for anything it does not know exactly, and the caller
then uses the autograd path; the activation backwards are the very ATen kernels autograd
calls (`threshold_backward`, `tanh_backward`, `gelu_backward`, ...), so both paths give
the same numbers up to float rounding (tests/unit/test_per_sample_clip.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ACTIVATIONS", "BATCH_MIXING", "MLPPlan", "forward_backward", "mlp_plan"]

_aten = torch.ops.aten

# Step kinds. A "linear" step keeps its input for the weight gradient; an activation
# keeps the tensor its ATen backward takes (the output for relu/tanh/sigmoid, as
# autograd does, the input for the others).
_LINEAR, _RELU, _TANH, _SIGMOID, _GELU, _SILU, _LEAKY = range(7)

# Exact types only: a subclass may override forward.
ACTIVATIONS: dict[type[nn.Module], int] = {
    nn.ReLU: _RELU,
    nn.Tanh: _TANH,
    nn.Sigmoid: _SIGMOID,
    nn.GELU: _GELU,
    nn.SiLU: _SILU,
    nn.LeakyReLU: _LEAKY,
}
# Layers that mix samples in training mode: no per-sample gradient exists at all.
BATCH_MIXING = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True, slots=True)
class MLPPlan:
    """`pre`: modules before the first trainable Linear, run as they are (no gradient is
    needed through them); `steps`: (kind, layer, argument) from that Linear on."""

    pre: tuple[nn.Module, ...]
    steps: tuple[tuple[int, nn.Module, object], ...]
    first_name: str  # the first trainable Linear's dotted name, for error messages


def _leaves(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]]) -> None:
    for name, layer in module._modules.items():  # not named_children: keeps repeats
        if layer is None:
            continue
        if type(layer) is nn.Sequential:
            _leaves(layer, f"{prefix}{name}.", out)
        else:
            out.append((f"{prefix}{name}", layer))


def _inert(layer: nn.Module) -> bool:
    """No trainable parameter and nothing that mixes samples: safe to run without grad."""
    for sub in layer.modules():
        if isinstance(sub, BATCH_MIXING):
            return False
        for p in sub.parameters(recurse=False):
            if p.requires_grad:
                return False
    return True


def _identity(layer: nn.Module) -> bool:
    if type(layer) is nn.Identity:
        return True
    return type(layer) is nn.Dropout and (not layer.training or layer.p == 0)


def mlp_plan(module: nn.Module) -> MLPPlan | None:
    """The hand-written path for `module`, or None if it is not a plain MLP this file knows.

    Known: an `nn.Sequential` (nested ones are flattened) whose layers are, from the first
    trainable `nn.Linear` on, plain Linears (trainable, partly or wholly frozen, each
    trainable one called once), the activations in `ACTIVATIONS`, `nn.Identity` and
    `nn.Dropout` in eval mode (or p = 0); before that Linear, any layer without trainable
    parameters or batch statistics (e.g. `Standardize`). Anything else, including dropout
    in training mode: None.
    """
    if type(module) is not nn.Sequential:
        return None
    leaves: list[tuple[str, nn.Module]] = []
    _leaves(module, "", leaves)
    pre: list[nn.Module] = []
    steps: list[tuple[int, nn.Module, object]] = []
    seen: set[int] = set()
    first_name = ""
    for name, layer in leaves:
        kind = type(layer)
        if kind is nn.Linear:
            trains = layer.weight.requires_grad or (
                layer.bias is not None and layer.bias.requires_grad
            )
            if trains:
                # a shared layer or tied weights: the autograd path refuses them
                ids = [id(layer)] + [
                    id(p) for p in layer.parameters(recurse=False) if p.requires_grad
                ]
                if not seen.isdisjoint(ids):
                    return None
                seen.update(ids)
                if not steps:
                    first_name = name
            if steps or trains:
                steps.append((_LINEAR, layer, trains))
                continue
        elif steps:
            if _identity(layer):
                continue
            act = ACTIVATIONS.get(kind)
            if act is None:
                return None
            arg: object = None
            if act == _GELU:
                arg = layer.approximate
            elif type(layer) is nn.LeakyReLU:  # act == _LEAKY: ACTIVATIONS keys are exact types
                arg = float(layer.negative_slope)
            steps.append((act, layer, arg))
            continue
        if not _inert(layer):
            return None
        pre.append(layer)
    if not steps:
        return None
    return MLPPlan(tuple(pre), tuple(steps), first_name)


def forward_backward(
    plan: MLPPlan,
    x: Tensor,
    y: Tensor,
    *,
    need_loss: bool,
) -> tuple[list[tuple[nn.Linear, Tensor, Tensor]], Tensor | None]:
    """([(trainable Linear, its input A, G = d Σ_i ℓ_i / d its output)], Σ_i ℓ_i or None).

    ℓ_i is sample i's cross-entropy. Everything runs under no_grad: no graph is built.
    Raises ValueError if the first trainable Linear's input is not 2-D [batch, features].
    """
    batch = x.shape[0]
    with torch.no_grad():
        h = x
        for layer in plan.pre:
            h = layer(h)
        if h.dim() != 2 or h.shape[0] != batch:
            raise ValueError(
                f"layer {plan.first_name!r} (Linear) got input of shape {tuple(h.shape)}; "
                f"the per-sample norm identity needs 2-D [batch={batch}, features] inputs: "
                f"use Opacus for this model"
            )
        saved: list[Tensor] = []
        for kind, layer, arg in plan.steps:
            if kind == _LINEAR:
                assert isinstance(layer, nn.Linear)  # mlp_plan makes _LINEAR steps of Linears only
                saved.append(h)
                h = F.linear(h, layer.weight, layer.bias)
            elif kind == _RELU:
                h = torch.relu(h)
                saved.append(h)
            elif kind == _TANH:
                h = torch.tanh(h)
                saved.append(h)
            elif kind == _SIGMOID:
                h = torch.sigmoid(h)
                saved.append(h)
            else:
                saved.append(h)
                if kind == _GELU:
                    h = F.gelu(h, approximate=arg)  # type: ignore[arg-type]
                elif kind == _SILU:
                    h = F.silu(h)
                else:
                    h = F.leaky_relu(h, arg)  # type: ignore[arg-type]

        # Σ_i ℓ_i = Σ_i -log_softmax(z_i)[y_i];  dΣ/dz = softmax(z) - onehot(y)
        if need_loss:
            logp = torch.log_softmax(h, 1)
            total = F.nll_loss(logp, y, reduction="sum")
            g = logp.exp_()
        else:
            total, g = None, torch.softmax(h, 1)
        g.scatter_add_(1, y.view(-1, 1), g.new_full((batch, 1), -1.0))

        taps: list[tuple[nn.Linear, Tensor, Tensor]] = []
        for i in range(len(plan.steps) - 1, -1, -1):
            kind, layer, arg = plan.steps[i]
            s = saved[i]
            if kind == _LINEAR:
                assert isinstance(layer, nn.Linear)  # mlp_plan makes _LINEAR steps of Linears only
                if arg:  # trains
                    taps.append((layer, s, g))
                if i:
                    g = torch.mm(g, layer.weight)
            elif kind == _RELU:
                g = _aten.threshold_backward(g, s, 0)
            elif kind == _TANH:
                g = _aten.tanh_backward(g, s)
            elif kind == _SIGMOID:
                g = _aten.sigmoid_backward(g, s)
            elif kind == _GELU:
                g = _aten.gelu_backward(g, s, approximate=arg)
            elif kind == _SILU:
                g = _aten.silu_backward(g, s)
            else:
                g = _aten.leaky_relu_backward(g, s, arg, False)
    return taps, total
