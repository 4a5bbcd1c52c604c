"""`python -m bench fedaccuracy`: federated versus centralized accuracy, same partition.

K sites with Dirichlet(α=0.5) label-skewed shares of the demo's changed world. Federated:
R rounds of `FederatedRun` over `InProcessGrid` — the same ClientApp, strategy, DP
wrapper and ledger as the deployment, without the transport (which changes no number).
Centralized: one site holding the union of the K shares, the same local training (DP-SGD,
same per-source budget, steps and public replay) for the same R rounds. Like for like, the
centralized model gets the same Gaussian noise std on each round's release as the
federation's aggregate (σ·C/K; the wrapper would give one site σ·C, K times more:
`--no-match-noise`, the method before 2026-11-22). Both are scored on the union's holdout.
Each run is repeated with `--repeats` seeds (local DP-SGD noise, public-replay draw,
central noise; the partition stays fixed) and the gap is read on the mean over seeds of
the last three rounds (also reported: the final round). Target: within 3 points.

Both sides run the same site configuration (DP-SGD sampling rate `--sample-rate`, steps
`--local-steps`, the same per-source (ε, δ) over the planned rounds) and the same
server-side post-processing of the released aggregates (`--server-momentum`,
`--average-last`: a federation of one gets it too), so the per-source guarantee and
everything the platform does with the releases are equal; only where the data sit differs.
Accuracy on the seed ("trusted") holdout is reported too: the gate checks it.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import typer


def run(
    root: Path,
    clients: int,
    rounds: int,
    alpha: float,
    epsilon: float,
    strategy: str,
    seed: int,
    settings: dict | None = None,
    options: dict | None = None,
    match_noise: bool = True,
    which: tuple[str, ...] = ("federated", "centralized"),
) -> dict:
    import numpy as np

    from flywheel.learner.federated.client_app import Site
    from flywheel.learner.federated.config import FederatedConfig
    from flywheel.learner.federated.demo import build_homes
    from flywheel.learner.federated.inprocess import InProcessGrid
    from flywheel.learner.federated.partition import Partition, make_partition
    from flywheel.learner.federated.server import FederatedRun, RunOptions
    from flywheel.registry import Registry

    part = make_partition(clients, alpha=alpha, seed=seed)
    union = Partition([part.union], part.holdout)
    out = {}
    for name, p in (("federated", part), ("centralized", union)):
        if name not in which:
            continue
        platform, sites = build_homes(
            root / name, len(p.sites), p, rounds=rounds, privacy_epsilon=epsilon, **(settings or {})
        )
        opts = RunOptions.from_settings(
            platform.federated,
            platform.trusted,
            rounds=rounds,
            clients=len(p.sites),
            min_clients=len(p.sites),
            strategy=strategy,
            publish=False,
            **(options or {}),
        )
        if match_noise and name == "centralized":
            # the wrapper's noise std is σ·C/K: one site would get K times the federation's
            from dataclasses import replace

            opts = replace(opts, noise_multiplier=opts.noise_multiplier / len(part.sites))
        # paired runs: each site's own fixed noise seed (a site's choice, experiments only),
        # per repeat (the options' seed) and per site
        noise = int((options or {}).get("seed", 0))
        grid = InProcessGrid(
            [
                Site.of(s.model_copy(update={"fed_site_noise_seed": 1000 * noise + k}))
                for k, s in enumerate(sites)
            ]
        )
        try:
            summary = FederatedRun(FederatedConfig.of(platform), opts, Registry.of(platform)).run(
                grid
            )
        finally:
            grid.close()
        out[name] = {
            "accuracy": [r.recent_accuracy for r in summary.rounds],
            "trusted": [r.trusted_accuracy for r in summary.rounds],
            "global_accuracy": [r.global_recent_accuracy for r in summary.rounds],
            "epsilon_client": summary.epsilon,
        }
    out["sites"] = [np.bincount(y, minlength=3).tolist() for _, y in part.sites]
    return out


def main(
    clients: int = typer.Option(3, "--clients", min=2, max=16),
    rounds: int = typer.Option(16, "--rounds", min=1, max=100),
    alpha: float = typer.Option(0.5, "--alpha", min=0.01, help="Dirichlet concentration."),
    epsilon: float = typer.Option(
        8.0, "--epsilon", min=0.1, help="Each site's per-source ε budget over the rounds."
    ),
    strategy: str = typer.Option("fedavg", help="fedavg | trimmed | median."),
    seed: int = typer.Option(7, help="Partition seed."),
    repeats: int = typer.Option(
        3, "--repeats", min=1, max=20, help="Noise seeds 0..N-1 averaged (same partition)."
    ),
    match_noise: bool = typer.Option(
        True, "--match-noise/--no-match-noise", help="Centralized gets the federation's noise std."
    ),
    last: int = typer.Option(3, "--last", min=1, help="Rounds averaged for the gap."),
    sample_rate: float = typer.Option(
        1.0, "--sample-rate", min=0.01, max=1.0, help="Sites' DP-SGD sampling rate q."
    ),
    local_steps: int = typer.Option(
        10, "--local-steps", min=1, help="DP-SGD steps per site and round."
    ),
    server_momentum: float = typer.Option(
        0.0, "--server-momentum", min=0.0, max=0.99, help="Server momentum on the released updates."
    ),
    average_last: int = typer.Option(
        0,
        "--average-last",
        min=0,
        help="Served model = mean of the last N global models (0: the last half of the rounds).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Federated vs centralized accuracy on the same Dirichlet(α) partition."""
    import logging

    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from bench._streams import one_thread
    from bench.harness import document, machine, machine_line, now, quiet_loggers

    m = machine()
    date = now()
    started = time.perf_counter()
    runs = []
    for r in range(repeats):
        with (
            tempfile.TemporaryDirectory(prefix="bench-fedaccuracy-") as tmp,
            one_thread(),
            quiet_loggers({"flwr": logging.WARNING}),
        ):
            # noise_seed: reproducible central noise, for this experiment only
            runs.append(
                run(
                    Path(tmp),
                    clients,
                    rounds,
                    alpha,
                    epsilon,
                    strategy,
                    seed,
                    settings={"fed_privacy_sample_rate": sample_rate},
                    options={
                        "seed": r,
                        "noise_seed": r,
                        "local_steps": local_steps,
                        "server_momentum": server_momentum,
                        "average_last": average_last,
                    },
                    match_noise=match_noise,
                )
            )
    k = min(last, rounds)
    res: dict = {"sites": runs[0]["sites"]}
    for name in ("federated", "centralized"):
        acc = np.asarray([x[name]["accuracy"] for x in runs])
        res[name] = {
            "accuracy_per_seed": acc.tolist(),
            "mean_per_round": acc.mean(0).tolist(),
            "final": float(acc[:, -1].mean()),
            "final_sd": float(acc[:, -1].std()),
            "trusted_mean_per_round": np.asarray([x[name]["trusted"] for x in runs])
            .mean(0)
            .tolist(),
            "global_mean_per_round": np.asarray([x[name]["global_accuracy"] for x in runs])
            .mean(0)
            .tolist(),
            "last_mean": float(acc[:, -k:].mean()),
            "epsilon_client": [x[name]["epsilon_client"] for x in runs],
        }
    gap = res["centralized"]["last_mean"] - res["federated"]["last_mean"]
    gap_final = res["centralized"]["final"] - res["federated"]["final"]
    doc = document(
        "fedaccuracy",
        m,
        {
            "clients": clients,
            "rounds": rounds,
            "alpha": alpha,
            "epsilon": epsilon,
            "strategy": strategy,
            "seed": seed,
            "repeats": repeats,
            "match_noise": match_noise,
            "last": k,
            "sample_rate": sample_rate,
            "local_steps": local_steps,
            "server_momentum": server_momentum,
            "average_last": average_last,
            "seconds": time.perf_counter() - started,
            **res,
            "gap_points": 100 * gap,
            "gap_final_points": 100 * gap_final,
            "target_points": 3.0,
        },
        date=date,
        command=False,
    )
    if json_out:
        print(json.dumps(doc, indent=2, default=str))
        return
    table = Table(
        title=f"union-holdout accuracy per round, mean of {repeats} seeds, "
        f"{clients} sites, α={alpha}"
    )
    table.add_column("round")
    table.add_column("federated")
    table.add_column("centralized")
    table.add_column("federated trusted")
    table.add_column("centralized trusted")
    for i, row in enumerate(
        zip(
            res["federated"]["mean_per_round"],
            res["centralized"]["mean_per_round"],
            res["federated"]["trusted_mean_per_round"],
            res["centralized"]["trusted_mean_per_round"],
            strict=True,
        )
    ):
        table.add_row(str(i + 1), *(f"{v:.3f}" for v in row))
    console = Console()
    console.print(table)
    console.print(
        f"gap {100 * gap:+.1f} points over the last {k} rounds, "
        f"{100 * gap_final:+.1f} at the final round (target ≤ 3); sites' label "
        f"counts {res['sites']}"
    )
    console.print(machine_line(m, date))
