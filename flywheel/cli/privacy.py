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


@privacy_app.command("forget")
def forget(
    subject: str = typer.Option(
        ..., "--subject", help="The data subject's raw id, as apps send it as `subject`."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the receipt as JSON."),
) -> None:
    """Erase a data subject: delete every stored row about them, in one transaction, and
    write an erasure receipt (keyed hash, never the raw id); list the versions trained
    without DP that may hold their data. A repeated call deletes 0 rows and says so."""
    import dataclasses
    import getpass
    from datetime import UTC, datetime

    from pydantic import TypeAdapter, ValidationError

    from flywheel.store import erase_subject, non_dp_versions, session_factory
    from flywheel.subjects import SubjectId, subject_key

    try:
        raw = TypeAdapter(SubjectId).validate_python(subject)
    except ValidationError as exc:
        raise typer.BadParameter(exc.errors()[0]["msg"], param_hint="--subject") from None
    settings = settings_or_exit()
    if settings.subject_key is None:
        typer.echo(
            "error: FLYWHEEL_SUBJECT_KEY is unset: subjects are stored by their keyed hash "
            "under it, so without it no subject can be found (set the deployment's key)",
            err=True,
        )
        raise typer.Exit(2)
    hashed = subject_key(raw, settings.subject_key.get_secret_value())
    engine = store_or_exit(settings)
    try:
        with session_factory(engine).begin() as session:
            done = erase_subject(
                session, hashed, f"cli:{getpass.getuser()}"[:100], datetime.now(UTC)
            )
    finally:
        engine.dispose()
    try:
        from flywheel.registry import Registry

        versions = Registry.of(settings).versions()
        done = dataclasses.replace(
            done, non_dp_versions=non_dp_versions(versions, done.first_example_id)
        )
    except Exception as exc:  # the erasure is committed; the listing is advice
        done = dataclasses.replace(
            done, versions_note=f"the registry could not be read ({type(exc).__name__}: {exc})"
        )
    doc = done.doc()
    if json_out:
        typer.echo(json.dumps(doc, indent=2, allow_nan=False))
        return
    counts = ", ".join(f"{n} {t}" for t, n in done.deleted.items())
    typer.echo(
        f"erased subject {hashed[:12]}…: deleted {counts} "
        f"(receipt {doc['receipt']}{', a repeated request' if done.repeated else ''})"
    )
    if done.non_dp_versions:
        typer.echo(
            "versions trained without DP that may hold the subject's data (decide whether "
            f"to retire them): {', '.join('v' + v for v in done.non_dp_versions)}"
        )
    elif done.non_dp_versions is not None:
        typer.echo("no version trained without DP holds the subject's data")
    if done.versions_note:
        typer.echo(f"note: {done.versions_note}", err=True)
