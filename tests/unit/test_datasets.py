"""The offline data sets load as stated, in a fixed order, and drift only where told."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pytest

from flywheel.demo import DATASETS, Drift, load, write_csv

SMALL = [name for name, d in DATASETS.items() if d.rows < 5000]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_each_data_set_loads_with_the_stated_rows_classes_and_column_types(name):
    d = DATASETS[name]
    t = load(name)
    assert t.num_rows == d.rows
    assert d.label in t.column_names
    assert len(pc.unique(t[d.label])) == d.classes
    assert t[d.label].null_count == 0
    for col in d.categorical:
        assert pa.types.is_string(t[col].type), col
    features = [c for c in t.column_names if c != d.label]
    numeric = [c for c in features if c not in d.categorical]
    assert all(
        pa.types.is_integer(t[c].type) or pa.types.is_floating(t[c].type) for c in numeric
    ), {c: str(t[c].type) for c in numeric}
    assert d.drift.column in t.column_names
    if d.drift.kind != "shift_numeric":  # both swapped values occur, so the swap bites
        present = set(pc.unique(t[d.drift.column]).to_pylist())
        assert set(d.drift.values or ()) <= present


def test_load_is_deterministic_and_a_class_sorted_file_is_shuffled():
    a, b = load("penguins"), load("penguins")
    assert a.equals(b)
    species = a["species"].to_pylist()
    # the file lists all Adelie first; the fixed shuffle mixes them into the first rows
    assert len(set(species[:30])) == 3
    assert load("phishing")["is_phishing"][:5].to_pylist() == [1, 1, 1, 1, 0]  # file order


def test_missing_values_are_nulls_not_strings_or_nan():
    t = load("penguins")
    assert t["sex"].null_count == 11 and "NA" not in pc.unique(t["sex"]).to_pylist()
    assert t["bill_length_mm"].null_count == 2
    assert pc.sum(pc.is_nan(pc.fill_null(t["bill_length_mm"], 0.0))).as_py() == 0


def test_solar_flare_label_is_derived_and_its_counts_are_dropped():
    t = load("solar_flare")
    assert "c-class-flares" not in t.column_names
    assert pc.sum(pc.equal(t["flare"], "yes")).as_py() == 201


@pytest.mark.parametrize("name", SMALL)
def test_each_drift_changes_only_rows_after_the_point(name):
    d = DATASETS[name]
    t = load(name)
    drifted = d.drift.apply(t, at=0.5)
    first = d.drift.start(t.num_rows, 0.5)
    assert drifted.column_names == t.column_names
    assert drifted.slice(0, first).equals(t.slice(0, first))
    col = d.drift.column
    before, after = t[col].slice(first).to_pylist(), drifted[col].slice(first).to_pylist()
    changed = sum(x != y for x, y in zip(before, after, strict=True))
    assert changed > 0
    if d.drift.kind != "shift_numeric":
        a, b = d.drift.values or ("", "")
        swap = {a: b, b: a}
        assert after == [swap.get(v, v) for v in before]
    others = [c for c in t.column_names if c != col]
    assert drifted.select(others).equals(t.select(others))


def test_shift_moves_by_k_standard_deviations_of_the_rows_before():
    t = pa.table({"x": [0, 2, 0, 2, 5, None]})
    out = Drift("shift_numeric", "x", k=-1.5).apply(t, at=0.5)["x"].to_pylist()
    std = pc.stddev(pa.array([0.0, 2.0, 0.0]), ddof=1).as_py()
    assert out[:3] == [0.0, 2.0, 0.0]
    assert out[3:5] == pytest.approx([2 - 1.5 * std, 5 - 1.5 * std]) and out[5] is None


def test_bad_drift_arguments_are_refused_with_the_reason():
    t = load("penguins")
    with pytest.raises(ValueError, match="between 0 and 1"):
        DATASETS["penguins"].drift.apply(t, at=1.0)
    with pytest.raises(ValueError, match="'nope' is not in the table"):
        Drift("swap_labels", "nope", ("a", "b")).apply(t, at=0.5)
    with pytest.raises(ValueError, match="cannot shift 'island'"):
        Drift("shift_numeric", "island", k=1).apply(t, at=0.5)
    with pytest.raises(ValueError, match="needs two values"):
        Drift("swap_categories", "island")
    with pytest.raises(ValueError, match="k != 0"):
        Drift("shift_numeric", "year")


def test_unknown_data_set_names_the_choices():
    with pytest.raises(ValueError, match="unknown data set 'adult'; choose from image_segments"):
        load("adult")


def test_write_csv_round_trips_names_types_nulls_and_the_drift(tmp_path):
    plain = pcsv.read_csv(write_csv("solar_flare", tmp_path / "a.csv"))
    assert plain.equals(load("solar_flare"))
    # a null is an empty field (an empty string would be written as "")
    nulls = pcsv.ConvertOptions(strings_can_be_null=True)
    out = write_csv("penguins", tmp_path / "b.csv", drift_at=0.25)
    drifted = pcsv.read_csv(out, convert_options=nulls)
    want = DATASETS["penguins"].drift.apply(load("penguins"), 0.25)
    assert drifted.column_names == want.column_names
    assert drifted["species"].equals(want["species"])
    assert drifted["sex"].null_count == 11
    assert drifted["bill_length_mm"].to_pylist() == want["bill_length_mm"].to_pylist()


def test_the_docs_list_every_data_set_with_its_package_and_rows():
    text = (Path(__file__).resolve().parents[2] / "docs" / "datasets.md").read_text()
    rows = {
        line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")
    }
    assert set(rows) == {f"`{name}`" for name in DATASETS}
    for name, d in DATASETS.items():
        line = rows[f"`{name}`"]
        assert d.package in line and f"{d.rows:,}" in line, name
        assert all(f"`{c}`" in line for c in d.categorical), name
