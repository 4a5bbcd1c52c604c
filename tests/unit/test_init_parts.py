"""`flywheel init`'s parts without a store or registry: the file reader, CSV typing, the
split, the samples, training, label text, the schema file, the errors and the CLI's own
refusals (the whole command runs in tests/integration/test_init.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from flywheel.cli import app, register_commands
from flywheel.features import FeatureSchema, label_text
from flywheel.learner.init import source as source_module
from flywheel.learner.init.columns import CsvTypes, numeric_columns
from flywheel.learner.init.errors import InitError
from flywheel.learner.init.pipeline import infer_file_schema, label_texts, load_schema_file
from flywheel.learner.init.sample import Reservoir
from flywheel.learner.init.source import Chunk, DataFile
from flywheel.learner.init.split import EVERY, Splitter
from flywheel.learner.init.train import epochs_for, refusal, train
from flywheel.modelspec import FactoryError, parse_model_arg

register_commands()
runner = CliRunner()


def _csv(tmp_path: Path, text: str, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- the file -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.csv", None, "missing.csv: no such file"),
        ("data.xlsx", "a,b\n", "unknown file type '.xlsx'"),
        ("data", "a,b\n", "unknown file type '(no suffix)'"),
        ("empty.csv", "", "empty.csv: is empty (0 bytes)"),
        ("blank.csv", "\n\n", "has no header row"),
        ("dup.csv", "a,b,a\n1,2,3\n", "the column name 'a' appears twice"),
        ("noname.csv", "a,,c\n1,2,3\n", "header field 2 has no column name"),
        ("bad.parquet", "not parquet", "not a readable Parquet file"),
    ],
)
def test_a_file_that_cannot_be_opened_says_why(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(InitError) as err:
        DataFile.open(path)
    assert expected in str(err.value)


def test_csv_chunks_are_trimmed_text_with_missing_values_and_rows_counted_across_blocks(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(source_module, "BLOCK_SIZE", 1024)  # many blocks
    lines = ["n,c,y"] + [f"{i}, c{i % 3} ,{'NA' if i % 7 == 0 else 'a'}" for i in range(2000)]
    data = DataFile.open(_csv(tmp_path, "\n".join(lines) + "\n"))
    chunks = list(data.chunks(["n", "c", "y"], rows=300))
    assert all(c.batch.num_rows <= 300 for c in chunks) and len(chunks) > 7
    assert [c.first_row for c in chunks] == list(
        np.cumsum([0] + [c.batch.num_rows for c in chunks[:-1]])
    )
    whole = pa.Table.from_batches([c.batch for c in chunks])
    assert whole.column("n").to_pylist() == [str(i) for i in range(2000)]
    assert whole.column("c").to_pylist()[:3] == ["c0", "c1", "c2"]  # blanks trimmed
    assert whole.column("y").null_count == len(range(0, 2000, 7))  # NA reads as missing


def test_gzip_and_tab_separated_files_read_like_csv(tmp_path):
    path = tmp_path / "d.tsv.gz"
    with gzip.open(path, "wt") as f:
        f.write("a\ty\n1\tx\n2\tz\n")
    data = DataFile.open(path)
    assert data.columns == ["a", "y"]
    assert [c.batch.to_pydict() for c in data.chunks(["a", "y"], rows=10)] == [
        {"a": ["1", "2"], "y": ["x", "z"]}
    ]


def test_a_row_with_the_wrong_number_of_fields_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(source_module, "BLOCK_SIZE", 1024)
    lines = ["a,b,y"] + [f"{i},{i},x" for i in range(500)] + ["1,2,3,4"] + ["5,6,z"] * 10
    data = DataFile.open(_csv(tmp_path, "\n".join(lines) + "\n"))
    with pytest.raises(InitError) as err:
        list(data.chunks(["a", "b", "y"], rows=100))
    assert "row 501" in str(err.value) and "has 4 fields, the header has 3" in str(err.value)


def test_bytes_that_are_not_utf8_are_named_by_row_and_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"a,b,y\n1,ok,x\n2,\xff\xfe,y\n")
    with pytest.raises(InitError) as err:
        list(DataFile.open(path).chunks(["a", "b", "y"], rows=100))
    assert "row 2, column 'b': is not UTF-8 text" in str(err.value)


def test_the_fingerprint_is_the_sha256_of_the_bytes_and_a_changed_file_is_noticed(tmp_path):
    import hashlib

    path = _csv(tmp_path, "a,y\n1,x\n")
    data = DataFile.open(path)
    assert data.fingerprint() == hashlib.sha256(path.read_bytes()).hexdigest()
    data.check_unchanged()
    path.write_text("a,y\n1,x\n2,y\n")
    with pytest.raises(InitError, match="changed while it was being read"):
        data.check_unchanged()


# ---- typing CSV columns ---------------------------------------------------------------------
def _chunk(first: int, **cols: list) -> Chunk:
    return Chunk(first, pa.record_batch({k: pa.array(v, pa.string()) for k, v in cols.items()}))


def test_csv_columns_are_numbers_when_every_value_is_one_and_text_otherwise():
    types = CsvTypes("d.csv", label="y")
    out = types.typed(
        _chunk(0, n=["1", None, "-2.5e1"], t=["a", "1", None], e=[None] * 3, y=list("abc"))
    )
    assert out.schema.field("n").type == pa.float64() and out.column("n").to_pylist() == [
        1.0,
        None,
        -25.0,
    ]
    assert out.schema.field("t").type == pa.string()
    assert out.schema.field("y").type == pa.string()  # the label stays text
    # a column first seen in a later chunk is decided there
    later = types.typed(_chunk(3, n=["4"], t=["7"], e=["2"], y=["a"]))
    assert later.schema.field("e").type == pa.float64()
    assert later.schema.field("t").type == pa.string()  # text stays text


def test_a_column_of_numbers_that_turns_to_text_mid_file_is_an_error_naming_its_row():
    types = CsvTypes("d.csv", label="y")
    types.typed(_chunk(0, amount=["1", "2"], y=["a", "b"]))
    with pytest.raises(InitError) as err:
        types.typed(_chunk(2, amount=["3", "4", "n/a?", "5"], y=list("abab")))
    assert str(err.value).startswith(
        "d.csv: row 5, column 'amount': the column held numbers up to here (from row 1), "
        "then 'n/a?', which is not a number"
    )


def test_one_unparseable_value_among_numbers_is_an_error_not_a_category():
    values = [str(i) for i in range(30)]
    values[17] = "12,5"
    with pytest.raises(InitError) as err:
        CsvTypes("d.csv", label="y").typed(_chunk(0, amount=values, y=["a"] * 30))
    assert "row 18, column 'amount': '12,5' is not a number, but 97% of" in str(err.value)
    # mostly text: a categorical column, no error
    mixed = ["x", "y", "z", "1"] * 5
    out = CsvTypes("d.csv", label="y").typed(_chunk(0, code=mixed, y=["a"] * 20))
    assert out.schema.field("code").type == pa.string()


def test_pass_two_converts_the_schemas_numeric_columns_and_names_a_bad_value():
    ok = numeric_columns(_chunk(10, n=["1.5", None], c=["1", "x"]), ["n"], "d.csv")
    assert ok.column("n").to_pylist() == [1.5, None] and ok.column("c").to_pylist() == ["1", "x"]
    with pytest.raises(InitError) as err:
        numeric_columns(_chunk(10, n=["1.5", "abc"]), ["n"], "d.csv")
    assert "d.csv: row 12, column 'n': 'abc' is not a number" in str(err.value)


# ---- split and samples ----------------------------------------------------------------------
def test_the_split_is_stratified_every_label_is_in_train_and_two_rows_go_one_each_way():
    rng = np.random.default_rng(3)
    y = rng.choice(4, size=10_000, p=[0.7, 0.2, 0.0998, 0.0002])
    y[[100, 5000]] = 3  # a rare label with a few rows
    splitter = Splitter()
    mask = np.concatenate([splitter.holdout(part) for part in np.array_split(y, 37)])
    for label in range(4):
        rows = mask[y == label]
        assert not rows[0], "the first row of every label is train"
        assert abs(rows.mean() - 1 / EVERY) <= 0.5 / len(rows) + 1e-9 or len(rows) < EVERY
    two = Splitter().holdout(np.array([5, 5]))
    assert two.tolist() == [False, True]
    # chunking does not change the split
    assert (Splitter().holdout(y) == mask).all()


def test_the_reservoir_is_bounded_uniform_and_the_same_for_a_seed():
    n, cap = 20_000, 2_000
    x = np.arange(n, dtype=np.float32).reshape(-1, 1)
    picks = np.zeros(n)
    for seed in range(20):
        r = Reservoir(cap, seed=seed)
        for part in np.array_split(np.arange(n), 13):
            r.add(x[part], part)
        sx, sy = r.arrays()
        assert len(sy) == cap and len(set(sy.tolist())) == cap and (sx[:, 0] == sy).all()
        picks[sy] += 1
    # every tenth of the stream is equally represented (uniform, not the first rows)
    tenths = picks.reshape(10, -1).sum(axis=1)
    assert tenths.min() > 0.85 * tenths.mean() and tenths.max() < 1.15 * tenths.mean()
    a, b = Reservoir(cap, seed=1), Reservoir(cap, seed=1)
    a.add(x, np.arange(n))
    b.add(x, np.arange(n))
    assert (a.arrays()[1] == b.arrays()[1]).all()
    small = Reservoir(cap, seed=0)
    small.add(x[:10], np.arange(10))
    assert small.arrays()[1].tolist() == list(range(10))  # kept whole, in order


# ---- training -------------------------------------------------------------------------------
def _schema() -> FeatureSchema:
    return FeatureSchema.model_validate(
        {
            "label": "y",
            "labels": ["a", "b"],
            "features": [
                {"name": "x", "kind": "numeric", "mean": 0.0, "std": 1.0},
                {"name": "c", "kind": "categorical", "vocabulary": ["u", "v"]},
            ],
        }
    )


def test_training_is_deterministic_for_a_seed_and_learns_a_categorical_signal():
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(size=600), rng.integers(1, 3, 600)]).astype(np.float32)
    y = (x[:, 1] == 2).astype(np.int64)
    spec = parse_model_arg("embed_mlp:hidden=16,embedding_dim=2", _schema())
    first, epochs = train(spec, x, y, seed=5)
    again, _ = train(spec, x, y, seed=5)
    assert epochs == epochs_for(600)
    for (k, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with torch.inference_mode():
        assert (first(torch.from_numpy(x)).argmax(1).numpy() == y).mean() > 0.95
    assert torch.get_num_threads() >= 1  # restored after training on one thread


def test_a_cascade_is_refused_with_the_reason_and_an_untrusted_factory_too():
    assert "does not train a cascade" in (refusal(parse_model_arg("cascade", _schema())) or "")
    assert refusal(parse_model_arg("logistic", _schema())) is None
    spec = parse_model_arg("factory=somepkg.models:build", _schema())
    with pytest.raises(FactoryError, match="not trusted"):
        train(spec, np.zeros((4, 2), np.float32), np.zeros(4, np.int64), seed=1)


def test_epochs_give_about_three_thousand_steps_between_one_and_sixty():
    assert [epochs_for(n) for n in (1, 2400, 200_000, 10**8)] == [60, 60, 4, 1]


def test_label_text_of_an_array_matches_label_text_of_each_value():
    for values in ([1.0, 2.5, -3.0], [True, False], [3, 40], ["a", "B"], [1e20]):
        assert label_texts(pa.array(values)).to_pylist() == [label_text(v) for v in values]
    dictionary = pa.array(["x", "y", "x"]).dictionary_encode()
    assert label_texts(dictionary).to_pylist() == ["x", "y", "x"]


# ---- inference over a file, the schema file -------------------------------------------------
def _mixed_table(n: int = 200) -> pa.Table:
    rng = np.random.default_rng(1)
    return pa.table(
        {
            "amount": rng.normal(10, 2, n),
            "country": rng.choice(["FR", "DE", "JP"], n),
            "mobile": rng.choice([True, False], n),
            "y": rng.choice(["a", "b"], n),
        }
    )


def test_csv_and_parquet_of_the_same_table_infer_the_same_kinds(tmp_path):
    import pyarrow.csv as pcsv

    table = _mixed_table()
    pcsv.write_csv(table, tmp_path / "d.csv")
    pq.write_table(table, tmp_path / "d.parquet")
    kinds = []
    for name in ("d.csv", "d.parquet"):
        schema, counts = infer_file_schema(tmp_path / name, "y", chunk_rows=64)
        kinds.append([(f.name, f.kind) for f in schema.features])
        assert sum(counts.values()) == 200
    assert (
        kinds[0]
        == kinds[1]
        == [
            ("amount", "numeric"),
            ("country", "categorical"),
            ("mobile", "boolean"),
        ]
    )
    schema, _ = infer_file_schema(tmp_path / "d.csv", "y", ignore=("country",))
    assert [(f.name, f.kind) for f in schema.features][1] == ("country", "ignore")


@pytest.mark.parametrize(
    ("text", "label", "expected"),
    [
        ("{not json", "y", "is not JSON"),
        ('{"label": "y", "labels": ["a"], "features": []}', "y", "is not a valid feature schema"),
        (None, "fraud", "its label column is 'y', but --label is 'fraud'"),
    ],
)
def test_a_schema_file_is_validated(tmp_path, text, label, expected):
    path = tmp_path / "schema.json"
    path.write_text(text if text is not None else _schema().model_dump_json())
    with pytest.raises(InitError) as err:
        load_schema_file(path, label)
    assert expected in str(err.value)
    assert load_schema_file(_write_schema(tmp_path), "y") == _schema()


def _write_schema(tmp_path: Path) -> Path:
    path = tmp_path / "good.json"
    path.write_text(_schema().model_dump_json())
    return path


# ---- the CLI's own refusals (no store, no registry touched) ---------------------------------
@pytest.fixture()
def cli_env(tmp_path) -> dict[str, str]:
    return {"FLYWHEEL_HOME": str(tmp_path / "home")}


def test_init_without_public_or_private_and_nobody_to_ask_is_refused(tmp_path, cli_env):
    data = _csv(tmp_path, "a,y\n1,x\n2,y\n")
    result = runner.invoke(app, ["init", "--data", str(data), "--label", "y"], env=cli_env)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: pass --public")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "home" / "flywheel.db").exists()


def test_schema_with_ignore_or_max_vocabulary_is_refused(tmp_path, cli_env):
    args = ["init", "--data", "d.csv", "--label", "y", "--schema", "s.json", "--public"]
    for extra in (["--ignore", "a"], ["--max-vocabulary", "5"]):
        result = runner.invoke(app, [*args, *extra], env=cli_env)
        assert result.exit_code == 2 and "edit the schema file instead" in result.stderr


def test_schema_only_prints_the_schema_and_write_schema_writes_it(tmp_path, cli_env):
    import pyarrow.csv as pcsv

    pcsv.write_csv(_mixed_table(), tmp_path / "d.csv")
    base = ["init", "--data", str(tmp_path / "d.csv"), "--label", "y"]
    printed = runner.invoke(app, [*base, "--schema-only"], env=cli_env)
    assert printed.exit_code == 0, printed.stderr
    schema = FeatureSchema.model_validate_json(printed.stdout)
    assert schema.names == ["amount", "country", "mobile"] and schema.labels == ["a", "b"]
    out = tmp_path / "review.json"
    written = runner.invoke(app, [*base, "--write-schema", str(out)], env=cli_env)
    assert written.exit_code == 0, written.stderr
    assert FeatureSchema.model_validate(json.loads(out.read_text())) == schema
    assert f"--schema {out}" in written.stderr
    # nothing was imported: no store, no registry
    assert not (tmp_path / "home" / "flywheel.db").exists()
    assert not (tmp_path / "home" / "mlflow.db").exists()


def test_cli_errors_name_row_and_column_in_one_line_with_exit_code_two(tmp_path, cli_env):
    data = _csv(tmp_path, "amount,y\n1,a\n2,b\n" + "".join(f"{i},a\n" for i in range(40)) + "x,b\n")
    result = runner.invoke(
        app, ["init", "--data", str(data), "--label", "y", "--schema-only"], env=cli_env
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {data}: row 43, column 'amount': 'x' is not a number, but 98% of this "
        "column's values are; fix the value, or declare the column categorical in a schema "
        "file (--schema)"
    )
