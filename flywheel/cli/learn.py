"""`flywheel learn`: the mini-batch online learner (one process per lineage)."""

from __future__ import annotations

import logging
import signal
import threading

import typer

from flywheel.cli import app, settings_or_exit

log = logging.getLogger("flywheel.learner")


@app.command()
def learn(
    once: bool = typer.Option(
        False, "--once", help="Run one step (train and publish if N examples wait), exit."
    ),
) -> None:
    """Train on new examples every N, gate, register in MLflow and promote (if enabled)."""
    from flywheel.learner import LearnerConfig, OnlineLearner
    from flywheel.registry import Registry
    from flywheel.store import NoTrustedData, SchemaNotCurrent

    settings = settings_or_exit()
    try:
        # the process's one registry
        learner = OnlineLearner(LearnerConfig.of(settings), Registry.of(settings))
        learner.start()
    except (SchemaNotCurrent, NoTrustedData) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if settings.learn_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.learn_metrics_port, addr=settings.host)  # default registry
    if once:
        candidate = learner.step()
        typer.echo(
            f"no candidate: fewer than {settings.learn_batch} new trainable examples"
            if candidate is None
            else f"v{candidate.version} from v{candidate.parent_version}: "
            f"{candidate.gate.summary()}{' (promoted)' if candidate.promoted else ''}"
        )
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info(
        "learner %s: every %d examples, auto-promote %s",
        learner.lineage,
        settings.learn_batch,
        "on" if settings.auto_promote else "off",
    )
    learner.run(stop)
    log.info(
        "stopped after %d candidates (%d promoted)",
        learner.stats.candidates,
        learner.stats.promoted,
    )
