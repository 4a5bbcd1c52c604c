"""`flywheel`: one CLI that starts every process."""

from __future__ import annotations

import logging
import math
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from flywheel.settings import Settings, SettingsError, load_settings, prepare_home

if TYPE_CHECKING:
    from sqlalchemy import Engine

app = typer.Typer(
    name="flywheel",
    no_args_is_help=True,
    add_completion=False,
    help="Online-learning inference service with a feedback loop.",
    pretty_exceptions_show_locals=False,  # locals would print URLs with their passwords
    rich_markup_mode="markdown",
)


def settings_or_exit(**overrides: object) -> Settings:
    """Load and validate settings; a bad configuration is a clear one-line error, exit 2."""
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        prepare_home(settings)
    except OSError as exc:
        typer.echo(
            f"error: FLYWHEEL_HOME {settings.home}: cannot be used as a folder "
            f"({exc.strerror or exc})",
            err=True,
        )
        raise typer.Exit(2) from None
    return settings


MAX_HOURS = 24 * 365 * 10  # report windows: ten years is "everything"


def finite_hours(value: float) -> float:
    """A window in hours: NaN and infinity pass a min/max check, so refuse them here."""
    if not math.isfinite(value) or not 0.01 <= value <= MAX_HOURS:
        raise typer.BadParameter(f"expected hours between 0.01 and {MAX_HOURS}, got {value}")
    return value


def image_path(value: Path | None) -> Path | None:
    """A file name matplotlib can write (its format comes from the suffix)."""
    if value is None:
        return None
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if value.suffix.lower().lstrip(".") not in formats:
        raise typer.BadParameter(
            f"{value}: the name must end in one of {', '.join('.' + f for f in sorted(formats))}"
        )
    return value


def store_or_exit(settings: Settings) -> Engine:
    """The training store's engine; an un-migrated store is a one-line error, exit 1."""
    from flywheel.store import SchemaNotCurrent, open_store

    try:
        return open_store(settings.resolved_database_url)
    except SchemaNotCurrent as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kafka", "mlflow", "alembic", "urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so every `with` that started a process (the embedded
    # broker of `demo`, `fed demo`'s SuperLink and sites) stops it; without this, Python's
    # default action ended the process at once and left them running. Commands that stop
    # on their own terms (serve, feedback, learn, broker, up) install their own handler.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if not verbose:  # one line per Kafka outage, with a count (flywheel.chatter)
        from flywheel.chatter import install

        install()


def register_commands() -> None:
    """Import every command module, which registers its commands on `app` (what `main`
    does first; a test that invokes `app` itself calls it too)."""
    from flywheel.cli import (  # noqa: F401  (commands register on import)
        apps,  # flywheel apps create | list | rotate | revoke
        broker,
        db,
        demo,
        fed,  # flywheel fed superlink | server | client | register | demo
        feedback,
        init,  # flywheel init: a data set file -> trusted set, schema, v1
        judge,  # flywheel models judge: live pairs' evidence and verdicts (issue 28)
        keys,  # flywheel keys init | show: the key that signs promotions
        learn,
        models,
        monitor,  # flywheel monitor: live accuracy, label delay, CBPE, drift per version
        privacy,  # flywheel privacy report
        serve,
        status,  # flywheel status: every part's health, lag, spools, learners
        ui,  # flywheel ui: MLflow UI + review page URL
        up,  # flywheel up: the whole loop as supervised processes
    )


def main() -> None:
    from flywheel.cli.errors import describe_outside_error

    register_commands()
    try:
        sys.exit(app(standalone_mode=True))
    except Exception as exc:
        message = describe_outside_error(exc)
        if message is None:
            raise  # a bug: its traceback (without locals) is what we need
        typer.echo(f"error: {message}", err=True)
        sys.exit(1)
