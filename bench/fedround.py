"""`python -m bench fedround`: the round overhead of a loopback federation.

One SuperLink and K sites (`flywheel fed superlink` / `flywheel fed client`, real
processes, each site with its own SQLite store), R rounds of FedAvg, side by side:

* flywheel: SuperNodes with `--isolation process` and our long-lived ClientApp worker,
  the SuperNode's poll capped at FLYWHEEL_FED_POLL_S, the ServerApp polling for replies
  at the same interval (`FastGrid`);
* flower defaults: plain `flower-supernode` (a `flwr-clientapp` process per message, 3 s
  SuperNode poll) and a ServerApp that polls for replies every 3 s, as Flower's grid does.

Overhead = round wall time (send to aggregated) − the slowest site's own work (store
read, accounting, training, as the site measures it). Sites train without DP and take a
few steps so their work is small and the figure is the orchestration. The first round
(FAB install, first imports) is reported apart. Target: ≤ 3 s per round.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import typer

MODES = ("flywheel", "flower-defaults")


def run_mode(mode: str, root: Path, clients: int, rounds: int) -> dict:
    from flywheel.learner.federated.demo import build_homes
    from flywheel.learner.federated.partition import make_partition
    from flywheel.learner.federated.processes import LocalFederation
    from flywheel.learner.federated.server import RunOptions
    from flywheel.learner.seed_model import ensure_champion
    from flywheel.registry import Registry

    poll = 0.1 if mode == "flywheel" else 3.0
    platform, sites = build_homes(
        root,
        clients,
        make_partition(clients, per_site=200),
        rounds=rounds,
        privacy_enabled=False,
        fed_poll_s=poll,
    )
    ensure_champion(platform.trusted, Registry.of(platform))
    options = RunOptions.from_settings(
        platform.federated,
        platform.trusted,
        rounds=rounds,
        clients=clients,
        min_clients=clients,
        local_steps=5,
        publish=False,
    )
    fed = LocalFederation(
        platform, sites, logs=root / "logs", flower_defaults=mode == "flower-defaults"
    )
    started = time.perf_counter()
    with fed:
        fed.wait_for_sites(clients, timeout_s=180)
        ready = time.perf_counter() - started
        summary = fed.run(options, timeout_s=900)
    later = summary["rounds"][1:] or summary["rounds"]
    return {
        "mode": mode,
        "poll_s": poll,
        "startup_s": ready,
        "first_round_s": summary["rounds"][0]["wall_s"],
        "round_wall_s": statistics.median(r["wall_s"] for r in later),
        "client_compute_s": statistics.median(r["client_compute_s"] for r in later),
        "overhead_s": statistics.median(r["overhead_s"] for r in later),
        "overhead_max_s": max(r["overhead_s"] for r in later),
        "rounds": summary["rounds"],
    }


def main(
    clients: int = typer.Option(3, "--clients", min=1, max=16),
    rounds: int = typer.Option(4, "--rounds", min=2, max=100),
    modes: str = typer.Option(",".join(MODES), "--modes", help="Comma-separated subset."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Round overhead on loopback: flywheel's latency fixes vs Flower's defaults."""

    from rich.console import Console
    from rich.table import Table

    from bench.harness import document, machine, machine_line, now

    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    if any(m not in MODES for m in chosen):
        raise typer.BadParameter(f"modes are {', '.join(MODES)}")
    m = machine()
    date = now()
    started = time.perf_counter()
    results = []
    for mode in chosen:
        with tempfile.TemporaryDirectory(prefix=f"bench-fedround-{mode}-") as tmp:
            results.append(run_mode(mode, Path(tmp), clients, rounds))
    doc = document(
        "fedround",
        m,
        {
            "clients": clients,
            "rounds": rounds,
            "seconds": time.perf_counter() - started,
            "results": results,
            "target_overhead_s": 3.0,
        },
        date=date,
        command=False,
    )
    if json_out:
        print(json.dumps(doc, indent=2, default=str))
        return
    table = Table(title=f"federated round overhead, {clients} sites, {rounds} rounds")
    for col in (
        "mode",
        "poll s",
        "round wall s",
        "site work s",
        "overhead s (median)",
        "overhead max s",
        "first round s",
        "start s",
    ):
        table.add_column(col)
    for r in results:
        table.add_row(
            r["mode"],
            f"{r['poll_s']:g}",
            f"{r['round_wall_s']:.2f}",
            f"{r['client_compute_s']:.2f}",
            f"{r['overhead_s']:.2f}",
            f"{r['overhead_max_s']:.2f}",
            f"{r['first_round_s']:.2f}",
            f"{r['startup_s']:.1f}",
        )
    console = Console()
    console.print(table)
    console.print(machine_line(m, date))
