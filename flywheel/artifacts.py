"""The on-disk form of a model version: `spec.json` plus `weights.pt` (tensors only).

Weights are read with `torch.load(weights_only=True)`, which refuses arbitrary
pickles, so loading a version never runs code from the artifact store.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch
from torch import nn

from flywheel.modelspec import ModelSpec, build_model

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.pt"
FORMAT = "flywheel-mlp/1"


class ArtifactError(ValueError):
    """The artifact folder is missing a file, is corrupt, or does not match its spec."""


def save_model(folder: Path, spec: ModelSpec, module: nn.Module) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    torch.save(state, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    doc = {"format": FORMAT, "spec": spec.model_dump(), "weights_sha256": digest}
    (folder / SPEC_FILE).write_text(json.dumps(doc, indent=2))
    return folder


def load_model(folder: Path) -> tuple[ModelSpec, nn.Module]:
    """Rebuild the module from its spec and load verified weights, in eval mode."""
    spec_path, weights = folder / SPEC_FILE, folder / WEIGHTS_FILE
    if not spec_path.is_file() or not weights.is_file():
        raise ArtifactError(f"{folder} must contain {SPEC_FILE} and {WEIGHTS_FILE}")
    try:
        doc = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{spec_path}: not JSON ({exc})") from exc
    if doc.get("format") != FORMAT:
        raise ArtifactError(f"{spec_path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    if hashlib.sha256(weights.read_bytes()).hexdigest() != doc.get("weights_sha256"):
        raise ArtifactError(f"{weights}: checksum does not match {SPEC_FILE}")
    spec = ModelSpec.model_validate(doc["spec"])
    module = build_model(spec)
    try:
        module.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
    except pickle.UnpicklingError as exc:
        raise ArtifactError(f"{weights}: holds more than tensors; refused ({exc})") from exc
    except (RuntimeError, KeyError) as exc:
        raise ArtifactError(f"{weights}: does not fit the spec ({exc})") from exc
    module.eval()
    return spec, module
