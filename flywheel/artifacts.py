"""The on-disk form of a model version: `spec.json` plus `weights.pt` (tensors only).

Weights are read with `torch.load(weights_only=True)`, which refuses arbitrary
pickles, so loading a version never runs code from the artifact store. An MLP is
format `flywheel-mlp/1` (unchanged since the first version); a cascade (`CascadeSpec`)
is `flywheel-cascade/1`, so an older reader refuses it by name instead of misreading it.
A spec that carries a feature schema, dropout or embeddings is `flywheel-mlp/2` (or
`flywheel-cascade/2`), a factory network `flywheel-factory/1`, for the same reason. The
schema is inside `spec.json`, plain JSON: reading what a version expects needs no torch
(`read_spec`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from flywheel.modelspec import (
    AnySpec,
    CascadeSpec,
    FactoryError,
    FactorySpec,
    build_module,
    parse_spec,
    spec_doc,
)

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.pt"
FORMAT = "flywheel-mlp/1"
CASCADE_FORMAT = "flywheel-cascade/1"
# format -> (kind, whether it may carry the newer optional fields)
FORMATS = {
    FORMAT: ("mlp", False),
    "flywheel-mlp/2": ("mlp", True),
    CASCADE_FORMAT: ("cascade", False),
    "flywheel-cascade/2": ("cascade", True),
    "flywheel-factory/1": ("factory", True),
}


def format_of(spec: AnySpec) -> str:
    """The artifact format a spec is written in (the oldest that can hold it)."""
    if isinstance(spec, FactorySpec):
        return "flywheel-factory/1"
    kind = "cascade" if isinstance(spec, CascadeSpec) else "mlp"
    newer = set(spec_doc(spec)) & {"schema", "dropout", "embedding_dim"}
    return f"flywheel-{kind}/{2 if newer else 1}"


class ArtifactError(ValueError):
    """The artifact folder is missing a file, is corrupt, or does not match its spec."""


def save_model(folder: Path, spec: AnySpec, module: nn.Module) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    torch.save(state, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    doc = {"format": format_of(spec), "spec": spec_doc(spec), "weights_sha256": digest}
    (folder / SPEC_FILE).write_text(json.dumps(doc, indent=2))
    return folder


def read_spec(folder: Path) -> AnySpec:
    """The spec (and schema) of an artifact folder, from JSON alone: no torch, no weights."""
    spec_path = folder / SPEC_FILE
    if not spec_path.is_file():
        raise ArtifactError(f"{folder} must contain {SPEC_FILE}")
    try:
        doc = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{spec_path}: not JSON ({exc})") from exc
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt not in FORMATS:
        raise ArtifactError(f"{spec_path}: format {fmt!r}, expected one of {sorted(FORMATS)}")
    try:
        spec = parse_spec(doc["spec"])
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"{spec_path}: not a valid spec ({exc})") from exc
    kind, newer = FORMATS[fmt]
    if spec.kind != kind or (not newer and format_of(spec) != fmt):
        raise ArtifactError(f"{spec_path}: a {spec.kind!r} spec in format {fmt!r}")
    return spec


def load_model(folder: Path, *, factories: Collection[str] = ()) -> tuple[AnySpec, nn.Module]:
    """Rebuild the module from its spec and load verified weights, in eval mode.

    `factories`: the modules this deployment trusts to build `factory` networks
    (`FLYWHEEL_MODEL_FACTORIES`); any other factory is refused before it is imported.
    """
    spec_path, weights = folder / SPEC_FILE, folder / WEIGHTS_FILE
    if not spec_path.is_file() or not weights.is_file():
        raise ArtifactError(f"{folder} must contain {SPEC_FILE} and {WEIGHTS_FILE}")
    spec = read_spec(folder)
    doc = json.loads(spec_path.read_text())
    if hashlib.sha256(weights.read_bytes()).hexdigest() != doc.get("weights_sha256"):
        raise ArtifactError(f"{weights}: checksum does not match {SPEC_FILE}")
    try:
        module = build_module(spec, factories=factories)
    except FactoryError as exc:
        raise ArtifactError(f"{folder}: {exc}") from exc
    try:
        module.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
    except pickle.UnpicklingError as exc:
        raise ArtifactError(f"{weights}: holds more than tensors; refused ({exc})") from exc
    except (RuntimeError, KeyError) as exc:
        raise ArtifactError(f"{weights}: does not fit the spec ({exc})") from exc
    module.eval()
    return spec, module
