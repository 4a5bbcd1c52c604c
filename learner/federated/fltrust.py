"""FLTrust (Cao et al., NDSS 2021): trust scored against the platform's own data.

Each round the server trains a copy of the global model on rows of the lineage's public
trusted set (the reference update g0, clipped to C like a site's). A site's update u_i is
scored by its direction's agreement with g0, TS_i = ReLU(cos(u_i, g0)), rescaled to
‖g0‖, and the aggregate is base + Σ TS_i·u_i·‖g0‖/‖u_i‖ / Σ TS_i. A site that scales its
update gains nothing (rescaled), one that points away (sign flip, label flip on a skewed
site) gets weight 0. If no site agrees the round moves nowhere (the base is returned).

Privacy: the output is base plus a convex combination of vectors of norm ‖g0‖ ≤ C, so two
outputs that differ in one site are at most 2C apart: against the wrapper's noise std
σ·C/K the effective noise multiplier is σ/(2K) (`strategy.effective_noise`). The reference
reads public rows only (`server.FederatedRun` refuses `fltrust` with a private trusted
set): the weights it gives the sites must not carry private data into the release.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

__all__ = ["FLTrust", "trust_scores"]


def _flat(state: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> np.ndarray:
    keys = [k for k, v in base.items() if v.dtype.kind == "f"]
    if not keys:
        return np.zeros(0)
    return np.concatenate(
        [(np.asarray(state[k], np.float64) - base[k].astype(np.float64)).ravel() for k in keys]
    )


def trust_scores(updates: list[np.ndarray], reference: np.ndarray) -> np.ndarray:
    """ReLU(cos(u_i, g0)) per update (0 for a zero update or a zero reference)."""
    ref_norm = float(np.linalg.norm(reference))
    out = np.zeros(len(updates))
    for i, u in enumerate(updates):
        n = float(np.linalg.norm(u))
        if n > 0 and ref_norm > 0 and math.isfinite(n):
            out[i] = max(0.0, float(u @ reference) / (n * ref_norm))
    return out


class FLTrust(FedAvg):
    """FedAvg's sampling and metrics; arrays aggregated by trust against `reference` (the
    server's own update from `base`, the model the round sent). Set both with
    `set_reference` before `aggregate_train`."""

    base: dict[str, np.ndarray] | None = None
    reference: dict[str, np.ndarray] | None = None
    last_scores: list[float]

    def set_reference(
        self, base: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> None:
        self.base, self.reference = dict(base), dict(reference)
        self.last_scores = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.base is None or self.reference is None:
            raise RuntimeError("FLTrust needs set_reference(base, reference) each round")
        replies = list(replies)
        _, metrics = super().aggregate_train(server_round, replies)  # counts, loss
        base, g0 = self.base, _flat(self.reference, self.base)
        ref_norm = float(np.linalg.norm(g0))
        updates = []
        for m in replies:
            record = m.content.array_records[self.arrayrecord_key]
            arrays = dict(zip(record.keys(), record.to_numpy_ndarrays(), strict=True))
            updates.append(_flat(arrays, base))
        scores = trust_scores(updates, g0)
        self.last_scores = [float(s) for s in scores]
        total = np.zeros_like(g0)
        if scores.sum() > 0:
            for s, u in zip(scores, updates, strict=True):
                if s > 0:
                    total += s * u * (ref_norm / float(np.linalg.norm(u)))
            total /= scores.sum()
        out: dict[str, np.ndarray] = {}
        offset = 0
        for k, v in base.items():
            if v.dtype.kind != "f":
                out[k] = v.copy()
                continue
            part = total[offset : offset + v.size].reshape(v.shape)
            offset += v.size
            out[k] = (v.astype(np.float64) + part).astype(v.dtype)
        return ArrayRecord({k: torch.from_numpy(v) for k, v in out.items()}), metrics
