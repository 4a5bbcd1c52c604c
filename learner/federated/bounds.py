"""The server's bounds on what a site may contribute, whatever the strategy and clipping.

A site is another party: `records.check_update` checks a reply's form (names, shapes,
finite numbers, counts); this module checks what it would do to the model. Measured
(issue 31), before these checks: one site scaling its update ×1e6 under FedAvg with
client-side clipping (the default, which trusts the sites to clip) dropped the
union-holdout accuracy from 0.56–0.65 to 0.20–0.36; a float64 reply carrying a 1e300
weight passed the form checks, FedAvg's mean overflowed to infinity when cast to the
float32 model and the run registered a version with non-finite weights.

* `check_dtypes`: each array's dtype equals the model the server sent. A float64 reply to
  a float32 model is refused, not cast: the site's own code produced a different model
  than it was sent, and a cast would hide an overflow (1e300 → inf) until the mean.
* `bound_update`: the update (reply − the model sent, in float64) has a finite L2 norm of
  at most the clip norm C (FLYWHEEL_FED_CLIP_NORM), with client-side clipping too (where
  Flower's wrapper trusts the site's clip). A longer one is refused, not re-clipped: an
  honest site clips its own update to C, and re-clipped, the ×1e6 site still had a
  full-length vote against the honest sites' shorter ones (FedAvg, client clipping, 3
  rounds: 0.46 against 0.565 without it; refused: see the attack test).
* `all_finite`: an aggregate is loaded (and a model registered) only if every number in
  it is finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Message

from flywheel.learner.federated.records import ARRAYS, from_record, to_record

__all__ = ["CLIP_SLACK", "ROUNDING", "all_finite", "bound_update", "check_dtypes", "sent_arrays"]

# float32 rounding of a site's own clip (base + update·C/‖update‖) lands a hair above C;
# that is not an attack and is left as sent
CLIP_SLACK = 1e-4
ROUNDING = 1e-5  # an update within this of C (or over it, within CLIP_SLACK) ends there


def sent_arrays(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The model as sent to the sites: numpy copies, the reference every reply is checked
    against."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def check_dtypes(reply: Message, sent: Mapping[str, np.ndarray]) -> str | None:
    """Why `reply`'s arrays differ in dtype from the model sent, or None."""
    for key, array in reply.content.array_records[ARRAYS].items():
        dtype = array.numpy().dtype
        if dtype != sent[key].dtype:
            return f"array {key!r} has dtype {dtype}, the model sent has {sent[key].dtype}"
    return None


def bound_update(reply: Message, sent: Mapping[str, np.ndarray], clip: float) -> str | None:
    """Why the update in `reply` (reply − `sent`, floating arrays only: integer buffers are
    not trained and the server keeps its own) is refused, or None: its L2 norm must be
    finite and at most `clip`. An honest site clips its own update to `clip`
    (`client_app.round_config`), so a longer one is a site not following the protocol."""
    new = from_record(reply.content.array_records[ARRAYS])
    total = 0.0
    for key, base in sent.items():
        if base.dtype.kind != "f":
            continue
        diff = new[key].double().numpy() - base.astype(np.float64)
        if not np.isfinite(diff).all():
            return f"array {key!r}: update not finite"
        total += float((diff**2).sum())  # float32 inputs: at most ~1e77, no overflow
    norm = math.sqrt(total)
    if not math.isfinite(norm):
        return "update norm not finite"
    if norm > clip * (1 + CLIP_SLACK):
        return f"update norm {norm:.4g} over the clip norm {clip:g}"
    if norm > clip * (1 - ROUNDING):
        # a site's own clip, rounded to float32, a hair over C: scaled just under it, or
        # Flower's server-side clip would scale the integer buffers too, and fail (seen:
        # "Cannot cast ufunc 'multiply' output from float64 to int64", round dropped)
        scale = clip * (1 - ROUNDING) / norm
        scaled = {}
        for key, base in sent.items():
            if base.dtype.kind != "f":
                scaled[key] = new[key]
                continue
            b = torch.from_numpy(base.astype(np.float64))
            scaled[key] = (b + (new[key].double() - b) * scale).to(new[key].dtype)
        reply.content[ARRAYS] = to_record(scaled)
    return None


def all_finite(state: Mapping[str, torch.Tensor]) -> bool:
    """Every floating number of `state` is finite."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
