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
    assert s.topics == [
        "flywheel.predictions",
        "flywheel.corrections",
        "flywheel.model-events",
        "flywheel.deadletter",
        "flywheel.scores",
    ]


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSTRAP", "k1:9092,k2:9093")
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", "postgresql://u@db/x")
    monkeypatch.setenv("FLYWHEEL_MAX_BATCH", "7")
    s = load_settings()
    assert (s.kafka_bootstrap, s.resolved_database_url, s.max_batch) == (
        "k1:9092,k2:9093",
        "postgresql://u@db/x",
        7,
    )


def test_unknown_variable_is_named(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSRAP", "x:1")
    with pytest.raises(SettingsError, match="FLYWHEEL_KAFKA_BOOTSRAP"):
        load_settings()


@pytest.mark.parametrize(
    "var,value,fragment",
    [
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
        # a renewal late once would hand a live learner's lineage to its standby
        ("FLYWHEEL_LEARN_LEASE_RENEW_S", "6", "FLYWHEEL_LEARN_LEASE_RENEW_S .* third"),
        ("FLYWHEEL_LEARN_LEASE_S", "0.5", "FLYWHEEL_LEARN_LEASE_S"),
    ],
)
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
    assert {
        "FLYWHEEL_HOME",
        "FLYWHEEL_KAFKA_BOOTSTRAP",
        "FLYWHEEL_DATABASE_URL",
        "FLYWHEEL_MLFLOW_TRACKING_URI",
    } <= known_variables()


def test_prepare_home_keeps_tool_state_inside(tmp_path, monkeypatch):
    for var in ("FLWR_HOME", "MPLCONFIGDIR", "MLFLOW_DISABLE_TELEMETRY"):
        monkeypatch.delenv(var, raising=False)
    home = prepare_home(Settings(home=tmp_path / "fw"))
    assert Path(os.environ["FLWR_HOME"]).is_relative_to(home)
    assert Path(os.environ["MPLCONFIGDIR"]).is_relative_to(home)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert (home / "spool").is_dir()


@pytest.mark.parametrize(
    "text,shown",
    [
        ("postgresql://u:secret@127.0.0.1:5432/db", "postgresql://u:***@127.0.0.1:5432/db"),
        ("http://u:p@ss@host:5000/x", "http://u:***@host:5000/x"),  # a raw "@" in the password
        ("at postgresql://u:pw@[::1]/x: refused", "at postgresql://u:***@[::1]/x: refused"),
        ("http://host:5000/x", "http://host:5000/x"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)
def test_mask_credentials_hides_every_character_of_a_password(text, shown):
    from flywheel.settings import mask_credentials

    assert mask_credentials(text) == shown


# -- settings grouped by component ------------------------------------------------------------
def test_every_setting_is_in_exactly_one_group():
    from flywheel.settings import GROUPS

    owners: dict[str, list[str]] = {}
    for name, group in GROUPS.items():
        for field in group.model_fields:
            owners.setdefault(field, []).append(name)
    assert set(owners) == set(Settings.model_fields)
    assert {f: g for f, g in owners.items() if len(g) != 1} == {}


def test_a_group_and_settings_share_one_default_and_description():
    from flywheel.settings import GROUPS

    for group in GROUPS.values():
        for name, field in group.model_fields.items():
            flat = Settings.model_fields[name]
            assert (field.default, field.description, field.metadata) == (
                flat.default,
                flat.description,
                flat.metadata,
            ), name


def test_settings_hand_out_their_groups():
    from flywheel.settings import GROUPS

    s = Settings()
    assert s.learner.learn_batch == 100
    assert s.privacy.privacy_epsilon == 3.0
    assert s.service.port == 8000
    assert s.kafka.topics == s.topics
    assert s.trusted.seed == 7 and s.registry.model_name == "flywheel"
    assert s.state.resolved_database_url == s.resolved_database_url
    for prop, group in GROUPS.items():
        value = getattr(s, prop)
        assert type(value) is group
        assert value is getattr(s, prop)  # built once
        assert value == group()  # the defaults: one source
        assert not isinstance(s, group)  # a whole Settings is not a group


def test_a_group_is_built_on_its_own_and_validated_alone():
    from flywheel.settings import KafkaSettings, LearnerSettings

    assert LearnerSettings().learn_batch == 100
    assert LearnerSettings(learn_batch=10).learn_batch == 10
    with pytest.raises(ValueError, match="FLYWHEEL_LEARN_MAX_LR"):
        LearnerSettings(learn_lr=0.5)
    with pytest.raises(ValueError, match="distinct"):
        KafkaSettings(topic_corrections="flywheel.predictions")
    with pytest.raises(ValueError, match="extra"):
        LearnerSettings(privacy_epsilon=1.0)  # another group's setting
    with pytest.raises(ValueError, match="frozen"):
        LearnerSettings().learn_batch = 5  # type: ignore[misc]


def test_environment_reaches_the_groups(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYWHEEL_LEARN_BATCH", "37")
    monkeypatch.setenv("FLYWHEEL_PRIVACY_EPSILON", "1.5")
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    s = load_settings()
    assert (s.learner.learn_batch, s.learn_batch) == (37, 37)
    assert s.privacy.privacy_epsilon == 1.5
    assert s.state.home_dir == tmp_path.resolve()


def test_a_copy_with_changes_rebuilds_its_groups(tmp_path):
    s = Settings(home=tmp_path / "a")
    assert s.kafka.kafka_bootstrap is None and s.state.home_dir == (tmp_path / "a").resolve()
    t = s.model_copy(update={"kafka_bootstrap": "k:9092", "home": tmp_path / "b"})
    assert t.kafka.kafka_bootstrap == "k:9092" and t.home_dir == (tmp_path / "b").resolve()
    assert t.state.home_dir == (tmp_path / "b").resolve()
    assert s.kafka.kafka_bootstrap is None  # the original keeps its own


def test_the_admin_token_has_a_minimum_length_and_a_refusal_never_prints_it(monkeypatch):
    """A short admin token can be guessed; the refusal names the variable and the length,
    never the value (it may be a real secret one character short)."""
    from flywheel.settings import MIN_ADMIN_TOKEN

    short = "hunter2-" + "x" * (MIN_ADMIN_TOKEN - 9)
    monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", short)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    text = str(refused.value)
    assert "FLYWHEEL_ADMIN_TOKEN" in text and f"at least {MIN_ADMIN_TOKEN}" in text
    assert "hunter2" not in text
    monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", short + "x")
    assert load_settings().admin_token is not None
    monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", "   ")  # empty stays "no token"
    assert load_settings().admin_token is None
