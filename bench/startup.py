"""Start-up time of each process: from `exec` to ready, or to a command's first output.

`flywheel serve` until /readyz answers 200 (`serve`: on the home with a champion;
`serve-new`: on a new, migrated home, so it trains the seed model first); `flywheel
feedback` until it logs that it consumes; `flywheel learn` until it logs that the learner
resumes; the read commands (`--help`, `models list`, `feedback report`, `status`) until
the first byte they print. One home for all but `serve-new` (SQLite store, MLflow on
SQLite, the seed model as champion, its trusted set) and the embedded broker; each
process is started `--rounds` times in turn and the median is reported. `--baseline`
names another `flywheel` executable (another checkout's venv) whose processes are started
in turn with these, for a side-by-side ratio; `--only` picks processes.

    python -m bench startup --rounds 3 --baseline /path/to/other/.venv/bin/flywheel
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import typer

READY_TIMEOUT_S = 180.0


def _flywheel() -> str:
    return str(Path(sys.executable).parent / "flywheel")


def _logged(text: str) -> Callable[[Path], bool]:
    return lambda log: text in log.read_text()


def _http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _time_to_ready(
    exe: str, args: list[str], env: dict[str, str], ready: Callable[[Path], bool]
) -> float:
    with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as out:
        log = Path(out.name)
        start = time.perf_counter()
        proc = subprocess.Popen([exe, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        while not ready(log):
            if proc.poll() is not None:
                raise RuntimeError(f"{args} exited: {log.read_text()[-2000:]}")
            if time.perf_counter() - start > READY_TIMEOUT_S:
                raise RuntimeError(f"{args} not ready in {READY_TIMEOUT_S} s")
            time.sleep(0.02)
        return time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.unlink(missing_ok=True)


def _time_to_output(exe: str, args: list[str], env: dict[str, str]) -> float:
    """Seconds to the first byte on stdout (a read command's answer); it must exit 0, or
    1 for `status` (its answer when a part needs a person: here no service runs)."""
    start = time.perf_counter()
    proc = subprocess.Popen([exe, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = proc.stdout.read(1)
        elapsed = time.perf_counter() - start
        _, err = proc.communicate(timeout=READY_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    if not first or proc.returncode not in ((0, 1) if args[0] == "status" else (0,)):
        raise RuntimeError(f"{args} exited {proc.returncode}: {err.decode()[-2000:]}")
    return elapsed


PROCESSES = ("serve", "serve-new", "feedback", "learn")  # timed to ready
READ_COMMANDS = {
    "help": ["--help"],
    "models-list": ["models", "list"],
    "feedback-report": ["feedback", "report"],
    "status": ["status", "--json"],
}


def main(
    rounds: int = typer.Option(3, min=1, help="Starts of each process."),
    baseline: str | None = typer.Option(None, help="Another flywheel executable, in turn."),
    only: str | None = typer.Option(
        None,
        help="Comma-separated: serve, serve-new, feedback, learn, help, models-list, "
        "feedback-report, status (default: all).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Seconds from exec to ready or first output, per process (median of `rounds`)."""
    names = [*PROCESSES, *READ_COMMANDS]
    chosen = names if only is None else [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown or not chosen:
        raise typer.BadParameter(f"--only: unknown {unknown}; choose from {names}")
    from flywheel.broker import EmbeddedBroker, ensure_topics, free_port
    from flywheel.learner import ensure_champion
    from flywheel.registry import Registry
    from flywheel.settings import Settings, prepare_home
    from flywheel.store import ensure_seed_trusted, upgrade

    with tempfile.TemporaryDirectory() as home, EmbeddedBroker() as broker:
        settings = Settings(home=Path(home), kafka_bootstrap=broker.bootstrap)
        prepare_home(settings)
        url = settings.resolved_database_url
        upgrade(url)
        ensure_champion(settings.trusted, Registry.of(settings))  # writes the trusted set too
        ensure_seed_trusted(url, settings.model_name, settings.trusted)
        ensure_topics(broker.bootstrap, settings.topics, settings.topic_partitions)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
        env |= {"FLYWHEEL_HOME": home, "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap}
        port = free_port()
        new_homes: list[str] = []

        def new_home() -> dict[str, str]:
            fresh = tempfile.mkdtemp(prefix="bench-startup-new-")
            new_homes.append(fresh)
            upgrade(Settings(home=Path(fresh)).resolved_database_url)  # not timed
            return env | {"FLYWHEEL_HOME": fresh}

        serving = lambda _log: _http_ok(f"http://127.0.0.1:{port}/readyz")  # noqa: E731
        processes: dict[str, tuple[list[str], Callable[[Path], bool]]] = {
            "serve": (["serve", "--port", str(port)], serving),
            "serve-new": (["serve", "--port", str(port)], serving),
            "feedback": (["feedback"], _logged("feedback worker in group")),
            "learn": (["learn"], _logged("resumes at update")),
        }
        exes = {"this": _flywheel()} | ({"baseline": baseline} if baseline else {})
        results: dict[str, list[float]] = {
            f"{name} ({which})": [] for name in chosen for which in exes
        }
        try:
            for _ in range(rounds):
                for name in chosen:
                    for which, exe in exes.items():  # in turn: the same load for both
                        key = f"{name} ({which})"
                        if name in READ_COMMANDS:
                            results[key].append(_time_to_output(exe, READ_COMMANDS[name], env))
                            continue
                        args, ready = processes[name]
                        run_env = new_home() if name == "serve-new" else env
                        results[key].append(_time_to_ready(exe, args, run_env, ready))
        finally:
            for fresh in new_homes:
                shutil.rmtree(fresh, ignore_errors=True)
    doc = {
        name: {"median_s": round(statistics.median(v), 2), "all_s": [round(x, 2) for x in v]}
        for name, v in results.items()
    }
    if as_json:
        typer.echo(json.dumps(doc))
        return
    for name, r in doc.items():
        typer.echo(f"flywheel {name}: {r['median_s']:.2f} s {r['all_s']}")
