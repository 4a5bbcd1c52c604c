"""Under pytest-xdist (`make test` runs `-n auto`) the fixtures tests already use are per
worker: each worker has its own PostgreSQL database (named after the worker), its own broker
and its own tmp folders, and the database is dropped when the worker ends."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.conftest import PG_ADMIN_URL
from tests.nested import run_nested

REPORT = """
import json
import os
from pathlib import Path


def test_report(pg_url, broker, tmp_path):
    worker = os.environ["PYTEST_XDIST_WORKER"]
    Path(os.environ["HARNESS_OUT"], worker + ".json").write_text(json.dumps(
        {"db": pg_url.rsplit("/", 1)[1], "broker": broker.bootstrap, "tmp": str(tmp_path)}
    ))
"""


def test_each_worker_has_its_own_database_broker_and_tmp_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    run = run_nested(
        tmp_path / "run",
        {"test_report.py": REPORT},
        "-n",
        "2",
        "--dist",
        "each",  # every worker runs every test
        plugins=("tests.conftest", "tests.integration.conftest"),
        env={"HARNESS_OUT": str(out)},
        timeout_s=300,
    )
    assert run.returncode == 0, run.output
    seen = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(seen) == ["gw0", "gw1"], run.output
    for worker, found in seen.items():
        assert found["db"].startswith(f"fw_test_{worker}_")
    for key in ("db", "broker", "tmp"):
        assert seen["gw0"][key] != seen["gw1"][key], key
    admin = create_engine(PG_ADMIN_URL)
    try:
        with admin.connect() as conn:
            left = conn.execute(
                text("SELECT datname FROM pg_database WHERE datname = ANY(:names)"),
                {"names": [found["db"] for found in seen.values()]},
            ).all()
    finally:
        admin.dispose()
    assert left == [], "a worker's database outlived its session"
