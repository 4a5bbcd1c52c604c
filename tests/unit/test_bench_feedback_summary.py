"""The feedback benchmark's summary arithmetic: ratios and the CPU ceiling it reports."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a plain folder, not installed
    import bench.feedback

    return bench.feedback


def _round(
    raw_s: float, worker_s: float, process_cpu_s: float, pg_cpu_s: float | None, n: int = 1000
) -> dict:
    return {
        "raw": {
            "elapsed_s": raw_s,
            "elapsed_s_each": [raw_s, raw_s * 0.8, raw_s * 1.2],
            "json_elapsed_s_each": [raw_s * 2] * 3,
        },
        "floor": {"corrections_per_s": n / raw_s},
        "worker": {
            "elapsed_s": worker_s,
            "corrections_per_s": n / worker_s,
            "process_cpu_s": process_cpu_s,
            "postgresql_cpu_s": pg_cpu_s,
        },
        "ratio": raw_s / worker_s,
        "verify": {"ok": True},
    }


def test_cpu_ceiling_spreads_worker_and_database_cpu_over_the_cores(bench: ModuleType):
    # 3 s of worker CPU + 1 s of PostgreSQL on 2 cores: at least 2 s of wall time
    assert bench.cpu_ceiling(
        1.0, {"process_cpu_s": 3.0, "postgresql_cpu_s": 1.0}, 2
    ) == pytest.approx(0.5)
    assert bench.cpu_ceiling(
        1.0, {"process_cpu_s": 3.0, "postgresql_cpu_s": 1.0}, 4
    ) == pytest.approx(1.0)


def test_cpu_ceiling_is_unknown_without_the_database_cpu(bench: ModuleType):
    assert bench.cpu_ceiling(1.0, {"process_cpu_s": 3.0, "postgresql_cpu_s": None}, 2) is None
    assert bench.cpu_ceiling(1.0, {"process_cpu_s": 0.0, "postgresql_cpu_s": 0.0}, 2) is None


def test_summary_takes_medians_and_judges_the_targets(bench: ModuleType):
    rounds = [_round(1.0, 2.0, 3.0, 1.0), _round(1.2, 2.0, 3.0, 1.8), _round(0.9, 3.0, 4.0, 2.0)]
    s = bench.summarize(1000, rounds, cores=2)
    assert s["ratio"] == pytest.approx(0.5)  # 0.5, 0.6, 0.3
    assert s["joined_per_s"] == pytest.approx(500.0)
    assert s["ratio_cpu_ceiling"] == pytest.approx(0.5)  # 0.5, 0.5, 0.3
    assert s["targets"]["ratio_to_raw"]["pass"] is True
    assert s["targets"]["joined_per_s"]["pass"] is False  # 500 < 10,000
    assert s["ratio_to_fastest_raw"] <= s["ratio"]


def test_summary_has_no_ceiling_when_no_round_knows_the_database_cpu(bench: ModuleType):
    s = bench.summarize(1000, [_round(1.0, 2.0, 3.0, None)], cores=2)
    assert s["ratio_cpu_ceiling"] is None
