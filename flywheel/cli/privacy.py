"""`flywheel privacy report`: ε spent per version and per privacy unit, the budget policy
in plain words, the incoming data the budget excludes, and the ledger behind it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flywheel.cli import app, image_path, settings_or_exit, store_or_exit
from flywheel.cli.tables import print_table

privacy_app = typer.Typer(no_args_is_help=True, help="Differential privacy: the ledger.")
app.add_typer(privacy_app, name="privacy")


@privacy_app.command("report")
def report(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
    plot: Path | None = typer.Option(
        None, "--plot", dir_okay=False, callback=image_path, help="Write a PNG of ε over time here."
    ),
    lineage: str | None = typer.Option(None, "--lineage", help="Only this lineage."),
    top: int = typer.Option(
        20, "--top", min=1, max=1_000_000, help="Sources shown, most spent first (--json: all)."
    ),
) -> None:
    """Per version and per source: ε spent and budget left; each update's mechanism."""
    from flywheel.privacy import BudgetPolicy, PrivacyLedger, build_report, plot_epsilon

    settings = settings_or_exit()
    engine = store_or_exit(settings)
    doc = build_report(
        PrivacyLedger(engine),
        budget=settings.privacy_epsilon,
        delta=settings.privacy_delta,
        lineage=lineage,
        top_sources=None if json_out else top,
        policy=BudgetPolicy(
            settings.privacy_budget_policy,
            settings.privacy_epsilon,
            settings.privacy_delta,
            settings.privacy_budget_period_days,
        ),
    )
    engine.dispose()
    if plot is not None:
        plot_epsilon(doc, plot)
    if json_out:
        typer.echo(json.dumps(doc, indent=2, allow_nan=False))
        return
    _print(doc, plot)


def _print(doc: dict, plot: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    b, x = doc["budget"], doc["excluded_data"]
    console.print(b["guarantee"], highlight=False)
    console.print(
        f"budget ε={b['epsilon']:g}, δ={b['delta']:g} per privacy unit and lineage "
        f"({b['policy']}); "
        f"spent (worst unit) ε={doc['epsilon_spent']:.3f}; "
        f"{doc['sources_out_of_budget']} of {doc['sources_total']} units out of "
        "budget; "
        f"{x['excluded_examples']} of {x['incoming_examples']} incoming trainable examples "
        f"({x['excluded_share']:.1%}) could not be trained on (budget spent)"
        + (
            f"; {len(doc['never_published'])} update(s) never published, still counted"
            if doc["never_published"]
            else ""
        )
    )
    if not doc["entries"]:
        console.print("no DP updates in the ledger yet")
    versions = Table(title="versions")
    for col in ("version", "lineage", "update", "ε (worst source)", "ε this update", "budget left"):
        versions.add_column(col, justify="right" if col != "lineage" else "left")
    for v in doc["versions"]:
        versions.add_row(
            f"v{v['version']}",
            v["lineage"],
            str(v["update"]),
            f"{v['epsilon']:.3f}",
            f"{v['epsilon_update']:.3f}",
            f"{v['budget_left']:.3f}",
        )
    print_table(console, versions)
    sources = Table(title=f"privacy units (top {len(doc['sources'])} of {doc['sources_total']})")
    for col in ("unit", "ε", "budget left", "updates", "examples"):
        sources.add_column(col, justify="left" if col == "unit" else "right")
    for s in doc["sources"]:
        sources.add_row(
            s["source"],
            f"{s['epsilon']:.3f}",
            f"{s['budget_left']:.3f}",
            str(s["updates"]),
            str(s["examples"]),
        )
    print_table(console, sources)
    ledger = Table(title="ledger: each update's mechanism")
    for col in (
        "update",
        "version",
        "mechanism",
        "accountant",
        "engine",
        "q",
        "σ",
        "C",
        "steps (tree: leaves)",
        "ε",
        "sources",
        "examples",
        "capped",
        "excluded",
    ):
        ledger.add_column(col, justify="right")
    for e in doc["entries"]:
        ledger.add_row(
            str(e["update"]),
            f"v{e['version']}" if e["version"] else "-",
            "DP-FTRL tree" if e["mechanism_kind"] == "tree" else "DP-SGD",
            e["accountant"],
            e["engine"],
            f"{e['sample_rate']:g}",
            f"{e['noise_multiplier']:.3f}",
            f"{e['max_grad_norm']:g}",
            str(e["steps"]),
            f"{e['epsilon_lineage']:.3f}",
            str(e["sources"]),
            str(e["examples"]),
            str(e["capped_examples"]),
            str(e["excluded_examples"]),
        )
    print_table(console, ledger)
    if plot is not None:
        console.print(f"ε over time: {plot}")
