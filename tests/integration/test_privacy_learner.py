"""DP in the learner on a real store and MLflow: ledger, tags, refusal, per-source budget."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from flywheel.learner import LearnerConfig, OnlineLearner, ensure_champion
from flywheel.privacy import PrivacyLedger, epsilon
from flywheel.registry import Registry
from flywheel.settings import Settings
from flywheel.store import make_engine
from flywheel.store import upgrade as upgrade_store
from tests.deadlines import deadline
from tests.examples import add_drift_examples
from tests.trusted import write_synthetic_trusted

pytestmark = pytest.mark.integration
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


def _settings(settings: Settings, url: str, **extra: object) -> Settings:
    s = settings.model_copy(
        update={
            "database_url": url,
            "learn_batch": 50,
            "learn_cursor_grace_s": 0.0,
            "gate_min_holdout": 5,
            "privacy_enabled": True,
            **extra,
        }
    )
    upgrade_store(url)
    ensure_champion(s.trusted, Registry.of(s))
    write_synthetic_trusted(s)
    return s


def _env(s: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(
        FLYWHEEL_HOME=str(s.home),
        FLYWHEEL_DATABASE_URL=str(s.database_url),
        FLYWHEEL_KAFKA_BOOTSTRAP=str(s.kafka_bootstrap),
    )
    return env


def test_every_version_carries_the_epsilon_its_ledger_entry_records(settings, db_url, tmp_path):
    s = _settings(settings, db_url)
    add_drift_examples(db_url, 30, 10_000, split="holdout")
    add_drift_examples(db_url, 50, 0)
    learner = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    first = learner.step()
    add_drift_examples(db_url, 10, 200, source="heavy")  # one source with 10 examples in update 2
    add_drift_examples(db_url, 49, 100)  # with "heavy", the 50 privacy units a DP update waits for
    second = learner.step()
    assert first is not None and second is not None
    ledger = PrivacyLedger(make_engine(db_url))
    entries = ledger.entries(learner.lineage)
    assert [e.update_no for e in entries] == [1, 2]
    registry = Registry.of(s)
    for candidate, entry in zip((first, second), entries, strict=True):
        tags = registry.info(candidate.version).tags
        assert entry.version == candidate.version
        assert tags["epsilon"] == f"{entry.epsilon_lineage:.4f}"
        assert tags["delta"] == f"{s.privacy_delta:g}"
        assert 0 < entry.epsilon_update <= s.privacy_epsilon
        # what the ledger says one update costs is what the accountant computes for it
        assert entry.epsilon_update == pytest.approx(
            epsilon([entry.mechanism], entry.delta, entry.accountant), rel=1e-9
        )
    assert entries[1].sources == 49 + 1  # "heavy" is one source, however many examples
    heavy = next(sp for sp in ledger.sources(learner.lineage) if sp.source == "source:heavy")
    assert heavy.examples == 10 and heavy.updates == 1
    # the report shows the same versions and numbers
    out = subprocess.run(
        [FLYWHEEL, "privacy", "report", "--json", "--plot", str(tmp_path / "eps.png")],
        env=_env(s),
        capture_output=True,
        text=True,
        timeout=deadline(120),
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [v["version"] for v in doc["versions"]] == [first.version, second.version]
    assert doc["epsilon_spent"] == pytest.approx(entries[-1].epsilon_lineage)
    assert doc["sources_total"] == 50 + 50
    assert (tmp_path / "eps.png").stat().st_size > 1000


def test_dp_ftrl_versions_carry_their_tree_and_the_cost_of_privacy(settings, sqlite_url):
    """FLYWHEEL_PRIVACY_MECHANISM=dp-ftrl end to end: the ledger holds each update's tree
    (kind, σ, leaves, C, accountant) with the ε dp-accounting gives it, the version's tags
    name the mechanism and compare it with the same run without DP, and the privacy
    report shows the tree."""
    s = _settings(settings, sqlite_url, privacy_mechanism="dp-ftrl")
    add_drift_examples(sqlite_url, 30, 10_000, split="holdout")
    add_drift_examples(sqlite_url, 50, 0)
    learner = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    first = learner.step()
    assert first is not None and first.privacy is not None
    (entry,) = PrivacyLedger(make_engine(sqlite_url)).entries(learner.lineage)
    assert (entry.mechanism_kind, entry.sample_rate, entry.steps) == ("tree", 1.0, s.learn_steps)
    assert (entry.accountant, entry.max_grad_norm) == ("rdp", s.privacy_max_grad_norm)
    assert entry.epsilon_update == pytest.approx(epsilon([entry.mechanism], entry.delta))
    info = Registry.of(s).info(first.version)
    assert info.tags["dp_mechanism"] == "dp-ftrl"
    assert info.params["dp_mechanism"] == "tree"
    plain = first.privacy["nonprivate_trusted_accuracy"]
    assert plain is not None
    assert (
        f"trusted {first.gate.trusted_candidate:.3f} with DP vs {plain:.3f} without"
        in info.tags["privacy_cost"]
    )
    assert first.privacy["trusted_accuracy"] == first.gate.trusted_candidate
    out = subprocess.run(
        [FLYWHEEL, "privacy", "report", "--json"],
        env=_env(s),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [v["mechanism"] for v in doc["versions"]] == ["tree"]
    # piped: tab-separated, nothing cut (COLUMNS, set by some shells, would ask for a table
    # of that width, which wraps cells)
    plain_env = {k: v for k, v in _env(s).items() if k != "COLUMNS"}
    text = subprocess.run(
        [FLYWHEEL, "privacy", "report"], env=plain_env, capture_output=True, text=True, timeout=120
    )
    assert text.returncode == 0 and "DP-FTRL tree" in text.stdout, text.stdout + text.stderr


def test_an_update_over_budget_is_refused_before_any_training(settings, sqlite_url, caplog):
    s = _settings(settings, sqlite_url, privacy_noise_multiplier=0.05)  # one update: ε >> 3
    add_drift_examples(sqlite_url, 10, 10_000, split="holdout")
    add_drift_examples(sqlite_url, 60, 0)
    learner = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    learner.start()
    before = [p.detach().clone() for p in learner._trainer.module.parameters()]
    versions = {v.version for v in Registry.of(s).versions()}
    refused = refusals("mechanism")
    assert learner.step() is None
    assert refusals("mechanism") == refused + 1
    assert "refused: one update" in caplog.text and "budget 3" in caplog.text
    after = list(learner._trainer.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert {v.version for v in Registry.of(s).versions()} == versions
    assert PrivacyLedger(make_engine(sqlite_url)).entries() == []


def test_sources_out_of_budget_are_left_out_and_capped_per_update(settings, pg_url):
    s = _settings(settings, pg_url, privacy_source_updates=1, privacy_max_per_source=4)
    add_drift_examples(pg_url, 10, 10_000, split="holdout")
    add_drift_examples(pg_url, 6, 300, source="big")  # 6 examples, capped to 4
    add_drift_examples(pg_url, 49, 0)  # with "big": the 50 privacy units a DP update waits for
    learner = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    learner.start()
    assert learner.step() is not None
    ledger = PrivacyLedger(make_engine(pg_url))
    (entry,) = ledger.entries(learner.lineage)
    assert entry.capped_examples == 2 and entry.examples == 49 + 4
    # a second update with "big" again: one update is all a source may join here
    add_drift_examples(pg_url, 5, 500, source="big")
    add_drift_examples(pg_url, 49, 400)
    assert learner.step() is not None
    second = ledger.entries(learner.lineage)[1]
    assert second.excluded_examples == 4 and second.examples == 49
    spent = {sp.source: sp for sp in ledger.sources(learner.lineage)}
    assert spent["source:big"].updates == 1
    assert max(sp.epsilon for sp in spent.values()) <= s.privacy_epsilon + 1e-9
    assert np.isclose(second.epsilon_lineage, max(sp.epsilon for sp in spent.values()))


def test_a_dp_update_waits_for_privacy_units_not_rows_and_no_longer_than_its_cap(
    settings, sqlite_url
):
    """FLYWHEEL_LEARN_BATCH counts privacy units under DP: 60 rows from 6 units wait (DP-SGD
    clips one gradient per unit, so 6 units are 6 signals against the same noise), 104 rows
    holding 50 units train; 4 busy units fill 4 x 50 rows and train anyway (capped wait)."""
    s = _settings(settings, sqlite_url)
    add_drift_examples(sqlite_url, 10, 10_000, split="holdout")
    for k in range(6):
        add_drift_examples(sqlite_url, 10, 100 * k, source=f"heavy-{k}")
    learner = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    assert learner.step() is None  # 60 rows, 6 units: waits
    add_drift_examples(sqlite_url, 44, 1_000)
    assert learner.step() is not None
    ledger = PrivacyLedger(make_engine(sqlite_url))
    (entry,) = ledger.entries(learner.lineage)
    assert (entry.sources, entry.examples) == (50, 104)
    for k in range(4):
        add_drift_examples(sqlite_url, 50, 2_000 + 100 * k, source=f"busy-{k}")
    assert learner.step() is not None  # 200 rows from 4 units: the wait is capped
    second = ledger.entries(learner.lineage)[1]
    per_unit = s.privacy_max_per_source
    assert (second.sources, second.examples) == (4, 4 * per_unit)
    assert second.capped_examples == 200 - 4 * per_unit


def test_flywheel_learn_logs_the_refusal_and_counts_it_on_metrics(settings, sqlite_url):
    import socket
    import time

    import httpx

    s = _settings(settings, sqlite_url)
    add_drift_examples(sqlite_url, 60, 0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = _env(s) | {
        "FLYWHEEL_PRIVACY_NOISE_MULTIPLIER": "0.05",
        "FLYWHEEL_LEARN_BATCH": "50",
        "FLYWHEEL_LEARN_METRICS_PORT": str(port),
        "FLYWHEEL_LEARN_POLL_S": "0.2",
        "FLYWHEEL_SEED_EXAMPLES": str(s.seed_examples),
    }
    proc = subprocess.Popen(
        [FLYWHEEL, "learn"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        until, scraped = time.monotonic() + deadline(120), ""
        while not re.search(
            r'flywheel_privacy_refusals_total\{reason="mechanism"\} [1-9]', scraped
        ):
            assert proc.poll() is None and time.monotonic() < until, scraped[-2000:]
            time.sleep(0.3)
            try:
                scraped = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            except httpx.TransportError:
                continue
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=deadline(30))
    assert "privacy budget: refused: one update" in err
    assert PrivacyLedger(make_engine(sqlite_url)).entries() == []


def refusals(reason: str) -> float:
    """The learner's `flywheel_privacy_refusals_total{reason}`, read as a scrape would."""
    value = REGISTRY.get_sample_value("flywheel_privacy_refusals_total", {"reason": reason})
    return value or 0.0
