"""`flywheel models diff | card | pending | approve | reject` on a real SQLite registry and a
real (migrated SQLite) training store.

The world is built once per module and copied per test: a seed model (v1, trained on a small
seed set), two online children of it with known weight changes, a rejected one and a pending
one, plus store examples (corrections, counterexamples, holdout corrections) and the feedback
workers' error counters.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from flywheel.cli import app, register_commands
from flywheel.learner.seed_model import ensure_champion
from flywheel.modelspec import Blend, ModelSpec, build_model
from flywheel.promotion import default_actor
from flywheel.registry import Registry
from flywheel.settings import Settings, prepare_home
from flywheel.store import Example, make_engine, session_factory, upgrade
from flywheel.store.models import ErrorCount
from flywheel.streams import LABELS, drift_concept

register_commands()
runner = CliRunner()
SEED_EXAMPLES = 500  # trusted holdout: the last 20 %, 100 rows
PASSED = (
    "passed: better on recent data, trusted holdout within tolerance; recent 0.900 vs "
    "0.800, log-loss 0.300 vs 0.400 (n=35); trusted 0.950 vs 0.960 (n=100, tol 0.02)"
)
REJECTED = "rejected: not better on recent data; recent 0.700 vs 0.800 (n=35)"


def _settings(home: Path) -> Settings:
    return Settings(home=home, seed_examples=SEED_EXAMPLES, auto_promote=False)


def _child(
    registry: Registry,
    parent: str,
    *,
    noise: float,
    seed: int,
    examples: str,
    gate: str,
    epsilon: str = "none",
    passed: bool = True,
) -> str:
    loaded = registry.load(parent)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # the output layer of the MLP (the default spec's is inside a Blend, whose linear
        # head has next to no weight on the demo problem: noise there changes nothing)
        net = loaded.module.mlp if isinstance(loaded.module, Blend) else loaded.module
        last = net[-1]
        last.weight.add_(noise * torch.randn(last.weight.shape, generator=gen))
    metrics = {
        "gate_passed": float(passed),
        "gate_recent_candidate": 0.9 if passed else 0.7,
        "gate_recent_champion": 0.8,
        "gate_trusted_candidate": 0.95,
        "gate_trusted_champion": 0.96,
        "gate_recent_n": 35.0,
    }
    return registry.publish(
        loaded.spec,
        loaded.module,
        tags={
            "parent_version": parent,
            "source": "online",
            "examples": examples,
            "epsilon": epsilon,
            "delta": "1e-05" if epsilon != "none" else "none",
            "gate": gate,
        },
        metrics=metrics,
    )


def _examples(settings: Settings) -> None:
    """ids 1..40: 20 train corrections, 15 counterexamples, 5 holdout corrections;
    ids 41..70: 30 holdout corrections of the drifted concept."""
    x, y = drift_concept(settings.seed).sample(70, 11)
    rows = []
    for i in range(70):
        if i < 20:
            origin, split = "correction", "train"
        elif i < 35:
            origin, split = "counterexample", "train"
        else:
            origin, split = "correction", "holdout"
        rows.append(
            Example(
                dedup_key=f"e{i}",
                origin=origin,
                split=split,
                features=[float(v) for v in x[i]],
                label=y[i],
                weight=1.0,
                error_type="boundary" if origin == "correction" else None,
            )
        )
    engine = make_engine(settings.resolved_database_url)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with session_factory(engine).begin() as session:
        session.add_all(rows)
        for outcome, predicted, actual, n in (
            ("correct", "class_0", "class_0", 30),
            ("confident", "class_1", "class_2", 5),
            ("boundary", "class_0", "class_1", 3),
        ):
            session.add(
                ErrorCount(
                    model_name=settings.model_name,
                    model_version="2",
                    hour=hour,
                    predicted=predicted,
                    actual=actual,
                    outcome=outcome,
                    count=n,
                )
            )
    engine.dispose()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """v1 seed → v2 (promoted, ids 1..40) → v3 (rejected), v4 pending, v5 pending (ε)."""
    home = tmp_path_factory.mktemp("review") / "home"
    settings = _settings(home)
    prepare_home(settings)
    upgrade(settings.resolved_database_url)
    _examples(settings)  # ids 1..70, before the trusted rows `init` writes for v1
    registry = Registry.of(settings)
    v1 = ensure_champion(settings.trusted, registry)
    v2 = _child(
        registry, v1, noise=0.5, seed=1, examples="ids 1..40 (40 new, update 1)", gate=PASSED
    )
    registry.promote(v2, reason="gate passed", actor="flywheel-learner")
    v3 = _child(
        registry,
        v2,
        noise=0.5,
        seed=2,
        examples="ids 41..50 (10 new, update 2)",
        gate=REJECTED,
        passed=False,
    )
    v4 = _child(
        registry, v3, noise=0.3, seed=3, examples="ids 51..60 (10 new, update 3)", gate=PASSED
    )
    v5 = _child(
        registry,
        v4,
        noise=0.3,
        seed=4,
        examples="ids 61..70 (10 new, update 4)",
        gate=PASSED,
        epsilon="0.8",
    )
    for v in (v4, v5):
        registry.set_tags(v, {"review": "pending"})
    assert (v1, v2, v3, v4, v5) == ("1", "2", "3", "4", "5")
    return home


@pytest.fixture()
def home(template: Path, tmp_path: Path, monkeypatch) -> Path:
    for key in list(os.environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)
    copy = tmp_path / "home"
    shutil.copytree(template, copy)
    monkeypatch.setenv("FLYWHEEL_HOME", str(copy))
    monkeypatch.setenv("FLYWHEEL_SEED_EXAMPLES", str(SEED_EXAMPLES))
    monkeypatch.setenv("FLYWHEEL_AUTO_PROMOTE", "false")
    monkeypatch.setenv("COLUMNS", "200")
    return copy


def models(*args: str) -> Result:
    return runner.invoke(app, ["models", *args])


def registry_at(home: Path) -> Registry:
    return Registry.of(_settings(home))


# --- diff -------------------------------------------------------------------------------------


def test_diff_json_compares_both_holdouts_data_gates_and_weights(home):
    result = models("diff", "1", "v2", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == {"model_name", "a", "b", "holdouts", "parameters", "store"}
    a, b = doc["a"], doc["b"]
    assert (a["version"], b["version"]) == ("1", "2")
    assert a["source"] == "init" and b["parent_version"] == "1"
    assert b["gate_passed"] is True and b["gate_numbers"]["gate_recent_candidate"] == 0.9
    assert b["data"]["range"] == [1, 40] and b["data"]["total"] == 40
    assert b["data"]["counterexamples"] == 15
    assert b["data"]["by_split"] == {"holdout": 5, "train": 35}
    assert a["data"]["range"] is None  # v1 names trusted rows, not an id range

    registry = registry_at(home)
    m1, m2 = registry.load("1").module, registry.load("2").module
    trusted = doc["holdouts"]["trusted"]
    assert trusted["n"] == SEED_EXAMPLES // 5 and "trusted holdout of flywheel" in trusted["about"]
    recent = doc["holdouts"]["recent"]
    assert recent["available"] and recent["n"] == 35  # every holdout correction

    # recompute the trusted numbers independently, on the store's trusted holdout
    from flywheel.store import trusted_data

    engine = make_engine(_settings(home).resolved_database_url)
    with session_factory(engine)() as session:
        data = trusted_data(session, _settings(home).model_name)
    engine.dispose()
    assert data is not None and data.info.schema.labels == list(LABELS)
    x, y = data.x_holdout, data.y_holdout
    with torch.no_grad():
        p1 = m1(torch.from_numpy(x)).argmax(1).numpy()
        p2 = m2(torch.from_numpy(x)).argmax(1).numpy()
    assert trusted["a"]["accuracy"] == pytest.approx(float((p1 == y).mean()))
    assert trusted["b"]["accuracy"] == pytest.approx(float((p2 == y).mean()))
    dis = trusted["disagreement"]
    assert dis["disagree"] == int((p1 != p2).sum())
    assert dis["share"] == pytest.approx(float((p1 != p2).mean()))
    assert dis["fixed"] == int(((p1 != y) & (p2 == y)).sum())
    assert dis["broken"] == int(((p1 == y) & (p2 != y)).sum())
    assert dis["disagree"] > 0, "the noise must change some predictions"
    for c in dis["changed_confusions"]:
        pi, ai = LABELS.index(c["predicted"]), LABELS.index(c["actual"])
        assert c["a"] == int(((p1 == pi) & (y == ai)).sum())
        assert c["b"] == int(((p2 == pi) & (y == ai)).sum())
        assert c["a"] != c["b"]

    params = doc["parameters"]
    expected = math.sqrt(
        sum(
            float(((t2 - t1).double() ** 2).sum())
            for t1, t2 in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True)
        )
    )
    assert params["comparable"] and params["l2"] == pytest.approx(expected, rel=1e-9)
    assert params["tensors"][0]["tensor"].endswith(".weight")  # only the last layer moved


def test_diff_of_different_architectures_says_why_weights_are_not_compared(home):
    registry = registry_at(home)
    spec = ModelSpec(input_dim=8, hidden=[16], labels=list(LABELS))
    v = registry.publish(
        spec,
        build_model(spec),
        tags={
            "parent_version": "",
            "source": "manual",
            "examples": "seed[0,400)",
            "epsilon": "none",
            "delta": "none",
            "gate": "initial",
        },
    )
    doc = json.loads(models("diff", "1", v, "--json").stdout)
    assert doc["parameters"]["comparable"] is False
    assert "hidden" in doc["parameters"]["reason"]
    assert doc["holdouts"]["trusted"]["disagreement"]["n"] == SEED_EXAMPLES // 5


def test_diff_table_names_the_facts_a_reviewer_needs(home):
    result = models("diff", "2", "5")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in (
        "flywheel: v2 → v5",
        "trusted holdout",
        "recent holdout",
        "accuracy",
        "log-loss",
        "disagree on",
        "parameters: L2 distance",
        "0.8 / 1e-05",
        "15 counterexamples",
        "pending",
        "fixed",
    ):
        assert text in out, text


def test_diff_without_a_training_store_compares_registry_facts_only(home):
    (home / "flywheel.db").unlink()
    result = models("diff", "1", "2", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    # both holdouts live in the store (the trusted set's and the recent corrections)
    for name in ("trusted", "recent"):
        assert doc["holdouts"][name]["available"] is False
        assert "no training store" in doc["holdouts"][name]["about"]
    assert doc["parameters"]["comparable"]
    assert "no training store" in doc["store"]
    assert doc["b"]["data"]["counterexamples"] is None
    assert not (home / "flywheel.db").exists(), "a review must not create a store"


def test_diff_and_card_without_a_trusted_set_say_to_run_init(home, tmp_path):
    from flywheel.store import delete_trusted

    engine = make_engine(_settings(home).resolved_database_url)
    with session_factory(engine).begin() as session:
        delete_trusted(session, "flywheel")
    engine.dispose()
    doc = json.loads(models("diff", "1", "2", "--json").stdout)
    trusted = doc["holdouts"]["trusted"]
    assert trusted["available"] is False and "flywheel init" in trusted["about"]
    assert doc["holdouts"]["recent"]["available"] and doc["holdouts"]["recent"]["n"] == 35
    assert "trusted holdout: not available (no trusted data set" in models("diff", "1", "2").stdout
    result = models("card", "2", "--out", str(tmp_path / "card"))
    assert result.exit_code == 0, result.output
    md = (tmp_path / "card" / "model-card-v2.md").read_text()
    assert "- trusted holdout: no trusted data set for model 'flywheel'" in md


def test_diff_of_an_unknown_version_is_an_error(home):
    result = models("diff", "1", "42")
    assert result.exit_code == 1 and "no version '42'" in result.stderr
    assert models("diff", "1", "x").exit_code == 2


# --- card -------------------------------------------------------------------------------------


def test_card_json_names_what_it_wrote(home, tmp_path):
    result = models("card", "2", "--out", str(tmp_path / "card"), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["markdown"] == str(tmp_path / "card" / "model-card-v2.md")
    assert doc["plots"] and all(Path(p).is_file() for p in [doc["markdown"], *doc["plots"]])


def test_card_writes_markdown_and_plots(home, tmp_path):
    out = tmp_path / "card"
    result = models("card", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    md = (out / "model-card-v2.md").read_text()
    assert md.startswith("# Model card: flywheel v2")
    for text in (
        "## Lineage",
        "v2 ← v1",
        "## Data",
        "40 examples, 15 of them counterexamples",
        "## Gate decisions",
        "| v2 | passed | 0.900 / 0.800 |",
        "## Privacy spent",
        "## Known error types",
        "38 corrected predictions of v2, 8 wrong",
        "| confident | 5 |",
        "| class_1 | class_2 | 5 |",
        "(lineage.png)",
        "(errors.png)",
        "privacy ledger",
    ):
        assert text in md, text
    for png in ("lineage.png", "errors.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_card_of_a_private_version_shows_privacy_along_the_lineage(home):
    result = models("card", "5")
    assert result.exit_code == 0, result.output
    md = (home / "cards" / "v5" / "model-card-v5.md").read_text()
    assert "v5 ← v4 ← v3 ← v2 ← v1" in md
    assert "ε = 0.8, δ = 1e-05" in md and "v5 ε=0.8" in md
    assert "| v3 | rejected |" in md
    assert "No corrections of predictions served by this version" in md
    assert "pending" in md


def test_a_long_lineage_is_cut_in_the_card(home):
    from flywheel.learner.seed_model import default_spec

    registry = registry_at(home)
    parent, spec = "5", default_spec()
    for i in range(32):
        parent = registry.publish(
            spec,
            build_model(spec),
            tags={
                "parent_version": parent,
                "source": "online",
                "examples": f"ids {i}..{i}",
                "epsilon": "0.1",
                "delta": "1e-05",
                "gate": PASSED,
            },
        )
    assert models("card", parent).exit_code == 0
    md = (home / "cards" / f"v{parent}" / f"model-card-v{parent}.md").read_text()
    table = md.split("## Lineage", 1)[1].split("## Data", 1)[0]
    assert len(re.findall(r"^\| v\d+ \|", table, re.M)) == 30
    assert "7 more (all: `flywheel models show 37 --json`)" in table
    assert "v37 ← v36" in table and "← … 26 more … ← v1  (the first model" in table
    assert "| v1 | former champion |" in table  # the root is always shown
    assert "… (3 more)" in md.split("## Privacy spent", 1)[1]


# --- pending, approve, reject -----------------------------------------------------------------


def test_pending_lists_passed_candidates_waiting_for_review(home):
    docs = json.loads(models("pending", "--json").stdout)
    assert [d["version"] for d in docs] == ["4", "5"]
    assert all(d["status"] == "pending review" for d in docs)
    out = models("pending").stdout
    assert "2 pending review" in out and "flywheel models approve" in out


def test_approve_promotes_and_records_who_why_and_when(home):
    result = models("approve", "5", "--reason", "canary looked good")
    assert result.exit_code == 0, result.output
    assert "approved flywheel v5: now champion (was v2)" in result.stdout
    assert "no model event sent" in result.stdout
    registry = registry_at(home)
    assert registry.champion_version() == "5"
    tags = registry.info("5", with_run=False).tags
    assert tags["review"] == "approved" and tags["review_by"] == default_actor()
    assert tags["review_reason"] == "canary looked good"
    assert datetime.fromisoformat(tags["review_at"]).tzinfo is not None
    assert tags["promoted_by"] == default_actor()  # through flywheel.promotion.promote
    assert tags["promotion_reason"] == "review approved: canary looked good"
    assert registry.champion_history()[-1] == "5"
    assert [d["version"] for d in json.loads(models("pending", "--json").stdout)] == ["4"]


def test_reject_keeps_the_champion_and_records_the_decision(home):
    result = models("reject", "v4", "--reason", "too few recent rows", "--by", "alice")
    assert result.exit_code == 0, result.output
    assert "rejected flywheel v4; champion stays v2; by alice" in result.stdout
    registry = registry_at(home)
    assert registry.champion_version() == "2"
    tags = registry.info("4", with_run=False).tags
    assert (tags["review"], tags["review_by"], tags["review_reason"]) == (
        "rejected",
        "alice",
        "too few recent rows",
    )
    assert json.loads(models("show", "4", "--json").stdout)["status"] == "review rejected"
    # decided once: approving it now is refused
    result = models("approve", "4", "--reason", "changed my mind")
    assert result.exit_code == 1 and "not pending review" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["approve", "5"],  # --reason is required
        ["approve", "5", "--reason", "  "],
        ["reject", "5", "--reason", ""],
        ["approve", "abc", "--reason", "x"],
        ["approve", "5", "--reason", "x", "--by", " "],
    ],
)
def test_review_usage_errors(home, args):
    assert models(*args).exit_code == 2
    assert registry_at(home).champion_version() == "2"


@pytest.mark.parametrize(
    "version,message",
    [("3", "not pending review"), ("2", "already the champion"), ("42", "no version '42'")],
)
def test_only_pending_candidates_can_be_decided(home, version, message):
    for verb in ("approve", "reject"):
        result = models(verb, version, "--reason", "x")
        assert result.exit_code == 1, result.output
        assert message in result.stderr
    assert registry_at(home).champion_version() == "2"


def test_review_logic_checks_reasons():
    from flywheel.review import ReviewError, check_reason, example_range

    with pytest.raises(ReviewError):
        check_reason(" ")
    with pytest.raises(ReviewError):
        check_reason("x" * 1001)
    with pytest.raises(ReviewError, match="control character"):
        check_reason("ok\x00")  # PostgreSQL text cannot hold it
    assert check_reason(" two lines\n\tindented ") == "two lines\n\tindented"
    assert example_range("ids 3..9 (7 new, update 1)") == (3, 9)
    assert example_range("[100,200)") == (100, 199)
    assert example_range("seed[0,2400)") is None and example_range(None) is None


# --- flywheel ui ------------------------------------------------------------------------------


def test_ui_starts_the_mlflow_ui_on_the_same_store_and_names_the_review_page(home, monkeypatch):
    import flywheel.cli.ui as ui_cli

    ran: list[list[str]] = []
    monkeypatch.setattr(ui_cli, "run_process", lambda command: ran.append(command) or 0)
    monkeypatch.setenv("FLYWHEEL_PORT", "8123")
    result = runner.invoke(app, ["ui", "--port", "5055"])
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:8123/ui/" in result.stdout
    assert "http://127.0.0.1:5055/" in result.stdout
    (command,) = ran
    assert command[1:4] == ["-m", "mlflow", "ui"]
    uri = command[command.index("--backend-store-uri") + 1]
    assert uri == f"sqlite:///{home.resolve() / 'mlflow.db'}"
    assert command[command.index("--port") + 1] == "5055"


def test_ui_with_a_tracking_server_starts_nothing(home, monkeypatch):
    import flywheel.cli.ui as ui_cli

    monkeypatch.setattr(ui_cli, "run_process", lambda command: pytest.fail("must not start"))
    monkeypatch.setenv("FLYWHEEL_MLFLOW_TRACKING_URI", "http://user:pw@mlflow:5000")
    result = runner.invoke(app, ["ui"])
    assert result.exit_code == 0, result.output
    assert "http://user:***@mlflow:5000" in result.stdout and "pw" not in result.stdout


def test_card_names_the_sites_a_federated_run_quarantined(home):
    registry = registry_at(home)
    registry.client.set_model_version_tag(registry.name, "2", "fed_quarantined", "site:3,site:7")
    result = models("card", "2")
    assert result.exit_code == 0, result.output
    md = (home / "cards" / "v2" / "model-card-v2.md").read_text()
    assert "| quarantined sites | site:3,site:7 (FLTrust gave their updates no weight" in md
    assert models("card", "1").exit_code == 0
    assert "quarantined sites" not in (home / "cards" / "v1" / "model-card-v1.md").read_text()
