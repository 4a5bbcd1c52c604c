"""The Python client against the real service under uvicorn on a free port, with the real
broker: predictions in batches the server's limit allows, corrections over HTTP and
straight to Kafka in the same records, and a resent correction stored once."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import uvicorn
from sqlalchemy import func, select

from flywheel.broker import EmbeddedBroker, ensure_topics, free_port, read_topic
from flywheel.client import AsyncClient, BadRequest, Client, KafkaCorrections, Unavailable
from flywheel.events import CorrectionEvent, PredictionEvent, correction_id
from flywheel.feedback.join import store_and_join
from flywheel.service import GracefulServer, ServiceConfig, create_app
from flywheel.settings import Settings, prepare_home
from flywheel.store import Correction, make_engine, session_factory, upgrade
from tests.conftest import make_app_key
from tests.deadlines import deadline

from .conftest import consume

pytestmark = pytest.mark.integration
ROWS = [[0.1 * i + 0.01 * j for j in range(8)] for i in range(10)]


@pytest.fixture(scope="module")
def service(broker: EmbeddedBroker, tmp_path_factory) -> Iterator[tuple[str, Settings, str]]:
    """The service as `flywheel serve` runs it (uvicorn, a real socket) on topics of its
    own, FLYWHEEL_MAX_BATCH of 4; one for the module (starting it trains the seed model,
    ~15 s), stopped, its event log drained, after the last test. Its callers are app
    `app-7` (every scope), whose key is the third item."""
    suffix = uuid.uuid4().hex[:8]
    s = Settings(
        home=tmp_path_factory.mktemp("client") / "home",
        kafka_bootstrap=broker.bootstrap,
        topic_predictions=f"predictions-{suffix}",
        topic_corrections=f"corrections-{suffix}",
        topic_model_events=f"model-events-{suffix}",
        topic_deadletter=f"deadletter-{suffix}",
        topic_scores=f"scores-{suffix}",
        seed_examples=1000,
        kafka_timeout_s=10.0,
        max_batch=4,
    )
    prepare_home(s)
    ensure_topics(broker.bootstrap, s.topics, s.topic_partitions)
    upgrade(s.resolved_database_url)
    key = make_app_key(s.resolved_database_url, "app-7").key
    app = create_app(ServiceConfig.of(s))
    port = free_port()
    server = GracefulServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", workers=1)
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        with Client(f"http://127.0.0.1:{port}") as probe:
            probe.wait_ready(timeout_s=deadline(120))
        yield f"http://127.0.0.1:{port}", s, key
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "uvicorn did not stop"


def records_of(bootstrap: str, topic: str, ids: list[str], n: int) -> list[tuple[bytes, bytes]]:
    """The records on `topic` keyed by one of `ids` (the module's tests share the topics),
    once there are `n` of them or 30 s have passed."""
    wanted = {pid.encode() for pid in ids}
    until = time.monotonic() + deadline(30)
    while True:
        mine = [(k, v) for k, v in consume(bootstrap, topic, 0) if k in wanted]
        if len(mine) >= n or time.monotonic() > until:
            return mine
        time.sleep(0.2)


def test_predict_and_correct_over_http_and_kafka_reach_the_topics(service):
    url, s, key = service
    with Client(url, api_key=key) as fw:
        info = fw.model()
        assert info.input_dim == 8 and info.version == "1"
        result = fw.predict(ROWS)  # 10 rows: the client learns the limit of 4 from a 413
        assert len(result) == 10 and len(set(result.ids)) == 10
        assert result.model == info.ref
        assert all(p.label in info.labels for p in result.predictions)
        ids, label, other = result.ids, info.labels[0], info.labels[1]

        over_http = [(pid, label, "app-7") for pid in ids[:4]]
        assert fw.correct(over_http) == 4
        assert fw.correct(over_http[:2]) == 2  # a resend: the same events again
        with pytest.raises(BadRequest, match=r"corrections\[1\].label: unknown label 'zebra'"):
            fw.correct([(ids[5], label), (ids[6], "zebra")])
        # the first request (4 rows) is served and logged, the second refused: its error
        # counts rows from the caller's first
        with pytest.raises(BadRequest, match=r"instances\[5\] has 3 features") as info_:
            fw.predict([*ROWS[:5], [1.0, 2.0, 3.0]])
        assert info_.value.status == 422

    over_kafka = [(ids[3], label, "app-7"), (ids[8], other, "app-9"), (ids[9], label, None)]
    with KafkaCorrections(s.kafka_bootstrap, s.topic_corrections) as kafka:
        assert kafka.send(over_kafka) == 3

    # on the topics: each prediction once, and each correction as often as it was sent
    predictions = records_of(s.kafka_bootstrap, s.topic_predictions, ids, 10)
    assert sorted(k.decode() for k, _ in predictions) == sorted(ids)
    corrections = records_of(s.kafka_bootstrap, s.topic_corrections, ids, 4 + 2 + 3)
    assert len(corrections) == 4 + 2 + 3
    events = [CorrectionEvent.model_validate_json(v) for _, v in corrections]
    assert all(k.decode() == e.prediction_id for (k, _), e in zip(corrections, events, strict=True))
    # the same correction is the same event whichever way and however often it was sent
    expected = {correction_id(*c) for c in over_http + over_kafka}
    assert {e.id for e in events} == expected and len(expected) == 6
    assert {(e.prediction_id, e.label, e.source) for e in events} == set(over_http + over_kafka)

    # and the store keeps each once: the feedback worker's own join, on SQLite
    db = f"sqlite:///{s.home_dir / 'join.db'}"
    upgrade(db)
    engine = make_engine(db)
    try:
        with session_factory(engine).begin() as session:
            batch = store_and_join(
                session,
                [PredictionEvent.model_validate_json(v) for _, v in predictions],
                events,
                datetime.now(UTC),
            )
            assert batch.new_corrections == 6 and len(batch.pairs) == 6
            assert session.execute(select(func.count()).select_from(Correction)).scalar() == 6
    finally:
        engine.dispose()


def test_kafka_corrections_land_on_their_predictions_partition(service):
    """kafka-python's partitioner is Java's, as is the service's producer: a correction sent
    either way is read from the partition its prediction is on."""
    url, s, key = service
    with Client(url, api_key=key) as fw:
        ids = fw.predict(ROWS * 2).ids
    with KafkaCorrections(s.kafka_bootstrap, s.topic_corrections) as kafka:
        kafka.send([(pid, "class_0") for pid in ids])
    records_of(s.kafka_bootstrap, s.topic_predictions, ids, len(ids))
    wanted = {pid.encode() for pid in ids}

    def partitions(topic: str) -> dict[bytes, int]:
        return {r.key: r.partition for r in read_topic(s.kafka_bootstrap, topic) if r.key in wanted}

    of_predictions, of_corrections = (
        partitions(s.topic_predictions),
        partitions(s.topic_corrections),
    )
    assert len(of_corrections) == len(ids) and of_corrections == of_predictions
    assert len(set(of_corrections.values())) > 1  # really spread out


def test_the_async_client_against_the_real_service(service):
    url, _, key = service

    async def main() -> None:
        async with AsyncClient(url, api_key=key) as fw:
            assert await fw.ready()
            results = await asyncio.gather(*(fw.predict(ROWS[i : i + 3]) for i in range(0, 9, 3)))
            ids = [pid for r in results for pid in r.ids]
            assert len(set(ids)) == 9
            assert await fw.correct([(pid, "class_1") for pid in ids]) == 9

    asyncio.run(main())


def test_a_service_that_is_not_there_is_unavailable_after_the_retries():
    waits: list[float] = []
    with Client(f"http://127.0.0.1:{free_port()}", retries=2, sleep=waits.append) as fw:
        assert fw.ready() is False
        with pytest.raises(Unavailable, match="after 3 attempts: ConnectError"):
            fw.predict(ROWS[:1])
    assert len(waits) == 2
