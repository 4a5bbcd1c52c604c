"""The on-disk form of a model version: `spec.json` plus `weights.pt` (tensors only).

Weights are read with `torch.load(weights_only=True)`, which refuses arbitrary
pickles, so loading a version never runs code from the artifact store. An MLP is
format `flywheel-mlp/1` (unchanged since the first version); a cascade (`CascadeSpec`)
is `flywheel-cascade/1`, so an older reader refuses it by name instead of misreading it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch
from torch import nn

from flywheel.modelspec import AnySpec, CascadeSpec, build_module, parse_spec

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.pt"
FORMAT = "flywheel-mlp/1"
CASCADE_FORMAT = "flywheel-cascade/1"


class ArtifactError(ValueError):
    """The artifact folder is missing a file, is corrupt, or does not match its spec."""


def save_model(folder: Path, spec: AnySpec, module: nn.Module) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    torch.save(state, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    fmt = CASCADE_FORMAT if isinstance(spec, CascadeSpec) else FORMAT
    doc = {"format": fmt, "spec": spec.model_dump(), "weights_sha256": digest}
    (folder / SPEC_FILE).write_text(json.dumps(doc, indent=2))
    return folder


def load_model(folder: Path) -> tuple[AnySpec, nn.Module]:
    """Rebuild the module from its spec and load verified weights, in eval mode."""
    spec_path, weights = folder / SPEC_FILE, folder / WEIGHTS_FILE
    if not spec_path.is_file() or not weights.is_file():
        raise ArtifactError(f"{folder} must contain {SPEC_FILE} and {WEIGHTS_FILE}")
    try:
        doc = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{spec_path}: not JSON ({exc})") from exc
    fmt = doc.get("format")
    if fmt not in (FORMAT, CASCADE_FORMAT):
        raise ArtifactError(
            f"{spec_path}: format {fmt!r}, expected {FORMAT!r} or {CASCADE_FORMAT!r}"
        )
    if hashlib.sha256(weights.read_bytes()).hexdigest() != doc.get("weights_sha256"):
        raise ArtifactError(f"{weights}: checksum does not match {SPEC_FILE}")
    spec = parse_spec(doc["spec"])
    if (spec.kind == "cascade") != (fmt == CASCADE_FORMAT):
        raise ArtifactError(f"{spec_path}: a {spec.kind!r} spec in format {fmt!r}")
    module = build_module(spec)
    try:
        module.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
    except pickle.UnpicklingError as exc:
        raise ArtifactError(f"{weights}: holds more than tensors; refused ({exc})") from exc
    except (RuntimeError, KeyError) as exc:
        raise ArtifactError(f"{weights}: does not fit the spec ({exc})") from exc
    module.eval()
    return spec, module
