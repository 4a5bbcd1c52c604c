"""`flywheel serve`: the prediction service (one uvicorn worker per process)."""

from __future__ import annotations

import contextlib

import typer

from flywheel.broker import BrokerError, EmbeddedBroker
from flywheel.cli import app, settings_or_exit


@app.command()
def serve(
    port: int | None = typer.Option(None, min=0, max=65535, help="Default: FLYWHEEL_PORT."),
    host: str | None = typer.Option(None, help="Default: FLYWHEEL_HOST."),
    access_log: bool = typer.Option(False, help="Log every request."),
) -> None:
    """Serve predictions; with FLYWHEEL_KAFKA_BOOTSTRAP unset, start an embedded broker."""
    settings = settings_or_exit()
    overrides = {k: v for k, v in (("port", port), ("host", host)) if v is not None}
    settings = settings.model_copy(update=overrides)
    with contextlib.ExitStack() as stack:
        if not settings.kafka_bootstrap:
            try:
                broker = stack.enter_context(
                    EmbeddedBroker(log_file=settings.home_dir / "broker.log")
                )
            except BrokerError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from None
            from flywheel.broker import ensure_topics, retention_configs

            ensure_topics(
                broker.bootstrap,
                settings.topics,
                settings.topic_partitions,
                configs=retention_configs(settings.kafka, settings.feedback),
            )
            typer.echo(f"embedded broker at {broker.bootstrap}", err=True)
            settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
        from flywheel.registry import Registry
        from flywheel.service import TLS, ServiceConfig, StartupFailed, create_app, run_server

        s = settings.service
        tls = (
            TLS(s.tls_certfile, s.tls_keyfile, s.tls_client_cafile)
            if s.tls_certfile is not None and s.tls_keyfile is not None
            else None
        )

        # the process's one registry: the first load, the follower and /v1/review share it
        app = create_app(ServiceConfig.of(settings), registry=Registry.of(settings))
        try:
            run_server(
                app,
                settings.host,
                settings.port,
                access_log,
                tls=tls,
                header_timeout_s=settings.header_timeout_s,
            )
        except StartupFailed as exc:  # the broker still stops (the ExitStack)
            typer.echo(f"error: the service did not start: {exc}", err=True)
            raise typer.Exit(1) from None
