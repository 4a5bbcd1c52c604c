"""Durable requests beside fast records, in one process: is a durable answer held by the
sender's fast linger (50 ms)? Side by side, interleaved rounds: `alone`, 16 closed-loop
clients (100 us of CPU a request) awaiting `log_durable_async`, and `mixed`, the same
while another coroutine queues one fast record (`log_many`) every 5 ms, as fast
predictions or shadow scores do. Real event log, KafkaSink and embedded broker; this
process on CPU 0, the broker on CPU 1 where the machine has two. The ratio mixed / alone
is the figure (docs/benchmarks.md, durability).

    python -m bench._mixed_linger [--rounds 3] [--duration 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flywheel.service.event_log import EventLog

CLIENTS = 16
WORK_US = 100.0  # a request's own CPU, burnt before it logs
FAST_EVERY_S = 0.005
TOPIC = "bench.mixed"


def _burn(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


async def _load(log: EventLog, mixed: bool, duration_s: float) -> tuple[float, float, float]:
    from flywheel.service.spool import Record

    stop = time.monotonic() + duration_s
    lat: list[float] = []

    async def client(k: int) -> None:
        i = 0
        while time.monotonic() < stop:
            t = time.perf_counter()
            _burn(WORK_US)
            await log.log_durable_async([Record(TOPIC, f"{k}-{i}".encode(), b"{}")])
            lat.append(time.perf_counter() - t)
            i += 1

    async def fast() -> None:
        i = 0
        while mixed and time.monotonic() < stop:
            log.log_many([Record(TOPIC, f"f-{i}".encode(), b"{}")])
            i += 1
            await asyncio.sleep(FAST_EVERY_S)

    await asyncio.gather(fast(), *(client(k) for k in range(CLIENTS)))
    lat.sort()
    return len(lat) / duration_s, lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench._mixed_linger", description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        p.error("--rounds must be >= 1 and --duration > 0")

    from flywheel.broker import EmbeddedBroker
    from flywheel.service.event_log import EventLog
    from flywheel.service.kafka_sink import KafkaSink
    from flywheel.service.spool import Record, Spool

    two = {0, 1} <= os.sched_getaffinity(0)
    work = Path(tempfile.mkdtemp(prefix="fw-mixed-"))
    if two:
        os.sched_setaffinity(0, {1})  # the broker inherits CPU 1
    broker = EmbeddedBroker(log_file=work / "broker.log").start(topics=[TOPIC])
    if two:
        os.sched_setaffinity(0, {0})
    rps: dict[str, list[float]] = {"alone": [], "mixed": []}
    try:
        for r in range(args.rounds):
            for mode in ("alone", "mixed"):
                log = EventLog(
                    lambda: KafkaSink(broker.bootstrap, 5.0),
                    Spool(work / f"spool-{mode}-{r}", fsync=True),
                    linger_s=0.05,
                    durable_linger_s=0.002,
                ).start()
                log.log_durable([Record(TOPIC, b"warm", b"{}")]).result(10)  # connected
                per_s, p50, p99 = asyncio.run(_load(log, mode == "mixed", args.duration))
                log.close()
                rps[mode].append(per_s)
                print(
                    f"round {r} {mode}: {per_s:.0f} durable req/s, p50 {p50:.2f} ms, "
                    f"p99 {p99:.2f} ms",
                    flush=True,
                )
    finally:
        broker.stop()
    ratio = statistics.median(rps["mixed"]) / statistics.median(rps["alone"])
    print(f"mixed / alone: {ratio:.2f} (medians of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
