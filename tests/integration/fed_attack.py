"""A malicious site for tests/integration/test_federated.py: it boosts its model update
×SCALE (the scaling / model-replacement attack) and skips the outbound guard."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flywheel.learner.federated.client_app import current_site, reply_for
from flywheel.learner.federated.records import ARRAYS, from_record, to_record

SCALE = 10.0
app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    reply = reply_for(message, current_site())
    base = from_record(message.content.array_records[ARRAYS])
    new = from_record(reply.content.array_records[ARRAYS])
    reply.content[ARRAYS] = to_record({k: base[k] + SCALE * (new[k] - base[k]) for k in base})
    return reply
