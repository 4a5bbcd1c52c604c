"""Which app signed a correction on Kafka, when FLYWHEEL_AUTH is on.

Anyone who may write to the corrections topic could otherwise name any source, so each
correction must carry `flywheel-key-id` and `flywheel-signature` (`flywheel.appkeys`:
`v1=` + HMAC-SHA256 of the record value under the key's signing secret). The service signs
what `POST /v1/corrections` writes; `flywheel.client.KafkaCorrections` signs what an app
produces itself. A record without them, with a wrong signature, from an unknown, expired
or revoked key, or naming a source outside its app's namespace (`shop`, `shop/...`) is
dead-lettered with the reason. Keys come from `flywheel.store.KeyBook` (cached: a check
costs one HMAC, ~2 us, and a store read per key per FLYWHEEL_AUTH_CACHE_TTL_S).
"""

from __future__ import annotations

from collections.abc import Sequence

from flywheel.appkeys import KEY_ID_HEADER, SIGNATURE_HEADER, app_of, verify
from flywheel.store import KeyBook, KeyRefused

__all__ = ["outside_namespace", "signer_of"]


def _header(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> str | None:
    for n, v in headers or ():
        if n == name and v is not None:
            return v.decode("ascii", errors="replace")
    return None


def signer_of(
    keys: KeyBook, headers: Sequence[tuple[str, bytes | None]] | None, value: bytes | None
) -> str:
    """The name of the app whose key signed `value`; `KeyRefused` with the reason if none
    did."""
    key_id = _header(headers, KEY_ID_HEADER)
    signature = _header(headers, SIGNATURE_HEADER)
    if key_id is None or signature is None:
        raise KeyRefused(
            f"unsigned correction: FLYWHEEL_AUTH is on and the record lacks the "
            f"{KEY_ID_HEADER} and {SIGNATURE_HEADER} headers"
        )
    record = keys.signing(key_id)
    if value is None or not verify(value, record.signing_key, signature):
        raise KeyRefused(f"bad signature for key {key_id} of app {record.app!r}")
    return record.app


def outside_namespace(app: str, source: str | None) -> str | None:
    """Why a signed correction's source is not its app's to use, or None."""
    if source is not None and app_of(source) == app:
        return None
    return f"source {source!r} is not in the namespace of app {app!r}, which signed it"
