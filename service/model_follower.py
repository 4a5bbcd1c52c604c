"""Following the registry: the service swaps to whatever `champion` names, off the request path.

Two signals drive one worker thread. A kafka-python consumer on the model-events topic
wakes it as soon as a promotion or rollback is announced; a timer every
`registry_poll_s` covers a lost event or a broker outage. The worker always re-reads the
alias (the source of truth) instead of trusting an event's version, so duplicate or
out-of-order events and a poll racing an event collapse into one load. Loading and
warming happen on the worker; requests only ever see `ModelHolder.swap`, which is atomic,
and a request keeps the snapshot it took, so it finishes on the version it started with.
A failed load leaves the old model serving and is retried at the next poll.

A version whose promotion signature does not verify (`flywheel.service.trust`, when the
app hands the follower a `PromotionTrust`) is not swapped in either: it was aliased by
hand, or its artifact changed after signing. The follower keeps serving and the trust
check logs why, once per version, and counts it.

A version whose feature schema differs from the served one's (another fingerprint, or a
schema where there was none or the reverse) is not swapped in: clients send rows of the
served schema, and the new model would read them as something else (another vocabulary
maps the same category to another code). The follower logs why, once per version, and
keeps serving; a new lineage with a new schema is served by restarting the service.

The follower also holds the live roles (issue 28): the versions the `shadow`, `canary`
and `guard` aliases name (`Registry.roles()`, read in the same registry call as the
champion). Each is loaded, warmed and trust-checked exactly as the champion is, on the
same wake-ups, and must read the champion's rows (the same feature schema and input
width) or it is refused, logged once. A role whose alias is gone, or that names the
champion itself, is unloaded. Champion and roles are swapped in as one `ServedSet`
(`ModelHolder.swap_set`), so a request sees one consistent set. A registry without
`roles()` (a plain `ChampionSource`) is followed for its champion only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from flywheel.events import ModelEvent
from flywheel.retry import DependencyStatus
from flywheel.service.model_holder import ModelHolder, ServedModel, ServedSet
from flywheel.settings import (
    CHAMPION_ALIAS,
    LIVE_ROLES,
    KafkaSettings,
    RegistrySettings,
    ServiceSettings,
)

if TYPE_CHECKING:
    from flywheel.modelspec import AnySpec
    from flywheel.registry import LoadedVersion, ModelVersion
    from flywheel.service.trust import PromotionTrust

log = logging.getLogger(__name__)
CONSUMER_POLL_MS = 250  # also bounds how long stop() waits for the listener
CONSUMER_RETRY_S = 2.0  # topic missing or broker unreachable: try again after this


class ChampionSource(Protocol):
    """What the follower needs from the registry (`flywheel.registry.Registry` in production)."""

    def champion_version(self) -> ModelVersion | None: ...
    def load(self, version: ModelVersion) -> LoadedVersion: ...


@dataclass
class FollowerStats:
    """Plain counters: read by /metrics and by tests, written only by the follower's threads."""

    checks: int = 0
    swaps: int = 0
    failures: int = 0  # champion versions that could not be loaded or warmed
    registry_errors: int = 0  # the alias could not be read
    superseded: int = 0  # loaded, but the alias had moved on before the swap
    refused: int = 0  # champion versions not swapped in: their feature schema differs
    events_followed: int = 0
    events_ignored: int = 0  # another model's events
    events_malformed: int = 0
    last_swap_s: float = 0.0  # load + warm time of the last swap
    last_error: str | None = None
    roles_loaded: int = 0  # shadow, canary or guard versions loaded and swapped in
    roles_unloaded: int = 0  # roles dropped: alias gone, moved, or now the champion


class ModelFollower:
    """Keeps `holder` on the registry's champion; `start()` it, `stop()` it at shutdown."""

    def __init__(
        self,
        kafka: KafkaSettings,
        followed: RegistrySettings,
        service: ServiceSettings,
        holder: ModelHolder,
        *,
        registry: Callable[[], ChampionSource],
        listen: bool | None = None,
        status: DependencyStatus | None = None,
        trust: PromotionTrust | None = None,
    ) -> None:
        """Follows `followed`'s model (polled every `registry_poll_s`), listening on `kafka`'s
        model-events topic, and serves at `service`'s `serve_precision`.

        `registry` gives the champion source; it is first called on the worker thread, so
        opening the process's shared `Registry` (importing MLflow) never delays startup.
        `listen` consumes model events (default: when Kafka is configured). `status` hears
        whether the registry answered the last check ("registry"). `trust` checks each
        version's promotion signature before it is swapped in (the app always passes one)."""
        self.kafka = kafka
        self.followed = followed
        self.precision = service.serve_precision
        self.holder = holder
        self.stats = FollowerStats()
        self.status = status or DependencyStatus()
        self._registry_factory = registry
        self.trust = trust
        self._registry: ChampionSource | None = None
        self._refused: ModelVersion | None = None  # the version refused last (logged once)
        self._role_refused: dict[str, ModelVersion] = {}  # per role, as `_refused`
        self._listen = bool(kafka.kafka_bootstrap) if listen is None else listen
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._idle = threading.Condition()
        self._busy = False
        self._threads = [
            threading.Thread(target=self._work, name="flywheel-model-follower", daemon=True)
        ]
        if self._listen:
            self._threads.append(
                threading.Thread(target=self._consume, name="flywheel-model-events", daemon=True)
            )

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> ModelFollower:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop both threads; a load in progress finishes first (it cannot be interrupted)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))

    def trigger(self) -> None:
        """Check the alias now instead of at the next poll (an event arrived)."""
        self._wake.set()

    def wait_listening(self, timeout_s: float) -> bool:
        """True once the consumer sits at the topic's end: an event sent after this is seen."""
        return self._listening.wait(timeout_s)

    def wait_idle(self, timeout_s: float) -> bool:
        """True once no check is pending or running (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._busy or self._wake.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        return True

    # -- the worker: at most one load at a time ----------------------------------------------
    def _work(self) -> None:
        next_poll = time.monotonic()  # check once at start: a promotion during startup
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_poll - time.monotonic()))
            if self._stop.is_set():
                break
            with self._idle:
                self._busy = True
                self._wake.clear()
            try:
                self.check()
            except Exception:  # never let the thread die: the next poll tries again
                log.exception("model follower check failed")
            finally:
                with self._idle:
                    self._busy = False
                    self._idle.notify_all()
            next_poll = time.monotonic() + self.followed.registry_poll_s

    def check(self) -> ModelVersion | None:
        """Swap to the champion if it is not the served version, then bring the live roles
        in line with their aliases; returns the champion version swapped in.

        Called on the worker thread only, so two triggers can never load twice at once.
        """
        self.stats.checks += 1
        try:
            if self._registry is None:
                self._registry = self._registry_factory()
            registry = self._registry
            wanted = _wanted(registry)
        except Exception as exc:
            self.stats.registry_errors += 1
            self.stats.last_error = f"registry: {exc}"
            self.status.down("registry", exc)
            log.warning(
                "could not read the champion alias (%s); still serving %s",
                exc,
                self._served_version(),
            )
            return None
        self.status.up("registry")
        swapped = self._follow_champion(registry, wanted.get(CHAMPION_ALIAS))
        # no champion named: the registry did not really answer (`Registry.roles()` reads a
        # failed MLflow call as no aliases at all), so the roles held stay as they are
        if CHAMPION_ALIAS in wanted:
            self._follow_roles(registry, wanted)
        return swapped

    def _follow_champion(
        self, registry: ChampionSource, target: ModelVersion | None
    ) -> ModelVersion | None:
        served = self._served_version()
        if target is None or target == served or target == self._refused:
            return None
        start = time.perf_counter()
        fetched = self._fetch(registry, target, "", f"still serving v{served}")
        if fetched is None:
            return None
        loaded, model = fetched
        untrusted = self.trust.refusal(loaded) if self.trust is not None else None
        if untrusted is not None:  # logged and counted (once per version) by the check
            self.stats.refused += 1
            self._refused = target
            self.stats.last_error = f"v{target}: {untrusted}"
            return None
        if self._moved_since(registry, target):  # a quick rollback: never serve the undone
            self.stats.superseded += 1
            self._wake.set()
            return None
        why = _schema_change(self.holder.current() if self.holder.ready else None, model)
        if why is not None:
            self.stats.refused += 1
            self._refused = target
            self.stats.last_error = f"v{target}: {why}"
            log.error(
                "not serving %s v%s: %s; still serving v%s (restart the service to serve "
                "a new schema)",
                model.name,
                target,
                why,
                served,
            )
            return None
        previous = self.holder.swap(model)
        self.stats.swaps += 1
        self.stats.last_swap_s = time.perf_counter() - start
        _warn_if_incompatible(previous, model)
        log.info(
            "swapped %s v%s -> v%s (load + warm %.0f ms)",
            model.name,
            served,
            model.version,
            self.stats.last_swap_s * 1000,
        )
        return loaded.version

    # -- the live roles: shadow, canary, guard ------------------------------------------------
    def _follow_roles(self, registry: ChampionSource, wanted: dict[str, ModelVersion]) -> None:
        """Load each role the aliases name that is not held yet, drop the ones no alias
        names any more, and swap the result in as one set (only if anything changed)."""
        if not self.holder.ready:
            return
        current = self.holder.served_set()
        champion = current.champion
        held = current.roles()
        roles: dict[str, ServedModel] = {}
        changed = False
        for role in LIVE_ROLES:
            target, had = wanted.get(role), held.get(role)
            if had is not None and had.version == target:
                roles[role] = had
                continue
            model = None
            if target is not None and target != champion.version:
                if target != self._role_refused.get(role):
                    model = self._load_role(registry, role, target, champion)
                elif had is None:
                    continue  # refused before and logged: nothing to do
            if model is not None:
                roles[role] = model
                changed = True
                self.stats.roles_loaded += 1
            if had is not None:
                changed = True
                if model is None:
                    self.stats.roles_unloaded += 1
                    log.info("%s v%s is no longer the %s: unloaded", had.name, had.version, role)
        if changed:
            self.holder.swap_set(ServedSet(champion, **roles))

    def _fetch(
        self, registry: ChampionSource, target: ModelVersion, prefix: str, context: str
    ) -> tuple[LoadedVersion, ServedModel] | None:
        """`target` downloaded, built and warmed; None after a failure, counted, kept as
        `last_error` (`prefix` before it: the role, if any) and logged with `context`
        (what the service does meanwhile); the next poll tries again."""
        try:
            loaded = registry.load(target)
            model = ServedModel.prepare(
                loaded.name, loaded.version, loaded.spec, loaded.module, self.precision
            )
        except Exception as exc:
            self.stats.failures += 1
            self.stats.last_error = f"{prefix}v{target}: {exc}"
            log.exception(
                "could not load %s v%s (%s); retrying at the next poll (in %.0fs)",
                self.followed.model_name,
                target,
                context,
                self.followed.registry_poll_s,
            )
            return None
        return loaded, model

    def _load_role(
        self, registry: ChampionSource, role: str, target: ModelVersion, champion: ServedModel
    ) -> ServedModel | None:
        """`target` loaded, warmed and verified as the champion is, or None (logged)."""
        start = time.perf_counter()
        fetched = self._fetch(registry, target, f"{role} ", f"as the {role}")
        if fetched is None:
            return None
        loaded, model = fetched
        why = self.trust.refusal(loaded) if self.trust is not None else None
        if why is None:
            why = _schema_change(champion, model)
        if why is None and model.spec.input_dim != champion.spec.input_dim:
            why = f"it reads {model.spec.input_dim} inputs, the champion {champion.spec.input_dim}"
        if why is not None:
            self.stats.refused += 1
            self._role_refused[role] = target
            self.stats.last_error = f"{role} v{target}: {why}"
            log.error("not running %s v%s as the %s: %s", model.name, target, role, why)
            return None
        log.info(
            "running %s v%s as the %s beside champion v%s (load + warm %.0f ms)",
            model.name,
            target,
            role,
            champion.version,
            (time.perf_counter() - start) * 1000,
        )
        return model

    @staticmethod
    def _moved_since(registry: ChampionSource, version: ModelVersion) -> bool:
        try:
            now = registry.champion_version()
        except Exception:  # cannot tell: the version was the champion a moment ago
            return False
        return now is not None and now != version

    def _served_version(self) -> str | None:
        return self.holder.current().version if self.holder.ready else None

    # -- the listener: wakes the worker, never loads anything itself -------------------------
    def _consume(self) -> None:
        consumer: Any = None
        try:
            while not self._stop.is_set():
                try:
                    if consumer is None:
                        consumer = self._open_consumer()
                        if consumer is None:
                            self._stop.wait(CONSUMER_RETRY_S)
                            continue
                        self._listening.set()
                        self.trigger()  # anything announced before we were at the end
                    for batch in consumer.poll(timeout_ms=CONSUMER_POLL_MS).values():
                        for record in batch:
                            self.on_event(record.value)
                except Exception as exc:
                    log.warning(
                        "model events on %s unavailable (%s); polling the registry "
                        "every %.0fs meanwhile",
                        self.kafka.topic_model_events,
                        exc,
                        self.followed.registry_poll_s,
                    )
                    self._listening.clear()
                    _close(consumer)
                    consumer = None
                    self._stop.wait(CONSUMER_RETRY_S)
        finally:
            self._listening.clear()
            _close(consumer)

    def _open_consumer(self) -> Any:
        """A group-less consumer at the end of every partition, or None if the topic is missing.

        Old events are not replayed: the worker's first check already read the alias.
        """
        from kafka import KafkaConsumer, TopicPartition

        from flywheel.kafka_security import kafka_python_options

        topic = self.kafka.topic_model_events
        consumer = KafkaConsumer(
            bootstrap_servers=self.kafka.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
            client_id="flywheel-model-follower",
            **kafka_python_options(self.kafka),
        )
        try:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                log.warning("topic %s not found; retrying in %.0fs", topic, CONSUMER_RETRY_S)
                consumer.close()
                return None
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            consumer.seek_to_end(*tps)
            for tp in tps:  # resolve the lazy seek now, so nothing after this point is skipped
                consumer.position(tp)
        except Exception:
            consumer.close()
            raise
        return consumer

    def on_event(self, value: bytes | None) -> None:
        """Handle one model-events record: wake the worker for this model, skip the rest."""
        try:
            event = ModelEvent.model_validate_json(value or b"")
        except ValueError as exc:
            self.stats.events_malformed += 1
            log.warning(
                "skipping a malformed record on %s: %s",
                self.kafka.topic_model_events,
                str(exc).splitlines()[0],
            )
            return
        if event.model_name != self.followed.model_name:
            self.stats.events_ignored += 1
            return
        self.stats.events_followed += 1
        log.info("model event: %s v%s (%s)", event.kind, event.version, event.reason or "-")
        self.trigger()


def _wanted(registry: ChampionSource) -> dict[str, ModelVersion]:
    """Role -> version as the registry names them now (`champion` included when held): one
    `roles()` call where the source has it, else its champion only."""
    roles = getattr(registry, "roles", None)
    if callable(roles):
        return dict(roles())
    champion = registry.champion_version()
    return {} if champion is None else {CHAMPION_ALIAS: champion}


def _close(consumer: Any) -> None:
    if consumer is not None:
        try:
            consumer.close()
        except Exception as exc:
            log.debug("closing the model-events consumer: %s", exc)


def _schema_name(spec: AnySpec) -> str:
    """A spec's feature schema as a log names it: its fingerprint, or that it has none."""
    return "none (a vector model)" if spec.schema is None else spec.schema.fingerprint()


def _schema_change(previous: ServedModel | None, new: ServedModel) -> str | None:
    """Why `new` may not replace `previous` (its feature schema differs), or None."""
    if previous is None or previous.spec.schema == new.spec.schema:
        return None
    return (
        f"its feature schema {_schema_name(new.spec)} differs from the served "
        f"{_schema_name(previous.spec)}"
    )


def _warn_if_incompatible(previous: ServedModel | None, new: ServedModel) -> None:
    """A new input width or label set changes what clients may send: say so loudly."""
    if previous is None:
        return
    if (previous.spec.input_dim, previous.spec.labels) != (new.spec.input_dim, new.spec.labels):
        log.warning(
            "v%s changes the API: input width %d -> %d, labels %s -> %s",
            new.version,
            previous.spec.input_dim,
            new.spec.input_dim,
            previous.spec.labels,
            new.spec.labels,
        )
