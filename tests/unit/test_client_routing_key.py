"""The client's `routing_key` goes out as `X-Flywheel-Routing-Key` on every request (the
service routes a canary by it), from the blocking and the async client; a key that could
not be a header value is refused when the client is made."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from flywheel.client import AsyncClient, Client


def service(seen: list[str | None]):
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("x-flywheel-routing-key"))
        n = len(json.loads(request.content)["instances"])
        return httpx.Response(
            200,
            json={
                "model": {"name": "m", "version": "2"},
                "predictions": [
                    {"id": f"p{i}", "label": "a", "probabilities": {"a": 0.9, "b": 0.1}}
                    for i in range(n)
                ],
            },
        )

    return answer


def test_every_request_carries_the_routing_key():
    seen: list[str | None] = []
    transport = httpx.MockTransport(service(seen))
    with Client("http://fw.test", routing_key="tenant-7", transport=transport, batch_size=2) as c:
        assert len(c.predict([[1.0], [2.0], [3.0]]).labels) == 3  # two requests
    with Client("http://fw.test", transport=transport) as c:
        c.predict([[1.0]])
    assert seen == ["tenant-7", "tenant-7", None]


def test_the_async_client_sends_it_too():
    seen: list[str | None] = []

    async def main() -> None:
        transport = httpx.MockTransport(service(seen))
        async with AsyncClient("http://fw.test", routing_key="u 1", transport=transport) as c:
            await c.predict([[1.0]])

    asyncio.run(main())
    assert seen == ["u 1"]


@pytest.mark.parametrize("bad", ["", " padded", "line\nbreak", "x" * 257, 7])
def test_a_key_that_cannot_be_a_header_is_refused(bad):
    with pytest.raises(ValueError, match="routing_key must be 1-256 printable"):
        Client("http://fw.test", routing_key=bad)  # type: ignore[arg-type]
