"""The demo's files: the trusted/stream split of a data set, its length and drift, and the
stream read back as named rows typed by a schema."""

from __future__ import annotations

import pyarrow.csv as pcsv
import pytest

from flywheel.demo import TRUSTED_SHARE, dataset_files, load, read_stream, synthetic_files
from flywheel.features import Feature, FeatureSchema
from flywheel.settings import Settings


@pytest.fixture
def settings(tmp_path):
    return Settings(home=tmp_path / "home", seed=3, seed_examples=200)


def test_a_dataset_is_cut_at_the_trusted_share_and_its_rest_repeated_to_length(settings):
    data = dataset_files(settings, "penguins", requests=600, drift_at=0.5)
    table = load("penguins")
    cut = round(table.num_rows * TRUSTED_SHARE)
    trusted = pcsv.read_csv(data.trusted)
    stream = pcsv.read_csv(data.stream)
    assert trusted.num_rows == cut == 103
    assert trusted["species"].to_pylist() == table["species"][:cut].to_pylist()
    assert stream.num_rows == data.stream_rows == 600 and data.source_rows == 241
    assert data.drift_index == 300
    live = table["species"][cut:].to_pylist()
    sent = stream["species"].to_pylist()
    # before the drift point: the live rows, in order, from their start again after 241
    assert sent[:241] == live and sent[241:300] == live[:59]
    # after it: Adelie and Chinstrap traded places, Gentoo as it was
    swap = {"Adelie": "Chinstrap", "Chinstrap": "Adelie", "Gentoo": "Gentoo"}
    expected = [swap[v] for v in (live * 3)[300:600]]
    assert sent[300:] == expected


def test_a_long_dataset_is_cut_to_the_requests(settings):
    data = dataset_files(settings, "phishing", requests=100, drift_at=0.25)
    assert data.stream_rows == 100 and data.source_rows == 875 and data.drift_index == 25


def test_an_unknown_dataset_names_the_choices(settings):
    with pytest.raises(ValueError, match="unknown data set 'iris'; choose from .*penguins"):
        dataset_files(settings, "iris", requests=100, drift_at=0.5)


def test_the_synthetic_stream_changes_concept_at_the_drift_point(settings):
    data = synthetic_files(settings, requests=90, drift_at=1 / 3)
    stream = pcsv.read_csv(data.stream)
    assert stream.column_names == [f"x{i}" for i in range(8)] + ["label"]
    assert stream.num_rows == 90 and data.drift_index == 30
    assert pcsv.read_csv(data.trusted).num_rows == 200
    assert data.trusted.parent == data.stream.parent == settings.home_dir / "demo"


def test_the_stream_is_read_as_named_rows_typed_by_the_schema(settings):
    data = dataset_files(settings, "penguins", requests=300, drift_at=0.5)
    schema = FeatureSchema(
        label="species",
        labels=["Adelie", "Chinstrap", "Gentoo"],
        features=[
            Feature(name="island", kind="categorical", vocabulary=["Biscoe", "Dream"]),
            Feature(name="bill_length_mm", kind="numeric", mean=44.0),
            Feature(name="bill_depth_mm", kind="numeric", mean=17.0),
            Feature(name="flipper_length_mm", kind="numeric", mean=200.0),
            Feature(name="body_mass_g", kind="numeric", mean=4200.0),
            Feature(name="sex", kind="categorical", vocabulary=["female", "male"]),
            Feature(name="year", kind="categorical", vocabulary=["2007", "2008", "2009"]),
        ],
    )
    rows, labels = read_stream(data, schema)
    assert len(rows) == len(labels) == 300
    assert set(rows[0]) == {f.name for f in schema.features}
    assert all(isinstance(r["year"], str) for r in rows)  # categorical: text, not 2007
    assert all(r["bill_length_mm"] is None or isinstance(r["bill_length_mm"], float) for r in rows)
    assert any(r["sex"] is None for r in rows)  # an empty field is missing
    assert set(labels) == {"Adelie", "Chinstrap", "Gentoo"}
    schema.encode_rows(rows)  # the service's encoder takes them as they are
