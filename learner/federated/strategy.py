"""The platform's aggregation: a Flower strategy inside Flower's DP fixed-clipping wrapper,
and the client-level ε that wrapper's noise buys (Flower computes none; we do).

Each site's update is clipped to L2 norm C (by the site, and again by the server with
`server` clipping); the wrapper adds Gaussian noise of std σ·C/K to the aggregate of K
sites. Accounting, per round, with `flywheel.privacy` (a Gaussian mechanism, no sampling
amplification claimed: K of N are chosen by Flower, not Poisson-sampled):

* `fedavg`: the unweighted mean of K clipped updates moves by at most C/K when one site's
  update changes, so the noise multiplier is σ.
* `fltrust` (`fltrust.FLTrust`): the output is the base plus a convex combination of
  vectors of norm ≤ C, so it moves by at most 2C: effective multiplier σ / (2K).
* `trimmed` / `median`: every coordinate of the output lies within the sites'
  coordinates, so two outputs differ by at most 2·√(K+1)·C; the effective noise
  multiplier is σ / (2·K·√(K+1)). Robustness costs ε at this noise level; that is the
  honest number, not a tuning choice.
"""

from __future__ import annotations

import math
from typing import TypedDict

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)

from flywheel.learner.federated.fltrust import FLTrust
from flywheel.learner.federated.records import ARRAYS, CONFIG, WEIGHT_KEY
from flywheel.privacy import Mechanism

STRATEGIES = ("fedavg", "trimmed", "median", "fltrust")
CLIPPINGS = ("client", "server")  # Flower's DP fixed-clipping wrappers


class _Common(TypedDict):
    """The arguments all three strategies take alike (typed, so each call is checked)."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    weighted_by_key: str
    arrayrecord_key: str
    configrecord_key: str


def build_strategy(
    name: str,
    *,
    sites: int,
    clip: float,
    noise_multiplier: float,
    clipping: str = "client",
    trim_beta: float = 0.34,
) -> Strategy:
    """`name` over exactly `sites` sites, wrapped in the DP fixed-clipping wrapper."""
    common = _Common(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=sites,
        min_evaluate_nodes=0,
        min_available_nodes=sites,
        weighted_by_key=WEIGHT_KEY,
        arrayrecord_key=ARRAYS,
        configrecord_key=CONFIG,
    )
    if name == "fedavg":
        base: Strategy = FedAvg(**common)
    elif name == "trimmed":
        base = FedTrimmedAvg(**common, beta=trim_beta)
    elif name == "median":
        base = FedMedian(**common)
    elif name == "fltrust":
        base = FLTrust(**common)
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    wrapper = {
        "client": DifferentialPrivacyClientSideFixedClipping,
        "server": DifferentialPrivacyServerSideFixedClipping,
    }.get(clipping)
    if wrapper is None:
        raise ValueError(f"DP clipping must be client or server, got {clipping!r}")
    return wrapper(
        base, noise_multiplier=noise_multiplier, clipping_norm=clip, num_sampled_clients=sites
    )


def effective_noise(name: str, noise_multiplier: float, sites: int) -> float:
    """Noise std over the aggregate's L2 sensitivity (see the module docstring)."""
    if name == "fedavg":
        return noise_multiplier
    if name == "fltrust":  # base + a convex mix of vectors of norm ≤ C: outputs 2C apart
        return noise_multiplier / (2 * sites)
    return noise_multiplier / (2 * sites * math.sqrt(sites + 1))


def client_mechanism(name: str, noise_multiplier: float, sites: int) -> Mechanism:
    """One round as seen by one site: one Gaussian release, no sampling amplification."""
    return Mechanism(1.0, round(effective_noise(name, noise_multiplier, sites), 9), 1)
