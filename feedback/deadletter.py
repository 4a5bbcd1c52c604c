"""Publishing refused records to `flywheel.deadletter`, with the reason, before moving on."""

from __future__ import annotations

from collections.abc import Sequence

from flywheel.events import DeadLetter, utcnow
from flywheel.feedback.messages import Rejected


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", errors="backslashreplace")


class DeadLetterWriter:
    """acks=all, flushed before the consumer commits past the refused records."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)

    def publish(self, rejected: Sequence[Rejected], timeout_s: float = 30.0) -> None:
        """Raises if Kafka does not acknowledge: the batch is then retried, not skipped."""
        if not rejected:
            return
        futures = []
        for r in rejected:
            letter = DeadLetter(
                topic=r.topic,
                partition=r.partition,
                offset=r.offset,
                key=None if r.key is None else _text(r.key),
                value=_text(r.value),
                reason=r.reason,
                timestamp=utcnow(),
            )
            futures.append(self._producer.send(self.topic, key=r.key, value=letter.to_json()))
        self._producer.flush(timeout=timeout_s)
        for f in futures:
            f.get(timeout=0)

    def close(self) -> None:
        self._producer.close(timeout=5)
