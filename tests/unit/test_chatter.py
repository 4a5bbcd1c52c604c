"""flywheel.chatter: a broker outage's connection chatter is one line, its end another."""

from __future__ import annotations

import logging

import pytest

from flywheel.chatter import ConnectionChatter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged():
    """A handler with the filter, on a private root-like logger tree."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    clock = Clock()
    chatter = ConnectionChatter(quiet_s=60, clock=clock)
    handler.addFilter(chatter)
    second = logging.Handler()  # a second handler sees the same decision
    seen_by_second: list[logging.LogRecord] = []
    second.emit = seen_by_second.append  # type: ignore[method-assign]
    second.addFilter(chatter)
    loggers = []
    for name in ("flywheel.kafka", "kafka.conn", "flywheel.outage", "flywheel.service.app"):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.addHandler(second)
        lg.propagate = False
        loggers.append((lg, lg.level))
        lg.setLevel(logging.DEBUG)
    yield records, seen_by_second, clock, chatter
    for lg, level in loggers:
        lg.setLevel(level)
        lg.removeHandler(handler)
        lg.removeHandler(second)
        lg.propagate = True


def test_an_outage_is_one_line_and_its_end_another(logged) -> None:
    records, second, clock, chatter = logged
    rdkafka = logging.getLogger("flywheel.kafka")
    python = logging.getLogger("kafka.conn")
    for n in range(300):  # a minute of the service's log with the broker down
        clock.now += 0.2
        rdkafka.error(
            "FAIL [rdkafka#producer-%d]: 127.0.0.1:9/bootstrap: Connect to "
            "ipv4#127.0.0.1:9 failed: Connection refused",
            n + 1,
        )
        python.error("<BrokerConnection node_id=bootstrap-0>: Connect attempt returned error 111")
    logging.getLogger("flywheel.service.app").info("serving flywheel v3")  # not chatter
    assert [r.name for r in records] == ["flywheel.kafka", "flywheel.service.app"]
    assert "further connection errors are counted" in records[0].getMessage()
    assert len(second) == len(records)  # both handlers: the same two lines
    clock.now += 5
    chatter.over()
    end = records[-1]
    assert end.name == "flywheel.outage"
    assert end.getMessage() == (
        "connection back after 65s; 599 more connection errors were not logged"
    )
    chatter.over()  # no open outage: nothing more
    assert len(records) == 3


def test_chatter_after_a_quiet_spell_is_a_new_outage(logged) -> None:
    records, _, clock, _ = logged
    rdkafka = logging.getLogger("flywheel.kafka")
    for _ in range(10):
        clock.now += 1
        rdkafka.warning("broker transport failure")
    clock.now += 61  # no end was seen, but it went quiet
    rdkafka.warning("broker transport failure")
    messages = [r.getMessage() for r in records]
    assert len(messages) == 3
    assert messages[1] == "no connection errors for 60s; 9 more were not logged in the 9s before"
    assert "further connection errors are counted" in messages[2]


def test_other_warnings_of_the_clients_pass(logged) -> None:
    records, _, _, _ = logged
    logging.getLogger("kafka.conn").warning("group_id is None: disabling auto-commit.")
    logging.getLogger("flywheel.kafka").info("Connect to 127.0.0.1:9 failed")  # below WARNING
    assert len(records) == 2
