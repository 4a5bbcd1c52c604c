"""What the client raises: one base class, and a subclass per thing a caller does about it.

- `BadRequest`: the server refused the input (a 4xx other than 401, 403 and 429); sending
  it again cannot help, so it is never retried. `InvalidInput` is the same refusal made
  before anything was sent (a NaN in a vector, a correction without a label).
- `AuthError`: 401 or 403; the key is missing, wrong or not allowed to do this.
- `Unavailable`: the service could not answer: connection errors, 429 and 502/503/504
  after every retry, or any other 5xx.

Each carries the HTTP `status` (None when no response came back), the server's `detail`
message and its per-field `errors` (`{"loc", "msg", "type"}` objects, as the service's
`ErrorBody` sends them).
"""

from __future__ import annotations

from typing import Any


class FlywheelError(Exception):
    """Base of every error the client raises.

    >>> e = BadRequest("instances[0] has 2 features; model m v7 expects 3", status=422)
    >>> isinstance(e, FlywheelError), e.status, e.detail
    (True, 422, 'instances[0] has 2 features; model m v7 expects 3')
    >>> print(e)
    HTTP 422: instances[0] has 2 features; model m v7 expects 3
    """

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        errors: list[dict[str, Any]] | None = None,
        accepted: int = 0,
    ) -> None:
        super().__init__(f"HTTP {status}: {detail}" if status is not None else detail)
        self.detail = detail
        self.status = status
        self.errors: list[dict[str, Any]] = list(errors or [])
        # corrections sent in several requests: how many earlier requests' corrections the
        # server had accepted before this one failed (they stay accepted; see docs/client.md)
        self.accepted = accepted


class BadRequest(FlywheelError):
    """The server refused the input (4xx); fix it before sending it again."""


class InvalidInput(BadRequest, ValueError):
    """Input the client refuses before sending it; `status` is None.

    >>> raise InvalidInput("instances[1][0]: nan is not a finite number")
    Traceback (most recent call last):
    ...
    flywheel.client.errors.InvalidInput: instances[1][0]: nan is not a finite number
    """


class AuthError(FlywheelError):
    """401 or 403: the API key is missing, wrong, or not allowed to do this."""


class Unavailable(FlywheelError):
    """The service did not answer usefully: retries exhausted or a server error (5xx)."""


def error_for(status: int, body: Any) -> FlywheelError:
    """The exception for an error response with JSON (or other) `body`.

    >>> error_for(401, {"detail": "missing key"})
    AuthError('HTTP 401: missing key')
    >>> e = error_for(422, {"detail": "x: field required", "errors": [{"loc": ["x"]}]})
    >>> type(e).__name__, e.errors
    ('BadRequest', [{'loc': ['x']}])
    >>> error_for(500, "Internal Server Error")
    Unavailable('HTTP 500: Internal Server Error')
    """
    detail, errors = _detail(body)
    cls: type[FlywheelError]
    if status in (401, 403):
        cls = AuthError
    elif 400 <= status < 500 and status != 429:
        cls = BadRequest
    else:
        cls = Unavailable
    return cls(detail, status=status, errors=errors)


def _detail(body: Any) -> tuple[str, list[dict[str, Any]]]:
    if isinstance(body, dict):
        detail = body.get("detail")
        errors = body.get("errors")
        if not isinstance(detail, str):  # FastAPI's own shape: a list of error objects
            if isinstance(detail, list) and errors is None:
                errors = detail
            detail = str(detail) if detail is not None else str(body)
        good = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
        return detail, good
    text = str(body).strip()
    return (text[:500] or "(no body)"), []
