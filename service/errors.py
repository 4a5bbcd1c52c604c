"""Bad input becomes a 4xx whose message says what is wrong; never a 5xx."""

from __future__ import annotations

import email.message

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# what FastAPI raises (HTTP 400, the parser's exception as __cause__) for a body it cannot parse
FASTAPI_PARSE_ERROR = "There was an error parsing the body"


class BadRequest(Exception):
    """Input that parsed but cannot be served (wrong width, unknown label, batch too big)."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
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
        msg = err.get("msg", "invalid")
        if err.get("type") == "missing":
            msg = "field required"
        shown.append(f"{_location(tuple(err.get('loc', ())))}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    slim = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
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
        content_type = request.headers.get("content-type", "")
        if content_type and not is_json_media_type(content_type) and isinstance(exc.body, bytes):
            return JSONResponse(
                {
                    "detail": f"send the body as JSON with Content-Type: application/json "
                    f"(got {content_type!r})"
                },
                status_code=415,
            )
        status, message, errors = describe_validation(exc)
        return JSONResponse({"detail": message, "errors": errors or None}, status_code=status)

    @app.exception_handler(BadRequest)
    async def _bad(_: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == FASTAPI_PARSE_ERROR:
            detail = describe_unreadable_body(exc.__cause__)
        return JSONResponse(
            {"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
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
        if declared is not None:
            if not declared.isdigit():
                await self._reject(send, 400, "Content-Length must be a number")
                return
            if int(declared) > self.max_bytes:
                await self._reject(send, 413, self._too_big(int(declared)))
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
            await self._reject(send, exc.status_code, str(exc.detail))

    def _too_big(self, size: int) -> str:
        return f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes"

    @staticmethod
    async def _reject(send: Send, status: int, message: str) -> None:
        import orjson

        body = orjson.dumps({"detail": message})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
