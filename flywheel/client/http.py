"""`Client` and `AsyncClient`: the service's HTTP API as Python calls.

What a call does is written once, as a plan that yields the requests it needs and gets
their JSON answers back (`_predict_plan`, `_corrections_plan`); `Client` runs a plan with
blocking requests, `AsyncClient` with awaited ones. So the two cannot drift apart: the
batching, the index arithmetic in error messages and the adaptation to the server's limits
are the same code. Retries are written once the same way: `_exchange` yields the I/O it
needs (send this request, sleep this long) and gets the outcome back; the two classes only
perform those effects (`Client._perform`, `AsyncClient._perform`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import httpx

from flywheel.client.errors import (
    BadRequest,
    FlywheelError,
    InvalidInput,
    Unavailable,
    error_for,
)
from flywheel.client.inputs import Rows, as_corrections, correction_json
from flywheel.client.retry import RETRY_STATUSES, RetryPolicy, retry_after
from flywheel.client.types import (
    ModelInfo,
    ModelRef,
    Prediction,
    PredictResult,
    parse_accepted,
    parse_model_info,
    parse_predictions,
)

# the service's defaults (flywheel/settings.py): FLYWHEEL_MAX_BATCH and, well under
# FLYWHEEL_MAX_CORRECTIONS (10,000), a corrections request of ~100 KB
DEFAULT_BATCH_SIZE = 256
DEFAULT_CORRECTIONS_BATCH_SIZE = 1000
DEFAULT_TIMEOUT_S = 10.0
USER_AGENT = "flywheel-client/1"
# the header the service routes a canary by (docs/contracts.md; flywheel.service.ROUTING_HEADER)
ROUTING_HEADER = "x-flywheel-routing-key"

Request = tuple[str, str, Any]  # method, path, JSON body (None: no body)
Plan = Generator[Request, Any, Any]
# what a call asks its runner to do: ("send", method, path, content, headers), answered by
# the httpx.Response or the httpx.TransportError; ("sleep", seconds), answered by None
Effect = tuple[Any, ...]
Effects = Generator[Effect, Any, Any]
# the limit a 413 names: "... exceeds the limit of 100 (FLYWHEEL_MAX_BATCH)"
_LIMIT = re.compile(r"limit of (\d+) \(FLYWHEEL_MAX_(?:BATCH|CORRECTIONS)\)")


def _positive(name: str, value: Any, cap: int = 100_000) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
        raise ValueError(f"{name} must be an integer from 1 to {cap}; got {value!r}")
    return value


Verify = bool | str | os.PathLike[str] | ssl.SSLContext
"""What `Client(verify=...)` takes: see `ssl_verify`."""


def ssl_verify(verify: Verify) -> bool | ssl.SSLContext:
    """httpx's `verify` for `verify`: a CA bundle's path becomes an SSL context that trusts
    it (httpx 0.28 deprecates a path); a bool or a context is passed as is.

    >>> ssl_verify(True), ssl_verify(False)
    (True, False)
    """
    if isinstance(verify, bool | ssl.SSLContext):
        return verify
    path = os.fspath(verify)
    if not os.path.isfile(path):
        raise ValueError(f"verify: no CA bundle at {path!r}")
    return ssl.create_default_context(cafile=path)


class _Base:
    """Settings, headers and the plans; no I/O."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        retries: int,
        backoff: float,
        max_backoff: float,
        batch_size: int,
        corrections_batch_size: int,
        routing_key: str | None = None,
    ) -> None:
        try:
            url = httpx.URL(base_url) if isinstance(base_url, str) else None
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise ValueError(
                f"base_url must be an http(s) URL such as http://host:8000; got {base_url!r}"
            )
        if api_key is not None and (
            not isinstance(api_key, str) or not api_key or any(c.isspace() for c in api_key)
        ):
            raise ValueError("api_key must be a non-empty string without spaces or newlines")
        if isinstance(timeout, bool) or not (
            isinstance(timeout, httpx.Timeout) or isinstance(timeout, int | float) and timeout > 0
        ):
            raise ValueError(f"timeout must be seconds (> 0) or an httpx.Timeout; got {timeout!r}")
        self.base_url = str(url).rstrip("/")
        self.policy = RetryPolicy(retries, backoff, max_backoff)
        self.batch_size = _positive("batch_size", batch_size)
        self.corrections_batch_size = _positive("corrections_batch_size", corrections_batch_size)
        self.timeout = timeout
        self.headers = {"user-agent": USER_AGENT, "accept": "application/json"}
        if api_key is not None:
            self.headers["authorization"] = f"Bearer {api_key}"
        if routing_key is not None:
            # while a canary runs, every prediction of this client is answered by the same
            # version (docs/serving.md#shadows-and-canaries): one client per user or tenant
            if (
                not isinstance(routing_key, str)
                or not 0 < len(routing_key) <= 256
                or not routing_key.isprintable()
                or routing_key != routing_key.strip()
            ):
                raise ValueError(
                    "routing_key must be 1-256 printable characters without leading or "
                    f"trailing spaces; got {routing_key!r}"
                )
            self.headers[ROUTING_HEADER] = routing_key
        # what a 413 taught us about the server's limits, for the next calls
        self._limits: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    # -- one request ----------------------------------------------------------------------

    @staticmethod
    def _encode(body: Any) -> bytes | None:
        if body is None:
            return None
        try:
            return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:  # the converters let nothing like this through
            raise InvalidInput(f"cannot send the input as JSON: {exc}") from None

    @staticmethod
    def _outcome(
        method: str, path: str, response: httpx.Response
    ) -> tuple[Any, FlywheelError | None]:
        """(JSON body, None) for a success; (None, error) for a retryable failure; raises
        a final one."""
        if 300 <= response.status_code < 400:  # httpx does not follow redirects
            raise FlywheelError(
                f"{method} {path} was redirected ({response.status_code}) to "
                f"{response.headers.get('location', '?')}; give the client that base_url"
            )
        if response.status_code < 400:
            if not response.content:
                return None, None
            try:
                return response.json(), None
            except ValueError:
                raise FlywheelError(
                    f"unexpected response from {method} {path}: not JSON "
                    f"({response.headers.get('content-type', 'no content type')})"
                ) from None
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        error = error_for(response.status_code, body)
        if response.status_code in RETRY_STATUSES:
            return None, error
        raise error

    @staticmethod
    def _gave_up(method: str, path: str, error: FlywheelError, attempts: int) -> Unavailable:
        tries = f"after {attempts} attempts" if attempts > 1 else "with retries off"
        return Unavailable(
            f"{method} {path} failed {tries}: {error.detail}",
            status=error.status,
            errors=error.errors,
        )

    @staticmethod
    def _transport_error(exc: httpx.TransportError) -> Unavailable:
        return Unavailable(f"{type(exc).__name__}: {exc or 'no detail'}")

    # -- a call as effects: what is sent, retried and slept, with no I/O ---------------

    def _exchange(self, method: str, path: str, body: Any) -> Effects:
        """One request with retries: its JSON answer, or the final error raised."""
        content = self._encode(body)
        headers = {"content-type": "application/json"} if content is not None else None
        attempt = 0
        while True:
            outcome = yield ("send", method, path, content, headers)
            if isinstance(outcome, httpx.TransportError):
                error: FlywheelError | None = self._transport_error(outcome)
                wait_at_least = None
            else:
                doc, error = self._outcome(method, path, outcome)
                if error is None:
                    return doc
                wait_at_least = retry_after(outcome)
            assert error is not None
            if attempt >= self.policy.retries:
                raise self._gave_up(method, path, error, attempt + 1) from error
            yield ("sleep", self.policy.delay(attempt, wait_at_least))
            attempt += 1

    def _calls(self, plan: Plan) -> Effects:
        """Every request of `plan`, each with retries; a final error goes back into the plan
        (which may split the batch and go on, or raise)."""
        value: Any = None
        error: FlywheelError | None = None
        while True:
            try:
                request = plan.throw(error) if error is not None else plan.send(value)
            except StopIteration as stop:
                return stop.value
            try:
                value, error = (yield from self._exchange(*request)), None
            except FlywheelError as exc:
                value, error = None, exc

    # -- plans: what a call sends, in order ---------------------------------------------

    def _predict_plan(self, instances: Any, batch_size: int | None) -> Plan:
        rows = Rows.of(instances)
        n = len(rows)
        if n == 0:
            raise InvalidInput("no instances to predict")
        size = _positive("batch_size", batch_size) if batch_size is not None else self.batch_size
        size = min(size, self._limits.get("predict", size))
        predictions: list[Prediction] = []
        model: ModelRef | None = None
        pos = 0
        while pos < n:
            part = rows.slice(pos, min(n, pos + size))
            try:
                doc = yield ("POST", "/v1/predict", {"instances": part})
            except FlywheelError as exc:
                smaller = self._smaller(exc, len(part), "predict")
                if smaller is None:
                    raise _shifted(exc, "instances", pos) from exc.__cause__
                size = smaller
                continue
            model, got = parse_predictions(doc, len(part))
            predictions += got
            pos += len(part)
        assert model is not None
        return PredictResult(model, predictions)

    def _corrections_plan(self, corrections: Any) -> Plan:
        items = [correction_json(c) for c in as_corrections(corrections)]
        n, size = len(items), self.corrections_batch_size
        size = min(size, self._limits.get("corrections", size))
        accepted = pos = 0
        while pos < n:
            part = items[pos : pos + size]
            try:
                doc = yield ("POST", "/v1/corrections", {"corrections": part})
            except FlywheelError as exc:
                smaller = self._smaller(exc, len(part), "corrections")
                if smaller is None:
                    error = _shifted(exc, "corrections", pos)
                    error.accepted = accepted  # earlier requests' corrections stay accepted
                    raise error from exc.__cause__
                size = smaller
                continue
            accepted += parse_accepted(doc)
            pos += len(part)
        return accepted

    def _smaller(self, exc: FlywheelError, size: int, what: str) -> int | None:
        """After a 413 for `size` items: a size the server takes (the limit it names, else
        half), remembered for later calls; None if splitting cannot help."""
        if exc.status != 413 or size <= 1:
            return None
        named = _LIMIT.search(exc.detail)
        smaller = int(named.group(1)) if named else size // 2
        smaller = max(1, min(smaller, size - 1))
        self._limits[what] = smaller
        return smaller


def _shifted(exc: FlywheelError, field: str, offset: int) -> FlywheelError:
    """The server's error for a request that started at item `offset`, with its indexes
    (`instances[3]`, `loc: ["body", "instances", 3]`) counted from the caller's first item.
    A local `InvalidInput` counts from there already."""
    if offset == 0 or isinstance(exc, InvalidInput) or not isinstance(exc, BadRequest):
        return exc
    pattern = re.compile(rf"\b{field}\[(\d+)\]")
    detail = pattern.sub(lambda m: f"{field}[{int(m.group(1)) + offset}]", exc.detail)
    errors = []
    for e in exc.errors:
        loc = e.get("loc")
        if isinstance(loc, list) and field in loc:
            i = loc.index(field) + 1
            if i < len(loc) and isinstance(loc[i], int):
                loc = [*loc[:i], loc[i] + offset, *loc[i + 1 :]]
                e = {**e, "loc": loc}
        errors.append(e)
    shifted = type(exc)(detail, status=exc.status, errors=errors)
    shifted.__suppress_context__ = True  # the same error, only renumbered
    return shifted


class Client(_Base):
    """The Flywheel service over HTTP, blocking. One per app; thread-safe like httpx's.

    `retries` more attempts with exponential backoff and jitter on connection errors, 429
    and 502/503/504 (`flywheel.client.retry`); inputs longer than `batch_size` rows are sent
    as several requests. `transport` replaces the network (an `httpx.MockTransport` in
    tests); `sleep` replaces `time.sleep` between retries. `verify` checks an https
    service's certificate: True (the system's CAs), the path of a CA bundle (a service
    whose certificate your own CA signed: FLYWHEEL_TLS_CERTFILE), an `ssl.SSLContext` (for
    mutual TLS, one with `load_cert_chain(client_cert, client_key)` called), or False (no
    check: never in production). `routing_key` is sent as `X-Flywheel-Routing-Key` with
    every request: while a canary runs, the service answers all of this client's
    predictions with the same version (one client per user or tenant; without it each
    request is routed at random; docs/serving.md#shadows-and-canaries).

    >>> import httpx
    >>> def service(request):
    ...     n = len(json.loads(request.content)["instances"])
    ...     return httpx.Response(200, json={
    ...         "model": {"name": "flywheel", "version": "3"},
    ...         "predictions": [{"id": f"p{i}", "label": "cat",
    ...                          "probabilities": {"cat": 0.9, "dog": 0.1}} for i in range(n)]})
    >>> with Client("http://flywheel.test", transport=httpx.MockTransport(service)) as fw:
    ...     result = fw.predict([[0.1, 0.2], [0.3, 0.4]])
    >>> result.model, result.labels
    (ModelRef(name='flywheel', version='3'), ['cat', 'cat'])
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        corrections_batch_size: int = DEFAULT_CORRECTIONS_BATCH_SIZE,
        routing_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: Verify = True,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            batch_size=batch_size,
            corrections_batch_size=corrections_batch_size,
            routing_key=routing_key,
        )
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self.headers,
            timeout=timeout,
            transport=transport,
            verify=ssl_verify(verify),
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def predict(self, instances: Any, *, batch_size: int | None = None) -> PredictResult:
        """A prediction per instance, in order (see `flywheel.client.inputs` for the kinds
        of input). Every returned id is logged by the service; correct it by that id."""
        return self._run(self._calls(self._predict_plan(instances, batch_size)))

    def correct(self, corrections: Any) -> int:
        """Send true labels; returns how many the service accepted (all of them, or an
        error). Items: `(prediction_id, label)` pairs, dicts or `Correction`s."""
        return int(self._run(self._calls(self._corrections_plan(corrections))))

    send_corrections = correct

    def model(self) -> ModelInfo:
        """The version being served (`GET /v1/model`)."""
        return parse_model_info(self._run(self._exchange("GET", "/v1/model", None)))

    def ready(self) -> bool:
        """Whether the service can serve and log a prediction now (`GET /readyz`): one
        request, no retries; False also when it cannot be reached."""
        try:
            response = self._http.get("/readyz")
        except httpx.TransportError:
            return False
        return _readiness(response)

    def wait_ready(self, timeout_s: float = 30.0, interval_s: float = 0.25) -> None:
        """Return once `ready()`; raise `Unavailable` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() >= deadline:
                raise Unavailable(f"{self.base_url} not ready after {timeout_s:g} s")
            self._sleep(interval_s)

    def _run(self, effects: Effects) -> Any:
        outcome: Any = None
        while True:
            try:
                effect = effects.send(outcome)
            except StopIteration as stop:
                return stop.value
            outcome = self._perform(effect)

    def _perform(self, effect: Effect) -> Any:
        if effect[0] == "sleep":
            self._sleep(effect[1])
            return None
        _, method, path, content, headers = effect
        try:
            return self._http.request(method, path, content=content, headers=headers)
        except httpx.TransportError as exc:
            return exc


class AsyncClient(_Base):
    """`Client` for asyncio: the same methods, awaited; `async with` closes it.

    >>> import asyncio, httpx
    >>> def service(request):
    ...     return httpx.Response(202, json={"accepted": 2})
    >>> async def main():
    ...     async with AsyncClient("http://flywheel.test",
    ...                            transport=httpx.MockTransport(service)) as fw:
    ...         return await fw.correct([("p1", "dog"), ("p2", "cat")])
    >>> asyncio.run(main())
    2
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        corrections_batch_size: int = DEFAULT_CORRECTIONS_BATCH_SIZE,
        routing_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: Verify = True,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            batch_size=batch_size,
            corrections_batch_size=corrections_batch_size,
            routing_key=routing_key,
        )
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self.headers,
            timeout=timeout,
            transport=transport,
            verify=ssl_verify(verify),
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def predict(self, instances: Any, *, batch_size: int | None = None) -> PredictResult:
        """See `Client.predict`."""
        return await self._run(self._calls(self._predict_plan(instances, batch_size)))

    async def correct(self, corrections: Any) -> int:
        """See `Client.correct`."""
        return int(await self._run(self._calls(self._corrections_plan(corrections))))

    send_corrections = correct

    async def model(self) -> ModelInfo:
        """See `Client.model`."""
        return parse_model_info(await self._run(self._exchange("GET", "/v1/model", None)))

    async def ready(self) -> bool:
        """See `Client.ready`."""
        try:
            response = await self._http.get("/readyz")
        except httpx.TransportError:
            return False
        return _readiness(response)

    async def wait_ready(self, timeout_s: float = 30.0, interval_s: float = 0.25) -> None:
        """See `Client.wait_ready`."""
        deadline = time.monotonic() + timeout_s
        while not await self.ready():
            if time.monotonic() >= deadline:
                raise Unavailable(f"{self.base_url} not ready after {timeout_s:g} s")
            await self._sleep(interval_s)

    async def _run(self, effects: Effects) -> Any:
        outcome: Any = None
        while True:
            try:
                effect = effects.send(outcome)
            except StopIteration as stop:
                return stop.value
            outcome = await self._perform(effect)

    async def _perform(self, effect: Effect) -> Any:
        if effect[0] == "sleep":
            await self._sleep(effect[1])
            return None
        _, method, path, content, headers = effect
        try:
            return await self._http.request(method, path, content=content, headers=headers)
        except httpx.TransportError as exc:
            return exc


def _readiness(response: httpx.Response) -> bool:
    """200: ready; 503 (or a proxy's 502/504): not yet; anything else is an error (a
    wrong base URL's 404, a refused key)."""
    if response.status_code == 200:
        return True
    if response.status_code in (502, 503, 504):
        return False
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    raise error_for(response.status_code, body)
