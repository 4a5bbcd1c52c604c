"""`flywheel db`: migrate, inspect and maintain the training store.

Processes refuse a store whose schema is not current (`open_store`), so these commands
are how an operator gets past that refusal, and `check` is the same test for scripts.
`current` also shows the large tables' sizes; `maintain` runs retention and creates the
partitions ahead now (the feedback workers run it every FLYWHEEL_RETENTION_EVERY_S).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import typer

from flywheel.cli import app, settings_or_exit

db_app = typer.Typer(
    name="db", no_args_is_help=True, help="Migrate and inspect the training-store schema."
)
app.add_typer(db_app, name="db")

T = TypeVar("T")


@contextmanager
def _one_line_errors(shown: str) -> Iterator[None]:
    """Turn database and migration failures into `error: ...` and exit 1, no traceback."""
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from flywheel.store import SchemaNotCurrent

    try:
        yield
    except (SchemaNotCurrent, CommandError) as exc:  # these already say what to do
        _fail(str(exc))
    except SQLAlchemyError as exc:
        # The DBAPI error says what went wrong; SQLAlchemy's wrapper adds SQL and a link.
        _fail(f"database at {shown}: {getattr(exc, 'orig', None) or exc}")
    except (ImportError, OSError, ValueError) as exc:
        _fail(f"database at {shown}: {exc}")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(1)


def _store_call(fn: Callable[[str], T]) -> tuple[str, T]:
    """Run `fn(url)` for the configured database; return its printable URL and the result."""
    from sqlalchemy.exc import ArgumentError

    from flywheel.store import display_url

    url = settings_or_exit().state.resolved_database_url
    try:
        shown = display_url(url)
    except (ArgumentError, ValueError) as exc:  # the URL may hold a password: not echoed
        _fail(f"FLYWHEEL_DATABASE_URL: {exc}")
    with _one_line_errors(shown):
        return shown, fn(url)
    raise AssertionError("unreachable")  # _one_line_errors exits on every failure


def _migrate(direction: str, revision: str) -> None:
    """Move the schema with `store.upgrade` or `store.downgrade` and say what changed."""
    from flywheel import store

    def run(url: str) -> tuple[str | None, str | None]:
        before = store.current(url)
        getattr(store, direction)(url, revision)
        return before, store.current(url)

    shown, (before, after) = _store_call(run)
    if before == after:
        typer.echo(f"{shown}: already at {after or 'base'}")
    else:
        typer.echo(f"{shown}: {direction}d {before or 'empty'} -> {after or 'base'}")


def _revision_arg(value: str) -> str:
    if not value.strip():
        raise typer.BadParameter("expected a revision (an id, head, base, +N or -N), got ''")
    return value.strip()


@db_app.command()
def upgrade(
    revision: str = typer.Option(
        "head", "--revision", "-r", callback=_revision_arg, help="Target revision."
    ),
) -> None:
    """Migrate the database forward (creating the schema on an empty database)."""
    _migrate("upgrade", revision)


@db_app.command(context_settings={"ignore_unknown_options": True})
def downgrade(
    revision: str = typer.Argument(
        ..., callback=_revision_arg, help="Target revision: an id, `-1`, or `base`."
    ),
) -> None:
    """Migrate the database back; `base` drops every Flywheel table and its data."""
    _migrate("downgrade", revision)


@db_app.command()
def current() -> None:
    """Print the database's revision and whether it is the one this code expects."""
    from flywheel import store

    shown, (revision, expected) = _store_call(lambda url: (store.current(url), store.head()))
    if revision is None:
        typer.echo(f"{shown}: no Flywheel schema (head is {expected})")
    elif revision == expected:
        typer.echo(f"{shown}: {revision} (head)")
    elif revision in store.known_revisions():
        typer.echo(f"{shown}: {revision} (behind head {expected}: run `flywheel db upgrade`)")
    else:
        typer.echo(f"{shown}: {revision} (unknown here, newest known {expected}: newer Flywheel?)")
    if revision is not None:
        _echo_sizes()


SIZED_TABLES = ["predictions", "corrections", "examples", "error_counts", "privacy_ledger"]


def _echo_sizes() -> None:
    """One line per large table: rows (PostgreSQL: the planner's estimate), bytes with
    indexes, partitions."""
    from flywheel import store

    def run(url: str) -> list[store.TableSize]:
        engine = store.make_engine(url)
        try:
            with engine.connect() as conn:
                return store.table_sizes(conn, SIZED_TABLES)
        finally:
            engine.dispose()

    _, sizes = _store_call(run)
    for size in sizes:
        on_disk = "" if size.bytes is None else f", {size.bytes / 2**20:,.1f} MiB"
        parts = f", {size.partitions} partitions" if size.partitions else ""
        typer.echo(f"  {size.table}: {size.rows:,} rows{on_disk}{parts}")


@db_app.command()
def check() -> None:
    """Exit 0 if the schema is current, else print why and exit 1 (for scripts and probes)."""
    from flywheel import store

    def run(url: str) -> str:
        engine = store.make_engine(url)
        try:
            return store.check_schema(engine)
        finally:
            engine.dispose()

    shown, revision = _store_call(run)
    typer.echo(f"{shown}: {revision} (head)")


@db_app.command()
def maintain() -> None:
    """Run the store's retention and create the partitions ahead, now (FLYWHEEL_RETENTION_*)."""
    from flywheel import store

    settings = settings_or_exit()
    policy = store.RetentionPolicy.of(settings.feedback)

    def run(url: str) -> store.MaintenanceReport | None:
        engine = store.open_store(url)
        try:
            return store.maintain(engine, policy, owner=store.default_owner(), force=True)
        finally:
            engine.dispose()

    shown, report = _store_call(run)
    assert report is not None  # force: always runs
    removed = ", ".join(f"{table} {n:,}" for table, n in report.removed.items())
    typer.echo(f"{shown}: removed {removed}")
    typer.echo(
        f"  partitions dropped {len(report.dropped)}, created {len(report.created)}"
        f" ({report.seconds:.2f} s)"
    )
