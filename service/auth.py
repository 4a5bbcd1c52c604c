"""App keys on every write path: `Authorization: Bearer fw_...` with the route's scope.

One ASGI middleware (`AppKeys`) holds the whole rule (`WRITE_PATHS`): which method and
path needs which scope. Read routes (`GET /v1/model`, health, metrics, OpenAPI, the
review page's reads) stay open. Missing, malformed, unknown, wrong, expired or revoked
keys get 401; a key without the scope gets 403; both with the service's error body
(`{"detail"}`, `{"error"}` under /v2) and `WWW-Authenticate: Bearer`. A verified app is
left in the request's scope (`app_of(request)`) for the routes that need its name.

A middleware, not a dependency per route: a dependency cost ~25 us of a ~255 us predict
(`service/state.py`); this middleware costs ~3.4 us a request with a verified key (in
process, 50,000 calls), and `bench serve --compare auth` measured 1.03x throughput and
1.03x p99 against FLYWHEEL_AUTH=off (docs/benchmarks.md). A cache miss reads the store on
a worker thread, never on the event loop. `FLYWHEEL_ADMIN_TOKEN`, when set, still works as
a key with the admin scope (the bootstrap before any app exists). `FLYWHEEL_AUTH=off`
turns all of this off."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

import anyio.to_thread
import orjson
from pydantic import SecretStr
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from flywheel.appkeys import ADMIN_SCOPES, InvalidKey, parse_key
from flywheel.retry import transient
from flywheel.service.errors import is_v2
from flywheel.store import AppIdentity, KeyBook, KeyRefused

__all__ = ["SCOPE_KEY", "WRITE_PATHS", "AppKeys", "KeyStoreUnavailable", "app_of", "auth_openapi"]

SCOPE_KEY = "flywheel.app"  # where the verified AppIdentity is left in the ASGI scope
# (method, path pattern, scope): every write path of the service
WRITE_PATHS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("POST", re.compile(r"^/v1/predict$"), "predict"),
    ("POST", re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$"), "predict"),
    ("POST", re.compile(r"^/v1/corrections$"), "correct"),
    ("POST", re.compile(r"^/v1/review/(versions/[^/]+/(approve|reject)|rollback)$"), "review"),
    ("POST", re.compile(r"^/v1/admin/forget$"), "admin"),
)
_FAST = {"/v1/predict": "predict", "/v1/corrections": "correct"}  # the hot paths, no regex
BOOTSTRAP_ADMIN = AppIdentity("admin", frozenset(ADMIN_SCOPES))


class KeyStoreUnavailable(RuntimeError):
    """The store the keys live in cannot be opened; the request gets 503."""


def needed_scope(method: str, path: str) -> str | None:
    """The scope `method path` needs, or None for an open route."""
    if method != "POST":
        return None
    fast = _FAST.get(path)
    if fast is not None:
        return fast
    for m, pattern, scope in WRITE_PATHS:
        if m == method and pattern.match(path):
            return scope
    return None


def allows(identity: AppIdentity, scope: str) -> bool:
    if scope == "review":
        return bool(identity.scopes & ADMIN_SCOPES)
    return scope in identity.scopes


def app_of(request: Request) -> AppIdentity | None:
    """The verified app of a request; None when FLYWHEEL_AUTH is off."""
    return request.scope.get(SCOPE_KEY)


def engine_of(store: Callable[[], tuple[Engine | None, str | None]]) -> Callable[[], Engine]:
    """The engine of the service's shared store, or `KeyStoreUnavailable` with why not."""

    def engine() -> Engine:
        found, why = store()
        if found is None:
            raise KeyStoreUnavailable(f"app keys cannot be checked: {why}")
        return found

    return engine


class AppKeys:
    """The middleware: checks the key of every write path before the route runs."""

    def __init__(self, app: ASGIApp, book: KeyBook, admin_token: SecretStr | None) -> None:
        self.app = app
        self.book = book
        self._admin = None if admin_token is None else admin_token.get_secret_value().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        need = needed_scope(scope["method"], path)
        if need is None:
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        if token is None:
            await _refuse(send, path, 401, "send an app key as `Authorization: Bearer <key>`")
            return
        try:  # a key verified within the cache's TTL: no hash, no store
            identity = self.book.verified(token) or await self._identify(token)
        except KeyRefused as exc:
            await _refuse(send, path, 401, f"app key refused: {exc.reason}", invalid=True)
            return
        except KeyStoreUnavailable as exc:
            await _refuse(send, path, 503, str(exc))
            return
        if not allows(identity, need):
            await _refuse(
                send,
                path,
                403,
                f"app {identity.name!r} lacks the {need!r} scope this route needs "
                f"(it has {', '.join(sorted(identity.scopes)) or 'none'})",
            )
            return
        scope[SCOPE_KEY] = identity
        await self.app(scope, receive, send)

    async def _identify(self, token: str) -> AppIdentity:
        if self._admin is not None and secrets.compare_digest(token.encode(), self._admin):
            return BOOTSTRAP_ADMIN
        try:
            key_id, _ = parse_key(token)
        except InvalidKey as exc:
            raise KeyRefused(str(exc)) from None
        book = self.book
        if not book.fresh(key_id):  # a store read: on a worker thread, off the event loop
            try:
                await anyio.to_thread.run_sync(book.record, key_id)
            except Exception as exc:
                # the store is down (the fault suite: a PostgreSQL kill once a key's cached
                # row was older than the TTL): 503, which a client retries, not a 500
                if not transient(exc):
                    raise
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise KeyStoreUnavailable(
                    f"app keys cannot be checked: the store is unavailable ({why})"
                ) from None
        return book.check(token)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, given = value.decode("latin-1").strip().partition(" ")
            given = given.strip()
            return given if scheme.lower() == "bearer" and given else None
    return None


async def _refuse(send: Send, path: str, status: int, message: str, invalid: bool = False) -> None:
    body = orjson.dumps({"error": message} if is_v2(path) else {"detail": message})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        challenge = b'Bearer error="invalid_token"' if invalid else b"Bearer"
        headers.append((b"www-authenticate", challenge))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_RESPONSES = {
    "401": "No app key, or one that is malformed, unknown, expired or revoked.",
    "403": "The app key lacks the scope this route needs.",
}


def auth_openapi(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with the bearer scheme, and each write path's security and 401/403 answers."""
    components = doc.setdefault("components", {})
    components.setdefault("securitySchemes", {})["appKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An app key from `flywheel apps create NAME --scopes ...` (fw_...).",
    }
    schemas = components.get("schemas", {})
    for path, operations in doc.get("paths", {}).items():
        # the body `_refuse` sends: `{"error"}` under /v2 (the protocol's), else ErrorBody
        body = "V2Error" if is_v2(path) else "ErrorBody"
        error_ref = {"$ref": f"#/components/schemas/{body}"}
        has_error_body = body in schemas
        for method, op in operations.items():
            need = needed_scope(method.upper(), _example_path(path))
            if need is None:
                continue
            op["security"] = [{"appKey": []}]
            op["description"] = (
                op.get("description") or ""
            ) + f"\n\nNeeds an app key with the `{need}` scope."
            responses = op.setdefault("responses", {})
            for status, text in _RESPONSES.items():
                answer: dict[str, Any] = {"description": text}
                if has_error_body:
                    answer["content"] = {"application/json": {"schema": dict(error_ref)}}
                responses.setdefault(status, answer)
    return doc


def _example_path(template: str) -> str:
    """An OpenAPI path template as a concrete path (`{name}` -> `x`), to match the rules."""
    return re.sub(r"\{[^}]+\}", "x", template)
