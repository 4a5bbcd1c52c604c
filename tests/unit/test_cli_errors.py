"""Bad input and unreachable services end a CLI command with one line, never a traceback
(whose locals would print database URLs with their passwords)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.cli.errors import describe_outside_error

SECRET = "hunter2"


def flywheel(
    home: Path, *args: str, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    return subprocess.run(
        [sys.executable, "-m", "flywheel", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, "FLYWHEEL_HOME": str(home), **env},
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and SECRET not in r.stderr + r.stdout, r.stderr
    assert fragment in " ".join(r.stderr.split()), r.stderr


def test_an_unreachable_database_is_one_line_without_the_password(tmp_path):
    url = f"postgresql+psycopg://flywheel:{SECRET}@127.0.0.1:1/x"
    r = flywheel(tmp_path / "home", "feedback", "report", FLYWHEEL_DATABASE_URL=url)
    assert_one_line_error(r, 1, "error: database: connection failed")


def test_a_home_that_is_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("")
    r = flywheel(tmp_path / "afile", "feedback", "report")
    assert_one_line_error(r, 2, "FLYWHEEL_HOME")


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("feedback", "report", "--hours", "nan"), "expected hours between"),
        (("feedback", "report", "--hours", "1e308"), "expected hours between"),
        (("models", "card", "1", "--hours", "inf"), "expected hours between"),
        (("db", "downgrade", ""), "expected a revision"),
        (("db", "upgrade", "-r", " "), "expected a revision"),
        (("privacy", "report", "--plot", "eps.txt"), "the name must end in one of"),
        (("fed", "server", "--clipping", "bogus"), "--clipping must be one of client, server"),
    ],
)
def test_bad_arguments_are_usage_errors(tmp_path, args, fragment):
    r = flywheel(tmp_path / "home", *args)
    assert_one_line_error(r, 2, fragment)


def test_a_card_folder_that_cannot_be_made_is_blamed_not_the_registry(tmp_path):
    (tmp_path / "afile").write_text("")
    r = flywheel(tmp_path / "home", "models", "card", "1", "--out", str(tmp_path / "afile" / "c"))
    assert_one_line_error(r, 1, "--out")
    assert "registry" not in r.stderr


def test_describe_outside_error_masks_and_leaves_bugs_alone():
    from sqlalchemy.exc import ArgumentError

    assert (
        describe_outside_error(ArgumentError(f"bad postgresql://u:{SECRET}@h/x"))
        == "database: bad postgresql://u:***@h/x"
    )
    assert (
        describe_outside_error(FileNotFoundError(2, "No such file", "/x"))
        == "[Errno 2] No such file: '/x'"
    )
    assert describe_outside_error(KeyError("a bug")) is None
    assert describe_outside_error(ValueError("also a bug")) is None


def test_fed_server_without_a_superlink_says_where_flwr_said_why(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = flywheel(
        tmp_path / "home",
        "fed",
        "server",
        "--timeout",
        "60",
        FLYWHEEL_FED_SUPERLINK=f"127.0.0.1:{port}",
    )
    assert_one_line_error(r, 1, "error: flwr run exited with")
    log = tmp_path / "home" / "flwr" / "flwr-run.log"
    assert str(log) in r.stderr and log.stat().st_size > 0
