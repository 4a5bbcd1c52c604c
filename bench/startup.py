"""Start-up time of each process: from `exec` to ready.

`flywheel serve` until /readyz answers 200; `flywheel feedback` until it logs that it
consumes; `flywheel learn` until it logs that the learner resumes. One home for all
(SQLite store, MLflow on SQLite, the seed model as champion, its trusted set) and the
embedded broker; each process is started `--rounds` times in turn and the median is
reported. `--baseline` names another `flywheel` executable (another checkout's venv)
whose processes are started in turn with these, for a side-by-side ratio.

    python -m bench startup --rounds 3 --baseline /path/to/other/.venv/bin/flywheel
"""

from __future__ import annotations

import json
import os
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


def main(
    rounds: int = typer.Option(3, min=1, help="Starts of each process."),
    baseline: str | None = typer.Option(None, help="Another flywheel executable, in turn."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Seconds from exec to ready, per process (median of `rounds`)."""
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
        processes: dict[str, tuple[list[str], Callable[[Path], bool]]] = {
            "serve": (
                ["serve", "--port", str(port)],
                lambda _log: _http_ok(f"http://127.0.0.1:{port}/readyz"),
            ),
            "feedback": (["feedback"], _logged("feedback worker in group")),
            "learn": (["learn"], _logged("resumes at update")),
        }
        exes = {"this": _flywheel()} | ({"baseline": baseline} if baseline else {})
        results: dict[str, list[float]] = {
            f"{name} ({which})": [] for name in processes for which in exes
        }
        for _ in range(rounds):
            for name, (args, ready) in processes.items():
                for which, exe in exes.items():  # in turn: the same load for both
                    results[f"{name} ({which})"].append(_time_to_ready(exe, args, env, ready))
    doc = {
        name: {"median_s": round(statistics.median(v), 2), "all_s": [round(x, 2) for x in v]}
        for name, v in results.items()
    }
    if as_json:
        typer.echo(json.dumps(doc))
        return
    for name, r in doc.items():
        typer.echo(f"flywheel {name}: {r['median_s']:.2f} s to ready {r['all_s']}")
