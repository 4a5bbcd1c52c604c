"""Bad input becomes a 4xx whose message says what is wrong; never a 5xx.

Errors are `{"detail": ...}` (`ErrorBody`), except under `/v2`, where the Open Inference
Protocol's clients expect `{"error": ...}` and 400 where this API says 422.
"""

from __future__ import annotations

import email.message
from typing import Any

import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# what FastAPI raises (HTTP 400, the parser's exception as __cause__) for a body it cannot parse
FASTAPI_PARSE_ERROR = "There was an error parsing the body"
V2 = "/v2"
# the tags pydantic puts in an error's location for the two forms of `instances`
# (flywheel.service.schemas.instances_form): not part of the client's body, so left out
_FORMS = ("vectors", "rows")


class BadRequest(Exception):
    """Input that parsed but cannot be served (wrong width, unknown label, batch too big)."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


def is_v2(path: str) -> bool:
    """A path of the Open Inference Protocol, whose errors are `{"error": ...}`."""
    return path.startswith(V2) and (len(path) == len(V2) or path[len(V2)] == "/")


def error_response(path: str, status: int, message: str, **kwargs: Any) -> JSONResponse:
    """The error body for `path`: `{"error"}` (400 for 422) under /v2, else `ErrorBody`."""
    if is_v2(path):
        return JSONResponse(
            {"error": message}, status_code=400 if status == 422 else status, **kwargs
        )
    return JSONResponse({"detail": message}, status_code=status, **kwargs)


async def send_error(
    send: Send,
    path: str,
    status: int,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer from plain ASGI (a middleware) with the error body for `path`."""
    body = orjson.dumps({"error": message} if is_v2(path) else {"detail": message})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _without_form_tag(loc: tuple) -> tuple:
    for k in range(1, len(loc)):
        if loc[k] in _FORMS and loc[k - 1] == "instances":
            return loc[:k] + loc[k + 1 :]
    return loc


def _message(err: dict) -> str:
    if err.get("type") == "missing":
        return "field required"
    loc, value = tuple(err.get("loc", ())), err.get("input")
    for k in range(1, len(loc) - 1):
        if loc[k - 1] == "instances" and loc[k] in _FORMS and len(loc) == k + 2 and loc[k + 1]:
            first = "a named row" if loc[k] == "rows" else "a vector"
            if isinstance(value, dict if loc[k] == "vectors" else list):
                return (
                    f"instances[0] is {first}, so every instance must be one: send named rows "
                    "or vectors, not both in one request"
                )
    return err.get("msg", "invalid")


def _location(loc: tuple) -> str:
    parts = [str(p) for p in _without_form_tag(loc) if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def describe_validation(exc: RequestValidationError) -> tuple[int, str, list[dict]]:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx", {})
            return 400, f"malformed JSON: {ctx.get('error', 'could not parse body')}", []
    shown = []
    for err in errors[:5]:
        shown.append(f"{_location(tuple(err.get('loc', ())))}: {_message(err)}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    slim = [
        {
            "loc": list(_without_form_tag(tuple(e.get("loc", ())))),
            "msg": e.get("msg"),
            "type": e.get("type"),
        }
        for e in errors[:20]
    ]
    return 422, "; ".join(shown) + more, slim


def is_json_media_type(content_type: str) -> bool:
    """What FastAPI parses as JSON: application/json and application/*+json."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def describe_unreadable_body(cause: BaseException | None) -> str:
    """Why FastAPI could not parse a body (its own message names no reason)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not UTF-8 text ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "malformed JSON: nested too deeply"
    if isinstance(cause, ValueError):  # json's own errors, and Python's int digit limit
        return f"malformed JSON: {str(cause)[:200]}"
    return "could not read the body as JSON"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        path = request.url.path
        content_type = request.headers.get("content-type", "")
        # the body stayed bytes: FastAPI did not read it as JSON because of its content
        # type (with none, only on a strict route: the others read it as JSON)
        if isinstance(exc.body, bytes) and not is_json_media_type(content_type):
            got = f"got {content_type!r}" if content_type else "the request had none"
            return error_response(
                path, 415, f"send the body as JSON with Content-Type: application/json ({got})"
            )
        status, message, errors = describe_validation(exc)
        if is_v2(path):
            return error_response(path, status, message)
        return JSONResponse({"detail": message, "errors": errors or None}, status_code=status)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest) -> JSONResponse:
        return error_response(request.url.path, exc.status_code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == FASTAPI_PARSE_ERROR:
            detail = describe_unreadable_body(exc.__cause__)
        return error_response(
            request.url.path, exc.status_code, detail, headers=getattr(exc, "headers", None)
        )


class BodySizeLimit:
    """Refuse bodies over `max_bytes` with 413, by header or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        path = scope.get("path", "")
        if declared is not None:
            if not declared.isdigit():
                await self._reject(send, 400, "Content-Length must be a number", path)
                return
            if int(declared) > self.max_bytes:
                await self._reject(send, 413, self._too_big(int(declared)), path)
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # an HTTPException, so FastAPI's body reader re-raises it as a 413
                    raise HTTPException(413, self._too_big(seen))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except StarletteHTTPException as exc:
            if started:
                raise
            await self._reject(send, exc.status_code, str(exc.detail), path)

    def _too_big(self, size: int) -> str:
        return f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes"

    @staticmethod
    async def _reject(send: Send, status: int, message: str, path: str) -> None:
        await send_error(send, path, status, message)
