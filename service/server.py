"""Running the app under uvicorn so that a SIGTERM shuts down gracefully *and* lets the
caller clean up (stop an embedded broker), exiting 0 instead of re-raising the signal.

A start-up that fails (a second replica on the same FLYWHEEL_HOME finds its spool locked)
is `StartupFailed`, raised to the caller, so the command exits non-zero with one `error:`
line. uvicorn alone logs the app's whole traceback and returns normally: the process then
exited 0, which a supervisor reads as a clean stop. The traceback is kept at DEBUG.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from flywheel.service.slow_clients import header_timeout_protocol


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


log = logging.getLogger(__name__)


class StartupFailed(RuntimeError):
    """The app's start-up raised; the message is the exception's last line."""


class _StartupErrors(logging.Filter):
    """Until the server has started: keeps uvicorn's report of a failed start-up (the
    traceback, "Application startup failed") off the log and remembers its last line."""

    def __init__(self, server: uvicorn.Server) -> None:
        super().__init__()
        self.server = server
        self.error: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.server.started:
            return True
        message = record.getMessage()
        if message.startswith("Traceback (most recent call last)"):  # Starlette's text
            lines = [line for line in message.splitlines() if line.strip()]
            self.error = lines[-1].strip()
            log.debug("start-up failed:\n%s", message)
            return False
        if record.exc_info and record.exc_info[1] is not None:  # uvicorn's own report
            exc = record.exc_info[1]
            self.error = self.error or f"{type(exc).__name__}: {exc}"
            log.debug("start-up failed", exc_info=record.exc_info)
            return False
        return message != "Application startup failed. Exiting."


@dataclass(frozen=True)
class TLS:
    """HTTPS for the server: a certificate chain and its key (PEM), and for mutual TLS the
    CA bundle every client certificate must be signed by."""

    certfile: Path
    keyfile: Path
    client_cafile: Path | None = None

    def check(self) -> None:
        """`StartupFailed` naming the files if they are not a usable certificate and key.

        uvicorn loads them only inside `run()`, and a bad pair then ends in a traceback;
        loading them here first turns it into one line before anything starts.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise StartupFailed(
                f"TLS certificate {self.certfile} with key {self.keyfile}: {exc}"
            ) from None
        if self.client_cafile is not None:
            try:
                context.load_verify_locations(cafile=self.client_cafile)
            except (OSError, ssl.SSLError) as exc:
                raise StartupFailed(f"TLS client CA {self.client_cafile}: {exc}") from None

    def uvicorn_options(self) -> dict[str, object]:
        return {
            "ssl_certfile": str(self.certfile),
            "ssl_keyfile": str(self.keyfile),
            "ssl_ca_certs": None if self.client_cafile is None else str(self.client_cafile),
            "ssl_cert_reqs": ssl.CERT_NONE if self.client_cafile is None else ssl.CERT_REQUIRED,
        }


def run_server(
    app: FastAPI,
    host: str,
    port: int,
    access_log: bool = False,
    tls: TLS | None = None,
    *,
    configure_logging: bool = True,
    header_timeout_s: float = 10.0,
) -> None:
    """Serve until stopped (over HTTPS only, with `tls`); `StartupFailed` if the app's
    start-up raised or `tls` names no usable certificate and key. `configure_logging`:
    uvicorn installs its own log handlers (on the process's stderr as it is then: a test
    that captures stderr passes False and keeps the logging it has). A connection whose
    request headers take longer than `header_timeout_s` gets 408 and is closed
    (FLYWHEEL_HEADER_TIMEOUT_S, flywheel.service.slow_clients)."""
    if tls is not None:
        tls.check()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=access_log,
        workers=1,
        http=header_timeout_protocol(header_timeout_s),
        **({} if configure_logging else {"log_config": None}),  # type: ignore[arg-type]
        **(tls.uvicorn_options() if tls is not None else {}),  # type: ignore[arg-type]
    )
    server = GracefulServer(config)
    errors = _StartupErrors(server)
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(errors)
    try:
        server.run()
    finally:
        uvicorn_log.removeFilter(errors)
    if not server.started and errors.error is not None:
        raise StartupFailed(errors.error)
