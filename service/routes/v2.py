"""The Open Inference Protocol (KServe v2, also spoken by Triton, Seldon MLServer and
others) over REST, so clients that speak it work unchanged:

- `GET /v2`, `/v2/health/live`, `/v2/health/ready`: server metadata and probes;
- `GET /v2/models/{name}[/versions/{version}]` (metadata: inputs, outputs) and `.../ready`;
- `POST /v2/models/{name}[/versions/{version}]/infer`.

Inputs are either one numeric tensor `[n, input_dim]` (a model whose inputs are all
numbers: no schema, or only numeric features) or one tensor `[n]` per feature, named as
the feature, BYTES for a categorical one and BOOL for a boolean one; the metadata lists
the latter for a model with a schema. Each infer row is a prediction exactly as on
`POST /v1/predict` (`flywheel.service.prediction`): its own id, logged to Kafka, the
named row included. Outputs: `probabilities` `[n, k]` FP32 (columns in the order of
`GET /v1/model`'s `labels`), `label` `[n]` BYTES and `prediction_id` `[n]` BYTES, the id
to send corrections for. Errors are `{"error": "..."}`: 400 for a bad request, 404 for a
model or version this service does not serve, 413 over `FLYWHEEL_MAX_BATCH`, 503 before a
model is loaded (`flywheel.service.errors`).

Live evaluation (docs/serving.md) as on `/v1/predict`: without a version in the path, a
held canary answers its share of routing keys (`X-Flywheel-Routing-Key`, else a draw) and
`model_version` names it; with the champion's version in the path, the champion answers.
Shadows and guards score a share of the rows off the path either way.
"""

from __future__ import annotations

import math
import time
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from flywheel.service.errors import BadRequest
from flywheel.service.live import LivePlan
from flywheel.service.model_holder import ServedModel
from flywheel.service.prediction import (
    check_batch,
    encode_rows,
    encode_vectors,
    logged_rows,
    predict_and_log,
)
from flywheel.service.schemas import (
    RETRY_AFTER,
    V2_ERRORS,
    InferInput,
    InferRequest,
    InferResponse,
    ModelMetadata,
)
from flywheel.service.state import ServiceState, State, state_of

PLATFORM = "pytorch_flywheel"  # <framework>_<format>: a state dict and a JSON spec
OUTPUTS = ("probabilities", "label", "prediction_id")
# what a per-feature tensor may be, by the feature's kind
NUMBERS = frozenset(
    {
        "FP16",
        "FP32",
        "FP64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
    }
)
KIND_DATATYPE = {"numeric": "FP32", "categorical": "BYTES", "boolean": "BOOL"}
INT_RANGE = {
    f"{sign}INT{bits}": (0, 2**bits - 1) if sign else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    for sign in ("", "U")
    for bits in (8, 16, 32, 64)
}

router = APIRouter(strict_content_type=False)  # infer: JSON without a Content-Type, as predict
meta_router = APIRouter()


# ---- health and metadata --------------------------------------------------------------
@meta_router.get("/v2", responses={413: V2_ERRORS[413]})  # names no model: never 404
async def server_metadata() -> dict:
    """The server's name, version and protocol extensions (none)."""
    return {"name": "flywheel", "version": _version(), "extensions": []}


@meta_router.get("/v2/health/live")
async def live() -> dict:
    return {"live": True}


@meta_router.get("/v2/health/ready")
async def ready(state: State) -> JSONResponse:
    """Ready as `/readyz`: a model is loaded and the prediction log runs."""
    el = state.event_log
    ok = state.holder.ready and el is not None and el.running
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@meta_router.get("/v2/models/{name}", response_model=ModelMetadata, responses=V2_ERRORS)
@meta_router.get(
    "/v2/models/{name}/versions/{version}", response_model=ModelMetadata, responses=V2_ERRORS
)
async def model_metadata(state: State, name: str, version: str | None = None) -> dict:
    """The served version's inputs and outputs: one tensor per feature (a model with a
    feature schema), else one `[n, input_dim]` FP32 tensor named `input`."""
    model = _model(state, name, version)
    k = len(model.spec.labels)
    schema = model.schema
    if schema is None:
        inputs = [{"name": "input", "datatype": "FP32", "shape": [-1, model.spec.input_dim]}]
    else:
        inputs = [
            {"name": f.name, "datatype": KIND_DATATYPE[f.kind], "shape": [-1]}
            for f in schema.inputs
        ]
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "prediction_id", "datatype": "BYTES", "shape": [-1]},
        ],
    }


@meta_router.get("/v2/models/{name}/ready", responses=V2_ERRORS)
@meta_router.get("/v2/models/{name}/versions/{version}/ready", responses=V2_ERRORS)
async def model_ready(state: State, name: str, version: str | None = None) -> dict:
    model = _model(state, name, version)
    return {"name": model.name, "ready": True}


# ---- inference ------------------------------------------------------------------------
INFER_ERRORS: dict[int | str, dict] = {
    **V2_ERRORS,
    415: V2_ERRORS[400],  # + a non-JSON body
    # over the app's rate limit (flywheel.service.ratelimit)
    429: {**V2_ERRORS[400], "description": "Over the app's rate limit.", "headers": RETRY_AFTER},
}


@router.post("/v2/models/{name}/infer", response_model=InferResponse, responses=INFER_ERRORS)
@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    response_model=InferResponse,
    responses=INFER_ERRORS,
)
async def infer(
    body: InferRequest, request: Request, name: str, version: str | None = None
) -> JSONResponse:
    """Predict a label per row; every row is a prediction with its own id, logged to
    Kafka as on `POST /v1/predict`."""
    state = state_of(request)
    start = time.perf_counter()
    served = state.served_set()
    model = _model(state, name, version)
    live = state.live
    plan = None
    if live is not None and not served.plain and served.champion is model:
        # as on /v1/predict: without a version in the path a canary may answer (routing
        # key, else a draw); shadows and guards score a share of the rows off the path
        plan = (
            live.route(served, request.headers)
            if version is None
            else LivePlan(model, served.scorers())
        )
        model = plan.answering
    wanted = _wanted_outputs(body, model)
    inputs = body.inputs
    schema = model.schema
    if schema is not None and inputs[0].name in model.feature_names:
        rows = _rows(inputs, model, state)
        x = encode_rows(state, model, rows, where="row")
        predictions = await predict_and_log(
            state, model, x, start=start, rows=logged_rows(model, rows), where="row"
        )
    else:
        vectors = _matrix(inputs, model, state)
        x = encode_vectors(model, vectors, where="inputs[0]")
        predictions = await predict_and_log(
            state, model, x, start=start, vectors=vectors, where="row"
        )
    if plan is not None:
        live.after(plan, x, predictions)  # type: ignore[union-attr]
    n, labels = len(predictions), model.spec.labels
    tensors = {
        "probabilities": lambda: {
            "name": "probabilities",
            "shape": [n, len(labels)],
            "datatype": "FP32",
            "data": [v for p in predictions for v in p["probabilities"].values()],
        },
        "label": lambda: {
            "name": "label",
            "shape": [n],
            "datatype": "BYTES",
            "data": [p["label"] for p in predictions],
        },
        "prediction_id": lambda: {
            "name": "prediction_id",
            "shape": [n],
            "datatype": "BYTES",
            "data": [p["id"] for p in predictions],
        },
    }
    out: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if body.id is not None:
        out["id"] = body.id
    out["outputs"] = [tensors[o]() for o in wanted]
    return JSONResponse(out)


# ---- helpers --------------------------------------------------------------------------
def _version() -> str:
    try:
        return metadata.version("flywheel")
    except metadata.PackageNotFoundError:
        return "0"


def _model(state: ServiceState, name: str, version: str | None) -> ServedModel:
    """The served model if `name` (and `version`, if given) name it; else 404."""
    model = state.served()
    if name != model.name:
        raise BadRequest(
            f"model {name!r} is not served here; this service serves {model.name!r}", 404
        )
    if version is not None and version != model.version:
        raise BadRequest(
            f"model {name!r} version {version!r} is not served; the served version is "
            f"{model.version!r} (or leave the version out of the path)",
            404,
        )
    return model


def _wanted_outputs(body: InferRequest, model: ServedModel) -> list[str]:
    if not body.outputs:
        return list(OUTPUTS)
    wanted = []
    for k, o in enumerate(body.outputs):
        if o.name not in OUTPUTS:
            raise BadRequest(
                f"outputs[{k}].name: {o.name!r} is not an output of model {model.name}; "
                f"its outputs are {list(OUTPUTS)}",
                400,
            )
        wanted.append(o.name)
    return wanted


def _flat(t: InferInput, where: str) -> list[Any]:
    """The tensor's elements, flat in row-major order, each checked against its datatype
    (a JSON number for FP*, an integer in range for (U)INT*, true/false for BOOL, text for
    BYTES); 400 names the tensor and the first element that does not fit."""
    data: list[Any] = t.data
    if any(isinstance(v, list) for v in data):
        data = _flatten(data)
    count = math.prod(t.shape)
    if len(data) != count:
        raise BadRequest(
            f"{where}: shape {t.shape} holds {count} elements; data has {len(data)}", 400
        )
    dt = t.datatype
    if dt == "BYTES":
        bad = next((i for i, v in enumerate(data) if not isinstance(v, str)), None)
        expected = "text"
    elif dt == "BOOL":
        bad = next((i for i, v in enumerate(data) if not isinstance(v, bool)), None)
        expected = "true or false"
    elif dt.startswith("FP"):
        bad = next(
            (
                i
                for i, v in enumerate(data)
                if isinstance(v, bool) or not isinstance(v, (int, float))
            ),
            None,
        )
        if bad is None:
            bad = next((i for i, v in enumerate(data) if not math.isfinite(v)), None)
        expected = "a finite number"
    else:
        lo, hi = INT_RANGE[dt]
        bad = next(
            (
                i
                for i, v in enumerate(data)
                if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi
            ),
            None,
        )
        expected = f"an integer in [{lo}, {hi}]"
    if bad is not None:
        raise BadRequest(f"{where}.data[{bad}]: {data[bad]!r:.60} is not {dt} ({expected})", 400)
    return data


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _matrix(inputs: list[InferInput], model: ServedModel, state: ServiceState) -> list[list[Any]]:
    """One `[n, input_dim]` numeric tensor as row vectors (values as sent)."""
    if len(inputs) != 1:
        names = [t.name for t in inputs]
        schema = model.schema
        features = schema.names if schema is not None else []
        unknown = next((k for k, t in enumerate(inputs) if t.name not in features), 0)
        raise BadRequest(
            f"inputs[{unknown}].name: {inputs[unknown].name!r} is not a feature of model "
            f"{model.name}; send one tensor [n, {model.spec.input_dim}]"
            + (f" or one tensor [n] per feature of {features}" if features else "")
            + f" (got {names})",
            400,
        )
    t = inputs[0]
    width = model.spec.input_dim
    if not model.takes_vectors:
        raise BadRequest(
            f"inputs[0]: model {model.name} v{model.version} has non-numeric features "
            f"({', '.join(model.non_numeric)}): send one tensor [n] per feature, named as "
            f"the feature (BYTES for categories), not {t.name!r}",
            400,
        )
    if len(t.shape) != 2 or t.shape[1] != width:
        raise BadRequest(
            f"inputs[0]: shape {t.shape}; model {model.name} v{model.version} takes [n, {width}]",
            400,
        )
    if t.datatype not in NUMBERS:
        raise BadRequest(f"inputs[0]: datatype {t.datatype}; this model takes numbers (FP32)", 400)
    n = t.shape[0]
    if n == 0:
        raise BadRequest("inputs[0]: an empty batch (shape [0, ...])", 400)
    check_batch(n, state)
    flat = _flat(t, "inputs[0]")
    return [flat[i * width : (i + 1) * width] for i in range(n)]


def _rows(
    inputs: list[InferInput], model: ServedModel, state: ServiceState
) -> list[dict[str, Any]]:
    """One `[n]` (or `[n, 1]`) tensor per feature as named rows."""
    schema = model.schema
    assert schema is not None
    known = model.feature_names
    columns: dict[str, list[Any]] = {}
    n: int | None = None
    for k, t in enumerate(inputs):
        where = f"inputs[{k}]"
        if t.name not in known:
            raise BadRequest(
                f"{where}.name: {t.name!r} is not a feature of model {model.name}; its "
                f"features are {schema.names}",
                400,
            )
        if t.name in columns:
            raise BadRequest(f"{where}.name: {t.name!r} is given twice", 400)
        if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
            raise BadRequest(
                f"{where}: shape {t.shape}; a feature's tensor is [n] (or [n, 1])", 400
            )
        if n is None:
            n = t.shape[0]
        elif t.shape[0] != n:
            raise BadRequest(
                f"{where}: {t.shape[0]} rows, but inputs[0] has {n}: every feature's "
                "tensor holds the same rows",
                400,
            )
        columns[t.name] = _flat(t, where)
    if not n:
        raise BadRequest("inputs: an empty batch (shape [0])", 400)
    check_batch(n, state)
    names = list(columns)
    values = list(columns.values())
    return [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]
