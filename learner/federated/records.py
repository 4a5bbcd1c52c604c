"""What travels in a federated round, and the guard that checks what leaves a site.

Server → site (`train`): `arrays` (the global model's state), `config` (round, model spec,
local steps and rate, update clip norm; a site draws its own noise seed). Site → server:
`arrays` (the new state, its update clipped) and `metrics` (the aggregate numbers in
`REPLY_METRICS`). Nothing else may leave a site: `outbound_guard` (a Flower client mod)
replaces any other reply with an error before it is sent, and with
`FLYWHEEL_FED_AUDIT_DIR` writes each outgoing message (serialized exactly as sent) to that
folder, so a site can see what it shared. The server checks what arrives as well
(`check_update`): a site is another party.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord

log = logging.getLogger(__name__)

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
SPEC_KEY = "model-spec"
WEIGHT_KEY = "dp-weight"  # every site weighs 1: the DP wrappers' sensitivity assumes it
# counts, loss, accuracy, time and the site's own ε: aggregates, never rows
REPLY_METRICS = frozenset(
    {
        "num-examples",
        WEIGHT_KEY,
        "sources",
        "train-loss",
        "train-accuracy",
        "train-seconds",
        "local-epsilon",
        "local-delta",
        "dp",
        "clipped",
    }
)
GUARD_ERROR_CODE = 9001
AUDIT_ENV = "FLYWHEEL_FED_AUDIT_DIR"


def metric_number(record: MetricRecord, key: str, default: float) -> float:
    """A scalar metric of a record (`default` if absent). Metric values may be lists in
    Flower's types; ours are always numbers, so a list is a malformed record: ValueError."""
    value = record.get(key, default)
    if not isinstance(value, int | float):
        raise ValueError(f"metric {key!r} must be a number, got {type(value).__name__}")
    return value


def config_number(record: ConfigRecord, key: str, default: float) -> float:
    """A numeric value of a config record (`default` if absent); ValueError for any other
    type (config values come from the server, over the network)."""
    value = record.get(key, default)
    if not isinstance(value, int | float):
        raise ValueError(f"config {key!r} must be a number, got {type(value).__name__}")
    return value


def config_bytes(record: ConfigRecord, key: str) -> bytes:
    """A bytes value of a config record (empty if absent); ValueError for any other type."""
    value = record.get(key, b"")
    if not isinstance(value, bytes):
        raise ValueError(f"config {key!r} must be bytes, got {type(value).__name__}")
    return value


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {
        k: torch.from_numpy(np.array(v, copy=True))
        for k, v in zip(record.keys(), record.to_numpy_ndarrays(), strict=True)
    }


def check_reply(reply: Message, sent_shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why `reply` may not leave the site, or None: one ArrayRecord with exactly the
    model's arrays (names and shapes of what the server sent), one MetricRecord with only
    the allowed scalar metrics, and nothing else."""
    if reply.has_error():
        return None  # an error carries a reason string and no content
    content = reply.content
    if set(content.keys()) != {ARRAYS, METRICS}:
        return f"records {sorted(content.keys())}, expected {[ARRAYS, METRICS]}"
    arrays = content.array_records.get(ARRAYS)
    metrics = content.metric_records.get(METRICS)
    if arrays is None or metrics is None:
        return "expected an ArrayRecord 'arrays' and a MetricRecord 'metrics'"
    shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    if shapes != dict(sent_shapes):
        return "arrays differ from the model the server sent (names or shapes)"
    extra = set(metrics.keys()) - REPLY_METRICS
    if extra:
        return f"metrics not allowed to leave a site: {sorted(extra)}"
    if any(not isinstance(v, int | float) for v in metrics.values()):
        return "metrics must be scalars"
    return None


def check_update(reply: Message, sent_shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why the server may not aggregate a site's (non-error) `reply`, or None: what the
    site's own guard checks (`check_reply`), plus finite numbers and the counts the ledger
    records. A site is another party: one NaN would poison the global model."""
    why = check_reply(reply, sent_shapes)
    if why is not None:
        return why
    for key, array in reply.content.array_records[ARRAYS].items():
        values = array.numpy()
        if values.dtype.kind not in "fiu":
            return f"array {key!r} has dtype {values.dtype}, expected numbers"
        if not np.isfinite(values).all():
            return f"array {key!r} holds NaN or infinity"
    metrics = reply.content.metric_records[METRICS]
    missing = {"num-examples", WEIGHT_KEY} - set(metrics.keys())
    if missing:
        return f"metrics {sorted(missing)} missing"
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    if len(numbers) != len(metrics) or not all(math.isfinite(v) for v in numbers.values()):
        return "metrics must be finite"
    n = numbers["num-examples"]
    if n < 0 or n != int(n):
        return f"num-examples must be a count, got {n}"
    return None


def _audit(directory: Path, reply: Message, context: Context, verdict: str | None) -> None:
    from flwr.common.serde import recorddict_to_proto

    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{time.time_ns()}-node{context.node_id}-{reply.metadata.message_type}"
    body = b"" if reply.has_error() else recorddict_to_proto(reply.content).SerializeToString()
    (directory / f"{stem}.bin").write_bytes(body)
    (directory / f"{stem}.json").write_text(
        json.dumps(
            {
                "node_id": context.node_id,
                "run_id": reply.metadata.run_id,
                "message_type": reply.metadata.message_type,
                "error": reply.has_error(),
                "blocked": verdict,
                "bytes": len(body),
            }
        )
    )


def outbound_guard(
    message: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Flower client mod: check, audit and (if it carries anything else) block a reply."""
    sent = message.content.array_records.get(ARRAYS) if not message.has_error() else None
    shapes = {k: tuple(a.shape) for k, a in sent.items()} if sent is not None else {}
    reply = call_next(message, context)
    verdict = check_reply(reply, shapes)
    if verdict is not None:
        log.error("blocked a reply that would have left this site: %s", verdict)
        reply = Message(
            Error(code=GUARD_ERROR_CODE, reason=f"blocked by site: {verdict}"), reply_to=message
        )
    audit = os.environ.get(AUDIT_ENV)
    if audit:
        _audit(Path(audit), reply, context, verdict)
    return reply


def metric_record(values: Mapping[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in values.items()})
