"""Transport security on the wire, with a CA made in the test.

- HTTPS: a real `flywheel serve` answers over https to `flywheel.client.Client(verify=CA)`,
  refuses plain http, and fails a client that does not trust the CA; mutual TLS refuses a
  client without a certificate; a bad certificate stops `flywheel serve` in one line.
- Kafka TLS: the test broker (Tansu 0.6) cannot serve TLS (`--cert` is refused together
  with `--key`), so a TLS listener in the test, requiring a client certificate signed by
  the CA, records each handshake: every Flywheel entry point, of both client libraries,
  completes one with the client certificate from the settings.
- Kafka SASL: Tansu with `--authentication` does SCRAM, but its memory storage holds no
  user and none can be created (creating one must authenticate first), so what is checked
  is that each library runs the SCRAM exchange with the broker and is told "unknown user".
- PostgreSQL: `sslmode` in FLYWHEEL_DATABASE_URL reaches psycopg's connect (the server
  here has no TLS: `require` is refused by the server, `disable` connects).
- MLflow: the FLYWHEEL_MLFLOW_TRACKING_* credentials go out as Basic auth on MLflow's
  own requests to a tracking server (a recording HTTP server in the test).
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from flywheel.broker import (
    broker_binary,
    consumer_lag,
    ensure_topics,
    free_port,
    read_topic,
    wait_for_kafka,
)
from flywheel.client import Client, KafkaCorrections, Unavailable
from flywheel.events import ModelEvent, utcnow
from flywheel.feedback.consumer import KafkaBatchConsumer
from flywheel.feedback.deadletter import DeadLetterWriter
from flywheel.kafka_security import confluent_options, kafka_python_options
from flywheel.promotion import announce
from flywheel.registry import Registry
from flywheel.service import TLS, GracefulServer, KafkaSink, Record
from flywheel.settings import FeedbackSettings, KafkaSettings, RegistrySettings, StateSettings
from flywheel.store import make_engine
from tests.certs import Pair, TestCA
from tests.deadlines import deadline

pytestmark = pytest.mark.integration
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
ROW = [0.5] * 8
CLIENT_CN = "flywheel-client"


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> TestCA:
    return TestCA.make(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server_pair(ca: TestCA) -> Pair:
    return ca.issue("server", server=True)


@pytest.fixture(scope="module")
def client_pair(ca: TestCA) -> Pair:
    return ca.issue(CLIENT_CN, server=False)


# -- HTTPS on flywheel serve ------------------------------------------------------------------


def _serve(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [FLYWHEEL, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stop(proc: subprocess.Popen[str], *, terminate: bool = True) -> str:
    """The output once `proc` exited (after a SIGTERM if `terminate`); killed after 120 s."""
    if terminate and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=deadline(120))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def _env(settings, **tls: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    return env | {
        "FLYWHEEL_HOME": str(settings.home_dir),
        "FLYWHEEL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "FLYWHEEL_TOPIC_PREDICTIONS": settings.topic_predictions,
        "FLYWHEEL_TOPIC_CORRECTIONS": settings.topic_corrections,
        "FLYWHEEL_TOPIC_MODEL_EVENTS": settings.topic_model_events,
        "FLYWHEEL_TOPIC_DEADLETTER": settings.topic_deadletter,
        "FLYWHEEL_TOPIC_SCORES": settings.topic_scores,
        "FLYWHEEL_SEED_EXAMPLES": "1000",
        "FLYWHEEL_AUTH": "off",  # app keys are test_apps.py's concern: these are about TLS
        **{f"FLYWHEEL_{k.upper()}": str(v) for k, v in tls.items()},
    }


def test_serve_answers_https_to_a_client_that_trusts_the_ca_and_refuses_http(
    settings, ca, server_pair
):
    port = free_port()
    proc = _serve(_env(settings, tls_certfile=server_pair.cert, tls_keyfile=server_pair.key), port)
    try:
        with Client(f"https://127.0.0.1:{port}", verify=ca.cafile, retries=0) as fw:
            until = time.monotonic() + deadline(180)
            while not fw.ready():
                assert proc.poll() is None, f"serve exited: {proc.stdout.read()}"  # type: ignore[union-attr]
                assert time.monotonic() < until, "serve did not become ready over https"
                time.sleep(0.3)
            result = fw.predict([ROW, ROW])
            assert len(result.predictions) == 2 and result.model.version == "1"
        # the same port, plain http: no answer (uvicorn sees a broken TLS handshake)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        # a client that does not trust the test CA: the system's CAs are not enough
        with (
            Client(f"https://127.0.0.1:{port}", retries=0) as untrusting,
            pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"),
        ):
            untrusting.predict([ROW])
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out
    assert "Traceback" not in out


def test_a_missing_or_mismatched_certificate_stops_serve_in_one_line(
    settings, ca, server_pair, tmp_path
):
    missing = _serve(
        _env(settings, tls_certfile=tmp_path / "no.pem", tls_keyfile=server_pair.key), free_port()
    )
    out = _stop(missing, terminate=False)
    assert missing.returncode == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert (
        len(lines) == 1 and lines[0].startswith("error: ") and "FLYWHEEL_TLS_CERTFILE" in lines[0]
    )

    other = ca.issue("other", server=True)
    mismatched = _serve(
        _env(settings, tls_certfile=server_pair.cert, tls_keyfile=other.key), free_port()
    )
    out = _stop(mismatched, terminate=False)
    assert mismatched.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: the service did not start: TLS certificate {server_pair.cert} with key "
        f"{other.key}: " + errors[0].split(f"{other.key}: ", 1)[1]
    ]
    assert "Traceback" not in out


def test_mutual_tls_refuses_a_client_without_a_certificate(ca, server_pair, client_pair):
    app = FastAPI()
    app.get("/readyz")(lambda: {"ready": True})
    port = free_port()
    tls = TLS(server_pair.cert, server_pair.key, ca.cafile)
    server = GracefulServer(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", **tls.uvicorn_options()
        )  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with_cert = ssl.create_default_context(cafile=ca.cafile)
        with_cert.load_cert_chain(client_pair.cert, client_pair.key)
        until = time.monotonic() + deadline(30)
        while not server.started:
            assert time.monotonic() < until and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        with Client(f"https://127.0.0.1:{port}", verify=with_cert, retries=0) as fw:
            assert fw.ready()
        with Client(f"https://127.0.0.1:{port}", verify=ca.cafile, retries=0) as no_cert:
            assert not no_cert.ready()  # trusts the server, shows no certificate
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"https://127.0.0.1:{port}/readyz", verify=ssl_context(ca), timeout=5)
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


def ssl_context(ca: TestCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca.cafile)


# -- Kafka over TLS: a listener that records handshakes -----------------------------------------


class TLSListener:
    """Accepts TLS on loopback, requires a client certificate signed by `ca`, records the
    certificate's common name for each completed handshake, then hangs up."""

    def __init__(self, ca: TestCA, pair: Pair) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(pair.cert, pair.key)
        self._context.verify_mode = ssl.CERT_REQUIRED
        self._context.load_verify_locations(cafile=ca.cafile)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.bootstrap = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self.peers: list[str] = []
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self._context.wrap_socket(conn, server_side=True) as tls:
                    subject = dict(pair[0] for pair in tls.getpeercert()["subject"])  # type: ignore[index]
                    self.peers.append(subject["commonName"])
            except (OSError, ssl.SSLError) as exc:
                self.refused.append(type(exc).__name__)
            finally:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def _quietly(call: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):
        call()


@pytest.fixture(scope="module")
def handshakes(ca, server_pair, client_pair) -> Callable[..., TLSListener]:
    """`handshakes(call)`: runs `call(kafka)` in a thread, `kafka` being TLS settings that
    point at a new listener of its own (a client of an earlier call may still be retrying
    against its own listener: never counted here), and returns that listener once it has
    seen a handshake, or after 30 s."""

    def run(call: Callable[[KafkaSettings], object], *, timeout_s: float = 30.0) -> TLSListener:
        listener = TLSListener(ca, server_pair)
        kafka = KafkaSettings(
            kafka_bootstrap=listener.bootstrap,
            kafka_security_protocol="SSL",
            kafka_ssl_cafile=ca.cafile,
            kafka_ssl_certfile=client_pair.cert,
            kafka_ssl_keyfile=client_pair.key,
            kafka_timeout_s=2.0,
        )
        try:
            threading.Thread(target=lambda: _quietly(lambda: call(kafka)), daemon=True).start()
            until = time.monotonic() + timeout_s
            while not listener.peers and not listener.refused and time.monotonic() < until:
                time.sleep(0.05)
        finally:
            listener.close()
        return listener

    return run


def test_the_listener_refuses_a_client_without_the_certificate(handshakes, ca):
    from kafka import KafkaAdminClient

    def no_cert(k: KafkaSettings) -> object:
        return KafkaAdminClient(
            bootstrap_servers=k.kafka_bootstrap,
            bootstrap_timeout_ms=2000,
            security_protocol="SSL",
            ssl_cafile=str(ca.cafile),
        )

    seen = handshakes(no_cert)
    assert seen.peers == [] and seen.refused, "the control: no certificate, no handshake"


def _boot(k: KafkaSettings) -> str:
    assert k.kafka_bootstrap is not None
    return k.kafka_bootstrap


def test_every_kafka_python_entry_point_shows_the_client_certificate(handshakes):
    event = ModelEvent(
        kind="promoted", model_name="m", version="2", reason="t", actor="a", timestamp=utcnow()
    )
    opts = kafka_python_options
    calls: dict[str, Callable[[KafkaSettings], object]] = {
        "wait_for_kafka": lambda k: wait_for_kafka(_boot(k), 2, security=opts(k)),
        "ensure_topics": lambda k: ensure_topics(_boot(k), ["t"], 1, security=opts(k)),
        "promotion announce": lambda k: announce(k, event, timeout_s=2),
        "dead-letter producer": lambda k: DeadLetterWriter(_boot(k), "dl", **opts(k)),
        "consumer_lag (flywheel status)": lambda k: consumer_lag(
            _boot(k), "g", ["t"], 2, security=opts(k)
        ),
        "read_topic": lambda k: read_topic(_boot(k), "t", timeout_s=2, security=opts(k)),
        "client KafkaCorrections": lambda k: KafkaCorrections(_boot(k), timeout_s=2, **opts(k)),
    }
    for name, call in calls.items():
        assert handshakes(call).peers[:1] == [CLIENT_CN], name


def test_the_confluent_kafka_producer_and_consumer_show_the_client_certificate(handshakes):
    def sink(k: KafkaSettings) -> None:
        s = KafkaSink(_boot(k), 2.0, **confluent_options(k))
        try:
            s.send([Record("t", b"k", b"v")], 2.0)
        finally:
            s.close()

    def consumer(k: KafkaSettings) -> None:
        c = KafkaBatchConsumer(
            FeedbackSettings(),
            k,
            ["t"],
            client_id="tls-test",
            on_revoked=lambda _: None,
            on_assigned=lambda _: None,
        )
        try:
            c.poll(10, 2.0)
        finally:
            c.close()

    assert handshakes(sink).peers[:1] == [CLIENT_CN], "event-log producer"
    assert handshakes(consumer).peers[:1] == [CLIENT_CN], "feedback consumer"


# -- Kafka SASL against Tansu with authentication ---------------------------------------------


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("sasl") / "tansu.log").open("w")
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(broker_binary()), "broker", "--listener-url", url]
        + ["--advertised-listener-url", url, "--authentication"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        until = time.monotonic() + deadline(30)
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert proc.poll() is None and time.monotonic() < until, "tansu did not start"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(deadline(10))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _sasl(bootstrap: str, mechanism: str) -> KafkaSettings:
    return KafkaSettings(
        kafka_bootstrap=bootstrap,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism=mechanism,  # type: ignore[arg-type]
        kafka_sasl_username="flywheel",
        kafka_sasl_password="not-a-user",
        kafka_timeout_s=2.0,
    )


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_the_event_log_producer_runs_scram_with_the_broker(sasl_broker, caplog, mechanism):
    caplog.set_level(logging.WARNING, logger="flywheel.kafka")
    k = _sasl(sasl_broker, mechanism)
    sink = KafkaSink(sasl_broker, 2.0, **confluent_options(k))
    try:
        assert sink.send([Record("t", b"k", b"v")], 2.0) == [False]
    finally:
        sink.close()
    said = " ".join(r.getMessage() for r in caplog.records if r.name == "flywheel.kafka")
    assert "SASL SCRAM authentication failed" in said and "unknown-user" in said


def test_kafka_python_runs_scram_with_the_broker(sasl_broker, caplog):
    caplog.set_level(logging.INFO, logger="kafka")
    k = _sasl(sasl_broker, "SCRAM-SHA-256")
    event = ModelEvent(
        kind="promoted", model_name="m", version="2", reason="t", actor="a", timestamp=utcnow()
    )
    assert announce(k, event, timeout_s=2) is False  # authentication failed: not announced
    scram = [r for r in caplog.records if r.name.startswith("kafka.net.sasl.scram")]
    assert scram, "kafka-python never started a SCRAM exchange"


# -- PostgreSQL sslmode, MLflow credentials ---------------------------------------------------


def test_sslmode_in_the_database_url_reaches_the_server(pg_url):
    server_has_tls = make_engine(pg_url)
    try:
        with server_has_tls.connect() as conn:
            on = conn.execute(text("SHOW ssl")).scalar() == "on"
    finally:
        server_has_tls.dispose()
    if on:
        pytest.skip("this PostgreSQL serves TLS: the refusal below needs one without")
    sep = "&" if "?" in pg_url else "?"
    plain = make_engine(f"{pg_url}{sep}sslmode=disable")
    required = make_engine(f"{pg_url}{sep}sslmode=require&connect_timeout=5")
    try:
        with plain.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        with pytest.raises(OperationalError, match="SSL"), required.connect():
            pass
    finally:
        plain.dispose()
        required.dispose()


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).seen.append(self.headers.get("Authorization"))
        body = json.dumps({"registered_models": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *_: object) -> None:
        pass


def test_mlflow_credentials_go_out_as_basic_auth(monkeypatch, tmp_path):
    for name in ("USERNAME", "PASSWORD", "TOKEN", "SERVER_CERT_PATH"):
        monkeypatch.setenv(f"MLFLOW_TRACKING_{name}", "stale")  # restored after the test
        monkeypatch.delenv(f"MLFLOW_TRACKING_{name}")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        state = StateSettings(
            home=tmp_path,
            mlflow_tracking_uri=f"http://127.0.0.1:{server.server_address[1]}",
            mlflow_tracking_username="flywheel",
            mlflow_tracking_password="pw:with-colon",
        )
        _Recorder.seen.clear()
        registry = Registry(state, RegistrySettings())
        assert registry.client.search_registered_models() == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    expected = "Basic " + base64.b64encode(b"flywheel:pw:with-colon").decode()
    assert _Recorder.seen and set(_Recorder.seen) == {expected}
