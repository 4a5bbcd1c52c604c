"""Transport security by settings: what is refused at start, and how each setting maps to
each library (kafka-python, confluent-kafka, uvicorn, httpx, MLflow, psycopg).

The wire-level checks (a TLS handshake with the client certificate, SASL reaching a broker,
HTTPS from `flywheel serve`) are in tests/integration/test_transport_security.py."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from fastapi import FastAPI

from flywheel.client import Client
from flywheel.client.http import ssl_verify
from flywheel.kafka_security import confluent_options, kafka_python_options
from flywheel.registry import mlflow_credentials
from flywheel.service import TLS, StartupFailed, run_server
from flywheel.settings import KafkaSettings, Settings, SettingsError, StateSettings, load_settings
from flywheel.store import make_engine
from tests.certs import TestCA

BOOT = "kafka1:9093,kafka2:9093"


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> TestCA:
    return TestCA.make(tmp_path_factory.mktemp("ca"))


def sasl_ssl(ca: TestCA, **extra: object) -> KafkaSettings:
    client = ca.issue("flywheel-client", server=False)
    return KafkaSettings(
        kafka_bootstrap=BOOT,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="flywheel",
        kafka_sasl_password="s3cret-pw",
        kafka_ssl_cafile=ca.cafile,
        kafka_ssl_certfile=client.cert,
        kafka_ssl_keyfile=client.key,
        **extra,
    )


# -- settings ---------------------------------------------------------------------------------


def test_plaintext_by_default_gives_no_options_at_all():
    k = KafkaSettings(kafka_bootstrap=BOOT)
    assert kafka_python_options(k) == {} and confluent_options(k) == {}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "FLYWHEEL_KAFKA_SASL_MECHANISM"),
        (
            {
                "kafka_security_protocol": "SASL_PLAINTEXT",
                "kafka_sasl_mechanism": "PLAIN",
                "kafka_sasl_username": "u",
            },
            "FLYWHEEL_KAFKA_SASL_PASSWORD",
        ),
        ({"kafka_sasl_username": "u"}, "SASL settings are set but"),
        ({"kafka_security_protocol": "SSL", "kafka_sasl_mechanism": "PLAIN"}, "SASL settings"),
        ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI"}, "PLAIN"),
        ({"kafka_security_protocol": "TLS"}, "SASL_SSL"),
    ],
)
def test_a_half_configured_kafka_security_is_refused(values, message):
    with pytest.raises(ValueError, match=message):
        KafkaSettings(kafka_bootstrap=BOOT, **values)


def test_a_refused_combination_does_not_print_the_secrets_beside_it(monkeypatch):
    """A check across fields gets every setting as its input; printing that input would
    print the SASL password and the admin token."""
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSTRAP", BOOT)
    monkeypatch.setenv("FLYWHEEL_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FLYWHEEL_KAFKA_SASL_PASSWORD", "top-secret-1")
    monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", "top-secret-2-0123456789abcdef0123456")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    text = str(refused.value)
    assert "FLYWHEEL_KAFKA_SASL_MECHANISM" in text and "top-secret" not in text


def test_tls_files_need_a_tls_protocol_and_come_in_pairs(ca):
    pair = ca.issue("c1", server=False)
    with pytest.raises(ValueError, match="TLS files are set but"):
        KafkaSettings(kafka_bootstrap=BOOT, kafka_ssl_cafile=ca.cafile)
    with pytest.raises(ValueError, match="KEYFILE are set together"):
        KafkaSettings(
            kafka_bootstrap=BOOT, kafka_security_protocol="SSL", kafka_ssl_certfile=pair.cert
        )


def test_secured_kafka_needs_a_bootstrap_the_embedded_broker_is_plaintext(ca):
    with pytest.raises(ValueError, match="needs FLYWHEEL_KAFKA_BOOTSTRAP"):
        KafkaSettings(kafka_security_protocol="SSL", kafka_ssl_cafile=ca.cafile)


def test_a_missing_or_unreadable_file_is_one_line_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_TLS_CERTFILE", str(tmp_path / "nope.pem"))
    monkeypatch.setenv("FLYWHEEL_TLS_KEYFILE", str(tmp_path / "nope.key"))
    with pytest.raises(SettingsError) as refused:
        load_settings()
    text = str(refused.value)
    assert "FLYWHEEL_TLS_CERTFILE" in text and "cannot read" in text and "\n" not in text
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="cannot read"):
        KafkaSettings(kafka_bootstrap=BOOT, kafka_security_protocol="SSL", kafka_ssl_cafile=folder)


def test_an_empty_variable_is_unset(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_KAFKA_SSL_CAFILE", "")
    monkeypatch.setenv("FLYWHEEL_TLS_CLIENT_CAFILE", " ")
    s = load_settings()
    assert s.kafka_ssl_cafile is None and s.tls_client_cafile is None


def test_tls_for_serve_comes_in_a_pair_and_mtls_needs_it(ca):
    server = ca.issue("srv-pair", server=True)
    with pytest.raises(ValueError, match="set together"):
        Settings(tls_certfile=server.cert)
    with pytest.raises(ValueError, match="FLYWHEEL_TLS_CLIENT_CAFILE needs"):
        Settings(tls_client_cafile=ca.cafile)
    s = Settings(tls_certfile=server.cert, tls_keyfile=server.key, tls_client_cafile=ca.cafile)
    assert s.service.tls_client_cafile == ca.cafile


def test_secrets_are_never_in_a_repr(ca):
    secret = "s3cret-pw"
    s = Settings(
        kafka_bootstrap=BOOT,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="flywheel",
        kafka_sasl_password=secret,
        mlflow_tracking_username="ml",
        mlflow_tracking_password="ml-" + secret,
    )
    for text in (repr(s), str(s), repr(s.kafka), repr(s.state), str(s.model_dump())):
        assert secret not in text
    assert s.kafka.kafka_sasl_password is not None
    assert s.kafka.kafka_sasl_password.get_secret_value() == secret


# -- the mapping, per library -----------------------------------------------------------------


def test_kafka_python_options_name_every_setting(ca):
    k = sasl_ssl(ca)
    assert kafka_python_options(k) == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "flywheel",
        "sasl_plain_password": "s3cret-pw",
        "ssl_cafile": str(ca.cafile),
        "ssl_certfile": str(k.kafka_ssl_certfile),
        "ssl_keyfile": str(k.kafka_ssl_keyfile),
    }


def test_confluent_options_name_every_setting(ca):
    k = sasl_ssl(ca)
    assert confluent_options(k) == {
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "flywheel",
        "sasl.password": "s3cret-pw",
        "ssl.ca.location": str(ca.cafile),
        "ssl.certificate.location": str(k.kafka_ssl_certfile),
        "ssl.key.location": str(k.kafka_ssl_keyfile),
    }


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_tls_only_and_sasl_only_leave_the_other_out(ca, mechanism):
    tls = KafkaSettings(
        kafka_bootstrap=BOOT, kafka_security_protocol="SSL", kafka_ssl_cafile=ca.cafile
    )
    assert kafka_python_options(tls) == {"security_protocol": "SSL", "ssl_cafile": str(ca.cafile)}
    assert confluent_options(tls) == {"security.protocol": "ssl", "ssl.ca.location": str(ca.cafile)}
    sasl = KafkaSettings(
        kafka_bootstrap=BOOT,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="u",
        kafka_sasl_password="p",
    )
    assert kafka_python_options(sasl)["sasl_mechanism"] == mechanism
    assert confluent_options(sasl)["sasl.mechanism"] == mechanism
    assert not any(key.startswith("ssl") for key in kafka_python_options(sasl))


def test_confluent_kafka_accepts_the_options_for_producer_and_consumer(ca):
    """librdkafka checks every property when a client is made (no connection yet): a
    misspelt name or a file it cannot load fails here."""
    from confluent_kafka import Consumer, Producer

    options = confluent_options(sasl_ssl(ca))
    Producer({"bootstrap.servers": BOOT, **options}).flush(0)
    Consumer({"bootstrap.servers": BOOT, "group.id": "g", **options}).close()
    from confluent_kafka import KafkaException

    with pytest.raises(KafkaException):  # the control: a wrong name is refused
        Producer({"bootstrap.servers": BOOT, "ssl.ca.file": str(ca.cafile)})


def test_kafka_python_accepts_the_options_for_each_client_class(ca):
    """kafka-python refuses a keyword missing from a client's DEFAULT_CONFIG; every client
    connects when it is made, so building them for real, through a TLS handshake with the
    client certificate, is in tests/integration/test_transport_security.py."""
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    options = kafka_python_options(sasl_ssl(ca))
    for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        known = set(client.DEFAULT_CONFIG)
        assert set(options) <= known, (client.__name__, set(options) - known)


# -- HTTPS on serve, the client's verify ------------------------------------------------------


def test_a_certificate_and_key_that_do_not_match_stop_the_start_in_one_line(ca):
    one, other = ca.issue("srv-a", server=True), ca.issue("srv-b", server=True)
    with pytest.raises(StartupFailed, match="TLS certificate .* with key"):
        run_server(FastAPI(), "127.0.0.1", 0, tls=TLS(one.cert, other.key))
    with pytest.raises(StartupFailed, match="TLS client CA"):
        run_server(FastAPI(), "127.0.0.1", 0, tls=TLS(one.cert, one.key, one.key))


def test_tls_options_for_uvicorn(ca):
    pair = ca.issue("srv-u", server=True)
    assert TLS(pair.cert, pair.key).uvicorn_options()["ssl_cert_reqs"] == ssl.CERT_NONE
    mutual = TLS(pair.cert, pair.key, ca.cafile).uvicorn_options()
    assert mutual["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert mutual["ssl_ca_certs"] == str(ca.cafile)


def test_verify_takes_a_ca_bundle_path_as_a_context_that_trusts_it(ca, tmp_path):
    context = ssl_verify(ca.cafile)
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.get_ca_certs()[0]["subject"] == ((("commonName", "flywheel test CA"),),)
    with pytest.raises(ValueError, match="no CA bundle"):
        Client("https://127.0.0.1:1", verify=tmp_path / "missing.pem")


# -- MLflow and PostgreSQL --------------------------------------------------------------------


def test_mlflow_credentials_become_mlflows_own_variables(ca):
    state = StateSettings(
        mlflow_tracking_username="ml",
        mlflow_tracking_password="pw",
        mlflow_tracking_server_cert_path=ca.cafile,
    )
    assert mlflow_credentials(state) == {
        "MLFLOW_TRACKING_USERNAME": "ml",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "MLFLOW_TRACKING_SERVER_CERT_PATH": str(ca.cafile),
    }
    assert mlflow_credentials(StateSettings()) == {}
    with pytest.raises(ValueError, match="together"):
        StateSettings(mlflow_tracking_username="ml")
    with pytest.raises(ValueError, match="not both"):
        StateSettings(
            mlflow_tracking_username="ml", mlflow_tracking_password="pw", mlflow_tracking_token="t"
        )


def test_sslmode_in_the_database_url_reaches_psycopgs_connect_arguments(ca: TestCA):
    url = f"postgresql://u:p@db.example:5432/fw?sslmode=verify-full&sslrootcert={ca.cafile}"
    engine = make_engine(url)
    _, kwargs = engine.dialect.create_connect_args(engine.url)
    assert kwargs["sslmode"] == "verify-full" and kwargs["sslrootcert"] == str(Path(ca.cafile))
    assert engine.url.drivername == "postgresql+psycopg"
