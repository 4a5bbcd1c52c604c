"""`flywheel status`'s view of the store on SQLite: schema, each learner's watermark and
unread examples, and who holds its lease; a lineage whose lease ran out is a problem."""

from __future__ import annotations

import time

from flywheel.cli.status import gather
from flywheel.settings import Settings, prepare_home
from flywheel.store import ExampleReader, LeaseTable, make_engine, upgrade


def test_status_names_the_lease_holder_and_a_lineage_nobody_holds(tmp_path):
    s = Settings(home=tmp_path / "home")
    prepare_home(s)
    url = s.resolved_database_url
    upgrade(url)
    engine = make_engine(url)
    try:
        reader = ExampleReader(engine)
        reader.save_state("held:online", {}, 0)
        reader.save_state("gone:online", {}, 0)
        assert LeaseTable(engine, ttl_s=600).try_acquire("held:online", "host:42:abc")
        assert LeaseTable(engine, ttl_s=0.05).try_acquire("gone:online", "host:7:def")
        time.sleep(0.2)  # nobody renews the second: its learner is gone
        doc = gather(s, [], timeout_s=1.0, max_lag=1000)
    finally:
        engine.dispose()
    learners = {lr["lineage"]: lr for lr in doc["store"]["learners"]}
    assert set(learners) == {"held:online", "gone:online"}
    held, gone = learners["held:online"]["lease"], learners["gone:online"]["lease"]
    assert held["owner"] == "host:42:abc" and held["held"] and held["token"] == 1
    assert gone["owner"] == "host:7:def" and not gone["held"]
    (problem,) = [p for p in doc["problems"] if p.startswith("learner")]
    assert problem.startswith("learner gone:online: no learner holds it")
    assert "host:7:def" in problem
