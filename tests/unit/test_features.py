"""Feature schemas: inference from batches, encoding named rows and tables, and the
model families that carry a schema (Encode inside the model, DP engines, artifacts)."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
import torch

from flywheel.artifacts import ArtifactError, load_model, read_spec, save_model
from flywheel.features import Feature, FeatureError, FeatureSchema, infer_schema
from flywheel.modelspec import (
    Encode,
    FactorySpec,
    ModelSpec,
    build_model,
    default_spec,
    parse_model_arg,
    parse_spec,
)


def table(n: int = 60, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    amount = rng.normal(50, 10, n)
    country = rng.choice(["FR", "DE", "JP"], n)
    mobile = rng.random(n) < 0.5
    y = np.where((amount > 50) ^ (country == "FR"), "fraud", "ok")
    amounts = [None if i % 7 == 0 else float(a) for i, a in enumerate(amount)]
    return pa.table(
        {
            "amount": amounts,
            "country": country.tolist(),
            "mobile": mobile.tolist(),
            "user_id": [f"u{i}" for i in range(n)],
            "label": y.tolist(),
        }
    )


def schema() -> FeatureSchema:
    return infer_schema([table()], "label", max_vocabulary=10)[0]


# ---- inference ---------------------------------------------------------------------------
def test_inference_kinds_fills_and_reasons():
    s, counts = infer_schema(table().to_batches(max_chunksize=16), "label", max_vocabulary=10)
    kinds = {f.name: f.kind for f in s.features}
    assert kinds == {
        "amount": "numeric",
        "country": "categorical",
        "mobile": "boolean",
        "user_id": "ignore",
    }
    amount = s.features[0]
    present = [v for v in table().column("amount").to_pylist() if v is not None]
    assert amount.mean == pytest.approx(np.mean(present))  # merged over four batches
    assert amount.std == pytest.approx(np.std(present, ddof=1))
    assert "identifier" in s.features[3].reason
    assert sorted(s.features[1].vocabulary) == ["DE", "FR", "JP"]
    assert s.labels == ["fraud", "ok"] and sum(counts.values()) == 60


def test_vocabulary_cap_keeps_the_most_frequent_values():
    t = pa.table({"c": ["a"] * 5 + ["b"] * 3 + ["c", "d"], "y": ["p", "q"] * 5})
    s, _ = infer_schema([t], "y", max_vocabulary=2)
    assert s.features[0].vocabulary == ["a", "b"]
    assert "2 rarer" in s.features[0].reason
    enc = s.encode_table(t)
    assert enc.unknown == {"c": 2} and enc.x[-1, 0] == 0  # "d" → the unknown bucket


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"x": [1.0, 2.0], "z": ["a", "b"]}, "no label column 'y'"),
        ({"x": [1.0, 2.0, 3.0], "y": ["a", "a", "a"]}, "only one class"),
        ({"x": [1.0, 2.0, 3.0], "y": ["a", "a", "b"]}, "['b'] have a single example"),
        ({"x": [1.0, 2.0, 3.0, 4.0], "y": ["a", None, "b", "b"]}, "data[1].y: the label is"),
        ({"x": [], "y": []}, "no rows"),
    ],
)
def test_bad_data_sets_are_named(data, message):
    with pytest.raises(FeatureError, match=message.replace("[", r"\[").replace("]", r"\]")):
        infer_schema([pa.table(data)], "y")


def test_a_type_change_between_batches_names_row_and_column():
    first = pa.table({"x": [1.0, 2.0], "y": ["a", "b"]})
    second = pa.table({"x": ["3", "oops"], "y": ["a", "b"]})
    with pytest.raises(FeatureError) as err:
        infer_schema([first, second], "y")
    assert err.value.row == 2 and err.value.field == "x"
    assert "numeric from row 0, text at row 2" in str(err.value)


# ---- encoding ----------------------------------------------------------------------------
def test_named_rows_fill_count_unknowns_and_refuse_bad_fields():
    s = schema()
    enc = s.encode_rows([{"amount": 61.0, "country": "XX", "mobile": True}, {}])
    assert enc.unknown == {"country": 1}
    assert enc.x[1, 0] == pytest.approx(s.features[0].mean)  # the numeric fill
    assert s.decode(enc.x[0]) == {"amount": 61.0, "country": None, "mobile": True}
    assert s.encode_rows([{"user_id": "u1"}]).x.shape == (1, 3)  # ignored: accepted, dropped
    for row, field, text in [
        ({"amount": "12"}, "amount", "expected a number"),
        ({"country": 1.5}, "country", "expected a category"),
        ({"mobile": 1}, "mobile", "expected true or false"),
        ({"amount": float("nan")}, "amount", "not a finite"),
        ({"colour": "red"}, "colour", "unknown feature"),
    ]:
        with pytest.raises(FeatureError) as err:
            s.encode_rows([{}, row])
        assert (err.value.row, err.value.field) == (1, field) and text in str(err.value)


def test_a_required_feature_without_fill_is_refused():
    s = FeatureSchema(
        label="y",
        labels=["a", "b"],
        features=[Feature(name="x", kind="numeric", missing="error")],
    )
    with pytest.raises(FeatureError, match=r"instances\[0\]\.x: is missing"):
        s.encode_rows([{}])
    with pytest.raises(FeatureError, match=r"data\[2\]\.x: is missing"):
        s.encode_table(pa.table({"x": [1.0, None]}), first_row=1)


def test_table_and_rows_encode_alike():
    s, t = schema(), table()
    rows = [{k: v for k, v in r.items() if k != "label"} for r in t.to_pylist()]
    np.testing.assert_array_equal(s.encode_table(t).x, s.encode_rows(rows).x)


def test_vectors_only_for_numeric_schemas():
    with pytest.raises(FeatureError, match="send named rows"):
        schema().encode_vectors([[1.0, 2.0, 3.0]])
    numeric = FeatureSchema(
        label="y", labels=["a", "b"], features=[Feature(name=n, kind="numeric") for n in "pq"]
    )
    assert numeric.encode_vectors([[1.0, 2.0]]).shape == (1, 2)
    with pytest.raises(FeatureError, match="has 3 values; expected 2"):
        numeric.encode_vectors([[1.0, 2.0, 3.0]])


def test_schema_validation():
    with pytest.raises(ValueError, match="unique"):
        FeatureSchema(
            label="y", labels=["a", "b"], features=[Feature(name="x", kind="numeric")] * 2
        )
    with pytest.raises(ValueError, match="cannot also be a feature"):
        FeatureSchema(label="x", labels=["a", "b"], features=[Feature(name="x", kind="numeric")])
    with pytest.raises(ValueError, match="not in its vocabulary"):
        Feature(name="c", kind="categorical", vocabulary=["a"], fill="b")


# ---- models over a schema ----------------------------------------------------------------
def test_encode_one_hot_and_embedding_widths_and_out_of_range_codes():
    s = schema()
    one_hot, emb = Encode(s), Encode(s, embedding_dim=5)
    assert one_hot.out_dim == 2 + 4 and emb.out_dim == 2 + 5
    x = torch.tensor([[50.0, 2.0, 1.0], [50.0, 99.0, 0.0], [50.0, -3.0, 0.0]])
    hot = one_hot(x)
    # a code outside the vocabulary reads as the unknown bucket, like an unseen category
    assert hot[1, 2:].tolist() == [1.0, 0.0, 0.0, 0.0] == hot[2, 2:].tolist()
    assert hot[0, 2 + 2].item() == 1.0
    assert emb(x).shape == (3, 7)


@pytest.mark.parametrize("text", ["logistic", "mlp:hidden=16,dropout=0.2", "embed_mlp"])
def test_every_family_trains_under_dp_with_the_engine_auto_picks(text):
    from flywheel.privacy import PrivateBatch, dp_update

    s = schema()
    spec = parse_model_arg(text, s)
    module = build_model(spec)
    x = s.encode_table(table()).x
    y = np.asarray(s.labels_of(table().column("label").to_pylist()))
    before = [p.detach().clone() for p in module.parameters()]
    stats = dp_update(
        module,
        torch.optim.SGD(module.parameters(), lr=0.1),
        PrivateBatch(x, y, np.ones(len(y)), np.arange(len(y)), np.zeros(len(y), bool)),
        steps=2,
        sample_rate=0.5,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    # the fused kernel takes every Linear-only model; embeddings fall back to Opacus
    assert stats.engine == ("opacus" if spec.family == "embed_mlp" else "fused")
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_model_arg_errors_say_what_is_wrong():
    s = schema()
    with pytest.raises(ValueError, match="unknown family 'forest'"):
        parse_model_arg("forest", s)
    with pytest.raises(ValueError, match="dropout"):
        parse_model_arg("mlp:dropout=1.5", s)
    numeric = FeatureSchema(
        label="y", labels=["a", "b"], features=[Feature(name="x", kind="numeric")]
    )
    with pytest.raises(ValueError, match="needs categorical features"):
        parse_model_arg("embed_mlp", numeric)
    assert default_spec(s).family == "embed_mlp" and default_spec(numeric).family == "mlp"
    spec = parse_model_arg('{"kind": "mlp", "hidden": [8], "activation": "tanh"}', s)
    assert (spec.hidden, spec.activation, spec.schema) == ([8], "tanh", s)


def test_schema_spec_round_trips_through_the_artifact(tmp_path):
    s = schema()
    spec = parse_model_arg("embed_mlp:embedding_dim=3,hidden=8", s)
    module = build_model(spec).eval()
    save_model(tmp_path, spec, module)
    doc = json.loads((tmp_path / "spec.json").read_text())
    assert doc["format"] == "flywheel-mlp/2"
    assert doc["spec"]["schema"]["features"][1]["vocabulary"] == s.features[1].vocabulary
    assert read_spec(tmp_path) == spec  # JSON alone: no weights read
    loaded_spec, loaded = load_model(tmp_path)
    x = torch.from_numpy(s.encode_rows([{"amount": 40.0, "country": "JP"}]).x)
    torch.testing.assert_close(loaded(x), module(x))


def test_a_plain_mlp_keeps_the_first_format(tmp_path):
    spec = ModelSpec(input_dim=3, labels=["a", "b"])
    save_model(tmp_path, spec, build_model(spec))
    doc = json.loads((tmp_path / "spec.json").read_text())
    assert doc["format"] == "flywheel-mlp/1"
    assert set(doc["spec"]) == {"kind", "input_dim", "hidden", "labels", "activation"}


def test_a_factory_is_imported_only_when_trusted(tmp_path, monkeypatch):
    package = tmp_path / "pkg" / "teamnets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            BUILT = []
            def build(in_features, n_classes, width=4):
                BUILT.append(width)
                return nn.Sequential(nn.Linear(in_features, width), nn.Linear(width, n_classes))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    s = schema()
    spec = parse_model_arg("factory=teamnets.nets:build,width=6", s)
    assert isinstance(spec, FactorySpec) and spec.options == {"width": 6}
    from flywheel.modelspec import build_module

    module = build_module(spec, factories=["teamnets"])
    assert module(torch.zeros(2, 3)).shape == (2, 2)
    save_model(tmp_path / "v", spec, module)
    sys.modules.pop("teamnets.nets", None)
    with pytest.raises(ArtifactError, match="not trusted: add 'teamnets' to FLYWHEEL_MODEL"):
        load_model(tmp_path / "v")
    assert "teamnets.nets" not in sys.modules  # refused before any import
    assert load_model(tmp_path / "v", factories=["teamnets.nets"])[1] is not None
    assert parse_spec(json.loads((tmp_path / "v" / "spec.json").read_text())["spec"]) == spec


@pytest.mark.parametrize("text", ["logistic", "mlp", "embed_mlp", "cascade"])
@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_low_precision_copies_of_every_family_agree_with_fp32(text, precision):
    from flywheel.kernels import to_precision
    from flywheel.modelspec import build_module

    s = schema()
    torch.manual_seed(0)
    module = build_module(parse_model_arg(text, s)).eval()
    x = torch.from_numpy(s.encode_table(table()).x)
    copy = to_precision(module, precision)
    agree = (copy(x).argmax(1) == module(x).argmax(1)).float().mean().item()
    assert agree >= 0.9  # the Encode layer stays float32; only Linear layers change


def test_a_cascade_trains_over_a_schema():
    from flywheel.kernels.cascade import build_cascade

    s, t = schema(), table()
    x, y = s.encode_table(t).x, np.asarray(s.labels_of(t.column("label").to_pylist()))
    spec, module, cal = build_cascade(x, y, x, y, labels=s.labels, schema=s, epochs=3)
    assert spec.schema == s and isinstance(module.light[0], Encode)
    assert 0 <= cal.light_share <= 1


def test_an_identifier_under_the_category_cap_is_still_ignored():
    s, _ = infer_schema([table(n=60)], "label")  # 60 distinct ids, cap 1,000
    assert [f.kind for f in s.features if f.name == "user_id"] == ["ignore"]
    few = pa.table({"c": [f"v{i % 40}" for i in range(60)], "y": ["a", "b"] * 30})
    assert infer_schema([few], "y")[0].features[0].kind == "categorical"  # 40 of 60: kept
