"""`flywheel up`: the whole loop as supervised processes on one machine (docs/operations.md).

The broker (`flywheel broker`), the schema (`flywheel db upgrade`, once), the first model
(`flywheel learn --once` trains it on a new home), then the service replicas (each with
its own home, so its own spool), the feedback workers and one learner, each a child in
its own process group. A child that exits is started again after a capped backoff;
Ctrl-C or SIGTERM stops every child's group. `--print-env` prints, from another shell,
what that shell needs to join the running loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import typer

from flywheel.cli import app, settings_or_exit
from flywheel.lifetime import parent_death_signal
from flywheel.settings import Settings

LOCAL_APP = "local"  # the app whose key `flywheel up` prints (scopes predict, correct)
UP_DIR = "up"  # under FLYWHEEL_HOME: env, app.key, lock, logs/
KEY_VARIABLE = "FW_APP_KEY"  # not FLYWHEEL_*: settings refuse unknown FLYWHEEL_ variables


def _say(message: str) -> None:
    typer.echo(f"{time.strftime('%H:%M:%S')} up: {message}", err=True)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _flywheel(*args: str) -> list[str]:
    """This interpreter's flywheel (the one `up` itself runs in)."""
    return [sys.executable, "-m", "flywheel", *args]


@dataclass
class Layout:
    """Where each part of the loop lives: one shared store and registry, one home per
    replica (a spool has one writer), the ports."""

    root: Path
    bootstrap: str
    ports: list[int]
    database_url: str
    mlflow_uri: str
    # the replicas have homes of their own, so the promotion keys are named for them, not
    # found in their home: the signing key the processes on the root home create there on
    # first use (`learn --once`), and the public keys the service trusts
    signing_key: str
    trusted_keys: str
    signing_key_set: bool = False  # FLYWHEEL_SIGNING_KEY given: every process gets it
    key: str | None = None

    def shared_env(self) -> dict[str, str]:
        return {
            "FLYWHEEL_HOME": str(self.root),
            "FLYWHEEL_DATABASE_URL": self.database_url,
            "FLYWHEEL_MLFLOW_TRACKING_URI": self.mlflow_uri,
            "FLYWHEEL_KAFKA_BOOTSTRAP": self.bootstrap,
            "FLYWHEEL_PORT": str(self.ports[0]),
            "FLYWHEEL_TRUSTED_KEYS": self.trusted_keys,
        } | ({"FLYWHEEL_SIGNING_KEY": self.signing_key} if self.signing_key_set else {})

    def replica_env(self, i: int) -> dict[str, str]:
        return self.shared_env() | {
            "FLYWHEEL_HOME": str(self.root / f"replica-{i}"),
            "FLYWHEEL_PORT": str(self.ports[i]),
            "FLYWHEEL_SIGNING_KEY": self.signing_key,
        }

    def env_text(self) -> str:
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.shared_env().items()]
        lines.append(
            f"# the service: http://127.0.0.1:{self.ports[0]} (replicas on ports "
            f"{', '.join(map(str, self.ports))})"
        )
        if self.key is not None:
            lines.append(
                f"# app {LOCAL_APP!r} (predict, correct): Authorization: Bearer ${KEY_VARIABLE}"
            )
            lines.append(f"export {KEY_VARIABLE}={shlex.quote(self.key)}")
        return "\n".join(lines) + "\n"


def _lock(root: Path) -> IO[str]:
    """One `flywheel up` per home: a second would fight the first over ports and spools."""
    (root / UP_DIR).mkdir(parents=True, exist_ok=True)
    handle = open(root / UP_DIR / "lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise _fail(
            f"`flywheel up` already runs in {root} (`flywheel up --print-env` joins it)"
        ) from None
    return handle


def _local_key(settings: Settings, root: Path) -> str | None:
    """App `local`'s key, kept in FLYWHEEL_HOME/up/app.key (0600) so that a restart of
    `up` does not end the key other shells use; None with FLYWHEEL_AUTH=off."""
    if settings.access.auth == "off":
        return None
    from flywheel.store import add_app, list_apps, open_store, rotate_key, session_factory

    path = root / UP_DIR / "app.key"
    engine = open_store(settings.resolved_database_url)
    try:
        with session_factory(engine).begin() as session:
            known = {a.name: a for a in list_apps(session)}
            current = known.get(LOCAL_APP)
            if current is not None and current.revoked_at is None and path.is_file():
                return path.read_text().strip()
            if current is not None and current.revoked_at is not None:
                raise _fail(f"app {LOCAL_APP!r} was revoked in {root}: use another FLYWHEEL_HOME")
            key = (
                rotate_key(session, LOCAL_APP, grace_s=0)
                if current is not None
                else add_app(session, LOCAL_APP, "predict,correct")
            )
    finally:
        engine.dispose()
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key


class _Stopped(Exception):
    """Ctrl-C or SIGTERM during a start-up phase."""


def _wait_phase(
    what: str, done: Any, timeout_s: float, stop: threading.Event, proc: Any = None
) -> None:
    """Say what start-up waits for and, every 5 s, how long it has waited."""
    _say(f"{what}...")
    start = last = time.monotonic()
    while not done():
        if stop.is_set():
            raise _Stopped
        now = time.monotonic()
        if proc is not None and proc.poll() is not None:
            raise _fail(f"{what}: the process exited with code {proc.returncode}")
        if now - start > timeout_s:
            raise _fail(f"{what}: not done after {timeout_s:.0f}s")
        if now - last >= 5:
            _say(f"{what}: {now - start:.0f}s")
            last = now
        time.sleep(0.2)
    _say(f"{what}: done in {time.monotonic() - start:.1f}s")


def _printed(log: Path, line: str) -> bool:
    """Whether the child logging to `log` has printed `line` (the broker prints its address
    once its topics exist)."""
    try:
        return line in log.read_text(errors="replace").splitlines()
    except OSError:
        return False


def _run_step(
    what: str, argv: list[str], env: dict[str, str], log: Path, stop: threading.Event
) -> None:
    """A one-shot child (db upgrade, the first model) with progress; its failure stops `up`."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=parent_death_signal(),
        )
        try:
            _wait_phase(what, lambda: proc.poll() is not None, 1800.0, stop)
        except BaseException:  # stopped: a learner lets its lease go on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise _fail(f"{what} failed (exit {proc.returncode}): {tail[0]} (log: {log})")


class Watch:
    """What the panel shows besides the children: the served version, the feedback lag.
    Refreshed by a thread every `every_s` (a lag read is a few Kafka round trips)."""

    def __init__(self, layout: Layout, settings: Settings, every_s: float = 2.0) -> None:
        self.layout = layout
        self.settings = settings
        self.every_s = every_s
        self.ready: list[bool] = [False] * len(layout.ports)
        self.version: str | None = None
        self.lag: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="flywheel-up-watch", daemon=True)

    def _run(self) -> None:
        import logging

        import httpx

        # a lag read's own clients: their connect/close chatter is not the operator's news
        logging.getLogger("kafka").setLevel(logging.CRITICAL)

        from flywheel.broker import BrokerError, consumer_lag

        k = self.settings.kafka
        topics = [k.topic_predictions, k.topic_corrections, k.topic_scores]
        while not self.stop.is_set():
            for i, port in enumerate(self.layout.ports):
                try:
                    body = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2.0).json()
                    self.ready[i] = bool(body.get("ready"))
                    if i == 0 and body.get("model_version") is not None:
                        self.version = str(body["model_version"])
                except (httpx.HTTPError, ValueError, AttributeError):
                    self.ready[i] = False
            with contextlib.suppress(BrokerError, OSError):
                parts = consumer_lag(
                    self.layout.bootstrap, self.settings.feedback.feedback_group, topics, 2.0
                )
                self.lag = sum(p.lag for p in parts)
            self.stop.wait(self.every_s)


def panel_of(sup: Any, watch: Watch, layout: Layout) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(expand=True)
    for col in ("process", "state", "pid", "restarts", "last log line"):
        table.add_column(col, no_wrap=col != "last log line", overflow="ellipsis")
    for child in sup.children.values():
        table.add_row(
            child.spec.name,
            child.state,
            str(child.pid or "-"),
            str(child.restarts),
            child.last_line[-200:],
        )
    ready = sum(watch.ready)
    head = Text(
        f"serving v{watch.version or '?'} on http://127.0.0.1:{layout.ports[0]} · "
        f"{ready}/{len(layout.ports)} replicas ready · feedback lag "
        f"{'?' if watch.lag is None else watch.lag} · broker {layout.bootstrap} · Ctrl-C stops"
    )
    return Group(head, table)


@app.command()
def up(
    workers: int = typer.Option(1, min=1, max=64, help="Feedback workers (one group)."),
    replicas: int = typer.Option(1, min=1, max=64, help="Service replicas, one port each."),
    port: int | None = typer.Option(
        None,
        min=0,
        max=65535,
        help="First replica's port, the next ones follow it; 0 picks free ports. "
        "Default: FLYWHEEL_PORT.",
    ),
    broker_port: int = typer.Option(
        0, min=0, max=65535, help="The broker's port; 0 picks a free one (kept across restarts)."
    ),
    print_env: bool = typer.Option(
        False, "--print-env", help="Print the settings a shell needs to join the running loop."
    ),
    panel: bool | None = typer.Option(
        None,
        "--panel/--no-panel",
        help="The live status panel; default: when the output is a terminal, else event lines.",
    ),
) -> None:
    """Run the loop locally as separate supervised processes: broker, schema, first model,
    service replicas, feedback workers and a learner; Ctrl-C stops them all."""
    settings = settings_or_exit()
    root = settings.home_dir
    if print_env:
        env_file = root / UP_DIR / "env"
        if not env_file.is_file():
            raise _fail(f"no `flywheel up` has started in {root} (start one first)")
        typer.echo(env_file.read_text(), nl=False)
        return
    if settings.kafka.kafka_bootstrap:
        raise _fail(
            "FLYWHEEL_KAFKA_BOOTSTRAP is set: `flywheel up` runs its own broker "
            "(unset it, or start the processes yourself, docs/operations.md)"
        )
    lock = _lock(root)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        _up(settings, root, workers, replicas, port, broker_port, panel, stop)
    finally:
        with contextlib.suppress(OSError):
            (root / UP_DIR / "env").unlink()
        lock.close()


def _up(
    settings: Settings,
    root: Path,
    workers: int,
    replicas: int,
    port: int | None,
    broker_port: int,
    panel: bool | None,
    stop: threading.Event,
) -> None:
    from flywheel.broker import free_port
    from flywheel.retry import Backoff
    from flywheel.supervisor import ChildSpec, Supervisor

    base = settings.port if port is None else port
    ports = (
        [free_port() for _ in range(replicas)] if base == 0 else [base + i for i in range(replicas)]
    )
    bootstrap = f"127.0.0.1:{broker_port or free_port()}"
    from flywheel.signing import default_key_paths

    private, public = default_key_paths(root)
    layout = Layout(
        root,
        bootstrap,
        ports,
        settings.resolved_database_url,
        settings.resolved_mlflow_uri,
        signing_key=str(settings.signing_key or private),
        trusted_keys=settings.trusted_keys or str(public),
        signing_key_set=settings.signing_key is not None,
    )
    logs = root / UP_DIR / "logs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"} | layout.shared_env()
    sup = Supervisor(logs, backoff=Backoff(1.0, 30.0), base_env=env)
    try:
        broker = sup.add(
            ChildSpec(
                "broker", _flywheel("broker", "--port", bootstrap.rsplit(":", 1)[1]), stop_last=True
            )
        )
        try:
            _wait_phase(
                f"broker on {bootstrap}",
                lambda: _printed(logs / "broker.log", bootstrap),
                60.0,
                stop,
                proc=broker.proc,
            )
            _run_step(
                "schema (db upgrade)",
                _flywheel("db", "upgrade"),
                env,
                logs / "db-upgrade.log",
                stop,
            )
            layout.key = _local_key(settings, root)
            _run_step(
                "first model (a new home trains it: about a minute)",
                _flywheel("learn", "--once"),
                env,
                logs / "first-model.log",
                stop,
            )
        except _Stopped:
            return
        for i in range(replicas):
            sup.add(ChildSpec(f"serve-{i}", _flywheel("serve"), layout.replica_env(i)))
        for i in range(workers):
            sup.add(ChildSpec(f"feedback-{i}", _flywheel("feedback")))
        sup.add(ChildSpec("learn", _flywheel("learn")))
        env_file = root / UP_DIR / "env"
        env_file.touch(mode=0o600)
        env_file.write_text(layout.env_text())
        _say(
            f'to join from another shell: eval "$(flywheel up --print-env)" (FLYWHEEL_HOME={root})'
        )
        typer.echo(layout.env_text(), nl=False)
        _supervise(sup, layout, settings, panel, stop)
    finally:
        _say("stopping every process")
        sup.stop()
        _say("stopped")


def _supervise(
    sup: Any, layout: Layout, settings: Settings, panel: bool | None, stop: threading.Event
) -> None:
    watch = Watch(layout, settings)
    watch.thread.start()
    live_panel = sys.stdout.isatty() if panel is None else panel
    announced = False
    try:
        if live_panel:
            from rich.live import Live

            with Live(panel_of(sup, watch, layout), refresh_per_second=2) as live:
                while not stop.wait(0.5):
                    _note(sup.poll())
                    live.update(panel_of(sup, watch, layout))
            return
        while not stop.wait(0.5):
            _note(sup.poll())
            if not announced and all(watch.ready):
                announced = True
                _say(
                    f"ready: serving v{watch.version} on http://127.0.0.1:{layout.ports[0]} "
                    f"({len(layout.ports)} replicas)"
                )
    finally:
        watch.stop.set()


def _note(exited: list[Any]) -> None:
    for child in exited:
        _say(
            f"{child.spec.name} exited with code {child.last_exit} ({child.last_line[-160:]}); "
            f"restarting after a backoff"
        )
