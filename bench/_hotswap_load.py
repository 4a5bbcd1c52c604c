"""Closed-loop load for `bench hotswap`, in its own process, keeping every response.

`bench.loadgen` reduces a run to one window's figures and discards bodies; a swap benchmark
needs more: when each response completed (to split the run into steady and swap windows
afterwards), its latency, and the model version it names (to check every one was a
registered version). The requests are `bench.loadgen`'s pre-encoded keep-alive ones;
completion times are `time.monotonic()`, the same clock as the driver's on Linux.

    python -m bench._hotswap_load --port 8000 --duration 30 --concurrency 16 --out load.json

prints `started <monotonic time>` once the connections start, then writes the JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import HOST, random_bodies, read_response, request_bytes

VERSION_KEY = b'"version":"'


@dataclass
class Trace:
    """Per 200 response: completion time, latency (s), index into `versions`."""

    t: list[float] = field(default_factory=list)
    lat: list[float] = field(default_factory=list)
    v: list[int] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)  # connection, timeout, parse
    non_200: list[tuple[float, int]] = field(default_factory=list)
    _index: dict[bytes, int] = field(default_factory=dict)

    def version_index(self, raw: bytes) -> int:
        i = self._index.get(raw)
        if i is None:
            i = self._index[raw] = len(self.versions)
            self.versions.append(raw.decode(errors="replace"))
        return i


def model_version(body: bytes) -> bytes:
    """The `model.version` of a predict response, without a full JSON parse per request."""
    start = body.find(VERSION_KEY)
    if start < 0:
        raise ValueError(f"no model version in response {body[:120]!r}")
    start += len(VERSION_KEY)
    end = body.find(b'"', start)
    if end < 0:
        raise ValueError(f"unterminated model version in response {body[:120]!r}")
    return body[start:end]


async def _connection(
    port: int, requests: list[bytes], start: int, stop_at: float, trace: Trace, timeout_s: float
) -> None:
    i = start
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while time.monotonic() < stop_at:
            if writer is None:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(HOST, port), timeout_s
                    )
                except (OSError, TimeoutError) as exc:
                    trace.errors.append((time.monotonic(), f"connect: {exc!r}"))
                    await asyncio.sleep(0.05)
                    continue
            assert reader is not None
            req = requests[i % len(requests)]
            i += 1
            t0 = time.monotonic()
            try:
                writer.write(req)
                status, body, close = await asyncio.wait_for(read_response(reader), timeout_s)
                version = model_version(body) if status == 200 else b""
            except (
                OSError,
                TimeoutError,
                ValueError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
            ) as exc:
                trace.errors.append((time.monotonic(), f"request: {exc!r}"))
                writer.close()
                reader = writer = None
                continue
            t1 = time.monotonic()
            if status == 200:
                trace.t.append(t1)
                trace.lat.append(t1 - t0)
                trace.v.append(trace.version_index(version))
            else:
                trace.non_200.append((t1, status))
            if close:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


async def run(
    port: int, duration_s: float, concurrency: int, bodies: list[bytes], timeout_s: float = 10.0
) -> Trace:
    requests = request_bytes(port, bodies)
    trace = Trace()
    start = time.monotonic()
    print(f"started {start:.6f}", flush=True)
    stop_at = start + duration_s
    tasks = [
        asyncio.create_task(
            _connection(port, requests, k * len(requests) // concurrency, stop_at, trace, timeout_s)
        )
        for k in range(concurrency)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), duration_s + timeout_s + 5)
    finally:
        for t in tasks:
            t.cancel()
    return trace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench._hotswap_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    p.add_argument("--bodies", type=Path, help="one JSON request body per line")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not (0 < args.duration <= 3600 and 1 <= args.concurrency <= 1024):
        p.error("duration must be in (0, 3600], concurrency in [1, 1024]")
    bodies = (
        [line for line in args.bodies.read_bytes().splitlines() if line.strip()]
        if args.bodies
        else random_bodies(256)
    )
    coro = run(args.port, args.duration, args.concurrency, bodies, args.timeout)
    try:
        import uvloop
    except ImportError:
        trace = asyncio.run(coro)
    else:
        trace = uvloop.run(coro)
    args.out.write_text(
        json.dumps(
            {
                "t": [round(x, 6) for x in trace.t],
                "lat": [round(x, 7) for x in trace.lat],
                "v": trace.v,
                "versions": trace.versions,
                "errors": trace.errors,
                "non_200": trace.non_200,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
