"""HTTP request and response bodies (the public contract in ARCHITECTURE.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, WithJsonSchema

from flywheel.events import Identifier, LabelName, SourceName
from flywheel.features import FeatureSchema
from flywheel.subjects import SubjectId

# strict: a JSON number only (an integer is fine); true/false or "1" are refused, not coerced
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]
# parts of the OpenAPI document that `flywheel.service.openapi` fills in from the served
# model (its features: names, kinds, vocabularies; its input width), marked by this key
CHAMPION_PART = "x-flywheel-champion"
NAMED_ROW, VECTOR = "NamedRow", "Vector"
VECTORS, ROWS = "vectors", "rows"  # the tags of the two forms of `instances`


def instances_form(value: Any) -> str:
    """Which form a request's `instances` take, read from the first one: a list of
    objects is named rows, anything else is checked as vectors. Called by pydantic-core
    before it validates the list (~0.3 us), so vectors are validated exactly as before,
    by pydantic-core alone, and named rows only as objects: their values are checked
    against the served model's schema (`FeatureSchema`), which names the field."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return ROWS
    return VECTORS


Vectors = Annotated[
    list[
        Annotated[
            list[FiniteFloat],
            WithJsonSchema({"type": "array", "items": {"type": "number"}, CHAMPION_PART: VECTOR}),
        ]
    ],
    Field(min_length=1),
    Tag(VECTORS),
]
NamedRows = Annotated[
    list[Annotated[dict[str, Any], WithJsonSchema({"type": "object", CHAMPION_PART: NAMED_ROW})]],
    Field(min_length=1),
    Tag(ROWS),
]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: Annotated[Vectors | NamedRows, Discriminator(instances_form)] = Field(
        description="Named rows (`{feature: value}`) or, for a model whose inputs are all "
        "numbers, feature vectors in the model's input order; not both in one request."
    )


class ModelRef(BaseModel):
    name: str
    version: str


class Prediction(BaseModel):
    id: str
    label: str
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]


class CorrectionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prediction_id: Identifier
    label: LabelName
    source: SourceName | None = Field(
        None,
        description="A sub-source of the calling app (`eu` is stored as `<app>/eu`); "
        "another app's namespace is refused with 403. Per-source limits count the app.",
    )
    subject: SubjectId | None = Field(
        None,
        description="The end user the label is about (1-256 characters): the privacy "
        "unit. Keyed-hashed on arrival (FLYWHEEL_SUBJECT_KEY) and never stored nor logged "
        "raw; the same subject from several apps shares one privacy budget. Without it, "
        "the unit is the prediction.",
    )


class CorrectionsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    corrections: list[CorrectionIn] = Field(min_length=1)


class CorrectionsAccepted(BaseModel):
    accepted: int


class RoleInfo(BaseModel):
    version: str
    share: float = Field(
        description="champion, canary: share of routing keys it answers; shadow, guard: "
        "share of requests it scores off the request path (FLYWHEEL_LIVE_*_SHARE)."
    )
    loaded_at: datetime


class ModelInfo(BaseModel):
    name: str
    version: str
    loaded_at: datetime
    input_dim: int
    labels: list[str]
    kind: str = Field("mlp", description="Model spec kind: mlp, cascade or factory.")
    family: str = Field(
        "mlp", description="What `--model` named: logistic, mlp, embed_mlp, cascade or factory."
    )
    precision: str = Field(
        "fp32",
        description="What the served copy computes in: "
        "fp32, int8 or bf16 (FLYWHEEL_SERVE_PRECISION).",
    )
    features: FeatureSchema | None = Field(
        None,
        description="The feature schema: what a named row may hold. Null for a model "
        "that takes only vectors of `input_dim` numbers.",
    )
    roles: dict[str, RoleInfo] = Field(
        default_factory=dict,
        description="What the service runs (issue 28): `champion` and each live role held "
        "(`shadow`, `canary`, `guard`), with its version and share.",
    )


class ErrorBody(BaseModel):
    detail: str
    errors: list[dict] | None = None


# ---- the Open Inference Protocol (KServe v2), `flywheel.service.routes.v2` ----------------
Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


class InferInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    shape: list[Annotated[int, Field(ge=0, strict=True)]] = Field(min_length=1, max_length=2)
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any] = Field(description="The tensor's elements, flat in row-major order or nested.")


class InferOutputRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, max_length=200)
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(
        min_length=1,
        description="One tensor [n, input_dim] (a model whose inputs are all numbers), or "
        "one tensor [n] per feature, named as the feature (BYTES for categories).",
    )
    outputs: list[InferOutputRequest] | None = Field(
        None, description="Which of probabilities, label, prediction_id to return (default all)."
    )


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class V2Error(BaseModel):
    error: str


V2_ERRORS: dict[int | str, dict] = {status: {"model": V2Error} for status in (400, 404, 413, 503)}


# what the write endpoints document: each error status answers with an `ErrorBody`
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorBody} for status in (400, 413, 415, 422, 503)
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 1},
    }
}
# over the app's rate limit (flywheel.service.ratelimit); a full spool's 503 sends
# Retry-After too (flywheel.service.backpressure)
ERROR_RESPONSES[429] = {
    "model": ErrorBody,
    "description": "Over the app's rate limit (FLYWHEEL_RATE_*).",
    "headers": RETRY_AFTER,
}
ERROR_RESPONSES[503] = {
    "model": ErrorBody,
    "description": "No model loaded yet, the records could not be stored, or the spool "
    "is full (FLYWHEEL_SPOOL_MAX_BYTES); Retry-After when a retry can succeed.",
}
NOT_READY: dict[int | str, dict] = {503: {"model": ErrorBody}}
