"""FLTrust quarantines a site that keeps pointing away (issue 31 §3): in-process sites
(`InProcessGrid`, the project's ClientApp, strategy and ledger) of the sites' world with a
root set of that world as the trusted data, as `bench fedrobust --world same` runs them;
the last site sends its update sign-flipped every round."""

from __future__ import annotations

import pytest

from bench.fedrobust import run_one

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_sign_flipping_site_is_quarantined_and_not_asked_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_FED_QUARANTINE_ROUNDS", "2")
    sites = 4
    result = run_one(
        tmp_path, "fltrust", "signflip", sites=sites, rounds=5, steps=5, seed=7, world="same"
    )
    (q,) = result["quarantined"]  # the attacker, and only it
    assert q["site"] == f"node:{sites}" and len(q["zero_rounds"]) == 2
    after = [t for t in result["trust"] if t["round"] > q["round"]]
    assert after and all(sites not in t["sites"] for t in after)  # never asked again
    before = [t for t in result["trust"] if t["round"] <= q["round"]]
    for t in before:  # it scored 0 each time it was asked, in a row, until quarantined
        if t["round"] in q["zero_rounds"]:
            assert t["scores"][t["sites"].index(sites)] == 0.0
    assert result["dropped"] == 0
