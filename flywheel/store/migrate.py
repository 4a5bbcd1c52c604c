"""Alembic, driven from code: no alembic.ini at the cwd, the scripts ship in the package.

The configuration is built here so `flywheel db ...`, tests and any process can migrate
the database named by settings, wherever they run from.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import URL

from flywheel.store.database import make_engine, normalize_url, schema_revision


def script_location() -> Path:
    """The installed `flywheel.migrations` package, which holds env.py and versions/."""
    import flywheel.migrations

    return Path(flywheel.migrations.__file__).resolve().parent


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic Config for the store at `url` (None: enough for reading the scripts)."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    if url is not None:
        rendered = normalize_url(url).render_as_string(hide_password=False)
        # Config values go through configparser interpolation: escape URL-encoded '%'.
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The revision this code expects the database to be at."""
    revision = _scripts().get_current_head()
    if revision is None:
        raise RuntimeError(f"no migrations found in {script_location()}")
    return revision


def known_revisions() -> set[str]:
    """Every revision this code has a script for."""
    return {script.revision for script in _scripts().walk_revisions()}


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrate the database at `url` forward to `revision`."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | URL, revision: str) -> None:
    """Migrate the database at `url` back to `revision` (`base` drops every table)."""
    command.downgrade(alembic_config(url), revision)


def current(url: str | URL) -> str | None:
    """The database's revision, or None when it has no Flywheel schema."""
    engine = make_engine(url)
    try:
        return schema_revision(engine)
    finally:
        engine.dispose()


__all__ = [
    "alembic_config",
    "current",
    "downgrade",
    "head",
    "known_revisions",
    "script_location",
    "upgrade",
]
