"""docker/: no Docker engine runs here, so the deployment is checked as data.

compose.yaml has every part the design asks for, with health checks and start order; every
`flywheel ...` command in it is a real subcommand of the CLI; every FLYWHEEL_ variable in
compose.yaml, flywheel.env and the Dockerfile is a known setting; and the Dockerfile installs
the way the Makefile (what `.ci/run` exercises) does: torch==<pin> alone first, then the
project under constraints.txt.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import click
import pytest
import typer.main
import yaml

from flywheel.broker import retention_configs
from flywheel.cli import app, register_commands
from flywheel.settings import Settings, known_variables

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
FLYWHEEL_SERVICES = {"db-upgrade", "serve", "feedback", "learn", "superlink"}
LONG_RUNNING = {"postgres", "kafka", "mlflow", "serve", "feedback", "learn", "superlink"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def cli() -> click.Group:
    register_commands()
    return typer.main.get_command(app)


def _env_file() -> dict[str, str]:
    out = {}
    for line in (DOCKER / "flywheel.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"flywheel.env: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def _command_exists(cli: click.Group, words: list[str]) -> str | None:
    """None if `flywheel WORDS...` resolves to a command, else what is wrong."""
    group: click.Command = cli
    path = ["flywheel"]
    for word in words:
        if word.startswith("-"):
            break
        if not isinstance(group, click.Group):
            break  # an argument of a leaf command
        sub = group.get_command(click.Context(group), word)
        if sub is None:
            return f"`{' '.join(path)}` has no subcommand {word!r}"
        group, path = sub, [*path, word]
    if isinstance(group, click.Group) and not getattr(group, "invoke_without_command", False):
        return f"`{' '.join(path)}` needs a subcommand"
    return None


def _flywheel_commands(compose: dict) -> dict[str, list[str]]:
    """Service -> the words after `flywheel` (the image's ENTRYPOINT is `flywheel`)."""
    out = {}
    for name, svc in compose["services"].items():
        if svc.get("image", "").startswith("flywheel") and "entrypoint" not in svc:
            command = svc.get("command", ["serve"])
            out[name] = shlex.split(command) if isinstance(command, str) else list(command)
    return out


def test_compose_has_every_part_of_the_deployment(compose):
    services = compose["services"]
    assert {
        "postgres",
        "kafka",
        "mlflow",
        "db-upgrade",
        "kafka-topics",
        "serve",
        "feedback",
        "learn",
        "superlink",
    } <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    kafka_env = services["kafka"]["environment"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert not any("zookeeper" in k.lower() for k in kafka_env)
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["serve"]["deploy"]["replicas"] == 2
    assert services["feedback"]["deploy"]["replicas"] == 2
    assert services["learn"].get("deploy", {}).get("replicas", 1) == 1  # one per lineage
    commands = _flywheel_commands(compose)
    assert commands["serve"] == ["serve"] and commands["feedback"] == ["feedback"]
    assert commands["learn"] == ["learn"] and commands["db-upgrade"] == ["db", "upgrade"]
    assert commands["superlink"] == ["fed", "superlink", "--tls"]


def test_mlflow_is_a_tracking_server_on_postgresql_with_an_artifacts_volume(compose):
    mlflow = compose["services"]["mlflow"]
    args = mlflow["command"]
    assert mlflow["entrypoint"] == ["mlflow"] and args[0] == "server"
    backend = next(a.split("=", 1)[1] for a in args if a.startswith("--backend-store-uri="))
    assert backend.startswith("postgresql") and "@postgres:" in backend
    assert "--serve-artifacts" in args
    dest = next(a.split("=", 1)[1] for a in args if a.startswith("--artifacts-destination="))
    volumes = {v.split(":")[1]: v.split(":")[0] for v in mlflow["volumes"]}
    assert volumes[dest] in compose["volumes"], "artifacts must live on a named volume"
    host = _env_file()["FLYWHEEL_MLFLOW_TRACKING_URI"].split("//", 1)[1].split(":")[0]
    allowed = next(a for a in args if a.startswith("--allowed-hosts="))
    assert host in allowed.split("=", 1)[1].split(","), "the server must accept its own name"


def test_every_flywheel_command_is_a_real_subcommand(compose, cli):
    problems = {
        name: _command_exists(cli, words) for name, words in _flywheel_commands(compose).items()
    }
    wrong = {k: v for k, v in problems.items() if v is not None}
    assert not wrong, wrong
    assert "superlink" in problems  # the federated SuperLink is part of the deployment


def test_the_checker_catches_a_wrong_command(cli):
    assert _command_exists(cli, ["serve", "--port", "1"]) is None
    assert _command_exists(cli, ["models", "approve", "3"]) is None
    assert _command_exists(cli, ["feedback"]) is None  # a group that runs without a command
    assert "no subcommand 'nope'" in _command_exists(cli, ["models", "nope"])
    assert "needs a subcommand" in _command_exists(cli, ["models"])
    assert "no subcommand" in _command_exists(cli, ["serv"])


def test_every_flywheel_variable_is_a_known_setting(compose):
    known = known_variables()
    texts = {
        "flywheel.env": (DOCKER / "flywheel.env").read_text(),
        "compose.yaml": (DOCKER / "compose.yaml").read_text(),
        "Dockerfile": (DOCKER / "Dockerfile").read_text(),
    }
    for where, text in texts.items():
        used = set(re.findall(r"\bFLYWHEEL_[A-Z0-9_]+", text))
        assert used, where
        assert not used - known, f"{where}: unknown settings {sorted(used - known)}"
    env = _env_file()
    Settings(**{k.removeprefix("FLYWHEEL_").lower(): v for k, v in env.items()})  # valid values
    for key in (
        "FLYWHEEL_KAFKA_BOOTSTRAP",
        "FLYWHEEL_DATABASE_URL",
        "FLYWHEEL_MLFLOW_TRACKING_URI",
        "FLYWHEEL_HOST",
    ):
        assert key in env, key
    assert env["FLYWHEEL_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert "@postgres:5432/" in env["FLYWHEEL_DATABASE_URL"]
    assert "FLYWHEEL_ADMIN_TOKEN" not in env, "never ship a default admin token"


def test_flywheel_processes_take_all_configuration_from_the_env_file(compose):
    for name in FLYWHEEL_SERVICES:
        svc = compose["services"][name]
        assert svc["env_file"] == "flywheel.env", name
        assert not any(k.startswith("FLYWHEEL_") for k in svc.get("environment") or {}), name


def test_health_checks_and_start_order(compose):
    services = compose["services"]
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check, f"{name} has no healthcheck (or an explicit `disable: true`)"
        assert check.get("disable") or check.get("test"), name
    for name in ("serve", "feedback", "mlflow", "kafka", "postgres", "superlink"):
        assert services[name]["healthcheck"].get("test"), f"{name} must be health-checked"
    for name in FLYWHEEL_SERVICES - {"db-upgrade"}:
        deps = services[name]["depends_on"]
        assert deps["db-upgrade"]["condition"] == "service_completed_successfully", name
        assert deps["kafka-topics"]["condition"] == "service_completed_successfully", name
        assert deps["kafka"]["condition"] == "service_healthy", name
        assert deps["mlflow"]["condition"] == "service_healthy", name
    assert services["db-upgrade"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for one_shot in ("db-upgrade", "kafka-topics"):
        assert services[one_shot]["restart"] == "no"
    for name, svc in services.items():  # every dependency exists
        assert set(svc.get("depends_on") or {}) <= set(services), name


def test_the_topics_created_are_the_ones_flywheel_uses(compose):
    script = " ".join(compose["services"]["kafka-topics"]["command"])
    assert set(Settings().topics) <= set(script.replace(";", " ").split())
    partitions = int(_env_file().get("FLYWHEEL_TOPIC_PARTITIONS", Settings().topic_partitions))
    assert f"--partitions {partitions}" in script


def test_the_data_topics_get_flywheels_retention(compose):
    """The compose file creates the topics that hold data about people with the retention
    `flywheel topics` and the embedded broker set (flywheel.broker.retention_configs)."""
    script = " ".join(compose["services"]["kafka-topics"]["command"])
    env = _env_file()
    settings = Settings(
        _env_file=None,
        **{
            k.removeprefix("FLYWHEEL_").lower(): v
            for k, v in env.items()
            if k.startswith("FLYWHEEL_RETENTION_")
        },
    )
    configs = retention_configs(settings.kafka, settings.feedback)
    loops = re.findall(r"for topic in ([^;]+); do(.*?)done", script)
    assert loops, script
    for topics, body in loops:
        for topic in topics.split():
            want = configs.get(topic, {}).get("retention.ms")
            if want is None:
                assert "retention.ms" not in body, topic
            else:
                assert f"--config retention.ms={want}" in body, topic
    assert {t for topics, _ in loops for t in topics.split()} >= set(configs)


def _pip_installs(lines: list[str]) -> list[str]:
    return [
        re.sub(r"\s+", " ", ln.strip())
        for ln in lines
        if "pip install" in ln and "--upgrade pip" not in ln
    ]


def test_dockerfile_installs_like_the_makefile():
    constraints = (ROOT / "constraints.txt").read_text()
    torch_pin = re.search(r"^torch==(\S+)$", constraints, re.M).group(1)
    makefile = _pip_installs((ROOT / "Makefile").read_text().splitlines())
    dockerfile_text = (DOCKER / "Dockerfile").read_text()
    docker = _pip_installs(dockerfile_text.splitlines())
    assert (
        dockerfile_text.splitlines()[
            [i for i, ln in enumerate(dockerfile_text.splitlines()) if ln.startswith("FROM")][0]
        ]
        == "FROM python:3.11-slim"
    )
    for steps, where in ((makefile, "Makefile"), (docker, "Dockerfile")):
        assert len(steps) == 2, (where, steps)
        first, second = steps
        assert f"torch=={torch_pin}" in first.split(), (where, first)
        assert first.split()[-1] == f"torch=={torch_pin}", f"{where}: torch alone, first"
        assert "-c constraints.txt" in second, (where, second)
        assert "torch" not in second, (where, second)
    assert docker[1].split()[-1] == "."  # the project, not editable, in the image
    assert re.search(r"^USER (?!root)\S+", dockerfile_text, re.M), "a non-root user"
    assert "HEALTHCHECK" in dockerfile_text and "/healthz" in dockerfile_text


def test_the_image_holds_every_package_folder():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = set(re.findall(r"^COPY (\S+) \./\1$", (DOCKER / "Dockerfile").read_text(), re.M))
    assert folders <= copied, f"COPY these into the image: {sorted(folders - copied)}"


def test_superlink_publishes_and_checks_the_port_it_binds_with_tls(compose):
    """The port in FLYWHEEL_FED_SUPERLINK is the one compose publishes and health-checks
    (the file once mapped 9092 while the SuperLink bound 9093); it binds beyond loopback,
    so it runs with --tls and every certificate it names is in a mounted folder."""
    env = _env_file()
    host, port = env["FLYWHEEL_FED_SUPERLINK"].rsplit(":", 1)
    assert host not in ("127.0.0.1", "localhost", "::1"), "sites must be able to reach it"
    assert host != "0.0.0.0", "its ServerApps verify the certificate against this name"
    svc = compose["services"]["superlink"]
    assert [p.split(":")[-1] for p in svc["ports"]] == [port]
    assert f"'127.0.0.1', {port})" in " ".join(svc["healthcheck"]["test"])
    assert "--tls" in svc["command"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
    for key in ("FLYWHEEL_FED_TLS_CA", "FLYWHEEL_FED_TLS_CERT", "FLYWHEEL_FED_TLS_KEY"):
        folder = env[key].rsplit("/", 1)[0]
        assert folder in mounts, f"{key}={env[key]} is not in a mounted folder"


def test_no_service_publishes_an_unauthenticated_port_beyond_this_host(compose):
    """MLflow's server has no authentication in this file: loopback only on the host."""
    (mlflow,) = compose["services"]["mlflow"]["ports"]
    assert mlflow.startswith("127.0.0.1:"), mlflow


def test_every_process_reads_the_same_promotion_keys(compose):
    """Each container has its own FLYWHEEL_HOME: with the embedded default, each would make
    its own key and every service would refuse the learner's promotions. The env file names
    one pair, in a folder every Flywheel service mounts."""
    env = _env_file()
    folder = env["FLYWHEEL_SIGNING_KEY"].rsplit("/", 1)[0]
    assert env["FLYWHEEL_TRUSTED_KEYS"].rsplit("/", 1)[0] == folder
    for name in FLYWHEEL_SERVICES:
        svc = compose["services"][name]
        mounts = {m.split(":")[1] for m in svc.get("volumes", [])}
        assert folder in mounts, f"{name} does not mount {folder}"
