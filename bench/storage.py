"""`python -m bench storage`: a month of traffic in PostgreSQL, what it costs, and whether the
feedback join still keeps up.

Fills a fresh store (migrated to head: `predictions` partitioned by day) with
`--predictions` predictions spread evenly over `--days` simulated days, written by COPY
(not through HTTP), and a correction for `--corrected` of them. Reports
- bytes per prediction (table, indexes and TOAST over the rows), and per correction;
- the store's size after the month, then after `flywheel db maintain`'s retention at the
  month's end (the default FLYWHEEL_RETENTION_*: predictions older than 8 days dropped a
  day partition at a time);
- the feedback join rate -- corrections a second through `store_and_join` (the worker's
  join of a correction whose prediction is not in its cache: a lookup by id in every
  partition, then the insert) -- measured after the first day is stored and again at the
  end of the month, side by side (target: end >= 0.8x start), both with corrections of
  random predictions of the last `--correction-days`.

Ids are a 64-bit multiplicative hash of the row number (scattered like uuid4s in the
index, but computable again), so the probes need no list of 10 million ids in memory.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import typer

from bench.feedback import throwaway_database
from bench.harness import machine

GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
FEATURE_VARIANTS = 997  # distinct feature vectors in the fill (generation cost, not size)


def pid(i: int) -> str:
    """The id of prediction `i`: 32 hex characters, as `flywheel.events.new_id`'s."""
    h = (i * GOLDEN) & MASK
    return f"{h:016x}{(h ^ GOLDEN) & MASK:016x}"


def _features(n_features: int, rng: random.Random) -> list[str]:
    return [
        json.dumps([round(rng.uniform(-3, 3), 6) for _ in range(n_features)])
        for _ in range(FEATURE_VARIANTS)
    ]


def fill(
    conn: Any,
    lo: int,
    hi: int,
    start: datetime,
    step_s: float,
    features: list[str],
    corrected: float,
    chunk: int,
) -> tuple[int, float]:
    """COPY predictions `lo`..`hi` (and corrections of every 1/`corrected`-th): (corrections
    written, seconds)."""
    every = max(int(round(1 / corrected)), 1) if corrected > 0 else 0
    made = 0
    t = time.perf_counter()
    for a in range(lo, hi, chunk):
        b = min(a + chunk, hi)
        lines, fixes = [], []
        for i in range(a, b):
            at = (start + timedelta(seconds=i * step_s)).isoformat()
            p = 0.5 + (i % 50) / 100
            lines.append(
                f"{pid(i)}\tm\t1\t{features[i % FEATURE_VARIANTS]}\t"
                f'{{"a": {p:.2f}, "b": {1 - p:.2f}}}\ta\t{at}\t0.4\t{at}\n'
            )
            if every and i % every == 0:
                fixes.append(f"c{pid(i)}\t{pid(i)}\tb\tapp\t{at}\tjoined\t{at}\n")
        with conn.cursor() as cur:
            with cur.copy(
                "COPY predictions (id, model_name, model_version, features, probabilities,"
                " label, created_at, latency_ms, stored_at) FROM STDIN"
            ) as copy:
                copy.write("".join(lines))
            if fixes:
                with cur.copy(
                    "COPY corrections (id, prediction_id, label, source, created_at, status,"
                    " joined_at) FROM STDIN"
                ) as copy:
                    copy.write("".join(fixes))
        conn.commit()
        made += len(fixes)
    return made, time.perf_counter() - t


def join_rate(
    url: str,
    newest: int,
    window: int,
    batches: int,
    batch: int,
    rounds: int,
    tag: str,
    rng: random.Random,
) -> dict[str, Any]:
    """Corrections/s through `store_and_join` for random predictions among the `window`
    newest of `newest` stored: the median of `rounds` rounds of `batches` transactions."""
    from flywheel.events import CorrectionEvent
    from flywheel.feedback.join import store_and_join
    from flywheel.store import make_engine, session_factory

    engine = make_engine(url)
    sessions = session_factory(engine)
    rates, joined, asked = [], 0, 0
    try:
        for r in range(rounds):
            events = [
                [
                    CorrectionEvent(
                        id=f"{tag}-{r}-{k}-{j}",
                        prediction_id=pid(rng.randrange(max(newest - window, 0), newest)),
                        label="b",
                        source="app",
                        timestamp=datetime.now(UTC),
                    )
                    for j in range(batch)
                ]
                for k in range(batches)
            ]
            t = time.perf_counter()
            for corrections in events:
                with sessions.begin() as session:
                    stored = store_and_join(session, [], corrections, datetime.now(UTC))
                joined += len(stored.pairs)
                asked += len(corrections)
            rates.append(batches * batch / (time.perf_counter() - t))
    finally:
        engine.dispose()
    return {
        "corrections_per_s": statistics.median(rates),
        "rounds_per_s": rates,
        "joined": joined,
        "corrections": asked,
    }


def main(
    predictions: int = typer.Option(
        10_000_000, "--predictions", min=1000, help="Predictions in the simulated month."
    ),
    days: int = typer.Option(30, min=2, max=400, help="Days the predictions span."),
    corrected: float = typer.Option(
        0.02, min=0, max=1, help="Share of predictions that get a correction."
    ),
    n_features: int = typer.Option(8, "--features", min=1, max=1000, help="Features a row."),
    start_days: float = typer.Option(
        1.0, min=0.01, help="The 'start' join rate is measured once this many days are stored."
    ),
    correction_days: float = typer.Option(
        7.0, min=0.01, help="Corrections refer to random predictions of the last this many days."
    ),
    batch: int = typer.Option(2000, min=1, help="Corrections a join transaction."),
    batches: int = typer.Option(10, min=1, help="Transactions a join round."),
    rounds: int = typer.Option(3, min=1, help="Join rounds per measurement (median)."),
    chunk: int = typer.Option(100_000, min=100, help="Rows a COPY."),
    database_url: str = typer.Option(
        "postgresql://postgres@127.0.0.1:5432/test",
        help="PostgreSQL (admin) URL: a throwaway database is made beside it.",
    ),
    seed: int = typer.Option(7, help="Data seed."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """A month of predictions and corrections by COPY: bytes per prediction, size with and
    without retention, and the join rate at the start and the end of the fill."""
    import psycopg
    from sqlalchemy.engine import make_url

    from flywheel.settings import FeedbackSettings
    from flywheel.store import (
        RetentionPolicy,
        apply_retention,
        make_engine,
        session_factory,
        table_sizes,
        upgrade,
    )

    rng = random.Random(seed)
    features = _features(n_features, rng)
    policy = RetentionPolicy.of(FeedbackSettings())
    # the month starts now (the migration made today's partitions; the maintenance below
    # makes the month's, as the workers would day by day) and runs into the future
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    end = start + timedelta(days=days)
    step_s = days * 86_400.0 / predictions
    per_day = predictions / days
    first = min(int(per_day * start_days), predictions)
    window = lambda n: max(min(int(per_day * correction_days), n), 1)  # noqa: E731
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", file=sys.stderr, flush=True)

    with throwaway_database(database_url) as url:
        upgrade(url)
        engine = make_engine(url)
        try:
            # the partitions the workers' maintenance would have made day by day
            apply_retention(
                session_factory(engine),
                RetentionPolicy(
                    predictions_s=1e9,
                    corrections_s=2e9,
                    examples_s=1e9,
                    error_counts_s=1e9,
                    usage_s=3600.0,
                    partitions_ahead=days + 1,
                ),
                start,
            )
        finally:
            engine.dispose()
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(dsn) as conn:
            made, fill_s = fill(conn, 0, first, start, step_s, features, corrected, chunk)
            conn.execute("ANALYZE predictions")
            conn.commit()
            say(f"stored {first:,} predictions ({start_days:g} days); measuring the join")
            at_start = join_rate(url, first, window(first), batches, batch, rounds, "s", rng)
            say(f"join at the start: {at_start['corrections_per_s']:,.0f} corrections/s")
            more, more_s = fill(conn, first, predictions, start, step_s, features, corrected, chunk)
            made, fill_s = made + more, fill_s + more_s
            say(f"stored {predictions:,} predictions in {fill_s:.0f} s; analyzing")
            conn.execute("ANALYZE predictions")
            conn.execute("ANALYZE corrections")
            conn.commit()
        at_end = join_rate(url, predictions, window(predictions), batches, batch, rounds, "e", rng)
        say(f"join at the end: {at_end['corrections_per_s']:,.0f} corrections/s")
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                full = {s.table: s for s in table_sizes(conn, ["predictions", "corrections"])}
                stored_fixes = conn.exec_driver_sql("SELECT count(*) FROM corrections").scalar_one()
            t = time.perf_counter()
            report = apply_retention(session_factory(engine), policy, end)
            retention_s = time.perf_counter() - t
            with engine.connect() as conn:
                kept = {s.table: s for s in table_sizes(conn, ["predictions", "corrections"])}
                kept_rows = conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar_one()
        finally:
            engine.dispose()
        say(f"retention dropped {len(report.dropped)} partitions in {retention_s:.1f} s")
        at_kept = join_rate(url, predictions, window(predictions), batches, batch, 1, "k", rng)

    def size(s: Any) -> int:
        return int(s.bytes or 0)

    store_full = size(full["predictions"]) + size(full["corrections"])
    store_kept = size(kept["predictions"]) + size(kept["corrections"])
    ratio = at_end["corrections_per_s"] / at_start["corrections_per_s"]
    doc = {
        "benchmark": "storage",
        "machine": machine(),
        "config": {
            "predictions": predictions,
            "days": days,
            "corrected": corrected,
            "features": n_features,
            "start_days": start_days,
            "correction_days": correction_days,
            "batch": batch,
            "batches": batches,
            "rounds": rounds,
        },
        "fill": {
            "predictions": predictions,
            "corrections": made,
            "seconds": fill_s,
            "rows_per_s": (predictions + made) / fill_s,
        },
        "bytes_per_prediction": size(full["predictions"]) / predictions,
        # the fill's corrections and the join measurements' (all joined)
        "bytes_per_correction": size(full["corrections"]) / stored_fixes if stored_fixes else None,
        "month": {
            "store_bytes": store_full,
            "predictions_bytes": size(full["predictions"]),
            "corrections_bytes": size(full["corrections"]),
            "partitions": full["predictions"].partitions,
        },
        "after_retention": {
            "store_bytes": store_kept,
            "predictions_bytes": size(kept["predictions"]),
            "predictions": kept_rows,
            "partitions": kept["predictions"].partitions,
            "dropped_partitions": len(report.dropped),
            "seconds": retention_s,
            "policy_predictions_s": policy.predictions_s,
        },
        "join": {
            "start": at_start,
            "end": at_end,
            "end_vs_start": ratio,
            "target": 0.8,
            "meets_target": ratio >= 0.8,
            "after_retention": at_kept,
        },
        "elapsed_s": time.perf_counter() - started,
    }
    if json_out:
        print(json.dumps(doc))
        return
    print(
        f"{predictions:,} predictions over {days} days, {made:,} corrections, COPY at "
        f"{doc['fill']['rows_per_s']:,.0f} rows/s\n"
        f"bytes per prediction: {doc['bytes_per_prediction']:.0f}\n"
        f"store after the month: {store_full / 2**20:,.0f} MiB; after retention "
        f"({policy.predictions_s / 86400:g} days of predictions): {store_kept / 2**20:,.0f} MiB\n"
        f"join: start {at_start['corrections_per_s']:,.0f}/s, end "
        f"{at_end['corrections_per_s']:,.0f}/s ({ratio:.2f}x; target >= 0.8x), after "
        f"retention {at_kept['corrections_per_s']:,.0f}/s"
    )
