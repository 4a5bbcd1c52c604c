"""`flywheel init` end to end on real stores: SQLite and PostgreSQL, a SQLite MLflow
registry, CSV and Parquet files with categorical features, bad files, lineages.

The command runs in-process (typer's CliRunner) with the environment a user would set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch
from sqlalchemy import func, select
from typer.testing import CliRunner, Result

from flywheel.cli import app, register_commands
from flywheel.features import FeatureSchema
from flywheel.learner import SPLIT_RULE, ensure_champion
from flywheel.registry import Registry
from flywheel.settings import Settings
from flywheel.store import (
    Example,
    ExampleReader,
    LearnerState,
    ReferenceStatsRow,
    TrustedSet,
    current,
    make_engine,
    session_factory,
    trusted_data,
    trusted_info,
    upgrade,
)

pytestmark = pytest.mark.integration
register_commands()
N = 1500
LABELS = ["fraud", "ok", "review"]


def make_table(n: int = N, seed: int = 0) -> pa.Table:
    """A learnable problem: 2 numbers, 2 categories, a boolean, an identifier to ignore."""
    rng = np.random.default_rng(seed)
    amount = rng.normal(50, 20, n).round(2)
    country = rng.choice(["FR", "DE", "US", "JP"], n)
    device = rng.choice(["ios", "android", "web"], n)
    mobile = rng.choice([True, False], n)
    age = rng.integers(18, 80, n).astype(float)
    score = amount / 25 + 2.0 * (country == "FR") + 1.0 * (device == "ios") + rng.normal(0, 0.2, n)
    y = np.where(score > 3.5, "fraud", np.where(score > 2.2, "review", "ok"))
    amount_col = pa.array(amount, mask=np.arange(n) % 50 == 7)  # some missing values
    return pa.table(
        {
            "id": [f"tx{i}" for i in range(n)],
            "amount": amount_col,
            "country": country,
            "device": device,
            "mobile": mobile,
            "age": age,
            "label": y,
        }
    )


def write(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=400)
    else:
        pcsv.write_csv(table, path)
    return path


def run_init(env: dict[str, str], *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, ["init", *args], env=env, input=input)


def env_of(home: Path, url: str, **extra: str) -> dict[str, str]:
    return {"FLYWHEEL_HOME": str(home), "FLYWHEEL_DATABASE_URL": url, **extra}


def settings_of(env: dict[str, str]) -> Settings:
    return Settings(home=Path(env["FLYWHEEL_HOME"]), database_url=env["FLYWHEEL_DATABASE_URL"])


def store_counts(url: str) -> dict[str, int]:
    """What init could have written; zeros for a store that does not exist yet."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return {"trusted_sets": 0, "examples": 0, "reference_stats": 0}
    if current(url) is None:
        return {"trusted_sets": 0, "examples": 0, "reference_stats": 0}
    engine = make_engine(url)
    try:
        with session_factory(engine)() as s:
            return {
                "trusted_sets": s.scalar(select(func.count()).select_from(TrustedSet)) or 0,
                "examples": s.scalar(select(func.count()).select_from(Example)) or 0,
                "reference_stats": s.scalar(select(func.count()).select_from(ReferenceStatsRow))
                or 0,
            }
    finally:
        engine.dispose()


def registered(env: dict[str, str]) -> list[Any]:
    home = Path(env["FLYWHEEL_HOME"])
    if not (home / "mlflow.db").exists():
        return []
    return Registry.of(settings_of(env)).versions()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


# ---- the happy path -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_init_imports_splits_trains_and_registers_the_first_version(tmp_path, db_url, fmt):
    data = write(make_table(), tmp_path / f"transactions.{fmt}")
    env = env_of(tmp_path / "home", db_url)
    result = run_init(env, "--data", str(data), "--label", "label", "--public", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["version"] == "1" and out["replaced"] is None
    assert out["rows_train"] + out["rows_holdout"] == N
    assert abs(out["rows_holdout"] / N - 0.2) < 0.01
    assert out["holdout_accuracy"] > 0.8, out
    assert out["data_fingerprint"] == hashlib.sha256(data.read_bytes()).hexdigest()

    settings = settings_of(env)
    registry = Registry.of(settings)
    assert registry.champion_version() == "1"
    loaded = registry.load("1")
    tags = loaded.tags
    assert tags["source"] == "init" and tags["parent_version"] == ""
    assert tags["epsilon"] == "none" and tags["gate"].startswith("initial")
    assert tags["data_fingerprint"] == out["data_fingerprint"]
    assert tags["trusted_public"] == "yes" and tags["model_family"] == "embed_mlp"
    assert tags["examples"] == f"trusted[0,{out['rows_train']})"
    assert tags["lineage_start"] == "first" and tags["split_rule"] == SPLIT_RULE

    # the artifact's spec.json holds the schema; the module predicts from encode_rows
    schema = loaded.spec.schema
    assert isinstance(schema, FeatureSchema)
    assert tags["schema_fingerprint"] == schema.fingerprint()
    kinds = {f.name: f.kind for f in schema.features}
    assert kinds == {
        "id": "ignore",
        "amount": "numeric",
        "country": "categorical",
        "device": "categorical",
        "mobile": "boolean",
        "age": "numeric",
    }
    assert schema.labels == LABELS
    rows = [
        {"amount": 120.0, "country": "FR", "device": "ios", "mobile": True, "age": 30.0},
        {"amount": 10.0, "country": "JP", "device": "web", "mobile": False, "age": 60.0},
        {"country": "Atlantis"},  # unseen category, missing numbers: filled
    ]
    encoded = schema.encode_rows(rows)
    assert encoded.unknown == {"country": 1}
    with torch.inference_mode():
        predicted = loaded.module(torch.from_numpy(encoded.x)).argmax(1).tolist()
    assert [schema.labels[i] for i in predicted[:2]] == ["fraud", "ok"]
    run = registry.client.get_model_version(registry.name, "1").run_id
    local = registry.client.download_artifacts(run, "schema.json", str(tmp_path))
    assert FeatureSchema.model_validate(json.loads(Path(local).read_text())) == schema

    # the store: the trusted set, its rows split by the rule, the reference statistics
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as s:
            info = trusted_info(s, settings.model_name)
            assert info is not None and info.public and info.split_rule == SPLIT_RULE
            assert info.fingerprint == out["data_fingerprint"] and info.schema == schema
            assert (info.rows_train, info.rows_holdout) == (out["rows_train"], out["rows_holdout"])
            assert sum(info.label_counts.values()) == N
            data_back = trusted_data(s, settings.model_name)
            assert data_back is not None and data_back.x_train.shape == (
                out["rows_train"],
                schema.input_dim,
            )
            assert set(data_back.y_holdout.tolist()) == {0, 1, 2}  # every label held out
            ref = s.get(ReferenceStatsRow, settings.model_name)
            assert ref is not None and ref.example_count == out["rows_train"]
            assert len(ref.stats["mean"]) == schema.input_dim
            from flywheel.feedback import ReferenceStats

            reference = ReferenceStats.from_dict(ref.stats)  # as the analyzer reads it
            assert list(reference.categorical) == [1, 2] and list(reference.boolean) == [3]
    finally:
        engine.dispose()


def test_the_synthetic_demo_bootstraps_through_init_and_is_the_same_for_a_seed(tmp_path):
    versions = []
    for name in ("a", "b"):
        s = Settings(home=tmp_path / name, seed_examples=1000)
        registry = Registry.of(s)
        v = ensure_champion(s.trusted, registry)  # fresh store: created
        assert ensure_champion(s.trusted, registry) == v  # and only once
        versions.append(registry.load(v))
        assert (tmp_path / name / "demo" / "synthetic-seed7-1000.csv").is_file()
        engine = make_engine(s.resolved_database_url)
        with session_factory(engine)() as session:
            info = trusted_info(session, s.model_name)
            assert info is not None and info.public
            assert info.rows_train + info.rows_holdout == 1000
            assert session.get(ReferenceStatsRow, s.model_name) is not None
        engine.dispose()
    a, b = versions
    assert a.tags["data_fingerprint"] == b.tags["data_fingerprint"]
    assert a.spec.schema is not None and a.spec.schema.names == [f"x{i}" for i in range(8)]
    for (k, wa), (_, wb) in zip(
        a.module.state_dict().items(), b.module.state_dict().items(), strict=True
    ):
        assert torch.equal(wa, wb), k


def test_two_processes_bootstrapping_one_home_at_once_import_the_demo_once(tmp_path):
    import concurrent.futures

    s = Settings(home=tmp_path / "home", seed_examples=500)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # own registries, own lock handles
        found = list(pool.map(lambda _: ensure_champion(s.trusted, Registry.of(s)), range(2)))
    assert found == ["1", "1"]
    assert [v.version for v in Registry.of(s).versions()] == ["1"]


def test_a_registered_version_whose_alias_never_moved_is_adopted(tmp_path):
    s = Settings(home=tmp_path / "home", seed_examples=1000)
    registry = Registry.of(s)
    v = ensure_champion(s.trusted, registry)
    registry.client.delete_registered_model_alias(registry.name, "champion")
    assert registry.champion_version() is None
    assert ensure_champion(s.trusted, registry) == v  # adopted, not a second import
    assert [i.version for i in registry.versions()] == [v]


# ---- bad files: an error naming the row and column, nothing written --------------------------
def _lines(*rows: str) -> str:
    return "\n".join(rows) + "\n"


GOOD = [f"{i},{'FR' if i % 2 else 'DE'},{'a' if i % 3 else 'b'}" for i in range(60)]
BAD_FILES = {
    "missing label column": (
        "d.csv",
        _lines("x,country,target", *GOOD),
        [],
        "column 'label': no label column; the columns are ['x', 'country', 'target']",
    ),
    "single class": (
        "d.csv",
        _lines("x,country,label", *[f"{i},FR,a" for i in range(20)]),
        [],
        "column 'label': only one class ('a')",
    ),
    "unparseable value": (
        "d.csv",
        _lines("x,country,label", *GOOD[:30], "3.5.1,FR,a", *GOOD[30:]),
        [],
        "row 31, column 'x': '3.5.1' is not a number",
    ),
    "type changes mid-file": (
        "d.csv",
        _lines("x,country,label", *GOOD, *GOOD, *[f"v{i},DE,a" for i in range(60)]),
        ["--chunk-rows", "100"],  # rows 1-100 decide: numbers; row 121 is text
        "row 121, column 'x': the column held numbers up to here (from row 1), then 'v0'",
    ),
    "empty file": ("d.csv", "", [], "is empty (0 bytes)"),
    "header only": ("d.csv", "x,country,label\n", [], "has a header but no data rows"),
    "a label with one example": (
        "d.csv",
        _lines("x,country,label", *GOOD, "5,FR,c"),
        [],
        "column 'label': label(s) ['c'] have a single example",
    ),
    "missing label": (
        "d.csv",
        _lines("x,country,label", *GOOD[:10], "5,FR,", *GOOD[10:]),
        [],
        "row 11, column 'label': the label is missing",
    ),
    "wrong number of fields": (
        "d.csv",
        _lines("x,country,label", *GOOD[:20], "5,FR,a,extra", *GOOD[20:]),
        [],
        "row 21: has 4 fields, the header has 3",
    ),
    "unknown extension": ("d.xlsx", "x", [], "unknown file type '.xlsx'"),
    "missing file": ("nothere.csv", None, [], "nothere.csv: no such file"),
    "not finite in parquet": (
        "d.parquet",
        pa.table({"x": [1.0, 2.0, float("inf"), 3.0] * 5, "label": ["a", "b"] * 10}),
        [],
        "row 3, column 'x': is not a finite number",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_an_error_naming_row_and_column_and_writes_nothing(tmp_path, case):
    name, content, extra, expected = BAD_FILES[case]
    path = tmp_path / name
    if isinstance(content, pa.Table):
        write(content, path)
    elif content is not None:
        path.write_text(content)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    env = env_of(tmp_path / "home", url)
    result = run_init(env, "--data", str(path), "--label", "label", "--public", *extra)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    # one error line (MLflow may log that it created its tables), no traceback
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0], lines[0]
    assert store_counts(url) == {"trusted_sets": 0, "examples": 0, "reference_stats": 0}
    assert registered(env) == []


def test_a_bad_value_late_in_pass_two_rolls_back_the_rows_already_written(tmp_path, db_url):
    table = make_table(3000)
    path = write(table, tmp_path / "d.csv")
    env = env_of(tmp_path / "home", db_url)
    out = tmp_path / "schema.json"
    assert (
        run_init(env, "--data", str(path), "--label", "label", "--write-schema", str(out)).exit_code
        == 0
    )
    # the same columns, with a bad amount near the end: the reviewed schema says numeric
    text = path.read_text().splitlines()
    head, *rows = text
    rows[2900] = rows[2900].replace(rows[2900].split(",")[1], '"12 EUR"', 1)
    path.write_text("\n".join([head, *rows]) + "\n")
    result = run_init(
        env, "--data", str(path), "--label", "label", "--schema", str(out), "--public",
        "--chunk-rows", "500",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "row 2901, column 'amount': '12 EUR' is not a number (the schema says" in result.stderr
    assert store_counts(db_url)["examples"] == 0  # five chunks were written, then rolled back
    assert registered(env) == []


def test_a_failure_after_the_version_was_registered_deletes_it(tmp_path, monkeypatch):
    from flywheel.learner.init import pipeline

    def fail(self, session, version):
        raise OSError("injected: the store went away before the commit")

    monkeypatch.setattr(pipeline._Run, "_reset_online_learner", fail)
    path = write(make_table(600), tmp_path / "d.csv")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    env = env_of(tmp_path / "home", url)
    result = run_init(env, "--data", str(path), "--label", "label", "--public")
    assert result.exit_code == 1  # an outside failure, not bad input
    assert isinstance(result.exception, SystemExit) or "injected" in str(result.exception)
    assert store_counts(url) == {"trusted_sets": 0, "examples": 0, "reference_stats": 0}
    assert registered(env) == []  # published, then deleted


# ---- lineages, schemas, models, privacy -----------------------------------------------------
def test_an_existing_champion_is_kept_unless_a_new_lineage_is_asked(tmp_path, db_url):
    env = env_of(tmp_path / "home", db_url)
    first = write(make_table(800, seed=1), tmp_path / "first.csv")
    assert run_init(env, "--data", str(first), "--label", "label", "--public").exit_code == 0
    # the online learner has state for the first lineage, and examples of its schema
    reader = ExampleReader(make_engine(db_url))
    reader.save_state("flywheel:online", {"update": 3, "cursor": {"watermark": 2}}, 2)
    with reader.sessions.begin() as s:
        s.add(Example(dedup_key="c1", origin="correction", features=[1.0] * 6, label="ok",
                      split="train"))  # fmt: skip
    second = write(
        make_table(900, seed=2).drop_columns(["device"]),
        tmp_path / "second.parquet",
    )
    refused = run_init(env, "--data", str(second), "--label", "label", "--public")
    assert refused.exit_code == 2
    assert "already has a champion (v1); pass --new-lineage" in refused.stderr
    assert [v.version for v in registered(env)] == ["1"]

    result = run_init(
        env, "--data", str(second), "--label", "label", "--public", "--new-lineage", "--json"
    )
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["version"] == "2" and out["replaced"] == "1"
    registry = Registry.of(settings_of(env))
    assert registry.champion_version() == "2"
    tags = registry.load("2").tags
    assert tags["lineage_start"] == "replaces v1" and tags["parent_version"] == ""
    with reader.sessions() as s:
        info = trusted_info(s, "flywheel")
        assert info is not None and "device" not in info.schema.names
        assert info.rows_train + info.rows_holdout == 900  # the first set's rows are gone
        seeds = s.scalar(select(func.count()).select_from(Example).where(Example.origin == "seed"))
        assert seeds == 900
        last = s.scalar(select(func.max(Example.id)))
        state = s.get(LearnerState, "flywheel:online")
        assert state is not None and state.state["update"] == 3  # old versions stay old
        assert state.state["cursor"]["watermark"] == last == state.cursor
        assert state.state["champion_seen"] == "2" and state.state["replay_from_id"] == last + 1
    reader.engine.dispose()


def test_a_reviewed_schema_round_trips_and_an_ignored_feature_is_left_out(tmp_path):
    path = write(make_table(), tmp_path / "d.parquet")
    env = env_of(tmp_path / "home", f"sqlite:///{tmp_path / 'store.db'}")
    out = tmp_path / "schema.json"
    written = run_init(env, "--data", str(path), "--label", "label", "--write-schema", str(out))
    assert written.exit_code == 0, written.stderr
    doc = json.loads(out.read_text())
    for feature in doc["features"]:
        if feature["name"] == "device":
            feature["kind"] = "ignore"  # what a reviewer does (an ignored column has no
            feature["vocabulary"] = []  # vocabulary: the schema refuses one, and says so)
    out.write_text(json.dumps(doc, indent=2))
    result = run_init(
        env, "--data", str(path), "--label", "label", "--schema", str(out), "--public", "--json"
    )
    assert result.exit_code == 0, result.stderr
    loaded = Registry.of(settings_of(env)).load("1")
    schema = loaded.spec.schema
    assert schema is not None and schema == FeatureSchema.model_validate(doc)
    assert schema.names == ["amount", "country", "mobile", "age"]
    x = schema.encode_rows([{"amount": 1.0, "device": "ios"}]).x  # ignored: accepted, dropped
    assert x.shape == (1, 4)
    # a schema naming a column the file lacks is refused before anything is written
    doc["features"].append({"name": "merchant", "kind": "categorical", "vocabulary": ["m"]})
    out.write_text(json.dumps(doc))
    again = run_init(env, "--data", str(path), "--label", "label", "--schema", str(out),
                     "--public", "--new-lineage")  # fmt: skip
    assert again.exit_code == 2 and "column 'merchant': the schema's feature" in again.stderr


def test_model_choice_logistic_a_trusted_factory_and_a_refused_cascade(tmp_path, monkeypatch):
    (tmp_path / "site_models.py").write_text(
        "from torch import nn\n"
        "def build(in_features, n_classes, width=8):\n"
        "    return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(),"
        " nn.Linear(width, n_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(make_table(600), tmp_path / "d.csv")
    base = ["--data", str(path), "--label", "label", "--public"]
    cascade = run_init(env_of(tmp_path / "h0", f"sqlite:///{tmp_path / 's0.db'}"), *base,
                       "--model", "cascade")  # fmt: skip
    assert cascade.exit_code == 2 and "init does not train a cascade" in cascade.stderr
    untrusted = run_init(env_of(tmp_path / "h1", f"sqlite:///{tmp_path / 's1.db'}"), *base,
                         "--model", "factory=site_models:build,width=4")  # fmt: skip
    assert untrusted.exit_code == 2 and "is not trusted" in untrusted.stderr
    env = env_of(tmp_path / "h2", f"sqlite:///{tmp_path / 's2.db'}",
                 FLYWHEEL_MODEL_FACTORIES="site_models")  # fmt: skip
    result = run_init(env, *base, "--model", "factory=site_models:build,width=4", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model_family"] == "factory"
    loaded = Registry.of(settings_of(env).model_copy(update={"model_factories": "site_models"}))
    assert loaded.load("1").spec.kind == "factory"
    env3 = env_of(tmp_path / "h3", f"sqlite:///{tmp_path / 's3.db'}")
    logistic = run_init(env3, *base, "--model", "logistic", "--json")
    assert logistic.exit_code == 0 and json.loads(logistic.stdout)["model_family"] == "logistic"


def test_private_data_is_refused_while_dp_is_on_and_recorded_when_it_is_off(tmp_path, monkeypatch):
    path = write(make_table(600), tmp_path / "d.csv")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    env = env_of(tmp_path / "home", url)
    refused = run_init(env, "--data", str(path), "--label", "label", "--private")
    assert refused.exit_code == 2 and "FLYWHEEL_PRIVACY_ENABLED" in refused.stderr
    assert store_counts(url)["trusted_sets"] == 0
    # asked at a terminal: the answer "no" is private
    monkeypatch.setattr("flywheel.cli.init.interactive", lambda: True)
    off = {**env, "FLYWHEEL_PRIVACY_ENABLED": "false"}
    result = run_init(off, "--data", str(path), "--label", "label", input="n\n")
    assert result.exit_code == 0, result.stderr
    assert "without privacy accounting" in result.stderr  # the question
    assert Registry.of(settings_of(env)).load("1").tags["trusted_public"] == "no"
    engine = make_engine(url)
    with session_factory(engine)() as s:
        info = trusted_info(s, "flywheel")
        assert info is not None and info.public is False
    engine.dispose()


def test_an_older_store_is_refused_and_a_fresh_one_created(tmp_path):
    path = write(make_table(300), tmp_path / "d.csv")
    old = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(old, "0007")
    env = env_of(tmp_path / "home", old)
    result = run_init(env, "--data", str(path), "--label", "label", "--public")
    assert result.exit_code == 1 and "run `flywheel db upgrade`" in result.stderr
    assert current(old) == "0007"


def test_trusted_rows_round_trip_exactly_and_a_replayed_chunk_stores_nothing(db_url):
    from flywheel.store import Split, TrustedInfo, write_trusted_info, write_trusted_rows

    upgrade(db_url)
    schema = FeatureSchema.model_validate(
        {
            "label": "y",
            "labels": ["a", "b"],
            "features": [{"name": f"f{i}", "kind": "numeric"} for i in range(3)],
        }
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    x[0] = [0.1, -1e-30, 3e38]
    labels = ["a", "b"] * 150
    engine = make_engine(db_url)
    try:
        with session_factory(engine).begin() as s:
            assert write_trusted_rows(s, "m", Split.TRAIN, 0, x[:200], labels[:200]) == 200
            assert write_trusted_rows(s, "m", Split.TRAIN, 100, x[100:200], labels[100:200]) == 0
            assert write_trusted_rows(s, "m", Split.HOLDOUT, 0, x[200:], labels[200:]) == 100
            info = TrustedInfo("m", "f" * 64, schema, True, 200, 100, SPLIT_RULE, {}, "t")
            write_trusted_info(s, info)
        with session_factory(engine)() as s:
            back = trusted_data(s, "m")
            assert back is not None
            assert np.array_equal(back.x_train, x[:200]) and np.array_equal(back.x_holdout, x[200:])
            assert back.y_train.tolist() == [0, 1] * 100
            stored = s.scalar(select(Example.features).where(Example.dedup_key == "seed:m:train:0"))
            assert stored == x[0].astype(np.float64).tolist()  # what a float64 reader sees
        with pytest.raises(ValueError, match="finite"), session_factory(engine).begin() as s:
            write_trusted_rows(s, "m", Split.TRAIN, 500, np.array([[np.nan, 0, 0]]), ["a"])
    finally:
        engine.dispose()
