"""`flywheel demo`: the whole loop on embedded defaults, driven by a simulated production app."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flywheel.cli import app, settings_or_exit
from flywheel.cli.tables import print_table


@app.command()
def demo(
    report: Path | None = typer.Option(
        None, "--report", file_okay=False, help="Write accuracy.png, summary.md, summary.json here."
    ),
    requests: int = typer.Option(6000, min=10, max=1_000_000, help="Predictions to request."),
    rate: float = typer.Option(
        60.0,
        min=0.0,
        max=100_000.0,
        help="Requests per second the app sends (0: as fast as served).",
    ),
    correction_fraction: float = typer.Option(
        0.3, min=0.0, max=1.0, help="Share of predictions corrected."
    ),
    port: int = typer.Option(0, min=0, max=65535, help="Service port; 0 picks a free one."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        help="Run on a real data set that ships offline (phishing, image_segments, shuttle, "
        "solar_flare, penguins): its first 30 % is imported by init, the rest is the live "
        "stream, with the set's stated drift (docs/datasets.md).",
    ),
) -> None:
    """Start everything on embedded defaults and stream a drifting workload through the loop.

    Starts from files, as a user would: a trusted CSV (the synthetic seed data, or the first
    30 % of `--dataset`) imported by `init`, and a live stream CSV that the simulated app
    reads and sends by column name through `flywheel.client.Client`.

    Exits 1 if the loop did not close: no version promoted, or no recovery after the drift,
    or a prediction or correction missing from Kafka or the store.
    """
    from flywheel.demo import (
        DATASETS,
        DemoConfig,
        count_topic,
        dataset_files,
        embedded_stack,
        freshness,
        frozen_predictor,
        learned_examples,
        privacy_summary,
        running_loop,
        simulate_app,
        summarize,
        synthetic_files,
        wait_joined,
        write_report,
    )
    from flywheel.registry import Registry

    if dataset is not None and dataset not in DATASETS:
        typer.echo(
            f"error: unknown --dataset {dataset!r}; choose from {', '.join(sorted(DATASETS))}",
            err=True,
        )
        raise typer.Exit(2)
    settings = settings_or_exit(port=port)
    console = Console(stderr=True)
    config = DemoConfig(requests=requests, rate=rate, correction_fraction=correction_fraction)
    with console.status("writing the demo's trusted and stream CSV files..."):
        if dataset is None:
            data = synthetic_files(settings, config.requests, config.drift_at)
        else:
            data = dataset_files(settings, dataset, config.requests, config.drift_at)
    with contextlib.ExitStack() as stack:
        with console.status(
            f"init on {data.trusted.name}; starting broker, store, registry, feedback worker, "
            "learner, service..."
        ):
            try:
                s = stack.enter_context(embedded_stack(settings, data))
            except ValueError as exc:  # a home that serves another lineage
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None
            bootstrap = s.kafka_bootstrap
            assert bootstrap is not None  # embedded_stack starts a broker when none is set
            initial = Registry.of(s).champion_version()
            assert initial is not None
            frozen = frozen_predictor(s, initial)
            spec = Registry.of(s).load(initial).spec
            worker, learner, url = stack.enter_context(running_loop(s))
        console.print(
            f"service at {url}, Kafka at {s.kafka_bootstrap}, home {s.home_dir}; serving v{initial}"
            f"; streaming {data.stream}"
        )
        with Progress(
            TextColumn("[bold]requests"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("demo", total=config.requests, status="")

            def on_progress(n: int, acc: float, version: str) -> None:
                progress.update(
                    task,
                    completed=n,
                    status=(
                        f"accuracy {acc:.1%} · serving v{version} · "
                        f"{learner.stats.candidates} candidates, {learner.stats.promoted} promoted"
                    ),
                )

            result, _ = simulate_app(url, s, config, on_progress, frozen=frozen, data=data)
        with console.status("checking every record on Kafka and in the store..."):
            result.events_on_topic = count_topic(bootstrap, s.topic_predictions, result.predictions)
            result.corrections_on_topic = count_topic(
                bootstrap, s.topic_corrections, result.corrections
            )
            result.corrections_joined = wait_joined(worker, result.corrections)
        history = list(learner.stats.history)
    candidates = [
        {
            "version": c.version,
            "parent_version": c.parent_version,
            "examples": c.examples,
            "first_example_id": c.first_id,
            "last_example_id": c.last_id,
            "lr": c.lr,
            "promoted": c.promoted,
            "gate": c.gate.summary(),
            "privacy": c.privacy,
        }
        for c in history
    ]
    fresh = freshness(
        result.trace,
        learned_examples(s),
        [(c.version, c.last_id) for c in history if c.promoted and c.version],
    )
    summary = summarize(
        result.trace, candidates=candidates, fresh=fresh, elapsed_s=result.elapsed_s
    )
    summary |= data.describe() | {
        "labels": list(spec.labels),
        "features": [f.name for f in spec.schema.features] if spec.schema else [],
        "sent_fields": result.fields,
        "predictions": result.predictions,
        "prediction_events": result.events_on_topic,
        "corrections": result.corrections,
        "correction_events": result.corrections_on_topic,
        "corrections_joined": result.corrections_joined,
        "initial_version": initial,
        "privacy": privacy_summary(
            candidates,
            s.privacy_enabled,
            s.privacy_epsilon,
            s.privacy_delta,
            mechanism=s.privacy_mechanism,
        ),
    }
    if report is not None:
        write_report(report, summary, result.trace)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, report)
    if not result.loop_closed_for_logging:
        typer.echo(
            "error: not every prediction and correction reached Kafka and the store", err=True
        )
        raise typer.Exit(1)
    if not summary["recovered"]:
        typer.echo(
            "error: the loop did not close: "
            + (
                "no version was promoted"
                if not summary["promoted_versions"]
                else "the served model did not recover after the drift"
            ),
            err=True,
        )
        raise typer.Exit(1)


def _print_summary(summary: dict, report: Path | None) -> None:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    table = Table(title="flywheel demo")
    table.add_column("measure")
    table.add_column("flywheel", justify="right")
    table.add_column("frozen initial model", justify="right")
    table.add_row(
        "accuracy before the drift",
        pct(summary["accuracy_flywheel_before_drift"]),
        pct(summary["accuracy_frozen_before_drift"]),
    )
    table.add_row(
        "accuracy after the drift (settled)",
        pct(summary["accuracy_flywheel_after_drift"]),
        pct(summary["accuracy_frozen_after_drift"]),
    )
    table.add_row(
        "versions promoted", ", ".join(f"v{v}" for v in summary["promoted_versions"]) or "none", "-"
    )
    table.add_row(
        "freshness median / p95",
        f"{summary['freshness_median_s']} s / {summary['freshness_p95_s']} s",
        "-",
    )
    table.add_row(
        "predictions / corrections", f"{summary['predictions']} / {summary['corrections']}", "-"
    )
    privacy = summary.get("privacy") or {}
    if privacy.get("enabled"):
        table.add_row(
            "privacy: ε spent (budget)",
            f"{privacy['epsilon_spent']} ({privacy['budget_epsilon']:g}, δ={privacy['delta']:g})",
            "-",
        )
        table.add_row(
            "recent holdout, DP / same run without DP",
            f"{pct(privacy['recent_accuracy_dp'])} / {pct(privacy['recent_accuracy_without_dp'])}",
            "-",
        )
        if privacy.get("trusted_accuracy_dp") is not None:
            table.add_row(
                "trusted holdout, DP / same run without DP",
                f"{pct(privacy['trusted_accuracy_dp'])} / "
                f"{pct(privacy['trusted_accuracy_without_dp'])}",
                "-",
            )
    else:
        table.add_row("privacy", "DP off", "-")
    print_table(Console(), table)
    if report is not None:
        Console().print(f"report written to {report}/ (accuracy.png, summary.md, summary.json)")
