"""Signed promotions: what makes a version servable, and who may say so (issue 26, part 5).

Whoever can write to MLflow can register a version and point `champion` at it, and the
artifact's SHA-256 sits beside its weights, so an integrity check alone proves nothing.
The learner, the federated server, `flywheel init` and the promote/approve actions
therefore sign a small statement with the platform's Ed25519 key (`FLYWHEEL_SIGNING_KEY`):
the model name, the version, the SHA-256 of the artifact's `spec.json` (which holds the
weights' SHA-256, so it covers both) and the basis of the promotion: the gate result the
signer computed, or a named approval. The statement and its signature are stored as two
version tags. The service (`flywheel.service.trust`) serves a version only when the
signature verifies against one of its trusted public keys (`FLYWHEEL_TRUSTED_KEYS`, several
for key rotation) and the statement names this version, this artifact and a gate pass or an
approval.

Ed25519 because `cryptography` (already in the stack through MLflow) has it, keys are 32
bytes and there is no parameter to get wrong. Measured on the 2-core development machine
(busy): a signature ~0.14 ms, a verification ~0.76 ms; `Registry.sign` (one `spec.json`
download, two tag writes, SQLite MLflow) ~210 ms a promotion; the service's whole check
(reading the trusted keys, verifying) ~1.9 ms, next to ~73 ms for loading the version.

On the embedded defaults (no FLYWHEEL_SIGNING_KEY, no FLYWHEEL_TRUSTED_KEYS) the pair lives
in `FLYWHEEL_HOME/keys/` and is created by the first signer (`flywheel init`, the demo, a
learner), so a one-machine setup works with nothing to configure; a configured key that is
missing is an error, never replaced.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "PAYLOAD_TAG",
    "SIGNATURE_TAG",
    "Approval",
    "SigningKeyError",
    "Statement",
    "create_key_pair",
    "default_key_paths",
    "key_id",
    "load_private_key",
    "load_public_keys",
    "sign",
    "verify",
]

FORMAT = "flywheel-promotion/1"
PAYLOAD_TAG = "flywheel.promotion"  # the signed statement, canonical JSON
SIGNATURE_TAG = "flywheel.signature"  # base64 Ed25519 signature of PAYLOAD_TAG's bytes
KEYS_DIR = "keys"
PRIVATE_NAME = "promotion.key"
PUBLIC_NAME = "promotion.pub"
MAX_TAG = 4000  # an MLflow tag value holds 5000 characters


class SigningKeyError(ValueError):
    """A key file that is missing, unreadable or not an Ed25519 key (the message says which)."""


@dataclass(frozen=True)
class Approval:
    """A person's (or tool's) explicit decision to serve a version."""

    by: str
    reason: str


@dataclass(frozen=True)
class Statement:
    """What a promotion signature vouches for."""

    model: str
    version: str
    artifact_sha256: str
    gate: str | None  # the gate result as the signer computed it ("passed: ...")
    approval: Approval | None
    signed_at: str
    key_id: str

    @property
    def has_basis(self) -> bool:
        """A gate pass or an approval is recorded: without one a signature proves nothing."""
        passed = self.gate is not None and self.gate.lower().startswith("passed")
        return passed or (self.approval is not None and bool(self.approval.by.strip()))

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "model": self.model,
            "version": self.version,
            "artifact_sha256": self.artifact_sha256,
            "gate": self.gate,
            "approval": None
            if self.approval is None
            else {"by": self.approval.by, "reason": self.approval.reason},
            "signed_at": self.signed_at,
            "key_id": self.key_id,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str) -> Statement:
        """Parse a stored statement; ValueError names what is wrong."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the signed statement is not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"the signed statement is not {FORMAT}")
        strings = ("model", "version", "artifact_sha256", "signed_at", "key_id")
        if any(not isinstance(doc.get(k), str) for k in strings):
            raise ValueError(f"the signed statement needs strings {list(strings)}")
        gate, approval = doc.get("gate"), doc.get("approval")
        if gate is not None and not isinstance(gate, str):
            raise ValueError("the signed statement's gate is not a string")
        if approval is not None and not (
            isinstance(approval, dict)
            and isinstance(approval.get("by"), str)
            and isinstance(approval.get("reason"), str)
        ):
            raise ValueError("the signed statement's approval needs `by` and `reason`")
        return cls(
            model=doc["model"],
            version=doc["version"],
            artifact_sha256=doc["artifact_sha256"],
            gate=gate,
            approval=None if approval is None else Approval(approval["by"], approval["reason"]),
            signed_at=doc["signed_at"],
            key_id=doc["key_id"],
        )


def default_key_paths(home: Path) -> tuple[Path, Path]:
    """The embedded default pair: (private, public) under `home`/keys."""
    return home / KEYS_DIR / PRIVATE_NAME, home / KEYS_DIR / PUBLIC_NAME


def key_id(public: Ed25519PublicKey) -> str:
    """A short name for a public key: the first 16 hex digits of its raw bytes' SHA-256."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def create_key_pair(private_path: Path, public_path: Path, *, overwrite: bool = False) -> str:
    """Write a new Ed25519 pair (PEM; the private one readable by its owner only); returns
    its key id. Refuses to replace an existing private key unless `overwrite`."""
    if private_path.exists() and not overwrite:
        raise SigningKeyError(f"{private_path} exists; refusing to replace a signing key")
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = private_path.with_name(private_path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = key.public_key()
    public_path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    os.replace(tmp, private_path)  # last: a half-written pair never looks complete
    return key_id(public)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(
            f"cannot read the signing key {path}: {exc.strerror or exc}"
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_keys(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    """The trusted keys by key id; SigningKeyError names the first file that is not one."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(
                f"cannot read the trusted key {path}: {exc.strerror or exc}"
            ) from None
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(f"{path} is not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningKeyError(f"{path} is a {type(key).__name__}, not an Ed25519 key")
        keys[key_id(key)] = key
    return keys


def sign(
    key: Ed25519PrivateKey,
    *,
    model: str,
    version: str,
    artifact_sha256: str,
    gate: str | None = None,
    approval: Approval | None = None,
) -> dict[str, str]:
    """The two version tags that record a signed promotion of `version`."""
    statement = Statement(
        model=model,
        version=version,
        artifact_sha256=artifact_sha256,
        gate=None if gate is None else gate[:1000],
        approval=None if approval is None else Approval(approval.by[:200], approval.reason[:1000]),
        signed_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        key_id=key_id(key.public_key()),
    )
    if not statement.has_basis:
        raise ValueError(f"v{version}: a promotion is signed for a gate pass or an approval")
    payload = statement.to_json()
    if len(payload) > MAX_TAG:
        raise ValueError(f"the signed statement is {len(payload)} characters; at most {MAX_TAG}")
    signature = base64.b64encode(key.sign(payload.encode())).decode()
    return {PAYLOAD_TAG: payload, SIGNATURE_TAG: signature}


def verify(
    tags: dict[str, str],
    trusted: dict[str, Ed25519PublicKey],
    *,
    model: str,
    version: str,
    artifact_sha256: str,
) -> Statement:
    """The verified statement of a version's tags, or ValueError saying why it is refused."""
    payload, signature = tags.get(PAYLOAD_TAG), tags.get(SIGNATURE_TAG)
    if not payload or not signature:
        raise ValueError("it carries no promotion signature (registered or aliased by hand?)")
    statement = Statement.from_json(payload)
    key = trusted.get(statement.key_id)
    if key is None:
        raise ValueError(f"it is signed by key {statement.key_id}, which is not trusted")
    try:
        key.verify(base64.b64decode(signature, validate=True), payload.encode())
    except (InvalidSignature, ValueError):
        raise ValueError(f"its signature does not verify against key {statement.key_id}") from None
    if statement.model != model or statement.version != version:
        raise ValueError(
            f"its signature is for {statement.model} v{statement.version}, not {model} v{version}"
        )
    if statement.artifact_sha256 != artifact_sha256:
        raise ValueError(
            f"its artifact (spec.json sha256 {artifact_sha256[:12]}...) is not the signed one "
            f"({statement.artifact_sha256[:12]}...)"
        )
    if not statement.has_basis:
        raise ValueError("its signed statement records neither a gate pass nor an approval")
    return statement
