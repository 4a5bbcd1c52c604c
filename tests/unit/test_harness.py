"""The test harness itself (tests/conftest.py, tests/processes.py, tests/deadlines.py): a test
that leaves a process behind fails and the process is killed; the `processes` fixture stops a
failed test's process group; a process left by a fixture fails the whole run, also under
pytest-xdist; deadlines and pytest-timeout's limits scale with the speed factor.

Each case runs a small pytest session in a subprocess (tests/nested.py) and then checks, by
reading /proc, that none of its marker processes (`sleep 6xx.yy`, unique per case) is left.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.nested import NestedRun, run_nested


def running(marker: str) -> list[str]:
    """Command lines of live processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state not in ("Z", "X"):
            found.append(cmd)
    return found


CASES = """
import subprocess
import pytest


def test_leaks_a_process():
    subprocess.Popen(["sleep", "611.25"])


def test_fails_with_a_process_group(processes):
    processes.start(["sh", "-c", "sleep 612.25 & sleep 612.25"])
    assert False, "this test fails on purpose"


def test_stops_its_process(processes):
    proc = processes.start(["sleep", "613.25"])
    assert processes.stop(proc) != 0  # killed by SIGTERM


def test_deadline(deadline):
    assert deadline(4) == 10


@pytest.mark.timeout(600)
def test_timeouts(request):
    assert request.node.get_closest_marker("timeout").args[0] == 1500


def test_configured_timeout(request):
    assert request.node.get_closest_marker("timeout").args[0] == 750
"""


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> NestedRun:
    folder = tmp_path_factory.mktemp("harness")
    return run_nested(folder, {"test_cases.py": CASES}, env={"TEST_DEADLINE_FACTOR": "2.5"})


def test_a_test_that_leaves_a_process_running_fails_and_the_process_is_killed(cases):
    assert cases.outcomes["test_leaks_a_process"] == "error", cases.output
    assert "left 1 process(es) running (now killed)" in cases.output
    assert "sleep 611.25" in cases.output
    assert not running("sleep 611.25")


def test_the_processes_fixture_stops_a_failed_tests_process_group(cases):
    # failed by its assert, not by a leak: both shells' sleeps died with the group
    assert cases.outcomes["test_fails_with_a_process_group"] == "failed", cases.output
    assert "this test fails on purpose" in cases.output
    assert "test_fails_with_a_process_group left" not in cases.output
    assert not running("sleep 612.25")
    assert cases.outcomes["test_stops_its_process"] == "passed", cases.output


def test_deadlines_and_timeouts_scale_with_the_factor(cases):
    for name in ("test_deadline", "test_timeouts", "test_configured_timeout"):
        assert cases.outcomes[name] == "passed", cases.output


def test_a_factor_below_one_is_refused(tmp_path):
    run = run_nested(
        tmp_path, {"test_x.py": "def test_x():\n    pass\n"}, env={"TEST_DEADLINE_FACTOR": "0.5"}
    )
    assert run.returncode != 0
    assert "TEST_DEADLINE_FACTOR='0.5': the factor must be a number >= 1" in run.output


SESSION_LEAK = """
import subprocess
import pytest


@pytest.fixture(scope="session")
def daemon():
    return subprocess.Popen(["sleep", "{marker}"])


def test_uses_the_daemon(daemon):
    pass


def test_other():
    pass
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_process_left_by_a_session_fixture_fails_the_run(tmp_path, workers):
    marker = f"62{workers}.75"
    run = run_nested(
        tmp_path,
        {"test_session.py": SESSION_LEAK.format(marker=marker)},
        "-n",
        workers,
        env={"TEST_DEADLINE_FACTOR": "1"},
    )
    # every test passed, and still the run fails: the session's daemon was never stopped
    assert set(run.outcomes.values()) == {"passed"}, run.output
    assert run.returncode == 1, run.output
    assert "processes left behind" in run.output
    assert f"sleep {marker}" in run.output
    assert not running(f"sleep {marker}")


SIBLINGS = """
import os
import time


def test_sibling(processes):
    proc = processes.start(["sleep", "631.5"])
    # gw0 ends first; its checks must not count gw1's process (nor gw1's, gw0's) as its own
    time.sleep(1 if os.environ["PYTEST_XDIST_WORKER"] == "gw0" else 8)
    assert proc.poll() is None, "another session killed this test's process"
"""


def test_a_clean_run_passes_and_touches_no_other_sessions_processes(tmp_path, processes):
    mine = processes.start(["sleep", "630.5"])  # this session's: the nested one must not care
    run = run_nested(tmp_path, {"test_siblings.py": SIBLINGS}, "-n", "2", "--dist", "each")
    assert run.returncode == 0, run.output
    assert run.outcomes == {"test_sibling": "passed"}, run.output
    assert "processes left behind" not in run.output
    assert mine.poll() is None, "the nested session killed a process of this one"
    assert not running("sleep 631.5")


def test_fuzzing_files_are_marked_slow(tmp_path):
    run = run_nested(
        tmp_path,
        {
            "test_fuzz_api.py": "def test_fuzz():\n    pass\n",
            "test_api.py": "def test_api():\n    pass\n",
        },
        "-m",
        "not slow",
    )
    assert run.returncode == 0, run.output
    assert run.outcomes == {"test_api": "passed"}, run.output
