"""`KafkaCorrections`: corrections produced straight to the corrections topic.

For an app that already runs next to Kafka and would rather not call the service: the
records are exactly what the service's `POST /v1/corrections` writes -- a
`flywheel.events.CorrectionEvent` (schema version 1) keyed by the prediction id, so a
correction lands on its prediction's partition (kafka-python's partitioner is Java's, as
is the service's) -- and the event id is `flywheel.events.correction_id`, the same hash the
service uses, so sending one correction both ways, or twice, stores it once.

What the HTTP route checks and this path cannot: that the label is one the served model
knows (the feedback worker stores an unknown label, and the learner cannot use it).

Who the source is: with `api_key` and `app` (from `flywheel apps create`), every record is
signed -- headers `flywheel-key-id` and `flywheel-signature` (`v1=` + HMAC-SHA256 of the
value under a secret derived from the key: `flywheel.appkeys`) -- and its source is the
app, or a sub-source in its namespace (`eu` -> `app/eu`), exactly as the service writes
them. A feedback worker with FLYWHEEL_AUTH=on dead-letters unsigned or badly signed
corrections. kafka-python is imported only when a `KafkaCorrections` is made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flywheel.client.errors import FlywheelError, InvalidInput, Unavailable
from flywheel.client.inputs import as_corrections

DEFAULT_TOPIC = "flywheel.corrections"


class KafkaCorrections:
    """A producer of correction events; `send` returns once Kafka acknowledged them all.

    `bootstrap` is the cluster's bootstrap address(es); `producer_config` goes to
    kafka-python's `KafkaProducer` (security_protocol, sasl_mechanism, ssl_cafile, ...).
    Acknowledgement is acks=all with the producer's idempotence, within `timeout_s`.

    >>> KafkaCorrections.encode([("p-1", "dog", "app-7")])[0][0]
    b'p-1'
    """

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        topic: str = DEFAULT_TOPIC,
        *,
        timeout_s: float = 30.0,
        api_key: str | None = None,
        app: str | None = None,
        **producer_config: Any,
    ) -> None:
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"topic must be a non-empty string; got {topic!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be seconds (> 0); got {timeout_s!r}")
        try:
            from kafka import KafkaProducer
            from kafka.errors import KafkaError
        except ImportError as exc:  # pragma: no cover - kafka-python ships with flywheel
            raise FlywheelError(f"KafkaCorrections needs kafka-python ({exc})") from exc
        self.topic, self.timeout_s = topic, float(timeout_s)
        self._signer = _signer(api_key, app)
        ms = int(self.timeout_s * 1000)
        config = {
            "bootstrap_servers": bootstrap,
            "acks": "all",
            "linger_ms": 5,
            "request_timeout_ms": ms,
            "delivery_timeout_ms": ms + 5,  # at least linger + request timeout
            "max_block_ms": ms,
            "bootstrap_timeout_ms": ms,
            **producer_config,
        }
        try:
            self._producer = KafkaProducer(**config)
        except KafkaError as exc:
            raise Unavailable(f"Kafka at {bootstrap}: {type(exc).__name__}: {exc}") from exc

    def __enter__(self) -> KafkaCorrections:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._producer.close(timeout=self.timeout_s)

    @staticmethod
    def encode(corrections: Any, app: str | None = None) -> list[tuple[bytes, bytes]]:
        """(key, value) records for the corrections, all checked before any is sent;
        with `app`, each source is the app or a sub-source of it (`source_for`)."""
        from pydantic import ValidationError

        from flywheel.appkeys import source_for
        from flywheel.events import CorrectionEvent, correction_id, utcnow

        now, records = utcnow(), []
        for i, c in enumerate(as_corrections(corrections)):
            try:
                source = c.source if app is None else source_for(app, c.source)
                event = CorrectionEvent(
                    id=correction_id(c.prediction_id, c.label, source),
                    prediction_id=c.prediction_id,
                    label=c.label,
                    source=source,
                    timestamp=now,
                )
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ()))
                raise InvalidInput(f"corrections[{i}].{where}: {first.get('msg')}") from None
            except ValueError as exc:  # a source outside the app's namespace
                raise InvalidInput(f"corrections[{i}].source: {exc}") from None
            records.append((c.prediction_id.encode(), event.to_json()))
        return records

    def send(self, corrections: Any) -> int:
        """Produce the corrections and wait for Kafka's acknowledgements; returns how many.

        All are checked before any is sent. If Kafka does not acknowledge every record in
        `timeout_s`, raises `Unavailable` (with `accepted`, those it did acknowledge); send
        them all again: a resent correction is the same event and is stored once.
        """
        from kafka.errors import KafkaError

        signer = self._signer
        records = self.encode(corrections, None if signer is None else signer[0])
        futures, failure = [], None
        for key, value in records:
            headers = None if signer is None else signer[1](value)
            try:
                futures.append(
                    self._producer.send(self.topic, key=key, value=value, headers=headers)
                )
            except KafkaError as exc:  # no metadata for the topic in time, a full buffer
                failure = exc
                break
        try:
            self._producer.flush(timeout=self.timeout_s)
        except KafkaError as exc:
            failure = failure or exc
        acknowledged = 0
        for future in futures:
            try:
                future.get(timeout=0)
                acknowledged += 1
            except KafkaError as exc:
                failure = failure or exc
        if failure is not None:
            raise Unavailable(
                f"Kafka acknowledged {acknowledged} of {len(records)} corrections on "
                f"{self.topic}: {type(failure).__name__}: {failure}",
                accepted=acknowledged,
            )
        return acknowledged

    send_corrections = send


def _signer(
    api_key: str | None, app: str | None
) -> tuple[str, Callable[[bytes], list[tuple[str, bytes]]]] | None:
    """(app, the headers of a value) for a key and its app; None without a key."""
    from flywheel.appkeys import (
        KEY_ID_HEADER,
        SIGNATURE_HEADER,
        check_app_name,
        parse_key,
        sign,
        signing_key,
    )

    if api_key is None and app is None:
        return None
    if api_key is None or app is None:
        raise ValueError("pass both api_key and app (from `flywheel apps create`), or neither")
    try:
        key_id, _ = parse_key(api_key)
        check_app_name(app)
    except ValueError as exc:
        raise ValueError(f"KafkaCorrections: {exc}") from None
    secret, kid = signing_key(api_key), key_id.encode()

    def headers(value: bytes) -> list[tuple[str, bytes]]:
        return [(KEY_ID_HEADER, kid), (SIGNATURE_HEADER, sign(value, secret).encode())]

    return app, headers
