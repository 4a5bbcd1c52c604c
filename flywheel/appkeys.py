"""App keys: their format, hash and scopes, the signature of Kafka corrections, and the
namespace of a correction's source. A contract: the service, the feedback worker, the
store and the client all agree on it, and it imports none of them.

A key is `fw_<id>_<secret>`: `id` (16 hex characters) names the key's row in the store,
so a check is one lookup by primary key, and `secret` is 32 random bytes (256 bits,
URL-safe base64). The store keeps only `key_hash(key)`, a SHA-256: a slow password hash
(bcrypt, scrypt) exists to make guessing a *low-entropy* secret expensive, and nobody
guesses 2^256; a fast hash costs ~1 us a request where bcrypt costs ~50-250 ms. Hashes
are compared with `hmac.compare_digest` (constant time).

Corrections produced straight to Kafka carry two headers (`SIGNATURE_HEADERS`):
`flywheel-key-id` (the key's id) and `flywheel-signature` (`v1=` + hex HMAC-SHA256 of
the record value under `signing_key(key)`). The signing key is derived from the app key
with HMAC, so the store, which must hold it to verify, never holds the key itself.

>>> key_id, key = new_key()
>>> parse_key(key)[0] == key_id and key.startswith("fw_")
True
>>> value = b'{"x": 1}'
>>> verify(value, signing_key(key), sign(value, signing_key(key)))
True
>>> source_for("shop", "eu"), source_for("shop", "shop/eu"), source_for("shop", None)
('shop/eu', 'shop/eu', 'shop')
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

__all__ = [
    "ADMIN_SCOPES",
    "APP_NAME_PATTERN",
    "KEY_ID_HEADER",
    "KEY_PREFIX",
    "MAX_SOURCE",
    "SCOPES",
    "SIGNATURE_HEADER",
    "SIGNATURE_HEADERS",
    "ForeignSource",
    "InvalidKey",
    "app_of",
    "check_app_name",
    "check_scopes",
    "key_hash",
    "new_key",
    "parse_key",
    "sign",
    "signing_key",
    "source_for",
    "verify",
]

KEY_PREFIX = "fw_"
ID_HEX = 16  # 64-bit ids: a row lookup, not a secret
SECRET_BYTES = 32
SCOPES = ("predict", "correct", "review", "admin")
ADMIN_SCOPES = frozenset({"review", "admin"})  # either one allows the review actions
APP_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,31}$"
MAX_SOURCE = 64  # flywheel.events.SourceName, the store's column
KEY_ID_HEADER = "flywheel-key-id"
SIGNATURE_HEADER = "flywheel-signature"
SIGNATURE_HEADERS = (KEY_ID_HEADER, SIGNATURE_HEADER)
_SIGNING_CONTEXT = b"flywheel-correction-signing-v1"
_KEY = re.compile(rf"^{KEY_PREFIX}([0-9a-f]{{{ID_HEX}}})_([A-Za-z0-9_-]{{43}})$")
_APP = re.compile(APP_NAME_PATTERN)


class InvalidKey(ValueError):
    """A string that is not an app key (`fw_<16 hex>_<43 characters>`)."""


class ForeignSource(ValueError):
    """A correction's source that names another app's namespace."""


def new_key() -> tuple[str, str]:
    """(key id, key): a fresh key; only its hash is ever stored."""
    key_id = secrets.token_hex(ID_HEX // 2)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode()
    return key_id, f"{KEY_PREFIX}{key_id}_{secret}"


def parse_key(text: str) -> tuple[str, str]:
    """(key id, secret) of a key; `InvalidKey` for anything else.

    >>> parse_key("fw_0123456789abcdef_" + "a" * 43)[0]
    '0123456789abcdef'
    """
    m = _KEY.match(text)
    if m is None:
        raise InvalidKey("not a Flywheel app key (expected fw_<id>_<secret>)")
    return m.group(1), m.group(2)


def key_hash(key: str) -> str:
    """The stored form of a key: hex SHA-256 (fast on purpose: see the module's doc)."""
    return hashlib.sha256(key.encode()).hexdigest()


def signing_key(key: str) -> str:
    """The app's per-key signing secret for Kafka corrections (hex), derived from the key."""
    return hmac.new(key.encode(), _SIGNING_CONTEXT, hashlib.sha256).hexdigest()


def sign(value: bytes, signing: str) -> str:
    """The `flywheel-signature` header of a record value: `v1=<hex HMAC-SHA256>`."""
    return "v1=" + hmac.new(bytes.fromhex(signing), value, hashlib.sha256).hexdigest()


def verify(value: bytes, signing: str, signature: str) -> bool:
    """Whether `signature` is `sign(value, signing)`; constant time."""
    return hmac.compare_digest(sign(value, signing).encode(), signature.encode())


def check_app_name(name: str) -> str:
    """An app's name: lower-case letters, digits, `_ . -`, at most 32 characters, no `/`
    (the `/` separates an app from its sub-sources)."""
    if not _APP.match(name):
        raise ValueError(
            f"app name {name!r}: use 1-32 lower-case letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_scopes(scopes: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Scopes from `predict,correct` (or a list), checked and in `SCOPES` order."""
    given = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    names = {s.strip() for s in given if s.strip()}
    unknown = sorted(names - set(SCOPES))
    if unknown or not names:
        raise ValueError(f"scopes {sorted(names) or '[]'}: choose from {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in names)


def app_of(source: str | None) -> str | None:
    """The app a source counts against: the part before the first `/`.

    Per-source limits (counterexample budget, privacy budget) use this unit, so sub-sources
    an app invents share its limits.

    >>> app_of("shop/eu"), app_of("shop"), app_of(None)
    ('shop', 'shop', None)
    """
    if source is None:
        return None
    return source.split("/", 1)[0]


def source_for(app: str, given: str | None) -> str:
    """The source a correction from `app` is stored under: the app, or a sub-source in its
    namespace (`eu` -> `app/eu`; `app/eu` stays). A source naming another app's namespace
    (`other/eu`) raises `ForeignSource`: refused rather than rewritten, so the caller
    learns at once that it sent something it may not."""
    if given is None or given == app:
        return app
    head, sep, rest = given.partition("/")
    if not sep:
        return _short(f"{app}/{given}")
    if head != app:
        raise ForeignSource(
            f"source {given!r} is in the namespace of app {head!r}; app {app!r} may send "
            f"{app!r} or {app + '/<sub-source>'!r} only"
        )
    if not rest or "/" in rest:
        raise ForeignSource(f"source {given!r}: expected {app}/<sub-source>")
    return _short(given)


def _short(source: str) -> str:
    if len(source) > MAX_SOURCE:
        raise ValueError(f"source {source!r} is longer than {MAX_SOURCE} characters")
    return source
