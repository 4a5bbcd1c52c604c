"""Data subjects as the privacy unit, on a real store (SQLite and PostgreSQL): a subject out
of budget is left out while other units keep training; the renewing policy gives a unit
its budget back once its spending leaves the window (lifetime never does); the excluded
data reaches the metrics, the learner's state and the report; and a store filled by the
code before subjects (migration 0010, examples and ledger keyed by source) upgrades to
0013 with its ledger still read, and still counted, under the same keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import torch
from prometheus_client import REGISTRY

from flywheel.learner.private_step import PrivateStep
from flywheel.privacy import EXCLUDED_STATE_KEY, BudgetPolicy, PrivacyLedger, build_report
from flywheel.settings import PrivacySettings
from flywheel.store import (
    Example,
    ExampleReader,
    PrivacyLedgerEntry,
    make_engine,
    session_factory,
    upgrade,
)

pytestmark = pytest.mark.integration
LINEAGE = "m:online"
ALICE = "subject:" + "a" * 64
BOB = "subject:" + "b" * 64


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


def _examples(engine: sa.Engine, units: list[str | None], source: str = "shop") -> list[int]:
    """One trainable correction example per unit (None: an old row, no unit); their ids."""
    now = datetime.now(UTC)
    with session_factory(engine).begin() as session:
        rows = [
            Example(
                dedup_key=f"correction:{i}-{now.timestamp()}",
                origin="correction",
                parent_prediction_id=f"p{i}",
                features=[0.1 * i, 1.0, -1.0],
                label="dog",
                split="train",
                source=source,
                privacy_unit=unit,
                created_at=now,
            )
            for i, unit in enumerate(units)
        ]
        session.add_all(rows)
        session.flush()
        return [r.id for r in rows]


def _step(engine: sa.Engine, **privacy: object) -> PrivateStep:
    settings = PrivacySettings(privacy_source_updates=2, **privacy)  # type: ignore[arg-type]
    return PrivateStep(settings, 4, engine, LINEAGE)


def _plan(step: PrivateStep, reader: ExampleReader, ids: list[int], update: int):
    torch.manual_seed(0)
    return step.plan(reader.by_ids(ids), update, torch.nn.Sequential(torch.nn.Linear(3, 2)))


def _excluded_metric() -> float:
    return (
        REGISTRY.get_sample_value("flywheel_privacy_excluded_examples_total", {"lineage": LINEAGE})
        or 0.0
    )


def test_a_subject_out_of_budget_is_left_out_while_others_keep_training(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        reader, step = ExampleReader(engine), _step(engine)
        # two updates at the defaults spend a unit's budget (σ is calibrated for two)
        for update in (1, 2):
            ids = _examples(engine, [ALICE, ALICE, f"prediction:new-{update}"])
            outcome = _plan(step, reader, ids, update)
            assert outcome is not None and outcome.plan is not None
            assert set(outcome.sources) == {ALICE, f"prediction:new-{update}"}
            assert outcome.sources[ALICE] == 2 and outcome.excluded == 0
        before = _excluded_metric()
        ids = _examples(engine, [ALICE, ALICE, ALICE, BOB, "prediction:new-3"])
        outcome = _plan(step, reader, ids, 3)
        assert outcome is not None and outcome.plan is not None
        assert ALICE in outcome.plan.excluded and set(outcome.plan.allowed) == {
            BOB,
            "prediction:new-3",
        }
        assert outcome.excluded == 3  # Alice's three new rows: no longer trained on
        assert {r.contributor for r in outcome.rows} == {BOB, "prediction:new-3"}
        assert _excluded_metric() - before == 3
        assert step.excluded.state() == {"incoming": 11, "excluded": 3}
        # the learner saves these totals; the report and the review page read them
        reader.save_state(LINEAGE, {EXCLUDED_STATE_KEY: step.excluded.state()}, 0)
        doc = build_report(PrivacyLedger(engine), budget=3.0, delta=1e-5)
        assert doc["excluded_data"]["excluded_examples"] == 3
        assert doc["excluded_data"]["incoming_examples"] == 11
        assert doc["units_by_kind"] == {"subject": 2, "prediction": 3}
        assert "Lifetime budget" in doc["budget"]["guarantee"]
    finally:
        engine.dispose()


@pytest.mark.parametrize("policy", ["renewing", "lifetime"])
def test_the_renewing_policy_restores_the_budget_after_the_period(db_url, policy):
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        reader = ExampleReader(engine)
        step = _step(engine, privacy_budget_policy=policy, privacy_budget_period_days=30)
        for update in (1, 2):
            assert _plan(step, reader, _examples(engine, [ALICE]), update).plan is not None
        spent = _plan(step, reader, _examples(engine, [ALICE, BOB]), 3)
        assert ALICE in spent.plan.excluded  # spent within this window
        # 31 days pass: every entry Alice took part in leaves a 30-day window
        with session_factory(engine).begin() as session:
            session.execute(
                sa.update(PrivacyLedgerEntry).values(
                    created_at=datetime.now(UTC) - timedelta(days=31)
                )
            )
        again = _plan(step, reader, _examples(engine, [ALICE]), 4)
        if policy == "renewing":
            assert again.plan is not None and ALICE in again.plan.allowed
            assert again.plan.allowed[ALICE] == pytest.approx(spent.plan.epsilon_update, rel=1e-9)
            tags = again.policy_tags()
            assert tags["dp_budget_policy"] == "renewing"
            assert tags["dp_budget_period_days"] == "30"
            assert tags["dp_budget_year_epsilon"] == "39"
        else:  # lifetime: the ledger's age does not matter
            assert again.plan is None and again.excluded == 1
        doc = build_report(
            PrivacyLedger(engine),
            budget=3.0,
            delta=1e-5,
            policy=BudgetPolicy(policy, 3.0, 1e-5, 30.0),
        )
        assert doc["budget"]["policy"] == policy
        if policy == "renewing":
            assert "ε = 39" in doc["budget"]["guarantee"]
    finally:
        engine.dispose()


def test_a_store_of_the_code_before_subjects_keeps_its_ledger(db_url):
    """Filled at 0010 (examples keyed by source, the ledger by `source:<name>`), upgraded to
    0013: the rows read back with their old unit, the report works, and the old spending
    still counts for the same key."""
    upgrade(db_url, "0010")
    engine = make_engine(db_url)
    now = datetime.now(UTC)
    try:
        meta = sa.MetaData()
        meta.reflect(engine, only=["examples", "privacy_ledger", "privacy_source_spend"])
        examples, ledger, spend = (
            meta.tables["examples"],
            meta.tables["privacy_ledger"],
            meta.tables["privacy_source_spend"],
        )
        assert "privacy_unit" not in examples.c  # the old schema
        with engine.begin() as conn:
            conn.execute(
                examples.insert(),
                [
                    {
                        "dedup_key": f"correction:old-{i}",
                        "origin": "correction",
                        "parent_prediction_id": f"old-{i}",
                        "features": [0.0, 1.0, 2.0],
                        "label": "dog",
                        "weight": 1.0,
                        "split": "train",
                        "source": "shop/u-17",
                        "created_at": now,
                    }
                    for i in range(2)
                ],
            )
            entry = conn.execute(
                ledger.insert().returning(ledger.c.id),
                {
                    "lineage": LINEAGE,
                    "update_no": 1,
                    "version": "2",
                    "created_at": now,
                    "accountant": "rdp",
                    "engine": "opacus",
                    "sample_rate": 0.5,
                    "noise_multiplier": 3.25,
                    "max_grad_norm": 1.0,
                    "steps": 4,
                    "delta": 1e-5,
                    "epsilon_update": 1.5,
                    "epsilon_lineage": 1.5,
                    "sources": 1,
                    "examples": 2,
                    "public_examples": 0,
                    "capped_examples": 0,
                    "excluded_examples": 0,
                },
            ).scalar_one()
            conn.execute(
                spend.insert(),
                {"ledger_id": entry, "source": "source:shop/u-17", "examples": 2, "epsilon": 1.5},
            )
        engine.dispose()
        upgrade(db_url)
        engine = make_engine(db_url)
        rows = ExampleReader(engine).unread(0, [], 10)
        assert [r.privacy_unit for r in rows] == [None, None]
        assert {r.contributor for r in rows} == {"source:shop/u-17"}  # the key it was spent under
        doc = build_report(PrivacyLedger(engine), budget=3.0, delta=1e-5)
        assert [s["source"] for s in doc["sources"]] == ["source:shop/u-17"]
        assert doc["versions"][0]["version"] == "2" and doc["units_by_kind"] == {"source": 1}
        assert doc["excluded_data"]["incoming_examples"] == 0  # no totals before subjects
        # its next update composes with the old spending (its second of two: within budget)
        outcome = _plan(_step(engine), ExampleReader(engine), [r.id for r in rows], 2)
        assert outcome.plan is not None
        assert outcome.plan.allowed["source:shop/u-17"] > outcome.plan.epsilon_update
    finally:
        engine.dispose()
