"""The Open Inference Protocol (KServe v2) endpoints: health, metadata, infer with one
numeric tensor or one tensor per feature, every row logged as a v1 prediction is, and
each error as `{"error": ...}` with the protocol's status."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from flywheel.events import NamedPredictionEvent, PredictionEvent
from flywheel.service import ModelHolder, ServiceConfig, create_app
from flywheel.settings import Settings

from .test_named_features import LEGACY, ROW, SPEC, make_client, served

INFER = "/v2/models/m/infer"


def tensor(name: str, data: list, datatype: str = "FP32", shape: list | None = None) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


@pytest.fixture()
def legacy(tmp_path, list_event_log, app_key):
    with make_client(tmp_path, list_event_log, LEGACY, app_key) as c:
        yield c


@pytest.fixture()
def named(tmp_path, list_event_log, app_key):
    with make_client(tmp_path, list_event_log, SPEC, app_key) as c:
        yield c


def flush(client) -> list:
    assert client.event_log.wait_idle(5)
    return client.sent


def test_health_and_server_metadata(legacy):
    assert legacy.get("/v2/health/live").json() == {"live": True}
    r = legacy.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}
    meta = legacy.get("/v2").json()
    assert meta["name"] == "flywheel" and meta["extensions"] == []


def test_metadata_of_a_vector_model(legacy):
    assert legacy.get("/v2/models/m").json() == {
        "name": "m",
        "versions": ["7"],
        "platform": "pytorch_flywheel",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "prediction_id", "datatype": "BYTES", "shape": [-1]},
        ],
    }
    assert legacy.get("/v2/models/m/versions/7").json()["versions"] == ["7"]


def test_metadata_of_a_model_with_features_lists_one_tensor_each(named):
    inputs = named.get("/v2/models/m").json()["inputs"]
    assert inputs == [  # ignored columns are not inputs
        {"name": "amount", "datatype": "FP32", "shape": [-1]},
        {"name": "country", "datatype": "BYTES", "shape": [-1]},
        {"name": "device", "datatype": "BYTES", "shape": [-1]},
        {"name": "mobile", "datatype": "BOOL", "shape": [-1]},
    ]
    assert named.get("/v2/models/m/ready").json() == {"name": "m", "ready": True}
    assert named.get("/v2/models/m/versions/7/ready").json() == {"name": "m", "ready": True}


@pytest.mark.parametrize(
    "data", [[1, 2, 3, 0.5, -1, 2], [[1, 2, 3], [0.5, -1, 2]]], ids=["flat", "nested"]
)
def test_infer_with_one_tensor_is_a_logged_prediction_per_row(legacy, data):
    body = {"id": "req-1", "inputs": [tensor("input-0", data, "FP64", [2, 3])]}
    r = legacy.post("/v2/models/m/versions/7/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["model_name"], out["model_version"], out["id"]) == ("m", "7", "req-1")
    probs, labels, ids = out["outputs"]
    assert (probs["name"], probs["shape"], probs["datatype"]) == ("probabilities", [2, 2], "FP32")
    assert (labels["shape"], labels["datatype"], ids["datatype"]) == ([2], "BYTES", "BYTES")
    assert abs(sum(probs["data"][:2]) - 1) < 1e-5
    # the same request on v1 gives the same probabilities
    v1 = legacy.post("/v1/predict", json={"instances": [[1, 2, 3], [0.5, -1, 2]]}).json()
    assert probs["data"] == [v for p in v1["predictions"] for v in p["probabilities"].values()]
    assert labels["data"] == [p["label"] for p in v1["predictions"]]
    events = [PredictionEvent.model_validate_json(rec.value) for rec in flush(legacy)][:2]
    assert [e.id for e in events] == ids["data"]
    assert [e.features for e in events] == [[1, 2, 3], [0.5, -1, 2]]
    assert [e.label for e in events] == labels["data"]


def test_infer_with_one_tensor_per_feature_logs_the_named_rows(named):
    body = {
        "inputs": [
            tensor("amount", [12.5, 30], "FP64"),
            tensor("country", [["FR"], ["JP"]], "BYTES", [2, 1]),
            tensor("device", ["ios", "android"], "BYTES"),
            tensor("mobile", [False, True], "BOOL"),
            tensor("user_id", ["u1", "u2"], "BYTES"),  # ignored: accepted and dropped
        ],
        "outputs": [{"name": "prediction_id"}, {"name": "label"}],
    }
    r = named.post(INFER, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert "id" not in out and [o["name"] for o in out["outputs"]] == ["prediction_id", "label"]
    v1 = named.post(
        "/v1/predict",
        json={"instances": [ROW, {"amount": 30, "country": "JP", "device": "android"}]},
    )
    assert out["outputs"][1]["data"] == [p["label"] for p in v1.json()["predictions"]]
    events = [NamedPredictionEvent.model_validate_json(r.value) for r in flush(named)]
    assert [e.id for e in events[:2]] == out["outputs"][0]["data"]
    assert events[0].row == ROW and events[0].features == [12.5, 2.0, 1.0, 0.0]
    assert events[1].row == {"amount": 30, "country": "JP", "device": "android", "mobile": True}
    metrics = named.get("/metrics").text
    assert 'flywheel_unknown_categories_total{feature="country",model="m"} 2.0' in metrics
    assert 'route="/v2/models/{name}/infer",status="200"' in metrics


BAD_LEGACY = [
    (
        {"inputs": [tensor("x", [1, 2], shape=[1, 3])]},
        400,
        "shape [1, 3] holds 3 elements; data has 2",
    ),
    ({"inputs": [tensor("x", [1, 2], shape=[1, 2])]}, 400, "takes [n, 3]"),
    ({"inputs": [tensor("x", [1, 2, 3], shape=[3])]}, 400, "shape [3]; model m v7 takes [n, 3]"),
    ({"inputs": [tensor("x", [1, True, 3], shape=[1, 3])]}, 400, "data[1]: True is not FP32"),
    ({"inputs": [tensor("x", [1, "2", 3], "INT64", [1, 3])]}, 400, "data[1]: '2' is not INT64"),
    ({"inputs": [tensor("x", [1, 300, 3], "UINT8", [1, 3])]}, 400, "an integer in [0, 255]"),
    ({"inputs": [tensor("x", ["a", "b", "c"], "BYTES", [1, 3])]}, 400, "takes numbers"),
    ({"inputs": [tensor("x", [1, 1e39, 3], shape=[1, 3])]}, 400, "outside float32 range"),
    ({"inputs": [tensor("x", [1, 2, 3], "FP8", [1, 3])]}, 400, "inputs[0].datatype: Input"),
    ({"inputs": [tensor("x", [], shape=[0, 3])]}, 400, "an empty batch"),
    ({"inputs": [tensor("x", [0] * 15, shape=[5, 3])]}, 413, "batch of 5 instances"),
    (
        {"inputs": [tensor("a", [1, 2, 3], shape=[1, 3]), tensor("b", [1], shape=[1])]},
        400,
        "inputs[0].name: 'a' is not a feature of model m",
    ),
    (
        {"inputs": [tensor("x", [1, 2, 3], shape=[1, 3])], "outputs": [{"name": "logits"}]},
        400,
        "outputs[0].name: 'logits' is not an output of model m",
    ),
    ({"inputs": []}, 400, "inputs: List should have at least 1 item"),
    ({"input": []}, 400, "inputs: field required"),
]


@pytest.mark.parametrize("body,status,message", BAD_LEGACY)
def test_bad_infer_requests_say_what_is_wrong_as_an_error_object(legacy, body, status, message):
    r = legacy.post(INFER, json=body)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and message in r.json()["error"], r.json()
    assert flush(legacy) == []


BAD_NAMED = [
    ([tensor("input", [1, 2, 3, 4], shape=[1, 4])], "has non-numeric features"),
    ([tensor("amount", [1.0]), tensor("amonut", [1.0])], "inputs[1].name: 'amonut' is not a"),
    ([tensor("amount", [1.0]), tensor("amount", [1.0])], "inputs[1].name: 'amount' is given"),
    ([tensor("device", ["ios", "ios"], "BYTES"), tensor("amount", [1.0])], "inputs[1]: 1 rows"),
    ([tensor("device", ["ios"], "BYTES", [2])], "inputs[0]: shape [2] holds 2 elements"),
    ([tensor("device", ["a", "b"], "BYTES", [1, 2])], "a feature's tensor is [n] (or [n, 1])"),
    ([tensor("device", ["ios"], "BYTES"), tensor("mobile", [1], "INT64")], "row[0].mobile"),
    ([tensor("amount", [1.0])], "row[0].device: is missing (this feature has no fill)"),
    ([tensor("device", ["ios"], "BYTES"), tensor("amount", ["1"], "BYTES")], "row[0].amount"),
]


@pytest.mark.parametrize("inputs,message", BAD_NAMED)
def test_bad_feature_tensors_name_the_tensor_or_the_row_and_feature(named, inputs, message):
    r = named.post(INFER, json={"inputs": inputs})
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert flush(named) == []


def test_unknown_models_and_versions_are_404(legacy):
    body = {"inputs": [tensor("x", [1, 2, 3], shape=[1, 3])]}
    for path in ("/v2/models/other/infer", "/v2/models/other", "/v2/models/other/ready"):
        r = legacy.post(path, json=body) if path.endswith("infer") else legacy.get(path)
        assert r.status_code == 404 and "model 'other' is not served here" in r.json()["error"]
    r = legacy.post("/v2/models/m/versions/6/infer", json=body)
    assert r.status_code == 404 and "the served version is '7'" in r.json()["error"]
    r = legacy.get("/v2/models/m/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert 'route="other",status="404"' in legacy.get("/metrics").text


def test_malformed_json_and_oversized_bodies_are_error_objects(tmp_path, list_event_log, app_key):
    with make_client(tmp_path, list_event_log, LEGACY, app_key, max_body_bytes=1024) as c:
        r = c.post(INFER, content=b'{"inputs": [', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON")
        big = {"inputs": [tensor("x", [0.5] * 300, shape=[100, 3])]}
        r = c.post(INFER, json=big)
        assert r.status_code == 413 and "exceeds the limit of 1024 bytes" in r.json()["error"]
        r = c.post(INFER, content=b"{}", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]
        paths = c.get("/openapi.json").json()["paths"]
        assert "415" in paths["/v2/models/{name}/infer"]["post"]["responses"]
        assert "415" not in paths["/v2/models/{name}"]["get"]["responses"]  # no body to refuse


def test_before_a_model_is_loaded_v2_answers_503(tmp_path, list_event_log, app_key):
    app = create_app(
        ServiceConfig.of(Settings(home=tmp_path)),
        holder=ModelHolder(),
        event_log=list_event_log(),
        load_model=lambda config: served(LEGACY),
    )
    client = TestClient(app, headers=app_key.headers)  # no lifespan: nothing loads the model
    assert client.get("/v2/health/ready").status_code == 503
    r = client.post(INFER, json={"inputs": [tensor("x", [1, 2, 3], shape=[1, 3])]})
    assert r.status_code == 503 and r.json() == {"error": "no model loaded yet; retry shortly"}
