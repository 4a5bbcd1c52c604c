"""`flywheel broker`: run the embedded Kafka-protocol broker in the foreground;
`flywheel topics`: create (or bring up to date) the topics on the configured cluster."""

from __future__ import annotations

import signal
import threading

import typer

from flywheel.broker import BrokerError, EmbeddedBroker, ensure_topics, retention_configs
from flywheel.cli import app, settings_or_exit


@app.command()
def broker(
    port: int = typer.Option(9092, min=1, max=65535, help="Loopback port to listen on."),
) -> None:
    """Start the embedded broker, create the topics, print the bootstrap address."""
    settings = settings_or_exit()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    embedded = EmbeddedBroker(port=port, log_file=settings.home_dir / "broker.log")
    try:
        embedded.start(
            topics=settings.topics,
            partitions=settings.topic_partitions,
            configs=retention_configs(settings.kafka, settings.feedback),
        )
    except BrokerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        typer.echo(embedded.bootstrap, color=False)
        typer.echo(f"export FLYWHEEL_KAFKA_BOOTSTRAP={embedded.bootstrap}", err=True)
        while not stop.wait(0.5):
            if not embedded.running:
                typer.echo("error: broker process exited", err=True)
                raise typer.Exit(1)
    finally:
        embedded.stop()


@app.command()
def topics(
    alter: bool = typer.Option(
        False, "--alter", help="Also set the retention on topics that already exist."
    ),
) -> None:
    """Create Flywheel's topics on FLYWHEEL_KAFKA_BOOTSTRAP, with their retention.

    The predictions, scores and corrections topics keep records for
    FLYWHEEL_RETENTION_PREDICTIONS_S (docs/contracts.md#topic-retention-and-erasure);
    `--alter` sets that on topics created earlier, by hand or by an older Flywheel.
    """
    settings = settings_or_exit()
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        typer.echo(
            "error: FLYWHEEL_KAFKA_BOOTSTRAP is not set; the embedded broker "
            "(`flywheel broker`, `serve`, `up`) creates its topics itself",
            err=True,
        )
        raise typer.Exit(2)
    from flywheel.kafka_security import kafka_python_options

    configs = retention_configs(settings.kafka, settings.feedback)
    try:
        created = ensure_topics(
            bootstrap,
            settings.topics,
            settings.topic_partitions,
            security=kafka_python_options(settings.kafka),
            configs=configs,
            alter=alter,
        )
    except Exception as exc:  # kafka-python's errors, a refused connection
        typer.echo(f"error: could not create the topics at {bootstrap}: {exc}", err=True)
        raise typer.Exit(1) from None
    for topic in settings.topics:
        state = "created" if topic in created else ("altered" if alter else "exists")
        retention = configs.get(topic, {}).get("retention.ms", "broker default")
        typer.echo(f"{topic}\t{state}\tretention.ms={retention}")
