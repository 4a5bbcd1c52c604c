"""One learner per lineage, with real `flywheel learn` processes on PostgreSQL + MLflow.

Replays issue 27: a second `flywheel learn` of the same lineage (a restart overlap, a
scaled service) used to train the same examples into two versions and lose ledger rows.
Now it waits as a standby and takes over once the first is killed; and SIGTERM abandons a
step in progress: nothing of it is published and the lease is let go at once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from flywheel.learner import LearnerConfig, OnlineLearner, ensure_champion
from flywheel.privacy import PrivacyLedger, epsilon
from flywheel.registry import Registry
from flywheel.settings import Settings
from flywheel.store import (
    LeaseLost,
    LeaseTable,
    make_engine,
)
from flywheel.store import upgrade as upgrade_store
from tests.deadlines import deadline
from tests.examples import LEARNER_ENV, add_drift_examples, learner_env
from tests.trusted import write_synthetic_trusted

pytestmark = pytest.mark.integration
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
LEASE_S, RENEW_S = 3.0, 1.0


def _settings(settings: Settings, url: str, **extra: object) -> Settings:
    s = settings.model_copy(
        update={
            "database_url": url,
            "learn_batch": 50,
            "learn_cursor_grace_s": 0.0,
            "gate_min_holdout": 5,
            "privacy_enabled": True,
            # updates of 50 rows, as these tests count them (35 privacy units each), not the
            # 50 units a DP update waits for by default
            "privacy_unit_batch": False,
            "learn_lease_s": LEASE_S,
            "learn_lease_renew_s": RENEW_S,
            **extra,
        }
    )
    upgrade_store(url)
    ensure_champion(s.trusted, Registry.of(s))
    write_synthetic_trusted(s)
    return s


def add_recurring(url: str, n: int, start: int, *, split: str = "train") -> None:
    """n examples; even ones from 20 recurring sources (they run into the budget), odd ones
    each from a source of its own."""
    add_drift_examples(
        url, n, start, split=split,
        source=lambda i: f"user-{i % 20}" if i % 2 == 0 else f"solo-{start + i}",
    )  # fmt: skip


def _env(s: Settings, **extra: str) -> dict[str, str]:
    return learner_env(
        s, (*LEARNER_ENV, "privacy_source_updates", "privacy_max_per_source", "privacy_unit_batch"),
        **extra,
    )  # fmt: skip


def _start(s: Settings, log: Path, **extra: str) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [FLYWHEEL, "learn"], env=_env(s, **extra), stdout=out, stderr=subprocess.STDOUT
        )


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(deadline(30))


def _online_versions(s: Settings) -> list:
    return sorted(
        (v for v in Registry.of(s).versions(with_runs=True) if v.tags.get("source") == "online"),
        key=lambda v: int(v.version),
    )


def _wait(condition, timeout_s: float, what: str, *procs: subprocess.Popen, logs=()) -> float:
    """Seconds until `condition()` held; fails after `timeout_s` or if a process died."""
    t0 = time.monotonic()
    while not condition():
        for proc, log in zip(procs, logs, strict=False):
            assert proc.poll() is None, f"{what}: learner exited\n{log.read_text()[-3000:]}"
        assert time.monotonic() - t0 < deadline(timeout_s), f"{what}: not within {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic() - t0


def _owner_pid(table: LeaseTable, lineage: str) -> int | None:
    holder = table.holder(lineage)
    if holder is None or holder.expires_in_s < 0:
        return None
    return int(holder.owner.split(":")[1])  # host:pid:random


class CursorWatch(threading.Thread):
    """Samples the saved cursor (watermark) every 50 ms: it must never go backwards."""

    def __init__(self, url: str, lineage: str) -> None:
        super().__init__(daemon=True)
        self.engine, self.lineage = make_engine(url), lineage
        self.seen: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            with self.engine.connect() as c:
                value = c.execute(
                    text("SELECT cursor FROM learner_state WHERE lineage = :l"), {"l": self.lineage}
                ).scalar()
            if value is not None:
                self.seen.append(int(value))

    def stop(self) -> list[int]:
        self.done.set()
        self.join(10)
        self.engine.dispose()
        return self.seen


def test_a_second_learner_stands_by_and_takes_over_when_the_first_is_killed(
    settings, pg_url, tmp_path
):
    s = _settings(settings, pg_url, privacy_source_updates=3, privacy_max_per_source=2)
    lineage = f"{s.model_name}:online"
    add_recurring(pg_url, 30, 100_000, split="holdout")
    add_recurring(pg_url, 100, 0)
    lease_engine = make_engine(pg_url)
    table = LeaseTable(lease_engine, ttl_s=LEASE_S)
    watch = CursorWatch(pg_url, lineage)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = _start(s, log_a)
    b = None
    feeding = threading.Event()

    def feed() -> None:  # examples keep arriving, as from the feedback worker
        start = 1_000
        while not feeding.wait(0.7):
            add_recurring(pg_url, 50, start)
            start += 50

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        _wait(
            lambda: _owner_pid(table, lineage) == a.pid, 120, "A holds the lease", a, logs=[log_a]
        )
        b = _start(s, log_b)
        _wait(
            lambda: "is standby" in log_b.read_text(), 60, "B says it is standby", b, logs=[log_b]
        )
        standby_line = next(x for x in log_b.read_text().splitlines() if "is standby" in x)
        assert f":{a.pid}:" in standby_line  # it names who holds the lineage
        watch.start()
        feeder.start()
        _wait(lambda: len(_online_versions(s)) >= 2, 180, "A's candidates", a, logs=[log_a])
        assert _owner_pid(table, lineage) == a.pid  # B stood by all along
        a.send_signal(signal.SIGKILL)
        a.wait(deadline(30))
        took = _wait(
            lambda: _owner_pid(table, lineage) == b.pid, 60, "B takes over", b, logs=[log_b]
        )
        # a killed holder's lease runs out LEASE_S after its last renewal; B tries every RENEW_S
        assert took <= LEASE_S + RENEW_S + 5.0, took  # + slack for a loaded machine
        by_a = len(_online_versions(s))
        _wait(lambda: len(_online_versions(s)) >= by_a + 2, 180, "B's candidates", b, logs=[log_b])
        feeding.set()
        feeder.join(30)
        b.send_signal(signal.SIGTERM)
        assert b.wait(deadline(30)) == 0, log_b.read_text()[-3000:]
    finally:
        feeding.set()
        _stop(a, *([b] if b else []))
        seen = watch.stop() if watch.is_alive() else watch.seen
        lease_engine.dispose()
    print(f"standby took over {took:.1f} s after the holder was killed (lease {LEASE_S} s)")

    versions = _online_versions(s)
    ledger = PrivacyLedger(make_engine(pg_url))
    entries = {e.id: e for e in ledger.entries(lineage)}
    # every published version is named on exactly the ledger row its learner wrote
    for v in versions:
        row = entries[int(v.tags["learner_ledger_row"])]
        assert row.version == v.version and row.update_no == int(v.tags["learner_update"])
    # every promoted version has its ledger entry
    promoted = [v for v in Registry.of(s).champion_history() if v in {x.version for x in versions}]
    assert promoted, "no online version was promoted"
    for v in promoted:
        assert ledger.entry_for_version(v) is not None, f"promoted v{v} has no ledger entry"
    # no example trained into two versions: their id ranges are disjoint
    ranges = sorted(
        (int(v.params["first_example_id"]), int(v.params["last_example_id"])) for v in versions
    )
    for (_, hi), (lo, _) in zip(ranges, ranges[1:], strict=False):
        assert hi < lo, ranges
    # no source over the budget, recomputed from every ledger row it is in (a row of an
    # update the killed learner never published counts too)
    histories = ledger.histories(lineage, [sp.source for sp in ledger.sources(lineage)])
    worst = max(epsilon(h, s.privacy_delta, s.privacy_accountant) for h in histories.values())
    assert worst <= s.privacy_epsilon + 1e-9, worst
    assert max(len(h) for h in histories.values()) >= 2  # sources did recur across updates
    # the saved cursor never went backwards
    assert seen and seen == sorted(seen), seen


def test_sigterm_abandons_a_step_in_progress_and_lets_the_lease_go(settings, pg_url, tmp_path):
    # 1000 gradient steps per update: a step lasts long enough to be stopped in the middle
    s = _settings(settings, pg_url, learn_steps=1000)
    lineage = f"{s.model_name}:online"
    add_recurring(pg_url, 30, 100_000, split="holdout")
    add_recurring(pg_url, 50, 0)
    ledger = PrivacyLedger(make_engine(pg_url))
    table = LeaseTable(make_engine(pg_url), ttl_s=LEASE_S)
    log = tmp_path / "learn.log"
    proc = _start(s, log, FLYWHEEL_LEARN_STEPS="1000")
    try:
        # the ledger entry is written right before training starts
        _wait(lambda: ledger.entries(lineage), 180, "a step starts training", proc, logs=[log])
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        released_s = _wait(lambda: _owner_pid(table, lineage) is None, 60, "lease released")
        code = proc.wait(deadline(60))
        stopped_s = time.monotonic() - t0
    finally:
        _stop(proc)
    print(f"SIGTERM during a step: lease released {released_s:.2f} s, exited {stopped_s:.2f} s")
    assert code == 0, log.read_text()[-3000:]
    assert "step abandoned" in log.read_text()
    # the step stops at its next gradient step and lets the lease go: what a standby waits
    # for. The exit after it is the interpreter's teardown of torch, MLflow and Opacus
    # (3-8 s here at load 8-10: `import torch, mlflow, opacus` alone takes that to exit),
    # so it is measured, not bounded
    assert released_s < 5.0, released_s
    assert _online_versions(s) == []  # nothing of the step was published
    (entry,) = ledger.entries(lineage)
    assert entry.version is None  # never published, and it keeps counting
    report = subprocess.run(
        [FLYWHEEL, "privacy", "report", "--json"],
        env=_env(s),
        capture_output=True,
        text=True,
        timeout=deadline(120),
    )
    assert report.returncode == 0, report.stderr[-3000:]
    doc = json.loads(report.stdout)
    assert [e["id"] for e in doc["never_published"]] == [entry.id]
    assert doc["epsilon_spent"] == pytest.approx(entry.epsilon_lineage)
    # the lease was let go: the next learner takes it at once, under the next token
    lease = table.try_acquire(lineage, "next")
    assert lease is not None and lease.token == 2
    lease.release()


def test_a_second_in_process_learner_cannot_step_while_the_first_runs(settings, sqlite_url):
    s = _settings(settings, sqlite_url, privacy_enabled=False)
    add_recurring(sqlite_url, 30, 100_000, split="holdout")
    first = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    stop = threading.Event()
    runner = threading.Thread(target=first.run, args=(stop,), daemon=True)
    runner.start()
    try:
        table = LeaseTable(make_engine(sqlite_url), ttl_s=LEASE_S)
        _wait(lambda: first.lease.held, 60, "the first holds the lease")
        second = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
        add_recurring(sqlite_url, 50, 0)
        t0 = time.monotonic()
        with pytest.raises(LeaseLost, match="one learner per lineage"):
            second.step()  # waits as a standby, about twice the lease, then gives up
        assert time.monotonic() - t0 >= 2 * LEASE_S
        assert table.holder(first.lineage).owner == first.lease.owner
    finally:
        stop.set()
        runner.join(60)
    assert not runner.is_alive()
    # the first let the lease go when it stopped: the second takes it without waiting
    t0 = time.monotonic()
    assert second.step() is not None or second.lease.held
    assert time.monotonic() - t0 < 60
    assert second.lease.lease.token == 2
    second.lease.release()


def test_two_in_process_learners_taking_turns_never_train_an_example_twice(settings, sqlite_url):
    """Two learners of one lineage that step in turn, neither renewing in the background
    (each stalls longer than the lease between its steps): each step takes the lease over
    under a new token and reads the state again, so the turns continue one line of
    versions, on SQLite."""
    s = _settings(settings, sqlite_url, learn_lease_s=1.0, learn_lease_renew_s=0.2)
    add_recurring(sqlite_url, 30, 100_000, split="holdout")
    a = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    b = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    ledger = PrivacyLedger(make_engine(sqlite_url))
    reader_engine = make_engine(sqlite_url)
    tokens, cursors, candidates = [], [], []
    for turn, learner in enumerate([a, b, a, b]):
        add_recurring(sqlite_url, 50, 1_000 * (turn + 1))
        time.sleep(1.2)  # the other one's lease runs out (it does not renew in between)
        candidate = learner.step()
        assert candidate is not None, f"turn {turn}"
        candidates.append(candidate)
        tokens.append(learner.lease.lease.token)
        with reader_engine.connect() as c:
            cursors.append(
                c.execute(
                    text("SELECT cursor FROM learner_state WHERE lineage = :l"),
                    {"l": a.lineage},
                ).scalar()
            )
    reader_engine.dispose()
    assert tokens == [1, 2, 3, 4]  # every turn took the lease over
    assert cursors == sorted(cursors) and len(set(cursors)) == 4
    # one line of versions: each turn continues from the one before, on new examples only
    for before, after in zip(candidates, candidates[1:], strict=False):
        assert after.parent_version == before.version
        assert after.first_id > before.last_id
    rows = {e.version: e for e in ledger.entries(a.lineage)}
    assert sorted(rows) == sorted(c.version for c in candidates)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_standby_waits_out_a_store_outage_then_takes_over(settings, own_postgres, tmp_path):
    """Found by the fault suite (tests/faults): a standby `flywheel learn` polling for the
    lease exited ("error: database: connection failed") when PostgreSQL was killed, where
    the holder and every other process waited it out. Now it keeps standing by."""
    url = own_postgres.url
    s = _settings(settings, url)
    lineage = f"{s.model_name}:online"
    engine = make_engine(url)
    held = LeaseTable(engine, ttl_s=600).try_acquire(lineage, "elsewhere:1:holder")
    assert held is not None
    log = tmp_path / "standby.log"
    proc = _start(s, log)
    try:
        _wait(lambda: "is standby" in log.read_text(), 180, "standby", proc, logs=[log])
        own_postgres.kill()
        down = time.monotonic()
        while time.monotonic() - down < 5 * RENEW_S:  # five polls against a dead store
            assert proc.poll() is None, f"the standby exited:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        own_postgres.start()
        deadline = time.monotonic() + 60
        while True:  # the holder stops cleanly (its pool's connections died with the server)
            try:
                held.release()
                break
            except Exception:
                assert time.monotonic() < deadline, "could not release the held lease"
                time.sleep(0.5)
        table = LeaseTable(engine, ttl_s=LEASE_S)
        took = _wait(
            lambda: _owner_pid(table, lineage) == proc.pid,
            60,
            "standby takes over",
            proc,
            logs=[log],
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        _stop(proc)
        engine.dispose()
    print(f"the standby took the lease {took:.1f} s after its release")
    assert "unavailable" in log.read_text()  # it said what it waited for
