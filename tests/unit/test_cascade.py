"""Adaptive compute: cascade spec, calibration, routing, artifacts, events and serving."""

import json
from datetime import UTC, datetime

import numpy as np
import orjson
import pytest
import torch
from fastapi.testclient import TestClient

from flywheel.artifacts import CASCADE_FORMAT, FORMAT, ArtifactError, load_model, save_model
from flywheel.events import PredictionEvent, prediction_payload
from flywheel.feedback.messages import Rejected, decode
from flywheel.kernels.cascade import (
    build_cascade,
    calibrate_threshold,
    cascade_flops,
    mlp_flops,
)
from flywheel.kernels.quantize import to_precision
from flywheel.modelspec import (
    ALWAYS_HEAVY,
    Cascade,
    CascadeSpec,
    ModelSpec,
    build_model,
    build_module,
    parse_spec,
)
from flywheel.service import ModelHolder, ServedModel, ServiceConfig, create_app
from flywheel.settings import Settings

LABELS = ["a", "b", "c"]


def cascade(threshold: float, seed: int = 0) -> tuple[CascadeSpec, Cascade]:
    torch.manual_seed(seed)
    spec = CascadeSpec(input_dim=4, labels=LABELS, light=[4], heavy=[16, 16], threshold=threshold)
    return spec, Cascade(spec).eval()


# -- calibration -------------------------------------------------------------------------
def test_calibration_picks_the_smallest_threshold_that_keeps_the_target():
    conf = np.array([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    heavy_ok = np.ones(10, bool)
    light_ok = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1], bool)  # wrong only when unsure
    cal = calibrate_threshold(conf, light_ok, heavy_ok, target=1.0, z=0.0)
    assert cal.threshold == pytest.approx(0.4) and cal.met
    assert cal.light_share == pytest.approx(0.8) and cal.cascade_accuracy == 1.0
    assert (cal.light_accuracy, cal.heavy_accuracy) == (0.8, 1.0)
    # 90 % of the heavy network's accuracy allows one light mistake
    assert calibrate_threshold(conf, light_ok, heavy_ok, 0.9, z=0.0).threshold == pytest.approx(0.3)
    # a light network as good as the heavy one answers everything
    assert calibrate_threshold(conf, heavy_ok, heavy_ok, 1.0, z=0.0).light_share == 1.0


def test_a_lucky_dip_cannot_pick_a_threshold_and_ties_move_together():
    conf = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.6])
    heavy_ok = np.array([0, 1, 1, 1, 1, 1, 1], bool)
    light_ok = np.array([1, 0, 1, 0, 1, 0, 1], bool)
    # at 0.1 (all light) 4/7 right; heavy 6/7. Target 0.999: only thresholds from which
    # every higher one keeps 6/7 qualify; the tie at 0.5 is one group
    cal = calibrate_threshold(conf, light_ok, heavy_ok, target=0.999, z=0.0)
    assert cal.threshold == pytest.approx(0.6)
    assert cal.light_share == pytest.approx(1 / 7)


def test_calibration_escalates_everything_when_the_target_is_out_of_reach():
    conf = np.array([0.5, 0.9])
    cal = calibrate_threshold(
        conf, np.array([False, False]), np.array([True, False]), target=1.2, z=0.0
    )
    assert (cal.threshold, cal.light_share, cal.met) == (ALWAYS_HEAVY, 0.0, False)


def test_the_noise_margin_makes_calibration_more_careful():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 2000)
    heavy_ok = rng.uniform(size=2000) < 0.95
    light_ok = np.where(rng.uniform(size=2000) < conf, heavy_ok, ~heavy_ok)
    bare = calibrate_threshold(conf, light_ok, heavy_ok, 0.98, z=0.0)
    careful = calibrate_threshold(conf, light_ok, heavy_ok, 0.98, z=2.0)
    assert careful.threshold > bare.threshold and careful.light_share < bare.light_share


def test_flops():
    spec = CascadeSpec(input_dim=8, labels=LABELS, light=[16], heavy=[64, 64])
    assert mlp_flops(spec.part("light")) == 2 * (8 * 16 + 16 * 3)
    f = cascade_flops(spec, light_share=0.75)
    heavy = 2 * (8 * 64 + 64 * 64 + 64 * 3)
    assert f["heavy"] == heavy
    assert f["saved"] == pytest.approx(1 - (f["light"] + 0.25 * heavy) / heavy)


# -- routing -----------------------------------------------------------------------------
def test_route_answers_confident_rows_light_and_computes_heavy_only_for_the_rest():
    spec, module = cascade(threshold=0.5)
    x = torch.randn(64, 4) * 3
    seen = []
    module.heavy.register_forward_hook(lambda m, inp, out: seen.append(len(inp[0])))
    with torch.inference_mode():
        logits, escalated = module.route(x)
        light = module.light(x)
        heavy = module.heavy(x)
    seen.pop()  # the reference call above
    conf = torch.softmax(light, 1).amax(1)
    assert torch.equal(escalated, conf < 0.5)
    assert seen == ([int(escalated.sum())] if escalated.any() else [])
    assert torch.allclose(logits[~escalated], light[~escalated])
    assert torch.allclose(logits[escalated], heavy[escalated], atol=1e-6)
    assert torch.equal(module(x), logits)


def test_thresholds_zero_and_always_heavy():
    x = torch.randn(20, 4)
    _, all_light = cascade(0.0)
    _, all_heavy = cascade(ALWAYS_HEAVY)
    with torch.inference_mode():
        assert not all_light.route(x)[1].any()
        assert all_heavy.route(x)[1].all()
        assert torch.allclose(all_heavy(x), all_heavy.heavy(x), atol=1e-6)


def test_spec_validation_and_parse():
    with pytest.raises(ValueError, match="unique"):
        CascadeSpec(input_dim=2, labels=["a", "a"])
    with pytest.raises(ValueError):
        CascadeSpec(input_dim=2, labels=LABELS, light=[0])
    with pytest.raises(ValueError):
        CascadeSpec(input_dim=2, labels=LABELS, threshold=-0.1)
    spec = CascadeSpec(input_dim=2, labels=LABELS, threshold=0.7)
    assert parse_spec(spec.model_dump()) == spec
    mlp = ModelSpec(input_dim=2, labels=LABELS)
    assert parse_spec(mlp.model_dump()) == mlp
    doc = mlp.model_dump()
    del doc["kind"]
    assert parse_spec(doc) == mlp  # an old spec without a kind is an MLP
    assert isinstance(build_module(spec), Cascade)
    assert isinstance(build_module(mlp), torch.nn.Sequential)


# -- artifacts ---------------------------------------------------------------------------
def test_cascade_artifact_round_trip_without_pickles(tmp_path):
    spec, module = cascade(threshold=0.6)
    module.light[0].fit(torch.randn(50, 4) * 2 + 1)
    save_model(tmp_path, spec, module)
    doc = json.loads((tmp_path / "spec.json").read_text())
    assert doc["format"] == CASCADE_FORMAT and doc["spec"]["kind"] == "cascade"
    loaded_spec, loaded = load_model(tmp_path)
    assert loaded_spec == spec and isinstance(loaded, Cascade) and not loaded.training
    assert loaded.threshold == 0.6
    x = torch.randn(30, 4)
    assert torch.equal(module(x), loaded(x))


def test_mlp_artifacts_keep_their_format(tmp_path):
    spec = ModelSpec(input_dim=4, hidden=[8], labels=LABELS)
    save_model(tmp_path, spec, build_model(spec))
    assert json.loads((tmp_path / "spec.json").read_text())["format"] == FORMAT
    assert load_model(tmp_path)[0] == spec


def test_a_format_that_does_not_match_the_spec_kind_is_refused(tmp_path):
    spec, module = cascade(threshold=0.6)
    save_model(tmp_path, spec, module)
    doc = json.loads((tmp_path / "spec.json").read_text())
    doc["format"] = FORMAT
    (tmp_path / "spec.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="cascade"):
        load_model(tmp_path)
    doc["format"] = "flywheel-cascade/9"
    (tmp_path / "spec.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="format"):
        load_model(tmp_path)


# -- building ----------------------------------------------------------------------------
def test_build_cascade_trains_and_calibrates():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1500, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] ** 2 > 0.5).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    spec, module, cal = build_cascade(
        x[:1000],
        y[:1000],
        x[1000:],
        y[1000:],
        labels=LABELS,
        light=[4],
        heavy=[32, 32],
        epochs=15,
        target=0.99,
    )
    assert spec.threshold == cal.threshold == module.threshold
    assert spec.calibration["target"] == 0.99 and spec.calibration["n"] == 500
    assert cal.met and cal.cascade_accuracy >= 0.99 * cal.heavy_accuracy
    with torch.inference_mode():
        logits, escalated = module.route(torch.from_numpy(x[1000:]))
    assert float((logits.argmax(1).numpy() == y[1000:]).mean()) == pytest.approx(
        cal.cascade_accuracy
    )
    assert 1 - float(escalated.float().mean()) == pytest.approx(cal.light_share)


# -- events ------------------------------------------------------------------------------
TS = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def payload(**extra) -> bytes:
    return prediction_payload(
        id="p1",
        model_name="m",
        model_version="3",
        features=[1.0, 2.0],
        probabilities={"a": 0.25, "b": 0.75},
        label="b",
        timestamp=TS,
        latency_ms=1.0,
        **extra,
    )


def test_prediction_events_carry_the_path_and_old_records_stay_valid():
    assert PredictionEvent.model_validate_json(payload(path="light")).path == "light"
    old = payload()
    assert "path" not in orjson.loads(old)  # without a path: byte-for-byte as before
    assert PredictionEvent.model_validate_json(old).path is None


@pytest.mark.parametrize(
    "doc_change",
    [
        {"path": "heavy"},
        {"path": "single"},
        {"path": "medium"},
        {"some_future_field": [1, 2]},
        {},
    ],
)
def test_the_feedback_worker_never_dead_letters_a_prediction_for_its_path(doc_change):
    doc = orjson.loads(payload())
    doc.update(doc_change)
    event = decode("prediction", "flywheel.predictions", 0, 0, b"p1", orjson.dumps(doc))
    assert not isinstance(event, Rejected), event
    assert event.path == doc_change.get("path")


# -- serving -----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_served_cascade_reports_the_path_per_prediction(
    tmp_path, precision, list_event_log, app_key
):
    spec, module = cascade(threshold=0.55)
    x = (np.random.default_rng(0).normal(size=(12, 4)) * 3).astype(np.float32)
    served = ServedModel.prepare("m", "5", spec, module, precision)
    probs, paths = served.predict(x)
    with torch.inference_mode():
        reference = served.module.route(torch.from_numpy(x))[1].tolist()
    assert paths == ["heavy" if e else "light" for e in reference]
    assert {"light", "heavy"} <= set(paths) or precision != "fp32"
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    holder = ModelHolder()
    holder.swap(served)
    sent = []
    log = list_event_log(sent)
    app = create_app(ServiceConfig.of(Settings(home=tmp_path)), holder=holder, event_log=log)
    with TestClient(app, headers=app_key.headers) as client:
        assert client.get("/v1/model").json()["kind"] == "cascade"
        r = client.post("/v1/predict", json={"instances": x.tolist()})
        assert r.status_code == 200
        ids = [p["id"] for p in r.json()["predictions"]]
        assert log.wait_idle(5)
    events = [PredictionEvent.model_validate_json(rec.value) for rec in sent]
    assert [e.id for e in events] == ids
    assert [e.path for e in events] == paths


def test_int8_cascade_keeps_routing():
    spec, module = cascade(threshold=0.55)
    low = to_precision(module, "int8")
    assert isinstance(low, Cascade) and low.threshold == 0.55
    x = torch.randn(40, 4) * 3
    with torch.inference_mode():
        logits, escalated = low.route(x)
    assert logits.shape == (40, 3) and escalated.dtype == torch.bool
