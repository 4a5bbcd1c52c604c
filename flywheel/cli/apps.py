"""`flywheel apps create | list | rotate | revoke`: the apps that may call the service.

A key is printed once, when it is made (`create`, `rotate`); the store keeps its SHA-256
only (`flywheel.appkeys`). A running service sees a revocation, or the end of a
rotation's grace, within FLYWHEEL_AUTH_CACHE_TTL_S (docs/security.md).
"""

from __future__ import annotations

import json
import re

import typer

from flywheel.cli import app, settings_or_exit, store_or_exit

apps_app = typer.Typer(no_args_is_help=True, help="App identities and their keys.")
app.add_typer(apps_app, name="apps")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
MAX_S = 10 * 365 * 86400


def duration(value: str | None) -> float | None:
    """`90s`, `15m`, `12h`, `30d` or plain seconds, as seconds (>= 0, at most ten years)."""
    if value is None:
        return None
    m = _DURATION.match(value)
    if m is None:
        raise typer.BadParameter(f"expected a duration like 90s, 15m, 12h or 30d; got {value!r}")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds > MAX_S:
        raise typer.BadParameter(f"{value!r} is more than ten years")
    return seconds


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _print_key(name: str, key: str, note: str, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"app": name, "key": key}))
        return
    typer.echo(f"{note}\n\n  {key}\n")
    typer.echo("This key is shown once: store it now (the service keeps only its hash).")


@apps_app.command("create")
def create(
    name: str = typer.Argument(..., help="The app's name: its corrections' source."),
    scopes: str = typer.Option(
        ..., "--scopes", help="Comma-separated: predict, correct, review, admin."
    ),
    expires_in: str | None = typer.Option(
        None, "--expires-in", help="The key expires after this (90s, 15m, 12h, 30d); default never."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print {app, key} as JSON."),
) -> None:
    """Create an app and print its key (once)."""
    from flywheel.store import AppExists, add_app, session_factory

    seconds = duration(expires_in)
    settings = settings_or_exit()
    engine = store_or_exit(settings)
    try:
        with session_factory(engine).begin() as session:
            key = add_app(session, name, scopes, expires_in_s=seconds)
    except (AppExists, ValueError) as exc:
        raise _fail(str(exc)) from None
    finally:
        engine.dispose()
    _print_key(name, key, f"created app {name!r} with scopes {scopes}; its key:", as_json)


@apps_app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON (a list).")) -> None:
    """Every app: scopes, keys (id, created, expires, last used), revoked or not."""
    from flywheel.store import list_apps, session_factory

    settings = settings_or_exit()
    engine = store_or_exit(settings)
    try:
        with session_factory(engine)() as session:
            apps = list_apps(session)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps([a.as_json() for a in apps], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="apps")
    for col in ("app", "scopes", "status", "key id", "created", "expires", "last used"):
        table.add_column(col)

    def when(t: object) -> str:
        return "-" if t is None else f"{t:%Y-%m-%d %H:%M}"

    for a in apps:
        status = "revoked" if a.revoked_at is not None else "active"
        for i, k in enumerate(a.keys or (None,)):
            table.add_row(
                a.name if i == 0 else "",
                ",".join(a.scopes) if i == 0 else "",
                status if i == 0 else "",
                k.key_id if k else "-",
                when(k.created_at) if k else "-",
                when(k.expires_at) if k else "-",
                when(k.last_used_at) if k else "-",
            )
    Console().print(table)


@apps_app.command("rotate")
def rotate(
    name: str = typer.Argument(...),
    grace: str = typer.Option(
        "24h", "--grace", help="How long the app's older keys keep working (0 ends them now)."
    ),
    expires_in: str | None = typer.Option(
        None, "--expires-in", help="The new key expires after this; default never."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print {app, key} as JSON."),
) -> None:
    """A new key for an app; its older keys stay valid for the grace period."""
    from flywheel.store import UnknownApp, rotate_key, session_factory

    grace_s, seconds = duration(grace), duration(expires_in)
    assert grace_s is not None
    settings = settings_or_exit()
    engine = store_or_exit(settings)
    try:
        with session_factory(engine).begin() as session:
            key = rotate_key(session, name, grace_s=grace_s, expires_in_s=seconds)
    except (UnknownApp, ValueError) as exc:
        raise _fail(str(exc)) from None
    finally:
        engine.dispose()
    _print_key(name, key, f"new key for {name!r}; older keys keep working for {grace}:", as_json)


@apps_app.command("revoke")
def revoke(name: str = typer.Argument(...)) -> None:
    """Refuse every key of an app (a running service: within FLYWHEEL_AUTH_CACHE_TTL_S)."""
    from flywheel.store import UnknownApp, revoke_app, session_factory

    settings = settings_or_exit()
    engine = store_or_exit(settings)
    try:
        with session_factory(engine).begin() as session:
            revoke_app(session, name)
    except UnknownApp as exc:
        raise _fail(str(exc)) from None
    finally:
        engine.dispose()
    typer.echo(
        f"revoked app {name!r}; running services refuse its keys within "
        f"{settings.access.auth_cache_ttl_s:g} s"
    )
