"""`flywheel keys init | show`: the platform key that signs promotions (flywheel.signing).

`init` writes an Ed25519 pair: the private key where FLYWHEEL_SIGNING_KEY points (default
HOME/keys/promotion.key, owner-readable only) and its public key beside it (`.pub`), which
the services list in FLYWHEEL_TRUSTED_KEYS. A rotation is `init --out NEW.key`, adding
NEW.pub to every service's FLYWHEEL_TRUSTED_KEYS, then pointing FLYWHEEL_SIGNING_KEY at
NEW.key (docs/security.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flywheel.cli import app, settings_or_exit

keys_app = typer.Typer(no_args_is_help=True, help="The key that signs promotions.")
app.add_typer(keys_app, name="keys")


def _public_of(private: Path) -> Path:
    return private.with_suffix(".pub")


@keys_app.command("init")
def init(
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Private key file to write (default FLYWHEEL_SIGNING_KEY, else "
        "HOME/keys/promotion.key); the public key goes beside it as .pub.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print {private, public, key_id}."),
) -> None:
    """Create the signing key pair; an existing key is kept (exit 0, says so)."""
    from flywheel.signing import (
        SigningKeyError,
        create_key_pair,
        default_key_paths,
        key_id,
        load_private_key,
    )

    settings = settings_or_exit()
    if out is not None:
        private, public = out, _public_of(out)
    elif settings.signing_key is not None:
        private, public = settings.signing_key, _public_of(settings.signing_key)
    else:
        private, public = default_key_paths(settings.home_dir)
    created = not private.exists()
    try:
        if created:
            kid = create_key_pair(private, public)
        else:
            kid = key_id(load_private_key(private).public_key())
    except (SigningKeyError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        doc = {"private": str(private), "public": str(public), "key_id": kid, "created": created}
        typer.echo(json.dumps(doc))
        return
    what = "created" if created else "kept the existing"
    typer.echo(f"{what} signing key {private} (key id {kid})")
    typer.echo(f"services trust it through FLYWHEEL_TRUSTED_KEYS={public}")


@keys_app.command("show")
def show(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
) -> None:
    """The public keys this configuration trusts, with their key ids."""
    from flywheel.signing import SigningKeyError, default_key_paths, load_public_keys

    settings = settings_or_exit()
    paths = list(settings.registry.trusted_key_paths) or [default_key_paths(settings.home_dir)[1]]
    rows = []
    for path in paths:
        try:
            (kid,) = load_public_keys([path])
        except SigningKeyError as exc:
            rows.append({"path": str(path), "key_id": None, "error": str(exc)})
        else:
            rows.append({"path": str(path), "key_id": kid, "error": None})
    if as_json:
        typer.echo(json.dumps(rows))
    else:
        for r in rows:
            typer.echo(f"{r['path']}: {r['key_id'] or 'unusable: ' + str(r['error'])}")
    if any(r["error"] for r in rows):
        raise typer.Exit(1)
