"""One validated source of configuration for every Flywheel process, grouped by component.

All settings come from `FLYWHEEL_*` environment variables (or an env file), so a
deployment configures every process the same way. Unknown `FLYWHEEL_*` variables are
an error: a typo must not silently fall back to a default.

Why groups: one flat class of ~90 fields handed to every component hides what a component
depends on, lets any component read any knob, and makes a unit test build the whole
configuration. So each component's settings are declared once, in a small group model
(`LearnerSettings`, `PrivacySettings`, `ServiceSettings`, ...), and each component takes
only its group(s): `flywheel.privacy` takes `PrivacySettings`, not `Settings`. A test builds
just that group (`LearnerSettings(learn_batch=10)`); a type checker refuses a whole
`Settings`, or the wrong group, where a group is expected. Only wiring (the CLI, the demo,
process start-up) holds the whole `Settings`, and hands each component its groups.

How it fits together: each group's fields, defaults, descriptions and validators live in a
field mixin (`_LearnerFields`); the group (`LearnerSettings`) and the flat `Settings` both
inherit it, so a default is written once and the flat variable names (`learn_batch` ->
`FLYWHEEL_LEARN_BATCH`) do not change. `Settings` is not a subclass of any group; it hands
out groups as properties (`settings.learner`, `settings.privacy`, ...), each built once
from the already validated flat values.

How to add a setting: declare it, with default and description, in the mixin of the group
whose component reads it (a new component gets a new mixin, group, property and `GROUPS`
entry, and the mixin joins `Settings`' bases); document `FLYWHEEL_<NAME>` in
docs/contracts.md (a test checks). A setting two components read goes in the group of the
one that owns the behaviour, and the other takes that group too; never declare it twice.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Self, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "FLYWHEEL_"
CHAMPION_ALIAS = "champion"
# the other versions a service may run beside the champion (issue 28), each an MLflow alias
SHADOW_ALIAS, CANARY_ALIAS, GUARD_ALIAS = "shadow", "canary", "guard"
LIVE_ROLES = (SHADOW_ALIAS, CANARY_ALIAS, GUARD_ALIAS)
TEN_YEARS_S = 10 * 365.25 * 24 * 3600.0  # beyond it, timestamps overflow datetime's range
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
# the password runs to the last "@" before the path: a raw "@" in it must not leak the rest
_CREDENTIALS = re.compile(r"(?P<head>://[^/\s:@]*:)[^\s/]*@")


def mask_credentials(text: str) -> str:
    """`scheme://user:secret@host` -> `scheme://user:***@host`, anywhere in `text`."""
    return _CREDENTIALS.sub(r"\g<head>***@", text)


MIN_ADMIN_TOKEN = 32
"""Characters of FLYWHEEL_ADMIN_TOKEN at least: 32 hex digits are 128 random bits (`openssl
rand -hex 16`), out of reach of guessing at any request rate; a short, memorable token
is neither (issue 26)."""


class SettingsError(ValueError):
    """Raised when configuration is invalid; the message names the variable."""


class _Fields(BaseModel):
    """Base of the field mixins: a copy forgets cached values derived from the fields.

    `model_copy(update=...)` copies `__dict__` as is, cached properties included; without
    this, `settings.model_copy(update={"kafka_bootstrap": b}).kafka` would be the old group.
    """

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        for klass in type(self).__mro__:
            for name, attr in vars(klass).items():
                if isinstance(attr, cached_property):
                    copied.__dict__.pop(name, None)
        return copied


# -- field mixins: every setting is declared once, in exactly one of these ------------------


class _StateFields(_Fields):
    """Where state lives: the home folder, and the two stores that default into it."""

    home: Path = Field(Path(".flywheel"), description="Folder for all local state.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in home.")
    mlflow_tracking_uri: str | None = Field(None, description="Default: SQLite in home.")
    mlflow_tracking_username: str | None = Field(
        None, description="Basic-auth user for an MLflow server (MLFLOW_TRACKING_USERNAME)."
    )
    mlflow_tracking_password: SecretStr | None = Field(
        None, description="Its password (MLFLOW_TRACKING_PASSWORD). Never printed."
    )
    mlflow_tracking_token: SecretStr | None = Field(
        None, description="Bearer token for an MLflow server (MLFLOW_TRACKING_TOKEN)."
    )
    mlflow_tracking_server_cert_path: Path | None = Field(
        None,
        description="CA bundle that signed an https MLflow server's certificate "
        "(MLFLOW_TRACKING_SERVER_CERT_PATH).",
    )

    @field_validator("database_url", "mlflow_tracking_uri")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        """Caught here, an unparseable URL is a one-line error before anything starts."""
        if value is None or value.strip() == "":
            return None
        try:
            _ = urlsplit(value).port  # raises on a bad port or an unclosed IPv6 bracket
        except ValueError as exc:
            raise ValueError(f"not a usable URL ({exc})") from None
        return value

    @field_validator("mlflow_tracking_server_cert_path", mode="before")
    @classmethod
    def _unset_mlflow_tracking_server_cert_path(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("mlflow_tracking_server_cert_path")
    @classmethod
    def _check_mlflow_ca(cls, value: Path | None) -> Path | None:
        return _readable_file(value)

    @model_validator(mode="after")
    def _check_mlflow_credentials(self) -> Self:
        if (self.mlflow_tracking_username is None) != (self.mlflow_tracking_password is None):
            raise ValueError(
                "FLYWHEEL_MLFLOW_TRACKING_USERNAME and FLYWHEEL_MLFLOW_TRACKING_PASSWORD "
                "are set together or not at all"
            )
        if self.mlflow_tracking_username is not None and self.mlflow_tracking_token is not None:
            raise ValueError(
                "set FLYWHEEL_MLFLOW_TRACKING_USERNAME/PASSWORD or "
                "FLYWHEEL_MLFLOW_TRACKING_TOKEN, not both"
            )
        return self

    @cached_property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'flywheel.db'}"

    @property
    def resolved_mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return self.home_dir / "mlartifacts"

    @property
    def spool_path(self) -> Path:
        return self.home_dir / "spool" / "events.spool"


class _KafkaFields(_Fields):
    """The broker and the topics every component shares."""

    kafka_bootstrap: str | None = Field(
        None, description="host:port[,host:port]; unset starts an embedded broker."
    )
    topic_predictions: str = Field("flywheel.predictions", description="Every served prediction.")
    topic_corrections: str = Field("flywheel.corrections", description="True labels from apps.")
    topic_model_events: str = Field("flywheel.model-events", description="Promotions, rollbacks.")
    topic_deadletter: str = Field("flywheel.deadletter", description="Unusable messages + reason.")
    topic_scores: str = Field(
        "flywheel.scores", description="Scores of shadows, guards and paired champions."
    )
    topic_partitions: int = Field(3, ge=1, le=1024, description="For topics Flywheel creates.")
    kafka_timeout_s: float = Field(5.0, gt=0, description="Delivery timeout before spooling.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How every Kafka client talks to the brokers."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism; needed by the SASL_* protocols."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password.")
    kafka_ssl_cafile: Path | None = Field(
        None, description="CA bundle that signed the brokers' certificates (SSL, SASL_SSL)."
    )
    kafka_ssl_certfile: Path | None = Field(
        None, description="Client certificate (PEM) for brokers that require one."
    )
    kafka_ssl_keyfile: Path | None = Field(None, description="Its private key (PEM).")

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile", mode="before")
    @classmethod
    def _unset_kafka_ssl_cafile(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
    @classmethod
    def _check_kafka_files(cls, value: Path | None) -> Path | None:
        return _readable_file(value)

    @model_validator(mode="after")
    def _check_kafka_security(self) -> Self:
        """A half-configured security setting is refused here, not at the first connect."""
        protocol = self.kafka_security_protocol
        sasl = protocol.startswith("SASL_")
        if sasl:
            missing = [
                f"FLYWHEEL_KAFKA_{name.upper()}"
                for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                if getattr(self, f"kafka_{name}") is None
            ]
            if missing:
                raise ValueError(f"{protocol} needs {', '.join(missing)}")
        elif self.kafka_sasl_mechanism or self.kafka_sasl_username or self.kafka_sasl_password:
            raise ValueError(
                f"SASL settings are set but FLYWHEEL_KAFKA_SECURITY_PROTOCOL={protocol}"
            )
        tls = protocol in ("SSL", "SASL_SSL")
        files = (self.kafka_ssl_cafile, self.kafka_ssl_certfile, self.kafka_ssl_keyfile)
        if not tls and any(f is not None for f in files):
            raise ValueError(f"TLS files are set but FLYWHEEL_KAFKA_SECURITY_PROTOCOL={protocol}")
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError(
                "FLYWHEEL_KAFKA_SSL_CERTFILE and FLYWHEEL_KAFKA_SSL_KEYFILE are set together"
            )
        if protocol != "PLAINTEXT" and not self.kafka_bootstrap:
            raise ValueError(
                f"FLYWHEEL_KAFKA_SECURITY_PROTOCOL={protocol} needs FLYWHEEL_KAFKA_BOOTSTRAP: "
                "the embedded broker speaks PLAINTEXT on loopback only"
            )
        return self

    @field_validator("kafka_bootstrap")
    @classmethod
    def _check_bootstrap(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        for part in value.split(","):
            if not _is_host_port(part.strip()):
                raise ValueError(f"expected host:port[,host:port], got {value!r}")
        return value

    @field_validator(
        "topic_predictions",
        "topic_corrections",
        "topic_model_events",
        "topic_deadletter",
        "topic_scores",
    )
    @classmethod
    def _check_topic(cls, value: str) -> str:
        """Kafka's own rule for topic names, checked before any client is made."""
        if not _TOPIC.fullmatch(value) or value in (".", ".."):
            raise ValueError("a Kafka topic name is 1-249 of letters, digits, '.', '_', '-'")
        return value

    @model_validator(mode="after")
    def _check_topics_distinct(self) -> Self:
        topics = self.topics
        if len(set(topics)) != len(topics):
            raise ValueError(f"topic names must be distinct, got {topics}")
        return self

    @property
    def topics(self) -> list[str]:
        return [
            self.topic_predictions,
            self.topic_corrections,
            self.topic_model_events,
            self.topic_deadletter,
            self.topic_scores,
        ]


class _RegistryFields(_Fields):
    """The MLflow registered model of this deployment, and how often followers look."""

    model_name: str = Field(
        "flywheel",
        min_length=1,
        max_length=200,
        description="The MLflow registered model of this deployment.",
    )
    registry_poll_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Service checks the champion alias this often (model events are faster).",
    )
    model_factories: str = Field(
        "",
        max_length=2000,
        description="Python modules trusted to build `factory` models (comma-separated).",
    )

    signing_key: Path | None = Field(
        None,
        description="Ed25519 private key (PEM) the learner, the federated server, `flywheel "
        "init` and promote/approve sign promotions with; unset: HOME/keys/promotion.key, "
        "created by the first signer (`flywheel keys init`).",
    )
    trusted_keys: str = Field(
        "",
        max_length=4000,
        description="Public keys (PEM files, comma-separated) whose promotion signatures "
        "the service accepts; several during a key rotation. Unset: HOME/keys/promotion.pub.",
    )
    model_trust: Literal["signed", "off"] = Field(
        "signed",
        description="`signed`: the service serves only versions with a verified promotion "
        "signature and a recorded gate pass or approval; `off` is for local experiments only.",
    )

    @field_validator("signing_key", mode="before")
    @classmethod
    def _unset_signing_key(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("trusted_keys")
    @classmethod
    def _check_trusted_keys(cls, value: str) -> str:
        """Paths only: the files are read (and a missing or wrong one refused, by name)
        when the service starts (`flywheel.service.trust`), as the key may be mounted
        after the configuration is written."""
        parts = [p.strip() for p in value.split(",")]
        if value.strip() and not all(parts):
            raise ValueError("expected comma-separated file paths, with no empty entry")
        return value

    @property
    def trusted_key_paths(self) -> tuple[Path, ...]:
        """The configured trusted public keys (empty: the home's default one)."""
        parts = filter(None, (p.strip() for p in self.trusted_keys.split(",")))
        return tuple(Path(p).expanduser() for p in parts)

    @field_validator("model_factories")
    @classmethod
    def _check_factories(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", part):
                raise ValueError(f"{part!r} is not a Python module name")
        return value

    @property
    def factories(self) -> tuple[str, ...]:
        """The trusted factory modules, as a tuple."""
        return tuple(filter(None, (p.strip() for p in self.model_factories.split(","))))

    @field_validator("model_name")
    @classmethod
    def _check_model_name(cls, value: str) -> str:
        if not value.strip() or value != value.strip():
            raise ValueError("expected a name without leading or trailing blanks")
        return value


class _TrustedFields(_Fields):
    """The trusted seed data and the initial model trained on it."""

    seed: int = Field(7, description="Seed for seed data and the initial model.")
    seed_examples: int = Field(
        3000, ge=100, le=1_000_000, description="Seed data size (80 % train, 20 % trusted holdout)."
    )


class _ServiceFields(_Fields):
    """The HTTP inference service: limits, dynamic batching, precision, the review token."""

    host: str = Field("127.0.0.1", description="Interface `flywheel serve` binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port `flywheel serve` binds.")
    max_batch: int = Field(256, ge=1, le=100_000, description="Instances per predict call.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger bodies get 413.")
    max_corrections: int = Field(10_000, ge=1, description="Corrections per call.")
    dynamic_batching: bool = Field(
        True, description="Gather concurrent predict requests into one forward pass."
    )
    batch_max_size: int = Field(
        128, ge=1, le=100_000, description="Most instances in one batched forward pass."
    )
    batch_max_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="Longest a batch waits for more requests, only while recent batches "
        "held several.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="A request's headers must arrive within this many seconds of the "
        "connection's start (or the previous response), else 408 and the connection closes.",
    )
    serve_precision: Literal["fp32", "int8", "bf16"] = Field(
        "fp32", description="Serve the model in full precision, dynamic int8 or bfloat16."
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token for the review page's approve, reject and rollback "
        "(/v1/review); unset: the page is read-only.",
    )

    tls_certfile: Path | None = Field(
        None, description="Certificate chain (PEM): `flywheel serve` answers HTTPS only."
    )
    tls_keyfile: Path | None = Field(None, description="Its private key (PEM).")
    tls_client_cafile: Path | None = Field(
        None,
        description="CA bundle for mutual TLS: every client must present a certificate it signed.",
    )

    @field_validator("tls_certfile", "tls_keyfile", "tls_client_cafile", mode="before")
    @classmethod
    def _unset_tls_certfile(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("tls_certfile", "tls_keyfile", "tls_client_cafile")
    @classmethod
    def _check_tls_files(cls, value: Path | None) -> Path | None:
        return _readable_file(value)

    @model_validator(mode="after")
    def _check_tls(self) -> Self:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("FLYWHEEL_TLS_CERTFILE and FLYWHEEL_TLS_KEYFILE are set together")
        if self.tls_client_cafile is not None and self.tls_certfile is None:
            raise ValueError("FLYWHEEL_TLS_CLIENT_CAFILE needs FLYWHEEL_TLS_CERTFILE and _KEYFILE")
        return self

    @field_validator("admin_token")
    @classmethod
    def _check_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None  # an empty token must not become a valid one
        if len(value.get_secret_value()) < MIN_ADMIN_TOKEN:
            raise ValueError(
                f"is {len(value.get_secret_value())} characters; at least {MIN_ADMIN_TOKEN} "
                "(a random secret: `openssl rand -hex 16`)"
            )
        return value


class _RetryFields(_Fields):
    """How every process waits out a store, broker or registry that is down (flywheel.retry)."""

    retry_initial_s: float = Field(
        0.2, gt=0, le=60, description="First pause before retrying a dependency that is down."
    )
    retry_max_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Cap of the doubling pause between retries; processes retry for as long "
        "as the dependency is down.",
    )

    @model_validator(mode="after")
    def _check_retry(self) -> Self:
        if self.retry_initial_s > self.retry_max_s:
            raise ValueError(
                f"FLYWHEEL_RETRY_INITIAL_S ({self.retry_initial_s}) is above "
                f"FLYWHEEL_RETRY_MAX_S ({self.retry_max_s})"
            )
        return self


class _AccessFields(_Fields):
    """App keys (`flywheel apps`): whether every write path needs one, how long a
    verified key is trusted before the store is asked again, and how fast each app may
    call the write paths (`flywheel.service.ratelimit`)."""

    auth: Literal["on", "off"] = Field(
        "on",
        description="`on`: every write path needs an app key with its scope, and Kafka "
        "corrections need a valid signature; `off` is for local experiments only.",
    )
    auth_cache_ttl_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="How long a verified key is cached; a revocation or expiry takes "
        "effect within this many seconds.",
    )
    subject_key: SecretStr | None = Field(
        None,
        description="Platform secret (at least 32 characters) the service keys a "
        "correction's `subject` with (HMAC-SHA256) before it is logged: raw subject ids "
        "are never stored nor put on Kafka. Unset: a correction with a `subject` is "
        "refused (422); corrections without one are taken as before.",
    )

    @field_validator("subject_key")
    @classmethod
    def _check_subject_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None  # unset: subjects are refused, never hashed with an empty key
        if len(value.get_secret_value()) < 32:
            raise ValueError(
                "FLYWHEEL_SUBJECT_KEY must be at least 32 characters: a short key lets "
                "anyone who guesses it re-identify subjects by hashing candidate ids"
            )
        return value

    rate_predict: float = Field(
        0.0,
        ge=0,
        description="Predict requests (/v1/predict, /v2 infer) per second each app may "
        "make (a token bucket per app); over it, 429 with Retry-After. 0: no limit.",
    )
    rate_predict_burst: int = Field(
        0,
        ge=0,
        description="Predict requests an idle app may make at once (the bucket's size); "
        "0: one second's worth of FLYWHEEL_RATE_PREDICT.",
    )
    rate_correct: float = Field(
        0.0,
        ge=0,
        description="Correction requests (/v1/corrections) per second each app may make; "
        "over it, 429 with Retry-After. 0: no limit.",
    )
    rate_correct_burst: int = Field(
        0,
        ge=0,
        description="Correction requests an idle app may make at once; 0: one second's "
        "worth of FLYWHEEL_RATE_CORRECT.",
    )
    rate_per_app: dict[str, dict[Literal["predict", "correct"], tuple[float, int]]] = Field(
        default_factory=dict,
        description='Per-app overrides, JSON: {"shop": {"predict": [500, 1000]}} gives app '
        "shop 500 predict requests a second with a burst of 1000 (0 for no limit); the "
        "scopes it leaves out keep the defaults above.",
    )

    @field_validator("rate_per_app")
    @classmethod
    def _check_rates(
        cls, value: dict[str, dict[str, tuple[float, int]]]
    ) -> dict[str, dict[str, tuple[float, int]]]:
        for app, scopes in value.items():
            for scope, (rate, burst) in scopes.items():
                if rate < 0 or burst < 0 or (rate > 0 and burst < 1):
                    raise ValueError(
                        f"{app}.{scope}: [rate, burst] must be a rate >= 0 and, with a "
                        f"rate, a burst >= 1; got [{rate}, {burst}]"
                    )
        return value


class _EventLogFields(_Fields):
    """The service's event log: the bounded queue, Kafka batching and the disk spool."""

    log_queue_size: int = Field(50_000, ge=1, description="Bounded in-memory logging queue.")
    log_batch_size: int = Field(500, ge=1, le=100_000, description="Records per Kafka flush.")
    log_linger_ms: float = Field(
        50.0, ge=0, le=1000, description="Sender waits this long to batch records."
    )
    spool_retry_s: float = Field(1.0, gt=0, description="How often a spooled log retries.")
    spool_fsync: bool = Field(True, description="fsync the spool after each append.")
    spool_max_bytes: int = Field(
        1 << 30,
        ge=1 << 16,
        description="Most bytes the spool holds while Kafka is unreachable; once full, "
        "predictions and corrections get 503 with Retry-After (never a silent loss).",
    )
    spool_high_water: float = Field(
        0.8,
        gt=0,
        le=1,
        description="/readyz answers 503 while the spool holds more than this fraction of "
        "FLYWHEEL_SPOOL_MAX_BYTES, and ready again below it.",
    )
    durable_wait_ms: float = Field(
        1000.0,
        gt=0,
        le=60_000,
        description="Longest a request waits for Kafka's acknowledgement of its records "
        "before it writes them to the spool itself.",
    )
    durable_linger_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="Sender waits this long to batch records a request is waiting on "
        "(group commit); FLYWHEEL_LOG_LINGER_MS applies while none is.",
    )
    prediction_durability: Literal["durable", "fast"] = Field(
        "fast",
        description="fast: a prediction is answered once its event is queued (a hard crash "
        "loses the events of the last FLYWHEEL_LOG_LINGER_MS plus one Kafka round trip); "
        "durable: once it is acknowledged by Kafka or fsynced into the spool, as a "
        "correction always is (0.69x the requests/s at 16 connections in bench serve "
        "--compare predictions, docs/benchmarks.md).",
    )


class _FeedbackFields(_Fields):
    """The feedback workers: consuming, joining, expiring, holdout split, counterexamples."""

    feedback_group: str = Field(
        "flywheel-feedback", min_length=1, description="Consumer group the feedback workers share."
    )
    feedback_session_timeout_ms: int = Field(
        6000,
        ge=1000,
        le=300_000,
        description="Consumer session timeout (the lowest a stock Kafka broker accepts: its "
        "group.min.session.timeout.ms); after a broker pause the group reads again in about "
        "twice this. Tansu completes a join after about half.",
    )
    feedback_max_records: int = Field(
        2000, ge=1, le=100_000, description="Records per poll, one store transaction."
    )
    feedback_align_hold_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="While predictions have a backlog, a correction newer than the predictions "
        "read so far waits for them up to this long; 0 turns alignment off.",
    )
    feedback_prediction_cache: int = Field(
        50_000,
        ge=0,
        le=10_000_000,
        description="Predictions a worker keeps in memory to join their corrections without "
        "reading them back (~0.7 KB each); 0 turns it off.",
    )
    correction_expiry_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        le=TEN_YEARS_S,
        description="Unmatched corrections expire after this.",
    )
    holdout_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of corrections kept out of training."
    )
    feedback_metrics_port: int = Field(
        0, ge=0, le=65535, description="Worker's /metrics port; 0 turns it off."
    )
    counterexample_budget: int = Field(
        1000, ge=0, description="Counterexamples one source may add per budget window."
    )
    counterexample_window_s: float = Field(
        3600.0,
        gt=0,
        le=TEN_YEARS_S,
        description="The window of that budget (counted in whole minutes).",
    )
    retention_predictions_s: float = Field(
        8 * 24 * 3600.0,
        gt=0,
        le=TEN_YEARS_S,
        description="Predictions are kept this long after their timestamp, then dropped "
        "(PostgreSQL: whole days, so up to a day longer); a correction arriving later finds "
        "no prediction and expires. At least FLYWHEEL_CORRECTION_EXPIRY_S (default: it plus "
        "a day).",
    )
    retention_corrections_s: float = Field(
        30 * 24 * 3600.0,
        gt=0,
        le=TEN_YEARS_S,
        description="Joined and expired corrections are kept this long after their timestamp "
        "(pending ones until they expire); more than FLYWHEEL_CORRECTION_EXPIRY_S and longer "
        "than the corrections topic keeps records, or a redelivered correction joins again.",
    )
    retention_examples_s: float = Field(
        365 * 24 * 3600.0,
        gt=0,
        le=TEN_YEARS_S,
        description="Examples from traffic (corrections, counterexamples, manual) are kept "
        "this long after they were written; the trusted set's seed examples stay.",
    )
    retention_error_counts_s: float = Field(
        365 * 24 * 3600.0,
        gt=0,
        le=TEN_YEARS_S,
        description="Hourly error counters (the reports' source) are kept this long.",
    )
    retention_partitions_ahead: int = Field(
        3,
        ge=1,
        le=366,
        description="Days of prediction partitions (PostgreSQL) created ahead of today.",
    )
    retention_every_s: float = Field(
        3600.0,
        ge=0,
        le=TEN_YEARS_S,
        description="How often one of the feedback workers runs the store's maintenance "
        "(retention, partitions ahead; `flywheel db maintain` runs it at once); 0: never.",
    )

    @model_validator(mode="after")
    def _check_retention(self) -> Self:
        expiry = self.correction_expiry_s
        if self.retention_predictions_s < expiry:
            raise ValueError(
                f"FLYWHEEL_RETENTION_PREDICTIONS_S ({self.retention_predictions_s:g}) is below "
                f"FLYWHEEL_CORRECTION_EXPIRY_S ({expiry:g}): predictions would be dropped "
                "while their corrections may still arrive"
            )
        if self.retention_corrections_s <= expiry:
            raise ValueError(
                f"FLYWHEEL_RETENTION_CORRECTIONS_S ({self.retention_corrections_s:g}) is not "
                f"above FLYWHEEL_CORRECTION_EXPIRY_S ({expiry:g}): pending corrections must "
                "expire before they are deleted"
            )
        return self


class _GateFields(_Fields):
    """The promotion gate, shared by the online learner, federated server and review."""

    auto_promote: bool = Field(True, description="Promote candidates that pass the gate.")
    gate_tolerance: float = Field(
        0.02, ge=0, le=1, description="Allowed accuracy loss on the trusted (seed) holdout."
    )
    gate_recent_holdout: int = Field(
        500, ge=1, le=1_000_000, description="Most recent holdout corrections the gate uses."
    )
    gate_min_holdout: int = Field(
        20, ge=1, le=1_000_000, description="Fewer recent holdout corrections: no promotion."
    )
    gate_concept_change: Literal["follow", "hold"] = Field(
        "follow",
        description="When recent data contradicts the trusted holdout (z ≥ 3 both ways): "
        "follow waives the trusted check, hold keeps it binding.",
    )
    gate_register_failed: bool = Field(
        True,
        description="Register candidates that fail the gate too (for the record); false: "
        "only passed ones (private candidates always: the ledger names their version).",
    )
    live_shadow_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of requests a shadow or guard scores beside the champion, off "
        "the request path (and the champion beside a canary).",
    )
    live_canary_share: float = Field(
        0.05, ge=0, le=1, description="Share of routing keys a canary answers."
    )
    live_alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Error rate of each live sequential decision (promote, retire, roll back).",
    )
    live_guard: bool = Field(
        True,
        description="After a promotion, the replaced champion scores as a guard and the new "
        "one is rolled back if it is worse on live paired traffic.",
    )
    live_judge_interval_s: float = Field(
        10.0, gt=0, le=86_400, description="How often live decisions are re-examined."
    )
    live_monitor_window_s: float = Field(
        86_400.0,
        ge=60,
        le=366 * 86_400,
        description="Window of live monitoring (`flywheel monitor`, the `flywheel_live_*` "
        "gauges of /metrics): labels and predictions of the last this many seconds.",
    )
    live_monitor_interval_s: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description="How often the service refreshes its `flywheel_live_*` gauges from the "
        "store, in a background thread (0: never; the gauges are then absent).",
    )
    live_monitor_sample: int = Field(
        5000,
        ge=100,
        le=1_000_000,
        description="Most rows live monitoring reads per version for label delays, CBPE, "
        "input drift (PSI) and segments, and trusted rows for the drift reference.",
    )


class _LearnerFields(_Fields):
    """The online learner: update size, rates, elastic boost, replay, polling."""

    learn_batch: int = Field(
        100, ge=1, le=1_000_000, description="New trainable examples per learner update."
    )
    learn_steps: int = Field(8, ge=1, le=1000, description="Gradient steps per update.")
    learn_lr: float = Field(0.003, gt=0, le=10, description="Base learning rate (Adam).")
    learn_replay: float = Field(
        2.0, ge=0, le=100, description="Replayed older examples per new one, against forgetting."
    )
    learn_max_boost: float = Field(
        3.0,
        ge=1,
        le=10,
        description="Most the elastic learning rate (and, with boost steps, the "
        "step count) multiplies the base by.",
    )
    learn_boost_half_life: float = Field(
        3.0, gt=0, le=1000, description="Updates for a raised learning rate to halve its excess."
    )
    learn_max_lr: float = Field(
        0.01,
        gt=0,
        le=10,
        description="Cap on the boosted learning rate of non-private updates (at least "
        "FLYWHEEL_LEARN_LR); DP updates keep FLYWHEEL_PRIVACY_LEARN_LR x boost.",
    )
    learn_boost_window: int = Field(
        1000,
        ge=0,
        le=1_000_000,
        description="While the rate is boosted after a change, each update trains on up to "
        "this many examples since the change; 0: only the new ones + replay.",
    )
    learn_boost_steps: bool = Field(
        True, description="While boosted, gradient steps are multiplied by the boost too."
    )
    learn_drift_replay: bool = Field(
        True,
        description="After an error drift, replay only examples since the change "
        "(half of it: the trusted seed data).",
    )
    learn_background: bool = Field(
        True,
        description="On a drift warning, train a background model on the examples since "
        "the warning only, and let it replace the learner's line when it beats it on the "
        "rows that came after (non-private and DP-SGD updates; under DP it trains in the "
        "line's own private steps, jointly clipped; see learner/background.py).",
    )
    learn_poll_s: float = Field(
        1.0, gt=0, le=3600, description="Learner checks for new examples this often."
    )
    learn_cursor_grace_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="Examples committed this late (out of id order) are still picked up.",
    )
    learn_metrics_port: int = Field(
        0, ge=0, le=65535, description="Learner's /metrics port (privacy refusals, ε); 0: off."
    )
    learn_lease_s: float = Field(
        15.0,
        ge=1,
        le=3600,
        description="The lineage's lease lasts this long unless renewed: a standby "
        "learner takes over about this long after the holder dies.",
    )
    learn_lease_renew_s: float = Field(
        5.0,
        gt=0,
        le=1200,
        description="The holder renews its lease this often (at most a third of "
        "FLYWHEEL_LEARN_LEASE_S); a standby tries to take it as often.",
    )

    @model_validator(mode="after")
    def _check_learn_lease(self) -> Self:
        if self.learn_lease_renew_s * 3 > self.learn_lease_s:
            raise ValueError(
                f"FLYWHEEL_LEARN_LEASE_RENEW_S ({self.learn_lease_renew_s:g}) is more than a "
                f"third of FLYWHEEL_LEARN_LEASE_S ({self.learn_lease_s:g}): a renewal that "
                "is late once would let a standby take over from a live learner"
            )
        return self

    @model_validator(mode="after")
    def _check_learn_rates(self) -> Self:
        if self.learn_max_lr < self.learn_lr:
            raise ValueError(
                f"FLYWHEEL_LEARN_MAX_LR ({self.learn_max_lr:g}) is below "
                f"FLYWHEEL_LEARN_LR ({self.learn_lr:g}): the cap is for the "
                "boosted rate; raise it or lower the base rate"
            )
        return self


class _PrivacyFields(_Fields):
    """DP-SGD of the online learner: the budget, the mechanism, the engine."""

    privacy_enabled: bool = Field(
        True, description="Every learner update is DP-SGD; false trains without noise."
    )
    privacy_epsilon: float = Field(
        3.0,
        gt=0,
        le=100,
        description="ε budget per privacy unit (a data subject, else a prediction) and "
        "model lineage: for its whole life, or per period (FLYWHEEL_PRIVACY_BUDGET_POLICY).",
    )
    privacy_budget_policy: Literal["lifetime", "renewing"] = Field(
        "lifetime",
        description="`lifetime`: each unit's ε budget is spent once, for good; `renewing`: "
        "the budget holds for every window of FLYWHEEL_PRIVACY_BUDGET_PERIOD_DAYS (a unit "
        "trains again once its spending falls out of the window), so over a year it may "
        "spend up to the budget times the windows that cover a year.",
    )
    privacy_budget_period_days: float = Field(
        30.0,
        gt=0,
        le=3650,
        description="The window of the `renewing` policy, in days (unused by `lifetime`).",
    )
    privacy_delta: float = Field(1e-5, gt=0, lt=0.1, description="δ of that budget.")
    privacy_noise_multiplier: float | None = Field(
        None, gt=0, le=1000, description="Explicit σ; unset: calibrated from the budget."
    )
    privacy_max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="Per-source clip norm C.")
    privacy_sample_rate: float = Field(
        0.5, gt=0, le=1, description="Chance that a source is in one DP-SGD step (Poisson)."
    )
    privacy_source_updates: int = Field(
        2,
        ge=1,
        le=100_000,
        description="Updates one source may join within the budget (sets σ when unset).",
    )
    privacy_max_per_source: int = Field(
        16, ge=1, le=100_000, description="Most examples one privacy unit adds to one update."
    )
    privacy_learn_lr: float = Field(
        0.01, gt=0, le=10, description="Base learning rate of DP updates (noise needs more)."
    )
    privacy_unit_batch: bool = Field(
        True,
        description="A DP update waits for FLYWHEEL_LEARN_BATCH privacy units instead of "
        "rows (or 4x that many rows, whichever comes first): DP-SGD's signal grows with "
        "units, not rows.",
    )
    privacy_accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant.")
    privacy_engine: Literal["auto", "opacus", "fused"] = Field(
        "auto", description="Per-example clipping: fused kernel, Opacus, or auto."
    )
    privacy_mechanism: Literal["dp-sgd", "dp-ftrl"] = Field(
        "dp-sgd",
        description="DP mechanism of a learner update: DP-SGD (Poisson-sampled sources) or "
        "DP-FTRL (each row once, in order, tree-aggregated noise; docs/privacy.md).",
    )
    privacy_ftrl_lr: float = Field(
        0.3, gt=0, le=100, description="FTRL step size of DP-FTRL updates (plain SGD scale)."
    )


class _FederatedFields(_Fields):
    """Federated learning (docs/federated.md): SuperLink, rounds, aggregation, central DP."""

    fed_superlink: str = Field(
        "127.0.0.1:9093",
        description="SuperLink HTTP address (Fleet, Control and Runtime "
        "APIs) that `flywheel fed` binds or connects to.",
    )
    fed_runtime_port: int = Field(
        9094, ge=1, le=65535, description="A site's SuperNode Runtime API port (loopback)."
    )
    fed_rounds: int = Field(5, ge=1, le=10_000, description="Rounds of one federated run.")
    fed_clients: int = Field(3, ge=1, le=100_000, description="Sites sampled per round.")
    fed_min_clients: int = Field(
        2, ge=1, le=100_000, description="Connected sites a round waits for."
    )
    fed_strategy: Literal["fedavg", "trimmed", "median", "fltrust"] = Field(
        "fedavg",
        description="Aggregation: FedAvg, FedTrimmedAvg, FedMedian (robust) or FLTrust "
        "(sites weighted by agreement with an update on the public trusted set).",
    )
    fed_trim_beta: float = Field(
        0.34, ge=0, lt=0.5, description="Share cut from each end by `trimmed`."
    )
    fed_dp_clipping: Literal["client", "server"] = Field(
        "client", description="Flower DP wrapper: client- or server-side fixed clipping."
    )
    fed_clip_norm: float = Field(
        2.0, gt=0, le=1e6, description="L2 bound of one site's model update."
    )
    fed_noise_multiplier: float = Field(
        0.05,
        gt=0,
        le=1000,
        description="Central noise σ on the aggregate (std σ·clip/sites); sets client-level ε.",
    )
    fed_client_epsilon: float | None = Field(
        None,
        gt=0,
        description="Client-level ε budget per site and lineage; unset: "
        "accounted in the ledger, not enforced.",
    )
    fed_privacy_sample_rate: float = Field(
        1.0,
        gt=0,
        le=1,
        description="DP-SGD sampling rate q of a site's local training in "
        "federated rounds (q = 1: every source in every step; the online learner's is "
        "FLYWHEEL_PRIVACY_SAMPLE_RATE).",
    )
    fed_local_steps: int = Field(
        20,
        ge=1,
        le=10_000,
        description="DP-SGD steps per round; a site refuses a round asking for more.",
    )
    fed_site_noise_seed: int | None = Field(
        None,
        ge=0,
        description="Experiments only: a site's fixed DP noise seed (with the "
        "round number), for paired runs; unset, a site draws a secret seed each round.",
    )
    fed_local_lr: float = Field(
        0.1, gt=0, le=10, description="A site's local learning rate (SGD, momentum 0.9)."
    )
    fed_local_max_examples: int = Field(
        5000, ge=1, le=10_000_000, description="Newest trainable examples a site trains on."
    )
    fed_public_replay: int = Field(
        100,
        ge=0,
        le=1_000_000,
        description="Seed (public) rows sent to sites each round, replayed against forgetting.",
    )
    fed_round_timeout_s: float = Field(
        120.0, gt=0, le=86_400, description="Longest a round waits for replies."
    )
    fed_poll_s: float = Field(
        0.1,
        ge=0.01,
        le=60,
        description="Poll interval of SuperNode, ClientApp worker and ServerApp (Flower: 3 s).",
    )
    fed_tls_ca: Path | None = Field(None, description="CA certificate (PEM) for `--tls`.")
    fed_tls_cert: Path | None = Field(None, description="SuperLink certificate for `--tls`.")
    fed_tls_key: Path | None = Field(None, description="SuperLink private key for `--tls`.")
    fed_auth_key: Path | None = Field(
        None, description="A site's SuperNode private key (ECDSA, OpenSSH) for `--auth`."
    )
    fed_audit_dir: Path | None = Field(
        None, description="A site writes a copy of every message it sends here."
    )
    fed_node_auth: bool = Field(
        False,
        description="Set by `flywheel fed superlink --auth` for the ServerApps it starts: "
        "every site authenticates with a registered key, so a node id names the key and "
        "site-level ε is enforced per site; off, a restarted site counts as a new one.",
    )
    fed_min_sites: int = Field(
        1,
        ge=1,
        le=100_000,
        description="Usable replies a round needs; with fewer the round is dropped.",
    )
    fed_min_site_examples: int = Field(
        1,
        ge=1,
        le=10_000_000,
        description="Trainable examples a site needs to train a round (it refuses with "
        "fewer; the server refuses a reply counting fewer).",
    )
    fed_quarantine_rounds: int = Field(
        3,
        ge=0,
        le=10_000,
        description="With --strategy fltrust: a site whose update gets trust 0 (it points "
        "away from the reference) in this many aggregated rounds in a row, in each of which "
        "most other sites scored above 0, is quarantined: "
        "not asked again in the run, and named in the run's summary, the version's tag "
        "fed_quarantined, its model card and the review page (0: never).",
    )
    fed_backoff_max_rounds: int = Field(
        16,
        ge=0,
        le=10_000,
        description="Longest back-off of a site that refused or failed: it is skipped "
        "1, 2, 4, ... rounds after each failure in a row, at most this many (0: never).",
    )
    fed_holdout: Path | None = Field(
        None,
        description="Gate's recent holdout (.npz: x, labels) when the platform store "
        "has fewer than FLYWHEEL_GATE_MIN_HOLDOUT holdout corrections.",
    )

    @field_validator("fed_superlink")
    @classmethod
    def _check_superlink(cls, value: str) -> str:
        if not _is_host_port(value.strip()):
            raise ValueError("expected host:port")
        return value.strip()


# -- the groups a component takes ---------------------------------------------------------

_GROUP_CONFIG = ConfigDict(frozen=True, extra="forbid")


class StateSettings(_StateFields):
    """`home`, `database_url`, `mlflow_tracking_*`, and the paths derived from them."""

    model_config = _GROUP_CONFIG


class KafkaSettings(_KafkaFields):
    """`kafka_bootstrap`, the five topics, `topic_partitions`, `kafka_timeout_s`, and the
    transport security of every Kafka client (`kafka_security_protocol`, `kafka_sasl_*`,
    `kafka_ssl_*`; see flywheel.kafka_security)."""

    model_config = _GROUP_CONFIG


class RegistrySettings(_RegistryFields):
    """`model_name`, `registry_poll_s`, `model_factories`, and promotion signing:
    `signing_key`, `trusted_keys`, `model_trust` (flywheel.signing)."""

    model_config = _GROUP_CONFIG


class TrustedSettings(_TrustedFields):
    """`seed`, `seed_examples`."""

    model_config = _GROUP_CONFIG


class ServiceSettings(_ServiceFields):
    """`host`, `port`, request limits, dynamic batching, `serve_precision`, `admin_token`,
    `tls_*`."""

    model_config = _GROUP_CONFIG


class RetrySettings(_RetryFields):
    """`retry_*`: the backoff of every process's dependency retries."""

    model_config = _GROUP_CONFIG


class AccessSettings(_AccessFields):
    """`auth`, `auth_cache_ttl_s`, `subject_key`, `rate_*` (per-app rate limits)."""

    model_config = _GROUP_CONFIG


class EventLogSettings(_EventLogFields):
    """`log_queue_size`, `log_batch_size`, `log_linger_ms`, `spool_retry_s`, `spool_fsync`,
    `spool_max_bytes`, `spool_high_water`, `durable_wait_ms`, `durable_linger_ms`,
    `prediction_durability`."""

    model_config = _GROUP_CONFIG


class FeedbackSettings(_FeedbackFields):
    """`feedback_*`, `correction_expiry_s`, `holdout_fraction`, `counterexample_*`,
    `retention_*`."""

    model_config = _GROUP_CONFIG


class GateSettings(_GateFields):
    """`auto_promote`, `gate_tolerance`, `gate_recent_holdout`, `gate_min_holdout`,
    `gate_concept_change`, `gate_register_failed`, and live evaluation: `live_*`."""

    model_config = _GROUP_CONFIG


class LearnerSettings(_LearnerFields):
    """`learn_*`."""

    model_config = _GROUP_CONFIG


class PrivacySettings(_PrivacyFields):
    """`privacy_*`."""

    model_config = _GROUP_CONFIG


class FederatedSettings(_FederatedFields):
    """`fed_*`."""

    model_config = _GROUP_CONFIG


GROUPS: dict[str, type[BaseModel]] = {
    "state": StateSettings,
    "kafka": KafkaSettings,
    "registry": RegistrySettings,
    "trusted": TrustedSettings,
    "service": ServiceSettings,
    "access": AccessSettings,
    "event_log": EventLogSettings,
    "feedback": FeedbackSettings,
    "gate": GateSettings,
    "learner": LearnerSettings,
    "privacy": PrivacySettings,
    "federated": FederatedSettings,
    "retry": RetrySettings,
}
"""Property name on `Settings` -> group; every flat setting is in exactly one (a test checks)."""

_G = TypeVar("_G", bound=BaseModel)


# pydantic collects fields from the last base to the first: listed in reverse, so that the
# fields (model_dump, the schema) read in the order of the groups above
class Settings(
    _RetryFields,
    _FederatedFields,
    _PrivacyFields,
    _LearnerFields,
    _GateFields,
    _FeedbackFields,
    _EventLogFields,
    _AccessFields,
    _ServiceFields,
    _TrustedFields,
    _RegistryFields,
    _KafkaFields,
    _StateFields,
    BaseSettings,
):
    """Every setting, read from the environment; hand components its groups, not itself.

    Not a subclass of any group, so a type checker refuses a `Settings` where a group is
    expected. Kept flat (same variable names, same attributes) for the environment and for
    the wiring (the CLI, the demo, bench), which hands each component its groups.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    def _group(self, group: type[_G]) -> _G:
        # the values were validated by the same validators when `self` was built
        return group.model_construct(**{name: getattr(self, name) for name in group.model_fields})

    @cached_property
    def state(self) -> StateSettings:
        return self._group(StateSettings)

    @cached_property
    def kafka(self) -> KafkaSettings:
        return self._group(KafkaSettings)

    @cached_property
    def registry(self) -> RegistrySettings:
        return self._group(RegistrySettings)

    @cached_property
    def trusted(self) -> TrustedSettings:
        return self._group(TrustedSettings)

    @cached_property
    def service(self) -> ServiceSettings:
        return self._group(ServiceSettings)

    @cached_property
    def access(self) -> AccessSettings:
        return self._group(AccessSettings)

    @cached_property
    def event_log(self) -> EventLogSettings:
        return self._group(EventLogSettings)

    @cached_property
    def feedback(self) -> FeedbackSettings:
        return self._group(FeedbackSettings)

    @cached_property
    def gate(self) -> GateSettings:
        return self._group(GateSettings)

    @cached_property
    def learner(self) -> LearnerSettings:
        return self._group(LearnerSettings)

    @cached_property
    def privacy(self) -> PrivacySettings:
        return self._group(PrivacySettings)

    @cached_property
    def federated(self) -> FederatedSettings:
        return self._group(FederatedSettings)

    @cached_property
    def retry(self) -> RetrySettings:
        return self._group(RetrySettings)


def known_variables() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


_R = TypeVar("_R")


def gather(record: type[_R], settings: Settings, **extra: object) -> _R:
    """A component's record of groups (a dataclass whose fields are named after `GROUPS`),
    filled from a whole `Settings`, plus `extra` single values: the wiring's one way to
    hand a component exactly the groups it declares.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Needs:
    ...     learner: LearnerSettings
    ...     trusted: TrustedSettings
    >>> gather(Needs, Settings()).learner.learn_batch
    100
    """
    names = [f.name for f in dataclasses.fields(record)]  # type: ignore[arg-type]
    unknown = [n for n in names if n not in GROUPS and n not in extra]
    if unknown:
        raise TypeError(f"{record.__name__} names no settings group {unknown}")
    values = {n: getattr(settings, n) for n in names if n in GROUPS}
    return record(**values, **extra)


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, rejecting unknown FLYWHEEL_ variables."""
    known = known_variables()
    unknown = sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and k not in known)
    if unknown:
        raise SettingsError(
            f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise SettingsError(_describe(exc)) from exc


def _readable_file(value: Path | None) -> Path | None:
    """A certificate or key path: read once here, so a missing or unreadable file is one
    line at start rather than a TLS handshake failing later."""
    if value is None or str(value).strip() == "":
        return None
    path = value.expanduser()
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return path


def _is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _is_secret(name: str) -> bool:
    field = Settings.model_fields.get(name)
    return field is not None and "SecretStr" in str(field.annotation)


def _describe(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    lines = []
    for err in errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        var = ENV_PREFIX + loc.upper() if loc in Settings.model_fields else loc
        value = err.get("input")
        if isinstance(value, Mapping):  # a check across fields: its input is every setting,
            lines.append(f"{var}: {err.get('msg')}")  # secrets too; the message names them
            continue
        if _is_secret(loc):  # a refused secret is still a secret: never echo it
            lines.append(f"{var}: {err.get('msg')} (value not printed)")
            continue
        got = mask_credentials(repr(value))  # a URL's password stays hidden
        lines.append(f"{var}: {err.get('msg')} (got {got})")
    return "invalid configuration: " + "; ".join(lines)


def prepare_home(settings: Settings) -> Path:
    """Create the home folder and keep every tool's state inside it."""
    home = settings.home_dir
    for sub in ("spool", "mlartifacts", "flwr", "matplotlib"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_HOME", str(home / "flwr"))
    os.environ.setdefault("MPLCONFIGDIR", str(home / "matplotlib"))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return home
