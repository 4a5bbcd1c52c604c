"""`flywheel`: one CLI that starts every process."""

from __future__ import annotations

import logging
import sys

import typer

from flywheel.settings import Settings, SettingsError, load_settings, prepare_home

app = typer.Typer(
    name="flywheel", no_args_is_help=True, add_completion=False,
    help="Online-learning inference service with a feedback loop.",
)


def settings_or_exit(**overrides: object) -> Settings:
    """Load and validate settings; a bad configuration is a clear one-line error, exit 2."""
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    prepare_home(settings)
    return settings


def store_or_exit(settings: Settings):
    """The training store's engine; an un-migrated store is a one-line error, exit 1."""
    from flywheel.feedback.store import SchemaNotCurrent, open_store

    try:
        return open_store(settings.resolved_database_url)
    except SchemaNotCurrent as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kafka", "mlflow", "alembic", "urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _register() -> None:
    from flywheel.cli import (  # noqa: F401  (commands register on import)
        broker,
        db,
        demo,
        fed,  # flywheel fed superlink | server | client | register | demo
        feedback,
        learn,
        models,
        privacy,  # flywheel privacy report
        serve,
        ui,  # flywheel ui: MLflow UI + review page URL
    )


def main() -> None:
    _register()
    sys.exit(app(standalone_mode=True))
