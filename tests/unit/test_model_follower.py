"""The registry follower's decisions, with a fake registry: one load per new champion, a
failed load keeps the old model and is retried at the next poll, bad events are skipped."""

from __future__ import annotations

import threading
import time

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from flywheel.events import ModelEvent, utcnow
from flywheel.modelspec import ModelSpec, build_model
from flywheel.registry import LoadedVersion
from flywheel.service import FollowerStats, ModelFollower, ModelHolder, ServedModel
from flywheel.service.metrics import FollowerCollector
from flywheel.settings import Settings

SPEC = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"])


class FakeRegistry:
    """Champion alias + loads that can be held (`gate`) or made to fail (`broken`)."""

    def __init__(self, champion: str | None = "1") -> None:
        self.champion = champion
        self.loads: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.loading = threading.Event()
        self.broken: set[str] = set()
        self.alias_broken = False
        self.on_load = None
        self.specs: dict[str, ModelSpec] = {}  # a version's spec, if not SPEC

    def champion_version(self) -> str | None:
        if self.alias_broken:
            raise ConnectionError("registry down")
        return self.champion

    def load(self, version: str) -> LoadedVersion:
        self.loads.append(version)
        self.loading.set()
        if self.on_load:
            self.on_load()
        assert self.gate.wait(10)
        if version in self.broken:
            raise OSError(f"artifact of v{version} unreadable")
        spec = self.specs.get(version, SPEC)
        return LoadedVersion("m", version, spec, build_model(spec))


def served(version: str) -> ModelHolder:
    holder = ModelHolder()
    holder.swap(ServedModel.prepare("m", version, SPEC, build_model(SPEC)))
    return holder


def follower(
    tmp_path, registry: FakeRegistry, holder: ModelHolder, poll_s: float = 60.0
) -> ModelFollower:
    settings = Settings(home=tmp_path, model_name="m", registry_poll_s=poll_s)
    return ModelFollower(
        settings.kafka,
        settings.registry,
        settings.service,
        holder,
        registry=lambda: registry,
        listen=False,
    )


def wait_for(cond, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_check_swaps_only_when_the_champion_differs(tmp_path):
    reg, holder = FakeRegistry("1"), served("1")
    f = follower(tmp_path, reg, holder)
    assert f.check() is None and reg.loads == []
    reg.champion = "2"
    assert f.check() == "2"
    assert holder.current().version == "2" and reg.loads == ["2"]
    assert f.check() is None and reg.loads == ["2"]
    assert f.stats.swaps == 1 and f.stats.failures == 0 and f.stats.last_swap_s > 0


def _schema(vocabulary: list[str]):
    from flywheel.features import Feature, FeatureSchema

    return FeatureSchema(
        label="pet",
        labels=["cat", "dog"],
        features=[
            Feature(name="weight", kind="numeric"),
            Feature(name="size", kind="numeric"),
            Feature(name="colour", kind="categorical", vocabulary=vocabulary),
        ],
    )


def test_a_version_with_another_feature_schema_is_not_swapped_in(tmp_path, caplog):
    """Clients send rows of the served schema: another vocabulary would read the same
    category as another code. Refused once per version (logged once), then a version
    with the served schema swaps in as usual."""
    schema = _schema(["black", "white"])
    spec = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"], schema=schema)
    reg, holder = FakeRegistry("1"), ModelHolder()
    reg.specs = {
        "1": spec,
        "2": spec.model_copy(update={"schema_": _schema(["white", "black"])}),
        "3": SPEC,  # a vector model: no schema at all
        "4": spec.model_copy(update={"hidden": [8]}),  # the same schema
    }
    f = follower(tmp_path, reg, holder)
    assert f.check() == "1"
    reg.champion = "2"
    with caplog.at_level("ERROR", logger="flywheel.service.model_follower"):
        assert f.check() is None
        assert f.check() is None  # not loaded again, not logged again
    assert holder.current().version == "1" and reg.loads == ["1", "2"]
    assert f.stats.refused == 1 and f.stats.swaps == 1
    (record,) = caplog.records
    assert "not serving m v2" in record.getMessage()
    assert schema.fingerprint() in record.getMessage()
    reg.champion = "3"
    assert f.check() is None and "none (a vector model)" in (f.stats.last_error or "")
    reg.champion = "4"
    assert f.check() == "4" and holder.current().version == "4"
    assert f.stats.refused == 2 and f.stats.swaps == 2


def test_triggers_during_a_load_cause_no_second_load(tmp_path):
    """An event, its duplicate and a poll for the same version: one load."""
    reg, holder = FakeRegistry("1"), served("1")
    f = follower(tmp_path, reg, holder, poll_s=0.05).start()
    try:
        assert f.wait_idle(5)
        reg.gate.clear()
        reg.champion = "2"
        f.trigger()
        assert reg.loading.wait(5)
        for _ in range(5):
            f.trigger()
        time.sleep(0.2)  # several poll periods pass while the load is held
        assert holder.current().version == "1", "swapped before the load finished"
        reg.gate.set()
        assert wait_for(lambda: holder.current().version == "2")
        time.sleep(0.2)
        assert f.wait_idle(5)
    finally:
        f.stop()
    assert reg.loads == ["2"] and f.stats.swaps == 1


def test_a_failed_load_keeps_the_old_model_and_is_retried_at_the_next_poll(tmp_path):
    reg, holder = FakeRegistry("1"), served("1")
    reg.broken.add("2")
    f = follower(tmp_path, reg, holder, poll_s=0.2).start()
    try:
        reg.champion = "2"
        f.trigger()
        assert wait_for(lambda: f.stats.failures >= 2)  # retried
        assert holder.current().version == "1"
        assert "v2" in (f.stats.last_error or "")
        time.sleep(0.5)
        attempts = len(reg.loads)
        assert attempts <= 6, f"{attempts} loads in ~0.9 s at a 0.2 s poll: a retry storm"
        reg.broken.clear()
        assert wait_for(lambda: holder.current().version == "2")
    finally:
        f.stop()
    assert f.stats.swaps == 1 and set(reg.loads) == {"2"}


def test_a_registry_outage_keeps_serving_and_counts(tmp_path):
    reg, holder = FakeRegistry("2"), served("1")
    reg.alias_broken = True
    f = follower(tmp_path, reg, holder)
    assert f.check() is None
    assert f.stats.registry_errors == 1 and holder.current().version == "1"
    reg.alias_broken = False
    assert f.check() == "2"


def test_a_version_rolled_back_while_loading_is_never_served(tmp_path):
    reg, holder = FakeRegistry("2"), served("1")

    def rolled_back_meanwhile() -> None:
        if reg.loads == ["2"]:
            reg.champion = "1"

    reg.on_load = rolled_back_meanwhile
    f = follower(tmp_path, reg, holder)
    seen: list[str] = []
    real_swap = holder.swap
    holder.swap = lambda m: seen.append(m.version) or real_swap(m)  # type: ignore[method-assign]
    assert f.check() is None
    assert f.stats.superseded == 1 and seen == [] and holder.current().version == "1"
    assert f.check() is None  # back on v1: nothing to do


def test_events_wake_the_worker_only_for_this_model_and_bad_ones_are_skipped(tmp_path):
    f = follower(tmp_path, FakeRegistry("1"), served("1"))

    def event(model: str) -> bytes:
        return ModelEvent(
            kind="promoted", model_name=model, version="2", timestamp=utcnow()
        ).to_json()

    for bad in (
        b"not json",
        None,
        b"{}",
        orjson.dumps({"kind": "deleted", "model_name": "m", "version": "2", "timestamp": "x"}),
    ):
        f.on_event(bad)
    assert f.stats.events_malformed == 4 and not f._wake.is_set()
    f.on_event(event("other"))
    assert f.stats.events_ignored == 1 and not f._wake.is_set()
    f.on_event(event("m"))
    assert f.stats.events_followed == 1 and f._wake.is_set()


@pytest.mark.parametrize(
    "stats", [None, FollowerStats(swaps=3, failures=1, events_malformed=2, last_swap_s=0.25)]
)
def test_follower_metrics(stats):
    reg = CollectorRegistry()
    reg.register(FollowerCollector(lambda: stats))
    text = generate_latest(reg).decode()
    s = stats or FollowerStats()
    assert f"flywheel_model_swaps_total {float(s.swaps)}" in text
    assert f"flywheel_model_swap_failures_total {float(s.failures)}" in text
    assert f'flywheel_model_events_total{{outcome="malformed"}} {float(s.events_malformed)}' in text
    assert f"flywheel_model_last_swap_seconds {s.last_swap_s}" in text


def test_an_app_given_its_model_does_not_follow_the_registry_unless_asked(tmp_path):
    """A caller's own model (tests, benchmarks) must not be replaced behind its back."""
    from fastapi.testclient import TestClient

    from flywheel.service import EventLog, ServiceConfig, Spool, create_app

    class NullSink:
        def send(self, records, timeout_s):
            return [True] * len(records)

        def close(self):
            pass

    settings = Settings(home=tmp_path)
    for i, kwargs in enumerate(
        (
            {"holder": served("7")},
            {"load_model": lambda s: ServedModel.prepare("m", "7", SPEC, build_model(SPEC))},
        )
    ):
        log = EventLog(NullSink, Spool(tmp_path / f"spool-{i}", fsync=False))
        app = create_app(ServiceConfig.of(settings), event_log=log, **kwargs)
        with TestClient(app) as client:
            assert client.get("/v1/model").json()["version"] == "7"
            assert app.state.service.follower is None
            assert "flywheel_model_swaps_total 0.0" in client.get("/metrics").text
