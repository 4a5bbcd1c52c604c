"""The registry contract on a real MLflow store (SQLite, no server)."""

from __future__ import annotations

import pytest
import torch

from flywheel.learner import ensure_champion
from flywheel.registry import Registry
from flywheel.settings import Settings, prepare_home
from flywheel.store.trusted import seed_data

pytestmark = pytest.mark.integration


@pytest.fixture()
def reg_settings(tmp_path) -> Settings:
    s = Settings(home=tmp_path / "home", seed_examples=1000)
    prepare_home(s)
    return s


def test_empty_registry_bootstraps_one_champion_and_only_once(reg_settings):
    registry = Registry.of(reg_settings)
    assert registry.champion_version() is None
    version = ensure_champion(reg_settings.trusted, registry)
    assert ensure_champion(reg_settings.trusted, registry) == version
    versions = registry.client.search_model_versions(f"name='{reg_settings.model_name}'")
    assert [str(v.version) for v in versions] == [version]
    loaded = registry.load(version)
    for tag in ("parent_version", "source", "examples", "epsilon", "delta", "gate"):
        assert tag in loaded.tags
    assert loaded.tags["source"] == "init"  # the demo data imported by `flywheel init`
    _, _, x_ho, y_ho = seed_data(reg_settings.trusted)
    with torch.inference_mode():
        acc = (loaded.module(torch.from_numpy(x_ho)).argmax(1).numpy() == y_ho).mean()
    assert acc > 0.8, "the initial model should have learned the seed concept"
    # artifacts live under FLYWHEEL_HOME, not the working directory
    assert list(reg_settings.mlflow_artifacts_dir.rglob("weights.pt"))


def test_publish_refuses_missing_tags(reg_settings):
    from flywheel.learner import default_spec
    from flywheel.modelspec import build_model

    spec = default_spec()
    with pytest.raises(ValueError, match="needs tags"):
        Registry.of(reg_settings).publish(spec, build_model(spec), tags={"source": "online"})


def test_publish_writes_every_param_and_metric_as_single_writes_would(reg_settings):
    """Params and metrics go in batches of 100 (one store write each, not one per key):
    a run with more than 100 params and a NaN metric (a DP candidate without a recent
    holdout) reads back exactly: params as text, metrics as floats."""
    import math

    from flywheel.learner import default_spec
    from flywheel.modelspec import build_model

    spec = default_spec()
    params: dict[str, object] = {f"p{i:03d}": i for i in range(130)}
    params |= {"dp": True, "dp_noise_multiplier": 3.251953, "none": None}
    metrics = {"recent_accuracy": 0.75, "nonprivate_recent_accuracy": math.nan, "lr": 0.01}
    registry = Registry.of(reg_settings)
    tags = {"parent_version": "", "source": "manual", "examples": "[0,1)"}
    tags |= {"epsilon": "none", "delta": "none", "gate": "test"}
    version = registry.publish(spec, build_model(spec), tags=tags, params=params, metrics=metrics)
    info = registry.info(version)
    assert info.params == {k: str(v) for k, v in params.items()}
    assert set(info.metrics) == set(metrics)
    assert info.metrics["recent_accuracy"] == 0.75 and info.metrics["lr"] == 0.01
    assert math.isnan(info.metrics["nonprivate_recent_accuracy"])
