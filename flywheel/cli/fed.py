"""`flywheel fed …`: federated learning with Flower (docs/federated.md).

Platform: `fed superlink` (the SuperLink; it starts the ServerApp of each run) and
`fed server` (submits a run and waits for its summary). Customer site: `fed client` (a
SuperNode plus a long-lived ClientApp process training on the site's own store) and
`fed register` (the platform registers a site's public key for `--auth`). `fed demo` runs
all of it on loopback.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import typer

from flywheel.cli import app, settings_or_exit, store_or_exit

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

    from flywheel.settings import Settings

log = logging.getLogger("flywheel.federated")
fed_app = typer.Typer(
    no_args_is_help=True, help="Federated learning: SuperLink, ServerApp runs, customer sites."
)
app.add_typer(fed_app, name="fed")

TLS_HELP = "TLS with FLYWHEEL_FED_TLS_CA/CERT/KEY; without it only loopback is allowed."


def _security_or_exit(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    from flywheel.learner.federated import SecurityError

    try:
        return fn(*args, **kwargs)
    except SecurityError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _run_child(cmd: list[str], env: dict[str, str]) -> int:
    """Run `cmd` until it exits or we are asked to stop (then stop it)."""
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    return proc.wait()


def _store_ready(settings: Settings) -> None:
    """A store with no Flywheel schema at all (a fresh home) gets the current schema, with
    a log line, as `flywheel init` does: onboarding is `fed superlink` / `fed client` on a
    new home. A store at another revision is a one-line error, exit 1 (`flywheel db
    upgrade` is the operator's step there, never implicit)."""
    from flywheel.store import SchemaNotCurrent, display_url, open_store, upgrade

    url = settings.resolved_database_url
    try:
        open_store(url).dispose()
        return
    except SchemaNotCurrent as exc:
        if exc.current is not None:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    upgrade(url)
    log.info("store %s had no Flywheel schema: created (flywheel db upgrade)", display_url(url))
    store_or_exit(settings).dispose()


@fed_app.command("superlink")
def superlink(
    tls: bool = typer.Option(False, "--tls", help=TLS_HELP),
    auth: bool = typer.Option(
        False,
        "--auth",
        help="Only SuperNodes whose public key was "
        "registered (`flywheel fed register`) may join; needs --tls.",
    ),
) -> None:
    """The platform's Flower SuperLink on FLYWHEEL_FED_SUPERLINK (Fleet, Control and
    Runtime APIs on one port); it starts a ServerApp process for each submitted run."""
    from flywheel.learner.federated import process_env, superlink_command

    settings = settings_or_exit()
    cmd = _security_or_exit(superlink_command, settings.federated, tls=tls, auth=auth)
    _store_ready(settings)
    log.info(
        "SuperLink on %s (%s%s)",
        settings.fed_superlink,
        "TLS" if tls else "insecure",
        ", SuperNode authentication" if auth else "",
    )
    # the ServerApps learn from this whether a node id names a registered key
    env = process_env(settings, FLYWHEEL_FED_NODE_AUTH="true" if auth else "false")
    raise typer.Exit(_run_child(cmd, env))


@fed_app.command("server")
def server(
    rounds: int | None = typer.Option(None, min=1, help="Default: FLYWHEEL_FED_ROUNDS."),
    clients: int | None = typer.Option(None, min=1, help="Sites per round."),
    strategy: str | None = typer.Option(None, help="fedavg | trimmed | median | fltrust."),
    clipping: str | None = typer.Option(None, help="DP wrapper: client | server."),
    noise: float | None = typer.Option(None, min=0.0, help="Central noise multiplier σ."),
    server_momentum: float | None = typer.Option(
        None,
        min=0.0,
        max=0.99,
        help="Server momentum on the released updates (default 0; fltrust 0.5).",
    ),
    average_last: int | None = typer.Option(
        None,
        min=0,
        help="Register the mean of the last N global models "
        "(default 0: the last half of the rounds).",
    ),
    publish: bool = typer.Option(True, help="Gate, register and (if passed) promote."),
    report: Path | None = typer.Option(None, help="Write the run's summary JSON here."),
    tls: bool = typer.Option(False, "--tls", help=TLS_HELP),
    timeout: float = typer.Option(3600.0, min=1.0, help="Give up after this many seconds."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Submit one federated run to the SuperLink (`flwr run`) and wait for its summary."""
    from flywheel.learner.federated import (
        CLIPPING_CHOICES,
        STRATEGY_CHOICES,
        RunOptions,
        submit_run,
    )

    settings = settings_or_exit()
    overrides = {
        k: v
        for k, v in {
            "rounds": rounds,
            "clients": clients,
            "strategy": strategy,
            "clipping": clipping,
            "noise_multiplier": noise,
            "server_momentum": server_momentum,
            "average_last": average_last,
            "publish": publish,
            "report": str(report.resolve()) if report else None,
        }.items()
        if v is not None
    }
    if strategy is not None and strategy not in STRATEGY_CHOICES:
        typer.echo(f"error: --strategy must be one of {', '.join(STRATEGY_CHOICES)}", err=True)
        raise typer.Exit(2)
    if clipping is not None and clipping not in CLIPPING_CHOICES:
        typer.echo(f"error: --clipping must be one of {', '.join(CLIPPING_CHOICES)}", err=True)
        raise typer.Exit(2)
    options = RunOptions.from_settings(settings.federated, settings.trusted, **overrides)
    log_file = settings.home_dir / "flwr" / "flwr-run.log"  # what `flwr run` said, if it fails
    try:
        summary = _security_or_exit(
            submit_run, settings, options, tls=tls, timeout_s=timeout, log_file=log_file
        )
    except typer.Exit:  # a RuntimeError too (click's), from _security_or_exit
        raise
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(
            f"error: {exc} (is the SuperLink at {settings.fed_superlink} running, "
            "with sites connected? `flywheel fed superlink`, `flywheel fed client`)",
            err=True,
        )
        raise typer.Exit(1) from None
    if json_out:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    for d in summary.get("dropped", []):
        typer.echo(f"round {d['round']} dropped: {d['why']}")
    for r in summary["rounds"]:
        typer.echo(
            f"round {r['round']}: {r['replied']} sites, recent accuracy "
            f"{r['recent_accuracy']:.3f}, trusted {r['trusted_accuracy']:.3f}, "
            f"client ε {r['epsilon_round']:.3g} (cumulative "
            f"{r['epsilon_cumulative']:.3g}), {r['wall_s']:.2f} s "
            f"({r['overhead_s']:.2f} s overhead)"
        )
    typer.echo(
        f"v{summary['version']}: {summary['gate']}" + (" (promoted)" if summary["promoted"] else "")
        if summary.get("version")
        else "no version registered"
    )


@fed_app.command("client")
def client(
    tls: bool = typer.Option(
        False,
        "--tls",
        help="Verify the SuperLink with FLYWHEEL_FED_TLS_CA; without it only loopback is allowed.",
    ),
    auth: bool = typer.Option(
        False,
        "--auth",
        help="Authenticate with the SuperNode key "
        "FLYWHEEL_FED_AUTH_KEY (its public key registered on the "
        "platform); needs --tls.",
    ),
    runtime_port: int | None = typer.Option(
        None, min=1, max=65535, help="Default: FLYWHEEL_FED_RUNTIME_PORT."
    ),
    node_config: str | None = typer.Option(None, help="Flower node config, 'k=\"v\" …'."),
    flower_defaults: bool = typer.Option(
        False,
        "--flower-defaults",
        help="Flower's defaults instead (a ClientApp process per "
        "message, 3 s poll): for comparison only.",
    ),
    app_ref: str | None = typer.Option(
        None, "--app", hidden=True, help="MODULE:ATTR of another ClientApp (tests)."
    ),
) -> None:
    """This site's SuperNode and a long-lived ClientApp training on its own store; only
    clipped model updates and aggregate metrics leave the site."""
    import os

    from flywheel.learner.federated import process_env, supernode_command

    settings = settings_or_exit()
    port = runtime_port or settings.fed_runtime_port
    cmd = _security_or_exit(
        supernode_command,
        settings.federated,
        tls=tls,
        auth=auth,
        runtime_port=port,
        node_config=node_config,
        flower_defaults=flower_defaults,
    )
    _store_ready(settings)
    env = process_env(settings, FLYWHEEL_FED_POLL_S=str(settings.fed_poll_s))
    if flower_defaults:
        raise typer.Exit(_run_child(cmd, env))
    if settings.fed_audit_dir is not None:
        os.environ["FLYWHEEL_FED_AUDIT_DIR"] = str(settings.fed_audit_dir)
    from flywheel.learner.federated import current_site, serve_site_worker, site_app

    site = current_site()  # settings, store and accounting before round 1
    site.prewarm()
    node = subprocess.Popen(cmd, env=env)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def watch() -> None:  # the SuperNode exiting stops the worker too
        node.wait()
        stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        serve_site_worker(
            f"127.0.0.1:{port}",
            _load_app(app_ref) if app_ref else site_app,
            poll_s=settings.fed_poll_s,
            stop=stop,
            after_task=site.prewarm,
        )
    finally:
        if node.poll() is None:
            node.terminate()
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:
                node.kill()
    if node.returncode in (0, -signal.SIGTERM, None):
        raise typer.Exit(0)
    # e.g. Flower's "Exit Code: 305" (the process exits 1): the SuperLink refused this
    # SuperNode (a key not registered, with --auth) or its certificate did not verify
    log.error("the SuperNode exited with %s; see its log above", node.returncode)
    raise typer.Exit(node.returncode)


def _load_app(ref: str) -> ClientApp:
    import importlib

    from flwr.clientapp import ClientApp

    module, _, attr = ref.partition(":")
    app = getattr(importlib.import_module(module), attr or "app")
    if not isinstance(app, ClientApp):
        raise typer.BadParameter(f"--app {ref}: not a Flower ClientApp ({type(app).__name__})")
    return app


@fed_app.command("register")
def register(
    public_key: Path = typer.Argument(
        ..., exists=True, dir_okay=False, help="The site's SuperNode public key (.pub)."
    ),
    tls: bool = typer.Option(
        True, "--tls/--no-tls", help="Registration needs --auth, which needs TLS."
    ),
) -> None:
    """Register a site's SuperNode public key with the SuperLink (`--auth`)."""
    from flywheel.learner.federated import BIN, CONNECTION, write_connection

    settings = settings_or_exit()
    _security_or_exit(write_connection, settings.state, settings.federated, tls=tls)
    from flywheel.learner.federated import process_env

    raise typer.Exit(
        subprocess.call(
            [str(BIN / "flwr"), "supernode", "register", str(public_key), CONNECTION],
            env=process_env(settings),
        )
    )


@fed_app.command("demo")
def demo(
    clients: int = typer.Option(3, "--clients", min=2, max=16, help="Customer sites."),
    rounds: int = typer.Option(5, "--rounds", min=1, max=100),
    report: Path = typer.Option(
        Path(".flywheel/fed-demo"),
        "--report",
        help="Folder for summary.json, summary.md, accuracy.png, logs and the homes.",
    ),
    strategy: str = typer.Option("fedavg", help="fedavg | trimmed | median | fltrust."),
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON."),
) -> None:
    """A loopback federation (one SuperLink, K sites with Dirichlet(0.5) label-skewed data
    of the changed world) with real processes; writes REPORT/summary.json, summary.md and
    accuracy.png (per round: accuracy on the sites' and the trusted holdouts, client ε)."""
    from flywheel.demo import round_trust, write_fed_report
    from flywheel.learner.federated import run_demo

    settings_or_exit()
    summary = run_demo(report.resolve(), clients=clients, rounds=rounds, strategy=strategy)
    write_fed_report(report.resolve(), summary)
    if as_json:
        typer.echo(json.dumps(summary, default=str))
    else:
        for r in summary["rounds"]:
            trust = round_trust(r)  # fltrust only
            typer.echo(
                f"round {r['round']}: accuracy {r['recent_accuracy']:.3f} (union holdout),"
                f" trusted {r['trusted_accuracy']:.3f}, client ε {r['epsilon_round']:.3g}"
                f" (cumulative {r['epsilon_cumulative']:.3g}), overhead "
                f"{r['overhead_s']:.2f} s"
                + (
                    f"; trust ({r['trust_reference']} reference): "
                    + ", ".join(f"{site} {v:.2f}" for site, v in trust.items())
                    if trust
                    else ""
                )
            )
        typer.echo(
            f"registered v{summary['version']} ({summary['gate']})"
            f"{', promoted' if summary['promoted'] else ''}; "
            f"report in {report / 'summary.md'} (summary.json, accuracy.png)"
        )
    if not summary.get("version"):
        sys.exit(1)
