"""Settings for a feedback worker's tests on either store, shared by the worker, subject
and erasure tests."""

from __future__ import annotations

import uuid
from typing import Any

from flywheel.settings import Settings


def worker_settings(request: Any, settings: Settings, **update: Any) -> Settings:
    """Settings for a feedback worker on the store `request.param` names ("sqlite" or
    "postgresql"), migrated, with a champion and the synthetic trusted set: a group of
    this test only, 6 s sessions (a join takes ~3 s on Tansu), `update` on top."""
    from flywheel.learner import ensure_champion
    from flywheel.registry import Registry
    from flywheel.store import upgrade
    from tests.trusted import write_synthetic_trusted

    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    s = settings.model_copy(
        update={
            "database_url": url,
            "feedback_group": f"fb-{uuid.uuid4().hex[:6]}",
            "feedback_session_timeout_ms": 6000,
            "feedback_max_records": 200,
            **update,
        }
    )
    ensure_champion(s.trusted, Registry.of(s))
    write_synthetic_trusted(s)
    return s
