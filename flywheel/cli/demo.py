"""`flywheel demo`: run the stack on embedded defaults with a simulated production app."""

from __future__ import annotations

import contextlib
import json

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flywheel.cli import app, settings_or_exit


@app.command()
def demo(
    requests: int = typer.Option(3000, min=10, max=1_000_000, help="Predictions to request."),
    correction_fraction: float = typer.Option(0.3, min=0.0, max=1.0,
                                              help="Share of predictions corrected."),
    port: int = typer.Option(0, min=0, max=65535, help="Service port; 0 picks a free one."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Start everything on embedded defaults and stream a drifting workload through it."""
    from flywheel.demo import (
        DemoConfig,
        count_topic,
        embedded_stack,
        running_feedback_worker,
        running_service,
        simulate_app,
        wait_joined,
    )
    from flywheel.feedback import error_report
    from flywheel.feedback.store import make_engine, session_factory

    settings = settings_or_exit(port=port)
    console = Console(stderr=True)
    config = DemoConfig(requests=requests, correction_fraction=correction_fraction)
    with contextlib.ExitStack() as stack:
        with console.status("starting broker, store, registry and service..."):
            s = stack.enter_context(embedded_stack(settings))
            worker = stack.enter_context(running_feedback_worker(s))
            url = stack.enter_context(running_service(s))
        console.print(f"service at {url}, Kafka at {s.kafka_bootstrap}, home {s.home_dir}")
        with Progress(TextColumn("[bold]requests"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("demo", total=config.requests, status="")

            def on_progress(n: int, acc: float, version: str) -> None:
                progress.update(task, completed=n,
                                status=f"accuracy {acc:.1%} · serving v{version}")

            result, _ = simulate_app(url, s, config, on_progress)
        with console.status("checking every record on Kafka..."):
            result.events_on_topic = count_topic(s.kafka_bootstrap, s.topic_predictions,
                                                 result.predictions)
            result.corrections_on_topic = count_topic(s.kafka_bootstrap, s.topic_corrections,
                                                      result.corrections)
        with console.status("feedback worker joining corrections..."):
            result.corrections_joined = wait_joined(worker, result.corrections)
    engine = make_engine(s.resolved_database_url)
    with session_factory(engine)() as session:
        report = error_report(session, s.model_name)
    engine.dispose()
    summary = {
        "predictions": result.predictions, "prediction_events": result.events_on_topic,
        "corrections": result.corrections, "correction_events": result.corrections_on_topic,
        "versions_served": sorted(result.versions_served),
        "accuracy_before_drift": round(result.accuracy_before_drift, 4),
        "accuracy_after_drift": round(result.accuracy_after_drift, 4),
        "corrections_joined": result.corrections_joined,
        "error_report": report["versions"],
        "elapsed_s": round(result.elapsed_s, 1),
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        table = Table(title="flywheel demo")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for k, v in summary.items():
            if k != "error_report":
                table.add_row(k, str(v))
        for v in report["versions"]:
            ver = v["model_version"]
            table.add_row(f"error rate v{ver}", f"{v['error_rate']:.1%} of {v['corrections']}")
            table.add_row(f"error types v{ver}",
                          ", ".join(f"{k} {n}" for k, n in v["error_types"].items()))
            table.add_row(f"top confusions v{ver}", ", ".join(
                f"{c['predicted']}→{c['actual']} {c['count']}" for c in v["confusions"][:3]))
        Console().print(table)
    if not result.loop_closed_for_logging:
        typer.echo("error: not every prediction and correction reached Kafka and the store",
                   err=True)
        raise typer.Exit(1)
