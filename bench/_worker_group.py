"""`bench feedback --workers N`: N worker processes in one consumer group, timed together.

A worker is one process with one GIL; the way to give a group more CPU is more members
(N `flywheel feedback` commands, or replicas). This arm starts N of them, each the real
`build_worker(settings)` wiring in a process of its own (as the CLI runs it), released
together once all are built, and times the group: from the first partition assignment
to the batch that completes the N-th join anywhere in the group. Steps are not timed
(N processes' steps do not add up to one run); CPU is summed over the members.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flywheel.settings import Settings

STARTUP_TIMEOUT_S = 300.0  # building a worker: imports, the reference, the model
COUNTS = (
    "joined",
    "predictions",
    "corrections",
    "pending",
    "examples",
    "dead_letters",
    "retries",
    "batches",
    "records",
)


def _member(
    settings_json: str,
    n: int,
    index: int,
    barrier: Any,
    joined: Any,
    lock: Any,
    group_done: Any,
    results: Any,
) -> None:
    """One member: build, wait for the others, run until the group has joined `n`."""
    from flywheel.feedback import WorkerObserver, build_worker, tune_worker_process
    from flywheel.settings import Settings

    marks: dict[str, float] = {}
    partitions: list[Any] = []

    class Assignments(WorkerObserver):
        def on_assigned(self, parts: Any) -> None:
            if parts:
                partitions[:] = sorted(parts)
                marks.setdefault("assigned", time.perf_counter())  # CLOCK_MONOTONIC: comparable
                marks.setdefault("cpu_assigned", time.process_time())  # across processes

    settings = Settings.model_validate_json(settings_json)
    worker = build_worker(settings, client_id=f"bench-feedback-{index}", observer=Assignments())
    tune_worker_process()
    stop = threading.Event()

    seen = 0

    def on_batch(stats: Any) -> None:
        nonlocal seen
        with lock:
            joined.value += stats.joined - seen
            total = joined.value
        seen = stats.joined
        if total >= n:
            marks.setdefault("done", time.perf_counter())
            group_done.set()

    def stop_with_the_group() -> None:
        group_done.wait()
        marks.setdefault("cpu_done", time.process_time())
        stop.set()

    threading.Thread(target=stop_with_the_group, daemon=True).start()
    barrier.wait(STARTUP_TIMEOUT_S)
    marks["cpu_released"] = time.process_time()  # for a member the group never needed
    try:
        stats = worker.run(stop, on_batch=on_batch)
    finally:
        worker.engine.dispose()  # before the database is dropped
    results.put(
        {
            "index": index,
            "marks": marks,
            "partitions": partitions,
            **{k: getattr(stats, k) for k in COUNTS},
        }
    )


def run_worker_group(
    settings: Settings,
    n: int,
    workers: int,
    say: Callable[[str], None],
    snapshot: Callable[[], Any],
    timeout_s: float,
) -> dict[str, Any]:
    """`workers` member processes on `settings` until they have joined `n` corrections:
    elapsed, the members' CPU and counts, and `snapshot()` taken as the members are
    released and as the group is done ("snapshots"). Raises RuntimeError if a member
    fails or the group does not finish in `timeout_s`."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, as the CLI would be
    joined, lock, group_done = ctx.Value("q", 0), ctx.Lock(), ctx.Event()
    barrier, results = ctx.Barrier(workers + 1), ctx.Queue()
    members = [
        ctx.Process(
            target=_member,
            name=f"bench-feedback-{i}",
            daemon=True,
            args=(settings.model_dump_json(), n, i, barrier, joined, lock, group_done, results),
        )
        for i in range(workers)
    ]
    for p in members:
        p.start()
    try:
        barrier.wait(STARTUP_TIMEOUT_S)
        before = snapshot()
        deadline = time.monotonic() + timeout_s
        while not group_done.wait(0.2):
            if any(p.exitcode is not None for p in members):
                raise RuntimeError("a worker process of the group ended before the run did")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the group joined {joined.value} of {n} corrections in {timeout_s:.0f}s"
                )
        after = snapshot()
        out = []
        for _ in members:
            try:
                out.append(results.get(timeout=60))
            except queue.Empty:
                raise RuntimeError("a worker process of the group did not stop") from None
    except threading.BrokenBarrierError:
        raise RuntimeError("the group's worker processes did not all start") from None
    finally:
        for p in members:
            p.join(10)
            if p.is_alive():
                p.kill()
    marks = [r["marks"] for r in out]
    if not any("done" in m for m in marks):
        raise RuntimeError("no member of the group saw the last join")
    # a member that joins the group late may find the work done before it gets partitions
    first = min(m["assigned"] for m in marks if "assigned" in m)
    elapsed = min(m["done"] for m in marks if "done" in m) - first
    cpu_of = [m["cpu_done"] - m.get("cpu_assigned", m["cpu_released"]) for m in marks]
    counts = {k: sum(r[k] for r in out) for k in COUNTS}
    say(f"worker group: {counts['joined']} joined in {elapsed:.2f}s by {workers} processes")
    return {
        "elapsed_s": elapsed,
        "process_cpu_s": sum(cpu_of),
        "snapshots": (before, after),
        **counts,
        "time_split_s": None,
        "members": [
            {
                "partitions": [list(p) for p in r["partitions"]],
                "assigned_after_s": r["marks"]["assigned"] - first
                if "assigned" in r["marks"]
                else None,
                "joined": r["joined"],
                "process_cpu_s": cpu,
            }
            for r, cpu in sorted(zip(out, cpu_of, strict=True), key=lambda x: x[0]["index"])
        ],
    }
