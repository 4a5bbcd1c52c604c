"""Publishing refused records to `flywheel.deadletter`, with the reason, before moving on.

A dead letter is bounded whatever the record was: it carries the first `VALUE_CAP` bytes
of the value and `KEY_CAP` of the key, read as UTF-8 with each invalid byte replaced by
U+FFFD, the whole value's size and SHA-256, where the record is (topic, partition,
offset) and why it was refused. Before, it carried the whole record, escaped byte by byte
(`\\xff` then JSON-escaped: five bytes a byte), under kafka-python's 1 MB request limit:
a 300 KB non-UTF-8 record made a 1.5 MB letter, the producer refused it, the batch was
never committed, and every restart of `flywheel feedback` stopped on it again.

Why text and not base64: a reader (an operator with a console consumer) sees what the
record said, and a valid-but-refused record is readable as it was; the exact bytes are
still on the source topic at the letter's offset, and the SHA-256 identifies them.

The largest letter (`MAX_LETTER_BYTES`, ~112 KB): every kept byte of key and value a
control character that JSON writes as `\\u00XX` (6 bytes), a `MAX_REASON`-character
reason the same, the longest topic name Kafka allows, and the fixed fields. The producer's
limits are set for it: `max_request_size` 1 MiB (kafka-python's default, stated: nine
worst-case letters, and under a broker's default 1 MB `message.max.bytes`), and a
`batch_size` of 128 KiB so a letter of any size fits one batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from flywheel.events import DeadLetter, utcnow
from flywheel.feedback.messages import MAX_REASON, Rejected

__all__ = [
    "KEY_CAP",
    "MAX_LETTER_BYTES",
    "MAX_REQUEST_BYTES",
    "VALUE_CAP",
    "DeadLetterWriter",
    "dead_letter",
    "letter_key",
]

VALUE_CAP = 16 * 1024  # bytes of the value a letter keeps
KEY_CAP = 1024  # bytes of the key
MAX_TOPIC = 249  # Kafka's limit on a topic name (ASCII)
MAX_LETTER_BYTES = 6 * (VALUE_CAP + KEY_CAP + MAX_REASON) + MAX_TOPIC + 1024
MAX_REQUEST_BYTES = 1024 * 1024
BATCH_BYTES = 128 * 1024
assert MAX_LETTER_BYTES <= BATCH_BYTES < MAX_REQUEST_BYTES


def _text(raw: bytes, cap: int) -> str:
    return raw[:cap].decode("utf-8", errors="replace")


def letter_key(key: bytes | None) -> bytes | None:
    """The dead letter's own Kafka key: the record's, cut to `KEY_CAP` bytes."""
    return None if key is None else key[:KEY_CAP]


def dead_letter(r: Rejected) -> DeadLetter:
    """The bounded letter for a refused record (see the module docstring)."""
    value = r.value
    return DeadLetter(
        topic=r.topic[:MAX_TOPIC],
        partition=r.partition,
        offset=r.offset,
        key=None if r.key is None else _text(r.key, KEY_CAP),
        value="" if value is None else _text(value, VALUE_CAP),
        reason=r.reason[:MAX_REASON],
        timestamp=utcnow(),
        value_bytes=0 if value is None else len(value),
        value_sha256=None if value is None else hashlib.sha256(value).hexdigest(),
        truncated=value is not None and len(value) > VALUE_CAP,
    )


class DeadLetterWriter:
    """acks=all, flushed before the consumer commits past the refused records."""

    def __init__(self, bootstrap: str, topic: str, **config: Any) -> None:
        """`config`: more KafkaProducer arguments (flywheel.kafka_security's SASL / TLS)."""
        from kafka import KafkaProducer

        self.topic = topic
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=5,
            max_request_size=MAX_REQUEST_BYTES,
            batch_size=BATCH_BYTES,
            **config,
        )

    def publish(self, rejected: Sequence[Rejected], timeout_s: float = 30.0) -> None:
        """Raises if Kafka does not acknowledge: the batch is then retried, not skipped."""
        if not rejected:
            return
        futures = [
            self._producer.send(self.topic, key=letter_key(r.key), value=dead_letter(r).to_json())
            for r in rejected
        ]
        self._producer.flush(timeout=timeout_s)
        for f in futures:
            f.get(timeout=0)

    def close(self) -> None:
        self._producer.close(timeout=5)
