"""Shared fixtures: throwaway databases for tests that need a real training store;
deadlines and processes that are safe on a busy machine and in a parallel run.

PostgreSQL is expected at 127.0.0.1:5432 (trust auth, user `postgres`, database
`test`; override with PG_ADMIN_URL). Without it, PostgreSQL tests skip locally but
fail under CI=true, so a broken CI service can never turn into a green run.

Parallel runs (pytest-xdist, `-n N`): every session-scoped fixture -- the PostgreSQL
database, the broker in tests/integration/conftest.py, the seed model -- is made once per
worker, and `tmp_path` is per worker, so a test that takes its database, broker, ports
(`free_port()`) and home (`tmp_path`) from fixtures is safe in a parallel run as written.

Waits: `deadline(seconds)` (fixture, or `tests.deadlines.deadline`) scales a wait by the
machine's measured speed factor; pytest-timeout's limits are scaled by the same factor.
Processes: start them with the `processes` fixture; a test that leaves a process behind
gets a teardown error (the processes listed and killed), and the session fails at its end
if any process of the run is left (tests/processes.py).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from tests.benchrun import ROOT, bench_process
from tests.deadlines import deadline as scaled_deadline
from tests.deadlines import speed_factor
from tests.processes import ProcessGroup, describe, kill, mark_session, tagged, wait_gone

PG_ADMIN_URL = os.environ.get("PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def _pg_admin_url() -> URL:
    url = make_url(PG_ADMIN_URL)
    return url.set(drivername="postgresql+psycopg") if url.drivername == "postgresql" else url


def _pg_engine(url: URL) -> Engine:
    return create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args={"connect_timeout": 5},
    )


@pytest.fixture(scope="session")
def pg_session_url() -> Iterator[str]:
    """A PostgreSQL database created for this test session and dropped (FORCE) after it."""
    admin_url = _pg_admin_url()
    # one database per xdist worker ("gw0", ...), "main" without xdist; named so a leftover
    # one says which run made it
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"fw_test_{worker}_{secrets.token_hex(6)}"
    admin = _pg_engine(admin_url)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except SQLAlchemyError as exc:
        admin.dispose()
        reason = (
            f"PostgreSQL at {admin_url.render_as_string(hide_password=True)} is unusable: "
            f"{' '.join(str(getattr(exc, 'orig', None) or exc).split())}"
        )
        if _in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def pg_url(pg_session_url: str) -> str:
    """The session's PostgreSQL database, emptied first so each test starts from nothing.

    Connections a previous test leaked are terminated, so a forgotten engine cannot
    make the reset (or this test) hang on a lock.
    """
    engine = _pg_engine(make_url(pg_session_url))
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
    finally:
        engine.dispose()
    return pg_session_url


class SeedModel(NamedTuple):
    settings: Any  # flywheel.settings.Settings, on the fixture's own home
    spec: Any  # its ModelSpec
    module: Any  # the trained torch module, in eval mode
    x_tr: np.ndarray
    y_tr: np.ndarray
    x_ho: np.ndarray
    y_ho: np.ndarray


@pytest.fixture(scope="session")
def seed_model(tmp_path_factory: pytest.TempPathFactory) -> SeedModel:
    """The seed model and its data, trained once for the whole session (the analyzer,
    counterexample and example-builder tests all start from it; none may change it)."""
    from flywheel.learner import train_seed_model
    from flywheel.settings import Settings
    from flywheel.store.trusted import seed_data

    settings = Settings(home=tmp_path_factory.mktemp("seed-home"), seed_examples=1000)
    x_tr, y_tr, x_ho, y_ho = seed_data(settings.trusted)
    spec, module, _ = train_seed_model(settings.trusted)
    return SeedModel(settings, spec, module, x_tr, y_tr, x_ho, y_ho)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file in this test's tmp dir (created on first connect)."""
    return f"sqlite:///{tmp_path / 'flywheel.db'}"


class _ListSink:
    """A Kafka sink that acknowledges everything and keeps it in a list."""

    def __init__(self, out: list) -> None:
        self.out = out

    def send(self, records, timeout_s):
        self.out.extend(records)
        return [True] * len(records)

    def close(self) -> None:
        pass


@pytest.fixture()
def list_event_log(tmp_path: Path):
    """`make(sent)`: a service EventLog whose delivered records land in the list `sent`."""
    from flywheel.service.event_log import EventLog
    from flywheel.service.spool import Spool

    def make(sent: list | None = None):
        out = [] if sent is None else sent
        return EventLog(lambda: _ListSink(out), Spool(tmp_path / "spool", fsync=False))

    return make


class AppKey(NamedTuple):
    """An app made in a test's store, and what a client sends with its key."""

    name: str
    key: str
    headers: dict[str, str]


ALL_SCOPES = "predict,correct,review,admin"


def make_app_key(database_url: str, name: str = "tests", scopes: str = ALL_SCOPES) -> AppKey:
    """Create app `name` in the (migrated) store at `database_url` and return its key."""
    from flywheel.store import add_app, make_engine, session_factory

    engine = make_engine(database_url)
    try:
        with session_factory(engine).begin() as session:
            key = add_app(session, name, scopes)
    finally:
        engine.dispose()
    return AppKey(name, key, {"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="session")
def _keyed_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AppKey]:
    """A migrated SQLite store with one app, made once and copied into each test's home."""
    from flywheel.store import upgrade

    path = tmp_path_factory.mktemp("keyed-store") / "flywheel.db"
    upgrade(f"sqlite:///{path}")
    return path, make_app_key(f"sqlite:///{path}")


@pytest.fixture
def app_key(tmp_path: Path, _keyed_store: tuple[Path, AppKey]) -> AppKey:
    """The key of app `tests` (every scope), in the store of `Settings(home=tmp_path)`:
    a service built on that home accepts `TestClient(app, headers=app_key.headers)`."""
    import shutil

    template, key = _keyed_store
    shutil.copyfile(template, tmp_path / "flywheel.db")
    return key


# -- benchmarks: their smoke tests run them the one way they are run by hand -------------


@pytest.fixture(scope="session")
def run_bench() -> Iterator[Callable[..., dict[str, Any]]]:
    """`run_bench(NAME, *args)`: `python -m bench NAME *args --json` in this process, its
    JSON document. torch and river are imported once for all benchmarks instead of once
    per subprocess (~5 s each)."""
    from typer.testing import CliRunner

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))  # bench/ is a plain folder, not installed
        from bench.__main__ import app

        def run(*args: str) -> dict[str, Any]:
            result = CliRunner().invoke(app, [*args, "--json"])
            assert result.exit_code == 0, (result.stderr or "")[-3000:] + repr(result.exception)
            return json.loads(result.stdout)

        yield run


@pytest.fixture(scope="session")
def run_bench_process() -> Callable[..., dict[str, Any]]:
    """`run_bench_process(NAME, *args)`: `bench_process`, which must succeed; its JSON."""

    def run(name: str, *args: str) -> dict[str, Any]:
        r = bench_process(name, *args)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)

    return run


# -- deadlines, processes, parallel runs ---------------------------------------------------

_SESSION = pytest.StashKey[str]()
_BEFORE = pytest.StashKey[set[int]]()
# processes started by session- / module- / class-scoped fixtures, also when a test body
# asks for one (request.getfixturevalue): not the test's to stop
_FIXTURE_OWNED: set[int] = set()
LEAK_GRACE_S = 5.0  # how long a test's stopped processes may take to exit after teardown


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SESSION] = mark_session()
    speed_factor()  # measured once, before any test (or worker) loads the machine


def pytest_report_header(config: pytest.Config) -> str:
    return f"deadline factor: {speed_factor():.2f} (tests/deadlines.py)"


# Suites that are slow as a whole, marked slow wherever their tests come from: fault
# injection (tests/faults/) and long fuzzing (test_fuzz*.py files).
SLOW_FOLDERS = (ROOT / "tests" / "faults",)
SLOW_FILES = "test_fuzz*.py"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the slow suites slow; scale pytest-timeout's limit of every test (its marker's,
    else the configured one) by the speed factor."""
    for item in items:
        path = item.path
        if path.match(SLOW_FILES) or any(path.is_relative_to(f) for f in SLOW_FOLDERS):
            item.add_marker(pytest.mark.slow)
    factor = speed_factor()
    if factor <= 1.0:
        return
    configured = config.getoption("timeout", None) or config.getini("timeout")
    for item in items:
        marker = item.get_closest_marker("timeout")
        kwargs = dict(marker.kwargs) if marker else {}
        base = marker.args[0] if marker and marker.args else kwargs.pop("timeout", configured)
        if base is None or float(base) <= 0:
            continue
        item.add_marker(pytest.mark.timeout(float(base) * factor, **kwargs), append=False)


@pytest.fixture(scope="session")
def deadline() -> Callable[[float], float]:
    """`deadline(seconds)`: a wait that is enough on a quiet machine, scaled by this
    session's measured speed factor (tests/deadlines.py)."""
    return scaled_deadline


@pytest.fixture
def processes() -> Iterator[ProcessGroup]:
    """`processes.start(args, **popen)`: a process in its own process group; every one
    still running is stopped (SIGTERM, then SIGKILL to the group) when the test ends,
    passed or failed. `processes.stop(proc)` stops one earlier."""
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.close()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Iterator[Any]:
    if fixturedef.scope == "function":
        return (yield)
    session = request.config.stash[_SESSION]
    before = {p.pid for p in tagged(session)}
    try:
        return (yield)
    finally:
        _FIXTURE_OWNED.update(p.pid for p in tagged(session) if p.pid not in before)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    try:
        return (yield)
    finally:
        # what runs now (the session's broker, a fixture's server) is not this test's leak
        item.stash[_BEFORE] = {p.pid for p in tagged(item.config.stash[_SESSION])}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    result = yield
    before = item.stash.get(_BEFORE, set()) | _FIXTURE_OWNED
    session = item.config.stash[_SESSION]
    left = [p for p in tagged(session) if p.pid not in before]
    if left and wait_gone([p.pid for p in left], scaled_deadline(LEAK_GRACE_S)):
        left = [p for p in tagged(session) if p.pid not in before]
        if left:
            kill(left)
            pytest.fail(
                f"{item.nodeid} left {len(left)} process(es) running (now killed); start "
                f"them with the `processes` fixture or stop them in a finally:\n{describe(left)}",
                pytrace=False,
            )
    return result


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Iterator[None]:
    """After every fixture's teardown (and, under xdist, every worker's exit): fail the run
    if any process it started is still running, listing and killing them."""
    result = yield
    if hasattr(session.config, "workerinput"):
        return result  # the controller checks the whole run once its workers are gone
    tag = session.config.stash[_SESSION]
    left = tagged(tag)
    if left and wait_gone([p.pid for p in left], scaled_deadline(LEAK_GRACE_S)):
        left = tagged(tag)
        if left:
            kill(left)
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            message = f"the test run left {len(left)} process(es) running (now killed):"
            if reporter is not None:
                reporter.ensure_newline()
                reporter.write_sep("=", "processes left behind", red=True)
                reporter.write_line(f"{message}\n{describe(left)}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return result
