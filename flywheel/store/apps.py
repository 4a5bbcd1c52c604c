"""App identities and their keys (`flywheel apps`), and the cached check of a key.

The rows: `apps` (name, scopes, revoked) and `app_keys` (one per key: its SHA-256, the
signing secret derived from it, creation, expiry, last use). Keys and hashes follow
`flywheel.appkeys`; a key is shown once, when it is made, and never stored.

`KeyBook` is what the service and the feedback worker check keys with: a key's row is read
once and then kept in memory for `ttl_s` seconds (FLYWHEEL_AUTH_CACHE_TTL_S, 30 s by
default), and a key already verified within it is one dict lookup (`verified`: 0.75 us a
check, against 11 us to parse and hash it again), not a database round trip; a revocation,
a rotation's end of grace or an expiry takes effect within `ttl_s` (expiry is checked on
every request against the cached `expires_at`, so it is exact; a revocation is seen when
the row is next read). Last use is written at most once a minute per key, by a background
thread, off the request path."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from flywheel.appkeys import (
    SCOPES,
    check_app_name,
    check_scopes,
    key_hash,
    new_key,
    parse_key,
    signing_key,
)
from flywheel.store.database import session_factory
from flywheel.store.models import App, AppKey, utcnow

__all__ = [
    "DEFAULT_GRACE_S",
    "AppExists",
    "AppIdentity",
    "AppInfo",
    "KeyBook",
    "KeyInfo",
    "KeyRecord",
    "KeyRefused",
    "UnknownApp",
    "add_app",
    "find_key",
    "list_apps",
    "revoke_app",
    "rotate_key",
    "touch_keys",
]

log = logging.getLogger(__name__)
DEFAULT_GRACE_S = 24 * 3600.0  # how long a rotated-out key still works, by default
TOUCH_EVERY_S = 60.0  # last_used_at is written at most this often per key
FLUSH_EVERY_S = 5.0  # how often the background thread writes what is due
MAX_CACHED = 100_000  # rows (and unknown ids) kept; beyond it the cache starts over


class AppExists(ValueError):
    """`create` of a name that is taken (revoked apps keep their name: sources stay unique)."""


class UnknownApp(LookupError):
    """An app name the store does not have."""


class KeyRefused(Exception):
    """A key that is malformed, unknown, wrong, expired or revoked; `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AppIdentity:
    """Who a verified key belongs to, and what it may do."""

    name: str
    scopes: frozenset[str]
    key_id: str | None = None  # None: the bootstrap admin token
    signing_key: str | None = field(default=None, repr=False)  # signs its Kafka records


@dataclass(frozen=True)
class KeyRecord:
    """A key's row with its app's: all a check needs."""

    key_id: str
    app: str
    scopes: frozenset[str]
    key_hash: str
    signing_key: str
    expires_at: datetime | None
    revoked: bool

    def refusal(self, now: datetime) -> str | None:
        """Why the key cannot be used at `now`, or None."""
        if self.revoked:
            return f"app {self.app!r} was revoked"
        if self.expires_at is not None and now >= self.expires_at:
            when = f"{self.expires_at:%Y-%m-%d %H:%M:%S}"
            return f"key {self.key_id} of app {self.app!r} expired at {when} UTC"
        return None


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True)
class AppInfo:
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    keys: tuple[KeyInfo, ...]

    def as_json(self) -> dict:
        def iso(t: datetime | None) -> str | None:
            return None if t is None else t.isoformat()

        return {
            "name": self.name,
            "scopes": list(self.scopes),
            "created_at": iso(self.created_at),
            "revoked_at": iso(self.revoked_at),
            "keys": [
                {
                    "key_id": k.key_id,
                    "created_at": iso(k.created_at),
                    "expires_at": iso(k.expires_at),
                    "last_used_at": iso(k.last_used_at),
                }
                for k in self.keys
            ],
        }


def _add_key(session: Session, app: str, expires_in_s: float | None, now: datetime) -> str:
    key_id, key = new_key()
    expires = None if expires_in_s is None else now + timedelta(seconds=expires_in_s)
    session.add(
        AppKey(
            key_id=key_id,
            app=app,
            key_hash=key_hash(key),
            signing_key=signing_key(key),
            created_at=now,
            expires_at=expires,
        )
    )
    return key


def _positive(value: float | None, what: str) -> None:
    if value is not None and not (0 < value < 100 * 365 * 24 * 3600):
        raise ValueError(f"{what} must be a positive number of seconds, got {value}")


def add_app(
    session: Session,
    name: str,
    scopes: str | tuple[str, ...] | list[str],
    *,
    expires_in_s: float | None = None,
    now: datetime | None = None,
) -> str:
    """Add an app and its first key; returns the key (the only time it exists in clear).
    The caller commits."""
    check_app_name(name)
    checked = check_scopes(scopes)
    _positive(expires_in_s, "expires in")
    if session.get(App, name) is not None:
        raise AppExists(f"app {name!r} exists (use `flywheel apps rotate {name}` for a new key)")
    now = now or utcnow()
    session.add(App(name=name, scopes=",".join(checked), created_at=now))
    session.flush()
    return _add_key(session, name, expires_in_s, now)


def _live_app(session: Session, name: str) -> App:
    app = session.get(App, name)
    if app is None:
        raise UnknownApp(f"no app {name!r}")
    if app.revoked_at is not None:
        raise UnknownApp(f"app {name!r} was revoked; create a new app instead")
    return app


def rotate_key(
    session: Session,
    name: str,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    expires_in_s: float | None = None,
    now: datetime | None = None,
) -> str:
    """A new key for `name`; its older keys keep working for `grace_s` more seconds (never
    longer than they would have anyway; 0 ends them now). The caller commits."""
    if not 0 <= grace_s < 100 * 365 * 24 * 3600:
        raise ValueError(f"grace must be seconds >= 0, got {grace_s}")
    _positive(expires_in_s, "expires in")
    _live_app(session, name)
    now = now or utcnow()
    end = now + timedelta(seconds=grace_s)
    for key in session.scalars(select(AppKey).where(AppKey.app == name)):
        if key.expires_at is None or key.expires_at > end:
            key.expires_at = end
    return _add_key(session, name, expires_in_s, now)


def revoke_app(session: Session, name: str, *, now: datetime | None = None) -> None:
    """Refuse every key of `name` from now on (within the key cache's TTL). The caller
    commits."""
    _live_app(session, name).revoked_at = now or utcnow()


def list_apps(session: Session) -> list[AppInfo]:
    apps = session.scalars(select(App).order_by(App.name)).all()
    keys: dict[str, list[KeyInfo]] = {}
    for k in session.scalars(select(AppKey).order_by(AppKey.created_at, AppKey.key_id)):
        keys.setdefault(k.app, []).append(
            KeyInfo(k.key_id, k.created_at, k.expires_at, k.last_used_at)
        )
    return [
        AppInfo(
            a.name,
            tuple(s for s in a.scopes.split(",") if s),
            a.created_at,
            a.revoked_at,
            tuple(keys.get(a.name, ())),
        )
        for a in apps
    ]


def find_key(session: Session, key_id: str) -> KeyRecord | None:
    """The key's row with its app's, or None."""
    row = session.execute(
        select(AppKey, App).join(App, App.name == AppKey.app).where(AppKey.key_id == key_id)
    ).first()
    if row is None:
        return None
    key, app = row
    return KeyRecord(
        key_id=key.key_id,
        app=app.name,
        scopes=frozenset(s for s in app.scopes.split(",") if s in SCOPES),
        key_hash=key.key_hash,
        signing_key=key.signing_key,
        expires_at=key.expires_at,
        revoked=app.revoked_at is not None,
    )


def touch_keys(session: Session, used: dict[str, datetime]) -> None:
    """Set `last_used_at` of each key (the caller commits)."""
    for key_id, when in sorted(used.items()):
        session.execute(update(AppKey).where(AppKey.key_id == key_id).values(last_used_at=when))


class KeyBook:
    """Keys checked against the store, each row cached for `ttl_s` (see the module doc).

    `engine` is called for the store's engine (the service opens its store lazily; it
    raises, with the reason, while there is none). `start()` runs the thread that writes
    last use; `close()` writes what is left and stops it.
    """

    def __init__(
        self,
        engine: Callable[[], Engine],
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = utcnow,
        touch_every_s: float = TOUCH_EVERY_S,
    ) -> None:
        self._engine = engine
        self.ttl_s = ttl_s
        self._clock = clock
        self._now = now
        self._touch_every_s = touch_every_s
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        # key -> (when its row was read, who it is, expiry as a POSIX time): keys already
        # verified, so a repeat skips the parse and the hash (~1 us instead of ~10 us)
        self._verified: dict[str, tuple[float, AppIdentity, float | None]] = {}
        self._touched: dict[str, float] = {}  # key id -> clock of the last use queued
        self._due: dict[str, datetime] = {}  # last uses not written yet
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reads = 0  # store reads so far (what the cache saves)

    # -- the check ------------------------------------------------------------------------
    def fresh(self, key_id: str) -> bool:
        """Whether `key_id`'s row (or its absence) is cached and younger than `ttl_s`."""
        hit = self._cache.get(key_id)
        return hit is not None and self._clock() - hit[0] < self.ttl_s

    def record(self, key_id: str) -> KeyRecord | None:
        """The key's row: from the cache while fresh, else read from the store (blocking)."""
        hit = self._cache.get(key_id)
        if hit is not None and self._clock() - hit[0] < self.ttl_s:
            return hit[1]
        with session_factory(self._engine())() as session:
            found = find_key(session, key_id)
        self.reads += 1
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[key_id] = (self._clock(), found)
        return found

    def verified(self, key: str) -> AppIdentity | None:
        """Who `key` is, if it was verified less than `ttl_s` ago and has not expired since;
        else None (then `check` it). No store read, no hash: the request path's fast way."""
        hit = self._verified.get(key)
        if hit is None:
            return None
        t = self._clock()
        if t - hit[0] >= self.ttl_s or (hit[2] is not None and self._now().timestamp() >= hit[2]):
            return None
        self._used(hit[1].key_id, t)  # type: ignore[arg-type]
        return hit[1]

    def check(self, key: str) -> AppIdentity:
        """Who `key` belongs to; `KeyRefused` with the reason if it cannot be used."""
        fast = self.verified(key)
        if fast is not None:
            return fast
        try:
            key_id, _ = parse_key(key)
        except ValueError as exc:
            raise KeyRefused(str(exc)) from None
        found = self.record(key_id)
        if found is None or not hmac.compare_digest(found.key_hash, key_hash(key)):
            raise KeyRefused("unknown or wrong key")
        why = found.refusal(self._now())
        if why is not None:
            raise KeyRefused(why)
        identity = AppIdentity(found.app, found.scopes, key_id, found.signing_key)
        read_at = self._cache.get(key_id, (self._clock(), None))[0]  # TTL from the read
        expires = None if found.expires_at is None else found.expires_at.timestamp()
        if len(self._verified) >= MAX_CACHED:
            self._verified.clear()
        self._verified[key] = (read_at, identity, expires)
        self._used(key_id, self._clock())
        return identity

    def signing(self, key_id: str) -> KeyRecord:
        """The key whose signing secret a Kafka correction names; `KeyRefused` if it cannot
        sign now (unknown, expired, revoked)."""
        found = self.record(key_id)
        if found is None:
            raise KeyRefused(f"unknown key id {key_id!r}")
        why = found.refusal(self._now())
        if why is not None:
            raise KeyRefused(why)
        self._used(key_id, self._clock())
        return found

    # -- last use, off the request path ----------------------------------------------------
    def _used(self, key_id: str, t: float) -> None:
        last = self._touched.get(key_id)
        if last is not None and t - last < self._touch_every_s:
            return
        with self._lock:
            self._touched[key_id] = t
            self._due[key_id] = self._now()

    def flush(self) -> int:
        """Write the last uses that are due; returns how many keys were written."""
        with self._lock:
            due, self._due = self._due, {}
        if not due:
            return 0
        try:
            with session_factory(self._engine()).begin() as session:
                touch_keys(session, due)
        except Exception:
            with self._lock:  # kept for the next try, unless a newer use replaced it
                for key_id, when in due.items():
                    self._due.setdefault(key_id, when)
            raise
        return len(due)

    def start(self) -> KeyBook:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="key-last-use", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_EVERY_S):
            self._flush_logged()

    def _flush_logged(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # a store outage must not end the thread
            log.warning("writing keys' last use failed (retried): %s", exc)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        self._flush_logged()
