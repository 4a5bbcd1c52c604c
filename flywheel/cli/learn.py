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
    """Train on new examples every N, gate, register in MLflow and promote (if enabled).

    One learner per lineage: a second one waits as a standby (it says who holds the
    lineage) and takes over about FLYWHEEL_LEARN_LEASE_S after the first dies, at once
    after it stops. SIGTERM or SIGINT abandons a step in progress (nothing of it is
    published) and lets the lease go.
    """
    from flywheel.learner import LearnerConfig, OnlineLearner, StepAbandoned
    from flywheel.registry import Registry
    from flywheel.store import LeaseLost, NoTrustedData, SchemaNotCurrent

    settings = settings_or_exit()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # the process's one registry
        learner = OnlineLearner(LearnerConfig.of(settings), Registry.of(settings))
    except SchemaNotCurrent as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    learner.stop_event = stop
    if not learner.lease.wait(stop):  # a standby until the lineage's holder is gone
        return
    learner.lease.start_renewing()
    try:
        try:
            learner.start()
        except NoTrustedData as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        if settings.learn_metrics_port:
            from prometheus_client import start_http_server

            start_http_server(settings.learn_metrics_port, addr=settings.host)  # default registry
        if once:
            try:
                candidate = learner.step()
            except (StepAbandoned, LeaseLost) as exc:
                typer.echo(f"no candidate: {exc}", err=True)
                raise typer.Exit(1) from None
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
        learner.run(stop)
    finally:
        learner.lease.release()
    log.info(
        "stopped after %d candidates (%d promoted)",
        learner.stats.candidates,
        learner.stats.promoted,
    )
