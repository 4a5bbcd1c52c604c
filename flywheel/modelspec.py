"""Model specs: an architecture described as data, so a version loads without pickles.

Three kinds: `ModelSpec` (`kind: "mlp"`, what the learner trains: logistic regression
when `hidden` is empty, an MLP, or an embedding + MLP when `embedding_dim` is set and the
schema has categorical features), `CascadeSpec` (`kind: "cascade"`: a light and a heavy
MLP, see docs/serving.md) and `FactorySpec` (`kind: "factory"`: a network built by a
function in an installed package the deployment trusts). `parse_spec` and `build_module`
take any of them; `parse_model_arg` reads the `--model` text of `flywheel init`.

A spec may carry the lineage's `FeatureSchema`: then layer 0 is `Encode` (scaling, fill,
one-hot or embeddings, all inside the model), else the historical `Standardize` over a
plain float vector.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from flywheel.features import UNKNOWN, FeatureSchema

# `schema` is stored under its alias: the attribute is `schema_` because BaseModel has a
# (deprecated) `schema` method of its own, which the property below stands in for
_CONFIG = ConfigDict(
    extra="forbid",
    frozen=True,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
)
_OPTIONAL = {"schema": None, "dropout": 0.0, "embedding_dim": 0, "linear_head": False}


def spec_doc(spec: AnySpec) -> dict[str, Any]:
    """The JSON form of a spec; fields at their defaults that older readers do not know
    (schema, dropout, embedding_dim, linear_head) are left out, so a plain MLP is written as before.

    >>> spec_doc(ModelSpec(input_dim=2, labels=["a", "b"]))
    {'kind': 'mlp', 'input_dim': 2, 'hidden': [64, 64], 'labels': ['a', 'b'], 'activation': 'relu'}
    """
    doc = spec.model_dump(mode="json")
    for key, default in _OPTIONAL.items():
        if key in doc and doc[key] == default:
            del doc[key]
    return doc


def _check_schema(spec: ModelSpec | CascadeSpec | FactorySpec) -> None:
    if len(set(spec.labels)) != len(spec.labels):
        raise ValueError(f"labels must be unique, got {spec.labels}")
    if spec.schema is None:
        return
    if spec.input_dim != spec.schema.input_dim:
        raise ValueError(
            f"input_dim {spec.input_dim} does not match the schema's {spec.schema.input_dim} inputs"
        )
    if spec.labels != spec.schema.labels:
        raise ValueError(f"labels {spec.labels} differ from the schema's {spec.schema.labels}")


class _Spec(BaseModel):
    """What every kind of spec offers: its schema and the index of each label."""

    model_config = _CONFIG
    if TYPE_CHECKING:  # fields of each kind, declared there (pydantic keeps their order)
        schema_: FeatureSchema | None
        labels: list[str]

    @property
    def schema(self) -> FeatureSchema | None:  # type: ignore[override]
        return self.schema_

    def label_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}


class ModelSpec(_Spec):
    """A feed-forward classifier over the raw input vector, with a named label set.

    `hidden` empty is logistic regression; `embedding_dim` > 0 embeds each categorical
    feature of the schema (else they are one-hot); `dropout` follows each hidden layer;
    `linear_head` adds a logistic regression beside the MLP, the two weighted by their
    prequential errors (`Blend`).

    >>> spec = ModelSpec(input_dim=8, hidden=[], labels=["a", "b"])
    >>> spec.family, build_model(spec)(torch.zeros(2, 8)).shape
    ('logistic', torch.Size([2, 2]))
    """

    model_config = _CONFIG

    kind: Literal["mlp"] = "mlp"
    input_dim: int = Field(ge=1, le=100_000)
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    labels: list[str] = Field(min_length=2)
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    embedding_dim: int = Field(default=0, ge=0, le=1024)
    linear_head: bool = False
    schema_: FeatureSchema | None = Field(default=None, alias="schema")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        _check_schema(self)
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {self.hidden}")
        if self.embedding_dim and (self.schema is None or not self.schema.categorical):
            raise ValueError("embedding_dim needs a schema with categorical features")
        if self.linear_head and not self.hidden:
            raise ValueError("linear_head needs hidden layers (logistic is linear already)")
        return self

    @property
    def family(self) -> str:
        """logistic, mlp or embed_mlp: what `--model` named."""
        if self.embedding_dim:
            return "embed_mlp"
        return "mlp" if self.hidden else "logistic"


class Standardize(nn.Module):
    """Feature scaling that travels with the weights (buffers are in the state_dict)."""

    mean: torch.Tensor  # registered buffers: typed here because nn.Module.__getattr__ is not
    scale: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def fit(self, x: torch.Tensor) -> None:
        self.mean.copy_(x.mean(dim=0))
        self.scale.copy_(x.std(dim=0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class Encode(nn.Module):
    """The schema's encoding inside the model: numeric inputs scaled by the schema's mean
    and std (`fit` re-estimates them), booleans as 0/1, each categorical code one-hot
    (`embedding_dim` 0) or embedded. A code outside the vocabulary (from interpolation or
    a bad client) reads as the unknown bucket.

    >>> from flywheel.features import Feature, FeatureSchema
    >>> schema = FeatureSchema(label="y", labels=["a", "b"], features=[
    ...     Feature(name="amount", kind="numeric", mean=10.0, std=2.0),
    ...     Feature(name="country", kind="categorical", vocabulary=["DE", "FR"])])
    >>> Encode(schema)(torch.tensor([[12.0, 2.0], [10.0, 7.0]])).tolist()
    [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
    """

    mean: torch.Tensor
    scale: torch.Tensor
    dense: torch.Tensor
    codes: torch.Tensor
    sizes: torch.Tensor
    offsets: torch.Tensor

    def __init__(self, schema: FeatureSchema, embedding_dim: int = 0) -> None:
        super().__init__()
        inputs = schema.inputs
        dense = [i for i, f in enumerate(inputs) if f.kind != "categorical"]
        cats = schema.categorical
        numeric = [f.kind == "numeric" for f in inputs]
        self.register_buffer("dense", torch.tensor(dense, dtype=torch.long))
        self.register_buffer("codes", torch.tensor(cats, dtype=torch.long))
        self.register_buffer(
            "mean", torch.tensor([inputs[i].mean if numeric[i] else 0.0 for i in dense])
        )
        self.register_buffer(
            "scale", torch.tensor([inputs[i].std if numeric[i] else 1.0 for i in dense])
        )
        self._numeric = torch.tensor([numeric[i] for i in dense], dtype=torch.bool)
        sizes = [len(inputs[i].vocabulary) + 1 for i in cats]  # + the unknown bucket
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.long))
        self.register_buffer(
            "offsets", torch.tensor([sum(sizes[:k]) for k in range(len(sizes))], dtype=torch.long)
        )
        self.embedding_dim = embedding_dim
        # one table for every categorical feature, each in its own rows (`offsets`): one
        # lookup per batch instead of one per feature (a 4-feature row: ~3x faster)
        self.embedding = (
            nn.Embedding(sum(sizes), embedding_dim) if embedding_dim and sizes else None
        )
        self.one_hot_width = sum(sizes)
        self.out_dim = len(dense) + (embedding_dim * len(sizes) if embedding_dim else sum(sizes))

    def fit(self, x: torch.Tensor) -> None:
        """Re-estimate the numeric scaling on raw rows (booleans stay 0/1)."""
        cols = x[:, self.dense]
        mean = torch.where(self._numeric, cols.mean(dim=0), torch.zeros(()))
        std = torch.where(self._numeric, cols.std(dim=0).clamp_min(1e-6), torch.ones(()))
        self.mean.copy_(mean)
        self.scale.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = (x.index_select(1, self.dense) - self.mean) / self.scale
        if not len(self.codes):
            return dense
        codes = x.index_select(1, self.codes).round().long()
        codes = torch.where((codes < 0) | (codes >= self.sizes), UNKNOWN, codes) + self.offsets
        if self.embedding is not None:
            coded = self.embedding(codes).flatten(1)
        else:
            coded = x.new_zeros(len(x), self.one_hot_width).scatter_(1, codes, 1.0)
        return torch.cat((dense, coded), dim=1)


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def input_layer(
    input_dim: int, schema: FeatureSchema | None, embedding_dim: int = 0
) -> tuple[nn.Module, int]:
    """(layer 0, its output width): `Encode` for a schema, else `Standardize`."""
    if schema is None:
        return Standardize(input_dim), input_dim
    encode = Encode(schema, embedding_dim)
    return encode, encode.out_dim


def build_model(spec: ModelSpec) -> nn.Module:
    """A fresh module for `spec`: an `nn.Sequential` whose layer 0 is the input step
    (`Standardize` or `Encode`, with `fit(x)` for the input scaling), or a `Blend` of one
    and a logistic regression when `spec.linear_head`."""
    if spec.linear_head:
        return Blend(spec)
    return build_sequential(spec)


def build_sequential(spec: ModelSpec) -> nn.Sequential:
    """The plain network of `spec` (`linear_head` ignored): input step, hidden layers,
    output layer."""
    first, width = input_layer(spec.input_dim, spec.schema, spec.embedding_dim)
    layers: list[nn.Module] = [first]
    for h in spec.hidden:
        layers += [nn.Linear(width, h), _ACTIVATIONS[spec.activation]()]
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        width = h
    layers.append(nn.Linear(width, len(spec.labels)))
    return nn.Sequential(*layers)


# Hedge's rate: a head's mixture weight is proportional to exp(-HEDGE_RATE * its mistakes).
# Why a quarter, not 1: on small sets the two heads are often within a few mistakes of
# each other, and there the average of the two beats either (an ensemble), while a rate
# of 1 gave a 3-mistake lead 95 % of the weight. `bench prequential --datasets`, ours
# alone, seeds 1-20 (2026-12-08): phishing 90.72 -> 91.00 % (paired +0.28; rate 0.5:
# 90.88), the other sets within 0.02 (solar_flare 81.29 -> 81.28, penguins 98.89 ->
# 98.91, image_segments 94.89 -> 94.88).
HEDGE_RATE = 0.25
# Serving skips a head this many mistakes behind: its weight is then at most
# e^(-14 HEDGE_RATE) = 3 %, too little to move an argmax but where the kept head's two
# best classes are within a few percent. Kept at 14 mistakes (not 56, where the weight
# would be under 1e-6) so a blend settles, and costs one network, as early as before:
# seeds 1-20 give the same accuracy either way (to 0.01 point on each set above).
SKIP_ERRORS = 14.0


class Blend(nn.Module):
    """The spec's MLP and a logistic regression over the same raw inputs (its own input
    step, categorical features one-hot), mixed by their prequential errors: the served
    probabilities are `w * p_mlp + (1 - w) * p_linear` with
    `w = softmax(-HEDGE_RATE * errors)[0]` (Hedge, a quarter of a unit per mistake), where
    `errors` counts each head's mistakes on rows it had not been trained on yet (`score`,
    which `OnlineTrainer.update` calls on every new batch, and `flywheel init` on its
    holdout). Each head trains on its own loss
    (`training_losses`), so the head that is behind keeps learning. A DP update trains
    and serves the favoured head alone (`commit`).

    Why: on small, noisy data an MLP fits noise a linear model does not (solar_flare,
    `bench prequential --datasets`, seeds 1-3 and 7-9: MLP 80.34 %, logistic one-hot
    81.40 %, this blend 81.24 %), while elsewhere the MLP is far ahead (penguins 98.97 vs
    87.32, image_segments 94.63 vs 88.53) and the blend follows it (98.97, 94.69); the
    choice is made on unseen rows, as river's model selection makes it.

    >>> from flywheel.features import Feature, FeatureSchema
    >>> schema = FeatureSchema(label="y", labels=["a", "b"], features=[
    ...     Feature(name="x", kind="numeric")])
    >>> blend = Blend(ModelSpec(input_dim=1, hidden=[4], labels=["a", "b"], schema=schema,
    ...                         linear_head=True))
    >>> blend(torch.zeros(3, 1)).exp().sum(1).allclose(torch.ones(3))
    True
    """

    errors: torch.Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.mlp = build_sequential(spec)
        self.linear = build_sequential(
            spec.model_copy(update={"hidden": [], "embedding_dim": 0, "dropout": 0.0})
        )
        self.register_buffer("errors", torch.zeros(2))

    def fit(self, x: torch.Tensor) -> None:
        """Fit both input steps' scaling on raw rows."""
        fit_input_scaling(self.mlp, x)
        fit_input_scaling(self.linear, x)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(2, rows, classes) log-probabilities: the MLP's, then the linear head's."""
        return torch.stack((self.mlp(x).log_softmax(1), self.linear(x).log_softmax(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the mixture (valid logits: softmax gives the mixture).

        Serving skips a head `SKIP_ERRORS` mistakes behind (weight at most 3 %, see
        `SKIP_ERRORS`): a settled blend costs one network, not two (a one-row
        forward, 8 numeric + 4 categorical features: ~2.6x the plain MLP's with both
        heads, under load)."""
        if not self.training:
            gap = float(self.errors[0] - self.errors[1])
            if gap <= -SKIP_ERRORS:
                return self.mlp(x).log_softmax(1)
            if gap >= SKIP_ERRORS:
                return self.linear(x).log_softmax(1)
        log_w = (-HEDGE_RATE * self.errors).log_softmax(0).to(x.dtype)
        return torch.logsumexp(self.heads(x) + log_w[:, None, None], 0)

    def training_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per row, the sum of both heads' cross-entropies."""
        nll = -self.heads(x).gather(2, y[None, :, None].expand(2, -1, 1)).squeeze(2)
        return nll.sum(0)

    def score(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Count each head's mistakes on rows neither was trained on yet."""
        with torch.no_grad():
            wrong = self.heads(x).argmax(2) != y[None]
            self.errors.add_(wrong.sum(1).to(self.errors.dtype))

    def favoured(self) -> nn.Sequential:
        """The head with fewer mistakes so far (the MLP on a tie); `errors` is not changed.

        For federated DP training (`learner/federated/local.py`), which trains this head
        alone but cannot commit: the site's update is the difference of the whole state,
        `errors` included, so committing there would put a jump of `SKIP_ERRORS` into the
        update the site clips and the server averages."""
        return self.linear if bool(self.errors[1] < self.errors[0]) else self.mlp

    def commit(self) -> nn.Sequential:
        """Settle on the head with fewer mistakes (the MLP on a tie) and return it: the
        other is put `SKIP_ERRORS` mistakes behind, so the blend serves this head alone.

        For DP updates (`OnlineTrainer.update_private`), which train the returned head
        only: all of the clip budget and none of the noise goes to a head that is not
        served, and the mixture never needs the private labels (which DP updates do not
        score). The choice reads only `errors`, counted before (init's trusted holdout,
        non-private updates): post-processing, no privacy cost. Measured on
        tests/integration/test_demo.py (DP on, the blend the default, load 3-6): without
        it 3 of 6 runs failed, each after a background line, whose weights start at 50/50,
        replaced the line and stayed half its weak linear head (trusted 0.60 against the
        champion's 0.96); with it 6 of 6 passed.

        >>> from flywheel.features import Feature, FeatureSchema
        >>> schema = FeatureSchema(label="y", labels=["a", "b"], features=[
        ...     Feature(name="x", kind="numeric")])
        >>> blend = Blend(ModelSpec(input_dim=1, hidden=[4], labels=["a", "b"],
        ...                         schema=schema, linear_head=True))
        >>> _ = blend.errors.copy_(torch.tensor([5.0, 3.0]))
        >>> blend.commit() is blend.linear, blend.errors.tolist()
        (True, [17.0, 3.0])
        """
        keep = int(self.favoured() is self.linear)
        with torch.no_grad():
            floor = self.errors[keep] + SKIP_ERRORS
            self.errors[1 - keep] = torch.maximum(self.errors[1 - keep], floor)
        return self.linear if keep else self.mlp


def training_losses(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row training loss: cross-entropy of the output, or for a `Blend` the sum of its
    heads' own (each head learns on its own, whatever the mixture weights)."""
    if isinstance(module, Blend):
        return module.training_losses(x, y)
    return nn.functional.cross_entropy(module(x), y, reduction="none")


def fit_input_scaling(module: nn.Module, x: torch.Tensor) -> None:
    """Fit layer 0's scaling (`Standardize` or `Encode`) on raw training rows (both input
    steps of a `Blend`)."""
    if isinstance(module, Blend):
        module.fit(x)
        return
    first = module[0] if isinstance(module, nn.Sequential) else None
    if not isinstance(first, (Standardize, Encode)):
        raise TypeError(f"{type(module).__name__} does not start with an input step")
    first.fit(x)


ALWAYS_HEAVY = 2.0  # a cascade threshold above 1: no row is ever answered by the light net


class CascadeSpec(_Spec):
    """Adaptive compute: a light MLP answers a row when its top probability is at least
    `threshold`; every other row escalates to the heavy MLP.

    `threshold` 0 answers everything with the light net, anything above 1 (`ALWAYS_HEAVY`)
    sends everything to the heavy one. `calibration` keeps the numbers the threshold was
    chosen from (holdout accuracies, light share), for reviewers.
    """

    model_config = _CONFIG

    kind: Literal["cascade"] = "cascade"
    input_dim: int = Field(ge=1, le=100_000)
    labels: list[str] = Field(min_length=2)
    light: list[int] = Field(default_factory=lambda: [16])
    heavy: list[int] = Field(default_factory=lambda: [256, 256])
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    threshold: float = Field(default=ALWAYS_HEAVY, ge=0.0, le=ALWAYS_HEAVY)
    calibration: dict[str, float] = Field(default_factory=dict)
    schema_: FeatureSchema | None = Field(default=None, alias="schema")

    @model_validator(mode="after")
    def _check(self) -> CascadeSpec:
        _check_schema(self)
        for which in ("light", "heavy"):
            self.part(which)  # raises as a plain MLP spec would
        return self

    @property
    def family(self) -> str:
        return "cascade"

    def part(self, which: Literal["light", "heavy"]) -> ModelSpec:
        """The plain MLP spec of one of the two networks."""
        return ModelSpec(
            input_dim=self.input_dim,
            labels=self.labels,
            hidden=self.light if which == "light" else self.heavy,
            activation=self.activation,
            schema=self.schema,
        )


class FactorySpec(_Spec):
    """A network from a factory in an installed package: `factory` is "module:function",
    called as `function(in_features, n_classes, **options)` and returning an
    `nn.Module` over the encoded input; layer 0 (`Encode`/`Standardize`) stays ours, so
    the schema still travels with the model. Weights stay tensors-only; the code is the
    package's, imported only when its module is in the deployment's trusted list
    (`FLYWHEEL_MODEL_FACTORIES`), as TorchServe handlers are.

    >>> FactorySpec(factory="mypkg.models:build", input_dim=4, labels=["a", "b"]).family
    'factory'
    """

    model_config = _CONFIG

    kind: Literal["factory"] = "factory"
    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    options: dict[str, Any] = Field(default_factory=dict)
    input_dim: int = Field(ge=1, le=100_000)
    labels: list[str] = Field(min_length=2)
    embedding_dim: int = Field(default=0, ge=0, le=1024)
    schema_: FeatureSchema | None = Field(default=None, alias="schema")

    @model_validator(mode="after")
    def _check(self) -> FactorySpec:
        _check_schema(self)
        json.dumps(self.options)  # JSON only: it is written into spec.json
        return self

    @property
    def family(self) -> str:
        return "factory"


class FactoryError(ValueError):
    """A factory that is not trusted, not installed, or does not build a module."""


def build_factory(spec: FactorySpec, trusted: Collection[str]) -> nn.Sequential:
    """Layer 0 plus the factory's network; refuses a module outside `trusted` (module
    names or prefixes, e.g. "mypkg" trusts "mypkg.models")."""
    module_name, _, func = spec.factory.partition(":")
    if not any(module_name == t or module_name.startswith(t + ".") for t in trusted):
        raise FactoryError(
            f"model factory {spec.factory!r} is not trusted: add {module_name.split('.')[0]!r} "
            "to FLYWHEEL_MODEL_FACTORIES to let this deployment import it"
        )
    try:
        fn = getattr(importlib.import_module(module_name), func)
    except (ImportError, AttributeError) as exc:
        raise FactoryError(f"model factory {spec.factory!r} cannot be loaded: {exc}") from exc
    first, width = input_layer(spec.input_dim, spec.schema, spec.embedding_dim)
    net = fn(width, len(spec.labels), **spec.options)
    if not isinstance(net, nn.Module):
        raise FactoryError(f"model factory {spec.factory!r} returned {type(net).__name__}")
    return nn.Sequential(first, net)


AnySpec = ModelSpec | CascadeSpec | FactorySpec


class Cascade(nn.Module):
    """The light and heavy networks of a `CascadeSpec`; `forward` returns the logits of
    whichever network answered each row, and computes the heavy net only for the rows
    that escalate."""

    def __init__(self, spec: CascadeSpec) -> None:
        super().__init__()
        self.light = build_model(spec.part("light"))
        self.heavy = build_model(spec.part("heavy"))
        self.threshold = float(spec.threshold)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, escalated): `escalated[i]` is True where the heavy net answered row i."""
        logits = self.light(x)
        escalated = torch.softmax(logits.float(), dim=1).amax(dim=1) < self.threshold
        rows = escalated.nonzero().squeeze(1)
        if rows.numel():
            heavy = self.heavy(x.index_select(0, rows)).to(logits.dtype)
            logits = logits.index_copy(0, rows, heavy)
        return logits, escalated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(x)[0]


_KINDS: dict[str, type[ModelSpec] | type[CascadeSpec] | type[FactorySpec]] = {
    "mlp": ModelSpec,
    "cascade": CascadeSpec,
    "factory": FactorySpec,
}


def parse_spec(doc: dict) -> AnySpec:
    """A spec from its JSON form, by `kind` (a missing kind is an MLP, as before cascades)."""
    kind = doc.get("kind", "mlp") if isinstance(doc, dict) else "mlp"
    if kind not in _KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(_KINDS)}")
    return _KINDS[kind].model_validate(doc)


def build_module(spec: AnySpec, *, factories: Collection[str] = ()) -> nn.Module:
    """A fresh module for any kind of spec (`factories`: trusted factory modules)."""
    if isinstance(spec, CascadeSpec):
        return Cascade(spec)
    if isinstance(spec, FactorySpec):
        return build_factory(spec, factories)
    return build_model(spec)


DEFAULT_HIDDEN = [64, 64]
DEFAULT_EMBEDDING = 8
FAMILIES = ("logistic", "mlp", "embed_mlp", "cascade", "factory")


def default_spec(schema: FeatureSchema) -> ModelSpec:
    """What `init` trains unless told otherwise: an embedding + MLP when the schema has
    categorical features, else an MLP of two 64-wide layers, with a logistic regression
    beside it (`linear_head`, a `Blend`): on small, noisy data the linear head wins
    (`bench prequential --datasets`: solar_flare 80.85 -> 80.89 %, phishing 90.63 -> 90.97 %,
    seeds 7-9), elsewhere the blend follows the MLP. A DP update trains only the head
    the blend favours and commits to it (`Blend.commit`).

    >>> from flywheel.features import Feature, FeatureSchema
    >>> s = FeatureSchema(label="y", labels=["a", "b"],
    ...                   features=[Feature(name="x", kind="numeric")])
    >>> default_spec(s).family, default_spec(s).linear_head
    ('mlp', True)
    """
    emb = DEFAULT_EMBEDDING if schema.categorical else 0
    return ModelSpec(
        input_dim=schema.input_dim,
        labels=schema.labels,
        hidden=list(DEFAULT_HIDDEN),
        embedding_dim=emb,
        linear_head=True,
        schema=schema,
    )


def parse_model_arg(text: str, schema: FeatureSchema) -> AnySpec:
    """The spec `--model TEXT` names, for `schema`; ValueError says what is wrong.

    TEXT is a family with options, `NAME[:key=value,...]`: `logistic`, `mlp` (hidden=64x64,
    activation=relu|tanh|gelu, dropout=0.1), `embed_mlp` (the same plus embedding_dim=8),
    `cascade` (light=16, heavy=256x256), `factory=module:function` (its options as
    further key=value pairs); or a JSON object (a spec without input_dim, labels and
    schema, which come from the schema).

    >>> from flywheel.features import Feature, FeatureSchema
    >>> s = FeatureSchema(label="y", labels=["a", "b"], features=[
    ...     Feature(name="x", kind="numeric"),
    ...     Feature(name="c", kind="categorical", vocabulary=["u", "v"])])
    >>> spec = parse_model_arg("embed_mlp:hidden=32x16,embedding_dim=4,dropout=0.1", s)
    >>> spec.family, spec.hidden, spec.embedding_dim, spec.dropout
    ('embed_mlp', [32, 16], 4, 0.1)
    >>> parse_model_arg("logistic", s).hidden
    []
    >>> parse_model_arg("mlp:hidden=32", s).hidden
    [32]
    """
    text = text.strip()
    base: dict[str, Any] = {"input_dim": schema.input_dim, "labels": schema.labels}
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model: not valid JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise ValueError("--model: a JSON spec must be an object")
        return _validated({**doc, **base, "schema": schema}, text)
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    if name.startswith("factory="):
        name, factory = "factory", name.removeprefix("factory=") + (":" + rest if rest else "")
        factory, _, rest = factory.partition(",")
        options["factory"] = factory
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--model {text!r}: {part!r} is not key=value")
        parsed = _option(value.strip())
        if key.strip() in ("hidden", "light", "heavy") and isinstance(parsed, int):
            parsed = [parsed]  # hidden=16: one layer
        options[key.strip()] = parsed
    families: dict[str, dict[str, Any]] = {
        "logistic": {"kind": "mlp", "hidden": []},
        "mlp": {"kind": "mlp", "hidden": list(DEFAULT_HIDDEN)},
        "embed_mlp": {"kind": "mlp", "hidden": list(DEFAULT_HIDDEN)},
        "cascade": {"kind": "cascade"},
        "factory": {"kind": "factory"},
    }
    if name not in families:
        raise ValueError(f"--model: unknown family {name!r}; expected one of {list(FAMILIES)}")
    doc = {**families[name], **base, "schema": schema}
    if name == "embed_mlp":
        if not schema.categorical:
            raise ValueError(
                "--model embed_mlp needs categorical features; this schema has none "
                "(use mlp or logistic)"
            )
        doc["embedding_dim"] = DEFAULT_EMBEDDING
    if name == "factory":
        doc["factory"] = options.pop("factory")
        known = {"embedding_dim"}
        doc["options"] = {k: v for k, v in options.items() if k not in known}
        options = {k: v for k, v in options.items() if k in known}
    if name == "logistic" and options.get("hidden"):
        raise ValueError("--model logistic has no hidden layers (use mlp)")
    return _validated({**doc, **options}, text)


def _option(value: str) -> Any:
    if "x" in value and all(p.isdigit() for p in value.split("x")):
        return [int(p) for p in value.split("x")]
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _validated(doc: dict[str, Any], text: str) -> AnySpec:
    try:
        return parse_spec(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"--model {text!r}: {problems}") from None
