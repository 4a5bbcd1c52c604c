"""HTTP request and response bodies (the public contract in ARCHITECTURE.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from flywheel.events import Identifier, LabelName

# strict: a JSON number only (an integer is fine); true/false or "1" are refused, not coerced
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[list[FiniteFloat]] = Field(
        min_length=1, description="Feature vectors, each exactly the model's input width."
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
    source: Identifier | None = Field(None, description="Client or site id, for per-source limits.")


class CorrectionsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    corrections: list[CorrectionIn] = Field(min_length=1)


class CorrectionsAccepted(BaseModel):
    accepted: int


class ModelInfo(BaseModel):
    name: str
    version: str
    loaded_at: datetime
    input_dim: int
    labels: list[str]
    kind: str = Field("mlp", description="Model spec kind: mlp or cascade.")
    precision: str = Field(
        "fp32",
        description="What the served copy computes in: "
        "fp32, int8 or bf16 (FLYWHEEL_SERVE_PRECISION).",
    )


class ErrorBody(BaseModel):
    detail: str
    errors: list[dict] | None = None


# what the write endpoints document: each error status answers with an `ErrorBody`
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorBody} for status in (400, 413, 422, 503)
}
NOT_READY: dict[int | str, dict] = {503: {"model": ErrorBody}}
