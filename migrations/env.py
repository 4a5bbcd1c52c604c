"""Alembic environment for the training store; the URL comes from the Config object.

`flywheel.store.migrate.alembic_config` builds that Config in code, so no
alembic.ini is needed at the cwd. A caller may also pass an open connection as
`config.attributes["connection"]` to migrate inside its own transaction.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import URL, Connection

from flywheel.store.database import make_engine, normalize_url
from flywheel.store.models import Base
from flywheel.store.partitions import is_partition

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no sqlalchemy.url in the Alembic config; use alembic_config(url)")
    return url


def _not_a_partition(name: str | None, type_: str, _parents: Any) -> bool:
    return not (type_ == "table" and name is not None and is_partition(name))


def _configure(
    dialect_name: str,
    *,
    url: URL | None = None,
    connection: Connection | None = None,
    literal_binds: bool = False,
    dialect_opts: dict[str, Any] | None = None,
) -> None:
    """`context.configure` with Flywheel's settings (None and False are its defaults)."""
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        compare_type=True,
        # a day partition of `predictions` (PostgreSQL) is data, not schema
        include_name=_not_a_partition,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=dialect_name == "sqlite",
        literal_binds=literal_binds,
        dialect_opts=dialect_opts,
    )


def run_offline() -> None:
    url = normalize_url(_url())
    _configure(
        url=url,
        dialect_name=url.get_backend_name(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


# Any constant works; it only has to be the same for every Flywheel process.
PG_MIGRATION_LOCK = 0x666C7977  # "flyw"


def run_online(connection: Connection) -> None:
    _configure(connection=connection, dialect_name=connection.dialect.name)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Processes that upgrade at start-up must not race: the second one waits here,
            # then finds the database already at head (alembic reads it after this).
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK}
            )
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
elif (given := config.attributes.get("connection")) is not None:
    run_online(given)
else:
    engine = make_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            run_online(conn)
    finally:
        engine.dispose()
