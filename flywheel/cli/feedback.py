"""`flywheel feedback`: run a feedback worker; `flywheel feedback report`: error reports."""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import TYPE_CHECKING

import typer

from flywheel.cli import app, finite_hours, settings_or_exit, store_or_exit
from flywheel.cli.tables import print_table

feedback_app = typer.Typer(no_args_is_help=False, help=__doc__)
app.add_typer(feedback_app, name="feedback")
log = logging.getLogger("flywheel.feedback")

if TYPE_CHECKING:
    from flywheel.feedback import FeedbackWorker


@feedback_app.callback(invoke_without_command=True)
def run(ctx: typer.Context) -> None:
    """Join corrections to predictions, analyze errors, write examples (one group member)."""
    if ctx.invoked_subcommand is not None:
        return
    from flywheel.feedback import build_worker, tune_worker_process
    from flywheel.retry import DependencyStatus, Fatal
    from flywheel.store import NoTrustedData, SchemaNotCurrent

    settings = settings_or_exit()
    if not settings.kafka.kafka_bootstrap:
        typer.echo(
            "error: set FLYWHEEL_KAFKA_BOOTSTRAP (start one with `flywheel broker`)", err=True
        )
        raise typer.Exit(2)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    status = DependencyStatus(("store", "kafka", "registry"))
    built: list[FeedbackWorker] = []  # the worker, once start-up has built it
    registry = None
    if settings.feedback.feedback_metrics_port:  # first: it answers (not ready) meanwhile
        from prometheus_client import CollectorRegistry

        from flywheel.feedback import serve_metrics

        registry = CollectorRegistry()
        serve_metrics(
            settings.feedback.feedback_metrics_port,
            addr=settings.service.host,
            registry=registry,
            status=status,
            running=lambda: bool(built) and built[0].running.is_set(),
        )
    try:
        worker = build_worker(settings, status=status, stop=stop, prewarm=True)
    except (SchemaNotCurrent, NoTrustedData, Fatal) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception:
        if stop.is_set():  # stopped while start-up waited for a dependency
            log.info("stopped before the worker started")
            return
        raise
    if registry is not None:
        from flywheel.feedback import FeedbackCollector
        from flywheel.store import make_engine

        registry.register(
            FeedbackCollector(
                worker,
                make_engine(settings.state.resolved_database_url),
                settings.registry.model_name,
            )
        )
    tune_worker_process()  # after everything long-lived is loaded
    log.info(
        "feedback worker in group %s on %s",
        settings.feedback.feedback_group,
        settings.kafka.kafka_bootstrap,
    )
    built.append(worker)
    try:
        stats = worker.run(stop)
    except Fatal as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    log.info("stopped: %s", stats)


@feedback_app.command()
def report(
    hours: float = typer.Option(24.0, callback=finite_hours, help="Rolling window."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Error rate, error-type mix and top confusions per model version."""
    from flywheel.feedback import error_report
    from flywheel.store import session_factory

    settings = settings_or_exit()
    engine = store_or_exit(settings)
    with session_factory(engine)() as session:
        doc = error_report(session, settings.registry.model_name, hours)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{doc['model_name']}: last {hours:g} h of corrections")
    for col in (
        "version",
        "corrections",
        "errors",
        "error rate",
        "error types",
        "top confusions (predicted→actual)",
    ):
        table.add_column(col)
    for v in doc["versions"]:
        table.add_row(
            v["model_version"],
            str(v["corrections"]),
            str(v["errors"]),
            f"{v['error_rate']:.1%}",
            ", ".join(f"{k} {n}" for k, n in v["error_types"].items()),
            ", ".join(f"{c['predicted']}→{c['actual']} {c['count']}" for c in v["confusions"]),
        )
    print_table(Console(), table)
