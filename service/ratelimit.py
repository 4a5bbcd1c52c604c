"""Per-app rate limits on the write paths that take records: a token bucket per (app, scope).

`predict` (`POST /v1/predict`, `/v2/.../infer`) and `correct` (`POST /v1/corrections`)
each have a default rate and burst (`FLYWHEEL_RATE_PREDICT[_BURST]`,
`FLYWHEEL_RATE_CORRECT[_BURST]`) and per-app overrides (`FLYWHEEL_RATE_PER_APP`); a
request over its app's rate gets 429 with `Retry-After` (whole seconds until the bucket
holds a token again, at least 1) and is counted in `flywheel_rate_limited_total{app,
scope}`. It counts requests, not instances: FLYWHEEL_MAX_BATCH and
FLYWHEEL_MAX_CORRECTIONS already bound what one request carries.

With FLYWHEEL_AUTH=off every caller shares one bucket per scope, under the app name
`anonymous` (a single client can exhaust it for all: keys off is for local experiments).
With no limit set anywhere the middleware is not installed at all.

Plain ASGI inside `AppKeys` (it reads the verified app the key check left in the scope),
before the body is read: a refused request costs no parsing. One bucket is two floats and
one `time.monotonic()` a request; the event loop is single-threaded, so no lock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from prometheus_client import Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from flywheel.service.auth import SCOPE_KEY, needed_scope
from flywheel.service.errors import send_error
from flywheel.settings import AccessSettings

__all__ = ["ANONYMOUS", "RateLimit", "RateLimits", "TokenBucket"]

ANONYMOUS = "anonymous"  # the one shared caller with FLYWHEEL_AUTH=off
LIMITED = ("predict", "correct")  # the scopes that take records
_HOT = {"/v1/predict": "predict", "/v1/corrections": "correct"}


class TokenBucket:
    """`burst` tokens at most, refilled at `rate` a second; a request takes one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), now

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one is there."""
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate


class RateLimits:
    """The (rate, burst) of each app and scope, from the `access` settings."""

    def __init__(self, access: AccessSettings) -> None:
        self._default = {
            "predict": _pair(access.rate_predict, access.rate_predict_burst),
            "correct": _pair(access.rate_correct, access.rate_correct_burst),
        }
        self._per_app = {
            app: {scope: _pair(*pair) for scope, pair in scopes.items()}
            for app, scopes in access.rate_per_app.items()
        }

    @property
    def any(self) -> bool:
        """Whether any app or scope has a limit (else the middleware is left out)."""
        pairs = list(self._default.values())
        pairs += [p for scopes in self._per_app.values() for p in scopes.values()]
        return any(p is not None for p in pairs)

    def of(self, app: str, scope: str) -> tuple[float, int] | None:
        """(rate a second, burst) for `app` in `scope`, or None: no limit."""
        own = self._per_app.get(app)
        if own is not None and scope in own:
            return own[scope]
        return self._default.get(scope)


def _pair(rate: float, burst: int) -> tuple[float, int] | None:
    if rate <= 0:
        return None
    return rate, burst if burst > 0 else max(1, math.ceil(rate))


class RateLimit:
    """The middleware: a 429 with Retry-After for a request over its app's rate."""

    def __init__(
        self,
        app: ASGIApp,
        limits: RateLimits,
        refused: Counter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.limits = limits
        self.refused = refused
        self.clock = clock
        # (app, scope) -> its bucket, or None for no limit; as many as apps x 2 scopes
        self._buckets: dict[tuple[str, str], TokenBucket | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            need = _HOT.get(path)  # the hot paths by a dict lookup, /v2 by its rules
            if need is None and path.startswith("/v2/"):
                need = needed_scope("POST", path)
            if need is not None and need in LIMITED:
                identity = scope.get(SCOPE_KEY)
                name = ANONYMOUS if identity is None else identity.name
                wait = self._take(name, need)
                if wait:
                    self.refused.labels(name, need).inc()
                    seconds = max(1, math.ceil(wait))
                    await send_error(
                        send,
                        path,
                        429,
                        f"app {name!r} is over its {need} rate limit; retry in {seconds} s",
                        [(b"retry-after", str(seconds).encode())],
                    )
                    return
        await self.app(scope, receive, send)

    def _take(self, app: str, scope: str) -> float:
        key = (app, scope)
        now = self.clock()
        try:
            bucket = self._buckets[key]
        except KeyError:
            limit = self.limits.of(app, scope)
            bucket = None if limit is None else TokenBucket(limit[0], limit[1], now)
            self._buckets[key] = bucket
        return 0.0 if bucket is None else bucket.take(now)
