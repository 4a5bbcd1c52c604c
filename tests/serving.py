"""A FastAPI app under uvicorn on a real loopback socket, for as long as a `with` lasts.

What the integration tests that talk HTTP to a real server share: a free port, the
graceful server in a daemon thread, a wait (scaled to the machine, tests.deadlines) until
it listens, and a stop that fails the test if uvicorn does not end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from flywheel.broker import free_port
from flywheel.service import GracefulServer
from tests.deadlines import deadline


@contextmanager
def uvicorn_serving(app: Any, name: str = "test-service", start_s: float = 120.0) -> Iterator[str]:
    """Serve `app` on 127.0.0.1; yields its base URL (`http://127.0.0.1:PORT`)."""
    port = free_port()
    server = GracefulServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    try:
        until = time.monotonic() + deadline(start_s)
        while not server.started and thread.is_alive() and time.monotonic() < until:
            time.sleep(0.02)
        assert server.started, "the service did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(deadline(30))
        assert not thread.is_alive(), "uvicorn did not stop"
