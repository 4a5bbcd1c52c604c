"""`flywheel broker`: run the embedded Kafka-protocol broker in the foreground."""

from __future__ import annotations

import signal
import threading

import typer

from flywheel.broker import BrokerError, EmbeddedBroker
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
        embedded.start(topics=settings.topics, partitions=settings.topic_partitions)
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
