"""Closing connections whose request headers arrive too slowly (slowloris; issue 26).

uvicorn 0.49 times out only an idle keep-alive connection (`timeout_keep_alive`, 5 s): a
client that opens a connection and sends one header line a second holds it, and a
coroutine, for as long as it likes, so a few hundred such sockets take the service's
connections. `header_timeout_protocol` returns uvicorn's own HTTP protocol class
(httptools when installed, else h11) with one timer more: from the connection's start,
and again from the end of each response, a request's headers must be complete within
FLYWHEEL_HEADER_TIMEOUT_S, or the service answers `408 Request Timeout` and closes (an
idle connection, with no byte of a new request, is closed without an answer, so a client
reusing it never reads a 408 meant for nobody). A
request whose headers arrived is never cut by it: a slow model or a large body is the
body limit's and the client's business.

Measured (tests/unit/test_http_limits.py): a socket sending a header line a second is
closed after the timeout (1 s in the test) with a 408; without this it stayed open for
the whole 12 s tried.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["header_timeout_protocol"]

_BODY = b'{"detail":"the request headers did not arrive in time"}'
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


def _base() -> type[Any]:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:  # httptools is optional: uvicorn's pure-Python parser
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class, closing connections whose headers take > `timeout_s`."""
    base = _base()

    class HeaderTimeout(base):  # type: ignore[misc,valid-type]
        header_timer: asyncio.TimerHandle | None = None
        started_request = False  # bytes of a request came since the timer was armed

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self.arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm_header_timer()

        def data_received(self, data: bytes) -> None:
            self.started_request = True
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def arm_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            waiting_since = self.cycle  # a request whose headers complete replaces it
            self.started_request = False
            self.header_timer = self.loop.call_later(timeout_s, self.headers_overdue, waiting_since)

        def headers_overdue(self, waiting_since: Any) -> None:
            self.header_timer = None
            cycle: Any = self.cycle
            if cycle is not waiting_since or self.transport.is_closing():
                return  # headers arrived since: a request is being served
            if cycle is not None and not cycle.response_complete:
                return  # a (pipelined) request is still being answered
            if self.started_request:  # part of a request came: say why it ends
                self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()  # idle: closed quietly, as uvicorn's keep-alive does

    return HeaderTimeout
