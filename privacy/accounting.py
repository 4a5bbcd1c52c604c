"""How much ε a sequence of DP updates spends: Opacus accountants, dp-accounting check.

Each update is recorded as a `Mechanism` of one of two kinds:
* "dp-sgd": `steps` applications of the Poisson-subsampled Gaussian mechanism with
  sampling rate `sample_rate` and noise multiplier `noise_multiplier`;
* "tree": DP-FTRL's tree aggregation (Kairouz et al. 2021) over `steps` leaves, every
  record in one leaf (`sample_rate` is 1: no sampling), σ per tree node; a fresh tree
  per update, so updates compose like independent mechanisms.
A source's ε is the composition of the mechanisms of the updates it took part in, so the
same function serves a whole lineage and a single source.

Trees are accounted by Google's dp-accounting (`SingleEpochTreeAggregationDpEvent`, RDP
under the replace-special relation, the only one it takes them under); a composition
that holds a tree is accounted there whole (its DP-SGD steps as Poisson-sampled events
under the same relation), whatever the accountant setting. `tree_epsilon_independent`
is the cross-check: it counts the tree nodes a leaf reaches itself and converts the
Gaussian RDP to ε by its own optimisation over a continuous order.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from dp_accounting import DpEvent

Accountant = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
MechanismKind = Literal["dp-sgd", "tree"]
KINDS: tuple[str, ...] = ("dp-sgd", "tree")
PRV_EPS_ERROR = 1e-3


@dataclass(frozen=True, order=True)
class Mechanism:
    """`steps` Poisson-subsampled Gaussian steps ("dp-sgd"), or one aggregation tree of
    `steps` leaves ("tree", `sample_rate` 1); hashable so results can be cached."""

    sample_rate: float
    noise_multiplier: float
    steps: int
    kind: str = "dp-sgd"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"mechanism kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "tree" and self.sample_rate != 1:
            raise ValueError(
                f"a tree aggregation samples nothing: sample_rate must be 1, got {self.sample_rate}"
            )
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.noise_multiplier <= 0:
            raise ValueError(
                f"noise_multiplier must be > 0 for a finite ε, got {self.noise_multiplier}"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def epsilon(mechanisms: Iterable[Mechanism], delta: float, accountant: Accountant = "rdp") -> float:
    """ε of the composition of `mechanisms` at `delta`, by the Opacus accountant named
    (with a tree among them: by dp-accounting's RDP, see the module docstring)."""
    steps: dict[tuple[float, float], int] = {}
    trees: list[Mechanism] = []
    for m in mechanisms:  # same (q, σ): steps add, so merge them (and cache better)
        if m.kind == "tree":  # two trees of 8 leaves are not one of 16: kept apart
            trees.append(m)
            continue
        steps[(m.sample_rate, m.noise_multiplier)] = (
            steps.get((m.sample_rate, m.noise_multiplier), 0) + m.steps
        )
    key = tuple(sorted([*(Mechanism(q, sigma, n) for (q, sigma), n in steps.items()), *trees]))
    if not key:
        return 0.0
    if trees:
        return _tree_epsilon(key, float(delta))
    return _epsilon(key, float(delta), accountant)


@lru_cache(maxsize=4096)
def _tree_epsilon(mechanisms: tuple[Mechanism, ...], delta: float) -> float:
    from dp_accounting import SingleEpochTreeAggregationDpEvent
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_SPECIAL)
    counts: dict[Mechanism, int] = {}
    for m in mechanisms:
        counts[m] = counts.get(m, 0) + 1
    with _quiet_absl():
        for m, n in counts.items():
            if m.kind == "tree":
                acc.compose(SingleEpochTreeAggregationDpEvent(m.noise_multiplier, m.steps), n)
            else:
                acc.compose(_sgd_event(m), n)
        return float(acc.get_epsilon(delta))


def _sgd_event(m: Mechanism) -> DpEvent:
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent

    return SelfComposedDpEvent(
        PoissonSampledDpEvent(m.sample_rate, GaussianDpEvent(m.noise_multiplier)), m.steps
    )


@contextmanager
def _quiet_absl() -> Iterator[None]:
    absl = logging.getLogger("absl")  # warns about orders it skips, as Opacus does
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def tree_nodes_touched(leaves: int) -> int:
    """Most nodes of a binary aggregation tree over `leaves` leaves that one leaf is in,
    counting only the nodes released (those complete once the last leaf is in): found by
    walking the dyadic intervals, not by formula. At most ⌈log2(leaves)⌉ + 1; for 8
    leaves, 4."""
    if leaves < 1:
        raise ValueError(f"a tree needs >= 1 leaf, got {leaves}")
    worst = 0
    for leaf in range(leaves):
        nodes, size = 0, 1
        while size <= leaves:
            start = leaf // size * size
            nodes += start + size <= leaves  # the interval holding `leaf` is complete
            size *= 2
        worst = max(worst, nodes)
    return worst


def tree_epsilon_independent(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """ε of a composition of trees without dp-accounting: the cross-check of `epsilon`.

    One record changes every node it is in by at most C (its leaf's clipped gradient),
    so one tree is the Gaussian mechanism with sensitivity C·√k (k: `tree_nodes_touched`)
    and noise σC per node: RDP α·k/(2σ²), i.e. ρ-zCDP with ρ = k/(2σ²); trees add their ρ.
    To (ε, δ) by Canonne, Kamath and Steinke's conversion (2020, Prop. 12; the one
    dp-accounting and Opacus use), minimised over a continuous order α > 1 (scipy)
    instead of dp-accounting's fixed list of orders.
    """
    from scipy.optimize import minimize_scalar

    if any(m.kind != "tree" for m in mechanisms):
        raise ValueError("tree_epsilon_independent accounts trees only")
    rho = sum(tree_nodes_touched(m.steps) / (2 * m.noise_multiplier**2) for m in mechanisms)
    if rho == 0:
        return 0.0

    def eps(alpha: float) -> float:
        return (
            alpha * rho
            + math.log((alpha - 1) / alpha)
            - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        )

    best = minimize_scalar(eps, bounds=(1 + 1e-6, 1e6), method="bounded", options={"xatol": 1e-9})
    return max(0.0, float(best.fun))


@lru_cache(maxsize=4096)
def _epsilon(mechanisms: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    acc.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in mechanisms]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha" is expected
        if accountant == "prv":  # Opacus' default error (0.01) is ~1 % off the exact PLD
            return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
        return float(acc.get_epsilon(delta=delta))


def dp_accounting_epsilon(
    mechanisms: Sequence[Mechanism], delta: float, accountant: Accountant = "rdp"
) -> float:
    """The same ε by Google's dp-accounting (RDP, or PLD for "prv"): the cross-check of
    DP-SGD compositions (trees have `tree_epsilon_independent`)."""
    if any(m.kind == "tree" for m in mechanisms):
        raise ValueError("trees are checked by tree_epsilon_independent")
    from dp_accounting import (
        ComposedDpEvent,
        GaussianDpEvent,
        PoissonSampledDpEvent,
        SelfComposedDpEvent,
    )
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    event = ComposedDpEvent(
        [
            SelfComposedDpEvent(
                PoissonSampledDpEvent(m.sample_rate, GaussianDpEvent(m.noise_multiplier)), m.steps
            )
            for m in mechanisms
        ]
    )
    acc = RdpAccountant() if accountant == "rdp" else PLDAccountant()
    with _quiet_absl():
        return float(acc.compose(event).get_epsilon(delta))


@lru_cache(maxsize=256)
def noise_for_budget(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
) -> float:
    """The smallest noise multiplier for which `steps` steps stay within `target_epsilon`.

    Cached per parameter set (a pure function of them): Opacus' bisection runs its
    accountant some 20 times, 5.3 s for the product's defaults (ε 3, δ 1e-5, q 0.5, 16
    steps) on a 2-core EPYC at load ~1–5, paid by every `DPConfig.mechanism` call: every
    learner start, every benchmark arm and every federated site. The σ it returns is not
    trusted on its own either way: `plan_update` accounts every update with it again.
    """
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.005,
            )
        )


@lru_cache(maxsize=256)
def tree_noise_for_budget(target_epsilon: float, delta: float, leaves: int, trees: int) -> float:
    """The smallest σ per node (to 0.1 %) for which `trees` trees of `leaves` leaves stay
    within `target_epsilon` (bisection on dp-accounting's ε, which falls as σ grows).
    Cached per parameter set, as `noise_for_budget` is."""
    low, high = 1e-2, 1e4
    for _ in range(60):
        mid = math.sqrt(low * high)
        spent = epsilon([Mechanism(1.0, mid, leaves, "tree")] * trees, delta)
        low, high = (mid, high) if spent > target_epsilon else (low, mid)
        if high / low < 1.001:
            break
    return high
