"""Promotion signatures (flywheel.signing) and the service's check (flywheel.service.trust)
on a real SQLite MLflow store: what verifies, what is refused and why, key rotation, the
key files and settings, and `flywheel keys`."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

import flywheel.cli.keys  # noqa: F401  (registers `flywheel keys`)
from flywheel.cli import app as cli
from flywheel.modelspec import ModelSpec, build_model
from flywheel.registry import Registry
from flywheel.retry import Fatal
from flywheel.service.trust import PromotionTrust
from flywheel.settings import CHAMPION_ALIAS, Settings, SettingsError, load_settings
from flywheel.signing import (
    PAYLOAD_TAG,
    SIGNATURE_TAG,
    Approval,
    SigningKeyError,
    create_key_pair,
    load_private_key,
    load_public_keys,
    sign,
    verify,
)

TAGS = {
    "parent_version": "",
    "source": "manual",
    "examples": "seed[0,10)",
    "epsilon": "none",
    "delta": "none",
    "gate": "test",
}
DIGEST = "ab" * 32


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "k" / "a.key", tmp_path / "k" / "a.pub"
    create_key_pair(private, public)
    return private, public


def _sign(private: Path, **kw: object) -> dict[str, str]:
    args: dict = {"model": "m", "version": "3", "artifact_sha256": DIGEST} | kw
    return sign(load_private_key(private), **args)


def test_a_signed_promotion_verifies_and_any_change_is_refused(pair):
    private, public = pair
    trusted = load_public_keys([public])
    tags = _sign(private, gate="passed: recent 0.9 vs 0.8")
    got = verify(tags, trusted, model="m", version="3", artifact_sha256=DIGEST)
    assert got.gate == "passed: recent 0.9 vs 0.8" and got.approval is None

    cases = {
        "another version": ({}, {"version": "4"}, "not m v4"),
        "another model": ({}, {"model": "n"}, "not n v3"),
        "another artifact": ({}, {"artifact_sha256": "cd" * 32}, "is not the signed one"),
        "no tags": ({PAYLOAD_TAG: "", SIGNATURE_TAG: ""}, {}, "no promotion signature"),
        "edited statement": (
            {PAYLOAD_TAG: tags[PAYLOAD_TAG].replace('"3"', '"4"')},
            {"version": "4"},
            "does not verify",
        ),
        "garbage signature": ({SIGNATURE_TAG: "!!"}, {}, "does not verify"),
        "not JSON": ({PAYLOAD_TAG: "{"}, {}, "not JSON"),
    }
    for name, (tag_update, expect_update, message) in cases.items():
        expect = {"model": "m", "version": "3", "artifact_sha256": DIGEST} | expect_update
        with pytest.raises(ValueError, match=message):
            verify(tags | tag_update, trusted, **expect)  # type: ignore[arg-type]
        assert name


def test_a_signature_needs_a_gate_pass_or_an_approval(pair):
    private, _ = pair
    with pytest.raises(ValueError, match="gate pass or an approval"):
        _sign(private, gate="rejected: worse")
    with pytest.raises(ValueError, match="gate pass or an approval"):
        _sign(private)
    tags = _sign(private, approval=Approval("ana", "canary fine"))
    doc = json.loads(tags[PAYLOAD_TAG])
    assert doc["approval"] == {"by": "ana", "reason": "canary fine"} and doc["gate"] is None


def test_rotation_trusts_every_listed_key_and_no_other(tmp_path, pair):
    old_private, old_public = pair
    new_private, new_public = tmp_path / "b.key", tmp_path / "b.pub"
    create_key_pair(new_private, new_public)
    old_tags, new_tags = _sign(old_private, gate="passed"), _sign(new_private, gate="passed")
    both = load_public_keys([old_public, new_public])
    for tags in (old_tags, new_tags):
        verify(tags, both, model="m", version="3", artifact_sha256=DIGEST)
    with pytest.raises(ValueError, match="not trusted"):
        verify(
            old_tags, load_public_keys([new_public]), model="m", version="3", artifact_sha256=DIGEST
        )


def test_key_files_are_private_and_checked(tmp_path, pair):
    private, public = pair
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    with pytest.raises(SigningKeyError, match="refusing to replace"):
        create_key_pair(private, public)
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(SigningKeyError, match="not a PEM public key"):
        load_public_keys([private])
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        load_private_key(public)


def test_configured_trusted_keys_must_be_usable_when_the_service_starts(
    tmp_path, pair, monkeypatch
):
    _, public = pair
    monkeypatch.setenv("FLYWHEEL_TRUSTED_KEYS", f"{public},,")
    with pytest.raises(SettingsError, match="FLYWHEEL_TRUSTED_KEYS.*no empty entry"):
        load_settings(home=tmp_path / "home")
    monkeypatch.setenv("FLYWHEEL_TRUSTED_KEYS", f"{public}, {tmp_path / 'nope.pub'}")
    settings = load_settings(home=tmp_path / "home")
    with pytest.raises(Fatal, match="FLYWHEEL_TRUSTED_KEYS: cannot read .*nope.pub"):
        PromotionTrust(settings.registry, settings.state).check_keys()
    monkeypatch.setenv("FLYWHEEL_TRUSTED_KEYS", str(public))
    settings = load_settings(home=tmp_path / "home")
    assert settings.registry.trusted_key_paths == (public,)
    PromotionTrust(settings.registry, settings.state).check_keys()
    # the embedded default may not exist yet: the first signer makes it
    PromotionTrust(Settings(home=tmp_path / "new").registry, Settings().state).check_keys()


def test_the_service_check_on_a_real_registry(tmp_path):
    """Signed by `set_champion` / `promote` (the home's key, created on first use): served.
    Registered and aliased by hand: refused, logged and counted once. Trust off: served."""
    settings = Settings(home=tmp_path / "home")
    registry = Registry.of(settings)
    spec = ModelSpec(input_dim=2, hidden=[2], labels=["a", "b"])
    v1 = registry.publish(spec, build_model(spec), tags=TAGS)
    v2 = registry.publish(spec, build_model(spec), tags=TAGS)
    registry.set_champion(v1)
    assert (settings.home_dir / "keys" / "promotion.pub").is_file()
    trust = PromotionTrust(settings.registry, settings.state)
    assert trust.refusal(registry.load(v1)) is None
    registry.client.set_registered_model_alias(registry.name, CHAMPION_ALIAS, v2)
    loaded = registry.load(v2)
    assert "no promotion signature" in (trust.refusal(loaded) or "")
    trust.refusal(loaded)
    assert trust.refused == 1
    off = settings.model_copy(update={"model_trust": "off"})
    assert PromotionTrust(off.registry, off.state).refusal(loaded) is None
    registry.promote(v2, reason="looked at it", actor="ana")
    statement = json.loads(registry.load(v2).tags[PAYLOAD_TAG])
    assert statement["approval"] == {"by": "ana", "reason": "looked at it"}
    assert trust.refusal(registry.load(v2)) is None

    # a service trusting only another key refuses the home's signatures
    other = tmp_path / "other.key"
    create_key_pair(other, tmp_path / "other.pub")
    elsewhere = settings.model_copy(update={"trusted_keys": str(tmp_path / "other.pub")})
    why = PromotionTrust(elsewhere.registry, elsewhere.state).refusal(registry.load(v1))
    assert why is not None and "not trusted" in why


def test_keys_cli_creates_once_and_shows(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    first = runner.invoke(cli, ["keys", "init", "--json"])
    assert first.exit_code == 0, first.output
    doc = json.loads(first.output)
    assert doc["created"] is True
    again = json.loads(runner.invoke(cli, ["keys", "init", "--json"]).output)
    assert again == doc | {"created": False}
    shown = runner.invoke(cli, ["keys", "show", "--json"])
    assert shown.exit_code == 0
    assert json.loads(shown.output)[0]["key_id"] == doc["key_id"]
    monkeypatch.setenv("FLYWHEEL_TRUSTED_KEYS", doc["private"])  # not a public key
    bad = runner.invoke(cli, ["keys", "show"])
    assert bad.exit_code == 1 and "unusable" in bad.output
