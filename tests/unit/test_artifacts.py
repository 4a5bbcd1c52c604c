import json
import pickle

import pytest
import torch

from flywheel.artifacts import ArtifactError, load_model, save_model
from flywheel.modelspec import ModelSpec, build_model


def spec() -> ModelSpec:
    return ModelSpec(input_dim=4, hidden=[8], labels=["a", "b", "c"])


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    module = build_model(spec())
    module[0].fit(torch.randn(50, 4) * 3 + 1)
    save_model(tmp_path, spec(), module)
    loaded_spec, loaded = load_model(tmp_path)
    x = torch.randn(10, 4)
    assert loaded_spec == spec()
    assert torch.equal(module.eval()(x), loaded(x))
    assert not loaded.training


def test_tampered_weights_are_refused(tmp_path):
    save_model(tmp_path, spec(), build_model(spec()))
    (tmp_path / "weights.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="checksum"):
        load_model(tmp_path)


class Payload:
    ran = False

    def __reduce__(self):
        return (setattr, (Payload, "ran", True))


def test_pickled_code_never_runs(tmp_path):
    save_model(tmp_path, spec(), build_model(spec()))
    with open(tmp_path / "weights.pt", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    doc = json.loads((tmp_path / "spec.json").read_text())
    import hashlib

    doc["weights_sha256"] = hashlib.sha256((tmp_path / "weights.pt").read_bytes()).hexdigest()
    (tmp_path / "spec.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError):
        load_model(tmp_path)
    assert Payload.ran is False


def test_spec_validation():
    with pytest.raises(ValueError, match="unique"):
        ModelSpec(input_dim=2, labels=["a", "a"])
    with pytest.raises(ValueError):
        ModelSpec(input_dim=2, labels=["a"])
    out = build_model(ModelSpec(input_dim=3, hidden=[5, 6], labels=["x", "y"]))(torch.zeros(2, 3))
    assert out.shape == (2, 2)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ArtifactError, match="spec.json"):
        load_model(tmp_path)
