"""Shadows, canaries and guards in the service (issue 28): who answers a request, who scores
it off the path, and that the response never waits for a scorer. On an in-process app
with a list sink; the real broker and registry are in tests/integration/test_live_serving.py.
"""

from __future__ import annotations

import threading

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from torch import nn

from flywheel.events import PredictionEvent, ScoreEvent
from flywheel.modelspec import ModelSpec, build_model
from flywheel.service import (
    ROUTING_HEADER,
    LiveRouter,
    ModelHolder,
    ServedModel,
    ServedSet,
    ServiceConfig,
    create_app,
)
from flywheel.service.live import in_share
from flywheel.settings import GateSettings, Settings

SPEC = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"])
ROWS = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 1.0, -2.0]]


def model(version: str, module: nn.Module | None = None) -> ServedModel:
    torch.manual_seed(int(version))
    return ServedModel.prepare("m", version, SPEC, module or build_model(SPEC))


def router(**shares: float) -> LiveRouter:
    return LiveRouter(GateSettings(**shares), "scores", CollectorRegistry(), lambda: None)


# --- the hash and the routing decision ----------------------------------------------------------


def test_in_share_takes_the_share_asked_for_and_keeps_it_as_the_share_grows():
    keys = [f"key-{i}" for i in range(20_000)]
    for share in (0.05, 0.1, 0.5):
        taken = sum(in_share(k, share) for k in keys) / len(keys)
        assert abs(taken - share) < 0.01, (share, taken)
    small = {k for k in keys if in_share(k, 0.05)}
    large = {k for k in keys if in_share(k, 0.2)}
    assert small < large  # a key in the canary at 5 % stays in it at 20 %
    assert not any(in_share(k, 0.0) for k in keys[:100])
    assert all(in_share(k, 1.0) for k in keys[:100])


def test_a_routing_key_is_sticky_and_the_canary_answers_its_share_of_keys():
    served = ServedSet(model("1"), canary=model("2"))
    r = router(live_canary_share=0.25)
    answered = {}
    for i in range(4_000):
        key = f"user-{i}"
        versions = {r.route(served, {ROUTING_HEADER: key}).answering.version for _ in range(3)}
        assert len(versions) == 1, key  # the same key, the same version, every time
        answered[key] = versions.pop()
    share = sum(v == "2" for v in answered.values()) / len(answered)
    assert abs(share - 0.25) < 0.03, share
    plan = r.route(served, {ROUTING_HEADER: next(k for k, v in answered.items() if v == "2")})
    assert plan.canary and plan.paired is served.champion  # the champion scores beside it
    plan = r.route(served, {ROUTING_HEADER: next(k for k, v in answered.items() if v == "1")})
    assert not plan.canary and plan.answering is served.champion


def test_without_a_routing_key_each_request_draws():
    served = ServedSet(model("1"), canary=model("2"))
    r = router(live_canary_share=0.5)
    versions = [r.route(served, {}).answering.version for _ in range(2_000)]
    assert 0.4 < versions.count("2") / len(versions) < 0.6
    assert router(live_canary_share=0.0).route(served, {}).answering.version == "1"
    # no canary held: the champion answers every key; the shadow and guard only score
    plan = r.route(ServedSet(model("1"), shadow=model("3"), guard=model("4")), {})
    assert plan.answering.version == "1" and not plan.canary
    assert [(role, m.version) for role, m in plan.scorers] == [("shadow", "3"), ("guard", "4")]


def test_a_version_scores_each_prediction_once_and_never_one_it_answered():
    one, two, three = model("1"), model("2"), model("3")
    # the same version as shadow and guard: it scores once, as the shadow
    assert [(r, m.version) for r, m in ServedSet(one, shadow=two, guard=two).scorers()] == [
        ("shadow", "2")
    ]
    # the canary is also the shadow: on the requests it answers it does not score itself
    served = ServedSet(one, canary=two, shadow=two, guard=three)
    plan = router(live_canary_share=1.0).route(served, {ROUTING_HEADER: "k"})
    assert plan.answering is two and [(r, m.version) for r, m in plan.scorers] == [("guard", "3")]
    plan = router(live_canary_share=0.0).route(served, {ROUTING_HEADER: "k"})
    assert plan.answering is one and [m.version for _, m in plan.scorers] == ["2", "3"]


# --- the served set -----------------------------------------------------------------------------


def test_a_served_set_never_holds_the_champion_in_a_role():
    one, two = model("1"), model("2")
    with pytest.raises(ValueError, match="v1 is the champion; it cannot be the shadow"):
        ServedSet(one, shadow=one)
    # the canary promoted: swapping it in as champion drops it from its role, keeps the rest
    promoted = ServedSet(one, canary=two, shadow=model("3")).with_champion(two)
    assert promoted.champion is two and set(promoted.roles()) == {"shadow"}


def test_the_holder_swaps_champion_and_roles_as_one_snapshot():
    holder = ModelHolder()
    one, two, three = model("1"), model("2"), model("3")
    assert holder.swap(one) is None
    before = holder.served_set()
    assert before.plain and holder.current() is one
    holder.swap_set(ServedSet(one, shadow=two, canary=three))
    after = holder.served_set()
    assert before.plain and before.champion is one  # a request's snapshot never changes
    assert (after.shadow, after.canary, holder.current()) == (two, three, one)
    assert holder.swap(two) is one  # `swap` (the champion only) keeps the other roles
    assert holder.served_set().roles() == {"canary": three}


# --- on the app: answers, scores, and nothing waits for a scorer ---------------------------------


class Blocking(nn.Module):
    """A model whose forward pass waits for `gate` (once the warm-up is done)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build_model(SPEC)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def forward(self, x):
        self.entered.set()
        assert self.gate.wait(30)
        return self.inner(x)


@pytest.fixture()
def app_with(tmp_path, list_event_log, app_key):
    """`app_with(served_set, **settings)`: a TestClient on an app serving that set."""
    clients = []

    def make(served: ServedSet, **overrides):
        settings = Settings(home=tmp_path, **overrides)
        holder = ModelHolder()
        holder.swap_set(served)
        sent: list = []
        log = list_event_log(sent)
        app = create_app(ServiceConfig.of(settings), holder=holder, event_log=log)
        client = TestClient(app, headers=app_key.headers)
        client.__enter__()
        clients.append(client)
        client.sent, client.event_log = sent, log
        client.live = app.state.service.live
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def flushed(client) -> tuple[list[PredictionEvent], list[ScoreEvent]]:
    assert client.live.wait_idle(10)
    assert client.event_log.wait_idle(10)
    preds = [
        PredictionEvent.model_validate_json(r.value)
        for r in client.sent
        if r.topic == "flywheel.predictions"
    ]
    scores = [
        ScoreEvent.model_validate_json(r.value) for r in client.sent if r.topic == "flywheel.scores"
    ]
    for r in client.sent:
        if r.topic == "flywheel.scores":
            assert r.key.decode() == ScoreEvent.model_validate_json(r.value).prediction_id
    return preds, scores


def metric(client, name: str, **labels: str) -> float:
    text = client.get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


def test_the_response_does_not_wait_for_a_slow_shadow(app_with):
    slow = Blocking()
    shadow = model("2", slow)
    client = app_with(ServedSet(model("1"), shadow=shadow), live_shadow_share=1.0)
    slow.gate.clear()
    slow.entered.clear()
    r = client.post("/v1/predict", json={"instances": ROWS})
    assert r.status_code == 200 and r.json()["model"]["version"] == "1"
    assert slow.entered.wait(10)  # the shadow is scoring now, and blocked ...
    assert not slow.gate.is_set()  # ... yet the response came back
    r2 = client.post("/v1/predict", json={"instances": ROWS[:1]})  # and the next one too
    assert r2.status_code == 200
    slow.gate.set()
    preds, scores = flushed(client)
    ids = [p["id"] for p in r.json()["predictions"]] + [r2.json()["predictions"][0]["id"]]
    assert [p.id for p in preds] == ids and {p.model_version for p in preds} == {"1"}
    assert sorted(s.prediction_id for s in scores) == sorted(ids)
    assert {(s.model_version, s.role) for s in scores} == {("2", "shadow")}
    assert metric(client, "flywheel_scores_logged_total", model_version="2", role="shadow") == 5


def test_a_full_scoring_queue_drops_and_counts_never_blocks(list_event_log):
    slow = Blocking()
    sent: list = []
    log = list_event_log(sent).start()
    metrics = CollectorRegistry()
    live = LiveRouter(
        GateSettings(live_shadow_share=1.0), "scores", metrics, lambda: log, max_pending=1
    ).start()
    try:
        served = ServedSet(model("1"), shadow=model("2", slow))
        x = torch.tensor(ROWS).numpy()
        slow.gate.clear()
        slow.entered.clear()

        def request(n: int) -> None:
            plan = live.route(served, {})
            live.after(plan, x[:n], [{"id": f"p{len(sent)}-{n}-{i}"} for i in range(n)])

        request(1)
        assert slow.entered.wait(10)  # job 1 is being scored (blocked), the queue is empty
        for _ in range(3):  # job 2 waits in the queue; jobs 3 and 4 do not fit
            request(2)  # returns at once although nothing is scored
        text = generate_latest(metrics).decode()
        assert (
            'flywheel_scores_dropped_total{model_version="2",reason="queue_full",role="shadow"} 4.0'
        ) in text
        slow.gate.set()
        assert live.wait_idle(10) and log.wait_idle(10)
        assert len(sent) == 3  # job 1 (one row) and job 2 (two rows)
    finally:
        slow.gate.set()
        live.close()
        log.close()


def test_the_shadow_scores_only_the_sampled_share_whoever_answers(app_with):
    client = app_with(
        ServedSet(model("1"), shadow=model("2"), guard=model("3")), live_shadow_share=0.3
    )
    ids = []
    for _ in range(40):
        r = client.post("/v1/predict", json={"instances": ROWS})
        assert r.status_code == 200 and r.json()["model"]["version"] == "1"
        assert "probabilities" in r.json()["predictions"][0]
        ids += [p["id"] for p in r.json()["predictions"]]
    _, scores = flushed(client)
    sampled = {i for i in ids if in_share(i, 0.3)}
    assert 0.2 < len(sampled) / len(ids) < 0.4
    for role, version in (("shadow", "2"), ("guard", "3")):
        mine = [s for s in scores if s.role == role]
        assert {s.prediction_id for s in mine} == sampled  # exactly the sampled rows, once
        assert len(mine) == len(sampled) and {s.model_version for s in mine} == {version}
    # the scores are the scorer's own: the shadow's probabilities for the row it scored
    held = client.app.state.service.holder.served_set()
    shadow = {s.prediction_id: s for s in scores if s.role == "shadow"}
    checked = 0
    for row in range(len(ROWS)):
        pid = next((i for i in ids[row::4] if i in shadow), None)
        if pid is None:
            continue
        expected = held.shadow.predict_proba(torch.tensor([ROWS[row]]).numpy())[0]
        champion = held.champion.predict_proba(torch.tensor([ROWS[row]]).numpy())[0]
        got = list(shadow[pid].probabilities.values())
        assert got == pytest.approx(expected.tolist(), abs=1e-6)
        assert got != pytest.approx(champion.tolist(), abs=1e-6)
        checked += 1
    assert checked >= 2


def test_the_canary_answers_its_keys_and_the_champion_scores_beside_it(app_with):
    client = app_with(
        ServedSet(model("1"), canary=model("2")), live_canary_share=0.5, live_shadow_share=0.0
    )
    by_key: dict[str, set[str]] = {}
    answered: dict[str, str] = {}
    for i in range(30):
        key = f"k{i}"
        for _ in range(2):
            r = client.post(
                "/v1/predict", json={"instances": ROWS[:2]}, headers={ROUTING_HEADER: key}
            )
            assert r.status_code == 200
            version = r.json()["model"]["version"]
            by_key.setdefault(key, set()).add(version)
            for p in r.json()["predictions"]:
                answered[p["id"]] = version
    assert all(len(v) == 1 for v in by_key.values())  # sticky
    canary_keys = {k for k, v in by_key.items() if v == {"2"}}
    assert canary_keys == {k for k in by_key if in_share(k, 0.5)}
    preds, scores = flushed(client)
    assert {p.id: p.model_version for p in preds} == answered  # logged as answered
    canary_ids = {i for i, v in answered.items() if v == "2"}
    assert {s.prediction_id for s in scores} == canary_ids
    assert {(s.model_version, s.role) for s in scores} == {("1", "champion")}
    assert metric(client, "flywheel_canary_answers_total", model_version="2") == len(canary_ids)
    info = client.get("/v1/model").json()
    assert info["version"] == "1"
    assert {r: (v["version"], v["share"]) for r, v in info["roles"].items()} == {
        "champion": ("1", 0.5),
        "canary": ("2", 0.5),
    }


def test_v1_model_reports_the_roles_held(app_with):
    client = app_with(ServedSet(model("1"), shadow=model("2"), guard=model("3")))
    roles = client.get("/v1/model").json()["roles"]
    assert {r: (v["version"], v["share"]) for r, v in roles.items()} == {
        "champion": ("1", 1.0),
        "shadow": ("2", 0.1),
        "guard": ("3", 0.1),
    }


def test_a_champion_alone_logs_no_scores(app_with):
    client = app_with(ServedSet(model("1")), live_shadow_share=1.0, live_canary_share=1.0)
    r = client.post("/v1/predict", json={"instances": ROWS}, headers={ROUTING_HEADER: "a"})
    assert r.status_code == 200 and r.json()["model"]["version"] == "1"
    preds, scores = flushed(client)
    assert len(preds) == 4 and scores == []
    assert client.get("/v1/model").json()["roles"] == {
        "champion": {
            "version": "1",
            "share": 1.0,
            "loaded_at": client.get("/v1/model").json()["loaded_at"],
        }
    }
    assert b"flywheel_scores_logged_total{" not in generate_latest(
        client.app.state.service.metrics.registry
    )


def test_on_v2_infer_the_canary_answers_its_keys_unless_the_path_names_a_version(app_with):
    client = app_with(
        ServedSet(model("1"), canary=model("2")), live_canary_share=0.5, live_shadow_share=0.0
    )
    body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": ROWS[:2]}]}
    answered: dict[str, str] = {}
    for i in range(20):
        key = f"k{i}"
        r = client.post("/v2/models/m/infer", json=body, headers={ROUTING_HEADER: key})
        assert r.status_code == 200, r.text
        version = r.json()["model_version"]
        assert version == ("2" if in_share(key, 0.5) else "1")
        ids = next(o for o in r.json()["outputs"] if o["name"] == "prediction_id")["data"]
        answered.update(dict.fromkeys(ids, version))
        pinned = client.post(
            "/v2/models/m/versions/1/infer", json=body, headers={ROUTING_HEADER: key}
        )
        assert pinned.status_code == 200 and pinned.json()["model_version"] == "1"
    assert set(answered.values()) == {"1", "2"}
    preds, scores = flushed(client)
    canary_ids = {i for i, v in answered.items() if v == "2"}
    assert {p.id: p.model_version for p in preds if p.id in answered} == answered
    assert {s.prediction_id for s in scores} == canary_ids  # the champion scored each
    assert {(s.model_version, s.role) for s in scores} == {("1", "champion")}
