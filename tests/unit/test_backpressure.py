"""Backpressure in-process: per-app token buckets (429 with Retry-After, counted per app),
and the bounded spool (503 with Retry-After once full, /readyz not ready above the
high-water mark and ready again once replay brings it under; nothing acknowledged lost).
The broker-stopped run of the same is tests/integration/test_backpressure.py."""

from __future__ import annotations

import time

import pytest
import torch
from fastapi.testclient import TestClient

from flywheel.modelspec import ModelSpec, build_model
from flywheel.service import EventLog, ModelHolder, ServedModel, ServiceConfig, Spool, create_app
from flywheel.service.ratelimit import RateLimits, TokenBucket
from flywheel.settings import AccessSettings, Settings
from flywheel.store import add_app, make_engine, session_factory

SPEC = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"])
PREDICT = ("/v1/predict", {"instances": [[1, 2, 3]]})
INFER = (
    "/v2/models/m/infer",
    {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
)


def correct(*ids: str) -> dict:
    return {"corrections": [{"prediction_id": p, "label": "cat"} for p in ids]}


def holder() -> ModelHolder:
    torch.manual_seed(0)
    h = ModelHolder()
    h.swap(ServedModel.prepare("m", "7", SPEC, build_model(SPEC)))
    return h


def metric(client: TestClient, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


# -- the bucket ------------------------------------------------------------------------------


def test_a_bucket_gives_its_burst_then_one_token_per_interval():
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # the next token in 1/rate
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0
    assert bucket.take(100.0) == 0.0  # refilled, but never past its burst
    assert sum(bucket.take(100.0) == 0.0 for _ in range(5)) == 2


def test_limits_take_the_apps_override_else_the_scope_default():
    limits = RateLimits(
        AccessSettings(
            rate_predict=10,
            rate_correct=0,
            rate_per_app={"shop": {"predict": (500, 1000), "correct": (2, 4)}, "free": {}},
        )
    )
    assert limits.of("shop", "predict") == (500, 1000)
    assert limits.of("shop", "correct") == (2, 4)
    assert limits.of("other", "predict") == (10, 10)  # no burst set: one second's worth
    assert limits.of("other", "correct") is None and limits.any
    assert not RateLimits(AccessSettings()).any  # nothing set: the middleware is left out


def test_a_per_app_override_with_a_rate_and_no_burst_is_refused():
    with pytest.raises(ValueError, match=r"shop.predict"):
        Settings(rate_per_app={"shop": {"predict": (5, 0)}})


# -- in the service --------------------------------------------------------------------------


def _key(client: TestClient, name: str, scopes: str = "predict,correct") -> dict[str, str]:
    home = client.app.state.service.config.state.home_dir
    engine = make_engine(f"sqlite:///{home}/flywheel.db")
    try:
        with session_factory(engine).begin() as session:
            key = add_app(session, name, scopes)
    finally:
        engine.dispose()
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def limited(tmp_path, list_event_log, app_key):
    """Keys on; 2 predict requests per app (refilled at one per 1,000 s), 1 correction
    request; app `tests` has its own, higher predict limit."""
    settings = Settings(
        home=tmp_path,
        rate_predict=0.001,
        rate_predict_burst=2,
        rate_correct=0.001,
        rate_correct_burst=1,
        rate_per_app={"tests": {"predict": (0.001, 4)}},
    )
    log = list_event_log([])
    with TestClient(create_app(ServiceConfig.of(settings), holder=holder(), event_log=log)) as c:
        yield c


def test_an_app_over_its_rate_gets_429_with_retry_after_and_is_counted(limited, app_key):
    shop = _key(limited, "shop")
    assert limited.post(*PREDICT[:1], json=PREDICT[1], headers=shop).status_code == 200
    assert limited.post(INFER[0], json=INFER[1], headers=shop).status_code == 200  # same scope
    r = limited.post(PREDICT[0], json=PREDICT[1], headers=shop)
    assert r.status_code == 429
    assert "over its predict rate limit" in r.json()["detail"]
    assert 900 <= int(r.headers["retry-after"]) <= 1000  # one token per 1,000 s
    r = limited.post(INFER[0], json=INFER[1], headers=shop)
    assert r.status_code == 429 and "rate limit" in r.json()["error"]  # /v2's error body
    # corrections are their own bucket
    assert limited.post("/v1/corrections", json=correct("p1"), headers=shop).status_code == 202
    assert limited.post("/v1/corrections", json=correct("p2"), headers=shop).status_code == 429
    # another app has its own buckets, and `tests` its own override (4)
    other = _key(limited, "other")
    assert limited.post(PREDICT[0], json=PREDICT[1], headers=other).status_code == 200
    codes = [
        limited.post(PREDICT[0], json=PREDICT[1], headers=app_key.headers).status_code
        for _ in range(5)
    ]
    assert codes == [200, 200, 200, 200, 429]
    assert metric(limited, "flywheel_rate_limited_total", app="shop", scope="predict") == 2
    assert metric(limited, "flywheel_rate_limited_total", app="shop", scope="correct") == 1
    assert metric(limited, "flywheel_rate_limited_total", app="tests", scope="predict") == 1
    assert metric(limited, "flywheel_rate_limited_total", app="other", scope="predict") == 0


def test_a_bad_key_is_refused_before_it_can_spend_a_bucket(limited):
    for _ in range(5):
        r = limited.post(PREDICT[0], json=PREDICT[1], headers={"Authorization": "Bearer x"})
        assert r.status_code == 401
    shop = _key(limited, "shop")
    assert limited.post(PREDICT[0], json=PREDICT[1], headers=shop).status_code == 200


def test_the_openapi_document_has_the_429_with_retry_after(limited):
    doc = limited.get("/openapi.json").json()
    for path in ("/v1/predict", "/v1/corrections", "/v2/models/{name}/infer"):
        answer = doc["paths"][path]["post"]["responses"]["429"]
        assert "Retry-After" in answer["headers"]


def test_with_keys_off_every_caller_shares_one_bucket(tmp_path, list_event_log):
    settings = Settings(home=tmp_path, auth="off", rate_predict=0.001, rate_predict_burst=2)
    app = create_app(ServiceConfig.of(settings), holder=holder(), event_log=list_event_log([]))
    with TestClient(app) as a, TestClient(app, headers={"X-Other": "client"}) as b:
        assert a.post(*PREDICT[:1], json=PREDICT[1]).status_code == 200
        assert b.post(*PREDICT[:1], json=PREDICT[1]).status_code == 200
        assert a.post(*PREDICT[:1], json=PREDICT[1]).status_code == 429
        assert b.post(*PREDICT[:1], json=PREDICT[1]).status_code == 429
        assert a.post("/v1/corrections", json=correct("p")).status_code == 202  # no limit
        assert metric(a, "flywheel_rate_limited_total", app="anonymous", scope="predict") == 2


# -- the bounded spool -----------------------------------------------------------------------


class Outage:
    """A Kafka sink that refuses everything while `down`, and keeps what it acknowledged."""

    def __init__(self) -> None:
        self.down = True
        self.sent: list = []

    def send(self, records, timeout_s):
        if self.down:
            return [False] * len(records)
        self.sent.extend(records)
        return [True] * len(records)

    def close(self) -> None:
        pass


def wait_until(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_full_spool_refuses_with_503_and_loses_nothing_acknowledged(tmp_path):
    sink = Outage()
    log = EventLog(lambda: sink, Spool(tmp_path / "spool", fsync=False), retry_s=0.05)
    max_bytes = 1 << 16
    settings = Settings(home=tmp_path, auth="off", spool_max_bytes=max_bytes, spool_high_water=0.5)
    app = create_app(ServiceConfig.of(settings), holder=holder(), event_log=log)
    acked: list[str] = []
    ready_seen_down_at: int | None = None
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
        for call in range(2000):
            ids = [f"p{call}-{i}" for i in range(10)]
            r = c.post("/v1/corrections", json=correct(*ids))
            if r.status_code == 503:
                break
            assert r.status_code == 202, r.text
            acked.extend(ids)
            ready = c.get("/readyz")
            if ready.status_code == 503 and ready_seen_down_at is None:
                ready_seen_down_at = log.spool.pending_bytes
                body = ready.json()
                assert body["spool_high_water"] and "spool" in body["down"]
        else:
            raise AssertionError("the spool never filled")
        assert "spool" in r.json()["detail"] and r.headers["retry-after"] == "5"
        # /readyz went not-ready at the mark, before the first refusal
        assert ready_seen_down_at is not None
        assert max_bytes // 2 < ready_seen_down_at < max_bytes
        full = c.post(*PREDICT[:1], json=PREDICT[1])  # predictions are refused too
        assert full.status_code == 503 and full.headers["retry-after"] == "5"
        infer = c.post(INFER[0], json=INFER[1])
        assert infer.status_code == 503 and "spool" in infer.json()["error"]
        assert metric(c, "flywheel_spool_full_refusals_total", kind="corrections") == 1
        assert metric(c, "flywheel_spool_full_refusals_total", kind="predictions") == 2
        assert metric(c, "flywheel_log_spool_bytes") >= max_bytes
        # the broker is back: replay drains the spool and the service is ready again
        sink.down = False
        wait_until(lambda: log.spool.pending == 0, what="the spool to drain")
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/corrections", json=correct("after")).status_code == 202
        wait_until(lambda: log.wait_idle(0.1), what="the last send")
    delivered = [r.key.decode() for r in sink.sent]
    assert set(delivered) == {*acked, "after"}  # every acknowledged one, no refused one
    assert len(acked) > 100
