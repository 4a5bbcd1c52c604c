"""What the client returns and takes: frozen dataclasses, parsed from the service's JSON.

A response that does not have the documented shape raises `FlywheelError` naming the
field, instead of a `KeyError` somewhere in the caller's code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from flywheel.client.errors import FlywheelError


@dataclass(frozen=True)
class ModelRef:
    """The model version that answered.

    >>> ModelRef("flywheel", "3")
    ModelRef(name='flywheel', version='3')
    """

    name: str
    version: str


@dataclass(frozen=True)
class Prediction:
    """One instance's answer. `id` is what a correction refers to; `model` is the version
    that answered it (a long input is sent in several requests, and the service may swap
    versions between two of them).

    >>> p = Prediction("9f1c", "cat", {"cat": 0.75, "dog": 0.25}, ModelRef("flywheel", "3"))
    >>> p.label, p.confidence
    ('cat', 0.75)
    """

    id: str
    label: str
    probabilities: Mapping[str, float]
    model: ModelRef

    @property
    def confidence(self) -> float:
        """The probability of the predicted label."""
        return self.probabilities[self.label]


@dataclass(frozen=True)
class PredictResult:
    """The answers, one per instance, in the order the instances were given.

    `model` is the version that answered the last request; when the service swapped
    versions during a long input, `versions` names each one that answered.

    >>> m = ModelRef("flywheel", "3")
    >>> r = PredictResult(m, [Prediction("a", "cat", {"cat": 1.0}, m)])
    >>> r.labels, r.ids, len(r)
    (['cat'], ['a'], 1)
    """

    model: ModelRef
    predictions: list[Prediction] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.predictions)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.predictions]

    @property
    def labels(self) -> list[str]:
        return [p.label for p in self.predictions]

    @property
    def versions(self) -> list[ModelRef]:
        """Every version that answered, in order of first use."""
        return list(dict.fromkeys(p.model for p in self.predictions))


@dataclass(frozen=True)
class ModelInfo:
    """`GET /v1/model`: the served version, its input width, labels and precision.

    `raw` keeps the whole answer, so fields a newer service adds are still readable.
    """

    name: str
    version: str
    loaded_at: datetime
    input_dim: int
    labels: tuple[str, ...]
    kind: str = "mlp"
    precision: str = "fp32"
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.version)


@dataclass(frozen=True)
class Correction:
    """The true label for an earlier prediction.

    `source` names the app or site that saw the truth (per-source limits and poisoning
    defence). Once the service checks app keys, it sets the source from the key and this
    field is only for direct Kafka producers.

    `subject` names the end user the label is about: the privacy unit (one privacy budget
    per subject, across apps). The service keeps only its keyed hash; without one, each
    prediction is its own unit.

    >>> Correction("9f1c", "dog")
    Correction(prediction_id='9f1c', label='dog', source=None, subject=None)
    """

    prediction_id: str
    label: str
    source: str | None = None
    subject: str | None = None


def _field(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise FlywheelError(f"unexpected response from {where}: {name!r} is {value!r}")
    return value


def _object(doc: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        raise FlywheelError(f"unexpected response from {where}: not a JSON object")
    return doc


def parse_predictions(doc: Any, expected: int) -> tuple[ModelRef, list[Prediction]]:
    """The model and predictions of one `POST /v1/predict` answer for `expected` rows."""
    where = "POST /v1/predict"
    doc = _object(doc, where)
    m = _object(doc.get("model"), where)
    model = ModelRef(str(_field(m, "name", str, where)), str(_field(m, "version", str, where)))
    items = _field(doc, "predictions", list, where)
    if len(items) != expected:
        raise FlywheelError(
            f"unexpected response from {where}: {len(items)} predictions for {expected} instances"
        )
    out = []
    for item in items:
        item = _object(item, where)
        probs = _field(item, "probabilities", dict, where)
        out.append(
            Prediction(
                id=_field(item, "id", str, where),
                label=_field(item, "label", str, where),
                probabilities={str(k): float(v) for k, v in probs.items()},
                model=model,
            )
        )
    return model, out


def parse_model_info(doc: Any) -> ModelInfo:
    where = "GET /v1/model"
    doc = _object(doc, where)
    loaded = _field(doc, "loaded_at", str, where)
    try:
        loaded_at = datetime.fromisoformat(loaded)
    except ValueError:
        raise FlywheelError(f"unexpected response from {where}: loaded_at {loaded!r}") from None
    return ModelInfo(
        name=_field(doc, "name", str, where),
        version=_field(doc, "version", str, where),
        loaded_at=loaded_at,
        input_dim=_field(doc, "input_dim", int, where),
        labels=tuple(str(x) for x in _field(doc, "labels", list, where)),
        kind=str(doc.get("kind", "mlp")),
        precision=str(doc.get("precision", "fp32")),
        raw=dict(doc),
    )


def parse_accepted(doc: Any) -> int:
    where = "POST /v1/corrections"
    return int(_field(_object(doc, where), "accepted", int, where))
