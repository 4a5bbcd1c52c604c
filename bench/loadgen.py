"""A closed-loop HTTP/1.1 load generator for POST /v1/predict (or `--path`, e.g.
/v1/corrections), run as its own process.

It runs in a separate process so that the client's CPU use never shares a GIL or an
event loop with the server under test. Raw keep-alive connections with pre-encoded
request bytes keep the client's cost per request far below the server's, so the
figures measure the server. Everything is bounded: loopback only, a fixed duration,
a per-request timeout and a hard deadline for the whole run.

    python -m bench.loadgen --port 8000 --duration 10 --warmup 2 --concurrency 16

prints one JSON object (see `Result`) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
PATH = "/v1/predict"
N_FEATURES = 8


@dataclass
class Result:
    """What one run measured; latency figures cover the measured window only."""

    count: int = 0  # 2xx responses completed inside the measured window
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0
    errors: int = 0  # connection errors, timeouts, unparsable responses (whole run)
    non_200: int = 0  # responses with a status outside 2xx (whole run)
    ok_total: int = 0  # every 2xx response, warm-up and drain included: each logged an event
    sent_total: int = 0
    duration_s: float = 0.0
    warmup_s: float = 0.0
    concurrency: int = 0
    loop: str = "asyncio"
    first_error: str | None = None


@dataclass
class _State:
    measure_from: float
    stop_at: float
    latencies: list[float] = field(default_factory=list)
    result: Result = field(default_factory=Result)


def request_bytes(
    port: int, bodies: list[bytes], path: str = PATH, api_key: str | None = None
) -> list[bytes]:
    """Whole requests, encoded once: the client must not spend time building them."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        "Content-Type: application/json\r\nAccept: application/json\r\n"
    )
    if api_key:
        head += f"Authorization: Bearer {api_key}\r\n"
    return [(head + f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]


def random_bodies(n: int, seed: int = 7) -> list[bytes]:
    """Fallback bodies: one instance of 8 floats each, as a JSON client would send them."""
    rng = random.Random(seed)
    return [
        json.dumps(
            {"instances": [[rng.gauss(0.5, 0.3) for _ in range(N_FEATURES)]]}, separators=(",", ":")
        ).encode()
        for _ in range(n)
    ]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was actually observed."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status code, body and whether the server will close the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    status, length, close = int(parts[1]), None, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
        elif name == b"transfer-encoding":
            raise ValueError("chunked responses are not expected from this endpoint")
    if length is None:
        raise ValueError("response without Content-Length")
    return status, await reader.readexactly(length), close


async def _connection(
    port: int, requests: list[bytes], start: int, state: _State, timeout_s: float
) -> None:
    """One keep-alive connection sending the next request as soon as a response is read."""
    res, i = state.result, start
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while time.perf_counter() < state.stop_at:
            if writer is None:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(HOST, port), timeout_s
                    )
                except (OSError, TimeoutError) as exc:
                    res.errors += 1
                    res.first_error = res.first_error or f"connect: {exc!r}"
                    await asyncio.sleep(0.05)
                    continue
            assert reader is not None
            req = requests[i % len(requests)]
            i += 1
            t0 = time.perf_counter()
            res.sent_total += 1
            try:
                writer.write(req)
                status, _, close = await asyncio.wait_for(read_response(reader), timeout_s)
            except (
                OSError,
                TimeoutError,
                ValueError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
            ) as exc:
                res.errors += 1
                res.first_error = res.first_error or f"request: {exc!r}"
                writer.close()
                reader = writer = None
                continue
            t1 = time.perf_counter()
            if 200 <= status < 300:
                res.ok_total += 1
                if state.measure_from <= t1 <= state.stop_at:
                    state.latencies.append(t1 - t0)
            else:
                res.non_200 += 1
            if close:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


async def run(
    port: int,
    duration_s: float,
    warmup_s: float,
    concurrency: int,
    bodies: list[bytes],
    timeout_s: float = 10.0,
    path: str = PATH,
    api_key: str | None = None,
) -> Result:
    """Warm up, then measure for `duration_s`; in-flight requests finish after the window."""
    requests = request_bytes(port, bodies, path, api_key)
    now = time.perf_counter()
    state = _State(measure_from=now + warmup_s, stop_at=now + warmup_s + duration_s)
    tasks = [
        asyncio.create_task(
            _connection(port, requests, k * len(requests) // concurrency, state, timeout_s)
        )
        for k in range(concurrency)
    ]
    try:  # hard bound: the window, then one request timeout for the stragglers, plus slack
        await asyncio.wait_for(asyncio.gather(*tasks), warmup_s + duration_s + timeout_s + 5)
    finally:
        for t in tasks:
            t.cancel()
    lat = sorted(state.latencies)
    res = state.result
    res.count, res.duration_s, res.warmup_s = len(lat), duration_s, warmup_s
    res.concurrency = concurrency
    res.rps = len(lat) / duration_s
    if lat:
        res.p50_ms = percentile(lat, 50) * 1000
        res.p99_ms = percentile(lat, 99) * 1000
        res.mean_ms = sum(lat) / len(lat) * 1000
        res.max_ms = lat[-1] * 1000
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    p.add_argument("--bodies", type=Path, help="one JSON request body per line")
    p.add_argument("--path", default=PATH, help=f"the POST endpoint (default {PATH})")
    p.add_argument("--api-key", help="send `Authorization: Bearer KEY` with every request")
    args = p.parse_args(argv)
    if not (
        0 < args.duration <= 3600 and 0 <= args.warmup <= 600 and 1 <= args.concurrency <= 1024
    ):
        p.error("duration must be in (0, 3600], warmup in [0, 600], concurrency in [1, 1024]")
    if args.bodies:
        bodies = [line for line in args.bodies.read_bytes().splitlines() if line.strip()]
    else:
        bodies = random_bodies(256)
    if not args.path.startswith("/"):
        p.error("--path must start with /")
    coro = run(
        args.port,
        args.duration,
        args.warmup,
        args.concurrency,
        bodies,
        args.timeout,
        args.path,
        args.api_key,
    )
    try:  # the loop uvicorn picks too; a cheaper client leaves more CPU to the server
        import uvloop
    except ImportError:
        res, loop_name = asyncio.run(coro), "asyncio"
    else:
        res, loop_name = uvloop.run(coro), "uvloop"
    res.loop = loop_name
    json.dump(asdict(res), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
