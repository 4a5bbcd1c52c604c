"""The privacy ledger writes and labels its own rows by id (issue 27).

A ledger row is never replaced: a learner that died after recording an update leaves an
unversioned row that keeps counting (over-count, never under-count), and a version is set
on exactly the row its learner wrote, even when two rows share an update number.
"""

from __future__ import annotations

import pytest

from flywheel.privacy import Mechanism, PrivacyLedger, epsilon, plan_update
from flywheel.store import make_engine
from flywheel.store import upgrade as upgrade_store

pytestmark = pytest.mark.integration
LINEAGE = "m:online"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade_store(url)
    return url


def _entry(update_no: int, eps_lineage: float) -> dict:
    return {
        "lineage": LINEAGE,
        "update_no": update_no,
        "accountant": "rdp",
        "engine": "opacus",
        "sample_rate": 0.5,
        "noise_multiplier": 1.5,
        "max_grad_norm": 1.0,
        "steps": 8,
        "delta": 1e-5,
        "epsilon_update": 1.0,
        "epsilon_lineage": eps_lineage,
        "sources": 2,
        "examples": 2,
        "public_examples": 0,
        "capped_examples": 0,
        "excluded_examples": 0,
    }


def test_a_second_record_of_an_update_number_never_replaces_the_first(db_url):
    ledger = PrivacyLedger(make_engine(db_url))
    first = ledger.record(_entry(1, 1.0), {"source:a": (1, 1.0), "source:b": (1, 1.0)})
    # a second learner (or a restart) records the same update number before either has a
    # version: the first row must stay, with its sources, and keep counting
    second = ledger.record(_entry(1, 1.4), {"source:a": (1, 1.4), "source:c": (1, 1.0)})
    entries = ledger.entries(LINEAGE)
    assert [e.id for e in entries] == [first, second]
    assert [e.update_no for e in entries] == [1, 1]
    assert all(e.version is None for e in entries)
    spends = {s.source: s for s in ledger.sources(LINEAGE)}
    assert spends["source:a"].updates == 2  # both rows count for the source in both
    assert spends["source:b"].updates == 1  # only in the first row: still counted
    histories = ledger.histories(LINEAGE, ["source:a", "source:b", "source:c"])
    assert len(histories["source:a"]) == 2
    # the accountant over what the ledger holds: a's ε is that of two updates
    assert epsilon(histories["source:a"], 1e-5, "rdp") > epsilon(histories["source:b"], 1e-5, "rdp")


def test_set_version_labels_exactly_the_row_it_is_given(db_url):
    ledger = PrivacyLedger(make_engine(db_url))
    a = ledger.record(_entry(3, 1.0), {"source:a": (1, 1.0)})
    b = ledger.record(_entry(3, 1.2), {"source:b": (1, 1.0)})
    ledger.set_version(b, "7")
    by_id = {e.id: e for e in ledger.entries(LINEAGE)}
    assert by_id[a].version is None and by_id[b].version == "7"
    assert ledger.entry_for_version("7").id == b
    ledger.set_version(a, "6")
    by_id = {e.id: e for e in ledger.entries(LINEAGE)}
    assert (by_id[a].version, by_id[b].version) == ("6", "7")  # b untouched


def test_set_version_of_a_missing_row_is_an_error(db_url):
    ledger = PrivacyLedger(make_engine(db_url))
    with pytest.raises(LookupError, match="no privacy ledger row 999"):
        ledger.set_version(999, "3")


def test_adopt_without_a_row_id_labels_the_newest_unversioned_row_of_that_update(db_url):
    """Versions published before row ids were tagged: the update number is all there is."""
    ledger = PrivacyLedger(make_engine(db_url))
    old = ledger.record(_entry(2, 1.0), {"source:a": (1, 1.0)})
    new = ledger.record(_entry(2, 1.1), {"source:a": (1, 1.1)})
    assert ledger.set_version_of_update(LINEAGE, 2, "5") == new
    by_id = {e.id: e for e in ledger.entries(LINEAGE)}
    assert by_id[old].version is None and by_id[new].version == "5"
    assert ledger.set_version_of_update(LINEAGE, 9, "6") is None  # nothing to label


@pytest.fixture(params=["sqlite", "postgresql"])
def bare_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


def test_the_migration_keeps_every_ledger_row_and_spend(bare_url):
    """0009 rebuilds privacy_ledger on SQLite; the spends (ON DELETE CASCADE) must survive."""
    from flywheel.store import downgrade

    upgrade_store(bare_url, "0008")
    engine = make_engine(bare_url)
    with engine.begin() as c:
        for i, version in ((1, "2"), (2, None)):  # ids 1 and 2: a fresh database
            c.exec_driver_sql(
                "INSERT INTO privacy_ledger (lineage, update_no, version, accountant, "
                "engine, sample_rate, noise_multiplier, max_grad_norm, steps, delta, "
                "epsilon_update, epsilon_lineage, sources, examples, public_examples, "
                "capped_examples, excluded_examples) VALUES "
                f"('{LINEAGE}', {i}, {'NULL' if version is None else repr(version)}, "
                "'rdp', 'opacus', 0.5, 1.5, 1.0, 8, 1e-5, 1.0, 1.0, 2, 2, 0, 0, 0)"
            )
            c.exec_driver_sql(
                "INSERT INTO privacy_source_spend (ledger_id, source, examples, epsilon) VALUES "
                f"({i}, 'source:a', 1, {float(i)}), ({i}, 'source:b{i}', 1, 1.0)"
            )
    engine.dispose()
    upgrade_store(bare_url)
    engine = make_engine(bare_url)
    ledger = PrivacyLedger(engine)
    assert [(e.id, e.update_no, e.version) for e in ledger.entries()] == [
        (1, 1, "2"),
        (2, 2, None),
    ]
    spends = {s.source: (s.updates, s.epsilon) for s in ledger.sources()}
    assert spends == {"source:a": (2, 2.0), "source:b1": (1, 1.0), "source:b2": (1, 1.0)}
    # new rows go after the old ones, and may share an update number now
    assert ledger.record(_entry(2, 2.5), {"source:a": (1, 2.5)}) == 3
    # going back would have to drop a row of update 2: refused, nothing lost
    with pytest.raises(RuntimeError, match="several rows for update 2"):
        downgrade(bare_url, "0008")
    assert len(ledger.entries()) == 3
    engine.dispose()


def test_0011_reads_old_rows_as_dp_sgd_and_a_downgrade_keeps_the_kinds(bare_url):
    """0011 adds each entry's mechanism kind: rows written before it are DP-SGD, their
    spends and ε unchanged. A downgrade keeps the column, so a tree is still a tree after
    going back and forth (at 0010 it would be over-counted as DP-SGD, never lost)."""
    from flywheel.privacy import Mechanism
    from flywheel.store import current, downgrade

    upgrade_store(bare_url, "0010")
    engine = make_engine(bare_url)
    with engine.begin() as c:
        c.exec_driver_sql(
            "INSERT INTO privacy_ledger (lineage, update_no, version, accountant, "
            "engine, sample_rate, noise_multiplier, max_grad_norm, steps, delta, "
            "epsilon_update, epsilon_lineage, sources, examples, public_examples, "
            "capped_examples, excluded_examples) VALUES "
            f"('{LINEAGE}', 1, '2', 'rdp', 'opacus', 0.5, 1.5, 1.0, 8, 1e-5, 1.0, 1.0, "
            "1, 1, 0, 0, 0)"
        )
        c.exec_driver_sql(
            "INSERT INTO privacy_source_spend (ledger_id, source, examples, epsilon) "
            "VALUES (1, 'source:a', 1, 1.0)"
        )
    engine.dispose()
    upgrade_store(bare_url)
    engine = make_engine(bare_url)
    ledger = PrivacyLedger(engine)
    (old,) = ledger.entries()
    assert old.mechanism_kind == "dp-sgd" and old.mechanism == Mechanism(0.5, 1.5, 8)
    assert ledger.histories(LINEAGE, ["source:a"]) == {"source:a": [Mechanism(0.5, 1.5, 8)]}
    tree = {**_entry(2, 2.0), "sample_rate": 1.0, "mechanism_kind": "tree"}
    ledger.record(tree, {"source:a": (1, 2.0)})
    history = ledger.histories(LINEAGE, ["source:a"])["source:a"]
    assert sorted(history) == [Mechanism(0.5, 1.5, 8), Mechanism(1.0, 1.5, 8, "tree")]
    assert epsilon(history, 1e-5) > epsilon(history[:1], 1e-5)
    # at 0010 the tree would read as 8 DP-SGD steps at q = 1: more ε, never less
    as_sgd = [Mechanism(0.5, 1.5, 8), Mechanism(1.0, 1.5, 8)]
    assert epsilon(as_sgd, 1e-5) > epsilon(history, 1e-5)
    engine.dispose()
    downgrade(bare_url, "0010")
    assert current(bare_url) == "0010"
    upgrade_store(bare_url)
    engine = make_engine(bare_url)
    kinds = [e.mechanism_kind for e in PrivacyLedger(engine).entries()]
    assert kinds == ["dp-sgd", "tree"]
    engine.dispose()


def test_plan_update_gives_each_source_what_its_own_past_spends(db_url):
    """`plan_update` accounts once per distinct past (an update's ~150 sources share 1-3):
    sources with no past, one update and two must still each get their own ε, and only
    the one whose next update would pass the budget is left out, at its ε so far."""
    ledger = PrivacyLedger(make_engine(db_url))
    m = Mechanism(0.5, 1.5, 8)  # what `_entry` records
    ledger.record(_entry(1, 1.0), {"source:a": (1, 1.0), "source:b": (1, 1.0)})
    ledger.record(_entry(2, 1.4), {"source:a": (1, 1.4)})
    one, two = epsilon([m], 1e-5), epsilon([m, m], 1e-5)
    sources = {"source:a": 1, "source:b": 1, "source:c": 1, "source:d": 2}
    plan = plan_update(ledger, LINEAGE, sources, m, budget=two + 1e-9, delta=1e-5, accountant="rdp")
    assert plan.excluded == {"source:a": two}
    assert plan.allowed == {"source:b": two, "source:c": one, "source:d": one}
    assert plan.epsilon_update == one and plan.epsilon_lineage >= two
