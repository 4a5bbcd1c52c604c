"""The Triton clipping kernel (`flywheel.kernels.clip_and_accumulate_triton`) against the
same torch.func reference as the CPU kernel.

Without a GPU the kernels run in Triton's interpreter: the same kernel source, block by
block in numpy, so masks, strides, tiling and the fused scaling are checked here. Triton
fixes interpret-or-compile when it is first imported, so the interpreter runs in a child
process (`python tests/unit/test_triton_clip.py` with TRITON_INTERPRET=1) that reports the
differences as JSON; the CUDA test runs the compiled kernel where a GPU is present.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

from flywheel.kernels import clip_and_accumulate, clip_and_accumulate_triton, triton_available
from flywheel.kernels.reference import per_sample_clip_reference
from flywheel.modelspec import ModelSpec, build_model

pytestmark = pytest.mark.skipif(
    not triton_available(), reason="triton is not installed (pip install triton)"
)

# (seed, input_dim, hidden, labels, batch): widths below, at and across the 32-wide
# tiles, batches that leave a partial block of rows, a batch of one.
CASES = [
    (0, 8, (64, 64), 3, 40),
    (1, 3, (), 2, 7),
    (2, 20, (33,), 5, 1),
    (3, 1, (4, 40), 2, 33),
    (4, 70, (16,), 3, 65),
]
TOLERANCE = 1e-5


def model_and_batch(
    seed: int,
    input_dim: int,
    hidden: tuple[int, ...],
    labels: int,
    batch: int,
    activation: str = "relu",
) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    spec = ModelSpec(
        input_dim=input_dim,
        hidden=list(hidden),
        labels=[f"c{i}" for i in range(labels)],
        activation=activation,
    )  # type: ignore[arg-type]
    module = build_model(spec)
    x = torch.randn(batch, input_dim) * 2 + 0.5
    y = torch.randint(0, labels, (batch,))
    return module, x, y


def grads_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def max_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest elementwise difference relative to 1 + |want| (inf if the names differ)."""
    if got.keys() != want.keys():
        return float("inf")
    return max(float(((got[n] - want[n]).abs() / (1 + want[n].abs())).max()) for n in want)


def interpreter_checks() -> dict[str, Any]:
    """Run in the child process: every case, unweighted and weighted, plus edge cases."""
    out: dict[str, Any] = {
        "interpreting": __import__("flywheel.kernels", fromlist=["x"]).triton_interpreting()
    }
    for case in CASES:
        for weighted in (False, True):
            module, x, y = model_and_batch(*case)
            weights = torch.rand(len(x)) if weighted else None
            _, norms_ref = per_sample_clip_reference(module, x, y, 1.0)
            clip = float(norms_ref.median())  # some samples clipped, some not
            expected, _ = per_sample_clip_reference(module, x, y, clip, weights=weights)
            norms = clip_and_accumulate_triton(module, x, y, clip, weights=weights)
            out[f"case{case[0]}-{'weighted' if weighted else 'unweighted'}"] = {
                "norms": max_error({"n": norms}, {"n": norms_ref}),
                "grads": max_error(grads_of(module), expected),
            }

    # A frozen first Linear and a frozen bias: no norm share, no gradient, as on the CPU path.
    module, x, y = model_and_batch(5, 8, (24, 24), 3, 30, activation="tanh")
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for p in linears[0].parameters():
        p.requires_grad_(False)
    linears[1].bias.requires_grad_(False)
    norms_cpu = clip_and_accumulate(module, x, y, 0.5)
    want = grads_of(module)
    for p in module.parameters():
        p.grad = None
    norms = clip_and_accumulate_triton(module, x, y, 0.5)
    out["frozen"] = {
        "norms": max_error({"n": norms}, {"n": norms_cpu}),
        "grads": max_error(grads_of(module), want),
        "with_grad": sorted(grads_of(module)),
        "frozen": sorted(n for n, p in module.named_parameters() if not p.requires_grad),
    }
    try:
        clip_and_accumulate_triton(module, x[:2], y[:2], 1.0, weights=torch.tensor([0.5, 2.0]))
        out["bad_weights"] = "accepted"
    except ValueError as e:
        out["bad_weights"] = str(e)
    return out


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    env = os.environ | {"TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_runs_in_the_interpreter(interpreted: dict[str, Any]) -> None:
    assert interpreted["interpreting"] is True


@pytest.mark.parametrize(
    "name", [f"case{c[0]}-{w}" for c in CASES for w in ("unweighted", "weighted")]
)
def test_equals_reference(interpreted: dict[str, Any], name: str) -> None:
    assert interpreted[name]["norms"] <= TOLERANCE
    assert interpreted[name]["grads"] <= TOLERANCE


def test_frozen_parameters_match_the_cpu_kernel(interpreted: dict[str, Any]) -> None:
    frozen = interpreted["frozen"]
    assert frozen["norms"] <= TOLERANCE and frozen["grads"] <= TOLERANCE
    assert len(frozen["frozen"]) == 3 and len(frozen["with_grad"]) == 3
    assert not set(frozen["frozen"]) & set(frozen["with_grad"])


def test_refuses_weights_above_one(interpreted: dict[str, Any]) -> None:
    assert "[0, 1]" in interpreted["bad_weights"]


def test_refuses_cpu_tensors_outside_the_interpreter() -> None:
    module, x, y = model_and_batch(0, 8, (16,), 3, 4)
    with pytest.raises(RuntimeError, match="interpreter"):
        clip_and_accumulate_triton(module, x, y, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernel_on_cuda_equals_reference() -> None:
    module, x, y = model_and_batch(0, 64, (256, 256), 10, 256)
    weights = torch.rand(len(x))
    expected, norms_ref = per_sample_clip_reference(module, x, y, 1.0, weights=weights)
    module, x, y, weights = module.cuda(), x.cuda(), y.cuda(), weights.cuda()
    norms = clip_and_accumulate_triton(module, x, y, 1.0, weights=weights)
    assert max_error({"n": norms.cpu()}, {"n": norms_ref}) <= 1e-4
    got = {n: p.grad.cpu() for n, p in module.named_parameters()}
    assert max_error(got, expected) <= TOLERANCE


if __name__ == "__main__":
    print(json.dumps(interpreter_checks()))
