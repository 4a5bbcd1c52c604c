"""Every benchmark's JSON document has the same head: name, date, command, machine with the
load average at the start and at the end (`bench.harness`)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_a_document_carries_the_machine_and_the_load_before_and_after(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a plain folder, not installed
    monkeypatch.setattr("sys.argv", ["bench", "quant", "--json"])
    from bench.harness import document, load_range, machine, machine_line

    info = machine()
    assert info["cpu_count"] and len(info["loadavg_start"]) == 3
    doc = document("quant", info, {"config": {"a": 1}, "seconds": 2.0})
    assert list(doc)[:4] == ["benchmark", "date", "command", "machine"]
    assert doc["command"] == "python -m bench quant --json"
    assert doc["config"] == {"a": 1} and doc["seconds"] == 2.0
    assert len(doc["machine"]["loadavg_end"]) == 3
    assert "->" in load_range(doc["machine"]) and doc["date"] in machine_line(info, doc["date"])
    quiet = document("fedround", machine(), {"x": 1}, date="2025-01-01", command=False)
    assert "command" not in quiet and quiet["date"] == "2025-01-01"


@pytest.mark.parametrize("name", ["feedback", "_worker_group"])
def test_the_feedback_bench_touches_no_private_name_of_the_worker(name):
    """The worker is timed through its public observer hook, never by replacing its
    private methods or patching module functions."""
    source = (ROOT / "bench" / f"{name}.py").read_text()
    for private in ("worker._", "setattr(", "_sessions", "worker_module"):
        assert private not in source, private


def test_quiet_loggers_puts_the_levels_back_even_when_the_benchmark_fails():
    import logging

    from bench.harness import quiet_loggers

    log = logging.getLogger("flywheel.test-quiet")
    log.setLevel(logging.INFO)
    with pytest.raises(RuntimeError), quiet_loggers({"flywheel.test-quiet": logging.ERROR}):
        assert log.level == logging.ERROR
        raise RuntimeError("the benchmark failed")
    assert log.level == logging.INFO
