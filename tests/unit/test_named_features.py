"""`POST /v1/predict` with named rows, by the served version's feature schema: each bad
value a 422 naming the field, fills, the unknown bucket counted in /metrics, the named row
in the prediction event, `GET /v1/model`'s schema and the OpenAPI document that follows
the champion. Vectors keep working where the model's inputs are all numbers."""

from __future__ import annotations

import orjson
import pytest
import torch
from fastapi.testclient import TestClient

from flywheel.events import NamedPredictionEvent, PredictionEvent
from flywheel.features import UNKNOWN, Feature, FeatureSchema
from flywheel.feedback.messages import decode
from flywheel.modelspec import ModelSpec, build_model
from flywheel.service import ModelHolder, ServedModel, ServiceConfig, create_app
from flywheel.settings import Settings

SCHEMA = FeatureSchema(
    label="fraud",
    labels=["no", "yes"],
    features=[
        Feature(name="amount", kind="numeric", mean=20.0, std=5.0),
        Feature(name="country", kind="categorical", vocabulary=["DE", "FR", "US"]),
        Feature(name="device", kind="categorical", vocabulary=["ios", "android"], missing="error"),
        Feature(name="mobile", kind="boolean", fill=True),
        Feature(name="user_id", kind="ignore"),
    ],
)
SPEC = ModelSpec(
    input_dim=SCHEMA.input_dim, labels=SCHEMA.labels, hidden=[8], embedding_dim=4, schema=SCHEMA
)
NUMERIC = FeatureSchema(
    label="kind",
    labels=["a", "b", "c"],
    features=[Feature(name=n, kind="numeric", mean=1.0) for n in ("x", "y", "z")],
)
NUMERIC_SPEC = ModelSpec(input_dim=3, labels=NUMERIC.labels, hidden=[4], schema=NUMERIC)
LEGACY = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"])
ROW = {"amount": 12.5, "country": "FR", "device": "ios", "mobile": False}


def served(spec, version: str = "7", name: str = "m") -> ServedModel:
    torch.manual_seed(0)
    return ServedModel.prepare(name, version, spec, build_model(spec))


def make_client(tmp_path, list_event_log, spec, key=None, **settings):
    """A client of an app on `tmp_path`; `key` (the `app_key` fixture) signs its requests."""
    holder = ModelHolder()
    holder.swap(served(spec))
    sent: list = []
    log = list_event_log(sent)
    app = create_app(
        ServiceConfig.of(Settings(home=tmp_path, max_batch=4, **settings)),
        holder=holder,
        event_log=log,
    )
    client = TestClient(app, headers=key.headers if key else None)
    client.sent, client.event_log, client.holder = sent, log, holder  # type: ignore[attr-defined]
    return client


@pytest.fixture(params=[True, False], ids=["batching", "no-batching"])
def client(request, tmp_path, list_event_log, app_key):
    with make_client(tmp_path, list_event_log, SPEC, app_key, dynamic_batching=request.param) as c:
        yield c


def flush(client) -> list:
    assert client.event_log.wait_idle(5)
    return client.sent


def test_named_rows_are_predicted_and_logged_with_the_row_and_the_raw_vector(client):
    rows = [
        {**ROW, "user_id": "u-17"},  # an ignored column: accepted, left out of the event
        {"country": "JP", "device": "android"},  # unseen category, amount and mobile filled
    ]
    r = client.post("/v1/predict", json={"instances": rows})
    assert r.status_code == 200, r.text
    ids = [p["id"] for p in r.json()["predictions"]]
    assert r.json()["model"] == {"name": "m", "version": "7"}
    sent = flush(client)
    assert [rec.key.decode() for rec in sent] == ids
    events = [NamedPredictionEvent.model_validate_json(rec.value) for rec in sent]
    assert events[0].row == ROW  # as sent, without user_id
    assert events[0].features == [12.5, 2.0, 1.0, 0.0]  # FR is code 2, ios 1, False 0
    assert events[1].row == {"country": "JP", "device": "android"}  # filled ones absent
    assert events[1].features == [20.0, UNKNOWN, 2.0, 1.0]  # the mean, the unknown bucket
    # consumers that do not read `row` take the same record
    assert PredictionEvent.model_validate_json(sent[0].value).features == events[0].features
    for rec in sent:  # what the feedback worker does with every record
        assert isinstance(decode("prediction", "t", 0, 0, rec.key, rec.value), PredictionEvent)


BAD_ROWS = [
    ({"amount": 1.0}, "instances[0].device: is missing (this feature has no fill)"),
    ({**ROW, "device": None}, "instances[0].device: is missing (this feature has no fill)"),
    ({**ROW, "amount": "12"}, "instances[0].amount: expected a number, got str '12'"),
    ({**ROW, "amount": True}, "instances[0].amount: expected a number, got bool True"),
    ({**ROW, "amount": 1e39}, "instances[0].amount: 1e+39 is not a finite float32 number"),
    ({**ROW, "amount": 10**400}, "instances[0].amount: "),
    ({**ROW, "mobile": "yes"}, "instances[0].mobile: expected true or false, got str 'yes'"),
    ({**ROW, "country": ["FR"]}, "instances[0].country: expected a category (text), got list"),
    ({**ROW, "amonut": 3}, "instances[0].amonut: unknown feature; the model's features are"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_each_bad_value_is_a_422_naming_the_row_and_field(client, row, message):
    r = client.post("/v1/predict", json={"instances": [ROW, row]})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(message.replace("[0]", "[1]")), r.json()
    assert flush(client) == []  # all or nothing


def test_non_finite_literals_in_a_named_row_are_refused(client):
    raw = b'{"instances": [{"amount": NaN, "device": "ios"}]}'
    r = client.post("/v1/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["detail"] == "instances[0].amount: nan is not a finite float32 number"


@pytest.mark.parametrize(
    "body,message",
    [
        (
            {"instances": [ROW, [1, 2, 3, 4]]},
            "instances[1]: instances[0] is a named row, so every instance must be one: "
            "send named rows or vectors, not both in one request",
        ),
        (
            {"instances": [[1, 2, 3, 4], ROW]},
            "instances[1]: instances[0] is a vector, so every instance must be one",
        ),
        (
            {"instances": [[1, 2, 3, 4]]},
            "instances: model m v7 has non-numeric features (country, device, mobile): "
            "send named rows",
        ),
        ({"instances": [ROW] * 5}, "batch of 5 instances exceeds the limit of 4"),
    ],
)
def test_vectors_and_mixed_requests_are_refused_for_a_categorical_model(client, body, message):
    r = client.post("/v1/predict", json=body)
    assert r.status_code in (413, 422) and r.json()["detail"].startswith(message), r.text
    assert flush(client) == []


def test_unseen_categories_are_counted_per_feature_in_metrics(client):
    rows = [
        {**ROW, "country": "JP"},
        {**ROW, "country": "BR", "device": "windows"},
        {**ROW, "country": "FR"},
        {**ROW, "country": None},  # missing: filled, not unseen
    ]
    assert client.post("/v1/predict", json={"instances": rows}).status_code == 200
    assert client.post("/v1/predict", json={"instances": rows[:1]}).status_code == 200
    text = client.get("/metrics").text
    assert 'flywheel_unknown_categories_total{feature="country",model="m"} 3.0' in text
    assert 'flywheel_unknown_categories_total{feature="device",model="m"} 1.0' in text
    assert 'feature="amount"' not in text


def test_an_integer_beyond_64_bits_is_logged_as_text(client):
    big = 2**70
    r = client.post("/v1/predict", json={"instances": [{**ROW, "country": big}]})
    assert r.status_code == 200, r.text
    (rec,) = flush(client)
    event = NamedPredictionEvent.model_validate_json(rec.value)
    assert event.row is not None and event.row["country"] == str(big)
    assert event.features[1] == UNKNOWN


def test_a_model_without_a_schema_takes_vectors_and_refuses_named_rows(
    tmp_path, list_event_log, app_key
):
    with make_client(tmp_path, list_event_log, LEGACY, app_key) as c:
        r = c.post("/v1/predict", json={"instances": [{"a": 1.0}]})
        assert r.status_code == 422
        assert r.json()["detail"] == (
            "instances[0]: model m v7 has no feature schema; it takes vectors of 3 numbers, "
            "not named features"
        )
        r = c.post("/v1/predict", json={"instances": [[1, 2, 3]]})
        assert r.status_code == 200
        (rec,) = flush(c)
        assert "row" not in orjson.loads(rec.value)  # vector events are as they were
        info = c.get("/v1/model").json()
        assert (info["features"], info["family"], info["kind"]) == (None, "mlp", "mlp")


def test_an_all_numeric_schema_takes_named_rows_and_vectors_alike(
    tmp_path, list_event_log, app_key
):
    with make_client(tmp_path, list_event_log, NUMERIC_SPEC, app_key) as c:
        named = c.post("/v1/predict", json={"instances": [{"x": 0.5, "y": -1, "z": 2}, {}]})
        vector = c.post("/v1/predict", json={"instances": [[0.5, -1, 2], [1, 1, 1]]})
        assert named.status_code == vector.status_code == 200
        p_named = [p["probabilities"] for p in named.json()["predictions"]]
        p_vector = [p["probabilities"] for p in vector.json()["predictions"]]
        assert p_named == p_vector  # {} is filled with every mean: [1, 1, 1]
        r = c.post("/v1/predict", json={"instances": [[1, 2]]})
        assert r.status_code == 422
        assert r.json()["detail"] == "instances[0] has 2 features; model m v7 expects 3"


def test_model_info_has_the_schema_and_the_family(client):
    info = client.get("/v1/model").json()
    assert info["family"] == "embed_mlp" and info["input_dim"] == 4
    assert FeatureSchema.model_validate(info["features"]) == SCHEMA


def _instances(doc: dict) -> dict:
    return doc["components"]["schemas"]["PredictRequest"]["properties"]["instances"]


def test_openapi_shows_the_champions_features_and_follows_a_hot_swap(client):
    doc = client.get("/openapi.json").json()
    instances = _instances(doc)
    assert "oneOf" not in instances  # a categorical model takes named rows only
    assert instances["items"] == {"$ref": "#/components/schemas/NamedRow"}
    row = doc["components"]["schemas"]["NamedRow"]
    assert list(row["properties"]) == ["amount", "country", "device", "mobile", "user_id"]
    assert row["required"] == ["device"] and row["additionalProperties"] is False
    country = row["properties"]["country"]
    assert country["x-flywheel-kind"] == "categorical"
    assert country["x-vocabulary"] == ["DE", "FR", "US"]
    assert country["type"] == ["string", "integer", "null"]
    assert row["properties"]["amount"]["type"] == ["number", "null"]
    assert "m v7" in row["description"]
    assert {"/v2/models/{name}/infer", "/v2/models/{name}"} <= set(doc["paths"])

    client.holder.swap(served(NUMERIC_SPEC, version="8"))  # what the registry follower does
    doc = client.get("/openapi.json").json()
    forms = _instances(doc)["oneOf"]
    assert forms[0]["items"]["minItems"] == forms[0]["items"]["maxItems"] == 3
    assert "x, y, z" in forms[0]["items"]["description"]
    assert list(doc["components"]["schemas"]["NamedRow"]["properties"]) == ["x", "y", "z"]

    client.holder.swap(served(LEGACY, version="9"))
    instances = _instances(client.get("/openapi.json").json())
    assert instances["items"]["type"] == "array" and instances["items"]["maxItems"] == 3
    assert "vectors" in instances["description"]


TRICKY = [1.5, 1, -0.0, 0, True, False, None, "FR", "JP", "1", 2, 3.4e38, 3.5e38, -3.4e38]
TRICKY += [float("nan"), float("inf"), 2**70, 10**400, [1], {"a": 1}]


def test_the_row_encoders_inline_path_agrees_with_each_features_encoder():
    """`RowEncoder` takes common values inline; every value must come out as the
    feature's own encoder (`FeatureSchema._encoders`, what `encode_rows` always used)
    makes it: the same float, the unknown bucket, or the same error."""
    from flywheel.features import FeatureError
    from flywheel.features.schema import _Bad, _Unknown

    encoders = dict(SCHEMA._encoders())
    row_encoder = SCHEMA.row_encoder()
    base = {"amount": 1.0, "country": "DE", "device": "ios", "mobile": True}
    for name, encode in encoders.items():
        for value in TRICKY:
            try:
                expected: object = encode(value)
            except _Unknown:
                expected = float(UNKNOWN)
            except _Bad as exc:
                expected = f"instances[0].{name}: {exc}"
            try:
                got: object = float(
                    row_encoder([{**base, name: value}]).x[0][list(encoders).index(name)]
                )
            except FeatureError as exc:
                got = str(exc)
            if isinstance(expected, float) and isinstance(got, float):
                expected = float(torch.tensor(expected, dtype=torch.float32))
            assert got == expected, (name, value)
