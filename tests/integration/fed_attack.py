"""Malicious sites. `app` (for tests/integration/test_federated.py, started as a process):
it boosts its model update ×SCALE (the scaling / model-replacement attack) and skips the
outbound guard. `scaled_app` and `float64_app` (for in-process runs,
tests/integration/test_federated_attacks.py): the ×1e6 boost, and a float64 reply with
one weight at 1e300 (finite, so it passes the form checks; its mean overflows float32)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from flywheel.learner.federated.client_app import current_site, reply_for
from flywheel.learner.federated.records import ARRAYS, from_record, to_record

__all__ = ["SCALE", "app", "float64_app", "scaled_app"]

SCALE = 10.0
app = ClientApp()


def _boosted(message: Message, reply: Message, scale: float) -> Message:
    base = from_record(message.content.array_records[ARRAYS])
    new = from_record(reply.content.array_records[ARRAYS])
    reply.content[ARRAYS] = to_record(
        {k: (base[k] + scale * (new[k] - base[k])).to(base[k].dtype) for k in base}
    )
    return reply


@app.train()
def train(message: Message, context: Context) -> Message:
    return _boosted(message, reply_for(message, current_site()), SCALE)


def scaled_app(site: object, scale: float = 1e6) -> ClientApp:
    """A ClientApp training on `site` (a `Site`) and boosting its update ×`scale`."""
    boosted = ClientApp()

    @boosted.train()
    def _train(message: Message, context: Context) -> Message:
        return _boosted(message, reply_for(message, site), scale)  # type: ignore[arg-type]

    return boosted


def float64_app(site: object, value: float = 1e300) -> ClientApp:
    """A ClientApp training on `site` and replying in float64, one weight set to `value`."""
    wide = ClientApp()

    @wide.train()
    def _train(message: Message, context: Context) -> Message:
        reply = reply_for(message, site)  # type: ignore[arg-type]
        arrays = {
            k: np.asarray(v, np.float64)
            for k, v in zip(
                reply.content.array_records[ARRAYS].keys(),
                reply.content.array_records[ARRAYS].to_numpy_ndarrays(),
                strict=True,
            )
        }
        first = next(k for k, v in arrays.items() if v.size)
        arrays[first].flat[0] = value
        reply.content[ARRAYS] = ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()})
        return reply

    return wide
