"""A service whose start-up fails says so in one line and the command exits non-zero.

uvicorn alone logs the app's traceback and returns normally, so `flywheel serve` exited 0
when a second replica found its spool locked; a supervisor read that as a clean stop.

`configure_logging=False`: uvicorn's own handlers would write to the stderr pytest captures
for this test and closes after it, and a later log line then killed the whole session."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI

from flywheel.service import SpoolLocked, StartupFailed, run_server


def _app_whose_startup_raises() -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        raise SpoolLocked("spool /x/spool is in use by another process")
        yield  # pragma: no cover

    return FastAPI(lifespan=lifespan)


def test_a_failed_startup_is_raised_with_its_last_line_and_no_traceback(caplog, capsys):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="flywheel.service.server")
    with pytest.raises(StartupFailed) as failed:
        run_server(_app_whose_startup_raises(), "127.0.0.1", 0, configure_logging=False)
    assert "SpoolLocked: spool /x/spool is in use by another process" in str(failed.value)
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert not any("Traceback" in r.getMessage() or r.exc_info for r in shown)
    assert not any("Application startup failed" in r.getMessage() for r in shown)
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("Traceback" in r.getMessage() for r in debug)  # kept for whoever looks
    assert "Traceback" not in capsys.readouterr().err


def test_the_filter_is_removed_after_the_run():
    with pytest.raises(StartupFailed):
        run_server(_app_whose_startup_raises(), "127.0.0.1", 0, configure_logging=False)
    assert logging.getLogger("uvicorn.error").filters == []
