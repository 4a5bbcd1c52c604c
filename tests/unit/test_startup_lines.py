"""Start-up phases that take seconds say so (issue 29): the MLflow store's creation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flywheel.registry import Registry
from flywheel.settings import Settings


def test_a_new_mlflow_store_is_announced_once(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    settings = Settings(home=tmp_path)
    with caplog.at_level(logging.INFO, logger="flywheel.registry"):
        assert Registry.of(settings).champion_version() is None  # creates the tables
    assert [r.getMessage() for r in caplog.records if "creating the MLflow store" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flywheel.registry"):
        Registry.of(settings)
    assert not [r for r in caplog.records if "creating the MLflow store" in r.getMessage()]
