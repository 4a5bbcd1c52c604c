"""The Python client against an in-process fake service (httpx.MockTransport): retries and
their waits, errors, batching and what the server's limits teach it, input conversion
(pandas, pyarrow, numpy; a missing value leaves the feature out), corrections."""

from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys

import httpx
import pytest

from flywheel.client import (
    AsyncClient,
    AuthError,
    BadRequest,
    Client,
    Correction,
    FlywheelError,
    InvalidInput,
    KafkaCorrections,
    ModelRef,
    RetryPolicy,
    Unavailable,
)
from flywheel.events import CorrectionEvent, correction_id

URL = "http://flywheel.test"


class FakeService:
    """Answers like the real service: a prediction per row whose id names the row; can be
    told to fail the next requests, and to refuse batches over `max_batch` as it does."""

    def __init__(self, max_batch: int = 10_000, failures: list | None = None) -> None:
        self.max_batch = max_batch
        self.failures = list(failures or [])  # each: an int status, a Response or an exception
        self.requests: list[httpx.Request] = []
        self.version = "3"

    def bodies(self, path: str = "/v1/predict") -> list:
        return [json.loads(r.content) for r in self.requests if r.url.path == path]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            if isinstance(failure, httpx.Response):
                return failure
            return httpx.Response(failure, json={"detail": f"failure {failure}"})
        if request.url.path == "/v1/predict":
            rows = json.loads(request.content)["instances"]
            if len(rows) > self.max_batch:
                detail = (
                    f"batch of {len(rows)} instances exceeds the limit of {self.max_batch} "
                    "(FLYWHEEL_MAX_BATCH)"
                )
                return httpx.Response(413, json={"detail": detail})
            for i, row in enumerate(rows):
                if row == [-1]:
                    return httpx.Response(
                        422,
                        json={
                            "detail": f"instances[{i}] has 1 features; model m v3 expects 2",
                            "errors": [{"loc": ["body", "instances", i], "msg": "x"}],
                        },
                    )
            return httpx.Response(
                200,
                json={
                    "model": {"name": "flywheel", "version": self.version},
                    "predictions": [
                        {"id": f"id-{json.dumps(row)}", "label": "a", "probabilities": {"a": 1.0}}
                        for row in rows
                    ],
                },
            )
        if request.url.path == "/v1/corrections":
            items = json.loads(request.content)["corrections"]
            for i, c in enumerate(items):
                if c["label"] not in ("a", "b"):
                    detail = f"corrections[{i}].label: unknown label {c['label']!r}"
                    return httpx.Response(422, json={"detail": detail})
            return httpx.Response(202, json={"accepted": len(items)})
        if request.url.path == "/v1/model":
            return httpx.Response(
                200,
                json={
                    "name": "flywheel",
                    "version": self.version,
                    "loaded_at": "2026-12-07T10:00:00Z",
                    "input_dim": 2,
                    "labels": ["a", "b"],
                    "kind": "mlp",
                    "precision": "int8",
                    "features": ["x", "y"],
                },
            )
        if request.url.path == "/readyz":
            return httpx.Response(200, json={"ready": True})
        return httpx.Response(404, json={"detail": "Not Found"})


def make(service: FakeService, **kwargs) -> tuple[Client, list[float]]:
    waits: list[float] = []
    client = Client(URL, transport=httpx.MockTransport(service), sleep=waits.append, **kwargs)
    return client, waits


# -- retries --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_statuses_are_retried_with_growing_jittered_waits(status):
    service = FakeService(failures=[status, status, status])
    client, waits = make(service, retries=3, backoff=0.2)
    assert client.predict([[1, 2]]).labels == ["a"]
    assert len(service.requests) == 4
    assert len(waits) == 3
    for n, wait in enumerate(waits):  # backoff * 2**n, scaled by [0.5, 1]
        assert 0.1 * 2**n <= wait <= 0.2 * 2**n


def test_jitter_spreads_the_waits_of_clients_refused_together():
    policy = RetryPolicy(retries=3, backoff=1.0, rng=random.Random(1))
    assert len({round(policy.delay(2), 6) for _ in range(20)}) > 10


def test_retries_exhausted_raise_unavailable_with_the_last_detail():
    service = FakeService(failures=[503] * 10)
    client, waits = make(service, retries=2)
    with pytest.raises(Unavailable) as info:
        client.predict([[1, 2]])
    assert len(service.requests) == 3 and len(waits) == 2
    assert info.value.status == 503
    assert "after 3 attempts" in str(info.value) and "failure 503" in str(info.value)


def test_connection_errors_are_retried_then_unavailable():
    refused = httpx.ConnectError("connection refused")
    service = FakeService(failures=[refused, refused])
    client, waits = make(service, retries=3)
    assert client.model().version == "3"
    assert len(waits) == 2
    service.failures = [refused] * 5
    with pytest.raises(Unavailable, match="ConnectError: connection refused") as info:
        client.model()
    assert info.value.status is None


def test_retry_after_is_honoured_up_to_max_backoff():
    slow = httpx.Response(429, headers={"retry-after": "3"}, json={"detail": "slow down"})
    too_slow = httpx.Response(503, headers={"retry-after": "3600"}, json={"detail": "later"})
    service = FakeService(failures=[slow, too_slow])
    client, waits = make(service, retries=3, backoff=0.01, max_backoff=5.0)
    client.predict([[1, 2]])
    assert waits == [3.0, 5.0]


@pytest.mark.parametrize(
    "status,kind", [(400, BadRequest), (404, BadRequest), (422, BadRequest), (413, BadRequest)]
)
def test_other_4xx_are_never_retried(status, kind):
    service = FakeService(failures=[status])
    client, waits = make(service)
    with pytest.raises(kind) as info:
        client.predict([[1, 2]])
    assert len(service.requests) == 1 and waits == []
    assert info.value.status == status and info.value.detail == f"failure {status}"


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_raise_auth_error_without_retrying(status):
    service = FakeService(failures=[status])
    client, waits = make(service)
    with pytest.raises(AuthError) as info:
        client.correct([("p1", "a")])
    assert info.value.status == status and waits == [] and len(service.requests) == 1
    assert not isinstance(info.value, BadRequest)


def test_an_internal_error_is_unavailable_at_once():
    service = FakeService(failures=[httpx.Response(500, text="Internal Server Error")])
    client, waits = make(service)
    with pytest.raises(Unavailable, match="Internal Server Error"):
        client.predict([[1, 2]])
    assert waits == []


def test_the_servers_message_and_field_errors_are_carried():
    service = FakeService()
    client, _ = make(service)
    with pytest.raises(BadRequest) as info:
        client.predict([[1, 2], [-1]])
    assert info.value.detail == "instances[1] has 1 features; model m v3 expects 2"
    assert info.value.errors == [{"loc": ["body", "instances", 1], "msg": "x"}]


def test_a_response_of_the_wrong_shape_says_so():
    service = FakeService(failures=[httpx.Response(200, json={"model": {"name": "m"}})])
    client, _ = make(service)
    with pytest.raises(FlywheelError, match="POST /v1/predict: 'version' is None"):
        client.predict([[1, 2]])
    service.failures = [httpx.Response(200, text="<html>", headers={"content-type": "text/html"})]
    with pytest.raises(FlywheelError, match="not JSON"):
        client.predict([[1, 2]])
    service.failures = [httpx.Response(308, headers={"location": "https://flywheel.test/"})]
    with pytest.raises(FlywheelError, match="redirected .308. to https://flywheel.test/"):
        client.model()


# -- batching ---------------------------------------------------------------------------


def test_long_inputs_go_in_batches_and_come_back_in_order():
    service = FakeService()
    client, _ = make(service, batch_size=256)
    rows = [[i, i + 0.5] for i in range(600)]
    result = client.predict(rows)
    assert [len(b["instances"]) for b in service.bodies()] == [256, 256, 88]
    assert result.ids == [f"id-{json.dumps(r)}" for r in rows]
    assert result.model == ModelRef("flywheel", "3")
    assert client.predict(rows[:10], batch_size=4) and [
        len(b["instances"]) for b in service.bodies()[3:]
    ] == [4, 4, 2]


def test_a_batch_over_the_servers_limit_is_split_at_the_limit_it_names_and_remembered():
    service = FakeService(max_batch=100)
    client, waits = make(service)
    result = client.predict([[i, 0] for i in range(250)])
    sizes = [len(b["instances"]) for b in service.bodies()]
    assert sizes == [250, 100, 100, 50] and len(result) == 250 and waits == []
    client.predict([[i, 1] for i in range(150)])
    assert [len(b["instances"]) for b in service.bodies()][4:] == [100, 50]


def test_a_413_without_a_named_limit_halves_the_batch():
    too_big = httpx.Response(413, json={"detail": "request body of 9000 bytes exceeds the limit"})
    service = FakeService(failures=[too_big, too_big])
    client, _ = make(service)
    client.predict([[i, 0] for i in range(40)])
    assert [len(b["instances"]) for b in service.bodies()] == [40, 20, 10, 10, 10, 10]


def test_a_single_row_over_the_limit_is_an_error_not_a_loop():
    service = FakeService(max_batch=0)
    client, _ = make(service)
    with pytest.raises(BadRequest, match="exceeds the limit") as info:
        client.predict([[1, 2], [3, 4]])
    assert info.value.status == 413 and len(service.requests) == 2


def test_an_error_in_a_later_batch_names_the_callers_row():
    service = FakeService()
    client, _ = make(service, batch_size=256)
    rows = [[i, 0] for i in range(600)]
    rows[300] = [-1]
    with pytest.raises(BadRequest) as info:
        client.predict(rows)
    assert info.value.detail.startswith("instances[300] has 1 features")
    assert info.value.errors[0]["loc"] == ["body", "instances", 300]


def test_versions_that_answered_a_long_input_are_all_named():
    service = FakeService()
    client, _ = make(service, batch_size=2)
    original = service.__call__

    def swap_after_first(request):
        response = original(request)
        service.version = "4"
        return response

    client._http._transport = httpx.MockTransport(swap_after_first)
    result = client.predict([[1, 0], [2, 0], [3, 0]])
    assert [p.model.version for p in result.predictions] == ["3", "3", "4"]
    assert result.model.version == "4"
    assert [v.version for v in result.versions] == ["3", "4"]


# -- input conversion ---------------------------------------------------------------------


def sent_rows(service: FakeService) -> list:
    return [row for body in service.bodies() for row in body["instances"]]


def test_dicts_are_sent_as_named_features_and_missing_values_left_out():
    service = FakeService()
    client, _ = make(service)
    client.predict([{"amount": 12.5, "country": "FR", "vip": True, "age": None, "x": math.nan}])
    assert sent_rows(service) == [{"amount": 12.5, "country": "FR", "vip": True}]


def test_a_dataframe_is_sent_as_rows_of_named_features_with_missing_ones_left_out():
    pd = pytest.importorskip("pandas")
    np = pytest.importorskip("numpy")
    df = pd.DataFrame(
        {
            "amount": [12.5, np.nan, 3.0],
            "country": ["FR", None, "DE"],
            "count": pd.array([1, None, 3], dtype="Int64"),
            "when": [pd.Timestamp("2026-01-01"), pd.NaT, pd.NaT],
        }
    ).drop(columns=["when"])
    df["n"] = np.array([7, 8, 9], dtype=np.int32)
    service = FakeService()
    client, _ = make(service, batch_size=2)
    result = client.predict(df)
    assert sent_rows(service) == [
        {"amount": 12.5, "country": "FR", "count": 1, "n": 7},
        {"n": 8},
        {"amount": 3.0, "country": "DE", "count": 3, "n": 9},
    ]
    assert len(result) == 3 and [len(b["instances"]) for b in service.bodies()] == [2, 1]


def test_a_dataframe_with_non_string_columns_is_refused_with_a_hint():
    pd = pytest.importorskip("pandas")
    client, _ = make(FakeService())
    with pytest.raises(InvalidInput, match=r"column names must be strings.*to_numpy"):
        client.predict(pd.DataFrame([[1.0, 2.0]]))


def test_arrow_tables_and_record_batches_are_sent_like_dataframes():
    pa = pytest.importorskip("pyarrow")
    table = pa.table(
        {"amount": [12.5, None, float("nan")], "country": ["FR", "DE", None], "k": [1, 2, 3]}
    )
    expected = [
        {"amount": 12.5, "country": "FR", "k": 1},
        {"country": "DE", "k": 2},
        {"k": 3},
    ]
    for data in (table, table.to_batches()[0]):
        service = FakeService()
        client, _ = make(service, batch_size=2)
        assert len(client.predict(data)) == 3
        assert sent_rows(service) == expected


def test_a_numpy_matrix_is_sent_as_vectors():
    np = pytest.importorskip("numpy")
    service = FakeService()
    client, _ = make(service)
    client.predict(np.array([[1.5, 2.0], [3.0, 4.0]], dtype=np.float32))
    assert sent_rows(service) == [[1.5, 2.0], [3.0, 4.0]]
    with pytest.raises(InvalidInput, match=r"shape \(3,\); expected 2-D"):
        client.predict(np.zeros(3))
    client.predict([np.array([5, 6]), np.array([7.5, 8.0])])
    assert sent_rows(service)[2:] == [[5, 6], [7.5, 8.0]]


@pytest.mark.parametrize(
    "instances,message",
    [
        ([], "no instances"),
        ({"amount": 1}, "wrap a single row in a list"),
        ("1,2", "got str"),
        ([[1.0, math.nan]], r"instances\[0\]\[1\]: nan is not a finite number"),
        ([[1.0], [math.inf]], r"instances\[1\]\[0\]: inf is not a finite number"),
        ([[True, 1.0]], r"instances\[0\]\[0\]: True is not a number"),
        ([[1.0, "2"]], r"instances\[0\]\[1\]: '2' is not a number"),
        ([{"a": math.inf}], r"instances\[0\].a: inf is not a finite number"),
        ([{"a": [1, 2]}], r"instances\[0\].a: list \[1, 2\] is not a number"),
        ([{1: 2.0}], r"instances\[0\]: feature name 1 is not a string"),
        ([[1.0], 5], r"instances\[1\] must be a dict of named features or a list"),
    ],
)
def test_bad_instances_are_refused_before_anything_is_sent(instances, message):
    service = FakeService()
    client, _ = make(service)
    with pytest.raises(InvalidInput, match=message) as info:
        client.predict(instances)
    assert service.requests == [] and info.value.status is None
    assert isinstance(info.value, BadRequest) and isinstance(info.value, ValueError)


def test_a_bad_row_in_a_later_batch_is_refused_by_its_own_index():
    service = FakeService()
    client, _ = make(service, batch_size=2)
    with pytest.raises(InvalidInput, match=r"instances\[3\]\[0\]"):
        client.predict([[1.0], [2.0], [3.0], [math.nan]])


# -- corrections ------------------------------------------------------------------------


def test_corrections_in_every_form_are_sent_as_the_service_takes_them():
    service = FakeService()
    client, _ = make(service)
    accepted = client.correct(
        [
            ("p1", "a"),
            ("p2", "b", "app-7"),
            {"prediction_id": "p3", "label": "a"},
            {"prediction_id": "p4", "label": "b", "source": "site-1"},
            Correction("p5", "a"),
        ]
    )
    assert accepted == 5
    assert service.bodies("/v1/corrections") == [
        {
            "corrections": [
                {"prediction_id": "p1", "label": "a"},
                {"prediction_id": "p2", "label": "b", "source": "app-7"},
                {"prediction_id": "p3", "label": "a"},
                {"prediction_id": "p4", "label": "b", "source": "site-1"},
                {"prediction_id": "p5", "label": "a"},
            ]
        }
    ]
    assert client.send_corrections([("p6", "a")]) == 1


@pytest.mark.parametrize(
    "items,message",
    [
        ([], "no corrections"),
        (("p1", "a"), r"corrections\[0\] must be a \(prediction_id, label\) pair"),
        (Correction("p1", "a"), "wrap a single one in a list"),
        ([{"prediction_id": "p1"}], r"corrections\[0\].label: field required"),
        ([{"prediction_id": "p1", "label": "a", "subject": ""}], r"corrections\[0\].subject: ''"),
        ([{"prediction_id": "p1", "label": "a", "lable": "b"}], "unknown field 'lable'"),
        ([("p1", "")], r"corrections\[0\].label: '' is not a non-empty string"),
        ([("p1", 3)], r"corrections\[0\].label: 3 is not"),
        ([("p1", "a", 7)], r"corrections\[0\].source: 7 is not"),
    ],
)
def test_bad_corrections_are_refused_before_anything_is_sent(items, message):
    service = FakeService()
    client, _ = make(service)
    with pytest.raises(InvalidInput, match=message):
        client.correct(items)
    assert service.requests == []


def test_corrections_in_several_requests_say_how_many_were_accepted_before_a_refusal():
    service = FakeService()
    client, _ = make(service, corrections_batch_size=3)
    items = [(f"p{i}", "a") for i in range(8)]
    items[7] = ("p7", "zebra")
    with pytest.raises(BadRequest) as info:
        client.correct(items)
    assert info.value.accepted == 6
    assert info.value.detail == "corrections[7].label: unknown label 'zebra'"


def test_corrections_learn_the_servers_limit_from_a_413():
    limit = httpx.Response(
        413, json={"detail": "5 corrections exceed the limit of 2 (FLYWHEEL_MAX_CORRECTIONS)"}
    )
    service = FakeService(failures=[limit])
    client, _ = make(service)
    assert client.correct([(f"p{i}", "a") for i in range(5)]) == 5
    sizes = [len(b["corrections"]) for b in service.bodies("/v1/corrections")]
    assert sizes == [5, 2, 2, 1]


def test_the_kafka_record_is_the_services_event_with_its_deterministic_id():
    [(key, value)] = KafkaCorrections.encode([("p-1", "dog", "app-7")])
    event = CorrectionEvent.model_validate_json(value)
    assert key == b"p-1"
    assert (event.prediction_id, event.label, event.source) == ("p-1", "dog", "app-7")
    assert event.id == correction_id("p-1", "dog", "app-7") and event.schema_version == 1
    with pytest.raises(InvalidInput, match=r"corrections\[1\].prediction_id: String should"):
        KafkaCorrections.encode([("p-1", "dog"), ("bad id!", "dog")])


# -- model, readiness, headers, settings -----------------------------------------------


def test_model_info_is_parsed_and_keeps_fields_it_does_not_know():
    client, _ = make(FakeService())
    info = client.model()
    assert (info.name, info.version, info.input_dim, info.labels) == (
        "flywheel",
        "3",
        2,
        ("a", "b"),
    )
    assert info.precision == "int8" and info.loaded_at.tzinfo is not None
    assert info.raw["features"] == ["x", "y"] and info.ref == ModelRef("flywheel", "3")


def test_ready_is_true_false_or_an_error():
    client, _ = make(FakeService())
    assert client.ready() is True
    not_ready = httpx.Response(503, json={"ready": False})
    for failure in (not_ready, httpx.ConnectError("refused")):
        client, waits = make(FakeService(failures=[failure]))
        assert client.ready() is False and waits == []
    client, _ = make(FakeService(failures=[httpx.Response(404, json={"detail": "Not Found"})]))
    with pytest.raises(BadRequest, match="Not Found"):
        client.ready()


def test_wait_ready_polls_until_ready_or_gives_up():
    client, waits = make(FakeService(failures=[503, 503]))
    client.wait_ready(timeout_s=60, interval_s=0.5)
    assert waits == [0.5, 0.5]
    client, _ = make(FakeService(failures=[503] * 1000))
    with pytest.raises(Unavailable, match="not ready after 0 s"):
        client.wait_ready(timeout_s=0)


def test_the_api_key_is_sent_as_a_bearer_token():
    service = FakeService()
    client, _ = make(service, api_key="k-123")
    client.predict([[1, 2]])
    client.model()
    assert {r.headers["authorization"] for r in service.requests} == {"Bearer k-123"}
    service = FakeService()
    make(service)[0].model()
    assert "authorization" not in service.requests[0].headers


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"base_url": "flywheel:8000"}, "base_url must be an http"),
        ({"base_url": "http://[::1"}, "base_url must be an http"),
        ({"api_key": ""}, "api_key must be a non-empty string"),
        ({"api_key": "a\nb"}, "without spaces or newlines"),
        ({"retries": -1}, "retries must be 0 or more"),
        ({"backoff": -0.1}, "backoff must be"),
        ({"batch_size": 0}, "batch_size must be an integer from 1"),
        ({"timeout": 0}, "timeout must be seconds"),
    ],
)
def test_bad_client_settings_are_refused(kwargs, message):
    kwargs = {"base_url": URL, **kwargs}
    with pytest.raises(ValueError, match=message):
        Client(kwargs.pop("base_url"), **kwargs)


def test_importing_the_client_imports_no_component_and_no_heavy_library():
    code = (
        "import sys, flywheel.client; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch','numpy','pandas','pyarrow','kafka','pydantic','fastapi','sqlalchemy'} "
        "or m.startswith(('flywheel.service','flywheel.feedback','flywheel.learner',"
        "'flywheel.privacy','flywheel.kernels','flywheel.store'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the async client ---------------------------------------------------------------------


def test_the_async_client_retries_batches_and_raises_like_the_sync_one():
    async def main() -> None:
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)

        service = FakeService(max_batch=3, failures=[503, httpx.ReadTimeout("slow")])
        async with AsyncClient(
            URL, transport=httpx.MockTransport(service), sleep=sleep, backoff=0.1
        ) as fw:
            result = await fw.predict([[i, 0] for i in range(7)])
            assert [p.id for p in result.predictions] == [f"id-[{i}, 0]" for i in range(7)]
            assert len(waits) == 2 and 0.05 <= waits[0] <= 0.1 and 0.1 <= waits[1] <= 0.2
            assert [len(b["instances"]) for b in service.bodies()][2:] == [7, 3, 3, 1]
            assert await fw.correct([("p1", "a")]) == 1
            assert (await fw.model()).version == "3" and await fw.ready()
            with pytest.raises(BadRequest, match=r"instances\[4\] has 1 features"):
                await fw.predict([[0, 0]] * 4 + [[-1]])
            service.failures = [401]
            with pytest.raises(AuthError):
                await fw.send_corrections([("p1", "a")])

    asyncio.run(main())
