"""Adaptive compute: building and calibrating a cascade (`flywheel.modelspec.CascadeSpec`).

A cascade answers a row with its light network when the light network's top
probability is at least `threshold`, and escalates the row to its heavy network
otherwise. `calibrate_threshold` picks the smallest threshold at which the cascade's
accuracy on a calibration holdout is at least `target` (e.g. 0.995) times the heavy
network's accuracy there (with a margin of `z` standard errors), and stays so at every
higher threshold (accuracy is not monotone in the threshold: a lucky dip of the holdout
must not pick it). `build_cascade` trains both networks and calibrates; the numbers the
threshold came from are kept in `CascadeSpec.calibration`.

    from flywheel.kernels.cascade import build_cascade
    spec, module, report = build_cascade(x_train, y_train, x_cal, y_cal, labels=labels,
                                         light=[16], heavy=[256, 256], target=0.995)
    save_model(folder, spec, module)  # or Registry.publish(spec, module, ...)

The online learner trains plain MLP specs only; a cascade is built offline like this and
registered (see docs/serving.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from flywheel.features import FeatureSchema
from flywheel.modelspec import (
    ALWAYS_HEAVY,
    Cascade,
    CascadeSpec,
    ModelSpec,
    build_sequential,
    fit_input_scaling,
)


def mlp_flops(spec: ModelSpec) -> int:
    """Floating-point operations of one row through an MLP's linear layers (2 per
    multiply-add; feature scaling, biases and activations are negligible and left out)."""
    widths = [spec.input_dim, *spec.hidden, len(spec.labels)]
    return sum(2 * a * b for a, b in zip(widths, widths[1:], strict=False))


@dataclass(frozen=True)
class Calibration:
    threshold: float
    target: float  # share of the heavy network's accuracy the cascade must keep
    z: float  # safety margin, in standard errors
    n: int
    light_accuracy: float
    heavy_accuracy: float
    cascade_accuracy: float
    light_share: float  # rows the light network answers at this threshold
    met: bool  # False: even escalating everything misses the target (threshold ALWAYS_HEAVY)

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def light_confidence(module: Cascade, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top probability, predicted class) of the light network, exactly as `Cascade.route`
    computes the confidence."""
    with torch.inference_mode():
        logits = module.light(torch.from_numpy(np.asarray(x, np.float32)))
        conf = torch.softmax(logits.float(), dim=1).amax(dim=1)
    return conf.numpy(), logits.argmax(dim=1).numpy()


def calibrate_threshold(
    confidence: np.ndarray,
    light_correct: np.ndarray,
    heavy_correct: np.ndarray,
    target: float = 0.995,
    z: float = 2.0,
) -> Calibration:
    """The smallest threshold t (a light confidence seen on the holdout, or ALWAYS_HEAVY)
    at which light-on-(conf >= t) plus heavy-on-the-rest is at least `target` x the heavy
    network's accuracy, and is at every higher threshold too. Ties in confidence move
    together, as they would when served.

    `z` is a safety margin against the holdout's sampling noise: the cascade must beat
    the target by `z` standard errors of its paired difference from the heavy network
    (sqrt of the rows where exactly one of the two is right, among those the light
    network answers); 0 is the bare rule."""
    conf = np.asarray(confidence, np.float32)
    light_ok = np.asarray(light_correct, bool)
    heavy_ok = np.asarray(heavy_correct, bool)
    n = len(conf)
    if n == 0 or not (0 < target <= 1.5):
        raise ValueError("need a non-empty holdout and 0 < target <= 1.5")
    order = np.argsort(conf, kind="stable")
    c, lo, ho = conf[order], light_ok[order], heavy_ok[order]
    # threshold c[k] (first index of its tie group): heavy answers rows [0, k), light [k, n)
    heavy_prefix = np.concatenate([[0], np.cumsum(ho)])
    light_suffix = np.concatenate([np.cumsum(lo[::-1])[::-1], [0]])
    differ_suffix = np.concatenate([np.cumsum((lo != ho)[::-1])[::-1], [0]])
    starts = np.flatnonzero(np.concatenate([[True], c[1:] != c[:-1]]))
    correct = heavy_prefix[starts] + light_suffix[starts]
    heavy_acc, light_acc = ho.mean(), lo.mean()
    margin = z * np.sqrt(differ_suffix[starts])
    ok = correct >= target * heavy_acc * n + margin - 1e-9
    failing = np.flatnonzero(~ok)
    first = 0 if len(failing) == 0 else int(failing[-1]) + 1  # ok from here on
    if first < len(starts):
        k = int(starts[first])
        threshold, cascade_correct, share, met = (
            float(c[k]),
            heavy_prefix[k] + light_suffix[k],
            (n - k) / n,
            True,
        )
    else:
        threshold, cascade_correct, share, met = ALWAYS_HEAVY, heavy_prefix[n], 0.0, False
    return Calibration(
        threshold,
        target,
        z,
        n,
        float(light_acc),
        float(heavy_acc),
        float(cascade_correct / n),
        float(share),
        met,
    )


def train_mlp(
    spec: ModelSpec,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 40,
    lr: float = 1e-2,
    batch: int = 256,
    seed: int = 7,
) -> nn.Sequential:
    """Fit the input scaling on the training rows, then Adam on cross-entropy (as the
    seed model)."""
    torch.manual_seed(seed)
    module = build_sequential(spec)
    xt = torch.from_numpy(np.asarray(x, np.float32))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    fit_input_scaling(module, xt)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    module.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(batch):
            opt.zero_grad()
            loss_fn(module(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    return module.eval()


def assemble(spec: CascadeSpec, light: nn.Module, heavy: nn.Module) -> Cascade:
    """A `Cascade` module holding trained light and heavy MLPs."""
    module = Cascade(spec)
    module.light.load_state_dict(light.state_dict())
    module.heavy.load_state_dict(heavy.state_dict())
    return module.eval()


def calibrate(
    spec: CascadeSpec,
    module: Cascade,
    x_cal: np.ndarray,
    y_cal: np.ndarray,
    target: float = 0.995,
    z: float = 2.0,
) -> tuple[CascadeSpec, Cascade, Calibration]:
    """Set the threshold of an assembled cascade from a calibration holdout."""
    y = np.asarray(y_cal)
    conf, light_pred = light_confidence(module, x_cal)
    with torch.inference_mode():
        heavy_pred = module.heavy(torch.from_numpy(np.asarray(x_cal, np.float32))).argmax(1)
    cal = calibrate_threshold(conf, light_pred == y, heavy_pred.numpy() == y, target, z)
    spec = spec.model_copy(update={"threshold": cal.threshold, "calibration": cal.as_dict()})
    spec = CascadeSpec.model_validate(spec.model_dump())  # re-validated, as loading would
    module.threshold = spec.threshold
    return spec, module, cal


def build_cascade(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_cal: np.ndarray,
    y_cal: np.ndarray,
    *,
    labels: Sequence[str],
    light: Sequence[int] = (16,),
    heavy: Sequence[int] = (256, 256),
    activation: str = "relu",
    target: float = 0.995,
    z: float = 2.0,
    epochs: int = 40,
    seed: int = 7,
    schema: FeatureSchema | None = None,
) -> tuple[CascadeSpec, Cascade, Calibration]:
    """Train the light and heavy MLPs on the training rows, then calibrate the threshold
    on the calibration rows (never trained on). Labels are class indices into `labels`;
    `schema` (the rows' feature schema) makes both networks encode named features."""
    x_train = np.asarray(x_train, np.float32)
    spec = CascadeSpec(
        input_dim=x_train.shape[1],
        labels=list(labels),
        light=list(light),
        heavy=list(heavy),
        activation=activation,  # type: ignore[arg-type]
        schema=schema,
    )
    light_net = train_mlp(spec.part("light"), x_train, y_train, epochs=epochs, seed=seed)
    heavy_net = train_mlp(spec.part("heavy"), x_train, y_train, epochs=epochs, seed=seed)
    return calibrate(spec, assemble(spec, light_net, heavy_net), x_cal, y_cal, target, z)


def cascade_flops(spec: CascadeSpec, light_share: float) -> dict[str, float]:
    """Expected FLOPs per row of the cascade (light always, heavy for escalated rows)
    against the heavy network alone; `saved` is the share of heavy FLOPs not spent."""
    light_f, heavy_f = mlp_flops(spec.part("light")), mlp_flops(spec.part("heavy"))
    per_row = light_f + (1.0 - light_share) * heavy_f
    return {
        "light": float(light_f),
        "heavy": float(heavy_f),
        "cascade": per_row,
        "saved": 1.0 - per_row / heavy_f,
    }
