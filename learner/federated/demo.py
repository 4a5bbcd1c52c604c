"""`flywheel fed demo`: a loopback federation of real processes on non-IID sites.

Layout under one folder: `platform/` (its home: MLflow registry, training store with the
union's holdout as recent holdout corrections, privacy ledger, Flower state) and
`site<k>/` (each site's own home and training store holding its Dirichlet share).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flywheel.learner.federated.partition import Partition, fill_site_store, make_partition
from flywheel.learner.federated.processes import LocalFederation, free_port
from flywheel.learner.federated.server import RunOptions
from flywheel.settings import Settings, prepare_home

log = logging.getLogger(__name__)
DEMO_DEFAULTS: dict[str, object] = {"seed_examples": 1000}


def build_homes(
    root: Path, n_sites: int, partition: Partition, *, rounds: int, **overrides: object
) -> tuple[Settings, list[Settings]]:
    """Platform and site settings, each with a migrated store filled with its data: the
    platform's holds the union's holdout as recent holdout corrections; its trusted set
    (the gate's trusted holdout and the public replay) is the synthetic problem, which
    `ensure_champion` imports through `flywheel init` when the run starts.

    Each site budgets its sources for `rounds` rounds (FLYWHEEL_PRIVACY_SOURCE_UPDATES).
    """
    from flywheel.store import upgrade

    link = f"127.0.0.1:{free_port()}"
    common = {**DEMO_DEFAULTS, "fed_superlink": link, "privacy_source_updates": rounds, **overrides}
    platform = Settings(home=root / "platform", fed_rounds=rounds, **common)  # type: ignore[arg-type]
    prepare_home(platform)
    upgrade(platform.resolved_database_url)
    fill_site_store(
        platform.resolved_database_url,
        *partition.holdout,
        site="platform",
        split="holdout",
        names=partition.labels,
    )
    sites = []
    for k, (x, y) in enumerate(partition.sites):
        site = Settings(home=root / f"site{k}", fed_runtime_port=free_port(), **common)  # type: ignore[arg-type]
        prepare_home(site)
        upgrade(site.resolved_database_url)
        fill_site_store(site.resolved_database_url, x, y, site=f"site{k}", names=partition.labels)
        sites.append(site)
    return platform, sites


def run_demo(
    report: Path,
    *,
    clients: int = 3,
    rounds: int = 5,
    strategy: str = "fedavg",
    alpha: float = 0.5,
    timeout_s: float = 900.0,
) -> dict:
    """Start the federation, run `rounds` rounds, write report/summary.json, return it."""
    from flywheel.learner.seed_model import ensure_champion
    from flywheel.registry import Registry

    report.mkdir(parents=True, exist_ok=True)
    root = report / "federation"
    started = time.perf_counter()
    partition = make_partition(clients, alpha=alpha)
    platform, sites = build_homes(root, clients, partition, rounds=rounds)
    # before the sites join: the first round need not wait for it
    ensure_champion(platform.trusted, Registry.of(platform))
    options = RunOptions.from_settings(
        platform.federated,
        platform.trusted,
        rounds=rounds,
        clients=clients,
        min_clients=clients,
        strategy=strategy,
        report=str(report / "run.json"),
    )
    with LocalFederation(platform, sites, logs=report / "logs") as fed:
        fed.wait_for_sites(clients, timeout_s=120)
        summary = fed.run(options, timeout_s=timeout_s)
    summary["sites"] = [
        {
            "examples": int(len(y)),
            "label_counts": [int((y == c).sum()) for c in range(len(partition.labels))],
        }
        for _, y in partition.sites
    ]
    summary["demo_seconds"] = time.perf_counter() - started
    (report / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
