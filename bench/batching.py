"""`python -m bench batching`: POST /v1/predict with and without dynamic batching.

The same app (`create_app`, one uvicorn worker, `bench._server`) serves the same saved
weights twice: `off` = FLYWHEEL_DYNAMIC_BATCHING=false (one forward pass per request, as
before batching existed), `on` = true with FLYWHEEL_BATCH_MAX_SIZE / _MAX_WAIT_MS (the
defaults unless given). Each server process answers the load generator
(`bench/loadgen.py`, a separate process, closed loop, keep-alive) at 1, 16 and 64
concurrent clients in turn; rounds run off, on, off, on, ... with a fresh process each,
so slow drift on a shared machine hits both modes alike. Two models by default:

* `demo`: the seed MLP the service trains (8 -> 64 -> 64 -> 3), as `bench serve` uses;
* `wide`: an MLP whose forward pass costs more than the HTTP handling around it
  (8 -> 2048 -> 2048 -> 3, untrained weights: throughput does not depend on them).

Prediction records are built but discarded in the request path (`bench serve` measures
what Kafka logging adds). Targets: at 64 clients >= 2x the requests/s of `off`; at one
client a p50 no worse than `off` (within 5 %, the noise of a shared machine).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import typer

from bench.harness import document, load_range

REPO = Path(__file__).resolve().parent.parent
MODELS = {"demo": None, "wide": [2048, 2048]}  # None: the trained seed model
CONCURRENCY = (1, 16, 64)
THROUGHPUT_TARGET = 2.0  # rps_on / rps_off at the highest concurrency
P50_TOLERANCE = 1.05  # p50_on / p50_off at one client


def save_models(work: Path, names: list[str], wide: list[int]) -> dict[str, dict[str, Any]]:
    from bench.serve import train_and_save
    from flywheel.artifacts import save_model
    from flywheel.learner import default_spec
    from flywheel.modelspec import ModelSpec, build_model

    out: dict[str, dict[str, Any]] = {}
    for name in names:
        folder = work / name
        if name == "demo":
            acc = train_and_save(folder)  # writes folder/model
            spec = default_spec()
            out[name] = {
                "dir": folder / "model",
                "hidden": spec.hidden,
                "holdout_accuracy": acc["holdout_accuracy"],
            }
        else:
            base = default_spec()
            spec = ModelSpec(input_dim=base.input_dim, hidden=wide, labels=base.labels)
            save_model(folder / "model", spec, build_model(spec))
            out[name] = {"dir": folder / "model", "hidden": wide, "holdout_accuracy": None}
    return out


def start(
    model_dir: Path,
    port: int,
    home: Path,
    log_path: Path,
    env_extra: dict[str, str],
    cpus: set[int] | None,
) -> subprocess.Popen[bytes]:
    from bench.serve import _child_env

    env = {**_child_env(), **env_extra}
    cmd = [
        sys.executable,
        "-m",
        "bench._server",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--logging",
        "off",
        "--home",
        str(home),
    ]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )


def batch_counters(port: int) -> dict[str, float]:
    from bench.serve import _get

    _, body = _get(port, "/metrics", 5.0)
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in ("flywheel_batches_total", "flywheel_batched_requests_total"):
            out[name.removeprefix("flywheel_").removesuffix("_total")] = float(value)
    return out


def one_server(
    model: str,
    mode: str,
    rnd: int,
    *,
    info: dict[str, Any],
    work: Path,
    bodies: Path,
    duration: float,
    warmup: float,
    levels: list[int],
    env_on: dict[str, str],
    cpus: set[int] | None,
    say,
) -> list[dict[str, Any]]:
    from bench.serve import run_loadgen, stop_server, wait_ready
    from flywheel.broker import free_port

    port = free_port("127.0.0.1")
    log_path = work / f"server-{model}-{mode}-{rnd}.log"
    env = env_on if mode == "on" else {"FLYWHEEL_DYNAMIC_BATCHING": "false"}
    proc = start(info["dir"], port, work / f"home-{model}-{mode}-{rnd}", log_path, env, cpus)
    runs = []
    try:
        ready = wait_ready(proc, port, log_path)
        for c in levels:
            before = batch_counters(port)
            load = run_loadgen(port, duration, warmup, c, bodies)
            after = batch_counters(port)
            batches = after.get("batches", 0) - before.get("batches", 0)
            reqs = after.get("batched_requests", 0) - before.get("batched_requests", 0)
            run = {
                "model": model,
                "mode": mode,
                "round": rnd,
                "concurrency": c,
                "load": load,
                "mean_batch": reqs / batches if batches else None,
            }
            runs.append(run)
            say(
                f"{model} {mode:>3} round {rnd} c={c:<3} {load['rps']:7.0f} req/s  "
                f"p50 {load['p50_ms']:6.2f} ms  p99 {load['p99_ms']:6.2f} ms  errors "
                f"{load['errors']}  non-200 {load['non_200']}"
                + (f"  mean batch {run['mean_batch']:.1f}" if run["mean_batch"] else "")
                + (f"  (ready in {ready:.1f}s)" if c == levels[0] else "")
            )
    finally:
        stop_server(proc)
    return runs


def summarize(runs: list[dict[str, Any]], models: list[str], levels: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        table: dict[str, dict[str, Any]] = {}
        for mode in ("off", "on"):
            for c in levels:
                rs = [
                    r for r in runs if (r["model"], r["mode"], r["concurrency"]) == (model, mode, c)
                ]
                batches = [r["mean_batch"] for r in rs if r["mean_batch"]]
                table[f"{mode}@{c}"] = {
                    "rps": statistics.median(r["load"]["rps"] for r in rs),
                    "p50_ms": statistics.median(r["load"]["p50_ms"] for r in rs),
                    "p99_ms": statistics.median(r["load"]["p99_ms"] for r in rs),
                    "errors": sum(r["load"]["errors"] + r["load"]["non_200"] for r in rs),
                    "mean_batch": statistics.median(batches) if batches else None,
                }
        hi, lo = max(levels), min(levels)
        tput = table[f"on@{hi}"]["rps"] / table[f"off@{hi}"]["rps"]
        p50 = table[f"on@{lo}"]["p50_ms"] / table[f"off@{lo}"]["p50_ms"]
        out[model] = {
            "median": table,
            "throughput_ratio": {
                str(c): table[f"on@{c}"]["rps"] / table[f"off@{c}"]["rps"] for c in levels
            },
            "p50_ratio": {
                str(c): table[f"on@{c}"]["p50_ms"] / table[f"off@{c}"]["p50_ms"] for c in levels
            },
            "targets": {
                f"throughput_ratio@{hi}": {
                    "target": f">= {THROUGHPUT_TARGET}",
                    "value": tput,
                    "pass": tput >= THROUGHPUT_TARGET,
                },
                f"p50_ratio@{lo}": {
                    "target": f"<= {P50_TOLERANCE} (no worse, 5 % noise)",
                    "value": p50,
                    "pass": p50 <= P50_TOLERANCE,
                },
            },
        }
    return out


def render(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.width = max(console.width, 120)
    cfg, m = doc["config"], doc["machine"]
    for model, s in doc["summary"].items():
        info = cfg["models"][model]
        table = Table(
            title=f"POST /v1/predict, {model} model (MLP 8-"
            f"{'-'.join(map(str, info['hidden']))}-3), dynamic batching off vs "
            f"on, medians of {cfg['rounds']} round(s) x {cfg['duration_s']:g} s"
        )
        for col in (
            "clients",
            "off req/s",
            "on req/s",
            "ratio",
            "off p50 ms",
            "on p50 ms",
            "off p99 ms",
            "on p99 ms",
            "mean batch (on)",
            "errors",
        ):
            table.add_column(col, justify="right")
        for c in cfg["concurrency"]:
            off, on = s["median"][f"off@{c}"], s["median"][f"on@{c}"]
            table.add_row(
                str(c),
                f"{off['rps']:.0f}",
                f"{on['rps']:.0f}",
                f"{s['throughput_ratio'][str(c)]:.2f}x",
                f"{off['p50_ms']:.2f}",
                f"{on['p50_ms']:.2f}",
                f"{off['p99_ms']:.2f}",
                f"{on['p99_ms']:.2f}",
                f"{on['mean_batch']:.1f}" if on["mean_batch"] else "-",
                str(off["errors"] + on["errors"]),
            )
        console.print(table)
        for name, t in s["targets"].items():
            verdict = "[green]PASS[/]" if t["pass"] else "[red]MISS[/]"
            console.print(f"  {name:<22} {t['value']:.3f}  (target {t['target']})  {verdict}")
    console.print(
        f"[dim]on = {cfg['on']}; off = FLYWHEEL_DYNAMIC_BATCHING=false; {cfg['pinning']}.[/]"
    )
    console.print(
        f"[dim]{m['cpu_count']} CPUs ({m['cpu_model']}), Python {m['python']}, "
        f"torch {m['torch']}, {m['uvicorn_loop']}/{m['uvicorn_http']}, load average "
        f"{load_range(m)}, {doc['date']}[/]"
    )


def _sigterm_to_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(
    duration: float = typer.Option(5.0, min=1.0, max=600.0, help="Measured seconds per level."),
    warmup: float = typer.Option(1.0, min=0.0, max=60.0, help="Unmeasured seconds first."),
    rounds: int = typer.Option(
        2, min=1, max=20, help="Servers per model and mode, interleaved off/on."
    ),
    models: str = typer.Option(",".join(MODELS), help="Comma-separated: demo, wide."),
    wide: str = typer.Option("2048,2048", help="Hidden widths of the wide model."),
    concurrency: str = typer.Option(
        ",".join(map(str, CONCURRENCY)), help="Client counts, run in this order per server."
    ),
    max_size: int | None = typer.Option(
        None, help="FLYWHEEL_BATCH_MAX_SIZE for `on` (default: the setting's default)."
    ),
    max_wait_ms: float | None = typer.Option(
        None, help="FLYWHEEL_BATCH_MAX_WAIT_MS for `on` (default: the setting's default)."
    ),
    pin: bool = typer.Option(True, help="Server on its own core; load generator on the rest."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Requests/s and p50/p99 of POST /v1/predict at 1, 16, 64 clients, batching off vs on."""
    from rich.console import Console

    from bench._streams import parse_ints
    from bench.serve import machine_info, split_cpus, write_bodies
    from flywheel.settings import Settings

    names = [n.strip() for n in models.split(",") if n.strip()]
    if not names or any(n not in MODELS for n in names):
        raise typer.BadParameter(f"models must be among {', '.join(MODELS)}")
    levels = parse_ints(concurrency)
    defaults = Settings()
    env_on = {
        "FLYWHEEL_DYNAMIC_BATCHING": "true",
        "FLYWHEEL_BATCH_MAX_SIZE": str(max_size or defaults.batch_max_size),
        "FLYWHEEL_BATCH_MAX_WAIT_MS": str(
            defaults.batch_max_wait_ms if max_wait_ms is None else max_wait_ms
        ),
    }
    err = Console(stderr=True, soft_wrap=True)
    say = err.print if not json_out else (lambda msg: print(msg, file=sys.stderr))
    previous = signal.signal(signal.SIGTERM, _sigterm_to_exit)
    runs: list[dict[str, Any]] = []
    from bench.serve import BenchError

    try:
        with ExitStack() as stack:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fw-batch-")))
            machine = machine_info()
            split = split_cpus() if pin else None
            if split:
                os.sched_setaffinity(0, split[1])
                say(
                    f"server pinned to CPU {sorted(split[0])}, load generator to {sorted(split[1])}"
                )
            infos = save_models(work, names, parse_ints(wide))
            write_bodies(work / "bodies.jsonl")
            for rnd in range(1, rounds + 1):
                for model in names:
                    for mode in ("off", "on"):
                        runs += one_server(
                            model,
                            mode,
                            rnd,
                            info=infos[model],
                            work=work,
                            bodies=work / "bodies.jsonl",
                            duration=duration,
                            warmup=warmup,
                            levels=levels,
                            env_on=env_on,
                            cpus=split[0] if split else None,
                            say=say,
                        )
    except BenchError as exc:
        say(f"benchmark failed: {exc}")
        raise typer.Exit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    doc = document(
        "batching",
        machine,
        {
            "config": {
                "duration_s": duration,
                "warmup_s": warmup,
                "rounds": rounds,
                "concurrency": levels,
                "models": {
                    n: {"hidden": i["hidden"], "holdout_accuracy": i["holdout_accuracy"]}
                    for n, i in infos.items()
                },
                "request": "POST /v1/predict, 1 instance of 8 float features, keep-alive HTTP/1.1",
                "on": ", ".join(f"{k}={v}" for k, v in env_on.items()),
                "logging": "prediction records built, then discarded (bench._server --logging off)",
                "pinning": (
                    f"server on CPU {sorted(split[0])}, load generator on {sorted(split[1])}"
                )
                if split
                else "none",
            },
            "runs": runs,
            "summary": summarize(runs, names, levels),
        },
    )
    if json_out:
        print(json.dumps(doc, indent=2, default=str))
    else:
        render(doc)
