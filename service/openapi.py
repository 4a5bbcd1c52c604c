"""The OpenAPI document shows the served champion: `POST /v1/predict`'s `instances` take
the forms that version accepts, and its named rows list the version's features (name,
kind, vocabulary, whether and how a missing value is filled).

FastAPI builds the document once and caches it (`app.openapi_schema`); this wraps that
in a second cache keyed by the served `ServedModel`, so after a hot swap the next
`GET /openapi.json` describes the new champion, and between swaps the document is built
once (FastAPI's base document took ~180 ms, the champion's parts ~2 ms, on the
2-vCPU development VM).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from flywheel.features import Feature, FeatureSchema
from flywheel.service.errors import is_v2
from flywheel.service.model_holder import ModelHolder, ServedModel
from flywheel.service.schemas import CHAMPION_PART, NAMED_ROW, VECTOR

MAX_VOCABULARY_SHOWN = 200  # the rest is in GET /v1/model's `features`


def install_champion_openapi(app: FastAPI, holder: ModelHolder) -> None:
    """Make `app.openapi()` (what `/openapi.json` and `/docs` read) describe the model
    `holder` serves now."""
    generate = app.openapi  # FastAPI's own, cached in app.openapi_schema after one call
    lock = threading.Lock()
    cached: list[Any] = [object(), None]  # [the ServedModel it describes, the document]

    def openapi() -> dict[str, Any]:
        model = holder.current() if holder.ready else None
        with lock:
            if cached[0] is not model:
                cached[:] = [model, champion_openapi(generate(), model)]
            return cached[1]

    app.openapi = openapi  # type: ignore[method-assign]


def champion_openapi(base: dict[str, Any], model: ServedModel | None) -> dict[str, Any]:
    """A copy of `base` whose predict request describes `model` (generic before a model
    is loaded)."""
    doc = copy.deepcopy(base)
    for path, operations in doc.get("paths", {}).items():
        if is_v2(path):  # the Open Inference Protocol's invalid input is a 400 `{"error"}`
            for op in operations.values():
                op.get("responses", {}).pop("422", None)
    document_error_bodies(doc)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    instances = schemas.get("PredictRequest", {}).get("properties", {}).get("instances")
    if instances is None:  # pragma: no cover - a FastAPI that names components otherwise
        return doc
    forms = []
    for form in instances.pop("oneOf", []):
        part = form.get("items", {}).get(CHAMPION_PART)
        if part == VECTOR and (model is None or model.takes_vectors):
            forms.append({**form, "items": vector_schema(model)})
        elif part == NAMED_ROW and (model is None or model.schema is not None):
            schemas[NAMED_ROW] = named_row_schema(model)
            forms.append({**form, "items": {"$ref": f"#/components/schemas/{NAMED_ROW}"}})
    if len(forms) == 1:
        instances.update(forms[0])
    else:
        instances["oneOf"] = forms
    if model is not None:
        instances["description"] = instances.get("description", "") + (
            f" Model {model.name} v{model.version} takes "
            + (
                "named rows or vectors."
                if len(forms) == 2
                else ("named rows." if model.schema is not None else "vectors.")
            )
        )
    return doc


_VALIDATION_ERROR = "#/components/schemas/HTTPValidationError"


def document_error_bodies(doc: dict[str, Any]) -> None:
    """Make each operation's error answers the bodies the service sends
    (`flywheel.service.errors`), found by fuzzing the document (tests/unit/
    test_fuzz_openapi.py): a 422 is `ErrorBody` (`detail` a string), not FastAPI's
    `HTTPValidationError`, and any operation that takes a body can answer 400 (malformed
    JSON, not UTF-8); under /v2 errors are `V2Error`."""
    schemas = doc.get("components", {}).get("schemas", {})
    for path, operations in doc.get("paths", {}).items():
        body = "V2Error" if is_v2(path) else "ErrorBody"
        if body not in schemas:
            continue
        error = {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}
        for op in operations.values():
            responses = op.get("responses", {})
            invalid = responses.get("422", {})
            if (
                invalid.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
                == _VALIDATION_ERROR
            ):
                invalid["content"] = copy.deepcopy(error)
            if "requestBody" in op and "400" not in responses:
                responses["400"] = {
                    "description": "The body is not JSON (malformed, or not UTF-8).",
                    "content": copy.deepcopy(error),
                }


def vector_schema(model: ServedModel | None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "array", "items": {"type": "number"}}
    if model is None:
        out["description"] = "The model's inputs in order (no model is loaded yet)."
        return out
    width = model.spec.input_dim
    out.update(minItems=width, maxItems=width)
    schema = model.schema
    order = f": {', '.join(schema.names)}" if schema is not None else ""
    out["description"] = f"The {width} inputs of {model.name} v{model.version} in order{order}."
    return out


def named_row_schema(model: ServedModel | None) -> dict[str, Any]:
    """A named row of `model`'s features: each feature's JSON type, kind, vocabulary and
    fill; an unknown key is refused (`additionalProperties: false`)."""
    schema: FeatureSchema | None = model.schema if model is not None else None
    if model is None or schema is None:
        return {
            "title": NAMED_ROW,
            "type": "object",
            "description": "Named features (no model with a feature schema is loaded yet).",
        }
    return {
        "title": NAMED_ROW,
        "type": "object",
        "description": (
            f"The features of {model.name} v{model.version}, the served champion "
            "(GET /v1/model has its whole schema). A feature that is missing or null takes "
            "its fill, or is refused where it has none; a category outside the vocabulary "
            "is served through the feature's unknown bucket and counted in /metrics "
            "(flywheel_unknown_categories_total)."
        ),
        "properties": {f.name: feature_schema(f) for f in schema.features},
        "required": [f.name for f in schema.inputs if f.missing == "error"],
        "additionalProperties": False,
    }


_TYPES: dict[str, list[str]] = {
    "numeric": ["number"],
    "categorical": ["string", "integer"],
    "boolean": ["boolean"],
}
_DESCRIBE: dict[str, Callable[[Feature], str]] = {
    "numeric": lambda f: f"numeric (mean {f.mean:g}, std {f.std:g})",
    "categorical": lambda f: f"categorical, {len(f.vocabulary)} known categories",
    "boolean": lambda f: "boolean",
}


def feature_schema(f: Feature) -> dict[str, Any]:
    if f.kind == "ignore":
        return {"x-flywheel-kind": "ignore", "description": "ignored: accepted and dropped"}
    types = list(_TYPES[f.kind])
    if f.missing == "fill":
        types.append("null")
        if f.kind == "categorical" and not isinstance(f.fill, str):
            fill = "the unknown bucket"
        elif f.kind == "numeric":
            fill = f"{f.fill_value():g}"
        else:
            fill = repr(f.fill)
        missing = f"; missing or null: {fill}"
    else:
        missing = "; required (no fill)"
    out: dict[str, Any] = {
        "type": types,
        "x-flywheel-kind": f.kind,
        "description": _DESCRIBE[f.kind](f) + missing + (f". {f.reason}" if f.reason else ""),
    }
    if f.kind == "categorical":
        shown = f.vocabulary[:MAX_VOCABULARY_SHOWN]
        out["x-vocabulary"] = shown
        if shown:
            out["examples"] = shown[:3]
        if len(shown) < len(f.vocabulary):
            out["x-vocabulary-size"] = len(f.vocabulary)
    return out
