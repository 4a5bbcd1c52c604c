"""`flywheel ui`: the MLflow UI on the registry Flywheel uses, next to the review page."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import typer

from flywheel.cli import app, settings_or_exit


def mlflow_ui_command(uri: str, artifacts: str, host: str, port: int) -> list[str]:
    """`mlflow ui` on the same backend store (run with this interpreter's MLflow)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--artifacts-destination",
        artifacts,
        "--host",
        host,
        "--port",
        str(port),
    ]


def run_process(command: list[str], stop_timeout_s: float = 15.0) -> int:
    """Run `command` in its own process group until it exits or we get SIGINT/SIGTERM;
    then SIGTERM its group (MLflow's server runs workers of its own), SIGKILL after
    `stop_timeout_s`. With `subprocess.call`, a SIGTERM ended only this process and left
    the MLflow server on its port. Returns the child's exit code (0 when we stopped it)."""
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        proc = subprocess.Popen(command, start_new_session=True)
        try:
            while not stop.wait(0.2):
                code = proc.poll()
                if code is not None:
                    return code
            return 0
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(stop_timeout_s)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # what the group left behind
            proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@app.command()
def ui(
    port: int = typer.Option(5000, min=1, max=65535, help="Port of the MLflow UI."),
    host: str = typer.Option("127.0.0.1", help="Interface the MLflow UI binds."),
) -> None:
    """Open the MLflow UI on Flywheel's registry and print the URL of the review page (/ui)."""
    from flywheel.settings import mask_credentials

    settings = settings_or_exit()
    uri = settings.resolved_mlflow_uri
    shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    typer.echo(
        f"review page: http://{shown_host}:{settings.port}/ui/ (served by "
        "`flywheel serve`; approve/reject/rollback need FLYWHEEL_ADMIN_TOKEN)"
    )
    if urlsplit(uri).scheme in ("http", "https"):
        # a tracking server is its own UI: nothing to start
        typer.echo(
            f"MLflow UI: {mask_credentials(uri)} (the tracking server in "
            "FLYWHEEL_MLFLOW_TRACKING_URI)"
        )
        return
    typer.echo(f"MLflow UI: http://{host}:{port}/ on {mask_credentials(uri)} (Ctrl-C stops it)")
    raise typer.Exit(
        run_process(mlflow_ui_command(uri, settings.mlflow_artifacts_dir.as_uri(), host, port))
    )
