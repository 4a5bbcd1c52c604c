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
    from flywheel.retry import Backoff, DependencyStatus, Fatal, dependency_of, retry_call
    from flywheel.store import NoTrustedData, SchemaNotCurrent

    settings = settings_or_exit()
    status = DependencyStatus(("store", "registry"))
    if settings.learn_metrics_port:  # first: flywheel_dependency_up answers while start-up waits
        from prometheus_client import REGISTRY, start_http_server

        REGISTRY.register(status)
        start_http_server(settings.learn_metrics_port, addr=settings.host)  # default registry
    stop = threading.Event()
    if not once:  # --once keeps Ctrl-C's default: it interrupts the step itself
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    registry = Registry.of(settings)  # the process's one registry

    def start() -> OnlineLearner:
        learner = OnlineLearner(LearnerConfig.of(settings), registry)
        learner.dependencies = status
        try:
            learner.start()
        except BaseException:
            learner.source.engine.dispose()  # the next try opens its own
            raise
        return learner

    try:  # a store or registry that is down is waited out (flywheel.retry)
        learner = retry_call(
            start,
            dependency=dependency_of,
            policy=Backoff.of(settings.retry),
            status=status,
            stop=stop,
            what="starting the learner",
        )
    except (SchemaNotCurrent, NoTrustedData, Fatal) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception:
        if stop.is_set():
            log.info("stopped before the learner started")
            return
        raise
    if once:
        candidate = learner.step()
        typer.echo(
            f"no candidate: fewer than {settings.learn_batch} new trainable examples"
            if candidate is None
            else f"v{candidate.version} from v{candidate.parent_version}: "
            f"{candidate.gate.summary()}{' (promoted)' if candidate.promoted else ''}"
        )
        return
    log.info(
        "learner %s: every %d examples, auto-promote %s",
        learner.lineage,
        settings.learn_batch,
        "on" if settings.auto_promote else "off",
    )
    try:
        learner.run(stop)
    except Fatal as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    log.info(
        "stopped after %d candidates (%d promoted)",
        learner.stats.candidates,
        learner.stats.promoted,
    )
