"""`python -m bench fedrobust`: what one cheating site costs each aggregation strategy.

K Dirichlet(α=0.5) sites (`make_partition`), R rounds of `FederatedRun` over
`InProcessGrid` (the deployment's ClientApp, strategies, DP wrappers, server bounds and
ledger, no transport), scored on the union's holdout (the served model's accuracy, mean of
the last two rounds). One attacker at a time, the last site:

* `labelflip`: its store holds its rows with every label moved to the next one;
* `scale`: its update boosted ×1e6;
* `signflip`: its update negated;
* `stale`: it replies, every round, with the model it returned in the first round.

Two worlds (`--world`), as the platform's trusted set relates to the sites' data:

* `drifted` (the demo's platform): the trusted set is the synthetic problem the champion
  was trained on, the world *before* the drift the sites' data show;
* `same` (the FLTrust paper's setting): after the champion is made, the platform's trusted
  set is replaced by a small root set (`--root-rows`, 100 as in Cao et al. 2021, and as
  many holdout rows) drawn from the sites' drifted world (`partition.root_set`); the
  champion stays the pre-drift one, so every run starts where the `drifted` ones do.

The trusted set is public in both, so the sites' public replay (FLYWHEEL_FED_PUBLIC_REPLAY)
draws from it too: the two worlds' tables differ for every strategy, not only `fltrust`.

Each strategy (`fedavg`, `trimmed`, `median`, `fltrust`) runs without an attacker and with
each one; the table gives the points lost against its own no-attack run. Targets (issue
31): `fltrust` loses ≤ 2 points to any one attacker, and without an attacker is within 1
point of `fedavg`. Paired runs: every site's DP noise seed, the central noise seed and the
partition are the same in every run, so runs differ only in strategy and attacker.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import typer

ATTACKS = ("none", "labelflip", "scale", "signflip", "stale")
STRATEGIES = ("fedavg", "trimmed", "median", "fltrust")
WORLDS = ("drifted", "same")
ROOT_SOURCE = "bench:fedrobust root set of the drifted world"


def use_root_set(platform: object, rows: int, seed: int) -> None:
    """Make the platform's champion (the pre-drift synthetic problem, through `flywheel
    init`), then replace its lineage's trusted set by `rows` train and `rows` holdout
    rows of the sites' drifted world, public, under the champion's schema."""
    import dataclasses
    import hashlib

    from flywheel.learner.federated.partition import root_set
    from flywheel.learner.seed_model import ensure_champion
    from flywheel.registry import Registry
    from flywheel.settings import Settings
    from flywheel.store import (
        Split,
        delete_trusted,
        make_engine,
        session_factory,
        trusted_info,
        write_trusted_info,
        write_trusted_rows,
    )

    assert isinstance(platform, Settings)
    registry = Registry.of(platform)
    ensure_champion(platform.trusted, registry)
    x, y = root_set(2 * rows, seed=seed)
    engine = make_engine(platform.resolved_database_url)
    try:
        with session_factory(engine).begin() as session:
            info = trusted_info(session, registry.name)
            if info is None:
                raise RuntimeError(f"no trusted set for {registry.name} after init")
            names = info.schema.labels
            labels = [names[int(i)] for i in y]
            delete_trusted(session, registry.name)
            write_trusted_info(
                session,
                dataclasses.replace(
                    info,
                    fingerprint=hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest(),
                    public=True,
                    rows_train=rows,
                    rows_holdout=rows,
                    label_counts={n: int((y == i).sum()) for i, n in enumerate(names)},
                    source=ROOT_SOURCE,
                ),
            )
            write_trusted_rows(session, registry.name, Split.TRAIN, 0, x[:rows], labels[:rows])
            write_trusted_rows(session, registry.name, Split.HOLDOUT, 0, x[rows:], labels[rows:])
    finally:
        engine.dispose()


def _attacker_app(kind: str, site: object):  # noqa: ANN202  (a ClientApp)
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from flywheel.learner.federated.client_app import reply_for
    from flywheel.learner.federated.records import ARRAYS, from_record, to_record

    app = ClientApp()
    first: list[dict] = []

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        reply = reply_for(message, site)  # type: ignore[arg-type]
        base = from_record(message.content.array_records[ARRAYS])
        new = from_record(reply.content.array_records[ARRAYS])
        if kind == "stale":
            if not first:
                first.append(new)
            new = first[0]
        else:
            scale = 1e6 if kind == "scale" else -1.0
            new = {k: (base[k] + scale * (new[k] - base[k])).to(base[k].dtype) for k in base}
        reply.content[ARRAYS] = to_record(new)
        return reply

    return app


def run_one(
    root: Path,
    strategy: str,
    attack: str,
    *,
    sites: int,
    rounds: int,
    steps: int,
    seed: int,
    world: str = "drifted",
    root_rows: int = 100,
) -> dict:
    import numpy as np

    from flywheel.learner.federated.client_app import Site
    from flywheel.learner.federated.config import FederatedConfig
    from flywheel.learner.federated.demo import build_homes
    from flywheel.learner.federated.inprocess import InProcessGrid
    from flywheel.learner.federated.partition import Partition, make_partition
    from flywheel.learner.federated.server import FederatedRun, RunOptions
    from flywheel.registry import Registry

    part = make_partition(sites, alpha=0.5, seed=seed)
    if attack == "labelflip":
        x, y = part.sites[-1]
        flipped = (y + 1) % len(part.labels)
        part = Partition([*part.sites[:-1], (x, np.asarray(flipped))], part.holdout)
    platform, homes = build_homes(
        root, sites, part, rounds=rounds, privacy_epsilon=8.0, fed_local_steps=steps
    )
    if world == "same":
        use_root_set(platform, root_rows, seed)
    site_list = [
        Site.of(s.model_copy(update={"fed_site_noise_seed": k})) for k, s in enumerate(homes)
    ]
    apps = {} if attack in ("none", "labelflip") else {sites: _attacker_app(attack, site_list[-1])}
    options = RunOptions.from_settings(
        platform.federated,
        platform.trusted,
        rounds=rounds,
        clients=sites,
        min_clients=sites,
        strategy=strategy,
        clipping="server",
        publish=False,
        noise_seed=seed,
    )
    grid = InProcessGrid(site_list, apps)
    try:
        summary = FederatedRun(FederatedConfig.of(platform), options, Registry.of(platform)).run(
            grid
        )
    finally:
        grid.close()
    acc = [r.recent_accuracy for r in summary.rounds]
    return {
        "accuracy": acc,
        "last2": float(np.mean(acc[-2:])) if acc else float("nan"),
        "refused": len(summary.refused),
        "dropped": len(summary.dropped),
        "quarantined": summary.quarantined,
        "trust": [
            {
                "round": r.round,
                "reference": r.trust_reference,
                "ratio": r.trust_reference_ratio,
                "sites": r.sites,  # node ids; the attacker is the last (`sites`)
                "scores": r.trust_scores,
            }
            for r in summary.rounds
            if r.trust_reference
        ],
    }


def main(
    sites: int = typer.Option(5, "--sites", min=3, max=16),
    rounds: int = typer.Option(6, "--rounds", min=2, max=100),
    local_steps: int = typer.Option(10, "--local-steps", min=1),
    seed: int = typer.Option(7, help="Partition and noise seed."),
    strategies: str = typer.Option(",".join(STRATEGIES), help="Comma-separated."),
    attacks: str = typer.Option(",".join(ATTACKS), help="Comma-separated; 'none' first."),
    world: str = typer.Option(
        "drifted", help="The trusted set: 'drifted' (pre-drift world) or 'same' (a root set)."
    ),
    root_rows: int = typer.Option(
        100, "--root-rows", min=10, max=10_000, help="Root set rows with --world same."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Union-holdout accuracy of each strategy with no attacker and with each attacker."""
    import logging

    from bench.harness import quiet_loggers

    with quiet_loggers({"flwr": logging.WARNING, "flywheel": logging.ERROR}):
        _run(sites, rounds, local_steps, seed, strategies, attacks, world, root_rows, json_out)


def _run(
    sites: int,
    rounds: int,
    local_steps: int,
    seed: int,
    strategies: str,
    attacks: str,
    world: str,
    root_rows: int,
    json_out: bool,
) -> None:
    from bench._streams import one_thread
    from bench.harness import document, machine, machine_line, now

    m, date, started = machine(), now(), time.perf_counter()
    names = [s for s in strategies.split(",") if s]
    kinds = [a for a in attacks.split(",") if a]
    if kinds[0] != "none" or any(a not in ATTACKS for a in kinds):
        raise typer.BadParameter(f"attacks: 'none' first, then any of {ATTACKS[1:]}")
    if world not in WORLDS:
        raise typer.BadParameter(f"world must be one of {WORLDS}, got {world!r}")
    if not names or any(s not in STRATEGIES for s in names):
        raise typer.BadParameter(f"strategies: one or more of {STRATEGIES}")
    results: dict[str, dict[str, dict]] = {}
    for strategy in names:
        results[strategy] = {}
        for attack in kinds:
            with tempfile.TemporaryDirectory(prefix="bench-fedrobust-") as tmp, one_thread():
                results[strategy][attack] = run_one(
                    Path(tmp),
                    strategy,
                    attack,
                    sites=sites,
                    rounds=rounds,
                    steps=local_steps,
                    seed=seed,
                    world=world,
                    root_rows=root_rows,
                )
    lost = {
        s: {a: 100 * (r["none"]["last2"] - r[a]["last2"]) for a in kinds[1:]}
        for s, r in results.items()
    }
    doc = document(
        "fedrobust",
        m,
        {
            "sites": sites,
            "rounds": rounds,
            "local_steps": local_steps,
            "seed": seed,
            "world": world,
            "root_rows": root_rows if world == "same" else 0,
            "clipping": "server",
            "seconds": time.perf_counter() - started,
            "results": results,
            "points_lost": lost,
            "targets": {"fltrust_max_loss_points": 2.0, "fltrust_vs_fedavg_no_attack": 1.0},
        },
        date=date,
    )
    if json_out:
        print(json.dumps(doc, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"union-holdout accuracy (mean of the last 2 of {rounds} rounds), {world} world"
    )
    table.add_column("strategy")
    for a in kinds:
        table.add_column(a if a == "none" else f"{a} (lost)")
    for s, r in results.items():
        table.add_row(
            s,
            *[
                f"{r[a]['last2']:.3f}" + ("" if a == "none" else f" ({lost[s][a]:+.1f})")
                for a in kinds
            ],
        )
    console = Console()
    console.print(table)
    console.print(machine_line(m, date))
