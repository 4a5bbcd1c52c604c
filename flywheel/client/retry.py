"""When to send a request again, and how long to wait first.

Retried: connection errors and timeouts, 429 (too many requests) and 502/503/504 (a proxy
or the service itself cannot answer now: no model loaded yet, a restart behind a load
balancer). Never retried: any other 4xx (the same input would be refused again) and other
5xx (an internal error is not expected to go away by itself).

The wait before retry n (0-based) is `backoff * 2**n`, scaled by a random factor in
[0.5, 1] so that many clients refused at the same moment do not come back at the same
moment ("equal jitter"), at least what a `Retry-After` header asks, and at most
`max_backoff`. With the defaults (3 retries, 0.2 s) a call gives up after 0.7-1.4 s of
waiting, which covers a service restart behind a proxy but not a long outage: an app that
must not lose a correction keeps it in its own outbox and sends it again later (a resend
is safe; see docs/client.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import httpx

RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How many times to retry and the wait before each retry.

    >>> policy = RetryPolicy(retries=3, backoff=0.2, rng=random.Random(7))
    >>> waits = [policy.delay(n) for n in range(3)]
    >>> all(0.5 * 0.2 * 2**n <= w <= 0.2 * 2**n for n, w in enumerate(waits))
    True
    >>> policy.delay(0, retry_after=2.0)  # the server asked for 2 s
    2.0
    >>> RetryPolicy(retries=-1)
    Traceback (most recent call last):
    ...
    ValueError: retries must be 0 or more; got -1
    """

    retries: int = 3
    backoff: float = 0.2
    max_backoff: float = 10.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be 0 or more; got {self.retries!r}")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{name} must be a number of seconds, 0 or more; got {value!r}")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0 is the first retry)."""
        wait = self.backoff * 2**attempt * (0.5 + 0.5 * self.rng.random())
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.max_backoff)


def retry_after(response: httpx.Response) -> float | None:
    """The `Retry-After` header in seconds, if it is a number (an HTTP date is ignored)."""
    value = response.headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None
