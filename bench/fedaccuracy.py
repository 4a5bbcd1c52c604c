"""`python -m bench fedaccuracy`: federated versus centralized accuracy, same partition.

K sites with Dirichlet(α=0.5) label-skewed shares of the demo's changed world. Federated:
R rounds of `FederatedRun` over `InProcessGrid` — the same ClientApp, strategy, DP
wrapper and ledger as the deployment, without the transport (which changes no number).
Centralized: one site holding the union of the K shares, the same local training (DP-SGD,
same budget, steps and public replay) for the same R rounds, no aggregation. Both are
scored on the union's holdout. Target: federated within 3 points of centralized.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import typer


def run(root: Path, clients: int, rounds: int, alpha: float, epsilon: float,
        strategy: str, seed: int) -> dict:
    import numpy as np

    from flywheel.learner.federated.client_app import Site
    from flywheel.learner.federated.demo import build_homes
    from flywheel.learner.federated.inprocess import InProcessGrid
    from flywheel.learner.federated.partition import Partition, make_partition
    from flywheel.learner.federated.server import FederatedRun, RunOptions

    part = make_partition(clients, alpha=alpha, seed=seed)
    union = Partition([part.union], part.holdout)
    out = {}
    for name, p in (("federated", part), ("centralized", union)):
        platform, sites = build_homes(root / name, len(p.sites), p, rounds=rounds,
                                      privacy_epsilon=epsilon)
        options = RunOptions.from_settings(platform, rounds=rounds, clients=len(p.sites),
                                           min_clients=len(p.sites), strategy=strategy,
                                           publish=False)
        grid = InProcessGrid([Site(s) for s in sites])
        try:
            summary = FederatedRun(platform, options).run(grid)
        finally:
            grid.close()
        out[name] = {"accuracy": [r.recent_accuracy for r in summary.rounds],
                     "trusted": [r.trusted_accuracy for r in summary.rounds],
                     "epsilon_client": summary.epsilon}
    out["sites"] = [np.bincount(y, minlength=3).tolist() for _, y in part.sites]
    return out


def main(
    clients: int = typer.Option(3, "--clients", min=2, max=16),
    rounds: int = typer.Option(8, "--rounds", min=1, max=100),
    alpha: float = typer.Option(0.5, "--alpha", min=0.01, help="Dirichlet concentration."),
    epsilon: float = typer.Option(8.0, "--epsilon", min=0.1,
                                  help="Each site's per-source ε budget over the rounds."),
    strategy: str = typer.Option("fedavg", help="fedavg | trimmed | median."),
    seed: int = typer.Option(7, help="Partition seed."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Federated vs centralized accuracy on the same Dirichlet(α) partition."""
    import logging

    from rich.console import Console
    from rich.table import Table

    from bench._streams import machine, machine_line, one_thread

    logging.getLogger("flwr").setLevel(logging.WARNING)
    m = machine()
    date = datetime.now(UTC).isoformat(timespec="seconds")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-fedaccuracy-") as tmp, one_thread():
        res = run(Path(tmp), clients, rounds, alpha, epsilon, strategy, seed)
    m["loadavg_end"] = list(os.getloadavg())
    gap = res["centralized"]["accuracy"][-1] - res["federated"]["accuracy"][-1]
    doc = {"benchmark": "fedaccuracy", "date": date, "machine": m, "clients": clients,
           "rounds": rounds, "alpha": alpha, "epsilon": epsilon, "strategy": strategy,
           "seed": seed, "seconds": time.perf_counter() - started, **res,
           "gap_points": 100 * gap, "target_points": 3.0}
    if json_out:
        print(json.dumps(doc, indent=2, default=str))
        return
    table = Table(title=f"union-holdout accuracy per round, {clients} sites, α={alpha}")
    table.add_column("round")
    table.add_column("federated")
    table.add_column("centralized")
    for i, (f, c) in enumerate(zip(res["federated"]["accuracy"],
                                   res["centralized"]["accuracy"], strict=True)):
        table.add_row(str(i + 1), f"{f:.3f}", f"{c:.3f}")
    console = Console()
    console.print(table)
    console.print(f"gap {100 * gap:+.1f} points (target ≤ 3); sites' label counts "
                  f"{res['sites']}")
    console.print(machine_line(m, date))
