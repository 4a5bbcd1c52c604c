import numpy as np
import pytest
from sqlalchemy import select

from flywheel.feedback import ReferenceStats, assign_split
from flywheel.feedback.corroboration import release_corroborated
from flywheel.store import Example, make_engine, session_factory, upgrade


@pytest.fixture()
def session(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    upgrade(url)
    engine = make_engine(url)
    with session_factory(engine)() as s:
        yield s
    engine.dispose()


REF = ReferenceStats.from_examples(np.random.default_rng(0).normal(size=(500, 3)))
X0 = [0.2, -0.1, 0.4]


def add(session, key, features, label, split="train", error_type=None, parent=None):
    session.add(
        Example(
            dedup_key=key,
            origin="correction",
            features=features,
            label=label,
            split=split,
            error_type=error_type,
            parent_prediction_id=parent or key,
        )
    )


def held_split(session) -> str:
    return session.scalar(select(Example.split).where(Example.dedup_key == "held"))


def test_quarantine_is_released_only_by_enough_close_agreeing_corrections(session):
    add(session, "held", X0, "b", split="quarantine", error_type="suspect", parent="p0")
    add(session, "other-label", X0, "a")
    add(session, "far", [9.0, 9.0, 9.0], "b")
    add(session, "same-parent", X0, "b", parent="p0")
    add(session, "s1", [0.25, -0.1, 0.4], "b")
    add(session, "s2", [0.2, 0.0, 0.4], "b")
    session.flush()
    assert release_corroborated(session, REF, 0.1) == 0
    assert held_split(session) == "quarantine"
    add(session, "s3", [0.2, -0.1, 0.5], "b")
    session.flush()
    assert release_corroborated(session, REF, 0.1) == 1
    assert held_split(session) == assign_split("p0", 0.1)
    assert release_corroborated(session, REF, 0.1) == 0  # released once
