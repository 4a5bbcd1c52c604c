"""Low-precision serving: int8 / bf16 copies against the float32 reference, and the gate."""

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from flywheel.kernels.quantize import (
    BF16Linear,
    precision_accuracies,
    precision_delta,
    to_precision,
)
from flywheel.learner.gate import Holdout, evaluate_gate
from flywheel.modelspec import ModelSpec, build_model
from flywheel.service import (
    EventLog,
    ModelHolder,
    ServedModel,
    ServiceConfig,
    Spool,
    create_app,
)
from flywheel.settings import Settings

SPEC = ModelSpec(input_dim=6, hidden=[32, 32], labels=["a", "b", "c"])


def trained(seed: int = 0, n: int = 600):
    """A small model that has learned a linear 3-class rule, and held-out rows of it."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, 3))
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x @ w).argmax(1)
    torch.manual_seed(seed)
    module = build_model(SPEC)
    module[0].fit(torch.from_numpy(x[:400]))
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[:400]), torch.from_numpy(y[:400])
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(xt), yt).backward()
        opt.step()
    return module.eval(), x[400:], y[400:]


@pytest.mark.parametrize("precision,tol", [("int8", 0.02), ("bf16", 0.01)])
def test_low_precision_copy_is_close_to_float32_and_leaves_the_original(precision, tol):
    module, x, _ = trained()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    low = to_precision(module, precision)
    assert low is not module
    with torch.inference_mode():
        ref = torch.softmax(module(torch.from_numpy(x)), 1)
        out = torch.softmax(low(torch.from_numpy(x)), 1)
    assert out.dtype == torch.float32
    assert (out - ref).abs().mean() < tol  # probabilities, on average over rows and classes
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.97
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    kinds = {type(m).__name__ for m in low.modules()}
    assert ("BF16Linear" in kinds) == (precision == "bf16")
    assert ("Linear" not in kinds) or precision == "int8"  # every float Linear replaced
    assert to_precision(module, "fp32") is module


def test_precision_delta_is_low_minus_full_accuracy():
    module, x, y = trained()
    full, low = precision_accuracies(module, x, y, "int8")
    assert full > 0.8 and abs(low - full) < 0.05
    assert precision_delta(module, x, y, "int8") == pytest.approx(low - full)
    assert precision_delta(module, x, y, "fp32") == 0.0
    with pytest.raises(ValueError, match="precision"):
        to_precision(module, "fp16")


def test_bf16_linear_matches_a_bfloat16_reference():
    lin = torch.nn.Linear(5, 4)
    x = torch.randn(7, 5)
    ref = torch.nn.functional.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16())
    assert torch.equal(BF16Linear(lin)(x), ref.float())


def test_gate_records_the_quantized_accuracy_delta_only_when_asked():
    cand, x, y = trained(0)
    champ, _, _ = trained(1)
    trusted, recent = Holdout(x, y), Holdout(x[:100], y[:100])
    plain = evaluate_gate(
        cand, champ, trusted=trusted, recent=recent, tolerance=0.02, min_recent=10
    )
    assert plain.quant_accuracy_delta is None
    assert "gate_quant_accuracy_delta" not in plain.metrics()
    assert "fp32" not in plain.summary()
    q = evaluate_gate(
        cand,
        champ,
        trusted=trusted,
        recent=recent,
        tolerance=0.02,
        min_recent=10,
        serve_precision="int8",
    )
    assert q.passed == plain.passed and q.reason == plain.reason  # reported, never decides
    assert q.quant_precision == "int8"
    assert q.quant_accuracy_delta == pytest.approx(precision_delta(cand, x, y, "int8"))
    assert q.metrics()["gate_quant_accuracy_delta"] == pytest.approx(q.quant_accuracy_delta)
    assert "int8 vs fp32" in q.summary()
    short = evaluate_gate(
        cand,
        champ,
        trusted=trusted,
        recent=Holdout(x[:3], y[:3]),
        tolerance=0.02,
        min_recent=10,
        serve_precision="bf16",
    )
    assert not short.passed and short.quant_precision == "bf16"


class NullSink:
    def send(self, records, timeout_s):
        return [True] * len(records)

    def close(self):
        pass


@pytest.mark.parametrize("precision", ["fp32", "int8", "bf16"])
def test_served_model_info_names_its_precision(tmp_path, precision, app_key):
    module, x, _ = trained()
    served = ServedModel.prepare("m", "3", SPEC, module, precision)
    assert served.precision == precision
    np.testing.assert_allclose(
        served.predict_proba(x[:5]),
        torch.softmax(module(torch.from_numpy(x[:5])), 1).detach(),
        atol=0.1,
    )
    holder = ModelHolder()
    holder.swap(served)
    log = EventLog(lambda: NullSink(), Spool(tmp_path / "spool", fsync=False))
    app = create_app(ServiceConfig.of(Settings(home=tmp_path)), holder=holder, event_log=log)
    with TestClient(app, headers=app_key.headers) as client:
        info = client.get("/v1/model").json()
        assert (info["precision"], info["kind"]) == (precision, "mlp")
        r = client.post("/v1/predict", json={"instances": x[:2].tolist()})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2


def test_settings_refuse_an_unknown_precision():
    with pytest.raises(ValueError):
        Settings(serve_precision="fp16")
