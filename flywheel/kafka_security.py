"""Transport security of every Kafka client, built once from `KafkaSettings`.

Flywheel talks to Kafka through two libraries: confluent-kafka (librdkafka: the service's
event-log producer, the feedback workers' consumer) and kafka-python (the dead-letter
producer, promotion announcements, the model follower, the admin helpers in
flywheel.broker). Their option names differ (`security.protocol` against
`security_protocol`, `ssl.ca.location` against `ssl_cafile`, ...), so the mapping lives
here, in one place, tested per library: a client is built with `**kafka_python_options(k)`
or `{..., **confluent_options(k)}` and never reads a security setting itself.

With the default `PLAINTEXT` both functions return `{}`: a client is then built exactly as
before these settings existed.
"""

from __future__ import annotations

from typing import Any

from flywheel.settings import KafkaSettings

__all__ = ["confluent_options", "kafka_python_options"]


def kafka_python_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for kafka-python's KafkaProducer, KafkaConsumer, KafkaAdminClient.

    >>> kafka_python_options(KafkaSettings())
    {}
    >>> opts = kafka_python_options(KafkaSettings(
    ...     kafka_bootstrap="kafka:9093", kafka_security_protocol="SASL_SSL",
    ...     kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="fw",
    ...     kafka_sasl_password="s3cret"))
    >>> opts["security_protocol"], opts["sasl_mechanism"], opts["sasl_plain_password"]
    ('SASL_SSL', 'SCRAM-SHA-512', 's3cret')
    """
    protocol = kafka.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        assert kafka.kafka_sasl_password is not None  # the settings' validator
        options |= {
            "sasl_mechanism": kafka.kafka_sasl_mechanism,
            "sasl_plain_username": kafka.kafka_sasl_username,
            "sasl_plain_password": kafka.kafka_sasl_password.get_secret_value(),
        }
    for key, path in (
        ("ssl_cafile", kafka.kafka_ssl_cafile),
        ("ssl_certfile", kafka.kafka_ssl_certfile),
        ("ssl_keyfile", kafka.kafka_ssl_keyfile),
    ):
        if path is not None:
            options[key] = str(path)
    return options


def confluent_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Configuration entries for confluent-kafka's Producer and Consumer (librdkafka names).

    >>> confluent_options(KafkaSettings())
    {}
    >>> confluent_options(KafkaSettings(
    ...     kafka_bootstrap="kafka:9093", kafka_security_protocol="SASL_PLAINTEXT",
    ...     kafka_sasl_mechanism="PLAIN", kafka_sasl_username="fw",
    ...     kafka_sasl_password="s3cret"))["sasl.username"]
    'fw'
    """
    protocol = kafka.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security.protocol": protocol.lower()}
    if protocol.startswith("SASL_"):
        assert kafka.kafka_sasl_password is not None  # the settings' validator
        options |= {
            "sasl.mechanism": kafka.kafka_sasl_mechanism,
            "sasl.username": kafka.kafka_sasl_username,
            "sasl.password": kafka.kafka_sasl_password.get_secret_value(),
        }
    for key, path in (
        ("ssl.ca.location", kafka.kafka_ssl_cafile),
        ("ssl.certificate.location", kafka.kafka_ssl_certfile),
        ("ssl.key.location", kafka.kafka_ssl_keyfile),
    ):
        if path is not None:
            options[key] = str(path)
    return options
