"""Moving the `champion` alias (and the live roles: shadow, canary, guard) and telling
the services about it.

The alias move is the source of truth; the event on `flywheel.model-events` only makes
followers react at once. If the event cannot be sent, services still find the change
by polling the registry, so a failed send is logged, not raised.
"""

from __future__ import annotations

import getpass
import logging
from typing import Literal

from flywheel.events import ModelEvent, utcnow
from flywheel.kafka_security import kafka_python_options
from flywheel.registry import ModelVersion, Registry, RegistryError
from flywheel.settings import GUARD_ALIAS, KafkaSettings

log = logging.getLogger(__name__)


def default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers)
        return "unknown"


def _announced(
    kafka: KafkaSettings,
    registry: Registry,
    *,
    kind: Literal["promoted", "rolled_back", "role_changed"],
    version: ModelVersion | str,
    previous: ModelVersion | None,
    reason: str,
    actor: str,
    notify: bool,
    role: str | None = None,
) -> ModelEvent:
    """The model event of one registry move, announced unless the caller will (`notify`)."""
    event = ModelEvent(
        kind=kind,
        model_name=registry.name,
        version=version,
        previous_version=previous,
        reason=reason,
        actor=actor,
        timestamp=utcnow(),
        role=role,
    )
    if notify:
        announce(kafka, event)
    return event


def promote(
    kafka: KafkaSettings,
    version: ModelVersion,
    *,
    reason: str,
    registry: Registry,
    actor: str | None = None,
    notify: bool = True,
    gate: str | None = None,
    guard: bool = False,
) -> ModelEvent:
    """Make `version` the champion and announce it on `kafka`'s model-events topic.

    The promotion is signed (flywheel.signing): on `gate`, the passed gate result the
    caller computed itself (the learner, the federated server), or else as `actor`'s
    approval for `reason` (a reviewer, `flywheel models promote`).

    `guard=True` (the learner and the live judge pass FLYWHEEL_LIVE_GUARD): the champion
    this replaces becomes the `guard` (issue 28), scored beside the new one on live
    traffic so that the live judge (learner/live.py) rolls back a new champion worse than
    it. A guard that cannot be set (no signing key for it, a registry error) is logged,
    not raised: the promotion itself has happened.

    `notify=False` leaves the announcement to the caller, who then learns from
    `announce`'s result whether services were told (the CLI reports it). `registry` is the
    process's one `Registry` (built where the process starts, not per call).
    """
    actor = actor or default_actor()
    previous = registry.promote(version, reason=reason, actor=actor, gate=gate)
    event = _announced(
        kafka, registry, kind="promoted", version=version, previous=previous,
        reason=reason, actor=actor, notify=notify,
    )  # fmt: skip
    log.info("promoted %s v%s (was v%s): %s", registry.name, version, previous, reason)
    if guard and previous is not None and previous != version:
        _set_guard(kafka, registry, previous, version, actor=actor, notify=notify)
    return event


def _set_guard(
    kafka: KafkaSettings,
    registry: Registry,
    previous: ModelVersion,
    version: ModelVersion,
    *,
    actor: str,
    notify: bool,
) -> None:
    reason = f"replaced as champion by v{version}: guards it on live traffic"
    try:
        set_role(
            kafka, previous, GUARD_ALIAS, reason=reason, registry=registry, actor=actor,
            notify=notify,
        )  # fmt: skip
    except Exception as exc:  # the promotion stands; the new champion goes unguarded
        log.warning("v%s could not become the guard of v%s: %s", previous, version, exc)


def rollback(
    kafka: KafkaSettings,
    *,
    reason: str,
    registry: Registry,
    actor: str | None = None,
    notify: bool = True,
) -> ModelEvent:
    """Move the champion back to the previous one and announce it (see `promote`)."""
    actor = actor or default_actor()
    current, target = registry.rollback(reason=reason, actor=actor)
    event = _announced(
        kafka, registry, kind="rolled_back", version=target, previous=current,
        reason=reason, actor=actor, notify=notify,
    )  # fmt: skip
    log.info("rolled %s back from v%s to v%s: %s", registry.name, current, target, reason)
    return event


def set_role(
    kafka: KafkaSettings,
    version: ModelVersion,
    role: str,
    *,
    reason: str,
    registry: Registry,
    actor: str | None = None,
    notify: bool = True,
    gate: str | None = None,
) -> ModelEvent:
    """Make `version` the `role` (`shadow`, `canary` or `guard`) and announce it
    (`ModelEvent(kind="role_changed", role=role)`), signed as `promote` signs.

    Refused (`RegistryError`): an unknown version or role, and the champion itself (it
    would only be compared with itself). `previous_version` is who held the role."""
    actor = actor or default_actor()
    champion = registry.champion_version()
    if champion is not None and version == champion:
        raise RegistryError(
            f"{registry.name} v{version} is the champion; it cannot also be the {role} "
            "(a live role is compared with the champion)"
        )
    previous = registry.set_role(version, role, reason=reason, actor=actor, gate=gate)
    event = _announced(
        kafka, registry, kind="role_changed", version=version, previous=previous,
        reason=reason, actor=actor, notify=notify, role=role,
    )  # fmt: skip
    log.info("%s v%s is the %s (was v%s): %s", registry.name, version, role, previous, reason)
    return event


def clear_role(
    kafka: KafkaSettings,
    role: str,
    *,
    reason: str,
    registry: Registry,
    actor: str | None = None,
    notify: bool = True,
) -> ModelEvent | None:
    """Nobody holds `role` any more; announce it (`version` "none", `previous_version` who
    held it). None, and nothing announced, when nobody held it."""
    actor = actor or default_actor()
    previous = registry.clear_role(role, reason=reason, actor=actor)
    if previous is None:
        return None
    event = _announced(
        kafka, registry, kind="role_changed", version="none", previous=previous,
        reason=reason, actor=actor, notify=notify, role=role,
    )  # fmt: skip
    log.info("%s v%s is no longer the %s: %s", registry.name, previous, role, reason)
    return event


def announce(kafka: KafkaSettings, event: ModelEvent, timeout_s: float | None = None) -> bool:
    """Send `event` to the model-events topic; False (and a warning) if it could not.
    Waits up to `timeout_s`, by default the delivery timeout (FLYWHEEL_KAFKA_TIMEOUT_S)."""
    timeout_s = kafka.kafka_timeout_s if timeout_s is None else timeout_s
    if not kafka.kafka_bootstrap:
        log.warning("no Kafka configured: services will see v%s by polling", event.version)
        return False
    from kafka import KafkaProducer

    try:
        # bootstrap_timeout_ms too: its 30 s default would hold up a CLI promotion
        producer = KafkaProducer(
            bootstrap_servers=kafka.kafka_bootstrap,
            acks="all",
            request_timeout_ms=int(timeout_s * 1000),
            bootstrap_timeout_ms=int(timeout_s * 1000),
            max_block_ms=int(timeout_s * 1000),
            **kafka_python_options(kafka),
        )
        try:
            producer.send(
                kafka.topic_model_events, key=event.model_name.encode(), value=event.to_json()
            ).get(timeout=timeout_s)
        finally:
            producer.close(timeout=timeout_s)
    except Exception as exc:  # the registry already changed; polling covers a lost event
        log.warning(
            "could not announce v%s on %s (%s); services will see it by polling",
            event.version,
            kafka.topic_model_events,
            exc,
        )
        return False
    return True
