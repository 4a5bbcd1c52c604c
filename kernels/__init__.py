"""Fast compute, each kernel tested against a plain-PyTorch reference.

* `clip_and_accumulate`: DP-SGD's per-sample gradient clipping and summation for the MLPs
  `flywheel.modelspec.build_model` builds, in one forward and one backward, without
  materialising per-sample gradients (reference: `flywheel.kernels.reference`);
  `supports(module)` says whether a model qualifies, else use Opacus. See docs/kernels.md.
"""

from flywheel.kernels.per_sample_clip import clip_and_accumulate, supports

__all__ = ["clip_and_accumulate", "supports"]
