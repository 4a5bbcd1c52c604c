"""The least a durable store of the benchmark's records can cost on this machine.

`bench feedback` compares the worker with a bare kafka-python read. That read stores
nothing, so the ratio mixes two gaps: what any consumer that writes each record to
PostgreSQL and commits its offsets afterwards must pay, and what the worker's own work
(validation, the join, the analysis, counterexamples, four tables) adds. This arm
measures the first: the worker's Kafka client (confluent-kafka, the same group settings),
each poll's records copied as raw bytes into one table keyed like the store (topic, id),
the transaction committed, then the offsets, synchronously. No parsing, no validation,
no join: nothing the issue asks of a worker beyond "stored, then committed".
"""

from __future__ import annotations

import time
from typing import Any

FLOOR_TABLE = "bench_store_floor"
POLL_TIMEOUT_S = 0.5


def store_floor(
    bootstrap: str,
    topics: list[str],
    expected: int,
    max_records: int,
    database_url: str,
    group: str,
    timeout_s: float,
    backend_cpu: Any | None = None,
) -> dict[str, Any]:
    """Seconds (and CPU seconds) to consume `expected` records of `topics` from the
    beginning and store each one, committing offsets after every stored poll."""
    import psycopg
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    from sqlalchemy.engine import make_url

    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    topic_ids = {t: i for i, t in enumerate(topics)}
    with psycopg.connect(dsn) as conn:
        conn.execute(
            f"CREATE TABLE {FLOOR_TABLE} (topic smallint, key text, value bytea, "
            "PRIMARY KEY (topic, key))"
        )
        conn.commit()
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            parts = [
                TopicPartition(t, p, OFFSET_BEGINNING)
                for t in topics
                for p in sorted(consumer.list_topics(t, timeout=10).topics[t].partitions)
            ]
            consumer.assign(parts)
            cpu_before = backend_cpu.snapshot() if backend_cpu else {}
            seen, deadline = 0, time.monotonic() + timeout_s
            start, start_cpu = time.perf_counter(), time.process_time()
            while seen < expected:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"store floor stored {seen} of {expected} records")
                messages = [
                    m for m in consumer.consume(max_records, POLL_TIMEOUT_S) if m.error() is None
                ]
                if not messages:
                    continue
                with (
                    conn.cursor() as cur,
                    cur.copy(f"COPY {FLOOR_TABLE} (topic, key, value) FROM STDIN") as copy,
                ):
                    for m in messages:
                        copy.write_row((topic_ids[m.topic()], m.key().decode(), m.value()))
                conn.commit()
                consumer.commit(asynchronous=False)
                seen += len(messages)
            elapsed = time.perf_counter() - start
            process_cpu = time.process_time() - start_cpu
            cpu_after = backend_cpu.snapshot() if backend_cpu else {}
        finally:
            consumer.close()
        stored = conn.execute(f"SELECT count(*) FROM {FLOOR_TABLE}").fetchone()
    return {
        "records": seen,
        "stored": stored[0] if stored else 0,
        "elapsed_s": elapsed,
        "process_cpu_s": process_cpu,
        "postgresql_cpu_s": backend_cpu.spent(cpu_before, cpu_after) if backend_cpu else None,
    }
