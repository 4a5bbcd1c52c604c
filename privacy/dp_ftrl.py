"""One DP-FTRL update with tree aggregation (Kairouz et al. 2021): no sampling, no shuffling.

The update's rows are used once, in arrival order: its private sources are split into
`steps` consecutive leaves (every row of a source in the same leaf), and the public rows
spread over the leaves the same way. At leaf t the model is at θ_t; each private
example's gradient there is clipped to C and scaled by its weight over max(1, that
source's summed weights in the update) (`dp_sgd.source_scale`), so one source moves its
leaf's sum by at most C, once.

The prefix sums S_t = g_1 + … + g_t are released through a binary tree: every dyadic
block of leaves [k·2^l, (k+1)·2^l) gets one Gaussian draw of std σC, and the noisy S_t
is the true one plus the draws of the blocks t's binary form splits it into (at most
⌈log2 T⌉ + 1, where DP-SGD's sum of t steps carries t draws). FTRL with a quadratic
regulariser around the update's start θ_0 then sets θ_{t+1} = θ_0 − η·S̃_t / B
(B: rows per leaf). A record is in one leaf, hence in at most `tree_nodes_touched(T)`
nodes: `accounting` charges each source one `SingleEpochTreeAggregationDpEvent(σ, T)`.
The tree restarts at each update (a fresh tree, fresh draws), so updates compose as
independent mechanisms.

The clipped sums are `dp_sgd.clipped_sum`'s (Opacus' per-sample gradients, or the fused
kernel), the same code path as DP-SGD. The optimizer's state is left alone: FTRL sets
the parameters itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from flywheel.privacy.dp_sgd import (
    DPStepStats,
    Engine,
    PrivateBatch,
    clipped_sum,
    resolve_engine,
    source_scale,
)

log = logging.getLogger(__name__)


def leaves_of(batch: PrivateBatch, leaves: int) -> list[np.ndarray]:
    """Row indices of each of `leaves` leaves: private sources in order of their first row,
    in consecutive groups of near-equal size (a source never spans two leaves), and the
    public rows in consecutive runs."""
    if leaves < 1:
        raise ValueError(f"leaves must be >= 1, got {leaves}")
    private = np.flatnonzero(~batch.public)
    public = np.flatnonzero(batch.public)
    src = batch.sources[private]
    _, first = np.unique(src, return_index=True)
    order = src[np.sort(first)]  # sources in arrival order
    groups = np.array_split(order, leaves)
    public_parts = np.array_split(public, leaves)
    out = []
    for group, pub in zip(groups, public_parts, strict=True):
        rows = private[np.isin(src, group)]
        out.append(np.sort(np.concatenate([rows, pub])))
    return out


class TreeNoise:
    """The noise on each prefix sum S_t of a binary aggregation tree: one Gaussian draw per
    dyadic block, drawn the first time a prefix uses it, so prefixes share their blocks."""

    def __init__(self, size: int, std: float, generator: torch.Generator) -> None:
        self.size, self.std, self.generator = size, std, generator
        self.blocks: dict[tuple[int, int], torch.Tensor] = {}

    def prefix(self, t: int) -> torch.Tensor:
        """The noise on S_t (leaves 0..t-1): the sum of the draws of its dyadic blocks."""
        total = torch.zeros(self.size)
        start, size = 0, 1 << max(t.bit_length() - 1, 0)
        while size:
            if start + size <= t:
                total += self._block(start, size)
                start += size
            size >>= 1
        return total

    def _block(self, start: int, size: int) -> torch.Tensor:
        key = (start, size)
        if key not in self.blocks:
            draw = torch.empty(self.size)
            if self.std > 0:
                draw.normal_(0.0, self.std, generator=self.generator)
            else:
                draw.zero_()
            self.blocks[key] = draw
        return self.blocks[key]


def ftrl_update(
    module: nn.Module,
    batch: PrivateBatch,
    *,
    leaves: int,
    noise_multiplier: float,
    max_grad_norm: float,
    lr: float,
    generator: torch.Generator,
    engine: Engine = "auto",
    between_steps: Callable[[], None] | None = None,
) -> DPStepStats:
    """One tree of `leaves` FTRL steps over `batch`; the caller accounts (σ, leaves).

    `between_steps` (a callable) is called before each leaf; what it raises abandons the
    update (the module is then half-trained and must be thrown away).
    """
    if leaves < 1 or lr <= 0:
        raise ValueError(f"need leaves >= 1 and lr > 0, got {leaves}, {lr}")
    if noise_multiplier < 0 or max_grad_norm <= 0:
        raise ValueError("noise_multiplier must be >= 0 and max_grad_norm > 0")
    engine_name = resolve_engine(engine, module)
    params = [p for p in module.parameters() if p.requires_grad]
    start = nn.utils.parameters_to_vector(params).detach().clone()
    x = torch.from_numpy(np.asarray(batch.x, np.float32))
    y = torch.from_numpy(np.asarray(batch.y, np.int64))
    w = torch.from_numpy(np.asarray(batch.weight, np.float32))
    public = torch.from_numpy(np.asarray(batch.public, bool))
    src = torch.from_numpy(np.asarray(batch.sources, np.int64))
    scale = source_scale(w, src, public)
    units = batch.n_sources + int(public.sum())  # a source adds at most 1 (times C) to a sum
    divisor = max(units / leaves, 1.0)
    noise = TreeNoise(len(start), noise_multiplier * max_grad_norm, generator)
    total = torch.zeros_like(start)
    module.train()
    clipped = counted = 0
    loss_sum = 0.0
    sources_in_leaf = 0
    for t, rows_np in enumerate(leaves_of(batch, leaves), 1):
        if between_steps is not None:
            between_steps()
        rows = torch.from_numpy(rows_np)
        if len(rows):
            for p in params:
                p.grad = torch.zeros_like(p)
            try:
                norms, loss = clipped_sum(
                    module, params, x[rows], y[rows], scale[rows], max_grad_norm, engine_name
                )
            except ValueError as exc:
                if engine != "auto" or engine_name != "fused":
                    raise
                log.warning("the fused clipping kernel refused this model (%s); using Opacus", exc)
                engine_name = "opacus"
                for p in params:
                    p.grad = None
                norms, loss = clipped_sum(
                    module, params, x[rows], y[rows], scale[rows], max_grad_norm, engine_name
                )
            total += torch.cat([_grad(p).reshape(-1) for p in params])
            private_rows = ~public[rows]
            clipped += int((norms[private_rows] > max_grad_norm).sum())
            counted += int(private_rows.sum())
            sources_in_leaf += len(torch.unique(src[rows][private_rows]))
            loss_sum += loss
        with torch.no_grad():
            nn.utils.vector_to_parameters(start - lr * (total + noise.prefix(t)) / divisor, params)
        for p in params:
            p.grad = None
    module.eval()
    return DPStepStats(
        leaves, sources_in_leaf / leaves, clipped / max(counted, 1), loss_sum / leaves, engine_name
    )


def _grad(p: nn.Parameter) -> torch.Tensor:
    if p.grad is None:
        raise RuntimeError("a parameter has no gradient after the clipped sum")
    return p.grad
