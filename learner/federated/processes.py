"""Starting Flower's processes the Flywheel way: commands, security checks, the app
folder `flwr run` submits, and `LocalFederation` (one SuperLink and K sites on loopback,
each a real process with its own home and store) for the demo, tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.learner.federated.server import RunOptions
from flywheel.settings import FederatedSettings, Settings, StateSettings

log = logging.getLogger(__name__)
BIN = Path(sys.executable).parent
CONNECTION = "flywheel"
APP_DIR = "flywheel-app"
INSECURE_WARNING = (
    "INSECURE: %s runs without TLS (no encryption, no SuperNode "
    "authentication); allowed on loopback (%s) only. Use --tls off this host."
)


class SecurityError(ValueError):
    """A security configuration Flywheel refuses (e.g. plaintext off loopback)."""


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_insecure(what: str, address: str) -> None:
    host, _ = split_address(address)
    if not is_loopback(host):
        raise SecurityError(
            f"{what} at {address} without --tls: plaintext is allowed on loopback addresses only"
        )
    log.warning(INSECURE_WARNING, what, address)


def _tls_files(federated: FederatedSettings, *names: str) -> list[Path]:
    paths = [getattr(federated, f"fed_tls_{n}") for n in names]
    missing = [
        f"FLYWHEEL_FED_TLS_{n.upper()}"
        for n, p in zip(names, paths, strict=True)
        if p is None or not Path(p).is_file()
    ]
    if missing:
        raise SecurityError(f"--tls needs {', '.join(missing)} (see docs/federated.md)")
    return [Path(p).expanduser().resolve() for p in paths]


def superlink_command(federated: FederatedSettings, *, tls: bool, auth: bool) -> list[str]:
    host, port = split_address(federated.fed_superlink)
    cmd = [
        str(BIN / "flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if auth and not tls:
        raise SecurityError("--auth (SuperNode authentication) needs --tls")
    if tls:
        ca, cert, key = _tls_files(federated, "ca", "cert", "key")
        cmd += [
            "--ssl-ca-certfile",
            str(ca),
            "--ssl-certfile",
            str(cert),
            "--ssl-keyfile",
            str(key),
        ]
    else:
        _check_insecure("the SuperLink", federated.fed_superlink)
        cmd.append("--insecure")
    if auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def supernode_command(
    federated: FederatedSettings,
    *,
    tls: bool,
    auth: bool,
    runtime_port: int,
    node_config: str | None = None,
    flower_defaults: bool = False,
) -> list[str]:
    """The site's SuperNode. Default: `--isolation process` (our long-lived ClientApp
    worker runs the tasks) and the short-poll launcher; `flower_defaults`: plain
    `flower-supernode`, a new `flwr-clientapp` process per message, 3 s poll."""
    cmd = (
        [str(BIN / "flower-supernode")]
        if flower_defaults
        else [
            sys.executable,
            "-m",
            "flywheel.learner.federated.supernode",
            "--isolation",
            "process",
        ]
    )
    cmd += [
        "--superlink",
        federated.fed_superlink,
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
    ]
    if auth and not tls:
        raise SecurityError("--auth (SuperNode authentication) needs --tls")
    if tls:
        (ca,) = _tls_files(federated, "ca")
        cmd += ["--root-certificates", str(ca)]
    else:
        _check_insecure("this site's SuperNode connection", federated.fed_superlink)
        cmd.append("--insecure")
    if auth:
        key = federated.fed_auth_key
        if key is None or not Path(key).is_file():
            raise SecurityError(
                "--auth needs FLYWHEEL_FED_AUTH_KEY (the SuperNode's private "
                "key, see docs/federated.md)"
            )
        cmd += ["--auth-supernode-private-key", str(Path(key).expanduser().resolve())]
    if node_config:
        cmd += ["--node-config", node_config]
    return cmd


def flwr_home(state: StateSettings) -> Path:
    """Flower's state and connections, always inside the Flywheel home (as process_env)."""
    return state.home_dir / "flwr"


def write_app(state: StateSettings, options: RunOptions) -> Path:
    """The folder `flwr run` builds the FAB from: a pyproject naming our apps (they are
    imported from the installed flywheel package, nothing else is shipped)."""
    app = flwr_home(state) / APP_DIR
    app.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.run_config().items())
    (app / "pyproject.toml").write_text(f"""[project]
name = "flywheel-federated"
version = "1.0.0"
description = "Flywheel federated learning: DP local training, robust DP aggregation"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "flywheel"

[tool.flwr.app.components]
serverapp = "flywheel.learner.federated.server_app:app"
clientapp = "flywheel.learner.federated.client_app:app"

[tool.flwr.app.config]
{config}
""")
    return app


def write_connection(state: StateSettings, federated: FederatedSettings, *, tls: bool) -> None:
    """`[superlink.flywheel]` in $FLWR_HOME/config.toml, the connection `flwr` uses."""
    home = flwr_home(state)
    home.mkdir(parents=True, exist_ok=True)
    security = (
        f'root-certificates = "{_tls_files(federated, "ca")[0]}"' if tls else "insecure = true"
    )
    if not tls:
        _check_insecure("the Control API connection", federated.fed_superlink)
    (home / "config.toml").write_text(f"""[superlink]
default = "{CONNECTION}"

[superlink.{CONNECTION}]
address = "{federated.fed_superlink}"
{security}
""")


def run_config_arg(values: dict[str, object]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def submit_run(
    settings: Settings,
    options: RunOptions,
    *,
    tls: bool,
    timeout_s: float,
    log_file: Path | None = None,
) -> dict:
    """`flwr run` the app on the SuperLink, wait for it, return the run's summary.
    Takes the whole `Settings`: `flwr run` gets them all, as FLYWHEEL_* (`process_env`)."""
    report = (
        Path(options.report)
        if options.report
        else (flwr_home(settings.state) / "runs" / f"{uuid.uuid4().hex}.json")
    )
    options = dataclasses.replace(options, report=str(report))
    app = write_app(settings.state, options)
    write_connection(settings.state, settings.federated, tls=tls)
    report.unlink(missing_ok=True)
    cmd = [
        str(BIN / "flwr"),
        "run",
        str(app),
        CONNECTION,
        "--stream",
        "--run-config",
        run_config_arg(options.run_config()),
    ]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            cmd, env=process_env(settings), stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while not report.exists():
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"federated run gave no report within {timeout_s:g} s")
            if proc.poll() is not None and proc.returncode != 0:
                raise RuntimeError(
                    f"flwr run exited with {proc.returncode}"
                    + (f"; see {log_file}" if log_file else "")
                )
            time.sleep(0.1)
        time.sleep(0.05)
        summary = json.loads(report.read_text())
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
        return summary
    finally:
        if log_file:
            out.close()  # type: ignore[union-attr]


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """This process's environment without FLYWHEEL_*, plus `settings` as FLYWHEEL_*."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FLYWHEEL_") and k not in ("FLWR_HOME", "MPLCONFIGDIR")
    }
    for name, f in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None or value == f.default:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"FLYWHEEL_{name.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    env["FLYWHEEL_HOME"] = str(settings.home_dir)
    env["FLWR_HOME"] = str(settings.home_dir / "flwr")
    env["MPLCONFIGDIR"] = str(settings.home_dir / "matplotlib")
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])  # flower-superexec & co
    # SuperExec's task poll (starts ServerApps; Flower's default 1 s)
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(min(max(settings.fed_poll_s, 0.01), 1.0))
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(address: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {address} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {address} after {timeout_s:g} s")


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM the process group it leads, then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children it started (SuperExec, ClientApps)
    proc.wait(5)


@dataclass
class LocalFederation:
    """A SuperLink for `platform` and one `flywheel fed client` per site, on loopback."""

    platform: Settings
    sites: list[Settings]
    logs: Path
    flower_defaults: bool = False
    site_args: dict[int, list[str]] = field(default_factory=dict)  # extra `fed client` args
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[name] = proc
        return proc

    def start(self, timeout_s: float = 60.0) -> LocalFederation:
        flywheel = str(BIN / "flywheel")
        link = self._spawn("superlink", [flywheel, "fed", "superlink"], process_env(self.platform))
        wait_for_port(self.platform.fed_superlink, timeout_s, link)
        for i, site in enumerate(self.sites):
            cmd = [flywheel, "fed", "client", "--node-config", f'site="site{i}"']
            if self.flower_defaults:
                cmd.append("--flower-defaults")
            cmd += self.site_args.get(i, [])
            self._spawn(f"site{i}", cmd, process_env(site))
        return self

    def wait_for_sites(self, n: int, timeout_s: float = 60.0) -> None:
        """Until `n` SuperNodes are connected (read from the site logs' node ids)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            up = [
                name
                for name in self.procs
                if name.startswith("site")
                and "SuperNode ID:" in (self.logs / f"{name}.log").read_text(errors="replace")
            ]
            if len(up) >= n:
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode}; see {self.logs / (name + '.log')}"
                    )
            time.sleep(0.2)
        raise TimeoutError(f"fewer than {n} sites connected within {timeout_s:g} s")

    def run(self, options: RunOptions, *, timeout_s: float = 600.0) -> dict:
        return submit_run(
            self.platform,
            options,
            tls=False,
            timeout_s=timeout_s,
            log_file=self.logs / "flwr-run.log",
        )

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            stop_process(self.procs.pop(name))

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
