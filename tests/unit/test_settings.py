import os
from pathlib import Path

import pytest

from flywheel.settings import Settings, SettingsError, known_variables, load_settings, prepare_home


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)


def test_defaults_put_every_store_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "h"))
    s = load_settings()
    assert s.kafka_bootstrap is None
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'h' / 'flywheel.db'}"
    assert s.resolved_mlflow_uri == f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}"
    assert s.spool_path.is_relative_to(tmp_path / "h")
    assert s.topics == ["flywheel.predictions", "flywheel.corrections",
                        "flywheel.model-events", "flywheel.deadletter"]


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSTRAP", "k1:9092,k2:9093")
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", "postgresql://u@db/x")
    monkeypatch.setenv("FLYWHEEL_MAX_BATCH", "7")
    s = load_settings()
    assert (s.kafka_bootstrap, s.resolved_database_url, s.max_batch) == (
        "k1:9092,k2:9093", "postgresql://u@db/x", 7)


def test_unknown_variable_is_named(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSRAP", "x:1")
    with pytest.raises(SettingsError, match="FLYWHEEL_KAFKA_BOOTSRAP"):
        load_settings()


@pytest.mark.parametrize("var,value,fragment", [
    ("FLYWHEEL_KAFKA_BOOTSTRAP", "localhost", "host:port"),
    ("FLYWHEEL_KAFKA_BOOTSTRAP", "h:99999", "host:port"),
    ("FLYWHEEL_MAX_BATCH", "0", "FLYWHEEL_MAX_BATCH"),
    ("FLYWHEEL_PORT", "abc", "FLYWHEEL_PORT"),
    ("FLYWHEEL_TOPIC_CORRECTIONS", "flywheel.predictions", "distinct"),
    ("FLYWHEEL_FED_SUPERLINK", "nope", "FLYWHEEL_FED_SUPERLINK: .*expected host:port"),
    ("FLYWHEEL_TOPIC_PREDICTIONS", "", "FLYWHEEL_TOPIC_PREDICTIONS: .*Kafka topic name"),
    ("FLYWHEEL_TOPIC_DEADLETTER", "dead letters", "FLYWHEEL_TOPIC_DEADLETTER"),
    ("FLYWHEEL_MODEL_NAME", " ", "FLYWHEEL_MODEL_NAME"),
    ("FLYWHEEL_DATABASE_URL", "postgresql://[::1", "FLYWHEEL_DATABASE_URL: .*not a usable URL"),
    ("FLYWHEEL_MLFLOW_TRACKING_URI", "http://h:port/x", "FLYWHEEL_MLFLOW_TRACKING_URI"),
    # beyond datetime's range once added to now: refused, not a crash in the worker later
    ("FLYWHEEL_CORRECTION_EXPIRY_S", "1e11", "FLYWHEEL_CORRECTION_EXPIRY_S"),
    ("FLYWHEEL_CORRECTION_EXPIRY_S", "inf", "FLYWHEEL_CORRECTION_EXPIRY_S"),
    ("FLYWHEEL_COUNTEREXAMPLE_WINDOW_S", "1e11", "FLYWHEEL_COUNTEREXAMPLE_WINDOW_S"),
])
def test_bad_values_say_what_is_wrong(monkeypatch, var, value, fragment):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=fragment):
        load_settings()


def test_a_refused_url_is_echoed_without_its_password(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", "postgresql://u:hunter2@[::1/x")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "hunter2" not in str(info.value) and "u:***@" in str(info.value)


def test_known_variables_cover_the_design_contract():
    assert {"FLYWHEEL_HOME", "FLYWHEEL_KAFKA_BOOTSTRAP", "FLYWHEEL_DATABASE_URL",
            "FLYWHEEL_MLFLOW_TRACKING_URI"} <= known_variables()


def test_prepare_home_keeps_tool_state_inside(tmp_path, monkeypatch):
    for var in ("FLWR_HOME", "MPLCONFIGDIR", "MLFLOW_DISABLE_TELEMETRY"):
        monkeypatch.delenv(var, raising=False)
    home = prepare_home(Settings(home=tmp_path / "fw"))
    assert Path(os.environ["FLWR_HOME"]).is_relative_to(home)
    assert Path(os.environ["MPLCONFIGDIR"]).is_relative_to(home)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert (home / "spool").is_dir()


@pytest.mark.parametrize("text,shown", [
    ("postgresql://u:secret@127.0.0.1:5432/db", "postgresql://u:***@127.0.0.1:5432/db"),
    ("http://u:p@ss@host:5000/x", "http://u:***@host:5000/x"),  # a raw "@" in the password
    ("at postgresql://u:pw@[::1]/x: refused", "at postgresql://u:***@[::1]/x: refused"),
    ("http://host:5000/x", "http://host:5000/x"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_mask_credentials_hides_every_character_of_a_password(text, shown):
    from flywheel.settings import mask_credentials

    assert mask_credentials(text) == shown
