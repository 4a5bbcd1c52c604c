"""Part 7 of issue 26 on the production app: no CDN-loaded /docs, every documented 401, 403,
404 and 409 answered with the body its OpenAPI entry names, a slow client's headers timed
out (a raw socket against uvicorn), and a too-large body answered with a readable 413."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from pydantic import BaseModel

from flywheel.broker import free_port
from flywheel.modelspec import ModelSpec, build_model
from flywheel.registry import Registry
from flywheel.service import GracefulServer, ModelHolder, ServedModel, ServiceConfig, create_app
from flywheel.service.schemas import ErrorBody, V2Error
from flywheel.service.slow_clients import header_timeout_protocol
from flywheel.settings import Settings
from tests.conftest import make_app_key

SPEC = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"])
TAGS = {
    "parent_version": "",
    "source": "manual",
    "examples": "seed[0,10)",
    "epsilon": "none",
    "delta": "none",
    "gate": "test",
}
BODY_MODELS: dict[str, type[BaseModel]] = {"ErrorBody": ErrorBody, "V2Error": V2Error}


def _app(settings: Settings, list_event_log):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    holder = ModelHolder()
    holder.swap(ServedModel.prepare("m", "7", SPEC, build_model(SPEC)))
    return create_app(ServiceConfig.of(settings), holder=holder, event_log=list_event_log([]))


def test_docs_pages_are_off_and_the_document_is_served(tmp_path, list_event_log, app_key):
    with TestClient(_app(Settings(home=tmp_path), list_event_log)) as client:
        for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert client.get(page).status_code == 404, page
        assert client.get("/openapi.json").json()["info"]["title"] == "Flywheel"


def _concrete(template: str) -> str:
    """A path of the served model (m v7) under /v2, of registry version 1 under /v1/review."""
    version = "1" if template.startswith("/v1/review") else "7"
    values = {"{name}": "m", "{version}": version}
    return re.sub(r"\{[^}]+\}", lambda m: values.get(m[0], "x"), template)


def test_every_documented_401_403_404_409_body_matches_its_schema(
    tmp_path, list_event_log, app_key
):
    """Each operation's documented 401/403/404/409 is provoked and its body validated against
    the schema the document names (`{"error"}` under /v2, `{"detail"}` elsewhere); a newly
    documented one without a way to provoke it here fails the test."""
    settings = Settings(home=tmp_path, registry_poll_s=60)
    registry = Registry.of(settings)
    v1 = registry.publish(SPEC, build_model(SPEC), tags=TAGS)
    registry.set_champion(v1)  # approve/reject v1: 409 (already champion); rollback: 409
    url = settings.resolved_database_url
    no_predict = make_app_key(url, "no-predict", "correct").headers
    no_write = make_app_key(url, "no-write", "predict").headers
    infer = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    bodies = {
        "/v1/predict": {"instances": [[1, 2, 3]]},
        "/v1/corrections": {"corrections": []},
        "/v1/review": {"reason": "looked at it"},
        "/v1/admin/forget": {"subject": "alice"},  # no FLYWHEEL_SUBJECT_KEY here: 409
        "/v2": infer,
    }
    with TestClient(_app(settings, list_event_log)) as client:
        doc = client.get("/openapi.json").json()
        documented = {
            (method.upper(), path, status): op["responses"][status]
            for path, ops in doc["paths"].items()
            for method, op in ops.items()
            for status in op["responses"]
            if status in ("401", "403", "404", "409")
        }
        assert len(documented) >= 15, sorted(documented)
        checked = set()
        for (method, path, status), entry in sorted(documented.items()):
            ref = entry["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
            target = _concrete(path)
            body = next((b for p, b in bodies.items() if path.startswith(p)), None)
            headers: dict[str, str] = dict(app_key.headers)
            if status == "401":
                headers = {}
            elif status == "403":
                headers = no_predict if path.startswith(("/v1/predict", "/v2")) else no_write
            elif status == "404":
                target = re.sub(r"/models/m\b", "/models/nope", target)
                target = re.sub(r"/versions/\d+", "/versions/99", target)
            r = client.request(method, target, json=body, headers=headers)
            assert r.status_code == int(status), (method, target, r.status_code, r.text)
            BODY_MODELS[ref].model_validate(r.json())  # what the document promises
            if ref == "ErrorBody":
                assert "error" not in r.json()
            checked.add((method, path, status))
        assert checked == set(documented)


@pytest.fixture()
def server(tmp_path: Path, list_event_log, app_key) -> Iterator[int]:  # type: ignore[no-untyped-def]
    """The app under uvicorn with the header timeout `flywheel serve` uses (1 s here) and a
    2 KiB body limit; yields its port."""
    settings = Settings(home=tmp_path, max_body_bytes=2048)
    port = free_port()
    config = uvicorn.Config(
        _app(settings, list_event_log),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        http=header_timeout_protocol(1.0),
    )
    srv = GracefulServer(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not srv.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.started
        yield port
    finally:
        srv.should_exit = True
        thread.join(30)


def _read_all(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return out
        if not chunk:
            return out
        out += chunk


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) from a keep-alive connection."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_headers_sent_slowly_get_a_408_and_the_connection_closes(server):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for _ in range(40):  # a header line every 0.25 s: never finishes on its own
            try:
                sock.sendall(b"X-Slow: yes\r\n")
            except OSError:
                closed = True
                break
            time.sleep(0.25)
            sock.settimeout(0.01)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    closed = True
                    break
            except (TimeoutError, BlockingIOError):
                pass
        assert closed, "a client sending headers for 10 s was never timed out"
        answer = _read_all(sock, 5)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started < 8


def test_an_idle_keep_alive_connection_closes_without_an_answer(server):
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        assert _read_all(sock, 5) == b""  # closed at the 1 s timeout, nothing sent


def test_a_normal_keep_alive_client_is_not_cut(server):
    """The timer restarts after each response: requests on one connection keep working."""
    with socket.create_connection(("127.0.0.1", server)) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(0.6)  # over half the timeout, twice: the timer was re-armed


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_too_large_body_without_expect_gets_a_readable_413(server, app_key, chunked):
    """The whole 4 MB body is sent before reading (no `Expect: 100-continue`), as a naive
    client does; the answer must still be a 413 with its reason, not a reset."""
    size = 4 * 1024 * 1024
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    auth = app_key.headers["Authorization"].encode()
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: " + auth + b"\r\n" + framing + b"\r\n\r\n"
        )
        chunk = b"1" * 65536
        for _ in range(size // len(chunk)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        answer = _read_response(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert ErrorBody.model_validate_json(body).detail.startswith("request body of")
