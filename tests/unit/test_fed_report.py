"""`flywheel fed demo` writes a plot and summary.md from the run's summary (issue 29)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from flywheel.demo import write_fed_report
from flywheel.learner.federated.server import RoundRecord, RunSummary


def _summary() -> dict:
    run = RunSummary(strategy="trimmed", clipping="client", noise_multiplier=1.1, clip=0.5)
    for n, (acc, eps) in enumerate([(0.61, 0.4), (0.74, 0.8), (math.nan, 1.1)], start=1):
        run.rounds.append(
            RoundRecord(
                round=n,
                sites=[0, 1, 2],
                replied=3 if n < 3 else 2,
                examples=900,
                recent_accuracy=acc,
                trusted_accuracy=0.9,
                train_loss=0.3,
                epsilon_round=0.4,
                epsilon_cumulative=eps,
                wall_s=9.0,
                client_compute_s=4.0,
                overhead_s=1.25,
                base_version="1",
            )
        )
    run.start_version, run.version, run.promoted, run.gate = "1", "4", True, "passed"
    run.epsilon, run.delta = 1.1, 1e-5
    run.refused.append({"round": 2, "site": 1, "why": "update norm 9e6 over the clip"})
    run.quarantined.append({"site": "site:2", "round": 3, "zero_rounds": [1, 2, 3]})
    # fltrust's record of rounds 1 and 2 (round 3 scored nobody: no global model)
    for record, ref, ratio, scores in (
        (run.rounds[0], "trusted", 1.25, [0.31, 0.0, 0.12]),
        (run.rounds[1], "median", 0.04, [0.2, 0.05, 0.0]),
    ):
        record.trust_reference, record.trust_reference_ratio = ref, ratio
        record.trust_scores, record.trust_sites = scores, ["site:0", "site:1", "site:2"]
    # what run_demo returns: the summary as written to summary.json, plus the sites
    doc = json.loads(json.dumps(run.to_dict(), default=str))
    doc["sites"] = [{"examples": 300, "label_counts": [200, 90, 10]}] * 3
    doc["demo_seconds"] = 61.0
    assert asdict(run)["rounds"]  # the records are dataclasses, read as dicts above
    return doc


def test_report_has_the_plot_and_a_readable_summary(tmp_path: Path) -> None:
    write_fed_report(tmp_path / "out", _summary())
    png = tmp_path / "out" / "accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "out" / "summary.md").read_text()
    assert md.startswith("# Flywheel federated demo\n")
    assert "registered **v4** from v1 (passed), promoted" in md
    assert "| 1 | 3/3 | 900 | 61.0% | 90.0% | 0.4 | 0.4 | 1.25 |" in md
    assert "| 3 | 2/3 | 900 | n/a | 90.0% | 0.4 | 1.1 | 1.25 |" in md  # NaN: no global model
    assert "![accuracy per round](accuracy.png)" in md
    assert "| 0 | 300 | 200, 90, 10 |" in md
    assert "round 2, site 1: update norm 9e6 over the clip" in md
    assert "## Quarantined sites" in md
    assert "- site:2 after round 3: trust 0 in rounds 1, 2, 3" in md


def test_report_shows_each_rounds_trust_scores(tmp_path: Path) -> None:
    """fltrust's per-round trust (reference, its norm ratio, each site's score) was in the
    round records but in neither summary.md nor the JSON's readable form: a site scored 0
    round after round could only be found by pairing `trust_scores` with node ids."""
    doc = _summary()
    assert [r["trust"] for r in doc["rounds"]] == [
        {"site:0": 0.31, "site:1": 0.0, "site:2": 0.12},
        {"site:0": 0.2, "site:1": 0.05, "site:2": 0.0},
        {},
    ]
    write_fed_report(tmp_path, doc)
    md = (tmp_path / "summary.md").read_text()
    assert "## Trust per round" in md
    assert "| 1 | trusted | 1.25 | site:0 0.31, site:1 0.00, site:2 0.12 |" in md
    assert "| 2 | median | 0.04 | site:0 0.20, site:1 0.05, site:2 0.00 |" in md
    assert "| 3 | " not in md.split("## Trust per round")[1].split("##")[0]


def test_an_older_summary_pairs_trust_scores_with_node_ids(tmp_path: Path) -> None:
    """A summary.json written before rounds carried `trust` still shows its scores."""
    doc = _summary()
    for r in doc["rounds"]:
        del r["trust"], r["trust_sites"]
    write_fed_report(tmp_path, doc)
    assert (
        "| 1 | trusted | 1.25 | 0 0.31, 1 0.00, 2 0.12 |" in (tmp_path / "summary.md").read_text()
    )


def test_other_strategies_have_no_trust_section(tmp_path: Path) -> None:
    doc = _summary()
    for r in doc["rounds"]:
        r["trust"], r["trust_scores"] = {}, []
    write_fed_report(tmp_path, doc)
    assert "Trust per round" not in (tmp_path / "summary.md").read_text()


def test_a_run_that_registered_nothing_says_so(tmp_path: Path) -> None:
    doc = _summary() | {"version": None, "promoted": False, "gate": "", "rounds": []}
    write_fed_report(tmp_path, doc)
    md = (tmp_path / "summary.md").read_text()
    assert "no version registered (no round changed the model)" in md
    assert "| (none) |" in md
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_the_demo_report_still_draws_with_the_shared_pieces(tmp_path: Path) -> None:
    from flywheel.demo import Trace, summarize, write_report

    n = 400
    trace = Trace(
        t=[i * 0.1 for i in range(n)],
        ok=[1 if i < 200 or i > 300 else 0 for i in range(n)],
        ok_frozen=[1 if i < 200 else 0 for i in range(n)],
        version=["1" if i < 320 else "2" for i in range(n)],
        drift_index=200,
        drift_t=20.0,
    )
    candidates = [
        {
            "version": "2",
            "parent_version": "1",
            "examples": 100,
            "lr": 0.003,
            "promoted": True,
            "gate": "passed",
        }
    ]
    summary = summarize(trace, candidates=candidates, fresh=[3.0], elapsed_s=40.0)
    write_report(tmp_path, summary, trace)
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "summary.md").read_text()
    assert "| before the drift | 100.0% | 100.0% |" in md
    assert "| v2 | v1 | 100 | 0.003 | yes | - | passed |" in md
