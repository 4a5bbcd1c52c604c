"""The HTTP contract and every bad-input case, on an in-process app with a fake sink."""

import json
import threading

import orjson
import pytest
import torch
from fastapi.testclient import TestClient

from flywheel.events import CorrectionEvent, PredictionEvent
from flywheel.modelspec import ModelSpec, build_model
from flywheel.service import ModelHolder, ServedModel, ServiceConfig, create_app
from flywheel.settings import Settings

SPEC = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"])


@pytest.fixture()
def client(tmp_path, list_event_log, app_key):
    torch.manual_seed(0)
    settings = Settings(home=tmp_path, max_batch=4, max_body_bytes=2048, max_corrections=3)
    holder = ModelHolder()
    holder.swap(ServedModel.prepare("m", "7", SPEC, build_model(SPEC)))
    sent = []
    log = list_event_log(sent)
    app = create_app(ServiceConfig.of(settings), holder=holder, event_log=log)
    with TestClient(app, headers=app_key.headers) as c:
        c.sent = sent
        c.event_log = log
        yield c


def flush(client):
    assert client.event_log.wait_idle(5)
    return client.sent


def test_predict_returns_ids_that_are_all_logged(client):
    r = client.post("/v1/predict", json={"instances": [[1, 2, 3], [0.5, -1, 2], [0, 0, 0]]})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == {"name": "m", "version": "7"}
    ids = [p["id"] for p in body["predictions"]]
    assert len(set(ids)) == 3
    for p in body["predictions"]:
        assert p["label"] in ("cat", "dog")
        assert set(p["probabilities"]) == {"cat", "dog"}
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-5
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    events = [PredictionEvent.model_validate_json(r.value) for r in flush(client)]
    assert [e.id for e in events] == ids
    assert all(r.topic == "flywheel.predictions" for r in client.sent)
    assert [r.key.decode() for r in client.sent] == ids
    assert events[1].features == [0.5, -1, 2] and events[1].model_version == "7"


def test_corrections_are_logged_keyed_by_prediction(client):
    r = client.post(
        "/v1/corrections",
        json={
            "corrections": [
                {"prediction_id": "p1", "label": "dog"},
                {"prediction_id": "p2", "label": "cat", "source": "site-a"},
            ]
        },
    )
    assert r.status_code == 202 and r.json() == {"accepted": 2}
    sent = flush(client)
    events = [CorrectionEvent.model_validate_json(r.value) for r in sent]
    # the source is the calling app (`tests`); a body source is a sub-source of it
    assert [(e.prediction_id, e.label, e.source) for e in events] == [
        ("p1", "dog", "tests"),
        ("p2", "cat", "tests/site-a"),
    ]
    assert [r.key for r in sent] == [b"p1", b"p2"]
    assert all(r.topic == "flywheel.corrections" for r in sent)


def test_a_resent_correction_is_the_same_event(client):
    """A retry after a lost response carries the same event id, which the store skips; a
    different label is a different correction, another sub-source of the same app is not
    (issue 26: one app's invented names are one voice; another app is: test_auth.py)."""
    one = {"prediction_id": "p1", "label": "dog", "source": "app-1"}
    for body in (one, one, {**one, "label": "cat"}, {**one, "source": "app-2"}):
        assert client.post("/v1/corrections", json={"corrections": [body]}).status_code == 202
    ids = [CorrectionEvent.model_validate_json(r.value).id for r in flush(client)]
    assert ids[0] == ids[1] == ids[3] and len(set(ids)) == 2


@pytest.mark.parametrize(
    "content_type, got",
    [
        (None, "the request had none"),  # a no-cors fetch with a Blob body sends none
        ("text/plain;charset=UTF-8", "got 'text/plain;charset=UTF-8'"),  # with a string body
        ("application/x-www-form-urlencoded", "got 'application/x-www-form-urlencoded'"),
    ],
)
def test_corrections_need_a_json_content_type(client, content_type, got):
    """A web page can send these cross-site without a CORS preflight: read as JSON, any
    page a user visited could post corrections."""
    body = json.dumps({"corrections": [{"prediction_id": "p1", "label": "dog"}]}).encode()
    headers = {} if content_type is None else {"content-type": content_type}
    request = client.build_request("POST", "/v1/corrections", content=body, headers=headers)
    assert request.headers.get("content-type") == content_type  # httpx adds none for bytes
    r = client.send(request)
    assert r.status_code == 415, r.text
    assert r.json()["detail"] == (
        f"send the body as JSON with Content-Type: application/json ({got})"
    )
    assert flush(client) == []
    r = client.post("/v1/corrections", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 202 and len(flush(client)) == 1
    responses = client.get("/openapi.json").json()["paths"]["/v1/corrections"]["post"]
    assert "415" in responses["responses"]


BAD_PREDICTS = [
    ({"instances": [[1, 2]]}, 422, "instances[0] has 2 features; model m v7 expects 3"),
    ({"instances": [[1, 2, 3], [1, 2, 3, 4]]}, 422, "instances[1] has 4 features"),
    ({"instances": []}, 422, "instances: List should have at least 1 item"),
    ({"instances": [[1, 2, 3]] * 5}, 413, "batch of 5 instances exceeds the limit of 4"),
    ({"instances": [[1, "x", 3]]}, 422, "instances[0][1]"),
    ({"instances": [[1, 1e39, 3]]}, 422, "outside float32 range"),
    ({"instance": [[1, 2, 3]]}, 422, "instances: field required"),
    ({"instances": [[1, 2, 3]], "extra": 1}, 422, "extra: Extra inputs are not permitted"),
    ([1, 2, 3], 422, "valid dictionary"),
    # JSON numbers only: no silent coercion of booleans or numeric strings
    ({"instances": [[True, False, True]]}, 422, "instances[0][0]: Input should be a valid number"),
    ({"instances": [["1", "2", "3"]]}, 422, "instances[0][0]: Input should be a valid number"),
]


@pytest.mark.parametrize("body,status,message", BAD_PREDICTS)
def test_bad_predict_input_says_what_is_wrong(client, body, status, message):
    r = client.post("/v1/predict", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert flush(client) == []


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(client, literal):
    raw = f'{{"instances": [[1, {literal}, 3]]}}'
    r = client.post("/v1/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "instances[0][1]: Input should be a finite number" in r.json()["detail"]


@pytest.mark.parametrize(
    "raw,status,fragment",
    [
        ('{"instances": [[1, 2', 400, "malformed JSON"),
        ("not json", 400, "malformed JSON"),
        ('{"instances": [[1,2,3]],}', 400, "malformed JSON"),
        ("", 422, "body: field required"),
        (b'{"instances": [[1, 2, 3]], "x": "\xff\xfe"}', 400, "the body is not UTF-8 text"),
    ],
)
def test_malformed_json_is_refused_with_a_reason(client, raw, status, fragment):
    r = client.post("/v1/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]


@pytest.mark.parametrize(
    "raw,fragment",
    [
        ('{"instances": ' + "[" * 5000 + "]" * 5000 + "}", "malformed JSON: nested too deeply"),
        ('{"instances": [[%s, 2, 3]]}' % ("1" * 5000), "malformed JSON: Exceeds the limit"),
    ],
)
def test_json_beyond_the_parser_limits_is_a_400_that_says_why(
    tmp_path, list_event_log, raw, fragment, app_key
):
    settings = Settings(home=tmp_path, max_body_bytes=1 << 20)
    holder = ModelHolder()
    holder.swap(ServedModel.prepare("m", "7", SPEC, build_model(SPEC)))
    app = create_app(ServiceConfig.of(settings), holder=holder, event_log=list_event_log([]))
    with TestClient(app, headers=app_key.headers) as c:
        r = c.post("/v1/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and fragment in r.json()["detail"], r.text


@pytest.mark.parametrize("batching", [True, False])
def test_features_too_large_for_the_models_scaling_are_refused(
    tmp_path, list_event_log, batching, app_key
):
    """Finite in float32, yet infinite once standardized: a 422, never a 200 whose
    probabilities are null (its logged event would be dead-lettered, its corrections lost)."""
    torch.manual_seed(0)
    model = build_model(SPEC)
    model[0].fit(torch.rand(100, 3))  # the input scaler: std ~0.29, so 3e38 overflows
    holder = ModelHolder()
    holder.swap(ServedModel.prepare("m", "7", SPEC, model))
    sent = []
    log = list_event_log(sent)
    settings = Settings(home=tmp_path, dynamic_batching=batching)
    app = create_app(ServiceConfig.of(settings), holder=holder, event_log=log)
    with TestClient(app, headers=app_key.headers) as c:
        r = c.post("/v1/predict", json={"instances": [[0.5, 0.5, 0.5], [3e38, -3e38, 3e38]]})
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith("instances[1]: the model's output is not finite")
        assert c.post("/v1/predict", json={"instances": [[0.5, 0.5, 0.5]]}).status_code == 200
        assert log.wait_idle(5)
    assert len(sent) == 1  # only the good request's prediction


def test_malformed_json_message(client):
    r = client.post(
        "/v1/predict", content='{"instances": [[1, 2', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["detail"].startswith("malformed JSON")


def test_content_type(client):
    body = json.dumps({"instances": [[1, 2, 3]]})
    r = client.post(
        "/v1/predict", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["detail"]
    for almost in ("text/json", "application/jsonl"):  # FastAPI would not parse these
        r = client.post("/v1/predict", content=body, headers={"content-type": almost})
        assert r.status_code == 415, (almost, r.text)
    r = client.post(
        "/v1/predict",
        content=body,
        headers={"content-type": "application/vnd.api+json; charset=utf-8"},
    )
    assert r.status_code == 200, r.text
    r = client.post("/v1/predict", content=body.encode(), headers={"content-type": ""})
    assert r.status_code == 200  # no Content-Type at all: read as JSON (predict only)


def test_oversized_body_is_a_413_by_header_and_by_stream(client):
    big = orjson.dumps({"instances": [[1.0, 2.0, 3.0]] * 200})
    r = client.post("/v1/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit of 2048 bytes" in r.json()["detail"]

    def chunks():
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit of 2048 bytes" in r.json()["detail"]
    assert flush(client) == []


BAD_CORRECTIONS = [
    (
        {"corrections": [{"prediction_id": "p", "label": "cow"}]},
        422,
        "corrections[0].label: unknown label 'cow'; known labels: ['cat', 'dog']",
    ),
    (
        {
            "corrections": [
                {"prediction_id": "p", "label": "cat"},
                {"prediction_id": "q", "label": "bird"},
            ]
        },
        422,
        "corrections[1].label",
    ),
    ({"corrections": []}, 422, "at least 1 item"),
    (
        {"corrections": [{"prediction_id": "bad id!", "label": "cat"}]},
        422,
        "corrections[0].prediction_id",
    ),
    ({"corrections": [{"label": "cat"}]}, 422, "corrections[0].prediction_id: field required"),
    (
        {"corrections": [{"prediction_id": "p", "label": "cat"}] * 4},
        413,
        "4 corrections exceed the limit of 3",
    ),
]


@pytest.mark.parametrize("body,status,message", BAD_CORRECTIONS)
def test_bad_corrections_are_refused_whole(client, body, status, message):
    r = client.post("/v1/corrections", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert flush(client) == []  # all or nothing: the valid one in a bad call is not logged


def test_model_health_ready_metrics_openapi(client):
    m = client.get("/v1/model").json()
    assert (m["name"], m["version"], m["input_dim"], m["labels"]) == ("m", "7", 3, ["cat", "dog"])
    assert "loaded_at" in m
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == "7"
    client.post("/v1/predict", json={"instances": [[1, 2, 3]]})
    client.post("/v1/predict", json={"instances": [[1, 2]]})
    text = client.get("/metrics").text
    assert 'flywheel_http_requests_total{route="/v1/predict",status="200"} 1.0' in text
    assert 'flywheel_http_requests_total{route="/v1/predict",status="422"} 1.0' in text
    assert 'flywheel_predictions_total{model_version="7"} 1.0' in text
    for name in (
        "flywheel_http_request_duration_seconds_bucket",
        "flywheel_log_queue_depth",
        "flywheel_log_spooled_records",
        'flywheel_model_info{name="m",version="7"}',
    ):
        assert name in text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/corrections", "/v1/model"} <= set(paths)


def test_concurrent_requests_each_get_their_own_ids(client):
    results = []

    def worker():
        for _ in range(20):
            r = client.post("/v1/predict", json={"instances": [[1, 2, 3], [3, 2, 1]]})
            results.extend(p["id"] for p in r.json()["predictions"])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(set(results)) == 160
    assert sorted(r.key.decode() for r in flush(client)) == sorted(results)


def test_not_ready_without_a_model(tmp_path, list_event_log):
    app = create_app(
        ServiceConfig.of(Settings(home=tmp_path)),
        holder=ModelHolder(),
        event_log=list_event_log(),
        load_model=lambda s: (_ for _ in ()).throw(RuntimeError("registry down")),
    )
    with pytest.raises(RuntimeError, match="registry down"), TestClient(app):
        pass
