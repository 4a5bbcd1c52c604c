"""Running the app under uvicorn so that a SIGTERM shuts down gracefully *and* lets the
caller clean up (stop an embedded broker), exiting 0 instead of re-raising the signal."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI


class GracefulServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:  # unlike uvicorn's own, do not re-raise: our caller still has work to do
            for sig, handler in original.items():
                signal.signal(sig, handler)


def run_server(app: FastAPI, host: str, port: int, access_log: bool = False) -> None:
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", access_log=access_log, workers=1
    )
    GracefulServer(config).run()
