"""The served models and their atomic swap.

A request takes one `ServedSet` snapshot (the champion and the shadow, canary and guard
held beside it, issue 28) and uses it to the end, so a swap never mixes versions inside a
request, and the response names the version that produced it. `ModelHolder.current()`
is the snapshot's champion, for callers that only ever serve one model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

import numpy as np
import torch
from torch import nn

from flywheel.events import utcnow
from flywheel.features import FeatureSchema, RowEncoder
from flywheel.modelspec import AnySpec, Cascade


class ModelNotReady(RuntimeError):
    """No model has been loaded yet."""


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    spec: AnySpec
    module: nn.Module
    loaded_at: datetime
    precision: str = "fp32"  # what `module` computes in (FLYWHEEL_SERVE_PRECISION)

    @classmethod
    def prepare(
        cls, name: str, version: str, spec: AnySpec, module: nn.Module, precision: str = "fp32"
    ) -> ServedModel:
        """Freeze and warm a module before it can be swapped in; at a `precision` other
        than fp32 a low-precision copy is served (`flywheel.kernels.to_precision`)."""
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        if precision != "fp32":
            from flywheel.kernels import to_precision

            module = to_precision(module, precision)
        served = cls(name, version, spec, module, utcnow(), precision)
        served.predict_proba(np.zeros((1, spec.input_dim), dtype=np.float32))
        # worked out here, off the request path (the follower's thread on a hot swap)
        for part in ("takes_vectors", "row_encoder", "ignored", "feature_names", "non_numeric"):
            getattr(served, part)
        return served

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """(probabilities, path per row): "single" for an MLP; "light" or "heavy" for a
        cascade, whichever network answered the row."""
        with torch.inference_mode():
            t = torch.from_numpy(x)
            if self.spec.kind != "cascade":
                return torch.softmax(self.module(t), dim=1).numpy(), ["single"] * len(x)
            if not isinstance(self.module, Cascade):  # int8/bf16 copies keep the class
                raise TypeError(
                    f"v{self.version} has a cascade spec but a "
                    f"{type(self.module).__name__} module, not a Cascade"
                )
            logits, escalated = self.module.route(t)
            probs = torch.softmax(logits, dim=1).numpy()
        return probs, ["heavy" if e else "light" for e in escalated.tolist()]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.predict(x)[0]

    # What a request asks of the version's schema, worked out once per version: reading
    # `FeatureSchema.numeric_only` alone cost ~3-5 us (it walks the features), ~2 % of a
    # one-row vector request, and building the row encoders ~80 us.
    @property
    def schema(self) -> FeatureSchema | None:
        return self.spec.schema

    @cached_property
    def takes_vectors(self) -> bool:
        """Plain float vectors are valid input: no schema, or only numeric features."""
        return self.spec.schema is None or self.spec.schema.numeric_only

    @cached_property
    def row_encoder(self) -> RowEncoder | None:
        """Named rows to raw vectors (None for a model without a schema)."""
        return None if self.spec.schema is None else self.spec.schema.row_encoder()

    @cached_property
    def ignored(self) -> frozenset[str]:
        """Columns the schema accepts and drops: left out of the `row` a prediction logs."""
        schema = self.spec.schema
        return (
            frozenset(f.name for f in schema.features if f.kind == "ignore")
            if schema
            else frozenset()
        )

    @cached_property
    def feature_names(self) -> frozenset[str]:
        """Every column a named row may hold, ignored ones included."""
        schema = self.spec.schema
        return frozenset(f.name for f in schema.features) if schema else frozenset()

    @cached_property
    def non_numeric(self) -> list[str]:
        """The features a plain float vector cannot carry (categorical, boolean)."""
        schema = self.spec.schema
        return [f.name for f in schema.inputs if f.kind != "numeric"] if schema else []


@dataclass(frozen=True)
class ServedSet:
    """What the service runs at one moment: the champion, and each live role it holds.

    Immutable and swapped whole (`ModelHolder.swap_set`), so a request that took one sees
    the champion and the roles of the same moment. A role is never the champion's own
    version (it would only score against itself). `roles()` lists the held ones.

    >>> from flywheel.modelspec import ModelSpec, build_model
    >>> spec = ModelSpec(input_dim=2, hidden=[2], labels=["a", "b"])
    >>> one = ServedModel.prepare("m", "1", spec, build_model(spec))
    >>> two = ServedModel.prepare("m", "2", spec, build_model(spec))
    >>> s = ServedSet(one, shadow=two)
    >>> {role: m.version for role, m in s.roles().items()}, s.plain
    ({'shadow': '2'}, False)
    """

    champion: ServedModel
    shadow: ServedModel | None = None
    canary: ServedModel | None = None
    guard: ServedModel | None = None

    def __post_init__(self) -> None:
        for role, model in self.roles().items():
            if model.version == self.champion.version:
                raise ValueError(f"v{model.version} is the champion; it cannot be the {role}")

    def roles(self) -> dict[str, ServedModel]:
        """The live roles held (shadow, canary, guard) -> their models."""
        held = (("shadow", self.shadow), ("canary", self.canary), ("guard", self.guard))
        return {role: model for role, model in held if model is not None}

    @property
    def plain(self) -> bool:
        """Only the champion: the request path has nothing to route or score (the usual case,
        checked first on every request)."""
        return self.shadow is None and self.canary is None and self.guard is None

    def scorers(self) -> list[tuple[str, ServedModel]]:
        """(role, model) of the versions that score sampled requests off the path: the
        shadow and the guard, once per version (two aliases may name the same one: it
        scores once, as the shadow)."""
        out: list[tuple[str, ServedModel]] = []
        for role, model in (("shadow", self.shadow), ("guard", self.guard)):
            if model is not None and all(m.version != model.version for _, m in out):
                out.append((role, model))
        return out

    def with_champion(self, model: ServedModel) -> ServedSet:
        """This set with `model` as champion; a role held by `model`'s version is dropped."""
        kept = {r: m for r, m in self.roles().items() if m.version != model.version}
        return ServedSet(model, **kept)


class ModelHolder:
    """The current `ServedSet`, swapped atomically; `current()` is its champion.

    >>> from flywheel.modelspec import ModelSpec, build_model
    >>> spec = ModelSpec(input_dim=2, hidden=[2], labels=["a", "b"])
    >>> holder = ModelHolder()
    >>> holder.swap(ServedModel.prepare("m", "1", spec, build_model(spec))) is None
    True
    >>> holder.current().version, holder.served_set().plain
    ('1', True)
    """

    def __init__(self) -> None:
        self._set: ServedSet | None = None
        self._lock = threading.Lock()

    def current(self) -> ServedModel:
        served = self._set
        if served is None:
            raise ModelNotReady("no model loaded yet")
        return served.champion

    def served_set(self) -> ServedSet:
        """The champion and the roles held with it, as one snapshot."""
        served = self._set
        if served is None:
            raise ModelNotReady("no model loaded yet")
        return served

    @property
    def ready(self) -> bool:
        return self._set is not None

    def swap(self, model: ServedModel) -> ServedModel | None:
        """Make `model` the champion new requests use, keeping the roles held (but one
        `model` itself held); returns the champion it replaced."""
        with self._lock:
            previous = self._set
            self._set = ServedSet(model) if previous is None else previous.with_champion(model)
        return previous.champion if previous is not None else None

    def swap_set(self, served: ServedSet) -> ServedSet | None:
        """Make `served` what new requests use; returns the set it replaced."""
        with self._lock:
            previous, self._set = self._set, served
        return previous
