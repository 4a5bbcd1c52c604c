"""Fast compute, each kernel tested against a plain-PyTorch reference.

* `clip_and_accumulate`: DP-SGD's per-sample gradient clipping and summation for the MLPs
  `flywheel.modelspec.build_model` builds, in one forward and one backward, without
  materialising per-sample gradients (reference: `flywheel.kernels.reference`);
  `supports(module)` says whether a model qualifies, else use Opacus;
  `uses_manual_backward(module)` whether its backward is the hand-written one
  (`flywheel.kernels.mlp_backward`, no autograd) rather than autograd. See docs/kernels.md.
* `clip_and_accumulate_triton`: the same clipping as Triton kernels for CUDA tensors (tested
  on CPU in Triton's interpreter); optional, needs the `triton` package.
* `MicroBatcher` (and its `BatcherStats`): concurrent asyncio submits become one call; the
  service's dynamic batching.
* `to_precision`, `precision_delta`: an int8 or bf16 copy of a model for serving, and what it
  costs in accuracy (the service serves it, the learner's gate reports it).
"""

from flywheel.kernels.batching import BatcherStats, MicroBatcher
from flywheel.kernels.per_sample_clip import clip_and_accumulate, supports, uses_manual_backward
from flywheel.kernels.quantize import precision_delta, to_precision
from flywheel.kernels.triton_clip import (
    clip_and_accumulate_triton,
    triton_available,
    triton_interpreting,
)

__all__ = [
    "BatcherStats",
    "MicroBatcher",
    "clip_and_accumulate",
    "clip_and_accumulate_triton",
    "precision_delta",
    "supports",
    "to_precision",
    "triton_available",
    "triton_interpreting",
    "uses_manual_backward",
]
