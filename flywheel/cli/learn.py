"""`flywheel learn`: the mini-batch online learner (one process per lineage)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

import typer

from flywheel.cli import app, settings_or_exit

log = logging.getLogger("flywheel.learner")
T = TypeVar("T")


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
    from flywheel.retry import Backoff, DependencyStatus, Fatal, dependency_of, retry_call
    from flywheel.store import LeaseLost, NoTrustedData, SchemaNotCurrent

    settings = settings_or_exit()
    status = DependencyStatus(("store", "registry"))
    if settings.learn_metrics_port:  # first: flywheel_dependency_up answers while start-up waits
        from prometheus_client import REGISTRY, start_http_server

        REGISTRY.register(status)
        start_http_server(settings.learn_metrics_port, addr=settings.host)  # default registry
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    registry = Registry.of(settings)  # the process's one registry
    policy = Backoff.of(settings.retry)

    def waiting(fn: Callable[[], T], what: str) -> T:
        """`fn()`, waiting out a store or registry that is down (flywheel.retry)."""
        return retry_call(
            fn, dependency=dependency_of, policy=policy, status=status, stop=stop, what=what
        )

    try:
        learner = waiting(
            lambda: OnlineLearner(LearnerConfig.of(settings), registry), "opening the store"
        )
    except (SchemaNotCurrent, Fatal) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception:
        if stop.is_set():
            return
        raise
    learner.dependencies = status
    learner.stop_event = stop
    # a standby until the lineage's holder is gone (a store outage meanwhile is waited out)
    if not learner.lease.wait(stop):
        return
    learner.lease.start_renewing()
    try:
        try:
            waiting(learner.start, "starting the learner")
        except (NoTrustedData, Fatal) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except Exception:
            if stop.is_set():
                return
            raise
        if once:
            try:
                candidate = learner.step()
            except (StepAbandoned, LeaseLost) as exc:
                typer.echo(f"no candidate: {exc}", err=True)
                raise typer.Exit(1) from None
            typer.echo(
                f"no candidate: fewer than {settings.learn_batch} new trainable examples"
                if candidate is None
                else f"{'v' + candidate.version if candidate.version else 'not registered'}"
                f" from v{candidate.parent_version}: "
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
    finally:
        learner.lease.release()
    log.info(
        "stopped after %d candidates (%d promoted)",
        learner.stats.candidates,
        learner.stats.promoted,
    )
