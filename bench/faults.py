"""The fault suite as a benchmark (issue 27): what each fault costs a running deployment.

The scenario of `tests/faults/` (one harness, `bench._cluster`): its own PostgreSQL, the
embedded broker, two `flywheel serve` replicas (app keys on, durable predictions), two
feedback workers, two learners (one standing by), a client sending `--rate` predictions/s
and a correction for each, retrying a failed request on the other replica. The faults in
turn, `--seconds` of steady load before each and after the last: worker SIGKILL,
PostgreSQL SIGKILL + restart, broker SIGSTOP 10 s + SIGCONT, replica SIGKILL, replica
SIGTERM (each killed process restarted, as a supervisor would), learner SIGKILL (the
standby takes over). Per fault: how long the part was out, the seconds from then until
every record acknowledged by then is stored (predictions stored, corrections joined) and
every spool is empty -- the catch-up, target ≤ 15 s -- and the requests that failed (each
retried on the other replica). Totals: records lost and duplicated (target 0 / 0).

Then, unless `--durable-seconds 0`, the throughput cost of durable corrections: `bench
serve --compare corrections` (a 202 once Kafka acknowledged or the spool fsynced, against
once queued) run as its own process in the same run, its ratio reported beside (target
≥ 0.9×).

    python -m bench faults --rate 20 --seconds 5 --json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer

CATCH_UP_TARGET_S = 15.0
DURABLE_TARGET = 0.9


def _durable_ratio(seconds: float, say: Any) -> dict[str, Any]:
    """`bench serve --compare corrections` in a process of its own: its summary."""
    say(f"durable vs queued corrections, {seconds:g} s a mode ...")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "serve",
            "--compare",
            "corrections",
            "--duration",
            str(seconds),
            "--rounds",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench serve --compare corrections failed: {done.stderr[-2000:]}")
    summary = json.loads(done.stdout)["summary"]
    return {
        "command": f"python -m bench serve --compare corrections --duration {seconds:g} --rounds 1",
        "durable_rps": summary["median"]["durable"]["rps"],
        "queued_rps": summary["median"]["fast"]["rps"],
        "throughput_ratio": summary["throughput_ratio"],
        "target": f">= {DURABLE_TARGET}",
        "pass": summary["throughput_ratio"] >= DURABLE_TARGET,
    }


def main(
    rate: float = typer.Option(20.0, min=1.0, max=2000.0, help="Predictions/s, each corrected."),
    seconds: float = typer.Option(
        5.0, min=0.0, max=600.0, help="Steady load before each fault and after the last."
    ),
    faults: str = typer.Option(
        ",".join(
            (
                "worker-kill",
                "postgres-kill",
                "broker-pause",
                "replica-kill",
                "replica-term",
                "learner-kill",
            )
        ),
        help="The faults, in order (comma-separated).",
    ),
    durable_seconds: float = typer.Option(
        5.0, min=0.0, max=120.0, help="Seconds a mode for the durable-corrections ratio; 0: skip."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Per fault: time out, catch-up time and failed requests; records lost/duplicated."""
    from bench._cluster import FAULTS, run_scenario
    from bench._pg_server import find_pg_bin
    from bench.harness import document, machine

    chosen = tuple(f.strip() for f in faults.split(",") if f.strip())
    unknown = [f for f in chosen if f not in FAULTS]
    if unknown:
        raise typer.BadParameter(
            f"{unknown}; expected some of {list(FAULTS)}", param_hint="--faults"
        )
    pg_bin = find_pg_bin()
    if pg_bin is None:
        typer.echo(
            "error: initdb/pg_ctl not found: the scenario starts its own PostgreSQL", err=True
        )
        raise typer.Exit(1)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    info = machine()
    try:
        with tempfile.TemporaryDirectory(prefix="fw-faults-") as work:
            result = run_scenario(
                Path(work), pg_bin, rate=rate, faults=chosen, steady_s=seconds, say=say
            )
        durable = _durable_ratio(durable_seconds, say) if durable_seconds > 0 else None
    except RuntimeError as exc:
        say(f"benchmark failed: {exc}")
        raise typer.Exit(1) from None
    lost = result["predictions_lost"] + result["corrections_lost"]
    # the store keys every record by id, so a duplicate there is an id returned twice or a
    # correction made into two training examples; a record resent on a topic (a spool
    # replay) is reported beside, deduplicated by the store
    duplicated = result["predictions_returned_twice"] + result["examples_duplicated"]
    slowest = max((r["catch_up_s"] for r in result["faults"]), default=0.0)
    doc = document(
        "faults",
        info,
        {
            "config": {"rate": rate, "seconds": seconds, "faults": list(chosen)},
            "result": result,
            "durable_corrections": durable,
            "targets": {
                "lost": {"target": "0", "value": lost, "pass": lost == 0},
                "duplicated": {"target": "0", "value": duplicated, "pass": duplicated == 0},
                "catch_up_s": {
                    "target": f"<= {CATCH_UP_TARGET_S:g} each",
                    "value": slowest,
                    "pass": slowest <= CATCH_UP_TARGET_S,
                },
            },
        },
    )
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"faults at {rate:g} predictions/s (+ a correction each)")
    for column in ("fault", "out s", "catch-up s", "failed requests", "lag after"):
        table.add_column(column)
    for r in result["faults"]:
        table.add_row(
            r["fault"],
            f"{r['down_s']:.1f}",
            f"{r['catch_up_s']:.1f}",
            str(r["failed_requests"]),
            str(r["lag_after"]),
        )
    console = Console()
    console.print(table)
    console.print(
        f"{result['predictions_returned']} predictions, {result['corrections_acknowledged']} "
        f"corrections acknowledged: lost {lost}, duplicated {duplicated}; "
        f"{result['online_versions']} online versions, {result['promoted_online']} promoted"
    )
    if durable is not None:
        console.print(
            f"durable corrections {durable['durable_rps']:.0f}/s vs queued "
            f"{durable['queued_rps']:.0f}/s: {durable['throughput_ratio']:.2f}x"
        )
